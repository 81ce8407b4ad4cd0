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
    assert [(r[0], r[1]) for r in rows] == [
        ("tiny-a", "1"),
        ("tiny-a", "2"),
        ("tiny-b", "1"),
        ("tiny-b", "2"),
    ]
    for width, workers, raw, writer, ratio, per_cpu, on_disk in rows:
        raw, writer, ratio, per_cpu, on_disk = map(float, (raw, writer, ratio, per_cpu, on_disk))
        assert raw > 0 and writer > 0 and per_cpu > 0, (width, workers)
        assert 0 < on_disk < 1.2  # zstd + crc32c of random bf16: a bit below the logical bytes
    assert re.search(r"tiny-a: \d+ MB per CPU-second -> [\d.]+ cores per 1.2 GB/s", out)


def test_data_wait_benchmark_times_next_against_the_step(capsys):
    bench = load_benchmark("data_wait")
    assert bench.main(["--quick"]) == 0
    rows = _table(capsys.readouterr().out, "data wait")
    assert [(r[0], r[1], r[2]) for r in rows] == [("tiny", "1", "2"), ("tiny", "2", "2")]
    for _, epoch, _, _, steps, wait, total, fraction, cpu, need in rows:
        assert 0 < float(wait) <= float(total) and 0 < float(fraction.rstrip("%")) <= 100
        assert int(steps) == (11 if epoch == "1" else 12)  # 24 samples / micro 2, less the warm-up batch
        assert float(cpu) > 0 and int(need) >= 1


def test_data_wait_with_no_step_is_all_waiting(tmp_path):
    bench = load_benchmark("data_wait")
    import numpy as np

    path = bench.make_store(tmp_path / "s.zarr", 32, 2, 4, np.full(10, 40))
    ((wait, total, steps),), cpu = bench.drive(path, 2, 0, 0.0)
    assert steps == 4 and wait / total > 0.9 and cpu > 0  # inline reads, nothing else in the step
    epochs, _ = bench.drive(path, 2, 0, 0.05, cache_gb=1.0, epochs=2)
    (w1, t1, n1), (w2, t2, n2) = epochs
    assert (n1, n2) == (4, 5) and t1 >= 4 * 0.05 and t2 >= 5 * 0.05 and w1 < t1 and w2 < t2
