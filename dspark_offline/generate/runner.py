"""`dspark-offline generate`: the target answers the training prompts itself (on-policy data).

    prepared train split -> first-turn prompts (bad ones skipped and counted)
      -> length-sorted chunks of `chunk_samples` prompts (each saved when done: the resume unit)
      -> batched KV-cached decoding that drops finished rows (`decode.py`)
      -> samples = prompt + answer, loss mask on the answer only -> `write_prepared`

First-turn rule: a prompt is the prepared sample up to its first supervised token, i.e. the
conversation up to and including the first assistant header (`data/prompts.py`, the rule
`evaluate` uses). Later turns are dropped: their user messages answer a reply the target never
wrote. The answer keeps the token that stopped it (EOS / end-of-turn / a `stop_tokens` entry)
and is supervised up to and including it; whatever the template appends after the end-of-turn
token (ChatML's "\\n") is not added. An answer cut by `max_new_tokens`, or where prompt + answer
reach `prepare.max_length`, is kept and counted as truncated.

The output is the prepared-data format (`data/prepared.py`) at `generate.output`, so `dump` reads
it unchanged; `sample_ids` and `source_ids` stay the prepared ones (skipped prompts are absent).
The eval split is copied byte for byte from `prepare.output`: it is never regenerated and
`evaluate` keeps reading it from there. With `generate.enabled: false` only a marker file is
written and `dump` reads `prepare.output` (`Params.train_data_dir`).

Determinism: greedy decoding is deterministic for a given batch layout; at T > 0 each prompt draws
from its own generator seeded with (seed, sample_id). Chunks and batches are fixed by the inputs,
so a resumed run writes exactly the bytes of an uninterrupted one.

Tiny CPU run: `dspark-offline generate --max-new-tokens 16 -S prepare.num_samples=8` after prepare.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from dspark_offline import __version__
from dspark_offline.config import Params
from dspark_offline.data.prepared import PreparedSplit, SplitArrays, write_prepared
from dspark_offline.data.prompts import prompt_from_sample
from dspark_offline.generate.chunks import ChunkDir, ChunkResult
from dspark_offline.generate.engine import make_engine
from dspark_offline.generate.report import GenerateTally
from dspark_offline.generate.stops import StopIds, resolve_stop_ids
from dspark_offline.outputs import check_output_dir
from dspark_offline.target.fingerprint import tokenizer_hashes, weights_hash

DISABLED_MARKER = "disabled.json"


class GenerateError(ValueError):
    """Generation cannot produce a usable data set (every prompt bad, wrong tokenizer, ...)."""


def _say(msg: str) -> None:
    tqdm.write(f"[generate] {msg}", file=sys.stderr)


@dataclass
class PromptPlan:
    rows: np.ndarray  # int64 [n] usable rows of the train split, longest prompt first
    prompts: dict[int, np.ndarray]  # row -> prompt ids int32 [P]
    budgets: dict[int, int]  # row -> max answer tokens
    tally: GenerateTally  # skipped prompts already counted


def plan_prompts(
    split: PreparedSplit, max_new_tokens: int, max_length: int, max_positions: int
) -> PromptPlan:
    """Cut every sample's first-turn prompt; skip (and count) the ones that cannot be answered."""
    tally = GenerateTally()
    prompts: dict[int, np.ndarray] = {}
    budgets: dict[int, int] = {}
    for row in range(len(split)):
        ids, mask = split[row]
        sid = int(split.sample_ids[row])
        prompt = prompt_from_sample(ids, mask)
        if prompt is None:
            tally.skip("no_supervised_token" if not mask.any() else "empty_prompt", sid)
        elif len(prompt) >= max_length:
            tally.skip("prompt_too_long", sid)
        elif max_positions and len(prompt) + max_new_tokens > max_positions:
            tally.skip("exceeds_target_positions", sid)
        else:
            prompts[row] = prompt
            budgets[row] = min(max_new_tokens, max_length - len(prompt))
    rows = np.array(sorted(prompts, key=lambda r: (-len(prompts[r]), r)), dtype=np.int64)
    return PromptPlan(rows, prompts, budgets, tally)


def _stop_reason(tokens: list[int], budget: int, max_new_tokens: int, stops: StopIds) -> str:
    if tokens[-1] in stops.eos:
        return "eos"
    if tokens[-1] in stops.extra:
        return "stop_token"
    return "max_new_tokens" if budget == max_new_tokens else "max_length"


