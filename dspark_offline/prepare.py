"""`dspark-offline prepare`: conversations -> chat-template tokens + loss mask, written once.

The story: resolve the source -> read validated conversations into a pool (bad records are
skipped and counted per reason) -> shuffle the pool with `seed` -> render and tokenise in
that order until enough samples survive -> split eval / train -> write atomically -> print
what was derived and the skip table.

Selection rule (deterministic for a given source file + params):
  * the pool is the first `max_records` records of the file when `max_records` is set,
    otherwise the first POOL_FACTOR x (num_samples + num_eval_samples) *valid*
    conversations (reading stops there; a 4x pool leaves room for samples lost to
    truncation and gives a shuffled, not head-of-file, selection);
  * `numpy.random.default_rng(seed).permutation(len(pool))` orders the pool; samples are
    rendered in that order until num_samples + num_eval_samples survive;
  * the first num_eval_samples survivors are the eval split, the rest the train split
    (disjoint by construction). If fewer survive, eval keeps its share in proportion
    (at least one when two or more survive) and a `FewerSamplesWarning` is raised;
  * `sample_ids` number the prepared data set: train 0..N-1, then eval N..N+E-1.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dspark_offline.config import Params
from dspark_offline.data.errors import EmptySelectionError
from dspark_offline.data.prepared import SplitArrays, write_prepared
from dspark_offline.data.render import RenderSkip, load_tokenizer, render_conversation
from dspark_offline.data.skips import REASONS, SkipLog
from dspark_offline.data.sources import SourceStats, detect_container, read_conversations, resolve_source
from dspark_offline.outputs import check_output_dir
from dspark_offline.target.embedded import resolve_target_path
from dspark_offline.target.fingerprint import tokenizer_hashes

POOL_FACTOR = 4


class FewerSamplesWarning(UserWarning):
    """Fewer samples survived than `num_samples + num_eval_samples` asked for."""


def _split_counts(survived: int, num_samples: int, num_eval: int) -> tuple[int, int]:
    """(train, eval) sizes; eval keeps its proportional share when too few samples survive."""
    if survived >= num_samples + num_eval:
        return num_samples, num_eval
    n_eval = (survived * num_eval) // (num_samples + num_eval)
    if num_eval and survived >= 2:
        n_eval = max(n_eval, 1)
    return survived - n_eval, n_eval


def run(params: Params) -> Path:
    cfg = params.prepare
    check_output_dir(cfg.output, "prepare.output", replaced_whole=True)
    path = resolve_source(cfg.source)
    stats = SourceStats(path=str(path), container=detect_container(path))
    tokenizer = load_tokenizer(resolve_target_path(params.target.path, params.target.cache_dir))
    skips = SkipLog()
    wanted = cfg.num_samples + cfg.num_eval_samples
    max_valid = None if cfg.max_records is not None else POOL_FACTOR * wanted

    reader = read_conversations(
        path, cfg.format, skips, stats, max_records=cfg.max_records, max_valid=max_valid
    )
    pool = list(tqdm(reader, desc="prepare: read", unit=" conv", total=max_valid, file=sys.stderr))
    if not pool:
        raise EmptySelectionError(
            f"{path}: no usable conversation among {stats.records_read} records\n{skips.table()}"
        )

    # Render in seeded order until enough samples survive (tokenising the whole pool is wasted work).
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    survivors = []
    truncated = tokenised = 0
    with tqdm(total=wanted, desc="prepare: tokenise", unit=" sample", file=sys.stderr) as bar:
        for j in order:
            conv = pool[int(j)]
            tokenised += 1
            try:
                sample = render_conversation(tokenizer, conv.messages, cfg.max_length)
            except RenderSkip as skip:
                skips.add(skip.reason, conv.where, conv.id, skip.detail)
                continue
            truncated += sample.full_length > cfg.max_length
            survivors.append((conv, sample))
            bar.update(1)
            if len(survivors) == wanted:
                break

    n_train, n_eval = _split_counts(len(survivors), cfg.num_samples, cfg.num_eval_samples)
    if n_train == 0:
        raise EmptySelectionError(
            f"{path}: no training sample survived ({len(survivors)} survived of {len(pool)} valid "
            f"conversations)\n{skips.table()}"
        )
    problems = []
    if len(survivors) < wanted:
        problems.append(
            f"only {len(survivors)} samples survived of {wanted} requested "
            f"(train {n_train}/{cfg.num_samples}, eval {n_eval}/{cfg.num_eval_samples}); "
            "writing what exists — raise max_records or use a larger source"
        )
        warnings.warn(problems[-1], FewerSamplesWarning, stacklevel=2)

    eval_part, train_part = survivors[:n_eval], survivors[n_eval:]
    splits = {
        "train": SplitArrays.from_samples(
            [s.input_ids for _, s in train_part],
            [s.loss_mask for _, s in train_part],
            list(range(n_train)),
            [c.id for c, _ in train_part],
        ),
        "eval": SplitArrays.from_samples(
            [s.input_ids for _, s in eval_part],
            [s.loss_mask for _, s in eval_part],
            list(range(n_train, n_train + n_eval)),
            [c.id for c, _ in eval_part],
        ),
    }
    tok_hash, template_hash = tokenizer_hashes(tokenizer)  # what dump compares with the target's
    meta = {
        "source": cfg.source,
        "source_file": path.name,
        "source_format": cfg.format,
        "container": stats.container,
        "target": params.target.path,
        "tokenizer_hash": tok_hash,
        "chat_template_hash": template_hash,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "requested": {"train": cfg.num_samples, "eval": cfg.num_eval_samples},
        "selection": {
            "max_records": cfg.max_records,
            "pool_factor": None if cfg.max_records is not None else POOL_FACTOR,
            "pool_size": len(pool),
        },
    }
    report = {
        "source_path": str(path),
        "container": stats.container,
        "records_read": stats.records_read,
        "valid_conversations": stats.valid,
        "truncated_tail": stats.truncated_tail,
        "truncated_at_char": stats.truncated_at_char,
        "stopped_early": stats.stopped_early,
        "dropped_trailing_user_turns": stats.dropped_trailing_user_turns,
        "pool_size": len(pool),
        "tokenised": tokenised,
        "samples_truncated_to_max_length": int(truncated),
        "kept": {"train": n_train, "eval": n_eval},
        "skipped": skips.to_dict(),
        "reasons": {r: REASONS[r] for r in skips.counts},
        "warnings": problems,
    }
    out = Path(cfg.output)
    meta = write_prepared(out, splits, meta, report)
    _print_summary(out, stats, len(pool), tokenised, int(truncated), meta, skips)
    for problem in problems:  # again after the tables, where it cannot be missed
        print(f"[prepare] WARNING: {problem}", file=sys.stderr)
    return out


def _print_summary(
    out: Path, stats: SourceStats, pool: int, tokenised: int, truncated: int, meta: dict, skips: SkipLog
) -> None:
    tail = f", truncated tail at char {stats.truncated_at_char} (ignored)" if stats.truncated_tail else ""
    early = ", stopped early (enough for the selection)" if stats.stopped_early else ""
    print(
        f"[prepare] source {stats.path} ({stats.container}): {stats.records_read} records read{tail}{early}"
    )
    print(
        f"[prepare] {stats.valid} valid conversations, pool {pool}, tokenised {tokenised}, "
        f"{truncated} truncated to max_length={meta['max_length']}, "
        f"{stats.dropped_trailing_user_turns} trailing user turns dropped"
    )
    for name in ("train", "eval"):
        c = meta["splits"][name]
        print(
            f"[prepare] {name:5s}: {c['samples']} samples, {c['tokens']} tokens, "
            f"{c['supervised_tokens']} supervised, mean length {c['mean_length']}"
        )
    print(f"[prepare] skipped {skips.total} records:\n{skips.table()}")
    print(f"[prepare] wrote {out} (fingerprint {meta['fingerprint']})")
