"""The resumable, distributed data order of a training run.

`ResumableSampler` gives every rank its micro-batches of each global batch from a seeded per-epoch
permutation. Its position ``(epoch, index)`` (samples of the epoch consumed by all ranks) is what
checkpoints save, so ``--resume`` continues with the same data order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Sampler

from dspark_offline.train.seeds import seed_for


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
