"""Training data over a feature store: sample filter, Dataset, collate, resumable sampler.

* :func:`select_samples` applies ``max_length`` / ``min_loss_tokens`` once, from ``lengths`` and
  the per-sample ``loss_mask`` only (never the hidden states), and returns the kept store indices.
* :class:`FeatureDataset` reads one sample per ``__getitem__`` through the store reader (random
  access; nothing is loaded up front). A read error is raised with the sample named, never
  papered over with another sample.
* :func:`collate` right-pads a micro-batch.
* :class:`ResumableSampler` gives every rank its micro-batches of each global batch from a
  seeded per-epoch permutation. Its position ``(epoch, index)`` (samples of the epoch consumed
  by all ranks) is what checkpoints save, so ``--resume`` continues with the same data order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from dspark_offline.model import sample_anchors
from dspark_offline.model.loss import needs_final_hidden
from dspark_offline.store.manifest import StoreMismatchError, check_compatible
from dspark_offline.target.layers import resolve_layer_ids

# per-token fields of a stored sample, truncated and padded together
_TOKEN_FIELDS = ("input_ids", "loss_mask", "hidden", "final_hidden", "topk_ids", "topk_probs")


class SampleReadError(RuntimeError):
    """Reading one sample from the store failed; the message names the sample."""


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixing integers (e.g. run seed, epoch) with no accidental collisions."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def select_samples(store: Any, max_length: int | None, min_loss_tokens: int, *, progress: bool = True) -> np.ndarray:
    """Store indices of the samples to train on: at least ``min_loss_tokens`` supervised tokens
    within the first ``max_length`` tokens. Returns int64 [N_kept] in store order.

    Short samples are rejected from ``lengths`` alone; the others need their loss mask (a few
    bytes per token), read through ``store.loss_mask(i)`` rather than the whole sample.
    """
    lengths = np.asarray(store.lengths, dtype=np.int64)  # [N]
    eff = np.minimum(lengths, max_length) if max_length is not None else lengths  # [N]
    candidates = np.flatnonzero(eff >= max(min_loss_tokens, 1))
    if min_loss_tokens <= 0:
        return candidates.astype(np.int64)
    kept = []
    for i in tqdm(candidates, desc="loss-mask filter", unit="sample", disable=not progress, leave=False):
        mask = store.loss_mask(int(i))  # [S] bool, 1 byte/token
        if int(np.asarray(mask[: eff[i]]).astype(bool).sum()) >= min_loss_tokens:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def check_store(store: Any, params: Any, draft_cfg: Any, resume_meta: dict | None = None) -> None:
    """Refuse, before step 1, a store that cannot train this drafter (messages name both values).

    Checks the store against the params (target, layer ids) and the drafter config (hidden
    size, vocab, top-k, final_hidden for the ``l1_mode`` values that read it) through the store's own
    ``check_compatible``; on resume also against the store the checkpoint was trained on.
    """
    m = store.manifest
    mode = params.train.l1_mode
    if needs_final_hidden(mode) and not m.has_final_hidden:
        raise StoreMismatchError(
            f"feature store ({store.path}) has_final_hidden=False but train.l1_mode={mode!r} needs "
            "has_final_hidden=True: dump with dump.store_final_hidden=true, or train with "
            "train.l1_mode=capped (the tightest bound from the top-k alone) or topk"
        )
    want_layers = resolve_layer_ids(params.dump.layer_ids, m.target.num_hidden_layers, params.dump.num_layer_ids)
    check_compatible(
        m,
        target_name=params.target.path,
        layer_ids=want_layers,
        hidden_size=draft_cfg.hidden_size,
        vocab_size=draft_cfg.vocab_size,
        need_topk=True,
        need_final_hidden=needs_final_hidden(mode),
        store=store.path,
    )
    if list(m.layer_ids) != list(draft_cfg.target_layer_ids):
        raise StoreMismatchError(
            f"feature store ({store.path}) layer_ids={list(m.layer_ids)} but the drafter config needs "
            f"layer_ids={list(draft_cfg.target_layer_ids)}"
        )
    _probe_first_sample(store, need_final_hidden=needs_final_hidden(mode))
    if resume_meta is not None and resume_meta.get("store_fingerprint") != m.params_fingerprint:
        raise StoreMismatchError(
            f"feature store ({store.path}) params_fingerprint={m.params_fingerprint} but the checkpoint being "
            f"resumed was trained on params_fingerprint={resume_meta.get('store_fingerprint')}"
        )


def _probe_first_sample(store: Any, need_final_hidden: bool) -> None:
    """Read sample 0 and check its arrays against the manifest, so a store whose arrays are
    missing or malformed fails before step 1 rather than at some later batch."""
    m = store.manifest
    try:
        s = store.sample(0)
    except Exception as e:
        raise SampleReadError(f"feature store ({store.path}): cannot read sample 0: {type(e).__name__}: {e}") from e
    n, L, H, K = len(s.input_ids), len(m.layer_ids), m.target.hidden_size, m.top_k
    want = {"hidden": (n, L, H), "topk_ids": (n, K), "topk_probs": (n, K)}
    if need_final_hidden:
        want["final_hidden"] = (n, H)
    for name, shape in want.items():
        t = getattr(s, name)
        got = None if t is None else tuple(t.shape)
        if got != shape:
            raise StoreMismatchError(
                f"feature store ({store.path}) sample 0 has {name} of shape {got} but the manifest "
                f"(layer_ids={list(m.layer_ids)}, hidden_size={H}, top_k={K}) needs {shape}"
            )


def batch_anchors(batch: dict, num_anchors: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors [Bt, A] int64 and keep [Bt, A] bool for a micro-batch.

    Each sample draws from its own generator seeded by (seed, step, dataset index). That is a
    function of the data order only, so a resumed run draws exactly the anchors of an
    uninterrupted one, and so does a run with another world size / micro-batch split of the
    same global batch (what makes 1 x micro 2 and 2 x micro 1 give identical steps).
    """
    rows = []
    for b in range(len(batch["lengths"])):
        g = torch.Generator().manual_seed(seed_for(seed, step, int(batch["index"][b])))
        n = int(batch["lengths"][b])
        rows.append(sample_anchors(batch["loss_mask"][b : b + 1, :n], batch["lengths"][b : b + 1], num_anchors, g))
    width = max(a.shape[1] for a, _ in rows)
    anchors = torch.zeros(len(rows), width, dtype=torch.int64)  # [Bt, A], padding anchor 0
    keep = torch.zeros(len(rows), width, dtype=torch.bool)  # [Bt, A]
    for b, (a, k) in enumerate(rows):
        anchors[b, : a.shape[1]], keep[b, : k.shape[1]] = a[0], k[0]
    return anchors, keep


