"""Stage 2: train the DSpark drafter from the feature store with DeepSpeed ZeRO-2.

The target is never loaded: the store holds its layer states, top-k and head weights.

    # one process (CPU: fp32 or bf16, gloo; a world of one is set up here)
    dspark-offline train --params params.yaml
    # one node, 8 GPUs
    torchrun --nproc_per_node=8 -m dspark_offline.cli train --params params.yaml
    deepspeed --num_gpus=8 --no_local_rank --module dspark_offline.cli train --params params.yaml
    # several nodes (hostfile lines: "node1 slots=8"), shared filesystem for store + output_dir
    deepspeed --hostfile hosts --no_local_rank --module dspark_offline.cli train --params params.yaml
    torchrun --nnodes=2 --node_rank=$NODE --nproc_per_node=8 --rdzv_endpoint=$HOST0:29500 -m ...
    # CPU, 2 processes (what CI runs):  DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 -m ...

(``--no_local_rank``: the launchers' rank comes from the environment; the CLI takes no
``--local_rank`` argument.)

A tiny CPU run (a store from the tiny profile, `train.max_steps: 5`) takes seconds.
`train.resume: true` continues from the latest checkpoint with the same data order and anchors.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dspark_offline.config import Params
from dspark_offline.model import DraftModelConfig, DSparkDraft, LossConfig
from dspark_offline.target.embedded import resolve_target_path
from dspark_offline.train import checkpoint, dist, preflight
from dspark_offline.train.anchors import batch_anchors
from dspark_offline.train.dataset import FeatureDataset, collate
from dspark_offline.train.ds_config import deepspeed_config, plan_batches, resolve_dtype
from dspark_offline.train.layer_init import init_layers_from_target
from dspark_offline.train.loader import DataWait, loader_workers
from dspark_offline.train.markov_init import init_markov_bigram
from dspark_offline.train.metrics import VAL_COLUMNS, MetricsSink, pool_step_metrics
from dspark_offline.train.sampler import ResumableSampler, SamplerPosition
from dspark_offline.train.schedule import WarmupCosine, make_scheduler
from dspark_offline.train.selection import select_samples
from dspark_offline.train.step import local_sums, pooled_loss
from dspark_offline.train.validate import Validator, split_validation
from dspark_offline.train.vocab import training_vocabulary

BIGRAM_TABLE_SIZE = 8192  # tokens of the bigram table when there is no training vocabulary


def _say(msg: str, main: bool) -> None:
    """Rank-0 console line that does not break the progress bar (the CLI configures no logging)."""
    if main:
        tqdm.write(f"[train] {msg}")


def run(params: Params) -> dict:
    """Train; returns the summary also written to ``<output_dir>/metrics.json``."""
    tc, out_dir = params.train, Path(params.train.output_dir)
    info = dist.setup()
    import deepspeed  # after dist.setup(): DS_ACCELERATOR must be set before DeepSpeed picks one

    # -- data: store -> compatibility -> filter -> batch math (refusals first: train/preflight.py) --
    say = functools.partial(_say, main=info.is_main)
    resume_from = preflight.check_output_dir_for_run(params)
    store = preflight.open_training_store(params, say)
    cfg = DraftModelConfig.from_manifest(store.manifest, params.draft)
    resume_meta = checkpoint.read_meta(resume_from) if resume_from else None
    preflight.check_store(store, params, resume_meta)
    say(preflight.check_target_weights(store, params))
    if resume_meta is not None:
        preflight.check_resume(resume_meta, params, cfg.to_dict(), resume_from, say)
    usable = select_samples(store, tc.max_length, tc.min_loss_tokens, progress=info.is_main)
    preflight.check_usable(len(usable), len(store), params, info.world_size)
    indices, val_indices = split_validation(usable, tc.val_samples, tc.seed)
    indices = indices[: tc.max_samples]  # None keeps all
    lengths = (
        store.lengths[indices] if tc.max_length is None else store.lengths[indices].clip(max=tc.max_length)
    )
    plan = plan_batches(tc, len(indices), int(lengths.sum()), info.world_size)
    held = f", {len(val_indices)} held out for validation" if len(val_indices) else ""
    _say(
        f"rank {info.rank}/{info.world_size} on {info.device} ({info.backend}); store {store.path}: "
        f"{len(indices)}/{len(store)} samples to train on{held}; {plan.describe()}",
        info.is_main,
    )
    if info.is_main and resume_from is None and checkpoint.checkpoints_dir(out_dir).exists():
        # train.overwrite, or only unfinished checkpoints (no meta.json) there: preflight checked
        _say(f"fresh run: removing old checkpoints in {checkpoint.checkpoints_dir(out_dir)}", True)
        shutil.rmtree(checkpoint.checkpoints_dir(out_dir))
    dist.barrier()

    # -- model, optimizer, schedule, DeepSpeed engine ------------------------------------------
    torch.manual_seed(tc.seed)
    model = DSparkDraft(cfg)
    head = store.target_weights()
    model.set_target_head(head["embed_tokens"], head["lm_head"])  # frozen, not in the state dict
    vocab = None
    if tc.vocab_size is not None or tc.markov_init == "bigram":
        vocab = training_vocabulary(store, indices, tc.vocab_size or BIGRAM_TABLE_SIZE, progress=info.is_main)
    if tc.vocab_size is not None:
        model.set_train_vocab(vocab)
        _say(f"training vocabulary: {len(vocab)} of {cfg.vocab_size} tokens (train.vocab_size)", info.is_main)
    if tc.markov_init == "bigram" and resume_from is None:
        explained = init_markov_bigram(model, store, indices, vocab, progress=info.is_main)
        _say(
            f"Markov head initialised from the bigram table of {len(vocab)} tokens (rank "
            f"{cfg.markov_rank} explains {explained:.0%} of it)",
            info.is_main,
        )
    if tc.layer_init == "target" and resume_from is None:
        target_dir = resolve_target_path(params.target.path, params.target.cache_dir)
        _say(init_layers_from_target(model, target_dir, head["final_norm"]), info.is_main)
    dtype = resolve_dtype(tc.dtype, info.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over each flat parameter group instead of a dozen elementwise passes
    # (on CPU the unfused update of the ~30M Markov-head parameters cost about as much as the
    # forward); torch supports it on CPU and CUDA.
    optimizer = torch.optim.AdamW(trainable, lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=True)
    schedule = WarmupCosine(plan.total_steps, plan.warmup_steps, tc.min_lr_ratio)
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, schedule),
        config=deepspeed_config(tc, plan, dtype, info.device),
    )

    # -- resume ----------------------------------------------------------------------------------
    step, pos, values, resumed_val = 0, SamplerPosition(), {}, {}
    if resume_from is not None:
        meta = checkpoint.load(engine, resume_from)
        step, pos, values = int(meta["step"]), SamplerPosition(**meta["sampler"]), meta.get("metrics", {})
        resumed_val = meta.get("val_metrics", {})
        _say(
            f"resumed from {resume_from} at step {step} (epoch {pos.epoch}, sample {pos.index})", info.is_main
        )
    elif tc.resume:
        _say(f"train.resume: no checkpoint in {out_dir}, starting fresh", info.is_main)

    loss_cfg = LossConfig.from_train(tc)
    sampler = ResumableSampler(
        len(indices),
        micro_batch_size=tc.micro_batch_size,
        grad_accum=tc.grad_accum,
        world_size=info.world_size,
        rank=info.rank,
        seed=tc.seed,
        position=pos,
    )
    cache_bytes = int(tc.cache_gb * 2**30)
    dataset = FeatureDataset(store, indices, tc.max_length, cache_bytes)
    workers = loader_workers(tc.loader_workers, info.device, dataset, tc.micro_batch_size, say)
    batches = iter(
        DataLoader(
            dataset,
            batch_size=tc.micro_batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
        )
    )
    data_wait = DataWait(workers, info.device, say)  # share of the step spent in next(batches)
    sink = MetricsSink(out_dir, enabled=info.is_main, resume_step=step)
    # val.tsv exists even without validation (header only): DVC declares it as a plot output
    val_sink = MetricsSink(out_dir, enabled=info.is_main, resume_step=step, name="val", columns=VAL_COLUMNS)
    validator = None
    if len(val_indices):
        validator = Validator(
            FeatureDataset(store, val_indices, tc.max_length, cache_bytes),
            loss_cfg,
            micro_batch_size=tc.micro_batch_size,
            num_anchors=tc.num_anchors,
            seed=tc.seed,
            rank=info.rank,
            world_size=info.world_size,
            device=info.device,
        )
    val_values: dict = resumed_val  # the last validation before the checkpoint resumed from

    def validate(at: int) -> None:
        nonlocal val_values
        val_values = validator(engine)
        val_sink.log(at, val_values)
        _say(
            f"validation at step {at}: loss {val_values['loss']:.4f}, ce {val_values['ce']:.3f}, "
            f"l1 {val_values['l1']:.3f}, conf {val_values['conf']:.3f} "
            f"(skill {val_values['conf_skill']:.3f}), "
            f"tau {val_values['tau_probabilistic']:.3f} ({len(validator)} samples, "
            f"{val_values['seconds']:.1f} s)",
            info.is_main,
        )

    if validator is not None and step == 0:
        validate(0)  # the untrained drafter: where every curve starts
    bar = tqdm(total=plan.total_steps, initial=step, unit="step", desc="train", disable=not info.is_main)

    # -- the loop: grad_accum micro-batches per optimizer step -----------------------------------
    while step < plan.total_steps:
        t0, micro, tokens, lr = time.perf_counter(), [], 0, lr_scheduler.get_last_lr()[0]
        for _ in range(plan.grad_accum):
            t_next = time.perf_counter()
            batch = next(batches)
            data_wait.waited(time.perf_counter() - t_next)
            anchors, keep = batch_anchors(batch, tc.num_anchors, tc.seed, step)
            batch = {k: v.to(info.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sums = local_sums(engine, batch, anchors.to(info.device), keep.to(info.device), loss_cfg)
            loss = pooled_loss(sums, loss_cfg)
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the update (clipped) at the accumulation boundary
            micro.append((loss.item(), sums.detach()))
            tokens += int(batch["lengths"].sum())
        step, pos = step + 1, sampler.advance(pos)
        values = pool_step_metrics(micro, tokens, loss_cfg, info.device)
        step_s = time.perf_counter() - t0
        values.update(lr=lr, tokens_per_s=values["tokens"] / step_s)
        data_wait.step(step_s)
        if step % tc.log_every == 0 or step == plan.total_steps:
            values["data_wait"] = data_wait.window(step)
            sink.log(step, values)
        bar.set_postfix(
            loss=f"{values['loss']:.4f}",
            tau=f"{values['tau_probabilistic']:.2f}",
            tok_s=f"{values['tokens_per_s']:.0f}",
        )
        bar.update(1)
        if validator is not None and (step % tc.val_every == 0 or step == plan.total_steps):
            validate(step)
        if step % tc.save_every == 0 or step == plan.total_steps:
            meta = {
                "step": step,
                "epoch": pos.epoch,
                "sampler": pos.as_dict(),
                "plan": plan.as_dict(),
                "params": params.model_dump(mode="json"),
                "draft_config": cfg.to_dict(),
                "store": store.path,
                "store_fingerprint": store.manifest.params_fingerprint,
                "target_weights_hash": store.manifest.target.weights_hash,
                "world_size": info.world_size,
                "dtype": str(dtype).removeprefix("torch."),
                "metrics": values,
                "val_metrics": val_values,
            }
            saved = checkpoint.save(engine, out_dir, step, meta, is_main=info.is_main)
            _say(f"step {step}: loss {values['loss']:.4f}, checkpoint {saved}", info.is_main)
    bar.close()

    summary = {
        "step": step,
        "epochs": step / plan.steps_per_epoch,
        **values,
        "plan": plan.as_dict(),
        **({"val": val_values} if val_values else {}),
        "checkpoint": str(checkpoint.checkpoints_dir(out_dir) / checkpoint.tag_for(step)),
    }
    sink.finish(summary)
    return summary
