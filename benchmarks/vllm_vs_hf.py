"""vLLM vs HF dump backend: tokens/s after start-up, and the start-up itself, side by side.

Each variant is one real ``dspark-offline dump`` into a fresh store, over the same prepared
samples (embedded ShareGPT rendered by ``prepare``, or ``--prepared``), with the same layer ids,
top-k and batch token budget; the variants run one after another in this process's order
(repeat with ``--repeats``: the order alternates and the best of each is kept). From each run's
own log:

- **start-up**: ``[dump] <backend> backend ready in X s``: HF loads the model; vLLM starts its
  engine (worker process, weight load, KV-cache allocation, and torch.compile unless eager);
- **tokens/s**: ``[dump] wrote ... T tokens in Y s``: the dump loop after start-up (forward,
  top-k, conversion, Zarr writes).
- **process**: wall time of the whole command (Python start, imports, start-up, dump, shutdown).

Both get the same CPU threads (``--threads``: ``OMP_NUM_THREADS`` for HF, ``VLLM_CPU_OMP_THREADS_BIND``
for vLLM's CPU build, which otherwise binds one thread per core whatever ``OMP_NUM_THREADS`` says).
HF runs in this interpreter's environment; vLLM in ``--vllm-python``'s (default ``.venv-vllm``,
made by ``.ci/setup_vllm.sh``; vLLM pins its own torch/transformers). Variants: ``hf``,
``vllm-eager`` (``dump.vllm.enforce_eager=true``), ``vllm`` (vLLM's default: compiled).

CPU: ``python benchmarks/vllm_vs_hf.py`` (~10 minutes on 2 cores; the compiled vLLM's start-up
dominates). Ratios are vLLM / HF: > 1 means vLLM takes longer (start-up) or is faster (tok/s).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"\[dump\] (\w+) backend ready in ([\d.]+)s")
WROTE = re.compile(r"\[dump\] wrote \d+ shards, (\d+) tokens in ([\d.]+)s")
VARIANTS = {
    "hf": ["dump.backend=hf"],
    "vllm-eager": ["dump.backend=vllm", "dump.vllm.enforce_eager=true"],
    "vllm": ["dump.backend=vllm"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--target", default="embedded:smollm2", help="Target path or 'embedded:smollm2'.")
    p.add_argument(
        "--prepared", default=None, help="Prepared-data directory (default: prepare into workdir)."
    )
    p.add_argument(
        "--num-samples", type=int, default=64, help="Samples to prepare from the embedded ShareGPT."
    )
    p.add_argument("--max-length", type=int, default=512, help="Tokens per sample at most.")
    p.add_argument("--layer-ids", default="1,8,14,20,27", help="dump.layer_ids (comma-separated).")
    p.add_argument("--top-k", type=int, default=64, help="dump.top_k.")
    p.add_argument("--batch-tokens", type=int, default=4096, help="dump.batch_tokens.")
    p.add_argument("--dtype", default="auto", help="target.dtype (auto: float32 on CPU).")
    p.add_argument("--variants", default="hf,vllm-eager,vllm", help=f"Comma-separated, of {list(VARIANTS)}.")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every variant.")
    p.add_argument("--repeats", type=int, default=1, help="Rounds (order alternates); best of each kept.")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--workdir", default=None, help="Where prepared data and stores go (default: a temp dir).")
    return p.parse_args(argv)


def parse_log(log: str) -> tuple[float, int, float]:
    """(start-up s, tokens, dump-loop s) from a dump's log."""
    ready, wrote = READY.search(log), WROTE.search(log)
    if ready is None or wrote is None:
        raise RuntimeError(f"dump log without the timing lines:\n{log[-3000:]}")
    return float(ready.group(2)), int(wrote.group(1)), float(wrote.group(2))


def cli_for(variant: str, vllm_python: str) -> list[str]:
    py = sys.executable if variant == "hf" else vllm_python
    return [py, "-m", "dspark_offline.cli"]


