"""Hidden states as float8 e4m3 with a scale per token per layer (`dump.hidden_dtype: float8_e4m3`).

A bare cast to e4m3 is wrong for residual streams: e4m3 ends at ±448 and residual streams have
outlier channels far beyond it (torch 2.13 saturates them to ±448, a non-saturating conversion
gives NaN), while everything below 2^-10 flushes to zero. So every row of H values (one token,
one layer) is scaled into range first:

    scale = amax(|x|) / 448, rounded *up* to bfloat16      (stored: `hidden_scale` [T, L], bf16 bits)
    code  = e4m3(x / scale)                                  (stored: `hidden` [T, L, H], e4m3 bits as uint8)
    x'    = float32(code) * float32(scale)                   (what the reader returns)

Rounding the scale up keeps |x / scale| <= 448, so the row's largest value is never clipped;
bfloat16 has float32's exponent range, so no scale over- or underflows (float16 would for rows
with amax > 2.9e7 or < 2.7e-5). The error of a value is at most half an e4m3 step: <= |x| / 16
for values within e4m3's normal range of the row, <= scale * 2^-10 below it. The decode is exact
in float32 (a 4-bit by 8-bit significand product). An all-zero row gets scale 0 and decodes to
zeros. A non-finite value cannot be scaled: it is an error naming the sample, token and layer
(store/finite.py; the dump checks every target batch before this, whatever the dtype).

zarr 3.1 has no float8 data type, so the codes are stored as uint8 with `logical_dtype =
"float8_e4m3"` (store/dtypes.py) and the manifest's `dtypes.hidden_scale` names the scale array.
"""

from __future__ import annotations

import numpy as np
import torch

from dspark_offline.store.finite import NonFiniteFeatureError, describe

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_DTYPE = "float8_e4m3"  # logical dtype name (manifest, array attribute, params)
SCALE_DTYPE = "bfloat16"  # logical dtype of the scale array


def _bf16_round_up(t: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= t, elementwise (t >= 0, finite)."""
    b = t.to(torch.bfloat16)  # round to nearest
    low = b.to(t.dtype) < t
    bits = b.view(torch.int16)
    return torch.where(low, bits + 1, bits).view(torch.bfloat16)  # next bf16 up: bit pattern + 1 (t >= 0)


def encode(
    x: torch.Tensor, where: str = "", layer_ids: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states x [..., L, H] (any float dtype) -> (codes uint8 [..., L, H], scale uint16 [..., L]).

    `codes` are float8_e4m3fn bit patterns, `scale` bfloat16 bit patterns (the storage dtypes of
    `float8_e4m3` and `bfloat16`). `where` and `layer_ids` only name the place of a non-finite value.
    """
    x = x.detach().to("cpu", torch.float32)
    amax = x.abs().amax(dim=-1)  # [..., L]
    if not torch.isfinite(amax).all():
        raise NonFiniteFeatureError(
            f"{describe(x, 'hidden', where, layer_ids)}; float8 needs finite values (the target produced "
            "inf/NaN: check its dtype, e.g. target.dtype=float32 or bfloat16 instead of float16)"
        )
    # float64: amax / 448 of a float32 subnormal row would underflow to a zero scale in float32
    scale = _bf16_round_up(amax.double() / E4M3_MAX)  # [..., L] bf16
    s = scale.float()
    divisor = torch.where(s > 0, s, torch.ones_like(s))  # all-zero rows: codes 0 whatever the divisor
    codes = (x / divisor.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8).numpy(), scale.view(torch.int16).numpy().view(np.uint16)


def decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [..., L, H] float8_e4m3fn, scale [..., L] bfloat16 -> float32 [..., L, H] (exact product)."""
    if codes.dtype != torch.float8_e4m3fn or scale.dtype != torch.bfloat16:
        raise TypeError(
            f"decode needs float8_e4m3fn codes and bfloat16 scales, got {codes.dtype}, {scale.dtype}"
        )
    if codes.shape[:-1] != scale.shape:
        raise ValueError(f"codes {list(codes.shape)} do not match scales {list(scale.shape)}")
    return codes.float() * scale.float().unsqueeze(-1)
