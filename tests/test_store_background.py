"""The background shard writers: one thread or N processes write byte-identical stores, record
shards done in any finishing order, stay within their memory bound and report their errors."""

import os
from pathlib import Path

import numpy as np
import pytest

from dspark_offline.store.background import BackgroundWriter, default_workers
from dspark_offline.store.manifest import StoreError
from dspark_offline.store.writer import open_part, open_store_for_write

LENGTHS = [5, 9, 3, 12, 7, 4, 8, 6, 10, 2, 11, 5] * 4  # several shards of 32 tokens


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(synth, workers: int, lend: bool, max_pending: int = 2):
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    state = open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))
    slots = 0
    with BackgroundWriter(workers, max_pending=max_pending) as w:
        for shard in state.pending():
            arrays = synth.shard_arrays(state, shard)
            if lend:  # fill the writer's own (shared-memory) buffers, as the dump does
                bufs = w.buffers(state, shard)
                for name, a in arrays.items():
                    bufs[name][...] = a
                arrays = bufs
            w.submit(state, shard, arrays)
            slots = max(slots, len(getattr(w._impl, "_slots", [])))
    return state, w, slots


@pytest.mark.parametrize("workers,lend", [(2, True), (3, False)])
def test_worker_processes_write_the_bytes_of_one_thread(synthetic_store, tmp_path, workers, lend):
    one = synthetic_store(LENGTHS, path=str(tmp_path / "one.zarr"))
    _write(one, 1, lend)
    many = synthetic_store(LENGTHS, path=str(tmp_path / "many.zarr"))
    state, w, slots = _write(many, workers, lend, max_pending=1)
    assert len(state.plan.shards) >= 4
    assert state.complete and state.done == set(range(len(state.plan.shards)))
    assert w.shards_written == len(state.plan.shards)
    assert 1 <= slots <= workers + 1 + 1  # the memory bound: written + queued + being filled
    a, b = _files(Path(one.path)), _files(Path(many.path))
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # every object byte for byte, part attrs included


def test_shards_finishing_out_of_order_are_recorded(synthetic_store):
    synth = synthetic_store(LENGTHS)
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    state = open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))
    order = [s.index for s in state.pending()][::-1]
    for k, i in enumerate(order):
        state.record_done(i)
        attrs = dict(root[state.name].attrs["dspark_offline_part"])
        assert attrs["shards_done"] == sorted(order[: k + 1])
        assert attrs["complete"] is (k == len(order) - 1)
    assert state.complete and state.pending() == []


def test_worker_process_errors_reach_the_caller(synthetic_store):
    synth = synthetic_store(LENGTHS)
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    state = open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))
    # a file where the shard directory must go: the worker's write fails with an OSError
    blocker = Path(synth.path) / "part-00000" / "hidden" / "c"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"not a directory")
    failure = r"background store writer failed on part-00000 shard \d+"
    with pytest.raises(StoreError, match=failure) as info, BackgroundWriter(2, max_pending=1) as w:
        for shard in state.pending():
            w.submit(state, shard, synth.shard_arrays(state, shard))
    assert isinstance(info.value.__cause__, OSError)  # what dump turns into DumpWriteError
    assert state.done == set() and not state.complete  # no shard's hidden could be written


def test_bad_arrays_are_refused_before_they_reach_a_process(synthetic_store):
    synth = synthetic_store(LENGTHS)
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    state = open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))
    shard = state.pending()[0]
    bad = synth.shard_arrays(state, shard)
    bad["topk_ids"] = bad["topk_ids"].astype(np.int64)
    with pytest.raises(StoreError, match="part-00000 shard 0.*topk_ids"), BackgroundWriter(2) as w:
        w.submit(state, shard, bad)
    assert state.done == set()


def test_lent_buffers_are_zero_in_the_gaps(synthetic_store):
    synth = synthetic_store(LENGTHS)
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    state = open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))
    plan = state.plan

    def end(sh):  # the end of the shard's last sample
        return int(plan.sample_start[sh.row_stop - 1] + plan.sample_length[sh.row_stop - 1])

    shard = next(sh for sh in state.pending() if end(sh) < sh.stop)  # a shard with a gap
    with BackgroundWriter(2, max_pending=1) as w:  # at most 4 slots: the later loans reuse dirty ones
        for _ in range(8):
            bufs = w.buffers(state, shard)
            for a in bufs.values():
                assert not a[end(shard) - shard.start :].any()  # the gap after the last sample
                a[...] = 7  # dirty the slot for its next loan
            w.submit(state, shard, bufs)
        assert len(w._impl._slots) <= 4


def test_default_workers():
    assert default_workers("cpu") == 1
    assert default_workers("cuda", gpus=8, cores=128) == 4
    assert default_workers("cuda", gpus=8, cores=16) == 2
    assert default_workers("cuda", gpus=1, cores=1) == 1
    with pytest.raises(ValueError, match="workers must be >= 1"):
        BackgroundWriter(0)


def test_no_writer_process_outlives_the_writer(synthetic_store):
    synth = synthetic_store(LENGTHS)
    _, w, _ = _write(synth, 2, lend=True)
    pids = [p.pid for p in w._impl._procs]
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_a_too_small_dev_shm_is_refused_in_one_line(synthetic_store, monkeypatch):
    synth = synthetic_store(LENGTHS)
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    state = open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))

    class Tiny:
        f_bavail, f_frsize = 0, 4096

    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: Tiny if p == "/dev/shm" else real(p))
    refused = r"writer_workers=2: /dev/shm has 0 MiB free.*--shm-size"
    with pytest.raises(StoreError, match=refused), BackgroundWriter(2) as w:
        w.buffers(state, state.pending()[0])
