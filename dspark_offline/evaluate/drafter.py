"""Adapter: an exported DSpark drafter as the decoding loop's `Drafter`.

The drafter's context is ``ctx = hidden_norm(fc(concat of L layer states))`` per position. Each
position's ctx depends only on that position's target states, so it is computed once, when the
position is verified, and appended: a round costs one block forward, not a pass over the
whole sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dspark_offline.evaluate.proposal import Proposal


class DrafterMismatchError(ValueError):
    """The exported drafter does not fit the target it is evaluated with."""


class ServingDrafter:
    """Wraps a `dspark_offline.model.DSparkDraft` (target head attached) for `speculative_decode`."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.block_size = int(model.cfg.block_size)
        self.layer_ids = list(model.cfg.target_layer_ids)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._ctx: torch.Tensor | None = None  # [1, T, H] ctx of positions 0 .. T-1

    @torch.inference_mode()
    def _project(self, states: torch.Tensor) -> torch.Tensor:
        """states [k, L, H] -> ctx [1, k, H]."""
        return self.model.context(states.to(self.device, self.dtype)[None])

    def begin(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        """states [P, L, H]; the token ids are not read (the block input gets x[a] in `propose`)."""
        self._ctx = self._project(states)

    def extend(self, states: torch.Tensor, ids: torch.Tensor) -> None:
        if self._ctx is None:
            raise RuntimeError("ServingDrafter.extend() before begin(): no sequence started")
        self._ctx = torch.cat([self._ctx, self._project(states)], dim=1)  # [1, T+k, H]

    @torch.inference_mode()
    def propose(
        self, last_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        if self._ctx is None or self._ctx.shape[1] != position:
            have = None if self._ctx is None else self._ctx.shape[1]
            raise RuntimeError(f"drafter context holds {have} positions, the block starts at {position}")
        ctx_positions = torch.arange(position, device=self.device)  # [T]
        block = self.model.draft_block(
            self._ctx, ctx_positions, last_token, position, temperature=temperature, generator=generator
        )
        return Proposal(tokens=block.tokens, probs=block.probs, confidence=block.confidence_logits)


def check_drafter_fits(cfg, target: nn.Module, drafter_dir: Path) -> None:
    """Refuse a drafter exported for another target (`cfg`: its DraftModelConfig), naming both values."""
    tcfg = target.config
    checks = {
        "hidden_size": (cfg.hidden_size, tcfg.hidden_size),
        "num_target_layers / num_hidden_layers": (cfg.num_target_layers, tcfg.num_hidden_layers),
        "vocab_size / embedding rows": (cfg.vocab_size, target.get_input_embeddings().weight.shape[0]),
    }
    for name, (drafter_value, target_value) in checks.items():
        if int(drafter_value) != int(target_value):
            raise DrafterMismatchError(
                f"{drafter_dir}: drafter {name}={drafter_value} but the target has {target_value}; "
                "evaluate the drafter with the target it was trained on"
            )


def load_drafter(drafter_dir: str | Path, target: nn.Module) -> ServingDrafter:
    """Load an exported drafter directory and attach the target's embedding and lm_head."""
    from dspark_offline.model.serving import (
        CONFIG_FILE,
        ServingFormatError,
        config_from_serving,
        load_serving,
    )

    drafter_dir = Path(drafter_dir)
    if not (drafter_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"drafter {drafter_dir}: no config.json "
            "(set evaluate.drafter or run `dspark-offline export` first)"
        )
    try:
        conf = json.loads((drafter_dir / CONFIG_FILE).read_text())
    except ValueError as e:
        raise ServingFormatError(f"{drafter_dir / CONFIG_FILE}: not valid JSON ({e})") from None
    check_drafter_fits(
        config_from_serving(conf, str(drafter_dir / CONFIG_FILE)), target, drafter_dir
    )  # before loading
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    model = load_serving(drafter_dir, embed.weight, head.weight)
    param = next(target.parameters())
    return ServingDrafter(model.to(device=param.device, dtype=param.dtype))
