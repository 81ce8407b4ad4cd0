"""benchmarks/writer.py (with its optional tensorstore engine) and benchmarks/data_wait.py run end to end
in their --quick modes."""

from __future__ import annotations

import importlib.util
import re

import pytest
from benchmark_script import load_benchmark


def _table(out: str, title: str) -> list[list[str]]:
    block = out.split(f"## {title}")[1].strip().split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def _check_rows(rows: list[list[str]], engine: str) -> None:
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("tiny-a", "1", engine),
        ("tiny-a", "2", engine),
        ("tiny-b", "1", engine),
        ("tiny-b", "2", engine),
    ]
    for width, workers, _, raw, writer, ratio, per_cpu, on_disk in rows:
        raw, writer, ratio, per_cpu, on_disk = map(float, (raw, writer, ratio, per_cpu, on_disk))
        assert raw > 0 and writer > 0 and per_cpu > 0, (width, workers)
        assert 0 < on_disk < 1.2  # zstd + crc32c of random bf16: a bit below the logical bytes


def test_writer_benchmark_prints_writer_and_raw_side_by_side(capsys):
    assert load_benchmark("writer").main(["--quick", "--engines", "ours"]) == 0
    out = capsys.readouterr().out
    _check_rows(_table(out, "writer vs raw write+fsync"), "ours")
    assert re.search(r"tiny-a \(ours\): \d+ MB per CPU-second -> [\d.]+ cores per 1.2 GB/s", out)


def test_writer_benchmark_tensorstore_engine(capsys):
    pytest.importorskip("tensorstore", reason="the optional `tensorstore` extra")
    assert load_benchmark("writer").main(["--quick", "--engines", "tensorstore"]) == 0
    out = capsys.readouterr().out
    _check_rows(_table(out, "writer vs raw write+fsync"), "tensorstore")
    # --quick is strict: any difference of data or zarr.json from our part fails the run (exit 2)
    assert out.count("tensorstore check: zarr reads the data back bit-identical; zarr.json as ours") == 4


def test_writer_benchmark_engine_choice(monkeypatch, capsys):
    bench = load_benchmark("writer")
    assert bench.main(["--quick", "--engines", "ours,zarrita"]) == 2
    assert "--engines 'ours,zarrita': unknown engine(s) ['zarrita']" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorstore" else real(name, *a)
    )
    assert bench.engines(None) == ["ours"]
    assert "tensorstore is not installed: measuring engine 'ours' only" in capsys.readouterr().out
    assert bench.main(["--quick", "--engines", "tensorstore"]) == 2
    assert "the tensorstore package is not installed" in capsys.readouterr().err


def _tiny(compressor: str = "zstd", chunk_tokens: int | None = None):
    """The writer benchmark, its tensorstore engine, a tiny manifest and one shard of data."""
    from dspark_offline.store.manifest import feature_specs

    bench, engine = load_benchmark("writer"), load_benchmark("writer_tensorstore")
    m = bench._manifest(16, 2, 4, 512, compressor, 3)
    if chunk_tokens is not None:
        m = m.model_copy(update={"chunk_tokens": chunk_tokens})
    return bench, engine, m, bench._shard_data(feature_specs(m), 512)


@pytest.mark.parametrize("compressor", ["zstd", "blosc", "none"])
def test_tensorstore_writes_our_store_layout(tmp_path, compressor):
    """tensorstore's arrays, made from the manifest alone, are the ones our writer makes: zarr reads
    them back bit-identical, their zarr.json equals ours up to spec defaults, and (with the zstd
    tensorstore bundles today) even the shard objects are the same bytes."""
    pytest.importorskip("tensorstore", reason="the optional `tensorstore` extra")
    bench, engine, m, data = _tiny(compressor)
    *_, ours = bench.measure_writer(tmp_path / "ours.zarr", m, data, 2, 1)
    arrays = engine.create_arrays(tmp_path / "ts", m, 2 * 512, engine.context(2))
    engine.write_shards(arrays, data, 2, 2)
    assert engine.check(tmp_path / "ts", ours, data, 2) == ([], [], True)


