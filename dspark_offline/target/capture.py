"""Capture target layer states with forward hooks instead of ``output_hidden_states``.

Why hooks: ``output_hidden_states=True`` keeps all N+1 residual states alive (for a 36-layer
target that is 37 x [B, S, H] when we need 5), and in transformers 5.x its last entry is the
*post-norm* state rather than the raw output of the last decoder layer, which silently breaks
the "dspark" layer-id convention for id N-1. A hook on decoder layer ``i`` sees exactly the
"dspark" layer ``i`` (its raw output, before any final norm), and a hook on the final norm sees
the post-norm state the LM head consumes.

Every forward overwrites what the previous one captured, so the same context works for a plain
prefill and for incremental (KV-cached) decoding steps, where each step captures only the new
positions ``[B, S_new, ...]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from dspark_offline.target.layers import validate_layer_ids


class UnsupportedArchitectureError(TypeError):
    """The model does not expose its decoder layers / final norm where we look for them."""


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a decoder-only LM that stage 1 needs, found generically."""

    base: nn.Module  # the bare transformer (``model.model`` for *ForCausalLM)
    layers: nn.ModuleList  # decoder layers, index = dspark layer id
    norm: nn.Module  # final norm; its output feeds the LM head


def find_decoder_parts(model: nn.Module) -> DecoderParts:
    """Locate base model, decoder layers and final norm of a Llama/Qwen/Mistral-like model.

    Accepts either a ``*ForCausalLM`` (``model.model.layers``) or the bare base model
    (``model.layers``). Anything else gets an error naming the class, rather than a guess.
    """
    for base in (getattr(model, "model", None), model):
        if base is None:
            continue
        layers, norm = getattr(base, "layers", None), getattr(base, "norm", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and isinstance(norm, nn.Module):
            return DecoderParts(base=base, layers=layers, norm=norm)
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: cannot find decoder layers and final norm; expected "
        "`model.model.layers` (nn.ModuleList) and `model.model.norm` as in Llama/Qwen/Mistral-like "
        "causal LMs"
    )


def _first_tensor(output: object) -> torch.Tensor:
    # transformers 5.x decoder layers return a tensor; 4.x returned (hidden, ...) tuples.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UnsupportedArchitectureError(
        f"decoder layer returned {type(output).__name__}, expected a tensor or a (tensor, ...) tuple"
    )


@dataclass
class LayerCapture:
    """States captured during the most recent forward under ``capture_layers``."""

    layer_ids: list[int]
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> [B, S, H]
    final: torch.Tensor | None = None  # [B, S, H] post-norm, when capture_final

    def stacked(self) -> torch.Tensor:
        """Captured layers as one tensor ``[B, S, L, H]`` in ``layer_ids`` order."""
        missing = [i for i in self.layer_ids if i not in self.states]
        if missing:
            raise RuntimeError(
                f"no state captured for layer ids {missing}: run a forward inside capture_layers() first"
            )
        return torch.stack([self.states[i] for i in self.layer_ids], dim=2)  # [B, S, L, H]

    def clear(self) -> None:
        """Drop references to the last forward's tensors (frees memory between batches)."""
        self.states.clear()
        self.final = None


@contextmanager
def capture_layers(
    model: nn.Module, layer_ids: list[int], capture_final: bool = True
) -> Iterator[LayerCapture]:
    """Hook decoder layers ``layer_ids`` ("dspark" ids) and, optionally, the final norm.

    Usage::

        with capture_layers(model, [1, 9, 17]) as cap:
            model.model(input_ids=ids, attention_mask=mask)
            hidden = cap.stacked()   # [B, S, 3, H]
            final = cap.final        # [B, S, H]

    Hooks are removed on exit, also on error; what the last forward captured stays readable after
    exit. Captured tensors are references to the model's own activations (no copy).
    """
    parts = find_decoder_parts(model)
    ids = validate_layer_ids(list(layer_ids), len(parts.layers))
    cap = LayerCapture(layer_ids=ids)
    handles = []

    def layer_hook(layer_id: int):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            cap.states[layer_id] = _first_tensor(output)  # [B, S, H]

        return hook

    def norm_hook(_module: nn.Module, _args: tuple, output: object) -> None:
        cap.final = _first_tensor(output)  # [B, S, H]

    try:
        for i in ids:
            handles.append(parts.layers[i].register_forward_hook(layer_hook(i)))
        if capture_final:
            handles.append(parts.norm.register_forward_hook(norm_hook))
        yield cap
    finally:
        for h in handles:
            h.remove()
