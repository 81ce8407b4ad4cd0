"""The tensorstore writer engine (`BackgroundWriter(engine="tensorstore")`): the bytes of the zarr
engine, shards recorded done only after their commit, the memory bound, errors naming the part
and shard, and a clear refusal where it cannot run. Skips without the optional extra."""

import time
from pathlib import Path

import pytest

from dspark_offline.store import tensorstore_engine
from dspark_offline.store.background import BackgroundWriter
from dspark_offline.store.manifest import StoreError
from dspark_offline.store.writer import open_part, open_store_for_write

LENGTHS = [5, 9, 3, 12, 7, 4, 8, 6, 10, 2, 11, 5] * 4  # several shards of 32 tokens
needs_ts = pytest.mark.skipif(
    not tensorstore_engine.available(),
    reason="the optional `tensorstore` extra (pip install -e '.[tensorstore]')",
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _open(synth):
    root = open_store_for_write(synth.path, synth.manifest, lambda: synth.head)
    return open_part(root, synth.manifest, synth.plans[0], synth.tokens(synth.plans[0]))


def _write(synth, engine: str, workers: int, lend: bool = True, max_pending: int = 2):
    state = _open(synth)
    with BackgroundWriter(workers, max_pending=max_pending, engine=engine) as w:
        for shard in state.pending():
            arrays = synth.shard_arrays(state, shard)
            if lend:
                bufs = w.buffers(state, shard)
                for name, a in arrays.items():
                    bufs[name][...] = a
                arrays = bufs
            w.submit(state, shard, arrays)
    return state, w


@needs_ts
@pytest.mark.parametrize("workers,lend", [(1, True), (3, False)])
def test_tensorstore_writes_the_bytes_of_the_zarr_engine(synthetic_store, tmp_path, workers, lend):
    ours = synthetic_store(LENGTHS, path=str(tmp_path / "zarr.zarr"))
    _write(ours, "zarr", 1)
    theirs = synthetic_store(LENGTHS, path=str(tmp_path / "ts.zarr"))
    state, w = _write(theirs, "tensorstore", workers, lend)
    assert len(state.plan.shards) >= 4 and state.plan.num_positions % 32 != 0  # a short last shard
    assert state.complete and state.done == set(range(len(state.plan.shards)))
    assert w.shards_written == len(state.plan.shards)
    a, b = _files(Path(ours.path)), _files(Path(theirs.path))
    assert a.keys() == b.keys()  # no lock or temporary files left behind either
    assert [k for k in a if a[k] != b[k]] == []  # every object byte for byte, part attrs included


@needs_ts
def test_memory_bound_and_recording_after_commit(synthetic_store, monkeypatch):
    """Commits held back: `submit` blocks at workers + max_pending shards given and not yet
    recorded, and a shard is recorded done only once its commit returned."""
    synth = synthetic_store(LENGTHS)
    state = _open(synth)
    committed: set[int] = set()
    real = tensorstore_engine.TensorstorePool._committed

    def slow(self, task, future):
        time.sleep(0.05)  # on tensorstore's thread: the commit is done, its report is late
        _, shard, _ = self._inflight[task]
        committed.add(shard.index)
        real(self, task, future)

    monkeypatch.setattr(tensorstore_engine.TensorstorePool, "_committed", slow)
    recorded_early = []
    real_record = type(state).record_done

    def record(self, index):
        if index not in committed:
            recorded_early.append(index)
        real_record(self, index)

    monkeypatch.setattr(type(state), "record_done", record)
    workers, max_pending, peak = 2, 1, 0
    with BackgroundWriter(workers, max_pending=max_pending, engine="tensorstore") as w:
        for k, shard in enumerate(state.pending()):
            w.submit(state, shard, synth.shard_arrays(state, shard))
            peak = max(peak, k + 1 - w.shards_written)  # given and not yet recorded
    assert peak == workers + max_pending  # reached, never passed (the caller holds one more)
    assert recorded_early == [] and state.complete


@needs_ts
def test_commit_errors_reach_the_caller(synthetic_store):
    synth = synthetic_store(LENGTHS)
    state = _open(synth)
    blocker = Path(synth.path) / "part-00000" / "hidden" / "c"  # a file where the shard directory goes
    blocker.write_bytes(b"not a directory")
    failure = r"background store writer failed on part-00000 shard \d+: tensorstore commit failed"
    with pytest.raises(StoreError, match=failure) as info, BackgroundWriter(2, engine="tensorstore") as w:
        for shard in state.pending():
            w.submit(state, shard, synth.shard_arrays(state, shard))
    assert isinstance(info.value.__cause__, OSError)  # what dump turns into DumpWriteError
    assert state.done == set() and not state.complete


@needs_ts
def test_an_array_of_another_layout_is_refused(synthetic_store):
    synth = synthetic_store(LENGTHS)
    state = _open(synth)
    state.manifest = state.manifest.model_copy(update={"compression_level": 3})  # not what is on disk
    refused = "part-00000/hidden: tensorstore cannot open it as the manifest's layout"
    with pytest.raises(StoreError, match=refused), BackgroundWriter(1, engine="tensorstore") as w:
        w.buffers(state, state.pending()[0])
    assert state.done == set()


def test_not_installed_is_refused_naming_the_param(monkeypatch):
    monkeypatch.setattr(tensorstore_engine, "available", lambda: False)
    with pytest.raises(
        tensorstore_engine.WriterEngineError, match=r"dump.writer_engine=tensorstore.*not installed"
    ):
        BackgroundWriter(1, engine="tensorstore")


def test_urls_are_refused_naming_the_param(monkeypatch):
    monkeypatch.setattr(tensorstore_engine, "available", lambda: True)
    with pytest.raises(tensorstore_engine.WriterEngineError, match="local directories only.*s3://b/x.zarr"):
        tensorstore_engine.require("s3://b/x.zarr")
    tensorstore_engine.require("file:///tmp/x.zarr")
    tensorstore_engine.require("/tmp/x.zarr")