def loader_workers(device: torch.device) -> int:
    """DataLoader workers: 2 on CUDA (reads overlap the GPU step; the reader reopens the store in
    each worker), 0 on CPU where every core already computes and a worker would only compete."""
    return 2 if device.type == "cuda" else 0


class FeatureDataset(Dataset):
    """Random access to the kept samples of a store; item ``k`` is store sample ``indices[k]``.

    With ``cache_bytes`` > 0 the decoded items are kept in memory until they fill it (first come,
    first kept), so later epochs skip the store for them. Items are returned as stored: callers
    must not modify their tensors in place (`collate` copies them into new batch tensors).
    """

    def __init__(self, store: Any, indices: np.ndarray, max_length: int | None, cache_bytes: int = 0) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.max_length = max_length
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, dict[str, Any]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        out = self._read(k)
        size = sum(t.numel() * t.element_size() for t in out.values() if isinstance(t, torch.Tensor))
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[k] = out
            self._cached_bytes += size
        return out

    def _read(self, k: int) -> dict[str, Any]:
        i = int(self.indices[k])
        try:
            s = self.store.sample(i)
        except Exception as e:  # re-raised with the sample named; never substituted
            raise SampleReadError(f"failed to read sample {i} (dataset item {k}) from the feature store: {e}") from e
        out: dict[str, Any] = {"index": k, "store_index": i, "sample_id": int(s.sample_id)}
        for name in _TOKEN_FIELDS:
            t = getattr(s, name)
            out[name] = None if t is None else t[: self.max_length]  # [S', ...]
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad a micro-batch. Padding: token 0, loss_mask False, features 0; ``lengths`` marks it.

    Returns input_ids [Bt, S] int64, loss_mask [Bt, S] bool, hidden [Bt, S, L, H],
    final_hidden [Bt, S, H] | None, topk_ids [Bt, S, K] int64, topk_probs [Bt, S, K] float32,
    lengths [Bt] int64, index / store_index / sample_id [Bt] int64.
    """
    lengths = torch.tensor([len(it["input_ids"]) for it in items], dtype=torch.int64)  # [Bt]
    s_max = int(lengths.max())
    batch: dict[str, Any] = {"lengths": lengths}
    for key in ("index", "store_index", "sample_id"):
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.int64)
    for name in _TOKEN_FIELDS:
        rows = [it[name] for it in items]
        if any(r is None for r in rows):
            batch[name] = None
            continue
        first = rows[0]
        out = torch.zeros((len(rows), s_max, *first.shape[1:]), dtype=first.dtype)  # [Bt, S, ...]
        for b, r in enumerate(rows):
            out[b, : len(r)] = r
        batch[name] = out
    return batch


@dataclass(frozen=True)
class SamplerPosition:
    epoch: int = 0
    index: int = 0  # samples of this epoch already consumed by all ranks together

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ResumableSampler(Sampler[int]):
    """Endless, seeded, distributed sampler over ``range(num_samples)`` in global batches.

    Epoch ``e`` uses the permutation seeded by ``(seed, e)`` and drops the incomplete last
    global batch. Within a global batch of G = world x accum x micro samples, accumulation step
    ``k`` of rank ``r`` gets the ``micro`` samples at offset ``(k x world + r) x micro``, so one
    process with micro 2b and two processes with micro b see the same samples per step.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        position: SamplerPosition = SamplerPosition(),
    ) -> None:
        self.num_samples = num_samples
        self.micro, self.accum, self.world, self.rank = micro_batch_size, grad_accum, world_size, rank
        self.global_batch = micro_batch_size * grad_accum * world_size
        if num_samples < self.global_batch:
            raise ValueError(f"{num_samples} samples cannot fill a global batch of {self.global_batch}")
        self.seed = seed
        self.position = position

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_for(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)  # [N]

    def advance(self, pos: SamplerPosition) -> SamplerPosition:
        """The position after one global batch (an optimizer step)."""
        nxt = pos.index + self.global_batch
        if nxt + self.global_batch > self.num_samples:  # the rest cannot fill a batch: next epoch
            return SamplerPosition(pos.epoch + 1, 0)
        return SamplerPosition(pos.epoch, nxt)

    def rank_indices(self, pos: SamplerPosition, perm: torch.Tensor | None = None) -> list[int]:
        """This rank's samples of the global batch at ``pos``, in micro-batch order."""
        perm = self.order(pos.epoch) if perm is None else perm
        out: list[int] = []
        for k in range(self.accum):
            start = pos.index + (k * self.world + self.rank) * self.micro
            out.extend(perm[start : start + self.micro].tolist())
        return out

    def __iter__(self) -> Iterator[int]:
        pos, epoch, perm = self.position, None, None
        while True:
            if pos.epoch != epoch:
                epoch, perm = pos.epoch, self.order(pos.epoch)
            yield from self.rank_indices(pos, perm)
            pos = self.advance(pos)