@dataclass
class _Progress:
    """The tqdm bar (prompts done, ETA) with the generated tokens/s of this run as postfix."""

    bar: tqdm
    t0: float
    generated: int = 0

    def step(self, new_tokens: int, finished: int) -> None:
        self.generated += new_tokens
        rate = self.generated / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
        self.bar.update(finished)


def _generate_chunk(
    engine, split, plan: PromptPlan, rows: np.ndarray, stops: StopIds, params: Params, progress: _Progress
) -> ChunkResult:
    """Answer the prompts of one chunk (rows in length order) and classify why each answer ended."""
    rows_list = [int(r) for r in rows]
    outs = engine.generate(
        [plan.prompts[r] for r in rows_list],
        [plan.budgets[r] for r in rows_list],
        [int(split.sample_ids[r]) for r in rows_list],
        stops.all,
        on_step=progress.step,
    )
    return ChunkResult(
        rows=rows.astype(np.int64),
        tokens=[np.asarray(out, dtype=np.int32) for out in outs],
        stops=[
            _stop_reason(out, plan.budgets[r], params.generate.max_new_tokens, stops)
            for r, out in zip(rows_list, outs)
        ],
    )


def _check_replaceable(out: Path) -> None:
    """The output is replaced whole: refuse anything that is not an earlier output of this stage."""
    if not out.exists():
        return
    ours = out.is_dir() and (
        not any(out.iterdir()) or (out / "meta.json").is_file() or (out / DISABLED_MARKER).is_file()
    )
    if not ours:
        raise GenerateError(
            f"generate.output={str(out)!r} exists and is not a generate output (no meta.json or "
            f"{DISABLED_MARKER}); refusing to replace it: choose another generate.output"
        )


def _write_disabled(out: Path, params: Params) -> Path:
    """generate.enabled is false: a marker (so DVC has its output) and nothing else."""
    _check_replaceable(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    note = {
        "enabled": False,
        "note": "generate.enabled is false: dump reads prepare.output; nothing was generated",
        "prepare_output": params.prepare.output,
    }
    (tmp / DISABLED_MARKER).write_text(json.dumps(note, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _say(f"generate.enabled is false: wrote only {out / DISABLED_MARKER}; dump reads {params.prepare.output}")
    return out


def _assemble(split: PreparedSplit, plan: PromptPlan, results: dict[int, ChunkResult]) -> SplitArrays:
    """Samples in prepared order: prompt + answer, loss mask 1 on the answer (stop token included);
    counts every kept sample into `plan.tally`."""
    answers = {int(r): (t, s) for res in results.values() for r, t, s in zip(res.rows, res.tokens, res.stops)}
    ids, masks, sample_ids, source_ids = [], [], [], []
    for row in range(len(split)):
        if row not in answers:  # a skipped prompt
            continue
        prompt, (tokens, stop) = plan.prompts[row], answers[row]
        ids.append(np.concatenate([prompt, tokens]).astype(np.int32))  # [P + G]
        masks.append(np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(tokens), np.uint8)]))
        sample_ids.append(int(split.sample_ids[row]))
        source_ids.append(split.source_ids[row])
        plan.tally.add(len(prompt), len(tokens), stop)
    return SplitArrays.from_samples(ids, masks, sample_ids, source_ids)


