"""Writer -> reader round trip on synthetic features, and the store's refusal rules."""

import pickle

import numpy as np
import pytest
import torch
import zarr
from conftest import synthetic_manifest

from dspark_offline.store import FORMAT_VERSION, StoreError, StoreMismatchError, open_store
from dspark_offline.store.background import BackgroundWriter
from dspark_offline.store.writer import open_part, open_store_for_write

LENGTHS = [5, 30, 17, 9, 22, 3, 12, 28, 7, 14]


def _assert_same(store, synth):
    assert len(store) == len(synth.lengths)
    seen = set()
    for i in range(len(store)):
        s = store.sample(i)
        src = s.sample_id - 1000
        seen.add(src)
        want = synth.samples[src]
        assert s.input_ids.dtype == torch.int64 and s.loss_mask.dtype == torch.bool
        assert s.topk_ids.dtype == torch.int64 and s.topk_probs.dtype == torch.float32
        for name, value in want.items():
            got = getattr(s, name)
            assert got.dtype == value.dtype or name in ("input_ids", "topk_ids"), name
            if got.dtype == torch.bfloat16:  # bit-exact
                assert torch.equal(got.view(torch.int16), value.view(torch.int16)), name
            else:
                assert torch.equal(got, value.to(got.dtype)), name
        assert store.lengths[i] == len(want["input_ids"])
        assert torch.equal(store.loss_mask(i), want["loss_mask"])
    assert seen == set(range(len(synth.lengths)))


@pytest.mark.parametrize("num_parts", [1, 3])
def test_roundtrip_bit_exact(synthetic_store, num_parts):
    synth = synthetic_store(LENGTHS, synthetic_manifest(num_parts=num_parts))
    synth.write()
    store = open_store(synth.path)
    _assert_same(store, synth)
    w = store.target_weights()
    for name, t in synth.head.items():
        assert torch.equal(w[name].view(torch.int16), t.view(torch.int16))


def test_layout_matches_design_with_plain_zarr(synthetic_store):
    synth = synthetic_store(LENGTHS)
    synth.write()
    root = zarr.open_group(synth.path, mode="r")
    m = synth.manifest
    L, H, K, V = 2, 8, 4, 50
    part = root["part-00000"]
    T = part["input_ids"].shape[0]
    expect = {
        "input_ids": ("int32", (T,)),
        "loss_mask": ("uint8", (T,)),
        "hidden": ("uint16", (T, L, H)),
        "final_hidden": ("uint16", (T, H)),
        "topk_ids": ("int32", (T, K)),
        "topk_probs": ("float16", (T, K)),
        "sample_id": ("int64", (10,)),
        "sample_start": ("int64", (10,)),
        "sample_length": ("int32", (10,)),
    }
    for name, (dtype, shape) in expect.items():
        assert (str(part[name].dtype), part[name].shape) == (dtype, shape), name
    assert part["hidden"].attrs["logical_dtype"] == "bfloat16"
    assert part["hidden"].shards == (m.shard_tokens, L, H) and part["hidden"].chunks == (m.chunk_tokens, L, H)
    assert root["target/embed_tokens"].shape == (V, H) and root["target/lm_head"].shape == (V, H)
    assert root["target/final_norm"].shape == (H,)
    assert root.attrs["dspark_offline"]["format"] == "dspark-offline-features"
    # gap tokens are covered by no sample and carry no loss
    covered = np.zeros(T, bool)
    for a, n in zip(part["sample_start"][:], part["sample_length"][:]):
        covered[a : a + n] = True
    assert not part["loss_mask"][:][~covered].any()


def test_memory_url_store():
    from conftest import SyntheticStore

    synth = SyntheticStore("memory://dspark-test/features.zarr", [4, 9, 6])
    synth.write()
    _assert_same(open_store(synth.path), synth)


def test_reader_refuses_incomplete_parts_by_name(synthetic_store):
    synth = synthetic_store(LENGTHS * 3, synthetic_manifest(num_parts=2))
    synth.write(parts=[0])
    synth.write(parts=[1], max_shards=1)
    with pytest.raises(StoreError, match=r"part-00001 \(1/\d+ shards done\)") as e:
        open_store(synth.path)
    assert "part-00000" not in str(e.value).split("incomplete parts:")[1]
    store = open_store(synth.path, complete_only=True)
    assert store.parts == ["part-00000"] and len(store) == len(LENGTHS) * 3 // 2


