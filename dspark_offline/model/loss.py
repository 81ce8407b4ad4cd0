"""The DSpark training objective (DESIGN §4 items 3–11): one public pure function.

`dspark_loss(model, batch, anchors, keep, loss_cfg, dp_group)` runs the drafter forward on the
given anchors, builds labels / eval mask / weights, computes CE + L1 distillation against the
cached target distribution + confidence BCE in chunks of blocks, and normalises by the
data-parallel token weight so DeepSpeed's gradient averaging yields a token-pooled mean.

Batch (right-padded): `input_ids [Bt,S] int64`, `loss_mask [Bt,S] bool`, `lengths [Bt]`,
`hidden [Bt,S,L,H]`, `topk_ids [Bt,S,K]`, `topk_probs [Bt,S,K] float32`, optional
`final_hidden [Bt,S,H]` (post-final-norm, needed by `l1_mode` "recompute" and "exact").

`loss_cfg` is anything with the `config.TrainConfig` fields `ce_weight`, `l1_weight`,
`confidence_weight`, `gamma`, `l1_mode`, `chunk_blocks` (a `TrainConfig` itself, or `LossConfig`).

Acceptance proxy: `accept_j = clamp(1 − L1_j/2, 0, 1)` is the min(q, p) overlap, i.e. the
probability that rejection sampling accepts slot j given slots < j were accepted. It is the
confidence head's target and the factor of `tau_probabilistic`.

L1 modes (`l1_mode`; measured in `benchmarks/topk_l1.py`):
- `topk`: Σ_K|q−p| + |Q_rest − r|, a lower bound of the exact L1 (the tail compared as one
  bin), so accept_j and tau are optimistic.
- `capped`: the tightest lower bound the top-k alone allows (every tail probability is at most
  the smallest stored one); never below `topk`, never above the exact L1.
- `recompute`: the target distribution on the draft's vocabulary recomputed from
  `final_hidden` (one more [Vs] logits matmul, no pass over the whole vocabulary), exact up to
  the rounding of the stored probabilities and of `final_hidden`.
- `exact`: the full softmax of `final_hidden` over the whole vocabulary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dspark_offline.linalg import vocab_logits


@dataclass(frozen=True)
class LossConfig:
    """The loss knobs (same names and defaults as `config.TrainConfig`)."""

    ce_weight: float = 0.1
    l1_weight: float = 0.9
    confidence_weight: float = 1.0
    gamma: float = 4.0
    l1_mode: str = "recompute"
    chunk_blocks: int = 256


L1_MODES = ("topk", "capped", "recompute", "exact")


def needs_final_hidden(l1_mode: str) -> bool:
    """Whether an `l1_mode` reads the target's final hidden state (`final_hidden`)."""
    return l1_mode in ("recompute", "exact")


