"""Decoding engines of the generate stage: HF transformers (default) and vLLM (`vllm_engine.py`).

An engine loads the target once and answers a list of prompts:
``engine.generate(prompts, budgets, sample_ids, on_step) -> list[list[int]]`` (new tokens per
prompt, stop token included), plus what the runner needs to know about the target
(``tokenizer``, ``path``, ``eos_ids``, ``vocab_size``, ``max_positions``, ``describe``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dspark_offline.config import GenerateConfig, TargetConfig
from dspark_offline.generate.decode import decode_batch


def row_generator(seed: int, sample_id: int) -> torch.Generator:
    """The sampling generator of one prompt: depends on (seed, sample_id) only."""
    state = np.random.SeedSequence([seed, sample_id]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class HFEngine:
    """The target through HF transformers, decoded with `decode.decode_batch` in batches of
    `generate.batch_size` consecutive prompts (the runner hands them over length-sorted)."""

    name = "hf"

    def __init__(self, target_cfg: TargetConfig, cfg: GenerateConfig):
        from dspark_offline.target.loader import load_target

        self.cfg = cfg
        target = load_target(target_cfg)
        self.model, self.tokenizer, self.path = target.model, target.tokenizer, target.path
        self.eos_ids = target.stop_ids
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        param = next(self.model.parameters())
        self.dtype, self.device = str(param.dtype).removeprefix("torch."), param.device.type
        self.describe = f"HF transformers, {self.dtype} on {param.device}, batch {cfg.batch_size}"

    def generate(
        self,
        prompts: Sequence[np.ndarray],
        budgets: Sequence[int],
        sample_ids: Sequence[int],
        stop_ids: frozenset[int],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        cfg = self.cfg
        pad = self.tokenizer.pad_token_id
        pad = int(pad) if pad is not None else min(stop_ids)  # masked out: any id works
        out: list[list[int]] = []
        for start in range(0, len(prompts), cfg.batch_size):
            stop = min(start + cfg.batch_size, len(prompts))
            gens = (
                [row_generator(cfg.seed, int(s)) for s in sample_ids[start:stop]]
                if cfg.temperature > 0
                else None
            )
            out += decode_batch(
                self.model,
                [torch.from_numpy(np.asarray(p, dtype=np.int64)) for p in prompts[start:stop]],
                list(budgets[start:stop]),
                stop_ids,
                pad,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                generators=gens,
                on_step=on_step,
            )
        return out


def make_engine(
    target_cfg: TargetConfig,
    cfg: GenerateConfig,
    backend: str,
    vllm_kwargs: dict | None = None,
    max_length: int | None = None,
):
    """`dump.backend` picks the engine: the same backend the dump runs on. The vLLM engine also
    takes the `dump.vllm` settings (``vllm_kwargs``) and sizes its context to ``max_length``
    (prompt + answer, `prepare.max_length`) unless they set ``max_model_len``."""
    if backend == "vllm":
        from dspark_offline.generate.vllm_engine import VLLMEngine

        return VLLMEngine(target_cfg, cfg, vllm_kwargs, max_length)
    return HFEngine(target_cfg, cfg)
