"""A dump's store is byte-identical whatever the number of shard writers (dump.writer_workers)."""

from pathlib import Path

import pytest
from test_dump import make_params

from dspark_offline import dump
from dspark_offline.store.inspect import verify


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("hidden_dtype", ["auto", "float8_e4m3"])
def test_one_and_two_writers_write_identical_stores(tiny_llama_dir, make_prepared, tmp_path, hidden_dtype):
    prepared = make_prepared(24, seed=7)
    stores = {}
    for workers in (1, 2):
        path = tmp_path / f"w{workers}.zarr"
        params = make_params(
            tiny_llama_dir, prepared, path, shard_tokens=48, writer_workers=workers, hidden_dtype=hidden_dtype
        )
        dump.run(params)
        assert verify(str(path)) == []
        stores[workers] = _files(path)
    one, two = stores[1], stores[2]
    assert sum(k.startswith("part-00000/hidden/c/") for k in one) >= 4  # several shards
    assert any(k.startswith("part-00000/hidden_scale/") for k in one) == (hidden_dtype == "float8_e4m3")
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []  # every object, manifest and part attrs included
