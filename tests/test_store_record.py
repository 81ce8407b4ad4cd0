"""The completion record (store/record.py): the store's identity for DVC. Written only when every
part is complete, deterministic, and it refuses a store changed or deleted behind its back."""

import json
import shutil

import pytest
import zarr
from synthetic_store import inflate_shards, make_store
from test_dump import make_params

from dspark_offline import dump
from dspark_offline.store.manifest import PART_ATTR
from dspark_offline.store.record import (
    StoreChangedError,
    check_record,
    compute_record,
    is_complete,
    read_record,
    record_path,
    write_record,
)


def test_dump_records_the_store_only_once_every_part_is_complete(tiny_llama_dir, make_prepared, tmp_path):
    prepared = make_prepared(10, seed=2)
    store = tmp_path / "s.zarr"
    record = tmp_path / "s.zarr.complete.json"
    dump.run(make_params(tiny_llama_dir, prepared, store, num_parts=2, part_index=1))
    assert not record.exists(), "one of two parts written: nothing may be recorded complete"
    dump.run(make_params(tiny_llama_dir, prepared, store, num_parts=2, part_index=0))
    assert record.exists(), "the process completing the last part writes the record"
    data = json.loads(record.read_text())
    assert data == compute_record(store) == check_record(store)
    assert data["num_parts"] == 2 and set(data["parts"]) == {"part-00000", "part-00001"}
    assert data["num_samples"] == 10
    assert sum(p["num_samples"] for p in data["parts"].values()) == 10

    # a dump that starts removes the record before it touches the store, whatever happens next
    def boom(*a, **k):
        raise RuntimeError("killed")

    original = dump._dump
    dump._dump = boom
    try:
        with pytest.raises(RuntimeError, match="killed"):
            dump.run(make_params(tiny_llama_dir, prepared, store, num_parts=2, part_index=0))
    finally:
        dump._dump = original
    assert not record.exists()
    with pytest.raises(StoreChangedError, match="no completion record"):
        check_record(store)
    # a resumed dump with nothing left to do records the same store again, byte for byte
    dump.run(make_params(tiny_llama_dir, prepared, store, num_parts=2))
    assert json.loads(record.read_text()) == data


def test_record_is_deterministic_and_sees_shard_indexes(tmp_path):
    a = make_store(tmp_path / "a.zarr", num_samples=20, num_parts=2)
    b = make_store(tmp_path / "b.zarr", num_samples=20, num_parts=2)
    write_record(a)
    write_record(b)
    with open(record_path(a), "rb") as fa, open(record_path(b), "rb") as fb:
        assert fa.read() == fb.read()  # same store, same bytes (no path, no time in the record)
    c = make_store(tmp_path / "c.zarr", num_samples=20, num_parts=2, seed=1)  # other features
    other = compute_record(c)
    assert other["parts"] != read_record(a)["parts"]
    inflate_shards(b, 1 << 20)  # same values, shards moved inside their objects: the indexes differ
    with pytest.raises(StoreChangedError, match=r"part-0000\d objects_sha256"):
        check_record(b)


def test_store_changed_behind_the_records_back_is_refused(tmp_path):
    store = make_store(tmp_path / "s.zarr", num_samples=20, num_parts=2)
    write_record(store)
    check_record(store)
    shard = next(f for f in (store / "part-00001" / "topk_ids" / "c").rglob("*") if f.is_file())
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated shard: its index changed
    with pytest.raises(
        StoreChangedError, match=r"store changed since the dump.*part-00001 objects_sha256.*remove"
    ):
        check_record(store)

    shutil.rmtree(store)
    with pytest.raises(StoreChangedError, match="changed or deleted behind DVC's back"):
        check_record(store)

    make_store(store, num_samples=20, num_parts=2, seed=7)  # another dump in its place
    with pytest.raises(StoreChangedError, match="params_fingerprint"):
        check_record(store)


def test_incomplete_store_is_not_recordable(tmp_path):
    store = make_store(tmp_path / "s.zarr", num_samples=12, num_parts=2)
    group = zarr.open_group(str(store / "part-00001"), mode="r+")
    group.attrs[PART_ATTR] = {**group.attrs[PART_ATTR], "complete": False, "shards_done": []}
    assert not is_complete(store)
    with pytest.raises(Exception, match="part-00001 is not complete"):
        write_record(store)
    assert read_record(store) is None
