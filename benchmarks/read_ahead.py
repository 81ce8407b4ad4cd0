"""Reading the next batches on a background thread vs inside the step, in real training on CPU.

With 0 DataLoader workers (the CPU default) `train/loop.py` reads, decodes and collates each
micro-batch inside `next(batches)`: ~6 % of the step in the first epoch of the default, ~0.2 % in
the cached ones (`train.tsv`'s `data_wait`). The alternative measured here reads the next
micro-batches on one background thread while the step computes (:class:`BackgroundBatches`,
wrapped around the loop's DataLoader by this benchmark only). It runs the same short training
(`dspark-offline train`, the code path a user runs) twice per repeat on one feature store,
alternating `inline` (the code as it is) and `thread`, and reports per run the share of step
time spent waiting for a batch (in the first epoch, where samples come from the store, and over
the run) and the wall time of the whole command, with thread / inline ratios. Both variants must
log the same losses (the same batches in the same order); a difference stops the benchmark.

    python benchmarks/read_ahead.py --store data/features.zarr            # the default's store
    python benchmarks/read_ahead.py --store S --steps 300 --repeats 2     # what the README quotes

Each run starts DeepSpeed and validates at step 0 and at the end as `dvc repro`'s training does;
that start-up is part of both variants' wall time. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader


class BackgroundBatches:
    """Iterate `batches` with up to `depth` items read ahead on one daemon thread, in the
    source's order; an error of the source is raised by the ``next`` that would have returned its
    item. The thread ends with the process (a training run is one process here)."""

    def __init__(self, batches: Iterable[Any], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._done = False
        threading.Thread(target=_read_ahead, args=(iter(batches), self._queue), daemon=True).start()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration


def _read_ahead(source: Iterator[Any], out: queue.Queue) -> None:
    """The background thread: items of `source` into `out` until it ends or fails."""
    try:
        for item in source:
            out.put(("item", item))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised where its item was due
        out.put(("error", e))
        return
    out.put(("end", None))


class ReadAheadLoader(DataLoader):
    """The loop's DataLoader, iterated through :class:`BackgroundBatches` when it has no workers."""

    def __iter__(self):
        it = super().__iter__()
        return BackgroundBatches(it) if self.num_workers == 0 else it


def child(variant: str, cli_args: list[str]) -> None:
    """One training run in this process; `thread` swaps the loop's DataLoader for
    :class:`ReadAheadLoader` (the thread ends with the process)."""
    from dspark_offline.train import loop

    if variant == "thread":
        loop.DataLoader = ReadAheadLoader
    sys.argv = ["dspark-offline", "train", *cli_args]
    from dspark_offline.cli import main

    main()


def train_log(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics" / "train.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def summarize(rows: list[dict], epoch_steps: int) -> dict:
    """Mean data_wait over the logging windows of the first epoch and of the whole run (windows
    have equal step counts; a window's share is of its own step time)."""
    waits = [(int(r["step"]), float(r["data_wait"])) for r in rows if not math.isnan(float(r["data_wait"]))]
    first = [w for s, w in waits if s <= epoch_steps] or [math.nan]
    return {
        "wait_first_epoch": sum(first) / len(first),
        "wait_run": sum(w for _, w in waits) / max(1, len(waits)),
        "losses": [r["loss"] for r in rows],
    }


def run_one(variant: str, args, out: Path) -> dict:
    cli = ["--store", args.store, "--output-dir", str(out), "--max-steps", str(args.steps), "--overwrite"]
    for p in args.params:
        cli += ["-p", p]
    for s in ["train.save_every=100000", *args.set]:
        cli += ["-S", s]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    t0 = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        done = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--", *cli],
            check=False,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{variant} run failed (exit {done.returncode}); see {out}.log")
    epoch_steps = int(json.loads((out / "metrics.json").read_text())["plan"]["steps_per_epoch"])
    return {"variant": variant, "wall_s": wall, **summarize(train_log(out), epoch_steps)}


def table(runs: list[dict]) -> str:
    lines = [
        f"## read ahead (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        "",
        "| repeat | variant | wall s | data_wait, first epoch | data_wait, run |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['repeat']} | {r['variant']} | {r['wall_s']:.1f} | {r['wait_first_epoch']:.2%} "
            f"| {r['wait_run']:.2%} |"
        )
    lines.append("")
    for rep in sorted({r["repeat"] for r in runs}):
        by = {r["variant"]: r for r in runs if r["repeat"] == rep}
        a, b = by["inline"], by["thread"]
        lines.append(
            f"repeat {rep}: thread / inline wall {b['wall_s'] / a['wall_s']:.3f}; first-epoch data_wait "
            f"{a['wait_first_epoch']:.2%} -> {b['wait_first_epoch']:.2%}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--store", required=True, help="Feature store to train from (e.g. data/features.zarr).")
    p.add_argument("--params", action="append", default=[], help="Params file(s) (default: ./params.yaml).")
    p.add_argument("--set", "-S", action="append", default=[], help="Override applied to every run.")
    p.add_argument(
        "--steps", type=int, default=300, help="train.max_steps per run (default store: 247 per epoch)."
    )
    p.add_argument("--repeats", type=int, default=2, help="inline + thread pairs, alternating.")
    p.add_argument("--work-dir", default=None, help="Where runs go (default: a temp dir, kept).")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:])
        return 0
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="read-ahead-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for rep in range(1, args.repeats + 1):
        for variant in ("inline", "thread"):
            r = run_one(variant, args, work / f"{variant}-{rep}")
            r["repeat"] = rep
            print(
                f"# repeat {rep} {variant}: {r['wall_s']:.1f} s, data_wait {r['wait_first_epoch']:.2%} "
                f"in the first epoch, {r['wait_run']:.2%} over the run",
                flush=True,
            )
            runs.append(r)
            if r["losses"] != runs[0]["losses"]:
                raise SystemExit(
                    f"{variant} (repeat {rep}) logged other losses than {runs[0]['variant']} (repeat 1): "
                    "not the same batches"
                )
    text = table(runs)
    print(text)
    kept = [{k: v for k, v in r.items() if k != "losses"} for r in runs]
    (work / "read_ahead.json").write_text(json.dumps(kept, indent=1))
    print(f"runs and read_ahead.json in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
