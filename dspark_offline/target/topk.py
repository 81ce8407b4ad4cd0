"""Top-k of the target's next-token distribution, computed from the final post-norm hidden state.

Why not the model's own logits: HF's ``*ForCausalLM.forward`` materialises ``[B, S, V]`` logits
in the compute dtype for the whole batch (49152 x 8192 tokens x 4 B = 1.6 GB in fp32 for the
embedded default), and we only keep K of them. Here the head is applied to chunks of tokens, so
at most ``[chunk, V]`` fp32 logits exist at a time, and the probabilities of the K kept entries
come from the log-sum-exp without writing a full softmax matrix:

    p_i = softmax(W h)_i = exp(z_i - logsumexp(z)),   z = W h in fp32.
"""

from __future__ import annotations

import torch

from dspark_offline.linalg import vocab_logits

# Budget for one chunk of fp32 logits; 256 MiB keeps peak memory flat yet amortises the matmul.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


def chunk_tokens_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that ``[chunk, V]`` fp32 logits fit ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size))


def topk_from_final(
    final_hidden: torch.Tensor,
    lm_head: torch.Tensor,
    k: int,
    *,
    chunk_tokens: int | None = None,
    logits_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and probabilities of ``softmax(final_hidden @ lm_head.T)``.

    Args:
        final_hidden: ``[..., H]`` post-norm hidden states (any float dtype, any device).
        lm_head: ``[V, H]`` output embedding. Pass it already in ``logits_dtype`` to avoid a
            per-call conversion of the whole matrix.
        k: entries to keep, ``1 <= k <= V``.
        chunk_tokens: tokens per chunk; default keeps ``[chunk, V]`` fp32 logits ~256 MiB.
        logits_dtype: dtype of the head matmul (fp32 by default, DESIGN.md §3). Softmax and
            log-sum-exp are always fp32.

    Returns:
        ``ids`` int64 ``[..., K]`` and ``probs`` float32 ``[..., K]``, sorted by descending
        probability, on the device of ``final_hidden``.
    """
    if final_hidden.shape[-1] != lm_head.shape[-1] or lm_head.dim() != 2:
        raise ValueError(
            f"final_hidden [..., {final_hidden.shape[-1]}] does not match lm_head "
            f"{list(lm_head.shape)} (expected [V, H])"
        )
    vocab = lm_head.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k={k} must be in [1, vocab_size={vocab}]")
    lead = final_hidden.shape[:-1]
    flat = final_hidden.reshape(-1, final_hidden.shape[-1])  # [T, H]
    n = flat.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64, device=flat.device)  # [T, K]
    probs = torch.empty(n, k, dtype=torch.float32, device=flat.device)  # [T, K]
    weight = lm_head.to(device=flat.device, dtype=logits_dtype)  # [V, H]; no copy when already so
    step = chunk_tokens or chunk_tokens_for(vocab)
    for start in range(0, n, step):
        h = flat[start : start + step].to(logits_dtype)  # [c, H]
        logits = vocab_logits(h, weight).float()  # [c, V] fp32
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [c, 1]
        top, top_ids = torch.topk(logits, k, dim=-1, sorted=True)  # [c, K]
        probs[start : start + step] = torch.exp(top - lse)
        ids[start : start + step] = top_ids
    return ids.reshape(*lead, k), probs.reshape(*lead, k)
