"""`dspark-offline evaluate`: real speculative decoding with the HF target and an exported drafter,
beside the no-training prompt-lookup baseline (and optionally a second drafter).

Story: load target and decoders (the drafter, prompt lookup, ``evaluate.compare``) -> check each
drafter still belongs to the target (weights hash, layer spot check: `provenance`) -> held-out
prompts -> per prompt, the plain target decode once (speed baseline and, at T = 0, the
losslessness reference), then every decoder through the same verification loop -> at T = 0
check each decoder token for token (raises on a mismatch) -> τ with paired bootstrap intervals
-> write metrics JSON, per-slot TSV and per-prompt TSV.

Tiny CPU run: ``dspark-offline evaluate --set evaluate.num_prompts=2 --set
evaluate.max_new_tokens=16`` after `export`. All decodes run in fp32 on CPU (target.dtype auto).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dspark_offline.config import Params
from dspark_offline.evaluate.drafter import load_drafter
from dspark_offline.evaluate.lossless import check_lossless
from dspark_offline.evaluate.prompt_lookup import PromptLookupDrafter
from dspark_offline.evaluate.prompts import load_prompts
from dspark_offline.evaluate.proposal import Drafter
from dspark_offline.evaluate.provenance import check_drafter
from dspark_offline.evaluate.report import (
    COMPARE,
    DRAFTER,
    PROMPT_LOOKUP,
    EvalTally,
    evaluation_metrics,
    format_summary,
    write_metrics,
    write_per_prompt,
    write_per_slot,
)
from dspark_offline.evaluate.speculative import speculative_decode
from dspark_offline.evaluate.target import target_decode
from dspark_offline.outputs import check_output_file
from dspark_offline.target.loader import load_target


class PromptTooLongError(ValueError):
    """A prompt plus the generation budget does not fit the target's positions."""


class FewerPromptsWarning(UserWarning):
    """The eval split has fewer usable prompts than `evaluate.num_prompts` asks for."""


@dataclass
class Decoder:
    """One way of proposing drafts, run through the shared verification loop."""

    name: str  # DRAFTER | PROMPT_LOOKUP | COMPARE
    drafter: Drafter
    tally: EvalTally
    generator: torch.Generator  # its own stream, so adding a decoder never changes another's samples


def _decoders(params: Params, model: torch.nn.Module) -> list[Decoder]:
    cfg = params.evaluate
    drafter = load_drafter(cfg.drafter or params.export.output, model)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    made: list[tuple[str, Drafter]] = [
        (DRAFTER, drafter),
        (PROMPT_LOOKUP, PromptLookupDrafter(drafter.block_size, vocab)),
    ]
    if cfg.compare is not None:
        made.append((COMPARE, load_drafter(cfg.compare, model)))
    seeds = {DRAFTER: cfg.seed, PROMPT_LOOKUP: cfg.seed + 2, COMPARE: cfg.seed + 3}  # target: seed + 1
    return [
        Decoder(name, d, EvalTally(d.block_size), torch.Generator().manual_seed(seeds[name]))
        for name, d in made
    ]


