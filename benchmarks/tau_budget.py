"""Acceptance length against training budget: where the CPU minutes of `dvc repro` buy τ.

Trains drafters from one feature store with the project's own CLI (`dspark-offline train`, the
code path a user runs), one subprocess per setting, and reports for each: optimizer steps,
training wall time, the held-out teacher-forced acceptance `tau_greedy` (validation over the
whole vocabulary, as the export is served; on greedy on-policy data it is the acceptance
length greedy verification would give with the data's prefix) and, with ``--eval-prompts``, the
real speculative-decoding τ on held-out prompts beside prompt-lookup decoding's τ on the same
prompts (`dspark-offline export` + `evaluate`).

Settings are a base params file plus named variants of ``-S`` overrides, each run for every
step budget. Example (the table in the README):

    python benchmarks/tau_budget.py --steps 500,1000,2000,4000 \\
        --variant "default:" --variant "lr 3e-3:train.learning_rate=0.003" \\
        --variant "2 layers:draft.num_layers=2" --eval-prompts 32

Run it on a quiet machine (it measures wall time); a row costs its training time plus, with
``--eval-prompts``, about 5 s per prompt. Outputs go under ``--work-dir`` (one directory per
run) and the table is printed and written as ``tau_budget.json`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "--params", default="params.yaml", help="Base params file (its store must exist: run dump)."
    )
    p.add_argument("--steps", default="500,1000,2000", help="Comma-separated train.max_steps budgets.")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help='"name:section.field=value,section.field=value" (repeatable; "name:" = the base).',
    )
    p.add_argument(
        "--eval-prompts", type=int, default=0, help="Held-out prompts to decode per run (0 = no decoding)."
    )
    p.add_argument("--work-dir", default="runs/tau_budget", help="Where runs and the JSON table go.")
    p.add_argument("--set", "-S", action="append", default=[], help="Override applied to every run.")
    return p.parse_args(argv)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:a.b=1,c.d=2' -> ('name', ['a.b=1', 'c.d=2'])."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise SystemExit(f"--variant {text!r}: expected 'name:section.field=value,...'")
    sets = [s.strip() for s in rest.split(",") if s.strip()]
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise SystemExit(f"--variant {text!r}: {s!r} is not section.field=value")
    return name.strip(), sets


def _cli(args: list[str], log: Path) -> float:
    """Run `dspark-offline <args>`, output to ``log``; returns wall seconds; raises on failure."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "dspark_offline.cli", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")},
            check=False,  # the exit status is turned into a message below
        )
    if proc.returncode != 0:
        raise SystemExit(f"dspark-offline {' '.join(args[:1])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def run_one(base: str, sets: list[str], steps: int, out: Path, eval_prompts: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    common = ["-p", base, *(a for s in sets for a in ("-S", s))]
    train_sets = [
        "-S",
        f"train.output_dir={out}",
        "-S",
        f"train.max_steps={steps}",
        "-S",
        f"export.output={out / 'drafter'}",
    ]
    seconds = _cli(["train", *common, *train_sets], out / "train.log")
    summary = json.loads((out / "metrics.json").read_text())
    val = summary.get("val", {})
    row = {
        "steps": steps,
        "train_s": round(seconds, 1),
        "tau_greedy": val.get("tau_greedy"),
        "tau_probabilistic": val.get("tau_probabilistic"),
        "val_ce": val.get("ce"),
    }
    if eval_prompts:
        _cli(["export", *common, *train_sets], out / "export.log")
        ev = [
            "-S",
            f"evaluate.drafter={out / 'drafter'}",
            "-S",
            f"evaluate.num_prompts={eval_prompts}",
            "-S",
            f"evaluate.output={out / 'eval.json'}",
            "-S",
            f"evaluate.per_slot_output={out / 'slots.tsv'}",
            "-S",
            f"evaluate.per_prompt_output={out / 'prompts.tsv'}",
        ]
        _cli(["evaluate", *common, *ev], out / "evaluate.log")
        metrics = json.loads((out / "eval.json").read_text())
        row.update(
            tau=metrics.get("tau"),
            tau_ci95=metrics.get("tau_ci95"),
            tau_prompt_lookup=metrics.get("tau_prompt_lookup"),
            tau_vs_prompt_lookup=metrics.get("tau_vs_prompt_lookup"),
            tau_vs_prompt_lookup_ci95=metrics.get("tau_vs_prompt_lookup_ci95"),
        )
    return row


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def main(argv=None) -> None:
    args = parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["base:"])]
    budgets = [int(s) for s in args.steps.split(",") if s.strip()]
    work = Path(args.work_dir)
    rows = []
    for name, sets in variants:
        for steps in budgets:
            slug = "".join(c if c.isalnum() else "-" for c in name) + f"-{steps}"
            row = {
                "variant": name,
                **run_one(args.params, [*args.set, *sets], steps, work / slug, args.eval_prompts),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["variant", "steps", "train_s", "tau_greedy", "tau_probabilistic", "val_ce"]
    if args.eval_prompts:
        cols += ["tau", "tau_ci95", "tau_prompt_lookup", "tau_vs_prompt_lookup", "tau_vs_prompt_lookup_ci95"]
    first = {r["steps"]: r for r in rows if r["variant"] == variants[0][0]}
    print("\n| " + " | ".join(cols + ["tau_greedy vs first variant"]) + " |")
    print("|" + " --- |" * (len(cols) + 1))
    for r in rows:
        ref = first.get(r["steps"], {}).get("tau_greedy")
        ratio = r["tau_greedy"] / ref if ref and r["tau_greedy"] else None
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + f" | {_fmt(ratio)} |")
    work.mkdir(parents=True, exist_ok=True)
    (work / "tau_budget.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