def test_tensorstore_check_reports_differences(tmp_path):
    pytest.importorskip("tensorstore", reason="the optional `tensorstore` extra")
    bench, engine, m, data = _tiny()
    *_, ours = bench.measure_writer(tmp_path / "ours.zarr", m, data, 1, 1)
    _, _, other, _ = _tiny(chunk_tokens=128)  # inner chunks of 128 tokens where ours has 256
    engine.write_shards(engine.create_arrays(tmp_path / "ts", other, 512, engine.context(1)), data, 1, 1)
    found = engine.check(tmp_path / "ts", ours, data, 1)
    assert found.data == [] and not found.same_bytes
    assert "hidden/zarr.json codecs[0].configuration.chunk_shape[0]: 256 -> 128" in found.metadata
    changed = dict(data, topk_ids=data["topk_ids"] + 1)  # what zarr reads is not what was "written"
    assert engine.check(tmp_path / "ts", ours, changed, 1).data == [
        "topk_ids: zarr reads int32[512, 4] other than the data written"
    ]


def test_metadata_differences_ignore_only_spec_defaults():
    engine = load_benchmark("writer_tensorstore")
    ours = {
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "sharding_indexed", "configuration": {"index_location": "end"}}],
        "storage_transformers": [],
        "fill_value": 0,
    }
    theirs = {
        "chunk_key_encoding": {"name": "default"},
        "codecs": [{"name": "sharding_indexed"}],
        "fill_value": 0,
    }
    assert engine.metadata_differences(ours, theirs) == []
    theirs["chunk_key_encoding"]["configuration"] = {"separator": "."}
    theirs["fill_value"] = 1
    assert engine.metadata_differences(ours, theirs) == [
        "chunk_key_encoding.configuration.separator: '/' -> '.'",
        "fill_value: 0 -> 1",
    ]


def test_data_wait_benchmark_times_next_against_the_step(capsys):
    bench = load_benchmark("data_wait")
    assert bench.main(["--quick"]) == 0
    rows = _table(capsys.readouterr().out, "data wait")
    assert [(r[0], r[1], r[2]) for r in rows] == [("tiny", "1", "2"), ("tiny", "2", "2")]
    for _, epoch, _, _, steps, wait, total, fraction, cpu, need in rows:
        assert 0 < float(wait) <= float(total) and 0 < float(fraction.rstrip("%")) <= 100
        assert int(steps) == (11 if epoch == "1" else 12)  # 24 samples / micro 2, less the warm-up batch
        assert float(cpu) > 0 and int(need) >= 1


def test_data_wait_benchmark_compares_chunk_sizes_in_one_run(capsys):
    bench = load_benchmark("data_wait")
    assert bench.main(["--quick", "--chunk-tokens", "32,16", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    rows = _table(out, "data wait")
    assert [r[0] for r in rows] == ["tiny (chunk 32)", "tiny (chunk 16)"]
    assert re.search(r"loader CPU per batch, chunk 16 / chunk 32: [\d.]+x", out)


def test_data_wait_with_no_step_is_all_waiting(tmp_path):
    bench = load_benchmark("data_wait")
    import numpy as np

    path = bench.make_store(tmp_path / "s.zarr", 32, 2, 4, np.full(10, 40))
    ((wait, total, steps),), cpu = bench.drive(path, 2, 0, 0.0)
    assert steps == 4 and wait / total > 0.9 and cpu > 0  # inline reads, nothing else in the step
    epochs, _ = bench.drive(path, 2, 0, 0.05, cache_gb=1.0, epochs=2)
    (w1, t1, n1), (w2, t2, n2) = epochs
    assert (n1, n2) == (4, 5) and t1 >= 4 * 0.05 and t2 >= 5 * 0.05 and w1 < t1 and w2 < t2


def test_writer_benchmark_dump_tensorstore_engine(capsys):
    """The dump's own path with dump.writer_engine=tensorstore, measured beside ours; the run fails
    unless its part is ours byte for byte."""
    pytest.importorskip("tensorstore", reason="the optional `tensorstore` extra")
    assert load_benchmark("writer").main(["--quick", "--engines", "ours,dump-tensorstore"]) == 0
    out = capsys.readouterr().out
    rows = _table(out, "writer vs raw write+fsync")
    _check_rows([r for r in rows if r[2] == "dump-tensorstore"], "dump-tensorstore")
    assert out.count("dump-tensorstore check: zarr.json and shard objects byte-identical to ours") == 4
    assert re.search(
        r"tiny-a, 2 workers: dump-tensorstore / ours = [\d.]+x wall, [\d.]+x per CPU-second", out
    )
