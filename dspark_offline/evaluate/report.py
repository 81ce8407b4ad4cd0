"""Evaluation metrics: acceptance length with bootstrap intervals, per-slot acceptance, speed; the
DVC metrics / plot / table files.

Decoders (each decodes every prompt through the same verification loop): ``drafter`` (the
exported drafter under evaluation), ``prompt_lookup`` (the no-training baseline) and, with
``evaluate.compare``, ``compare`` (a second exported drafter). Definitions (one round = one
proposal verified by one target forward):

- ``tau`` = mean over rounds of (accepted draft tokens + 1) = Σ committed / Σ rounds over all
  prompts: tokens committed per target forward. ``tau_ci95`` is its 95 % bootstrap interval over
  prompts; ``tau_vs_prompt_lookup`` (``tau_vs_compare``) is τ_drafter / τ_other with a paired
  interval (`bootstrap.py`).
- ``per_slot_acceptance[j]`` = among rounds that sent slot j's draft token to verification, the
  fraction in which it was accepted (i.e. the whole prefix 0..j was accepted). Rounds with a
  shorter proposal (a confidence cut, a short prompt-lookup continuation) do not count for the
  slots they did not propose. Without a cut every round proposes every slot and ``tau = 1 +
  sum_j per_slot_acceptance[j]``, the quantity the training metric ``tau_probabilistic``
  estimates.
- ``ms_per_token_*`` = wall time of one decoder over all prompts / tokens it generated; the
  ``target`` baseline is the plain KV-cached decode of the same prompts, run once per prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dspark_offline.evaluate.bootstrap import LEVEL, tau_interval, tau_ratio_interval
from dspark_offline.evaluate.speculative import RoundStats

DRAFTER, PROMPT_LOOKUP, COMPARE = "drafter", "prompt_lookup", "compare"
LABELS = {DRAFTER: "drafter", PROMPT_LOOKUP: "prompt lookup", COMPARE: "compare"}


@dataclass
class EvalTally:
    """Running totals of one decoder over prompts, and its per-prompt counts."""

    block_size: int
    rounds: int = 0
    committed: int = 0  # sum over rounds of accepted + 1
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0  # generated tokens
    seconds: float = 0.0
    slot_proposed: list[int] = field(default_factory=list)  # [B]
    slot_accepted: list[int] = field(default_factory=list)  # [B]
    prompt_rounds: list[int] = field(default_factory=list)  # [num prompts]
    prompt_committed: list[int] = field(default_factory=list)  # [num prompts]
    prompt_tokens: list[int] = field(default_factory=list)  # [num prompts]

    def __post_init__(self) -> None:
        self.slot_proposed = [0] * self.block_size
        self.slot_accepted = [0] * self.block_size

    def add_prompt(self, rounds: list[RoundStats], tokens: int, seconds: float) -> None:
        committed = 0
        for r in rounds:
            if not 0 <= r.accepted <= r.proposed <= self.block_size:
                raise ValueError(f"inconsistent round {r} for block size {self.block_size}")
            committed += r.accepted + 1
            self.proposed += r.proposed
            self.accepted += r.accepted
            for j in range(r.proposed):
                self.slot_proposed[j] += 1
                self.slot_accepted[j] += int(j < r.accepted)
        self.rounds += len(rounds)
        self.committed += committed
        self.tokens += tokens
        self.seconds += seconds
        self.prompt_rounds.append(len(rounds))
        self.prompt_committed.append(committed)
        self.prompt_tokens.append(tokens)

    @property
    def tau(self) -> float | None:
        return self.committed / self.rounds if self.rounds else None

    def per_slot(self) -> list[float | None]:
        """Acceptance rate of each slot; None for a slot never proposed."""
        return [a / p if p else None for a, p in zip(self.slot_accepted, self.slot_proposed)]

    def ms_per_token(self) -> float | None:
        return 1000 * self.seconds / self.tokens if self.tokens else None

    def metrics(self, target_ms: float | None = None) -> dict:
        ms = self.ms_per_token()
        return {
            "tau": self.tau,
            "num_rounds": self.rounds,
            "draft_tokens_proposed": self.proposed,
            "draft_tokens_accepted": self.accepted,
            "draft_acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "per_slot_acceptance": {str(j): rate for j, rate in enumerate(self.per_slot())},
            "generated_tokens": self.tokens,
            "ms_per_token": ms,
            "speedup": target_ms / ms if ms and target_ms else None,
        }


def _ci(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]


def _ratio(a: EvalTally, b: EvalTally) -> float | None:
    return a.tau / b.tau if a.tau and b.tau else None


def evaluation_metrics(
    tallies: dict[str, EvalTally], target_tokens: int, target_seconds: float, *, resamples: int, seed: int
) -> dict:
    """The eval.json body: headline τ's with intervals, speeds, then each decoder's details.

    ``tallies`` holds ``drafter`` and ``prompt_lookup`` (and ``compare`` when set), all over the
    same prompts in the same order, which is what makes the ratios paired.
    """
    boot = {"resamples": resamples, "seed": seed}
    target_ms = 1000 * target_seconds / target_tokens if target_tokens else None
    drafter = tallies[DRAFTER]
    out: dict = {
        "tau": drafter.tau,
        "tau_ci95": _ci(tau_interval(drafter.prompt_committed, drafter.prompt_rounds, **boot)),
    }
    for name in (PROMPT_LOOKUP, COMPARE):
        if name not in tallies:
            continue
        other = tallies[name]
        out[f"tau_{name}"] = other.tau
        out[f"tau_{name}_ci95"] = _ci(tau_interval(other.prompt_committed, other.prompt_rounds, **boot))
        out[f"tau_vs_{name}"] = _ratio(drafter, other)
        out[f"tau_vs_{name}_ci95"] = _ci(
            tau_ratio_interval(
                drafter.prompt_committed,
                drafter.prompt_rounds,
                other.prompt_committed,
                other.prompt_rounds,
                **boot,
            )
        )
    out["ms_per_token_target"] = target_ms
    for name, tally in tallies.items():
        out[f"ms_per_token_{name}"] = tally.ms_per_token()
    details = {name: tally.metrics(target_ms) for name, tally in tallies.items()}
    # The drafter's own details stay at the top level (the file is its evaluation).
    out.update({k: v for k, v in details.pop(DRAFTER).items() if k not in ("tau", "ms_per_token")})
    out["target_generated_tokens"] = target_tokens
    out.update(details)
    out["bootstrap"] = {**boot, "level": LEVEL, "unit": "prompt", "statistic": "sum committed / sum rounds"}
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: list[float] | None) -> str:
    return "[n/a]" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def format_summary(metrics: dict) -> list[str]:
    """Console lines: τ [CI] of each decoder, the paired ratios, losslessness, ms/token."""
    n, asked = metrics.get("num_prompts"), metrics.get("num_prompts_requested")
    over = (
        ""
        if n is None
        else f" over {n} prompts" + (f" (ONLY {n} OF {asked} REQUESTED)" if asked and n < asked else "")
    )
    lines = [f"drafter        tau {_fmt(metrics['tau'])} {_fmt_ci(metrics['tau_ci95'])}{over}"]
    for name in (PROMPT_LOOKUP, COMPARE):
        if f"tau_{name}" in metrics:
            lines.append(
                f"{LABELS[name]:<14} tau {_fmt(metrics[f'tau_{name}'])} "
                f"{_fmt_ci(metrics[f'tau_{name}_ci95'])}"
            )
    for name in (PROMPT_LOOKUP, COMPARE):
        if f"tau_vs_{name}" in metrics:
            lines.append(
                f"drafter / {LABELS[name]}: {_fmt(metrics[f'tau_vs_{name}'])} "
                f"{_fmt_ci(metrics[f'tau_vs_{name}_ci95'])} (paired by prompt)"
            )
    lossless = {True: "yes", None: "not checked (T > 0)"}.get(metrics["lossless"], "NO")
    tokens = metrics["target_generated_tokens"]
    lines.append(f"lossless at T = 0: {lossless} (every decoder; the target decode has {tokens} tokens)")
    speeds = [f"target {_fmt(metrics['ms_per_token_target'], 1)}"]
    speeds += [
        f"{LABELS[name]} {_fmt(metrics[f'ms_per_token_{name}'], 1)}"
        for name in (DRAFTER, PROMPT_LOOKUP, COMPARE)
        if f"ms_per_token_{name}" in metrics
    ]
    lines.append("ms/token: " + ", ".join(speeds))
    return lines


def _clean(value):
    """JSON has no NaN/inf: map them to null (DVC reads the file as strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_metrics(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(metrics), indent=2) + "\n")
    return path


