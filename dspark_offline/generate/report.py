"""What a generate run reports: skipped prompts, stop reasons, length statistics.

`report.json` holds only what the data decides (no timings), so a resumed run and an
uninterrupted one write byte-identical output directories; throughput is printed instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# Why a prompt was skipped (counted with its sample id, never fatal unless all are skipped).
SKIP_REASONS: dict[str, str] = {
    "no_supervised_token": "the prepared sample has no supervised token, so no prompt can be cut",
    "empty_prompt": "the first token is already supervised (nothing to condition on)",
    "prompt_too_long": "prompt length >= prepare.max_length: no room for an answer",
    "exceeds_target_positions": "prompt + max_new_tokens > the target's max_position_embeddings",
}
# Why an answer ended.
STOP_REASONS: dict[str, str] = {
    "eos": "the target emitted its EOS / end-of-turn token (kept, supervised)",
    "stop_token": "the target emitted one of generate.stop_tokens (kept, supervised)",
    "max_new_tokens": "cut at generate.max_new_tokens (kept; no end-of-turn token)",
    "max_length": "cut so that prompt + answer = prepare.max_length (kept; no end-of-turn token)",
}
MAX_LISTED = 50


@dataclass
class GenerateTally:
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> sample ids
    stops: Counter = field(default_factory=Counter)
    prompt_lengths: list[int] = field(default_factory=list)
    answer_lengths: list[int] = field(default_factory=list)

    def skip(self, reason: str, sample_id: int) -> None:
        if reason not in SKIP_REASONS:
            raise KeyError(f"unknown skip reason {reason!r}")
        self.skipped.setdefault(reason, []).append(int(sample_id))

    def add(self, prompt_length: int, answer_length: int, stop: str) -> None:
        if stop not in STOP_REASONS:
            raise KeyError(f"unknown stop reason {stop!r}")
        self.prompt_lengths.append(int(prompt_length))
        self.answer_lengths.append(int(answer_length))
        self.stops[stop] += 1

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def skip_table(self) -> str:
        if not self.num_skipped:
            return "  (no prompt skipped)"
        lines = []
        for reason, meaning in SKIP_REASONS.items():
            ids = self.skipped.get(reason)
            if ids:
                more = ", ..." if len(ids) > 5 else ""
                lines.append(f"  {reason:<24} {len(ids):>5}  sample_ids {ids[:5]}{more}  ({meaning})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        lengths = np.asarray(self.answer_lengths, dtype=np.int64)

        def stats(a: np.ndarray) -> dict:
            if not len(a):
                return {"mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0}
            return {
                "mean": round(float(a.mean()), 2),
                "median": float(np.median(a)),
                "p90": float(np.percentile(a, 90)),
                "max": int(a.max()),
            }

        capped = self.stops["max_new_tokens"] + self.stops["max_length"]
        return {
            "samples": len(self.answer_lengths),
            "prompt_tokens": int(sum(self.prompt_lengths)),
            "generated_tokens": int(lengths.sum()),
            "generated_length": stats(lengths),
            "prompt_length": stats(np.asarray(self.prompt_lengths, dtype=np.int64)),
            "stop_reasons": {r: self.stops[r] for r in STOP_REASONS},
            "truncated": capped,
            "skipped": {
                "total": self.num_skipped,
                "counts": {r: len(self.skipped[r]) for r in SKIP_REASONS if r in self.skipped},
                "sample_ids": {r: self.skipped[r][:MAX_LISTED] for r in SKIP_REASONS if r in self.skipped},
            },
            "reasons": {
                **{f"stop:{k}": v for k, v in STOP_REASONS.items()},
                **{f"skip:{k}": v for k, v in SKIP_REASONS.items() if k in self.skipped},
            },
        }

    def summary(self) -> str:
        d = self.to_dict()
        g, stops = d["generated_length"], d["stop_reasons"]
        return (
            f"{d['samples']} samples, {d['prompt_tokens']} prompt + {d['generated_tokens']} generated "
            f"tokens; answer length mean {g['mean']} median {g['median']} p90 {g['p90']} max {g['max']}; "
            f"stops: "
            + ", ".join(f"{k} {v}" for k, v in stops.items())
            + f"; {d['truncated']} truncated, {self.num_skipped} prompts skipped"
        )
