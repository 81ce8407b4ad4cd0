"""Where every sample goes: parts, shards and token offsets, decided before any forward runs.

The plan is a pure function of the sample lengths and the dump params, so every worker (and
every resumed run) derives the same layout without coordination. Two rules shape it:

- part ``p`` gets the samples with ``index % num_parts == p``: parts are balanced and
  independent, so N workers write N parts with no merge step;
- no sample straddles a shard boundary: the token axis is padded with gap tokens (loss_mask 0,
  covered by no sample) instead. A shard is then a self-contained unit of writing and resume,
  and a sample's features can never come from two runs.

Inside a part, samples are packed longest-first (greedy fill from the long end, the remaining
room filled from the short end), which keeps gaps small and makes the samples of a shard come
out length-sorted, i.e. ready for padded batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def effective_sizes(shard_tokens: int, chunk_tokens: int, longest: int) -> tuple[int, int]:
    """(shard_tokens, chunk_tokens) actually used.

    A shard must hold the longest sample, and Zarr needs the shard to be a whole number of
    chunks; a chunk larger than the shard is pointless, so it is capped.
    """
    shard = max(shard_tokens, longest, 1)
    chunk = min(chunk_tokens, shard)
    shard = -(-shard // chunk) * chunk
    return shard, chunk


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``index`` of a part: token range ``[start, stop)`` holding sample rows ``[row_start, row_stop)``.

    ``[start, stop)`` is the whole shard (gaps included, clipped at the end of the token axis), so
    writing exactly that range is a whole-shard write.
    """

    index: int
    start: int
    stop: int
    row_start: int
    row_stop: int


@dataclass(frozen=True)
class PartPlan:
    """Layout of one part. Rows are the part's samples in token-axis order."""

    index: int
    source_index: np.ndarray  # int64 [N_p] row -> index in the prepared split
    sample_start: np.ndarray  # int64 [N_p] first token of the row on the part's token axis
    sample_length: np.ndarray  # int32 [N_p]
    shards: tuple[ShardPlan, ...]
    num_positions: int  # T: token-axis length including gaps (last shard is not padded)

    @property
    def name(self) -> str:
        return part_name(self.index)

    @property
    def num_samples(self) -> int:
        return len(self.source_index)

    @property
    def num_tokens(self) -> int:
        """Sample tokens (gaps excluded)."""
        return int(self.sample_length.sum())


def _pack(order: np.ndarray, lengths: np.ndarray, shard_tokens: int) -> list[np.ndarray]:
    """Split `order` (longest first) into shards: take from the long end, fill up from the short end."""
    shards: list[np.ndarray] = []
    head, tail = 0, len(order) - 1
    while head <= tail:
        room = shard_tokens
        taken: list[int] = []
        while head <= tail and lengths[order[head]] <= room:
            room -= int(lengths[order[head]])
            taken.append(order[head])
            head += 1
        while head <= tail and lengths[order[tail]] <= room:
            room -= int(lengths[order[tail]])
            taken.append(order[tail])
            tail -= 1
        if not taken:  # cannot happen when shard_tokens >= longest; guard against an endless loop
            raise ValueError(
                f"sample of length {int(lengths[order[head]])} exceeds shard_tokens={shard_tokens}"
            )
        members = np.asarray(taken, dtype=np.int64)
        # longest first, ties by prepared index: deterministic and batch-friendly
        shards.append(members[np.lexsort((members, -lengths[members]))])
    return shards


def plan_part(lengths: np.ndarray, num_parts: int, part_index: int, shard_tokens: int) -> PartPlan:
    """Plan part `part_index` of `num_parts` over a split with per-sample `lengths` (int [N])."""
    if not 0 <= part_index < num_parts:
        raise ValueError(f"part_index={part_index} must be in [0, num_parts={num_parts})")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.min() < 1:
        bad = int(np.argmin(lengths))
        raise ValueError(f"prepared sample {bad} has length {int(lengths[bad])}; samples must be non-empty")
    mine = np.arange(part_index, len(lengths), num_parts, dtype=np.int64)
    order = mine[np.lexsort((mine, -lengths[mine]))]
    starts, rows, shard_plans = [], [], []
    row = 0
    for s, members in enumerate(_pack(order, lengths, shard_tokens)):
        offsets = s * shard_tokens + np.concatenate([[0], np.cumsum(lengths[members])[:-1]])
        starts.append(offsets)
        rows.append(members)
        # every shard spans its full width except the last, which ends at its last sample
        shard_plans.append(ShardPlan(s, s * shard_tokens, (s + 1) * shard_tokens, row, row + len(members)))
        row += len(members)
    if shard_plans:
        last = shard_plans[-1]
        end = int(starts[-1][-1] + lengths[rows[-1][-1]])
        shard_plans[-1] = ShardPlan(last.index, last.start, end, last.row_start, last.row_stop)
    source = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return PartPlan(
        index=part_index,
        source_index=source.astype(np.int64),
        sample_start=(np.concatenate(starts) if starts else np.zeros(0)).astype(np.int64),
        sample_length=lengths[source].astype(np.int32),
        shards=tuple(shard_plans),
        num_positions=shard_plans[-1].stop if shard_plans else 0,
    )