def dspark_loss(model, batch: dict, anchors: torch.Tensor, keep: torch.Tensor, loss_cfg,
                dp_group=None, *, dp_reduce: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Return (loss, metrics). anchors/keep [Bt, A] from `sample_anchors` (or fixed by a test).

    loss = world · (α_ce ΣCE·w + α_l1 ΣL1·w + α_conf ΣBCE·w) / allreduce(Σw) over `dp_group`;
    `dp_reduce=False` skips the all-reduce (a rank scoring its own samples, e.g. validation).
    metrics (local weighted means unless said): ce, l1, conf (the BCE), conf_target (mean soft
    target t), conf_floor (mean entropy H(t), the BCE's lower bound), conf_excess (conf −
    conf_floor, a KL ≥ 0), conf_skill (see `confidence_skill`), accuracy, acc_slot{j},
    accept_slot{j}, tau_probabilistic, tau_greedy (1 + the slots greedy verification accepts:
    each argmax equals the target's top-1, given the data's prefix), outside_vocab (share of
    labels outside the training vocabulary), tokens (Σ eval mask), weight (Σw), blocks.
    """
    core = getattr(model, "module", model)  # DeepSpeed engine -> the DSparkDraft inside
    b = core.cfg.block_size
    out, blk = _supervised_blocks(model, batch, anchors, keep, loss_cfg)
    h, prev, labels, w, e = blk["hidden"], blk["prev"], blk["labels"], blk["weight"], blk["eval"]
    tk_ids, tk_probs, tgt_h = blk["topk_ids"], blk["topk_probs"], blk["target_hidden"]

    sums = _chunked_terms(core, h, prev, labels, w, e, tk_ids, tk_probs, tgt_h, int(loss_cfg.chunk_blocks),
                          loss_cfg.l1_mode)
    local_w = w.sum().detach()
    global_w, world = _dp_weight(local_w, dp_group) if dp_reduce else (local_w, 1)
    num = (loss_cfg.ce_weight * sums["ce"] + loss_cfg.l1_weight * sums["l1"]
           + loss_cfg.confidence_weight * sums["bce"])
    # the 0·Σh term keeps every backbone parameter in the graph when no block is valid
    loss = world * num / global_w.clamp_min(1e-12) + 0.0 * out.hidden.sum()
    return loss, _metrics(sums, local_w, e, b)


def confidence_examples(model, batch: dict, anchors: torch.Tensor, keep: torch.Tensor, loss_cfg
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The confidence head's inputs and targets for a batch, exactly as `dspark_loss` forms them
    (no gradients): hidden [N, B, H] (final-norm draft states), prev [N, B] (teacher-forced
    previous tokens), target [N, B] (`clamp(1 − L1/2, 0, 1)`), weight [N, B] (`e_j·exp(−j/γ)`;
    0 on unsupervised slots), over the N blocks with at least one supervised slot.

    For studying the head apart from the drafter (e.g. `benchmarks/confidence_head.py`).
    """
    core = getattr(model, "module", model)
    with torch.no_grad():
        _, blk = _supervised_blocks(model, batch, anchors, keep, loss_cfg)
        q = torch.softmax(core.block_logits(blk["hidden"], blk["prev"], core.train_vocab), dim=-1)  # [N, B, V']
        l1 = _l1_to_target(core, q, blk["topk_ids"], blk["topk_probs"], blk["target_hidden"], loss_cfg.l1_mode)
    return blk["hidden"], blk["prev"], _acceptance(l1), blk["weight"]


def _supervised_blocks(model, batch: dict, anchors, keep, loss_cfg) -> tuple[object, dict]:
    """Drafter forward + labels, kept to the N blocks with at least one supervised slot.

    Returns (forward output, dict of [N, B, ...] tensors: hidden, prev, labels, weight, eval,
    topk_ids, topk_probs, target_hidden (None unless the l1_mode reads final_hidden)).
    """
    core = getattr(model, "module", model)
    _check_batch(batch, loss_cfg)
    out = model(batch["input_ids"], batch["hidden"], anchors, keep)  # hidden [Bt, A, B, H]
    tg = _block_targets(batch["input_ids"], batch["loss_mask"], batch["lengths"], anchors, keep,
                        core.cfg.block_size, loss_cfg.gamma)
    # only blocks with at least one supervised slot cost logits (slot 0 valid <=> any valid)
    bi, ai = tg["eval"][:, :, 0].nonzero(as_tuple=True)  # [N], [N]
    blk = {key: tg[key][bi, ai] for key in ("prev", "labels", "weight", "eval")}  # [N, B]
    blk["hidden"] = out.hidden[bi, ai]  # [N, B, H]
    src = tg["src"][bi, ai]  # [N, B] position of each slot's target distribution
    rows = bi[:, None].expand_as(src)  # [N, B]
    blk["topk_ids"] = batch["topk_ids"][rows, src]  # [N, B, K]
    # The target distribution is a constant of the objective: gradients reach the drafter only.
    blk["topk_probs"] = batch["topk_probs"][rows, src].detach().float()  # [N, B, K]
    tgt = batch["final_hidden"][rows, src].detach() if needs_final_hidden(loss_cfg.l1_mode) else None  # [N, B, H]
    blk["target_hidden"] = tgt
    return out, blk


def _l1_to_target(core, q, tk_ids, tk_probs, tgt_h, mode: str) -> torch.Tensor:
    """L1 [n, B] between the draft distribution q [n, B, V or Vs] and the target's, by `l1_mode`
    (module docstring). With a training vocabulary q is 0 outside it, so every mode counts the
    target mass that lies outside as distance."""
    if mode in ("topk", "capped"):
        pos, inside = _in_vocab(core, tk_ids)
        qk = q.gather(-1, pos) * inside  # [n, B, K]
        return _topk_l1(qk, tk_probs) if mode == "topk" else _capped_topk_l1(q, qk, tk_probs)
    if mode == "recompute":
        return _recomputed_l1(core, q, tk_ids, tk_probs, tgt_h)
    with torch.no_grad():  # the target distribution is a constant of the objective
        p = torch.softmax(vocab_logits(tgt_h.to(core.lm_head_weight.dtype), core.lm_head_weight).float(), dim=-1)
    if core.train_vocab is None:
        return (q - p).abs().sum(-1)
    p_in = p[..., core.train_vocab]  # [n, B, Vs]
    return (q - p_in).abs().sum(-1) + (1.0 - p_in.sum(-1)).clamp(min=0.0)


def _acceptance(l1: torch.Tensor) -> torch.Tensor:
    """Probability that the target accepts a drafted slot, `clamp(1 − L1/2, 0, 1)`: the
    confidence head's target and the factor of `tau_probabilistic`."""
    return (1.0 - 0.5 * l1).clamp(0.0, 1.0)


def _check_batch(batch: dict, loss_cfg) -> None:
    need = ["input_ids", "loss_mask", "lengths", "hidden", "topk_ids", "topk_probs"]
    if loss_cfg.l1_mode not in L1_MODES:
        raise ValueError(f"l1_mode must be one of {L1_MODES}, got {loss_cfg.l1_mode!r}")
    if needs_final_hidden(loss_cfg.l1_mode):
        need.append("final_hidden")
    missing = [k for k in need if batch.get(k) is None]
    if missing:
        hint = (f" (l1_mode={loss_cfg.l1_mode!r} needs final_hidden: dump with dump.store_final_hidden=true, "
                "or train with l1_mode='capped' or 'topk')") if "final_hidden" in missing else ""
        raise KeyError(f"batch is missing {missing}{hint}")


def _block_targets(input_ids, loss_mask, lengths, anchors, keep, b: int, gamma: float) -> dict:
    """Labels, teacher-forced prev tokens, eval mask and weights, all [Bt, A, B].

    slot j predicts x[a+j+1]; e_j = keep ∧ (a+j+1 < len) ∧ m[a+j+1], cumprod over j (a gap ends
    the block); w_j = e_j·exp(−j/γ); prev_j = x[a+j] (prev_0 = x[a]); the target distribution
    of slot j is the cached top-k at position a+j (`src`).
    """
    _bt, s = input_ids.shape
    j = torch.arange(b, device=anchors.device)
    lab_pos = anchors[:, :, None] + j + 1  # [Bt, A, B]
    lab_safe = lab_pos.clamp(max=s - 1)
    flat = lambda t, idx: torch.gather(t, 1, idx.flatten(1)).view(idx.shape)
    labels = flat(input_ids, lab_safe)
    ok = keep[:, :, None] & (lab_pos < lengths.to(anchors.device)[:, None, None]) & flat(loss_mask.bool(), lab_safe)
    ev = ok.to(torch.int64).cumprod(dim=-1).bool()
    weight = ev.float() * torch.exp(-j.float() / gamma)
    src = (anchors[:, :, None] + j).clamp(max=s - 1)
    return {"labels": labels, "prev": flat(input_ids, src), "eval": ev, "weight": weight, "src": src}


def _chunk_terms(core, l1_mode, h, prev, labels, w, e, tk_ids, tk_probs, tgt_h):
    """Loss sums and detached statistics of one chunk of n blocks ([n, B, ...] inputs).

    With a training vocabulary (`DSparkDraft.set_train_vocab`) the draft distribution q lives on
    its Vs entries (0 elsewhere): a label outside it gets no CE term (counted in `outside`).
    """
    vocab = core.train_vocab  # [Vs] | None
    logits = core.block_logits(h, prev, vocab)  # [n, B, V or Vs] float32
    logq = torch.log_softmax(logits, dim=-1)
    q = logq.exp()
    lab, inside = _in_vocab(core, labels)  # [n, B] positions in q, [n, B] bool
    ce = -logq.gather(-1, lab[..., None]).squeeze(-1) * inside  # [n, B]
    l1 = _l1_to_target(core, q, tk_ids, tk_probs, tgt_h, l1_mode)
    accept = _acceptance(l1).detach()  # [n, B]
    conf = core.confidence_logits(h, prev)  # [n, B] | None
    bce = (F.binary_cross_entropy_with_logits(conf, accept, reduction="none")
           if conf is not None else torch.zeros_like(ce))
    # BCE against a soft target t is bounded below by its entropy H(t), which rises as the
    # drafter improves (t moves away from 0); BCE − H(t) (a KL, ≥ 0) is what the head can reduce.
    floor = binary_entropy(accept) if conf is not None else torch.zeros_like(ce)
    target = accept if conf is not None else torch.zeros_like(ce)  # no head: no skill to score
    ef = e.float()
    guess = logits.argmax(-1)  # [n, B] positions in q
    if vocab is not None:
        guess = vocab[guess]
    hit = (guess == labels).float() * ef  # [n, B]
    correct = hit.sum(0).detach()  # [B]
    # greedy verification accepts slot j iff every slot <= j drafted the target's top-1 token
    greedy = ((guess == tk_ids[..., 0]).float() * ef).cumprod(-1).sum(-1) + 1.0  # [n]
    acc_sum = (accept * ef).sum(0)  # [B]
    tau_sum = ((accept * ef).cumprod(-1).sum(-1) + 1.0).sum()  # all blocks here are valid
    return ((ce * w).sum(), (l1 * w).sum(), (bce * w).sum(), correct, acc_sum, tau_sum,
            (floor * w).sum(), (target * w).sum(), greedy.sum().detach(), ((~inside).float() * ef).sum())


def _in_vocab(core, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of vocabulary ids in the draft distribution q, and whether q has them at all:
    ids themselves with the full vocabulary, else their index in the training vocabulary."""
    if core.train_vocab is None:
        return ids.long(), torch.ones_like(ids, dtype=torch.bool)
    pos = core.train_vocab_index[ids.long()]
    return pos.clamp(min=0), pos >= 0


def binary_entropy(t: torch.Tensor) -> torch.Tensor:
    """H(t) = −t·log t − (1−t)·log(1−t), elementwise, 0 at t ∈ {0, 1}."""
    t = t.double()
    return (-(torch.special.xlogy(t, t) + torch.special.xlogy(1 - t, 1 - t))).float()


def confidence_skill(conf_excess: float, conf_target: float, conf_floor: float) -> float:
    """How much better the confidence head is than the best constant guess, on the same targets.

    A head that always predicts the (weighted) mean target t̄ has BCE H(t̄), so its excess over
    the floor is H(t̄) − mean H(t) (≥ 0, the spread of the targets). skill = 1 − conf_excess /
    that: 1 = perfect, 0 = no better than the constant, < 0 = worse (e.g. an untrained head).
    The raw BCE and its excess both grow as the drafter improves (its targets spread out);
    this ratio is comparable across training. NaN when the targets do not vary.
    """
    const_excess = float(binary_entropy(torch.tensor(conf_target, dtype=torch.float64))) - conf_floor
    if not (const_excess > 1e-6 and math.isfinite(conf_excess)):  # below: float32 sums' noise
        return math.nan
    return 1.0 - conf_excess / const_excess


def _topk_l1(qk, tk_probs):
    """Σ_K|q−p| + |Q_rest − r| from q at the top-k ids (qk [n, B, K]): a lower bound of Σ_V|q−p|
    (the rest mass compared as one bin)."""
    rest_q = 1.0 - qk.sum(-1)
    rest_p = 1.0 - tk_probs.sum(-1)
    return (qk - tk_probs).abs().sum(-1) + (rest_q - rest_p).abs()


def _capped_topk_l1(q, qk, tk_probs):
    """The tightest lower bound of Σ_V|q−p| that the top-k alone gives (q [n, B, V or Vs], qk
    [n, B, K] = q at the top-k ids, 0 where q lacks them).

    Outside the top-k, Σ|q−p| = Q_rest + r − 2·Σ_tail min(q_i, p_i), and every tail p_i is at most
    p_(k), the smallest stored probability, so the tail overlap is at most
    min(r, Σ_tail min(q_i, p_(k))) (the second term is itself at most Q_rest). `_topk_l1` assumes
    the overlap min(Q_rest, r), so this is never below it; the overlap bound is reached when p puts
    its tail where q is, so no bound from the top-k alone is tighter. The exact L1 is at most
    Σ_K|q−p| + Q_rest + r (no tail overlap).
    """
    rest_q = (1.0 - qk.sum(-1)).clamp(min=0.0)  # [n, B]
    rest_p = (1.0 - tk_probs.sum(-1)).clamp(min=0.0)
    cap = tk_probs.amin(-1, keepdim=True)  # [n, B, 1] p_(k) >= every tail probability
    tail_cap = (torch.minimum(q, cap).sum(-1) - torch.minimum(qk, cap).sum(-1)).clamp(min=0.0)  # [n, B]
    overlap = torch.minimum(rest_p, tail_cap)
    return (qk - tk_probs).abs().sum(-1) + rest_q + rest_p - 2.0 * overlap


def _recomputed_l1(core, q, tk_ids, tk_probs, tgt_h) -> torch.Tensor:
    """Σ_Vs|q − p| + (1 − Σ_Vs p) [n, B] with the target distribution p on the draft's vocabulary
    Vs (the training vocabulary, or all of V) recomputed from the final hidden state: the stored
    probability for a stored id, exp(z_i − lse) for the others (`_fitted_target`). Exact up to
    the rounding of the stored probabilities (fp16) and of final_hidden (bf16 by default)."""
    pos, inside = _in_vocab(core, tk_ids)  # [n, B, K] positions in q, and whether q has them
    with torch.no_grad():  # the target distribution is a constant of the objective
        p = _fitted_target(core, tk_ids, tk_probs, tgt_h, pos, inside)  # [n, B, V or Vs]
    return _l1_with_stored_topk(q, p, pos, inside, tk_probs)


def _fitted_target(core, tk_ids, tk_probs, tgt_h, pos, inside) -> torch.Tensor:
    """exp(z − lse) [n, B, V or Vs], z = final_hidden · lm_head[vocabulary]ᵀ, without a pass over
    the whole vocabulary.

    lse (the log-normaliser over all of V) is fitted so that the recomputed mass of the stored ids
    equals their stored mass: lse = log Σ e^z_K − log Σ p_K over the stored ids inside the
    vocabulary and the stored top-1 (its logit comes from its own lm_head row, so every slot has
    an id to fit on even when no stored id is in the vocabulary). The fit averages the rounding of
    the stored probabilities over the top-k mass instead of trusting one of them.
    """
    vocab = core.train_vocab
    head = core.lm_head_weight if vocab is None else core.lm_head_weight[vocab]  # [V or Vs, H]
    h = tgt_h.to(head.dtype)  # [n, B, H]
    z = vocab_logits(h, head).float()  # [n, B, V or Vs]
    zk = z.gather(-1, pos)  # [n, B, K]
    zk[..., 0] = (h * core.lm_head_weight[tk_ids[..., 0].long()]).sum(-1).float()  # the top-1, inside or not
    use = inside.clone()
    use[..., 0] = True
    lse = torch.logsumexp(zk.masked_fill(~use, -math.inf), -1) - torch.log((tk_probs * use).sum(-1))  # [n, B]
    return z.sub_(lse[..., None]).exp_()


def _l1_with_stored_topk(q, p, pos, inside, tk_probs) -> torch.Tensor:
    """Σ|q − p'| + max(0, 1 − Σp') [n, B], where p' is p [n, B, V or Vs] with the stored
    probabilities put in at the stored ids q has (`pos`, `inside` [n, B, K]); written as a
    correction at those K entries, so p is never copied or scattered into."""
    qk, pk = q.gather(-1, pos), p.gather(-1, pos)  # [n, B, K]
    fix = ((qk - tk_probs).abs() - (qk - pk).abs()) * inside  # [n, B, K]
    mass = p.sum(-1) + ((tk_probs - pk) * inside).sum(-1)  # [n, B] Σ p'
    return (q - p).abs().sum(-1) + fix.sum(-1) + (1.0 - mass).clamp(min=0.0)


def _chunked_terms(core, h, prev, labels, w, e, tk_ids, tk_probs, tgt_h, chunk: int, l1_mode: str) -> dict:
    """Sum `_chunk_terms` over chunks of blocks with activation checkpointing.

    Each chunk's [n, B, V] logits/softmax are freed after its forward and recomputed in the
    backward, so peak memory is one chunk's, not num_anchors·B·V.
    """
    n, b = labels.shape
    zero = h.new_zeros((), dtype=torch.float32)
    acc = {"ce": zero, "l1": zero, "bce": zero, "correct": h.new_zeros(b, dtype=torch.float32),
           "accept": h.new_zeros(b, dtype=torch.float32), "tau": zero, "floor": zero, "target": zero,
           "greedy": zero, "outside": zero, "blocks": n}
    fn = functools.partial(_chunk_terms, core, l1_mode)
    # With a single chunk, recomputing it in the backward would not lower the peak (its logits
    # are rebuilt there anyway), so checkpointing only pays when there are several chunks.
    recompute = torch.is_grad_enabled() and h.requires_grad and n > chunk
    for lo in range(0, n, max(chunk, 1)):
        sl = slice(lo, lo + chunk)
        args = (h[sl], prev[sl], labels[sl], w[sl], e[sl], tk_ids[sl], tk_probs[sl],
                None if tgt_h is None else tgt_h[sl])
        if recompute:
            res = checkpoint(fn, *args, use_reentrant=False)
        else:
            res = fn(*args)
        for key, val in zip(("ce", "l1", "bce", "correct", "accept", "tau", "floor", "target", "greedy",
                             "outside"), res):
            acc[key] = acc[key] + val
    return acc


def _dp_weight(local_w: torch.Tensor, dp_group) -> tuple[torch.Tensor, int]:
    """(Σw over the data-parallel group, group size); (local Σw, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return local_w, 1
    total = local_w.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return total, dist.get_world_size(group=dp_group)


def _metrics(sums: dict, local_w: torch.Tensor, e: torch.Tensor, b: int) -> dict[str, float]:
    wsum = float(local_w)
    tokens_per_slot = e.float().sum(0)  # [B]
    tokens = float(tokens_per_slot.sum())
    div = lambda x, d: float(x) / d if d > 0 else math.nan
    m = {
        "ce": div(sums["ce"].detach(), wsum),
        "l1": div(sums["l1"].detach(), wsum),
        "conf": div(sums["bce"].detach(), wsum),
        "conf_target": div(sums["target"], wsum),
        "conf_floor": div(sums["floor"], wsum),
        "accuracy": div(sums["correct"].sum(), tokens),
        "tau_probabilistic": div(sums["tau"], sums["blocks"]),
        "tau_greedy": div(sums["greedy"], sums["blocks"]),
        "outside_vocab": div(sums["outside"], tokens),
        "tokens": tokens,
        "weight": wsum,
        "blocks": float(sums["blocks"]),
    }
    m["conf_excess"] = m["conf"] - m["conf_floor"]
    m["conf_skill"] = confidence_skill(m["conf_excess"], m["conf_target"], m["conf_floor"])
    for j in range(b):
        m[f"acc_slot{j}"] = div(sums["correct"][j], float(tokens_per_slot[j]))
        m[f"accept_slot{j}"] = div(sums["accept"][j], float(tokens_per_slot[j]))
    return m
