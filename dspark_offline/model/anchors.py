"""Anchor sampling (DESIGN §4 item 2), kept apart from the objective.

The objective takes `anchors`/`keep` as arguments so a test, or a comparison with another
implementation, can fix them; this module is the one random step of a training forward.
"""

from __future__ import annotations

import torch


def anchor_candidates(loss_mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[Bt, S] bool: positions a with m[a] = m[a+1] = 1 and a ≤ len−2.

    Both the anchor token (the block's given first token, x[a]) and its successor (slot 0's
    label) must be supervised tokens; otherwise the block would have no trained slot.
    """
    _bt, s = loss_mask.shape
    m = loss_mask.bool()
    cand = torch.zeros_like(m)
    if s >= 2:
        cand[:, :-1] = m[:, :-1] & m[:, 1:]
    in_len = torch.arange(s, device=m.device)[None, :] <= (lengths.to(m.device)[:, None] - 2)
    return cand & in_len


def sample_anchors(
    loss_mask: torch.Tensor,  # [Bt, S] bool
    lengths: torch.Tensor,  # [Bt] int64, real length of each (right-padded) row
    num_anchors: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # anchors [Bt, A] int64 sorted, keep [Bt, A] bool
    """Up to `num_anchors` candidates per row, without replacement, sorted ascending.

    A = min(num_anchors, max candidates over the batch). Rows with fewer candidates are
    padded at the end with anchor 0 and keep = False.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    cand = anchor_candidates(loss_mask, lengths)  # [Bt, S]
    bt, s = cand.shape
    counts = cand.sum(dim=1)  # [Bt]
    a = int(min(num_anchors, int(counts.max().item()) if bt else 0))
    anchors = torch.zeros(bt, max(a, 1), dtype=torch.int64, device=cand.device)
    keep = torch.zeros(bt, max(a, 1), dtype=torch.bool, device=cand.device)
    if a == 0:  # no supervised pair anywhere: one padding block keeps shapes non-empty
        return anchors, keep
    # random keys on the CPU generator's device, candidates first: top-A = a uniform subset
    noise = torch.rand(bt, s, generator=generator, device=generator.device if generator else "cpu")
    noise = noise.to(cand.device)
    score = torch.where(cand, noise, torch.full_like(noise, -1.0))  # [Bt, S]
    picked = score.topk(a, dim=1).indices  # [Bt, A]
    picked_ok = torch.gather(cand, 1, picked)  # [Bt, A]
    # sort the real anchors ascending, padding after them
    key = torch.where(picked_ok, picked, torch.full_like(picked, s + 1))
    order = key.argsort(dim=1)
    anchors = torch.gather(torch.where(picked_ok, picked, torch.zeros_like(picked)), 1, order)
    keep = torch.gather(picked_ok, 1, order)
    return anchors, keep
