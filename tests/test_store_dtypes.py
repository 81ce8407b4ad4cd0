"""bf16 is stored as uint16 bits and read back bit-exactly; no silent float16 conversion."""

import numpy as np
import pytest
import torch
import zarr

from dspark_offline.store.dtypes import DtypeError, from_storage, logical_name, storage_dtype, to_storage


def _bf16_specials() -> torch.Tensor:
    # every bit pattern class: zeros, subnormals, max, inf, nan, values float16 cannot hold
    bits = torch.tensor(
        [0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x4B00, 0x0080], dtype=torch.int32
    ).to(torch.int16)
    return torch.cat([bits.view(torch.bfloat16), torch.tensor([1e30, -3e-30, 65504.0 * 4]).bfloat16()])


def test_bf16_is_stored_as_uint16_bits():
    assert storage_dtype("bfloat16") == np.uint16
    t = _bf16_specials()
    a = to_storage(t, "bfloat16")
    assert a.dtype == np.uint16
    assert np.array_equal(a.view(np.int16), t.view(torch.int16).numpy())


def test_bf16_roundtrip_through_zarr_is_bit_exact():
    t = torch.cat([_bf16_specials(), torch.randn(1000).bfloat16()]).reshape(-1, 1)  # [N, 1]
    arr = zarr.create_array(store={}, shape=t.shape, dtype=storage_dtype("bfloat16"), chunks=(64, 1))
    arr[...] = to_storage(t, "bfloat16")
    back = from_storage(arr[...], "bfloat16")
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))  # NaN payloads included


def test_values_out_of_float16_range_survive():
    t = torch.tensor([1e30, 1e-30]).bfloat16()
    back = from_storage(to_storage(t, "bfloat16"), "bfloat16")
    assert torch.isfinite(back).all() and (back != 0).all()


def test_other_dtypes_and_errors():
    x = torch.randn(5)
    assert torch.equal(from_storage(to_storage(x, "float32"), "float32"), x)
    assert logical_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(DtypeError, match="float8"):
        storage_dtype("float8")
    with pytest.raises(DtypeError, match="uint16"):
        from_storage(np.zeros(3, np.float16), "bfloat16")
