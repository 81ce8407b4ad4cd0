"""float8 e4m3 hidden states with a bf16 scale per token per layer (store/fp8.py): the round trip
and its error bound, outliers at and beyond e4m3's ±448, zero rows, tiny values, non-finite
values refused; the manifest and params rules around it."""

import numpy as np
import pytest
import torch

from dspark_offline.config import Params
from dspark_offline.store import fp8
from dspark_offline.store.dtypes import DtypeError, from_storage, storage_dtype, to_storage
from dspark_offline.store.manifest import ArrayDtypes, fingerprint_fields


def round_trip(x: torch.Tensor):
    """(decoded float32, scale float32) of x through the storage arrays, as the reader sees them."""
    codes, scale = fp8.encode(x)
    assert codes.dtype == storage_dtype("float8_e4m3") == np.uint8 and codes.shape == tuple(x.shape)
    assert scale.dtype == storage_dtype("bfloat16") and scale.shape == tuple(x.shape[:-1])
    c, s = from_storage(codes, "float8_e4m3"), from_storage(scale, "bfloat16")
    assert c.dtype == torch.float8_e4m3fn and s.dtype == torch.bfloat16
    return fp8.decode(c, s), s.float()


def assert_within_bound(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> None:
    """Half an e4m3 step: |x|/16 in the normal range, scale * 2^-10 in the subnormal one."""
    bound = torch.maximum(x.abs() / 16, scale.unsqueeze(-1) * 2.0**-10)
    err = (y - x.float()).abs()
    assert (err <= bound).all(), float((err - bound).max())


def test_round_trip_error_is_bounded_per_token_and_layer():
    g = torch.Generator().manual_seed(0)
    mags = torch.tensor([1e-3, 1.0, 30.0, 5e3])  # very different rows: one scale each
    x = torch.randn(64, 4, 96, generator=g) * mags[None, :, None]  # [T, L, H]
    y, scale = round_trip(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert_within_bound(x, y, scale)
    rel = (y - x).norm() / x.norm()
    assert 0 < rel < 0.04, rel  # e4m3 keeps 3 mantissa bits: ~2-3 % on Gaussian rows
    # the same from bf16 input (what a CUDA target gives)
    yb, sb = round_trip(x.bfloat16())
    assert_within_bound(x.bfloat16().float(), yb, sb)


def test_scale_is_the_smallest_bf16_at_or_above_amax_over_448():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 3, 32, generator=g) * torch.logspace(-20, 20, 512)[:, None, None]
    codes, scale = fp8.encode(x)
    s = from_storage(scale, "bfloat16")
    target = x.abs().amax(-1).double() / fp8.E4M3_MAX  # [T, L]
    assert (s.double() >= target).all()
    below = (s.view(torch.int16) - 1).view(torch.bfloat16).double()  # the next bf16 down
    assert (below < target).all()
    # so no value leaves e4m3's range: nothing is clipped
    assert (x.abs() / s.float().unsqueeze(-1) <= fp8.E4M3_MAX).all()
    assert not from_storage(codes, "float8_e4m3").float().isnan().any()


def test_outliers_at_and_beyond_448_keep_their_value():
    row = torch.tensor([448.0, -448.0, 1e4, -1e6, 3.0e5, 1.0, -0.5, 0.0])
    x = torch.stack([row, row / 1e4, torch.tensor([448.0, -448.0, 1, 2, 3, 4, 5, 6.0])])[
        :, None, :
    ]  # [3, 1, 8]
    y, scale = round_trip(x)
    assert_within_bound(x, y, scale)
    assert y[0, 0, 3] == pytest.approx(-1e6, rel=1 / 16)  # the row's extreme: never clipped
    assert y[0, 0, 2] == pytest.approx(1e4, rel=1 / 16)
    assert torch.equal(y[2, 0, :2], torch.tensor([448.0, -448.0]))  # amax 448: scale 1, exact
    # what a bare cast does instead (the reason for the scale): the outliers saturate at 448
    bare = x.to(torch.float8_e4m3fn).float()
    assert bare[0, 0, 3] in (-448.0,) or bare[0, 0, 3].isnan()


def test_zero_rows_and_tiny_values():
    x = torch.zeros(3, 2, 16)
    x[1, 0] = torch.linspace(-1e-30, 1e-30, 16)  # tiny but normal float32
    x[1, 1] = torch.full((16,), 1e-40)  # float32 subnormals
    x[2, 1, 5] = 2e-44
    y, scale = round_trip(x)
    assert torch.equal(y[0], torch.zeros(2, 16)) and torch.equal(scale[0], torch.zeros(2))  # zero rows: exact
    assert y[2, 0].abs().sum() == 0 and scale[2, 0] == 0
    assert torch.isfinite(y).all() and (scale[1] > 0).all()
    assert_within_bound(x, y, scale)
    assert y[1, 0, 0] == pytest.approx(-1e-30, rel=1 / 16)  # not flushed as a bare cast would
    assert x[1, 0].to(torch.float8_e4m3fn).float().abs().sum() == 0
    assert y[1, 1, 0] == pytest.approx(
        1e-40, rel=1 / 16
    )  # a 2e-44 row is below any scale: 0 within the bound


def test_decode_is_the_exact_product():
    g = torch.Generator().manual_seed(2)
    codes, scale = fp8.encode(torch.randn(32, 2, 64, generator=g) * 7)
    c, s = from_storage(codes, "float8_e4m3"), from_storage(scale, "bfloat16")
    exact = c.double() * s.double().unsqueeze(-1)
    assert torch.equal(fp8.decode(c, s).double(), exact)
    with pytest.raises(ValueError, match="do not match"):
        fp8.decode(c, s[:, :1])
    with pytest.raises(TypeError, match="float8_e4m3fn codes"):
        fp8.decode(c.float(), s)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_refused_with_sample_token_and_layer(bad):
    x = torch.randn(5, 3, 8)
    x[3, 1, 6] = bad
    with pytest.raises(
        fp8.NonFiniteFeatureError,
        match=r"data/train: sample 4 \(sample_id 9\): hidden state is "
        r"-?(inf|nan) at token 3, layer 8, channel 6",
    ):
        fp8.encode(x, "data/train: sample 4 (sample_id 9)", [1, 8, 14])


def test_no_bare_cast_into_float8():
    with pytest.raises(DtypeError, match="written with their scales"):
        to_storage(torch.ones(2, 2), "float8_e4m3")
    with pytest.raises(DtypeError, match="needs uint8"):
        from_storage(np.zeros(2, np.uint16), "float8_e4m3")


def test_manifest_dtypes_pair_float8_with_its_scale():
    ok = ArrayDtypes(hidden="float8_e4m3", hidden_scale="bfloat16", final_hidden="bfloat16", head="float32")
    assert ok.hidden_scale == "bfloat16"
    with pytest.raises(ValueError, match="float8_e4m3 hidden states need a scale array"):
        ArrayDtypes(hidden="float8_e4m3", final_hidden=None, head="float32")
    with pytest.raises(ValueError, match="need a scale array, other dtypes have none"):
        ArrayDtypes(hidden="bfloat16", hidden_scale="bfloat16", final_hidden=None, head="float32")


def test_stores_without_a_scale_keep_their_fingerprint():
    from conftest import synthetic_manifest

    m = synthetic_manifest()
    assert m.dtypes.hidden_scale is None and "hidden_scale" not in fingerprint_fields(m)["dtypes"]
    dtypes = ArrayDtypes(hidden="float8_e4m3", hidden_scale="bfloat16", final_hidden=None, head="bfloat16")
    scaled = m.model_copy(update={"dtypes": dtypes})
    assert fingerprint_fields(scaled)["dtypes"]["hidden_scale"] == "bfloat16"


@pytest.mark.parametrize(
    ("store_final_hidden", "l1_mode", "stored"),
    [
        ("auto", "recompute", True),
        ("auto", "exact", True),
        ("auto", "capped", False),
        ("auto", "topk", False),
        (True, "topk", True),
        (False, "recompute", False),
    ],
)
def test_final_hidden_is_stored_when_the_l1_mode_reads_it(store_final_hidden, l1_mode, stored):
    from dspark_offline.model.loss import needs_final_hidden

    p = Params.model_validate(
        {"dump": {"store_final_hidden": store_final_hidden}, "train": {"l1_mode": l1_mode}}
    )
    assert p.dump_final_hidden() is stored
    if store_final_hidden == "auto":
        assert stored == needs_final_hidden(l1_mode)
    assert (
        Params().dump.store_final_hidden == "auto" and Params().dump_final_hidden()
    )  # default l1_mode recompute
