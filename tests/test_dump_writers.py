"""A dump's store is byte-identical whatever the number of shard writers (dump.writer_workers) and
whichever engine writes the shards (dump.writer_engine)."""

import json
from pathlib import Path

import pytest
from test_dump import make_params

from dspark_offline import dump
from dspark_offline.entry import report_errors
from dspark_offline.store import tensorstore_engine
from dspark_offline.store.inspect import verify
from dspark_offline.store.record import record_path
from dspark_offline.target.hf_backend import HFTarget


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


@pytest.mark.skipif(not tensorstore_engine.available(), reason="the optional `tensorstore` extra")
@pytest.mark.parametrize("hidden_dtype", ["auto", "float8_e4m3"])
def test_tensorstore_engine_writes_the_zarr_engines_store(
    tiny_llama_dir, make_prepared, tmp_path, hidden_dtype
):
    """dump.writer_engine=tensorstore, 1 and 2 workers: every object of the store and the completion
    record byte for byte those of the zarr engine (the default) on the same input."""
    prepared = make_prepared(24, seed=7)
    stores, records = {}, {}
    for engine, workers in (("zarr", 1), ("tensorstore", 1), ("tensorstore", 2)):
        path = tmp_path / f"{engine}{workers}.zarr"
        params = make_params(
            tiny_llama_dir,
            prepared,
            path,
            shard_tokens=48,
            writer_workers=workers,
            writer_engine=engine,
            hidden_dtype=hidden_dtype,
        )
        dump.run(params)
        assert verify(str(path)) == []
        stores[engine, workers] = _files(path)
        records[engine, workers] = Path(record_path(path)).read_bytes()
    ours = stores["zarr", 1]
    assert sum(k.startswith("part-00000/hidden/c/") for k in ours) >= 4  # several shards
    assert any(k.startswith("part-00000/hidden_scale/") for k in ours) == (hidden_dtype == "float8_e4m3")
    for key in (("tensorstore", 1), ("tensorstore", 2)):
        theirs = stores[key]
        assert theirs.keys() == ours.keys(), key  # no lock or temporary files left either
        assert [k for k in ours if ours[k] != theirs[k]] == [], key
        assert records[key] == records["zarr", 1], key


@pytest.mark.skipif(not tensorstore_engine.available(), reason="the optional `tensorstore` extra")
def test_tensorstore_engine_writes_several_parts_in_one_process(tiny_llama_dir, make_prepared, tmp_path):
    """One process writing 2 parts in turn through one tensorstore pool (its opened arrays are
    kept per part): the zarr engine's store, byte for byte."""
    prepared = make_prepared(24, seed=7)
    stores = {}
    for engine in ("zarr", "tensorstore"):
        path = tmp_path / f"{engine}.zarr"
        over = {"shard_tokens": 48, "num_parts": 2, "writer_engine": engine}
        dump.run(make_params(tiny_llama_dir, prepared, path, **over))
        assert verify(str(path)) == []
        stores[engine] = _files(path)
    ours, theirs = stores["zarr"], stores["tensorstore"]
    assert any(k.startswith("part-00001/hidden/c/") for k in ours)
    assert theirs.keys() == ours.keys() and [k for k in ours if ours[k] != theirs[k]] == []


def test_tensorstore_engine_not_installed_exits_2(
    tiny_llama_dir, make_prepared, tmp_path, monkeypatch, capsys
):
    """Refused in one line naming the param and the extra, before the target is loaded."""
    prepared = make_prepared(4, seed=1)
    params = make_params(tiny_llama_dir, prepared, tmp_path / "s.zarr", writer_engine="tensorstore")
    monkeypatch.setattr(tensorstore_engine, "available", lambda: False)
    monkeypatch.setattr(dump, "_open_target", lambda *a, **k: pytest.fail("the target was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        report_errors(lambda: dump.run(params))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dump.writer_engine=tensorstore: the tensorstore package is not installed" in err
    assert "[tensorstore]" in err and not (tmp_path / "s.zarr").exists()


@pytest.mark.skipif(not tensorstore_engine.available(), reason="the optional `tensorstore` extra")
def test_interrupted_tensorstore_dump_resumes_to_the_uninterrupted_store(
    tiny_llama_dir, make_prepared, tmp_path, monkeypatch
):
    """A tensorstore dump stopped mid-way (the forward fails), with what a kill during a commit
    leaves (a stale tensorstore lock file, a half-written object of an unrecorded shard), resumes
    to the bytes of an uninterrupted zarr-engine dump (the SIGKILL test is in test_dump_resume.py)."""
    prepared = make_prepared(24, seed=7)
    over = {"shard_tokens": 48, "batch_tokens": 96, "writer_workers": 2}
    full = make_params(tiny_llama_dir, prepared, tmp_path / "full.zarr", **over)
    dump.run(full)
    path = tmp_path / "cut.zarr"
    cut = make_params(tiny_llama_dir, prepared, path, writer_engine="tensorstore", **over)

    calls, real = [0], HFTarget.forward

    def failing(self, *a, **k):
        calls[0] += 1
        if calls[0] > 4:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)

    monkeypatch.setattr(HFTarget, "forward", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dump.run(cut)
    monkeypatch.setattr(HFTarget, "forward", real)
    part = path / "part-00000"
    attrs = json.loads((part / "zarr.json").read_text())["attributes"]["dspark_offline_part"]
    done, total = set(attrs["shards_done"]), attrs["num_shards"]
    assert 0 < len(done) < total
    todo = min(set(range(total)) - done)
    (part / "hidden" / "c" / str(todo) / "0").mkdir(parents=True, exist_ok=True)
    (part / "hidden" / "c" / str(todo) / "0" / "0").write_bytes(b"half a shard")
    (part / "hidden" / "c" / str(todo) / "0" / "0.__lock").write_bytes(b"")

    dump.run(cut)  # resume
    assert verify(str(path)) == []
    ours, theirs = _files(tmp_path / "full.zarr"), _files(path)
    stale = {k for k in theirs if k.endswith(".__lock")}
    assert stale <= {f"part-00000/hidden/c/{todo}/0/0.__lock"}  # what the "kill" left, nothing new
    assert theirs.keys() - stale == ours.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []
    assert Path(record_path(path)).read_bytes() == Path(record_path(tmp_path / "full.zarr")).read_bytes()
