"""`dspark-offline evaluate`: real speculative decoding with the HF target and an exported drafter.

Story: load target and drafter -> held-out prompts -> per prompt, the plain target decode (speed
baseline and, at T = 0, the losslessness reference) and the speculative decode -> at T = 0
check token-for-token equality (raises on a mismatch) -> write metrics JSON + per-slot TSV.

Tiny CPU run: ``dspark-offline evaluate --set evaluate.num_prompts=2 --set
evaluate.max_new_tokens=16`` after `export`. Both decodes run in fp32 on CPU (target.dtype auto).
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from dspark_offline.config import Params
from dspark_offline.evaluate.drafter import load_drafter
from dspark_offline.evaluate.lossless import check_lossless
from dspark_offline.evaluate.prompts import load_prompts
from dspark_offline.evaluate.report import EvalTally, write_metrics, write_per_slot
from dspark_offline.evaluate.speculative import speculative_decode
from dspark_offline.evaluate.target import load_target, target_decode


class PromptTooLongError(ValueError):
    """A prompt plus the generation budget does not fit the target's positions."""


def run(params: Params) -> dict:
    cfg = params.evaluate
    drafter_dir = cfg.drafter or params.export.output
    target = load_target(params.target)
    drafter = load_drafter(drafter_dir, target.model)
    prompts, skipped = load_prompts(params.prepare.output, cfg.num_prompts)
    max_pos = int(getattr(target.model.config, "max_position_embeddings", 0) or 0)
    print(
        f"[evaluate] target {target.path} ({next(target.model.parameters()).dtype}, "
        f"{next(target.model.parameters()).device}), drafter {drafter_dir} "
        f"(block {drafter.block_size}, layers {drafter.layer_ids}); {len(prompts)} prompts "
        f"({skipped} eval samples without a prompt skipped), max_new_tokens={cfg.max_new_tokens}, "
        f"T={cfg.temperature}, confidence_threshold={cfg.confidence_threshold}"
    )
    for prompt in prompts:  # fail before any decoding, naming the prompt
        need = len(prompt.ids) + cfg.max_new_tokens + drafter.block_size
        if max_pos and need > max_pos:
            raise PromptTooLongError(
                f"eval prompt {prompt.index} (sample_id {prompt.sample_id}): {len(prompt.ids)} prompt tokens "
                f"+ max_new_tokens {cfg.max_new_tokens} + block {drafter.block_size} > target "
                f"max_position_embeddings {max_pos}"
            )
    spec_kwargs = {
        "max_new_tokens": cfg.max_new_tokens,
        "stop_ids": target.stop_ids,
        "temperature": cfg.temperature,
        "confidence_threshold": cfg.confidence_threshold,
    }
    # Warm-up (first-call allocations / kernel selection) so neither timed path pays for it.
    first = prompts[0].ids
    target_decode(target.model, first, 2, target.stop_ids)
    speculative_decode(target.model, drafter, first, **{**spec_kwargs, "max_new_tokens": 2})

    dtype = next(target.model.parameters()).dtype
    hint = (
        f"; the target runs in {dtype}, where a near-tie can flip between a multi-token and a "
        "single-token forward: re-run with target.dtype=float32 to tell numerics from a bug"
        if dtype != torch.float32
        else ""
    )
    spec_gen = torch.Generator().manual_seed(cfg.seed)
    target_gen = torch.Generator().manual_seed(cfg.seed + 1)
    tally = EvalTally(drafter.block_size)
    bar = tqdm(prompts, desc="evaluate", unit="prompt")
    for prompt in bar:
        t0 = time.perf_counter()
        reference = target_decode(
            target.model, prompt.ids, cfg.max_new_tokens, target.stop_ids, cfg.temperature, target_gen
        )
        t1 = time.perf_counter()
        spec = speculative_decode(target.model, drafter, prompt.ids, generator=spec_gen, **spec_kwargs)
        t2 = time.perf_counter()
        if cfg.temperature == 0:
            check_lossless(prompt.index, prompt.sample_id, reference, spec.tokens, hint)
        tally.add_prompt(spec.rounds, len(spec.tokens), t2 - t1, len(reference), t1 - t0)
        bar.set_postfix(tau=f"{tally.committed / max(tally.rounds, 1):.2f}")

    metrics = tally.metrics()
    metrics.update(
        lossless=True if cfg.temperature == 0 else None,  # None: not checkable by sampling
        temperature=cfg.temperature,
        confidence_threshold=cfg.confidence_threshold,
        block_size=drafter.block_size,
        max_new_tokens=cfg.max_new_tokens,
        prompts_skipped=skipped,
    )
    write_metrics(metrics, cfg.output)
    write_per_slot(tally, cfg.per_slot_output)
    print(
        f"[evaluate] tau={metrics['tau']:.3f} accepted {tally.accepted}/{tally.proposed} draft tokens; "
        f"{metrics['ms_per_token_spec']:.1f} ms/token speculative vs {metrics['ms_per_token_target']:.1f} "
        f"target (x{metrics['speedup']:.2f}) -> {cfg.output}, {cfg.per_slot_output}"
    )
    return metrics
