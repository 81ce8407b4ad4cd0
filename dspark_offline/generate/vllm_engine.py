"""vLLM engine of the generate stage (``dump.backend: vllm``): ``LLM.generate`` on token prompts.

Run on vLLM's CPU build (tests/test_generate_vllm.py: the HF engine's greedy answers, token for
token); not run on CUDA. vLLM's offline API: ``LLM(model, dtype, seed, **dump.vllm settings)``,
``SamplingParams(temperature, top_p, max_tokens, stop_token_ids, seed, detokenize)`` and
``llm.generate([{"prompt_token_ids": [...]}, ...], [params, ...])``; a stop token id is checked
after the token is appended, so ``outputs[0].token_ids`` ends with it, as in the HF engine.
vLLM schedules the whole chunk itself (continuous batching), so `generate.batch_size` is unused.
Each prompt gets its own ``seed`` derived from (generate.seed, sample_id). vLLM's greedy output
is not promised to be batch-invariant, so a resumed run may differ from an uninterrupted one
in near-tie tokens; chunks are still never mixed across different params. ``target.device`` and
``target.dtype`` resolve as for the vLLM dump backend (``target/device.py``): the device the
installed vLLM build runs on, bfloat16 on CUDA and float32 on CPU for 'auto'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dspark_offline.config import GenerateConfig, TargetConfig


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        target_cfg: TargetConfig,
        cfg: GenerateConfig,
        engine_kwargs: dict | None = None,
        max_length: int | None = None,
    ):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(
                f"dump.backend='vllm' makes generate decode with vLLM, which is not installed ({err}); "
                "pip install 'dspark-offline[vllm]', or set dump.backend=hf"
            ) from None
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from dspark_offline.target.device import resolve_dtype, resolve_vllm_device
        from dspark_offline.target.embedded import resolve_target_path
        from dspark_offline.target.vllm_backend import checked_engine_kwargs, vllm_device_type

        self.cfg = cfg
        self.path = resolve_target_path(target_cfg.path, target_cfg.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        config = AutoConfig.from_pretrained(self.path)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        try:
            eos = GenerationConfig.from_pretrained(self.path).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        device = resolve_vllm_device(target_cfg.device, vllm_device_type())
        self.dtype = str(resolve_dtype(target_cfg.dtype, device)).removeprefix("torch.")
        self.device = device.type
        engine_kwargs = checked_engine_kwargs(engine_kwargs, self.device)
        if "seed" in engine_kwargs:
            raise ValueError("dump.vllm sets seed; generate's vLLM engine takes it from generate.seed")
        if max_length is not None:  # the KV cache need not hold more than prompt + answer
            longest = min(max_length, self.max_positions) if self.max_positions else max_length
            engine_kwargs.setdefault("max_model_len", longest)
        self.engine_kwargs = engine_kwargs
        self.llm = LLM(model=str(self.path), dtype=self.dtype, seed=cfg.seed, **engine_kwargs)
        self.describe = f"vLLM {self.dtype} on {self.device}, engine arguments {engine_kwargs}"

    def generate(
        self,
        prompts: Sequence[np.ndarray],
        budgets: Sequence[int],
        sample_ids: Sequence[int],
        stop_ids: frozenset[int],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        from vllm import SamplingParams

        from dspark_offline.generate.engine import row_generator

        cfg = self.cfg
        params = [
            SamplingParams(
                temperature=cfg.temperature,
                top_p=cfg.top_p if cfg.top_p is not None else 1.0,
                max_tokens=int(budget),
                stop_token_ids=sorted(stop_ids),
                seed=int(row_generator(cfg.seed, int(sid)).initial_seed() % 2**31)
                if cfg.temperature > 0
                else None,
                detokenize=False,
            )
            for budget, sid in zip(budgets, sample_ids)
        ]
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        out = [list(o.outputs[0].token_ids) for o in outputs]
        if on_step is not None:
            on_step(sum(len(o) for o in out), len(out))
        return out