def _write_tsv(path: str | Path, header: list[str], rows: list[list]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_per_slot(drafter: EvalTally, prompt_lookup: EvalTally, path: str | Path) -> Path:
    """TSV for a DVC plot: slot, acceptance rate (0 for never-proposed slots) and proposals of the
    drafter, then of prompt lookup (same block size)."""
    header = [
        "slot",
        "acceptance_rate",
        "proposed",
        "prompt_lookup_acceptance_rate",
        "prompt_lookup_proposed",
    ]
    rows = []
    for j in range(drafter.block_size):
        row: list = [j]
        for tally in (drafter, prompt_lookup):
            rate = tally.per_slot()[j] if j < tally.block_size else None
            row += [
                f"{0.0 if rate is None else rate:.6f}",
                tally.slot_proposed[j] if j < tally.block_size else 0,
            ]
        rows.append(row)
    return _write_tsv(path, header, rows)


def write_per_prompt(
    prompts: list, target_tokens: list[int], tallies: dict[str, EvalTally], path: str | Path
) -> Path:
    """One row per prompt, so every τ and interval can be re-derived: prompt_index, sample_id,
    prompt_tokens, target_tokens, then per decoder ``<name>_{tokens,rounds,committed,tau}``."""
    header = ["prompt_index", "sample_id", "prompt_tokens", "target_tokens"]
    for name in tallies:
        header += [f"{name}_tokens", f"{name}_rounds", f"{name}_committed", f"{name}_tau"]
    rows = []
    for i, prompt in enumerate(prompts):
        row: list = [prompt.index, prompt.sample_id, len(prompt.ids), target_tokens[i]]
        for tally in tallies.values():
            rounds, committed = tally.prompt_rounds[i], tally.prompt_committed[i]
            row += [tally.prompt_tokens[i], rounds, committed, f"{committed / rounds:.6f}" if rounds else ""]
        rows.append(row)
    return _write_tsv(path, header, rows)