def test_reader_refuses_unknown_version_and_missing_store(synthetic_store, tmp_path):
    synth = synthetic_store(LENGTHS)
    root = synth.write()
    attrs = dict(root.attrs["dspark_offline"], format_version=FORMAT_VERSION + 1)
    root.attrs["dspark_offline"] = attrs
    with pytest.raises(StoreError, match=f"{synth.path}: written by a newer dspark-offline.*upgrade"):
        open_store(synth.path)
    with pytest.raises(StoreError, match="no feature store"):
        open_store(str(tmp_path / "absent.zarr"))


def test_resume_skips_done_shards_and_equals_full_write(synthetic_store, tmp_path):
    full = synthetic_store(LENGTHS * 2, path=str(tmp_path / "full.zarr"))
    full.write()
    resumed = synthetic_store(LENGTHS * 2, path=str(tmp_path / "resumed.zarr"))
    resumed.write(max_shards=2)
    attrs = zarr.open_group(resumed.path)["part-00000"].attrs["dspark_offline_part"]
    assert attrs["shards_done"] == [0, 1] and not attrs["complete"]
    resumed.write()
    a, b = zarr.open_group(full.path, mode="r"), zarr.open_group(resumed.path, mode="r")
    for name, arr in a["part-00000"].arrays():
        assert np.array_equal(arr[...], b[f"part-00000/{name}"][...]), name
    assert b["part-00000"].attrs["dspark_offline_part"]["complete"]


def test_fingerprint_mismatch_refused_then_overwrite(synthetic_store):
    synth = synthetic_store(LENGTHS)
    synth.write()
    other = synthetic_store(LENGTHS, synthetic_manifest(top_k=3), seed=1)
    old_fp, new_fp = synth.manifest.params_fingerprint, other.manifest.params_fingerprint
    with pytest.raises(
        StoreMismatchError, match=rf"params_fingerprint={old_fp} .*params_fingerprint={new_fp}.*top_k: 4 -> 3"
    ):
        other.write()
    other.write(overwrite=True)
    store = open_store(synth.path)
    assert store.manifest.top_k == 3
    _assert_same(store, other)


def test_foreign_group_refused(tmp_path):
    root = zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    root.create_array("something", shape=(3,), dtype="int8")
    with pytest.raises(StoreError, match="not a dspark-offline feature store"):
        open_store_for_write(str(tmp_path / "x.zarr"), synthetic_manifest(), dict)


def test_writer_thread_errors_reach_the_caller(synthetic_store):
    synth = synthetic_store(LENGTHS * 3)
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    state = open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))
    shards = state.pending()
    bad = synth.shard_arrays(state, shards[0])
    bad["hidden"] = bad["hidden"][:, :1]  # wrong shape: rejected inside the writer thread
    failure = r"background store writer failed on part-00000 shard 0.*hidden"
    with pytest.raises(StoreError, match=failure), BackgroundWriter(max_pending=1) as w:
        for shard in shards:
            w.submit(state, shard, bad if shard.index == 0 else synth.shard_arrays(state, shard))
    assert 0 not in state.done  # the failed shard is not recorded


def test_store_is_pickle_safe_for_dataloader_workers(synthetic_store):
    synth = synthetic_store(LENGTHS)
    synth.write()
    store = open_store(synth.path)
    store.sample(0)  # populate the handle cache
    clone = pickle.loads(pickle.dumps(store))
    assert clone._arrays == {}
    assert torch.equal(clone.sample(3).hidden.view(torch.int16), store.sample(3).hidden.view(torch.int16))
    loader = torch.utils.data.DataLoader(
        store, batch_size=None, num_workers=2, collate_fn=lambda s: s.sample_id
    )
    assert sorted(loader) == sorted(int(x) for x in store.sample_ids)
    with pytest.raises(IndexError, match="out of range"):
        store.sample(len(store))


def test_resume_with_another_backend_refused(synthetic_store):
    """The backend is outside params_fingerprint (stores written before it was recorded keep theirs)
    but a resume never mixes backends; a store without a record was made by 'hf'."""
    from dspark_offline.store.manifest import BackendInfo

    def backend(name):
        return BackendInfo(name=name, device="cpu", versions={"torch": "x"})

    synth = synthetic_store(LENGTHS)  # no backend recorded
    synth.write()
    root = open_store_for_write(synth.path, synthetic_manifest(backend=backend("hf")), dict)  # resumes
    assert "part-00000" in root
    with pytest.raises(StoreMismatchError, match="made by backend 'hf', this dump uses 'vllm'"):
        open_store_for_write(synth.path, synthetic_manifest(backend=backend("vllm")), dict)
