"""What the integrity and provenance checks cost, beside a training run.

Times, on a real store and target (the default: the `dvc repro` store, ~49k tokens):

- `verify --quick` (`store.integrity.quick_check`): the check `train` (and every `open_store`)
  runs before step 0: manifest fingerprint, shapes, one listing per array, every shard index;
- opening the store for training (`open_store`: the quick check + the sample index);
- the full `verify` (every chunk and shard decoded), for comparison;
- the target weights hash (`train`, `export`, `evaluate` recompute it) and, for the embedded
  target, locating its converted directory without converting (a digest of the GGUF file);
- the layer spot check of `evaluate` (one target forward over 32 tokens; the target is loaded
  by `evaluate` anyway, so loading it is not counted).

Each is the median of `--repeats` runs and is printed in seconds and as a share of a training run
(`--train-seconds`, default 540 s: the ~9 min `train` stage of the default pipeline on 2 CPU cores).

    OMP_NUM_THREADS=2 python benchmarks/integrity_check.py          # after `dvc repro` (or `dump`)
    python benchmarks/integrity_check.py --store data/features.zarr --target none   # store checks only
"""

from __future__ import annotations

import argparse
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "-p", "--params", action="append", default=None, help="Params file(s); default params.yaml."
    )
    p.add_argument("--store", default=None, help="Feature store; default dump.store.")
    p.add_argument(
        "--target", default=None, help="Target path ('none': skip the target checks); default target.path."
    )
    p.add_argument("--repeats", type=int, default=5, help="Runs of each check (median reported).")
    p.add_argument(
        "--train-seconds", type=float, default=540.0, help="Training run the costs are compared with."
    )
    return p.parse_args(argv)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    store_path: str, target: str | None, cache_dir: str | None, repeats: int
) -> list[tuple[str, float]]:
    from dspark_offline.store import open_store
    from dspark_offline.store.inspect import verify
    from dspark_offline.store.integrity import quick_check
    from dspark_offline.store.reader import open_root, read_manifest

    manifest = read_manifest(store_path)
    rows = [
        (
            "verify --quick (train's check before step 0)",
            median_seconds(lambda: quick_check(open_root(store_path), manifest), repeats),
        ),
        ("open_store (quick check + sample index)", median_seconds(lambda: open_store(store_path), repeats)),
        ("verify (every chunk and shard decoded)", median_seconds(lambda: verify(store_path), 1)),
    ]
    if target is None:
        return rows
    from dspark_offline.target.embedded import existing_target_path, resolve_target_path
    from dspark_offline.target.fingerprint import weights_hash

    target_dir = resolve_target_path(target, cache_dir)
    rows.append(
        (
            "locate the target directory (no conversion)",
            median_seconds(lambda: existing_target_path(target, cache_dir), repeats),
        )
    )
    rows.append(("target weights hash", median_seconds(lambda: weights_hash(target_dir), repeats)))
    import torch

    from dspark_offline.evaluate.provenance import spot_check_layers
    from dspark_offline.target.loader import load_model

    model, _ = load_model(target_dir, torch.float32, torch.device("cpu"))
    store = open_store(store_path)
    rows.append(
        (
            "evaluate's layer spot check (target loaded)",
            median_seconds(lambda: spot_check_layers(model, store), repeats),
        )
    )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    from dspark_offline.config import load_params

    params = load_params(args.params or ("params.yaml",))
    store = args.store or params.dump.store
    target = None if args.target == "none" else (args.target or params.target.path)
    from dspark_offline.store.reader import read_manifest

    m = read_manifest(store)
    print(
        f"store {store}: {m.data.num_tokens} tokens, {m.num_parts} part(s), shard_tokens={m.shard_tokens}, "
        f"chunk_tokens={m.chunk_tokens}; target {target or '(skipped)'}; median of {args.repeats}"
    )
    print(f"| check | seconds | % of a {args.train_seconds:.0f} s training run |")
    print("| --- | --- | --- |")
    for name, seconds in measure(store, target, params.target.cache_dir, args.repeats):
        print(f"| {name} | {seconds:.3f} | {100 * seconds / args.train_seconds:.3f} % |")


if __name__ == "__main__":
    main()