def thread_env(threads: int) -> dict[str, str]:
    """The same number of CPU threads for HF (OpenMP) and vLLM's CPU build (its own binding)."""
    return {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}


def run_variant(variant: str, params: Path, store: Path, vllm_python: str, tmp: Path, threads: int) -> dict:
    cmd = [*cli_for(variant, vllm_python), "dump", "-p", str(params), "-S", f"dump.store={store}"]
    cmd += [a for s in VARIANTS[variant] for a in ("-S", s)] + ["--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp), **thread_env(threads)),
        check=False,  # a failure is raised below with the log's tail
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    startup, tokens, loop = parse_log(proc.stdout + proc.stderr)
    return {"startup": startup, "tokens": tokens, "loop": loop, "tok_s": tokens / loop, "wall": wall}


def keep_best(old: dict | None, new: dict) -> dict:
    """Per field, the best of two rounds (times: the minimum)."""
    if old is None:
        return new
    out = {k: min(old[k], new[k]) for k in ("startup", "loop", "wall")}
    return {**out, "tokens": new["tokens"], "tok_s": new["tokens"] / out["loop"]}


def table(results: dict[str, dict]) -> str:
    """Side-by-side table; ratios against the 'hf' row when present."""
    base = results.get("hf")
    lines = [
        f"{'variant':<12}{'start-up s':>12}{'dump tok/s':>12}{'process s':>11}"
        + (f"{'start-up / hf':>15}{'tok/s / hf':>12}" if base else ""),
    ]
    for name, r in results.items():
        row = f"{name:<12}{r['startup']:>12.1f}{r['tok_s']:>12.0f}{r['wall']:>11.1f}"
        if base:
            row += f"{r['startup'] / base['startup']:>15.2f}{r['tok_s'] / base['tok_s']:>12.2f}"
        lines.append(row)
    return "\n".join(lines)


def ensure_prepared(args: argparse.Namespace, workdir: Path) -> str:
    if args.prepared:
        return args.prepared
    from dspark_offline import prepare
    from dspark_offline.config import Params

    out = workdir / "prepared"
    if not (out / "meta.json").exists():
        prepare.run(
            Params.model_validate(
                {
                    "target": {"path": args.target},
                    "prepare": {
                        "output": str(out),
                        "num_samples": args.num_samples,
                        "num_eval_samples": 0,
                        "max_length": args.max_length,
                    },
                }
            )
        )
    return str(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if any(v != "hf" for v in variants) and not Path(args.vllm_python).exists():
        raise SystemExit(f"{args.vllm_python}: no such interpreter (bash .ci/setup_vllm.sh makes .venv-vllm)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vllm-vs-hf-"))
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    from dspark_offline.target.embedded import resolve_target_path

    target = str(resolve_target_path(args.target))  # converted once here, shared by both venvs
    prepared = ensure_prepared(args, workdir)
    params = workdir / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "target": {"path": target, "dtype": args.dtype},
                "prepare": {"output": prepared},
                "dump": {
                    "layer_ids": [int(i) for i in args.layer_ids.split(",")],
                    "top_k": args.top_k,
                    "batch_tokens": args.batch_tokens,
                    "hidden_dtype": "bfloat16",
                },
            }
        )
    )
    best: dict[str, dict] = {}
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            res = run_variant(
                v, params, workdir / f"{v}.zarr", args.vllm_python, workdir / "tmp", args.threads
            )
            print(
                f"[bench] round {r} {v}: start-up {res['startup']:.1f}s, {res['tokens']} tokens in "
                f"{res['loop']:.1f}s ({res['tok_s']:.0f} tok/s), process {res['wall']:.1f}s",
                flush=True,
            )
            best[v] = keep_best(best.get(v), res)
    print(
        f"[bench] {args.target}: layer ids {args.layer_ids}, top-{args.top_k}, batch_tokens "
        f"{args.batch_tokens}, {args.threads} threads each"
    )
    print(table({v: best[v] for v in variants}))


if __name__ == "__main__":
    main()
