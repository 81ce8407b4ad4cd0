"""Batch math and the DeepSpeed config, derived from ``params.train`` in one place.

    global batch = micro_batch_size x grad_accum x data-parallel world size

Every number the loop, the sampler, the LR schedule and DeepSpeed need comes from
:func:`plan_batches`, so they cannot disagree; :func:`deepspeed_config` writes the same numbers
into the dict DeepSpeed validates again (``train_batch_size`` must equal the product).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from dspark_offline.config import TrainConfig
from dspark_offline.target.device import resolve_dtype as resolve_target_dtype
from dspark_offline.train.schedule import warmup_steps_for


class BatchPlanError(ValueError):
    """The store is too small for the requested batch, or the batch numbers are inconsistent."""


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int  # samples per rank per forward
    grad_accum: int  # micro-batches per optimizer step
    world_size: int  # data-parallel ranks
    global_batch: int  # samples per optimizer step over all ranks
    num_samples: int  # samples kept after filters
    num_tokens: int  # their tokens after max_length truncation
    steps_per_epoch: int  # optimizer steps per pass (the incomplete last batch is dropped)
    total_steps: int  # optimizer steps of the run
    warmup_steps: int
    epochs: float  # passes over the data the run makes

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = micro {self.micro_batch_size} x accum {self.grad_accum} "
            f"x world {self.world_size}; {self.num_samples} samples / {self.num_tokens} tokens; "
            f"{self.steps_per_epoch} steps/epoch; {self.total_steps} steps ({self.epochs:.2f} epochs, "
            f"warmup {self.warmup_steps}); ~{self.tokens_per_step:.0f} tokens/step, "
            f"~{self.tokens_per_step * self.total_steps:.0f} tokens total"
        )

    @property
    def tokens_per_step(self) -> float:
        return self.num_tokens / max(1, self.num_samples) * self.global_batch

    def as_dict(self) -> dict:
        return asdict(self)


def plan_batches(train: TrainConfig, num_samples: int, num_tokens: int, world_size: int) -> BatchPlan:
    """Derive the run's batch numbers; raise when the data cannot fill one global batch."""
    if world_size < 1:
        raise BatchPlanError(f"world size must be >= 1, got {world_size}")
    global_batch = train.micro_batch_size * train.grad_accum * world_size
    if num_samples < global_batch:
        raise BatchPlanError(
            f"{num_samples} training samples (after max_length / min_loss_tokens filters) cannot fill one "
            f"global batch of {global_batch} = train.micro_batch_size {train.micro_batch_size} x "
            f"train.grad_accum {train.grad_accum} x world {world_size}"
        )
    steps_per_epoch = num_samples // global_batch
    if train.max_steps is not None:
        total_steps = train.max_steps
    else:
        total_steps = max(1, math.ceil(train.num_epochs * steps_per_epoch))
    plan = BatchPlan(
        micro_batch_size=train.micro_batch_size,
        grad_accum=train.grad_accum,
        world_size=world_size,
        global_batch=global_batch,
        num_samples=num_samples,
        num_tokens=num_tokens,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps_for(total_steps, train.warmup_ratio),
        epochs=total_steps / steps_per_epoch,
    )
    if plan.global_batch != plan.micro_batch_size * plan.grad_accum * plan.world_size:
        raise BatchPlanError(f"inconsistent batch plan: {plan}")
    return plan


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``train.dtype`` -> torch dtype by the target's rule (`target/device.py`): 'auto' = bf16 on
    CUDA, fp32 on CPU (`TrainConfig` does not offer fp16)."""
    return resolve_target_dtype(name, device, field="train.dtype")


def deepspeed_config(train: TrainConfig, plan: BatchPlan, dtype: torch.dtype, device: torch.device) -> dict:
    """The DeepSpeed config dict. The optimizer and LR scheduler are passed as objects, not here."""
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": train.zero_stage,
            # Overlapping needs CUDA streams; on CPU it only adds copies.
            "overlap_comm": device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        # A plain torch.optim.AdamW is passed in (no CUDA-style fused op to JIT-compile on CPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves (rank-0 sink + tqdm)
        "wall_clock_breakdown": False,
    }
