"""Held-out prompts from the prepared eval split (never trained on).

A prompt is the rendered conversation up to the first supervised token (``data/prompts.py``,
the same rule `generate` uses): it ends with the first assistant header, so the target answers
the first user turn as it would in deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dspark_offline.data.prompts import prompt_from_sample


class PromptError(ValueError):
    """No usable held-out prompt."""


@dataclass(frozen=True)
class EvalPrompt:
    index: int  # row in the eval split
    sample_id: int  # index of the sample in the prepared data set
    ids: torch.Tensor  # [P] int64


def load_prompts(prepared_dir: str, num_prompts: int) -> tuple[list[EvalPrompt], int]:
    """The first ``num_prompts`` usable prompts of the eval split, and how many samples were skipped."""
    from dspark_offline.data.prepared import PreparedSplit

    split = PreparedSplit.load(prepared_dir, "eval")
    if len(split) == 0:
        raise PromptError(
            f"{prepared_dir}/eval: the eval split is empty; "
            "set prepare.num_eval_samples > 0 and re-run prepare"
        )
    prompts: list[EvalPrompt] = []
    skipped = 0
    for i in range(len(split)):
        if len(prompts) == num_prompts:
            break
        ids, mask = split[i]
        prompt = prompt_from_sample(np.asarray(ids), np.asarray(mask))
        if prompt is None:
            skipped += 1
            continue
        prompts.append(EvalPrompt(i, int(split.sample_ids[i]), torch.from_numpy(prompt.astype(np.int64))))
    if not prompts:
        raise PromptError(
            f"{prepared_dir}/eval: none of the {len(split)} eval samples has a prompt (no supervised token "
            "after a non-empty prefix)"
        )
    return prompts, skipped
