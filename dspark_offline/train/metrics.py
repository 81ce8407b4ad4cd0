"""Rank-0 metrics sink: per-step TSVs DVC can plot and a final ``metrics.json``.

* ``<output_dir>/metrics/train.tsv`` — one row per logged optimizer step, fixed columns
  (:data:`COLUMNS`), so ``dvc plots show`` can draw ``loss`` / ``tau_probabilistic`` vs ``step``.
  ``data_wait`` is the share of step wall time rank 0 spent waiting for its next batch over the
  steps since the previous row (`train/loader.py`; the run's first step, start-up, not counted).
* ``<output_dir>/metrics/val.tsv`` — the held-out samples scored at fixed steps
  (:data:`VAL_COLUMNS`; see ``train/validate.py``).
* ``<output_dir>/metrics.json`` — the summary of the run (last-step values, throughput, plan).

Only rank 0 writes; other ranks get a sink whose methods do nothing, so the loop needs no
``if rank == 0`` around logging. On resume, rows after the resumed step are dropped so a killed
and resumed run plots exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dspark_offline.model import LossConfig, LossSums

COLUMNS = (
    "step",
    "loss",
    "ce",
    "l1",
    "conf",
    "conf_excess",
    "conf_skill",
    "acc",
    "tau_probabilistic",
    "tau_greedy",
    "lr",
    "tokens_per_s",
    "data_wait",
)
VAL_COLUMNS = (
    "step",
    "loss",
    "ce",
    "l1",
    "conf",
    "conf_floor",
    "conf_excess",
    "conf_skill",
    "acc",
    "tau_probabilistic",
    "tau_greedy",
)


class MetricsSink:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        resume_step: int = 0,
        name: str = "train",
        columns: tuple[str, ...] = COLUMNS,
    ) -> None:
        self.enabled = enabled
        self.columns = columns
        self.output_dir = Path(output_dir)
        self.tsv = self.output_dir / "metrics" / f"{name}.tsv"
        self.json = self.output_dir / "metrics.json"
        if enabled:
            self.tsv.parent.mkdir(parents=True, exist_ok=True)
            self._start(resume_step)

    def _start(self, resume_step: int) -> None:
        """Fresh header, or keep the rows up to ``resume_step`` of a resumed run (rows of a run
        logged before columns were appended, e.g. ``data_wait``, get ``nan`` in them)."""
        header = "\t".join(self.columns) + "\n"
        kept: list[str] = []
        if resume_step > 0 and self.tsv.is_file():
            lines = self.tsv.read_text().splitlines()
            old = lines[0].split("\t") if lines else []
            if old and old == list(self.columns[: len(old)]):
                pad = "\tnan" * (len(self.columns) - len(old))
                rows = [ln for ln in lines[1:] if ln.strip() and int(ln.split("\t", 1)[0]) <= resume_step]
                kept = [f"{ln}{pad}\n" for ln in rows]
        self.tsv.write_text(header + "".join(kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one row; a missing column is written as ``nan`` rather than shifting the others."""
        if not self.enabled:
            return
        row = {**values, "step": step}
        cells = [_fmt(row.get(c, math.nan)) for c in self.columns]
        with self.tsv.open("a") as f:
            f.write("\t".join(cells) + "\n")

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        self.json.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.6g}"


def read_tsv(path: str | Path) -> list[dict[str, float]]:
    """Parse a ``train.tsv`` back (for tests and the evaluate stage)."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        return []
    cols = lines[0].split("\t")
    return [{c: float(v) for c, v in zip(cols, ln.split("\t"), strict=True)} for ln in lines[1:] if ln]


def pool_step_metrics(
    micro: list[tuple[float, LossSums]], tokens: int, cfg: LossConfig, device
) -> dict[str, float]:
    """One optimizer step's metrics over its micro-batches and all data-parallel ranks.

    ``micro`` holds (loss, sums) per micro-batch: the loss backpropagated and its ``LossSums``.
    The sums are pooled and the metrics derived from them (``LossSums.metrics``), so each is
    the token-pooled number one process with the whole batch would log. ``loss`` is the value
    that was optimised (each rank's is world x its share of the pooled mean, so it is averaged
    over ranks and micro-batches; it equals the derived one up to float32 rounding).
    ``tokens`` (this rank's input tokens of the step) is summed over ranks. Collective: every
    rank must call it (once).
    """
    totals = (sum(float(loss) for loss, _ in micro), float(tokens))
    block_size = micro[0][1].tokens.numel()
    sums, (loss_sum, all_tokens) = pool_sums([s for _, s in micro], block_size, device, totals=totals)
    out = sums.metrics(cfg)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    out["loss"] = loss_sum / (len(micro) * world)
    out["tokens"] = all_tokens  # input tokens of the step over all ranks
    return out


def pool_sums(
    parts: list[LossSums], block_size: int, device, *, totals: tuple[float, ...] = ()
) -> tuple[LossSums, list[float]]:
    """The sum of several batches' ``LossSums`` (this rank's, maybe none) over all ranks, in
    float64 (one all-reduce when torch.distributed is up; collective), and ``totals`` summed
    over ranks in the same all-reduce."""
    local = sum((p.detach() for p in parts), LossSums.zeros(block_size)).as_vector()
    vec = torch.cat([local, torch.tensor(totals, dtype=torch.float64)])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        vec = vec.to(device)
        torch.distributed.all_reduce(vec)
        vec = vec.cpu()
    n = local.numel()
    return LossSums.from_vector(vec[:n]), [float(x) for x in vec[n:]]