def run(params: Params) -> dict:
    cfg = params.evaluate
    # every output is checked before the target loads: a read-only directory must not cost a full decode
    for what in ("output", "per_slot_output", "per_prompt_output"):
        check_output_file(getattr(cfg, what), f"evaluate.{what}")
    target = load_target(params.target)
    decoders = _decoders(params, target.model)
    for drafter_dir in [cfg.drafter or params.export.output, *([cfg.compare] if cfg.compare else [])]:
        for line in check_drafter(
            drafter_dir, target, allow_changed_weights=params.target.allow_changed_weights
        ):
            print(f"[evaluate] {line}")
    prompts, skipped = load_prompts(params.prepare.output, cfg.num_prompts)
    param = next(target.model.parameters())
    drafter = decoders[0].drafter
    print(
        f"[evaluate] target {target.path} ({param.dtype}, {param.device}), drafter "
        f"{cfg.drafter or params.export.output} (block {drafter.block_size}, layers {drafter.layer_ids}), "
        f"baseline prompt lookup (n <= 3, up to {drafter.block_size} tokens)"
        + (f", compare {cfg.compare}" if cfg.compare else "")
        + f"; {len(prompts)} prompts ({skipped} eval samples without a prompt skipped), "
        f"max_new_tokens={cfg.max_new_tokens}, T={cfg.temperature}, "
        f"confidence_threshold={cfg.confidence_threshold}"
    )
    shortfall = cfg.num_prompts - len(prompts)
    notes = []  # eval.json "warnings", first key of the file
    if shortfall:
        notes.append(
            f"evaluate.num_prompts={cfg.num_prompts} but {params.prepare.output}/eval has only "
            f"{len(prompts)} usable prompts: every result below is over {len(prompts)} prompts (raise "
            "prepare.num_eval_samples and re-run prepare)"
        )
        warnings.warn(notes[-1], FewerPromptsWarning, stacklevel=2)
    _check_lengths(prompts, cfg.max_new_tokens, max(d.drafter.block_size for d in decoders), target.model)

    spec_kwargs = {
        "max_new_tokens": cfg.max_new_tokens,
        "stop_ids": target.stop_ids,
        "temperature": cfg.temperature,
        "confidence_threshold": cfg.confidence_threshold,
    }
    # Warm-up (first-call allocations / kernel selection) so no timed path pays for it.
    first = prompts[0].ids
    target_decode(target.model, first, 2, target.stop_ids)
    for dec in decoders:
        speculative_decode(target.model, dec.drafter, first, **{**spec_kwargs, "max_new_tokens": 2})

    hint = (
        f"; the target runs in {param.dtype}, where a near-tie can flip between a multi-token and a "
        "single-token forward: re-run with target.dtype=float32 to tell numerics from a bug"
        if param.dtype != torch.float32
        else ""
    )
    target_gen = torch.Generator().manual_seed(cfg.seed + 1)
    target_tokens: list[int] = []
    target_seconds = 0.0
    bar = tqdm(prompts, desc="evaluate", unit="prompt")
    for prompt in bar:
        t0 = time.perf_counter()
        reference = target_decode(
            target.model, prompt.ids, cfg.max_new_tokens, target.stop_ids, cfg.temperature, target_gen
        )
        target_seconds += time.perf_counter() - t0
        target_tokens.append(len(reference))
        for dec in decoders:
            t0 = time.perf_counter()
            spec = speculative_decode(
                target.model, dec.drafter, prompt.ids, generator=dec.generator, **spec_kwargs
            )
            seconds = time.perf_counter() - t0
            if cfg.temperature == 0:
                check_lossless(prompt.index, prompt.sample_id, reference, spec.tokens, hint, decoder=dec.name)
            dec.tally.add_prompt(spec.rounds, len(spec.tokens), seconds)
        bar.set_postfix({d.name: f"{d.tally.committed / max(d.tally.rounds, 1):.2f}" for d in decoders})

    tallies = {d.name: d.tally for d in decoders}
    metrics = {"warnings": notes} | evaluation_metrics(
        tallies, sum(target_tokens), target_seconds, resamples=cfg.bootstrap_resamples, seed=cfg.seed
    )
    metrics.update(
        lossless=True if cfg.temperature == 0 else None,  # None: not checkable by sampling
        temperature=cfg.temperature,
        confidence_threshold=cfg.confidence_threshold,
        block_size=drafter.block_size,
        max_new_tokens=cfg.max_new_tokens,
        num_prompts=len(prompts),
        num_prompts_requested=cfg.num_prompts,
        prompts_shortfall=shortfall,  # > 0: fewer usable prompts than asked (also warned)
        prompts_skipped=skipped,
        drafter=cfg.drafter or params.export.output,
    )
    if cfg.compare is not None:
        metrics[COMPARE]["drafter"] = cfg.compare
    write_metrics(metrics, cfg.output)
    write_per_slot(tallies[DRAFTER], tallies[PROMPT_LOOKUP], cfg.per_slot_output)
    write_per_prompt(prompts, target_tokens, tallies, cfg.per_prompt_output)
    for line in format_summary(metrics):
        print(f"[evaluate] {line}")
    if shortfall:
        print(
            f"[evaluate] WARNING: {len(prompts)} prompts, {shortfall} fewer than "
            f"evaluate.num_prompts={cfg.num_prompts}"
        )
    print(f"[evaluate] -> {cfg.output}, {cfg.per_slot_output}, {cfg.per_prompt_output}")
    return metrics


def _check_lengths(prompts: list, max_new_tokens: int, block_size: int, model: torch.nn.Module) -> None:
    """Fail before any decoding, naming the prompt, when a prompt cannot be decoded in full."""
    max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    for prompt in prompts:
        need = len(prompt.ids) + max_new_tokens + block_size
        if max_pos and need > max_pos:
            raise PromptTooLongError(
                f"eval prompt {prompt.index} (sample_id {prompt.sample_id}): {len(prompt.ids)} prompt tokens "
                f"+ max_new_tokens {max_new_tokens} + block {block_size} > target "
                f"max_position_embeddings {max_pos}"
            )
