"""The DSpark training objective (DESIGN §4 items 6–10): one public pure function.

`dspark_loss(model, out, targets, cfg)` takes the drafter's forward output (`DraftOutput`) and
the batch's `BlockTargets` and returns the local `LossSums`: Σ CE·w, Σ L1·w (distillation
against the cached target distribution, `l1.py`), Σ BCE·w (confidence head), and the
statistics every metric is derived from (`metrics.py`). `model` is the single-device
`DSparkDraft`, read for its heads only (the forward has already run).

It does not run the forward, know about DeepSpeed, or normalise: `train/` runs the forward and
divides `sums.objective(cfg)` by Σw all-reduced over the data-parallel group (DESIGN §4 item 9).
The draft states (when the forward deferred them), logits, softmax and losses are computed in
chunks of blocks with activation checkpointing, so memory does not grow with num_anchors.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dspark_offline.config import TrainConfig

from .confidence import binary_entropy
from .draft import DraftOutput, DSparkDraft
from .l1 import L1_MODES, acceptance, in_vocab, l1_to_target, needs_final_hidden
from .metrics import LossSums
from .targets import BlockTargets

__all__ = ["LossConfig", "LossSums", "dspark_loss", "needs_final_hidden"]


@dataclass(frozen=True)
class LossConfig:
    """The objective's knobs; `from_train(params.train)` (the defaults live in `config.TrainConfig`)."""

    ce_weight: float
    l1_weight: float
    confidence_weight: float
    gamma: float
    l1_mode: str
    chunk_blocks: int

    def __post_init__(self) -> None:
        if self.l1_mode not in L1_MODES:
            raise ValueError(f"l1_mode must be one of {L1_MODES}, got {self.l1_mode!r}")
        if self.chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be >= 1, got {self.chunk_blocks}")

    @classmethod
    def from_train(cls, train: TrainConfig) -> LossConfig:
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls)})

    def combine(self, ce, l1, bce):
        """α_ce·ce + α_l1·l1 + α_conf·bce of sums or of means (tensors or floats)."""
        return self.ce_weight * ce + self.l1_weight * l1 + self.confidence_weight * bce


def dspark_loss(model: DSparkDraft, out: DraftOutput, targets: BlockTargets, cfg: LossConfig) -> LossSums:
    """The objective's local sums over `targets`' supervised blocks (`block_targets` of the same
    batch and anchors as `out`).

    Works chunk by chunk of `cfg.chunk_blocks` blocks: the chunk's draft states (computed here
    when the forward deferred them, `DraftOutput`), logits and losses. With several chunks each
    is checkpointed (rebuilt in the backward), so only one chunk's activations exist at a time.
    """
    n, c = len(targets), cfg.chunk_blocks
    # With a single chunk, recomputing it in the backward would not lower the peak (its logits
    # are rebuilt there anyway), so checkpointing only pays when there are several chunks.
    made = out.hidden if out.hidden is not None else out.ctx_kv[0][0]  # what the chunks' states come from
    recompute = torch.is_grad_enabled() and made.requires_grad and n > c

    def chunk(lo: int) -> LossSums:
        args = (model, out, targets[lo : lo + c], cfg.l1_mode)
        return checkpoint(_chunk_sums, *args, use_reentrant=False) if recompute else _chunk_sums(*args)

    # n = 0: one empty chunk, which still reaches every parameter (DeepSpeed needs a graph every step)
    sums = functools.reduce(operator.add, map(chunk, range(0, n, c) or [0]))
    return replace(
        sums,
        # Σw and the slot counts over all blocks at once (one float32 summation order for any chunking)
        weight=targets.weight.sum().detach(),
        tokens=targets.eval.float().sum(0),  # [B]
        blocks=targets.weight.new_tensor(float(n), dtype=torch.float32),
    )


def _chunk_sums(model: DSparkDraft, out: DraftOutput, t: BlockTargets, l1_mode: str) -> LossSums:
    """The sums of one chunk of n blocks; weight/tokens/blocks are set by the caller.

    With a training vocabulary (`DSparkDraft.set_train_vocab`) the draft distribution q lives on
    its Vs entries (0 elsewhere): a label outside it gets no CE term (counted in `outside`).
    """
    h = model.block_hidden(out, t.rows, t.blocks)  # [n, B, H]
    logits = model.block_logits(h, t.prev, model.train_vocab)  # [n, B, V or Vs] float32
    logq = torch.log_softmax(logits, dim=-1)
    lab, inside = in_vocab(model, t.labels)  # [n, B] positions in q, [n, B] bool
    ce = -logq.gather(-1, lab[..., None]).squeeze(-1) * inside  # [n, B]
    l1 = l1_to_target(model, logq.exp(), t.topk_ids, t.topk_probs, t.final_hidden, l1_mode)
    accept = acceptance(l1).detach()  # [n, B]
    bce, floor, target = _confidence_terms(model, h, t.prev, accept)
    ef = t.eval.float()
    guess = logits.argmax(-1)  # [n, B] positions in q
    if model.train_vocab is not None:
        guess = model.train_vocab[guess]
    w = t.weight
    zero = h.new_zeros((), dtype=torch.float32)
    return LossSums(
        ce=(ce * w).sum(),
        l1=(l1 * w).sum(),
        bce=(bce * w).sum(),
        conf_target=(target * w).sum(),
        conf_floor=(floor * w).sum(),
        weight=zero,
        tokens=zero,
        blocks=zero,
        tau=((accept * ef).cumprod(-1).sum(-1) + 1.0).sum(),  # all blocks here are supervised
        # greedy verification accepts slot j iff every slot <= j drafted the target's top-1 token
        greedy=(((guess == t.topk_ids[..., 0]).float() * ef).cumprod(-1).sum(-1) + 1.0).sum().detach(),
        outside=((~inside).float() * ef).sum(),
        correct=((guess == t.labels).float() * ef).sum(0).detach(),  # [B]
        accept=(accept * ef).sum(0),  # [B]
    )


def _confidence_terms(model, h, prev, accept) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(BCE, its floor H(t), the target t) [n, B] of the confidence head against t = accept;
    zeros without a head (no skill to score)."""
    conf = model.confidence_logits(h, prev)  # [n, B] | None
    if conf is None:
        zero = torch.zeros_like(accept)
        return zero, zero, zero
    bce = F.binary_cross_entropy_with_logits(conf, accept, reduction="none")
    # BCE against a soft target t is bounded below by its entropy H(t), which rises as the
    # drafter improves (t moves away from 0); BCE − H(t) (a KL, ≥ 0) is what the head can reduce.
    return bce, binary_entropy(accept), accept
