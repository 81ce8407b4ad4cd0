"""The DSpark drafter: DFlash backbone + Markov head + confidence head (DESIGN §4).

One forward drafts a whole block: the block input is `[x[a], MASK × (B−1)]` embedded with the
frozen target embedding at positions a..a+B−1, attending to the target context of positions
< a and to itself. Slot j's output predicts x[a+j+1] (the "all-slots" convention SGLang's
DSpark loader and DeepSpec use; a drafter trained with another slot convention is useless when
served).

The target `embed_tokens`/`lm_head` are frozen, non-persistent buffers: never trained, never in
`state_dict()` (so neither in DeepSpeed checkpoints nor in the serving export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dspark_offline.linalg import vocab_logits

from .attention_mask import BlockLayout, block_layout
from .config import DraftModelConfig
from .heads import HEAD_INIT_STD, ConfidenceHead, MarkovHead
from .layers import DraftDecoderLayer, RMSNorm, rope_cos_sin


@dataclass
class DraftOutput:
    """Training forward of a batch of blocks (Bt rows, A blocks per row, B slots per block).

    Blocks attend to the context and to themselves, never to each other, so a block's states
    depend only on what every block shares (the context's keys and values in each layer) and on
    its own input. `hidden` holds every block's states when the forward computed them at once;
    a deferred forward (`defer_blocks=True`, what training uses) computes only the shared part,
    and `DSparkDraft.block_hidden` computes the blocks the objective asks for, a chunk at a time
    under activation checkpointing, so a step's memory does not grow with the number of blocks.
    """

    ctx_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per draft layer: context keys, values [Bt, nkv, S, hd]
    block_ids: torch.Tensor  # [Bt, A, B] int64 block inputs [x[a], MASK × (B−1)]
    anchors: torch.Tensor  # [Bt, A] int64
    keep: torch.Tensor  # [Bt, A] bool, False = padding block
    hidden: torch.Tensor | None = None  # [Bt, A, B, H] final-norm draft states (None: deferred)


class DraftBlock(NamedTuple):
    """One inference block, sampled left to right through the Markov head (unpacks as a tuple)."""

    tokens: torch.Tensor  # [B] int64 drafted tokens; tokens[j] is the guess for x[a+j+1]
    confidence_logits: torch.Tensor | None  # [B] float32 (None without a confidence head)
    probs: torch.Tensor  # [B, V] float32 draft distribution each token was sampled from


class DSparkDraft(nn.Module):
    def __init__(self, cfg: DraftModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.layers = nn.ModuleList([DraftDecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.fc = nn.Linear(cfg.num_context_layers * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.markov_head = MarkovHead(cfg.vocab_size, cfg.markov_rank) if cfg.markov_head else None
        self.confidence_head = (
            ConfidenceHead(h, cfg.markov_rank, with_markov=cfg.markov_head) if cfg.confidence_head else None
        )
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and not name.startswith(("markov_head", "confidence_head")):
                nn.init.normal_(mod.weight, std=HEAD_INIT_STD)
        self.register_buffer("embed_weight", None, persistent=False)  # [V, H] frozen target embedding
        self.register_buffer("lm_head_weight", None, persistent=False)  # [V, H] frozen target head
        # Optional training vocabulary (see set_train_vocab): ids [Vs] and the position of each
        # vocabulary id among them [V] (-1 = outside). Training-only; serving scores all of V.
        self.register_buffer("train_vocab", None, persistent=False)
        self.register_buffer("train_vocab_index", None, persistent=False)

    # ---------------------------------------------------------------- frozen target head
    def set_target_head(
        self, embed_tokens: torch.Tensor | nn.Module, lm_head: torch.Tensor | nn.Module
    ) -> None:
        """Attach the target's embedding and lm_head (tensors [V, H] or Embedding/Linear)."""
        emb = embed_tokens.weight if isinstance(embed_tokens, nn.Module) else embed_tokens
        head = lm_head.weight if isinstance(lm_head, nn.Module) else lm_head
        want = (self.cfg.vocab_size, self.cfg.hidden_size)
        for name, w in (("embed_tokens", emb), ("lm_head", head)):
            if tuple(w.shape) != want:
                raise ValueError(
                    f"target {name} has shape {tuple(w.shape)}, the drafter expects {want} (V, H)"
                )
        dtype, dev = self.fc.weight.dtype, self.fc.weight.device
        self.embed_weight = emb.detach().to(device=dev, dtype=dtype)
        self.lm_head_weight = head.detach().to(device=dev, dtype=dtype)

    def set_train_vocab(self, ids: torch.Tensor | None) -> None:
        """Restrict the *training* logits to the vocabulary entries ``ids`` [Vs] (None: all of V).

        The objective then computes draft logits, softmax, CE and L1 over these Vs entries only
        (the rest get probability 0), which is where a training step spends most of its time
        when V is large. The parameters and the serving format do not change.
        """
        if ids is None:
            self.train_vocab = self.train_vocab_index = None
            return
        ids = torch.as_tensor(ids, dtype=torch.int64).flatten().unique()  # sorted, no duplicates
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.cfg.vocab_size:
            raise ValueError(
                f"training vocabulary must be a non-empty set of ids in [0, {self.cfg.vocab_size})"
            )
        dev = self.fc.weight.device
        index = torch.full((self.cfg.vocab_size,), -1, dtype=torch.int64)
        index[ids] = torch.arange(ids.numel())
        self.train_vocab, self.train_vocab_index = ids.to(dev), index.to(dev)

    def _require_head(self) -> None:
        if self.embed_weight is None or self.lm_head_weight is None:
            raise RuntimeError(
                "DSparkDraft has no target embedding/lm_head: call set_target_head(embed, lm_head)"
            )

    # ---------------------------------------------------------------- building blocks
    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target layer states [Bt, T, L, H] -> ctx [Bt, T, H] = hidden_norm(fc(concat_L))."""
        if hidden.shape[-2:] != (self.cfg.num_context_layers, self.cfg.hidden_size):
            raise ValueError(
                f"target hidden states have shape {tuple(hidden.shape)}; "
                f"expected [..., L={self.cfg.num_context_layers}, H={self.cfg.hidden_size}] "
                f"(layer ids {list(self.cfg.target_layer_ids)})"
            )
        flat = hidden.flatten(-2).to(self.fc.weight.dtype)  # [Bt, T, L·H], layer-major concat
        return self.hidden_norm(self.fc(flat))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., H]
        self._require_head()
        return nn.functional.embedding(ids, self.embed_weight)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [Bt, N, hd] at positions [Bt, N]."""
        # RoPE frequencies are recomputed in fp32 each call (not a buffer: a bf16 cast of the
        # module would round them and shift every position)
        hd = self.cfg.head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (
            torch.arange(0, hd, 2, dtype=torch.float32, device=positions.device) / hd
        )  # [hd/2]
        return rope_cos_sin(positions, inv_freq, dtype)

    def context_kv(
        self, ctx: torch.Tensor, ctx_positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """ctx [Bt, T, H] at positions [Bt, T] -> per draft layer its context keys and values
        [Bt, nkv, T, hd]: what every block of the batch attends to."""
        rope_ctx = self._rope(ctx_positions, ctx.dtype)
        return [layer.self_attn.context_kv(ctx, rope_ctx) for layer in self.layers]

    def backbone(
        self,
        block_embeds: torch.Tensor,  # [Bt, Q, H]
        block_positions: torch.Tensor,  # [Bt, Q] int64
        ctx: torch.Tensor,  # [Bt, T, H]
        ctx_positions: torch.Tensor,  # [Bt, T] int64
        mask: torch.Tensor | BlockLayout,  # [Bt, Q, T+Q] bool, or its compact BlockLayout
    ) -> torch.Tensor:  # [Bt, Q, H] final-norm states
        return self._blocks(block_embeds, block_positions, self.context_kv(ctx, ctx_positions), mask)

    def _blocks(self, block_embeds, block_positions, ctx_kv, mask) -> torch.Tensor:  # [Bt, Q, H]
        """The decoder layers over block queries, given every layer's context keys/values."""
        rope_q = self._rope(block_positions, block_embeds.dtype)
        x = block_embeds
        for layer, kv in zip(self.layers, ctx_kv, strict=True):
            x = layer(x, kv, rope_q, mask)
        return self.norm(x)

    def head_logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen target head alone: hidden [..., H] -> lm_head(h) [..., V] float32
        ([..., len(vocab)] over the vocabulary entries ``vocab`` only when given)."""
        self._require_head()
        head = self.lm_head_weight if vocab is None else self.lm_head_weight[vocab]  # [V or Vs, H]
        return vocab_logits(hidden.to(head.dtype), head).float()

    def block_logits(
        self, hidden: torch.Tensor, prev_ids: torch.Tensor, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draft logits [..., V] float32 = lm_head(h) (+ W2(W1[prev]) with the Markov head);
        [..., len(vocab)] over the vocabulary entries ``vocab`` only when given."""
        return self._add_markov(self.head_logits(hidden, vocab), prev_ids, vocab)

    def _add_markov(
        self, head_logits: torch.Tensor, prev_ids: torch.Tensor, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.markov_head is None:
            return head_logits
        return head_logits + self.markov_head.bias(prev_ids, rows=vocab).float()

    def confidence_logits(self, hidden: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """Confidence logits [...] float32 on [h ; W1[prev]] (None without the head)."""
        if self.confidence_head is None:
            return None
        prev_emb = self.markov_head.prev_embedding(prev_ids) if self.markov_head is not None else None
        return self.confidence_head(hidden, prev_emb).float()

    # ---------------------------------------------------------------- training forward
    def forward(
        self,
        input_ids: torch.Tensor,  # [Bt, S] int64
        hidden: torch.Tensor,  # [Bt, S, L, H] target layer states
        anchors: torch.Tensor,  # [Bt, A] int64
        keep: torch.Tensor,  # [Bt, A] bool
        defer_blocks: bool = False,
    ) -> DraftOutput:
        """Every block's states at once, or with ``defer_blocks`` only the context keys/values
        every block shares (the block states then come from `block_hidden`, see `DraftOutput`)."""
        bt, s = input_ids.shape
        a, b = anchors.shape[1], self.cfg.block_size
        ctx = self.context(hidden)  # [Bt, S, H]
        ctx_kv = self.context_kv(ctx, torch.arange(s, device=input_ids.device).expand(bt, s))
        block_ids = torch.full((bt, a, b), self.cfg.mask_token_id, dtype=torch.int64, device=input_ids.device)
        block_ids[:, :, 0] = torch.gather(input_ids, 1, anchors)  # x[a]
        out = DraftOutput(ctx_kv=ctx_kv, block_ids=block_ids, anchors=anchors, keep=keep)
        if defer_blocks:
            return out
        embeds = self.embed(block_ids).flatten(1, 2).to(ctx.dtype)  # [Bt, A·B, H]
        positions = anchors[:, :, None] + torch.arange(b, device=input_ids.device)  # [Bt, A, B]
        mask = block_layout(anchors, keep, s, b)  # block n sees ctx < a_n and itself
        out.hidden = self._blocks(embeds, positions.flatten(1), ctx_kv, mask).view(bt, a, b, -1)
        return out

    def block_hidden(self, out: DraftOutput, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The final-norm states [n, B, H] of blocks (rows[i], blocks[i]) of a forward's output
        (rows, blocks [n] int64, in any order; `BlockTargets` holds them sorted by row).

        Selected from `out.hidden` when the forward computed every block; otherwise computed here
        for these blocks only, one backbone call per run of blocks of the same row (a block sees
        only its own row's context): the operations of the all-at-once forward on fewer rows, so
        equal to it up to float rounding (matmuls of other shapes may sum in another order).
        """
        if out.hidden is not None:
            return out.hidden[rows, blocks]
        b, s = self.cfg.block_size, out.ctx_kv[0][0].shape[2]
        dtype = out.ctx_kv[0][0].dtype
        # one backbone call per run of equal rows (a host sync; a chunk usually spans one or two rows)
        uniq, counts = torch.unique_consecutive(rows, return_counts=True)
        if len(uniq) == 0:  # no block: an empty call on row 0 keeps every parameter in the graph
            uniq, counts = rows.new_zeros(1), rows.new_zeros(1)
        parts, lo = [], 0
        for r, n in zip(uniq.tolist(), counts.tolist(), strict=True):
            blk = blocks[lo : lo + n]  # [n]
            lo += n
            anchors, keep = out.anchors[r, blk][None], out.keep[r, blk][None]  # [1, n]
            embeds = self.embed(out.block_ids[r, blk]).flatten(0, 1)[None].to(dtype)  # [1, n·B, H]
            positions = (anchors[:, :, None] + torch.arange(b, device=anchors.device)).flatten(1)  # [1, n·B]
            mask = block_layout(anchors, keep, s, b)
            kv = [(k[r : r + 1], v[r : r + 1]) for k, v in out.ctx_kv]
            parts.append(self._blocks(embeds, positions, kv, mask).view(n, b, self.cfg.hidden_size))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def draft_block(
        self,
        ctx: torch.Tensor,  # [1, T, H] from context(); only positions < start_position are used
        ctx_positions: torch.Tensor,  # [T] int64 positions of the ctx rows
        last_token: int | torch.Tensor,  # x[a]: the last accepted token, first block input
        start_position: int,  # a: position of last_token
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> DraftBlock:
        """Draft one block: one backbone forward, then sample slots left to right.

        Slot 0 uses prev = last_token, slot j uses the token sampled at slot j−1 (exactly how
        the Markov head was teacher-forced). At temperature 0 the token is the argmax and
        `probs` is its one-hot (the drafter is deterministic, which greedy verification
        assumes); at T > 0 `probs[j] = softmax(logits_j / T)`, the distribution rejection
        sampling needs.
        """
        b, dev = self.cfg.block_size, ctx.device
        last = torch.as_tensor(last_token, dtype=torch.int64, device=dev).reshape(1)
        positions = (start_position + torch.arange(b, device=dev))[None]  # [1, B]
        ids = torch.full((1, b), self.cfg.mask_token_id, dtype=torch.int64, device=dev)
        ids[0, 0] = last[0]
        anchors = torch.tensor([[start_position]], device=dev)
        keep = torch.ones(1, 1, dtype=torch.bool, device=dev)
        pos = ctx_positions.to(dev).reshape(1, -1)  # [1, T]
        mask = block_layout(anchors, keep, pos.shape[1], b, ctx_positions=pos)
        h = self.backbone(self.embed(ids).to(ctx.dtype), positions, ctx, pos, mask)[0]  # [B, H]
        # The lm_head part of every slot in ONE [B, H] x [H, V] matmul: the head weight is read
        # once per block instead of once per slot (on CPU that read dominates). Only the Markov
        # bias depends on the previous slot's token.
        head = self.head_logits(h)  # [B, V]
        if temperature == 0 and self.markov_head is not None:
            return self._greedy_block(h, head, last)
        tokens, probs, conf = [], [], []
        prev = last
        for j in range(b):
            logits = self._add_markov(head[j : j + 1], prev)[0]  # [V]
            c = self.confidence_logits(h[j : j + 1], prev)
            if temperature > 0:
                p = torch.softmax(logits / temperature, dim=-1)
                tok = _sample(p, generator)
            else:
                tok = logits.argmax().reshape(1)
                p = torch.zeros_like(logits).scatter_(0, tok, 1.0)
            tokens.append(tok)
            probs.append(p)
            if c is not None:
                conf.append(c)
            prev = tok
        return DraftBlock(
            tokens=torch.cat(tokens),
            confidence_logits=torch.cat(conf) if conf else None,
            probs=torch.stack(probs),
        )

    def _greedy_block(self, h: torch.Tensor, head: torch.Tensor, last: torch.Tensor) -> DraftBlock:
        """Greedy slots with the Markov head, as a fixed-point iteration over whole blocks.

        Slot j's token is argmax(head_j + bias(prev_j)) with prev_j = slot j−1's token, a chain
        that a per-slot loop walks with one [1, r] x [r, V] bias each (reading W2 once per slot).
        Here every iteration computes the biases of all B guessed previous tokens in one
        [B, r] x [r, V] matmul and re-derives the guesses from the resulting tokens. Slot 0's
        previous token is known, so after iteration i slots 0..i are exact: at most B iterations,
        and the iteration stops as soon as the guesses reproduce themselves, which only the
        sequential answer does. The first guess (slot j−1's argmax without its bias) usually
        holds for most slots, so blocks typically take 2–3 iterations.
        h [B, H], head [B, V] float32, last [1] -> the block's tokens, one-hot probs, confidence.
        """
        prev = torch.cat([last, head[:-1].argmax(dim=-1)])  # [B] guessed previous tokens
        for _ in range(len(prev)):
            tokens = (head + self.markov_head.bias(prev).float()).argmax(dim=-1)  # [B]
            implied = torch.cat([last, tokens[:-1]])
            if torch.equal(implied, prev):
                break
            prev = implied
        return DraftBlock(
            tokens=tokens,
            confidence_logits=self.confidence_logits(h, prev),
            probs=torch.zeros_like(head).scatter_(1, tokens[:, None], 1.0),
        )


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:  # [V] -> [1]
    """Multinomial draw on the generator's device (a CPU generator works for a CUDA model)."""
    if generator is not None and generator.device != p.device:
        return torch.multinomial(p.to(generator.device), 1, generator=generator).to(p.device)
    return torch.multinomial(p, 1, generator=generator)
