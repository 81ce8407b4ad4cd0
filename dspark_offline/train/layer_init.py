"""Start the draft layers as copies of the target's own decoder layers (``train.layer_init: target``).

A draft layer has the target's dims (hidden size, heads, head dim, MLP width unless
``draft.intermediate_size`` says otherwise) and the same parameter names, so the target's layers
after the deepest stored layer can be copied in: draft layer ``i`` starts as target layer
``first + i`` with ``first = max(layer_ids) + 1`` (moved down so all of them exist). The rest is set
so the copied attention starts where it ran in the target:

* ``fc`` passes the deepest stored layer's state through unchanged (identity on its slice of the
  concatenation, zero elsewhere): that state is exactly the input of target layer ``first``;
* ``hidden_norm`` takes the weight of that layer's ``input_layernorm`` (the target normalises the
  residual stream with it before its keys and values; the drafter's context skips
  ``input_layernorm``, DESIGN §4);
* the final ``norm`` is the target's final norm (stored beside the features).

Only an initial point: the block's own tokens enter as bare embeddings, not the deep residual
stream the copied layer saw in the target, and ``q_norm``/``k_norm`` stay at 1 for targets that
have none (Llama). Training moves everything from there.
"""

from __future__ import annotations

import torch

from dspark_offline.target.weights import decoder_layer_tensors

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints save; not parameters


class LayerInitError(ValueError):
    """The target's layers cannot be copied into the drafter; the message says why."""


def copied_layers(layer_ids: tuple[int, ...], num_target_layers: int, num_layers: int) -> list[int]:
    """Target layers the draft layers start from: the ones right after the deepest stored layer."""
    if num_layers > num_target_layers:
        raise LayerInitError(
            f"train.layer_init: target: draft.num_layers={num_layers} exceeds the target's "
            f"{num_target_layers} layers"
        )
    first = min(max(layer_ids) + 1, num_target_layers - num_layers)
    return list(range(first, first + num_layers))


@torch.no_grad()
def init_layers_from_target(model, target_dir, final_norm: torch.Tensor) -> str:
    """Overwrite the draft layers, ``fc``, ``hidden_norm`` and ``norm`` of ``model`` (a DSparkDraft)
    from the target checkpoint in ``target_dir``; returns a line saying what was copied."""
    cfg = model.cfg
    layers = copied_layers(cfg.target_layer_ids, cfg.num_target_layers, cfg.num_layers)
    kept_default: set[str] = set()
    first_norm = None  # input_layernorm of the first copied layer: hidden_norm's weight
    for draft_layer, target_layer in zip(model.layers, layers, strict=True):
        tensors = decoder_layer_tensors(target_dir, target_layer)
        if first_norm is None:
            first_norm = tensors["input_layernorm.weight"]
        params = dict(draft_layer.named_parameters())
        extra = sorted(n for n in tensors if n not in params and not n.endswith(IGNORED_SUFFIXES))
        if extra:
            raise LayerInitError(
                f"train.layer_init: target: target layer {target_layer} has tensors the draft layer "
                f"lacks: {extra} (e.g. attention biases); use train.layer_init: random"
            )
        for name, param in params.items():
            if name not in tensors:
                kept_default.add(name)  # e.g. q_norm/k_norm of a Llama target: stay at 1
                continue
            src = tensors[name]
            if tuple(src.shape) != tuple(param.shape):
                raise LayerInitError(
                    f"train.layer_init: target: {name} of target layer {target_layer} has shape "
                    f"{tuple(src.shape)}, the draft layer {tuple(param.shape)} "
                    "(draft.intermediate_size must be null or the target's)"
                )
            param.copy_(src.to(param.dtype))
    deepest = max(range(len(cfg.target_layer_ids)), key=lambda k: cfg.target_layer_ids[k])
    h = cfg.hidden_size
    model.fc.weight.zero_()
    model.fc.weight[:, deepest * h : (deepest + 1) * h] = torch.eye(h, dtype=model.fc.weight.dtype)
    model.hidden_norm.weight.copy_(first_norm.to(model.hidden_norm.weight.dtype))
    model.norm.weight.copy_(final_norm.to(model.norm.weight.dtype))
    kept = f"; kept at their initial values: {sorted(kept_default)}" if kept_default else ""
    return (
        f"draft layers initialised from target layers {layers}; fc passes layer "
        f"{cfg.target_layer_ids[deepest]} through{kept}"
    )
