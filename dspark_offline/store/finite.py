"""The store holds finite features only: inf or NaN from the target stops the dump, named.

A non-finite layer state would train the drafter on garbage (one NaN poisons every loss it
touches), whatever the stored dtype; float8 cannot even scale it. A finite value beyond the range
of the stored dtype (a bfloat16 target's outlier channel stored as float16: |x| > 65504) would be
stored as inf, so it is refused the same way. The check costs one reduction per target batch and
feature (`torch.aminmax`, which propagates NaN and keeps ±inf, over the whole padded batch); only
when it fails are the valid tokens searched for the first bad value, which is reported with its
sample, token, layer and channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dspark_offline.store.dtypes import torch_dtype

HINT = (
    "the store holds finite values only (check the target's dtype, e.g. target.dtype=float32 or "
    "bfloat16 instead of float16, or store hidden states as bfloat16: dump.hidden_dtype)"
)


class NonFiniteFeatureError(ValueError):
    """A feature to be stored holds inf or NaN, or a value the stored dtype turns into inf (names the
    sample, token and layer)."""


def storage_limit(logical: str) -> float:
    """The largest magnitude a value keeps when stored as `logical` (float8 is scaled per row: inf)."""
    dtype = torch_dtype(logical)
    return math.inf if dtype == torch.float8_e4m3fn else torch.finfo(dtype).max


def in_range(x: torch.Tensor, limit: float = math.inf) -> bool:
    """Whether every value of `x` is finite and within ±`limit`: one pass, no temporary of its size."""
    if x.numel() == 0:
        return True
    lo, hi = (float(v) for v in torch.aminmax(x))
    return math.isfinite(lo) and math.isfinite(hi) and -limit <= lo and hi <= limit


def describe(
    x: torch.Tensor,
    name: str,
    where: str = "",
    layer_ids: list[int] | None = None,
    limit: float = math.inf,
    logical: str = "",
) -> str | None:
    """Where the first non-finite (or beyond ±`limit`) value of one sample's `x` is, as a message;
    None if there is none.

    `x`: hidden [..., S, L, H] (`layer_ids` names the L axis) or final_hidden [..., S, H].
    """
    bad = (~torch.isfinite(x) | (x.abs() > limit)).nonzero()
    if not len(bad):
        return None
    idx = bad[0].tolist()
    value = x[tuple(idx)].item()
    if name == "hidden":
        *lead, layer, channel = idx
        place = f"layer {layer_ids[layer]}" if layer_ids is not None else f"layer slot {layer}"
    else:
        *lead, channel = idx
        place = "after the final norm"
    token = f"token {lead[-1]}, " if lead else ""
    what = "hidden state" if name == "hidden" else "final_hidden"
    beyond = f" (beyond {logical}'s ±{limit:g}: it would be stored as inf)" if math.isfinite(value) else ""
    return f"{where + ': ' if where else ''}{what} is {value}{beyond} at {token}{place}, channel {channel}"


def check_batch(
    features: dict[str, tuple[torch.Tensor, str]],
    lengths: list[int],
    where: Callable[[int], str],
    layer_ids: list[int],
) -> None:
    """Refuse a right-padded target batch holding inf/NaN, or values its stored dtype cannot hold,
    in the first `lengths[b]` tokens of row b.

    `features`: name -> ([B, S, ...] tensor, logical dtype it is stored as): `hidden` [B, S, L, H],
    `final_hidden` [B, S, H]. `where(b)` names the sample of row b. Padded tokens are not stored:
    a bad value there is ignored (found only by the search after a failed reduction).
    """
    for name, (x, logical) in features.items():
        limit = storage_limit(logical)
        if in_range(x, limit):
            continue
        for b, n in enumerate(lengths):
            msg = describe(x[b, :n], name, where(b), layer_ids, limit, logical)
            if msg is not None:
                raise NonFiniteFeatureError(f"{msg}; {HINT}")
