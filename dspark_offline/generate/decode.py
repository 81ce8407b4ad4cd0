"""Batched, KV-cached autoregressive decoding that drops finished rows.

Why not ``model.generate``: with padding, a batch keeps paying for rows that have already
stopped until its longest answer ends. Here every decoding step runs only the rows that are
still going; a finished row leaves the batch, its KV cache rows (``batch_select_indices``), its
attention-mask row and its position counter. The KV cache grows by doubling
(`target.kv_cache`), so a step writes only its new positions.

Left padding keeps every row's newest token in the last column, so one ``[b, 1]`` input feeds
the next step. Pads are masked out of attention, and positions count real tokens only
(``cumsum(mask) - 1``), so a row sees exactly the positions and keys it would see alone: at T = 0
the output equals `evaluate.target.target_decode` of the same prompt (up to float rounding of a
different batch shape, which can only matter at a near-tie of the top two logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dspark_offline.target.kv_cache import growing_cache


def pick_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None,
    generators: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """logits [b, V] fp32 -> next tokens [b] int64: argmax at T = 0, else one draw per row from its
    own generator (so a row's sample does not depend on which rows share its batch)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1).cpu()  # [b, V]
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [b, V]
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if generators is None or len(generators) != len(probs):
        raise ValueError("sampling needs one torch.Generator per row")
    out = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]
    return torch.cat(out).to(logits.device)  # [b]


@torch.inference_mode()
def decode_batch(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    budgets: Sequence[int],
    stop_ids: frozenset[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float | None = None,
    generators: Sequence[torch.Generator] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Decode every prompt [P_i] (int64) for at most ``budgets[i]`` (>= 1) new tokens, stopping a row
    right after it emits any of ``stop_ids`` (the stop token is kept). Returns the new tokens per
    prompt, in input order. ``on_step(new_tokens, rows_finished)`` is called after every step."""
    if len(prompts) != len(budgets) or not prompts:
        raise ValueError(
            f"need one budget per prompt and at least one prompt ({len(prompts)}, {len(budgets)})"
        )
    if min(budgets) < 1 or min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs >= 1 token and every budget must be >= 1")
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.int64)  # [B, P] left-padded
    mask = torch.zeros(B, P, dtype=torch.int64)  # [B, P] 1 on real tokens
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = p
        mask[b, P - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [B, P] position of each real token
    cache = growing_cache(model)
    logits = (
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        .logits[:, -1]
        .float()
    )  # [B, V]
    next_pos = positions[:, -1] + 1  # [B]
    rows = list(range(B))  # input index of each live row
    out: list[list[int]] = [[] for _ in range(B)]
    gens = list(generators) if generators is not None else None
    while True:
        live_gens = [gens[r] for r in rows] if gens is not None else None
        tokens = pick_tokens(logits, temperature, top_p, live_gens)  # [b]
        keep = []
        for j, (r, t) in enumerate(zip(rows, tokens.tolist())):
            out[r].append(t)
            if t not in stop_ids and len(out[r]) < budgets[r]:
                keep.append(j)
        if on_step is not None:
            on_step(len(rows), len(rows) - len(keep))
        if not keep:
            return out
        if len(keep) < len(rows):  # finished rows leave the batch and the KV cache
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, next_pos, tokens = mask[sel], next_pos[sel], tokens[sel]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)  # [b, S+1]
        logits = (
            model(
                input_ids=tokens.view(-1, 1),
                attention_mask=mask,
                position_ids=next_pos.view(-1, 1),
                past_key_values=cache,
                use_cache=True,
            )
            .logits[:, -1]
            .float()
        )  # [b, V]
        next_pos = next_pos + 1
