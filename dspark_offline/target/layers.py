"""The one place that converts target layer ids between conventions.

Convention "dspark" (used by SGLang's DSpark, DeepSpec and DFlash checkpoints, and everywhere in
this project): layer id ``i`` is the output of decoder layer ``i`` (0-based), i.e. the
pre-final-norm residual stream after that layer.

- Hugging Face: ``output_hidden_states[i + 1]`` (index 0 is the embedding output). Careful: in
  transformers 5.x the last entry, ``output_hidden_states[N]``, is the *post-norm* state, not the
  raw output of layer N-1; we therefore capture with forward hooks on the decoder layers
  (``dspark_offline.target.capture``) and never rely on that index.
- vLLM ``eagle_aux_hidden_state_layer_ids``: ``i + 1``.
"""

from __future__ import annotations

LAYER_ID_CONVENTION = "dspark"


class LayerIdError(ValueError):
    """A layer id that does not exist in the target."""


def dspark_to_hf_hidden_index(layer_id: int) -> int:
    """Index into HF ``output_hidden_states`` that holds dspark layer ``layer_id``."""
    return layer_id + 1


def dspark_to_vllm_aux_id(layer_id: int) -> int:
    """vLLM ``eagle_aux_hidden_state_layer_ids`` entry for dspark layer ``layer_id``."""
    return layer_id + 1


def default_layer_ids(num_hidden_layers: int, n: int) -> list[int]:
    """``n`` ids evenly spaced from 1 to N-3 (``[1, 9, 17, 25, 33]`` for N=36, n=5)."""
    lo, hi = 1, num_hidden_layers - 3
    if hi - lo + 1 < n:  # very shallow targets (tests): spread over every layer
        lo, hi = 0, num_hidden_layers - 1
    if n == 1:
        return [hi]
    ids = [round(lo + k * (hi - lo) / (n - 1)) for k in range(n)]
    if len(set(ids)) != n:
        raise LayerIdError(
            f"cannot pick {n} distinct layer ids from a target with {num_hidden_layers} layers"
        )
    return ids


def validate_layer_ids(layer_ids: list[int], num_hidden_layers: int) -> list[int]:
    """Check ids are distinct, sorted-able and inside ``[0, N)``; return them as given."""
    if not layer_ids:
        raise LayerIdError("layer_ids is empty")
    bad = [i for i in layer_ids if not 0 <= i < num_hidden_layers]
    if bad:
        raise LayerIdError(
            f"layer_ids {bad} out of range for a target with num_hidden_layers={num_hidden_layers} "
            f"(valid: 0..{num_hidden_layers - 1}, '{LAYER_ID_CONVENTION}' convention)"
        )
    if len(set(layer_ids)) != len(layer_ids):
        raise LayerIdError(f"layer_ids {layer_ids} contain duplicates")
    return list(layer_ids)


def resolve_layer_ids(layer_ids: list[int] | None, num_hidden_layers: int, n: int) -> list[int]:
    """Explicit ids (validated) or the default spacing."""
    if layer_ids is None:
        return default_layer_ids(num_hidden_layers, n)
    return validate_layer_ids(layer_ids, num_hidden_layers)
