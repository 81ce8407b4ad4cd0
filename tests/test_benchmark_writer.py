"""benchmarks/writer.py and benchmarks/data_wait.py run end to end in their --quick modes."""

from __future__ import annotations

import re

from benchmark_script import load_benchmark


def _table(out: str, title: str) -> list[list[str]]:
    block = out.split(f"## {title}")[1].strip().split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_writer_benchmark_prints_writer_and_raw_side_by_side(capsys):
    assert load_benchmark("writer").main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = _table(out, "writer vs raw write+fsync")
    assert [(r[0], r[1]) for r in rows] == [("tiny-a", "1"), ("tiny-a", "2"), ("tiny-b", "1"), ("tiny-b", "2")]
    for width, workers, raw, writer, ratio, per_cpu, on_disk in rows:
        raw, writer, ratio, per_cpu, on_disk = map(float, (raw, writer, ratio, per_cpu, on_disk))
        assert raw > 0 and writer > 0 and per_cpu > 0, (width, workers)
        assert 0 < on_disk < 1.2  # zstd + crc32c of random bf16: a bit below the logical bytes
    assert re.search(r"tiny-a: \d+ MB per CPU-second -> [\d.]+ cores per 1.2 GB/s", out)


def test_data_wait_benchmark_times_next_against_the_step(capsys):
    bench = load_benchmark("data_wait")
    assert bench.main(["--quick"]) == 0
    (row,) = _table(capsys.readouterr().out, "data wait")
    config, workers, _, steps, wait, total, fraction, _ = row
    assert (config, workers) == ("tiny", "2")
    assert 0 < float(wait) <= float(total) and 0 < float(fraction.rstrip("%")) <= 100
    assert int(steps) == 11  # 24 samples / micro 2, less the warm-up batch


def test_data_wait_with_no_step_is_all_waiting(tmp_path):
    bench = load_benchmark("data_wait")
    import numpy as np

    path = bench.make_store(tmp_path / "s.zarr", 32, 2, 4, np.full(10, 40))
    wait, total, steps = bench.drive(path, 2, 0, 0.0)
    assert steps == 4 and wait / total > 0.9  # inline reads, nothing else in the step
    wait, total, steps = bench.drive(path, 2, 0, 0.05)
    assert total >= 4 * 0.05 and wait < total