def run(params: Params) -> Path:
    """Generate the on-policy training data of `params.prepare.output` into `params.generate.output`."""
    cfg = params.generate
    out = Path(cfg.output)
    check_output_dir(out, "generate.output", replaced_whole=True)
    if not cfg.enabled:
        return _write_disabled(out, params)
    _check_replaceable(out)
    source = params.prepare.output
    train = PreparedSplit.load(source, "train")
    evaluation = PreparedSplit.load(source, "eval")
    vllm_kwargs = params.dump.vllm.engine_kwargs() if params.dump.backend == "vllm" else None
    engine = make_engine(params.target, cfg, params.dump.backend, vllm_kwargs, params.prepare.max_length)
    tok_hash, template_hash = tokenizer_hashes(engine.tokenizer)
    for key, ours in (("tokenizer_hash", tok_hash), ("chat_template_hash", template_hash)):
        theirs = train.meta.get(key)
        if theirs is not None and theirs != ours:
            raise GenerateError(
                f"{source}/meta.json: {key}={theirs} but the target {engine.path} has {key}={ours}; "
                "re-run prepare with this target's tokenizer"
            )
    stops = resolve_stop_ids(engine.eos_ids, engine.tokenizer, cfg.stop_tokens, engine.vocab_size)
    max_length = params.prepare.max_length
    plan = plan_prompts(train, cfg.max_new_tokens, max_length, engine.max_positions)
    if not len(plan.rows):
        raise GenerateError(
            f"{source}/train: none of the {len(train)} samples has a usable prompt "
            f"(max_new_tokens={cfg.max_new_tokens}, prepare.max_length={max_length}, "
            f"target max_position_embeddings={engine.max_positions}):\n{plan.tally.skip_table()}"
        )
    # Everything that decides the generated tokens: chunks saved under another fingerprint are discarded.
    fields = {
        "source_fingerprint": train.fingerprint,
        "target_weights_hash": weights_hash(engine.path),
        "tokenizer_hash": tok_hash,
        "engine": engine.name,
        "dtype": engine.dtype,
        "device": engine.device,
        "generate": cfg.model_dump(mode="json", exclude={"enabled", "output"}),
        "max_length": max_length,
        "stop_ids": {"eos": sorted(stops.eos), "extra": sorted(stops.extra)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    chunks = ChunkDir(out, fields, say=_say)
    C = cfg.chunk_samples
    planned = [plan.rows[k : k + C] for k in range(0, len(plan.rows), C)]  # longest prompts first
    results: dict[int, ChunkResult] = {}
    for k in chunks.done():
        saved = chunks.load(k) if k < len(planned) else None
        if saved is not None and np.array_equal(saved.rows, planned[k]):
            results[k] = saved
    pending = [k for k in range(len(planned)) if k not in results]
    _say(
        f"target {engine.path}: {engine.describe}; stop ids {sorted(stops.eos)} "
        f"+ extra {sorted(stops.extra)}; T={cfg.temperature} top_p={cfg.top_p} "
        f"max_new_tokens={cfg.max_new_tokens} (prompt + answer <= prepare.max_length={max_length})"
    )
    _say(
        f"{len(train)} training samples -> {len(plan.rows)} first-turn prompts "
        f"({plan.tally.num_skipped} skipped), {sum(len(p) for p in plan.prompts.values())} prompt tokens; "
        f"{len(planned)} chunk(s) of {C}: {len(results)} done before, {len(pending)} to go"
    )
    t0 = time.perf_counter()
    with tqdm(
        total=sum(len(planned[k]) for k in pending), desc="generate", unit="prompt", file=sys.stderr
    ) as bar:
        progress = _Progress(bar, t0)
        for k in pending:
            results[k] = _generate_chunk(engine, train, plan, planned[k], stops, params, progress)
            chunks.save(k, results[k])
    elapsed = time.perf_counter() - t0

    tally = plan.tally
    splits = {
        "train": _assemble(train, plan, results),
        "eval": evaluation.arrays,  # copied unchanged: never regenerated, never trained on
    }
    report = tally.to_dict()
    inherited = {
        k: v for k, v in train.meta.items() if k not in ("format", "format_version", "splits", "fingerprint")
    }
    meta = dict(
        inherited,
        max_length=max_length,
        generated={
            "rule": "first turn: prompt = sample up to its first supervised token; answer by the target",
            "target": params.target.path,
            "target_weights_hash": fields["target_weights_hash"],
            "engine": engine.name,
            "dtype": engine.dtype,
            "params": fields["generate"],
            "stop_ids": fields["stop_ids"],
            "source": {"path": str(source), "fingerprint": train.fingerprint},
            "counts": {k: report[k] for k in ("samples", "prompt_tokens", "generated_tokens", "truncated")}
            | {"skipped": tally.num_skipped, "stop_reasons": report["stop_reasons"]},
            "created_by": f"dspark-offline {__version__}",
        },
    )
    meta = write_prepared(out, splits, meta, report)
    chunks.remove()
    if progress.generated:
        rate = progress.generated / max(elapsed, 1e-9)
        _say(f"generated {progress.generated} tokens in {elapsed:.1f}s ({rate:.1f} tok/s)")
    _say(tally.summary())
    _say(f"skipped prompts:\n{tally.skip_table()}")
    _say(f"wrote {out} (fingerprint {meta['fingerprint']}; eval split copied from {source})")
    return out
