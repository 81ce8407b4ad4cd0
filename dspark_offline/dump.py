"""Stage 1: run the target once over the prepared tokens and write the feature store.

    prepared (or generated) train split -> plan (parts, shards) -> manifest -> store (create or resume)
      -> for each pending shard: length-sorted padded batches -> target forward
      -> whole shard handed to the background writer

The target runs once per shard that is not yet recorded done, so a killed dump resumed with
the same params redoes at most the shards that were in flight. With `dump.part_index` set,
this process writes only that part (one worker of many); under torchrun / deepspeed / srun,
the parts of its rank (`launch.py`); otherwise every part in turn. The process that completes
the last part writes the store's completion record, its identity for DVC (`store/record.py`).
CPU smoke run: `dspark-offline dump` with the embedded defaults.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dspark_offline import __version__, launch
from dspark_offline.config import Params, ParamsError
from dspark_offline.outputs import check_output_dir
from dspark_offline.store import finite, fp8
from dspark_offline.store.background import BackgroundWriter, default_workers
from dspark_offline.store.dtypes import to_storage
from dspark_offline.store.lock import part_locks
from dspark_offline.store.manifest import (
    ArrayDtypes,
    BackendInfo,
    DataInfo,
    Manifest,
    StoreError,
    TargetInfo,
    fingerprint_fields,
)
from dspark_offline.store.manifest import params_fingerprint as fingerprint_of
from dspark_offline.store.plan import PartPlan, ShardPlan, effective_sizes, part_name, plan_part
from dspark_offline.store.record import is_complete, record_path, remove_record, write_record
from dspark_offline.store.writer import PartState, open_part, open_store_for_write
from dspark_offline.target.backend import TargetBackend, TargetBackendClass
from dspark_offline.target.layers import LAYER_ID_CONVENTION, resolve_layer_ids

SPLIT = "train"


class DumpWriteError(StoreError):
    """Writing the store failed for a reason of the environment (full disk, permissions, ...)."""


def _say(msg: str) -> None:
    tqdm.write(f"[dump] {msg}")


def _text_config(model_dir: Path):
    """The target's (text) config, read without loading the weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_tokens(split, info: dict, prepared: str) -> None:
    """The prepared tokens must come from this target's tokenizer and fit its vocabulary."""
    from dspark_offline.data.errors import PreparedDataError

    for key in ("tokenizer_hash", "chat_template_hash"):
        theirs = split.meta.get(key)
        if theirs is not None and theirs != info[key]:
            raise PreparedDataError(
                f"{prepared}/meta.json: {key}={theirs} but the target {info['path']} has "
                f"{key}={info[key]}; re-run prepare with this target's tokenizer"
            )
    vocab = info["vocab_size"]
    for i in range(len(split)):
        ids, _ = split[i]
        if len(ids) and int(ids.max()) >= vocab:
            raise PreparedDataError(
                f"{prepared}/{SPLIT}: sample {i} (sample_id {int(split.sample_ids[i])}) has token id "
                f"{int(ids.max())} >= target vocab_size={vocab}"
            )


def build_manifest(
    params: Params,
    info: dict,
    layer_ids: list[int],
    split,
    shard_tokens: int,
    chunk_tokens: int,
    backend: dict | None = None,
) -> Manifest:
    """The manifest of this dump, fingerprint included."""
    cfg = params.dump
    hidden = info["dtype"] if cfg.hidden_dtype == "auto" else cfg.hidden_dtype
    store_final = params.dump_final_hidden()
    # final_hidden feeds the L1 target's logits: float8's 3-bit mantissa would cost accuracy there
    final = ("bfloat16" if hidden == fp8.FP8_DTYPE else hidden) if store_final else None
    target = TargetInfo(
        **{**{k: info[k] for k in TargetInfo.model_fields if k in info}, "name": params.target.path}
    )
    body = {
        "target": target,
        "tokenizer_hash": info["tokenizer_hash"],
        "chat_template_hash": info["chat_template_hash"],
        "layer_ids": list(layer_ids),
        "layer_id_convention": LAYER_ID_CONVENTION,
        "top_k": cfg.top_k,
        "dtypes": ArrayDtypes(
            hidden=hidden,
            hidden_scale=fp8.SCALE_DTYPE if hidden == fp8.FP8_DTYPE else None,
            final_hidden=final,
            head=info["dtype"],
        ),
        "has_final_hidden": store_final,
        "num_parts": cfg.num_parts,
        "shard_tokens": shard_tokens,
        "chunk_tokens": chunk_tokens,
        "compressor": cfg.compressor,
        "compression_level": cfg.compression_level,
        "data": DataInfo(
            prepared_path=str(params.train_data_dir()),
            split=SPLIT,
            prepared_fingerprint=split.fingerprint,
            max_length=split.meta.get("max_length"),
            num_samples=len(split),
            num_tokens=int(split.lengths.sum()),
        ),
        "created_by": f"dspark-offline {__version__}",
        "backend": BackendInfo(**backend) if backend is not None else None,
    }
    unsigned = Manifest(**body, params_fingerprint="")
    return unsigned.model_copy(update={"params_fingerprint": fingerprint_of(fingerprint_fields(unsigned))})


def _part_tokens(split, plan: PartPlan):
    """Plan-known arrays of a part: input_ids int32 [T], loss_mask uint8 [T] (gaps 0), sample_id [N_p]."""

    def make() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.zeros(plan.num_positions, np.int32)
        mask = np.zeros(plan.num_positions, np.uint8)
        for src, start, n in zip(plan.source_index, plan.sample_start, plan.sample_length):
            s_ids, s_mask = split[int(src)]
            ids[start : start + n], mask[start : start + n] = s_ids, s_mask
        return ids, mask, np.asarray(split.sample_ids)[plan.source_index].astype(np.int64)

    return make


def _batches(lengths: np.ndarray, batch_tokens: int) -> list[range]:
    """Consecutive row groups of a longest-first list whose padded size B x S_max <= batch_tokens."""
    out, i = [], 0
    while i < len(lengths):
        longest, j = int(lengths[i]), i + 1
        while j < len(lengths) and (j - i + 1) * longest <= batch_tokens:
            j += 1
        out.append(range(i, j))
        i = j
    return out


def _compute_shard(
    target: TargetBackend, split, state: PartState, shard: ShardPlan, batch_tokens: int, bar, bufs: dict
) -> dict:
    """Run the target over one shard's samples into `bufs` (zeroed arrays in storage dtypes, lent
    by the writer); return them."""
    plan = state.plan
    rows = np.arange(shard.row_start, shard.row_stop)
    for batch in _batches(plan.sample_length[rows], batch_tokens):
        members = rows[batch.start : batch.stop]
        lens = plan.sample_length[members]
        ids = torch.zeros(len(members), int(lens.max()), dtype=torch.int64)  # [B, S] right-padded
        attn = torch.zeros_like(ids)
        for b, r in enumerate(members):
            s_ids, _ = split[int(plan.source_index[r])]
            ids[b, : lens[b]] = torch.from_numpy(s_ids.astype(np.int64))
            attn[b, : lens[b]] = 1
        out = target.forward(ids, attn)
        where = functools.partial(_sample_where, split, plan, members)  # row b -> "...: sample i (...)"
        # inf/NaN (or what the stored dtype would turn into inf): refused, named, before anything is stored
        stored = [n for n in ("hidden", "final_hidden") if n in state.specs]
        features = {n: (getattr(out, n), state.specs[n][0]) for n in stored}
        finite.check_batch(features, [int(n) for n in lens], where, state.manifest.layer_ids)
        for b, r in enumerate(members):
            off, n = int(plan.sample_start[r]) - shard.start, int(lens[b])
            for name, value in _stored_arrays(out, b, n, state, where(b)).items():
                bufs[name][off : off + n] = value
        bar.update(int(lens.sum()))
    return bufs


def _sample_where(split, plan: PartPlan, members: np.ndarray, b: int) -> str:
    """Row `b` of a target batch of `members` (rows of the part plan), named for error messages."""
    src = int(plan.source_index[members[b]])
    return f"{split.root}/{SPLIT}: sample {src} (sample_id {int(split.sample_ids[src])})"


def _stored_arrays(out, b: int, n: int, state: PartState, where: str) -> dict[str, np.ndarray]:
    """Row `b` (first `n` tokens) of a target output in the storage dtypes of the part's arrays;
    float8 hidden states are encoded with their scales (`hidden_scale`), never cast."""
    arrays = {}
    for name, (logical, _) in state.specs.items():
        if name == "hidden_scale":
            continue  # written with `hidden`
        value = getattr(out, name)[b, :n]  # [n, ...]
        if logical == fp8.FP8_DTYPE:
            arrays[name], arrays["hidden_scale"] = fp8.encode(value, where, state.manifest.layer_ids)
        else:
            arrays[name] = to_storage(value, logical)
    return arrays


def _open_target(params: Params, target_dir: Path, layer_ids: list[int], longest: int) -> TargetBackend:
    """The backend named by `dump.backend`, built through the constructor both share
    (`target.backend.TargetBackendClass`); vLLM is imported only inside its module (optional extra)."""
    cfg = params.dump
    backend: TargetBackendClass
    if cfg.backend == "vllm":
        from dspark_offline.target.vllm_backend import VLLMTarget

        engine = cfg.vllm.engine_kwargs()
        engine.setdefault("max_model_len", longest + 1)  # one prefill + the one token vLLM decodes
        _say(f"vLLM engine arguments (dump.vllm): {engine}")
        backend = functools.partial(VLLMTarget, engine_kwargs=engine)
    else:
        from dspark_offline.target.hf_backend import HFTarget

        backend = HFTarget
    return backend(
        target_dir,
        layer_ids=layer_ids,
        top_k=cfg.top_k,
        store_final_hidden=params.dump_final_hidden(),
        dtype=params.target.dtype,
        device=params.target.device,
    )


def run(params: Params) -> str:
    """Dump features of the training split (`params.train_data_dir()`: generate.output when
    generation is on, else prepare.output) into `params.dump.store`; return the store path.

    Holds the lock of every part it writes for the whole run: a second dump of the same part
    stops at once with a `StoreLockedError` naming this one (`store/lock.py`). The target backend
    is closed whatever happens (success, error, Ctrl-C): the vLLM backend's engine is shut down
    and its temporary files are removed."""
    params, parts = _for_this_process(params)
    cfg = params.dump
    check_output_dir(cfg.store, "dump.store")
    with part_locks(cfg.store, [part_name(p) for p in parts]):
        remove_record(cfg.store)  # the store is about to change: it is not recorded complete until it is
        _dump(params, parts)
        if is_complete(cfg.store):  # the process that completes the last part records the whole store
            write_record(cfg.store)
            _say(f"store complete: wrote its completion record {record_path(cfg.store)}")
    return cfg.store


def _for_this_process(params: Params) -> tuple[Params, list[int]]:
    """The params of this process (`dump.num_parts` resolved, the target on this rank's GPU) and the
    parts it writes: under torchrun / deepspeed / srun from the launcher's variables
    (`dspark_offline/launch.py`), an explicit `dump.part_index` first."""
    cfg, device = params.dump, params.target.device
    run_as = launch.from_env()
    num_parts, parts = launch.assign_parts(cfg.num_parts, cfg.part_index, run_as)
    if run_as is not None:
        gpus = torch.cuda.device_count()
        if cfg.backend == "vllm":  # vLLM takes its GPU from CUDA_VISIBLE_DEVICES, not from a device index
            pinned = launch.vllm_visible_devices(run_as, os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)
            if pinned is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = pinned
        else:
            device = launch.local_device(device, run_as, gpus)
        _say(
            f"{run_as.launcher}: rank {run_as.rank} of {run_as.world_size} (local rank {run_as.local_rank}) "
            f"writes part(s) {parts} of {num_parts}" + (f" on {device}" if cfg.backend == "hf" else "")
        )
    return params.model_copy(
        update={
            "dump": cfg.model_copy(update={"num_parts": num_parts}),
            "target": params.target.model_copy(update={"device": device}),
        }
    ), parts


def _dump(params: Params, parts: list[int]) -> None:
    from dspark_offline.data.errors import PreparedDataError
    from dspark_offline.data.prepared import PreparedSplit
    from dspark_offline.target.embedded import resolve_target_path

    cfg = params.dump
    if cfg.writer_engine == "tensorstore":  # refused before the target loads
        from dspark_offline.store.tensorstore_engine import require

        require(cfg.store)
    prepared = params.train_data_dir()
    if params.generate.enabled and not (Path(prepared) / "meta.json").is_file():
        raise PreparedDataError(
            f"{prepared}: no generated data (generate.enabled is true): run `dspark-offline generate` "
            "first, or set generate.enabled=false to dump prepare.output"
        )
    split = PreparedSplit.load(prepared, SPLIT)
    target_dir = resolve_target_path(params.target.path, params.target.cache_dir)
    config = _text_config(target_dir)
    layer_ids = resolve_layer_ids(cfg.layer_ids, int(config.num_hidden_layers), cfg.num_layer_ids)
    if cfg.top_k > int(config.vocab_size):
        raise ParamsError(
            f"dump.top_k={cfg.top_k} is larger than the vocabulary of the target {params.target.path} "
            f"({config.vocab_size} tokens); lower dump.top_k"
        )
    longest = max(int(split.lengths.max()) if len(split) else 1, split.meta.get("max_length") or 1)
    t0 = time.perf_counter()
    target = _open_target(params, target_dir, layer_ids, longest)
    _say(f"{cfg.backend} backend ready in {time.perf_counter() - t0:.1f}s (model load / engine start-up)")
    try:
        _dump_with(params, target, split, layer_ids, longest, parts)
    finally:
        target.close()


def _dump_with(
    params: Params, target: TargetBackend, split, layer_ids: list[int], longest: int, parts: list[int]
) -> None:
    cfg = params.dump
    prepared = params.train_data_dir()
    info = target.info
    _check_tokens(split, info, prepared)

    shard_tokens, chunk_tokens = effective_sizes(cfg.shard_tokens, cfg.chunk_tokens, longest)
    manifest = build_manifest(
        params, info, layer_ids, split, shard_tokens, chunk_tokens, backend=target.backend_info
    )
    plans = [plan_part(split.lengths, cfg.num_parts, p, shard_tokens) for p in parts]
    L, H, K = len(layer_ids), info["hidden_size"], cfg.top_k
    _say(
        f"target {info['architecture']} N={info['num_hidden_layers']} H={H} V={info['vocab_size']} "
        f"dtype={info['dtype']} on {target.device}; layer ids {layer_ids} ({LAYER_ID_CONVENTION})"
    )
    _say(
        f"{len(split)} samples, {int(split.lengths.sum())} tokens -> {cfg.num_parts} part(s); "
        f"shard_tokens={shard_tokens} chunk_tokens={chunk_tokens}; writing part(s) {parts}: "
        f"{sum(len(p.shards) for p in plans)} shards, "
        f"{sum(p.num_tokens for p in plans)} tokens in {sum(p.num_positions for p in plans)} positions"
    )
    scales = f" + {manifest.dtypes.hidden_scale} scale per layer" if manifest.dtypes.hidden_scale else ""
    final = manifest.dtypes.final_hidden or f"not stored (dump.store_final_hidden={cfg.store_final_hidden})"
    _say(
        f"per token: hidden {L}x{H} {manifest.dtypes.hidden}{scales}, final_hidden {final}, top-{K}; "
        f"params_fingerprint {manifest.params_fingerprint}"
    )

    with _storage_errors(cfg.store):
        _write(params, target, split, manifest, plans)


@contextmanager
def _storage_errors(store: str):
    """Turn an OSError of the storage (full disk, permissions, ...), raised here or in the
    background writer, into one `DumpWriteError` that says what state the store is in: writes are
    whole-shard and recorded done only after they succeed, so the store is incomplete and
    resumable, never marked complete."""
    try:
        yield
    except (OSError, StoreError) as e:
        cause = e.__cause__ if isinstance(e, StoreError) else e
        if not isinstance(cause, OSError):
            raise
        raise DumpWriteError(
            f"{store}: writing the store failed ({type(cause).__name__}: {cause}); it is left incomplete "
            "(finished shards are kept, nothing unfinished is marked complete): fix the cause (free space, "
            "permissions) and re-run dump to resume"
        ) from e


def _write(params: Params, target: TargetBackend, split, manifest: Manifest, plans: list[PartPlan]) -> None:
    """Create or resume the store and its parts, then compute and write every pending shard."""
    cfg = params.dump
    parts = [plan.index for plan in plans]
    root = open_store_for_write(cfg.store, manifest, target.head_weights, overwrite=cfg.overwrite)
    states = [open_part(root, manifest, plan, _part_tokens(split, plan)) for plan in plans]
    pending = [(s, shard) for s in states for shard in s.pending()]
    todo = sum(int(s.plan.sample_length[sh.row_start : sh.row_stop].sum()) for s, sh in pending)
    skipped = sum(len(s.plan.shards) for s in states) - len(pending)
    if skipped:
        _say(f"resuming: {skipped} shard(s) already done, {len(pending)} to go")
    if not pending:
        _say(f"nothing to do: part(s) {parts} of {cfg.store} already complete")
        return
    t0 = time.perf_counter()
    gpus = torch.cuda.device_count() if target.device.type == "cuda" else 1
    workers = cfg.writer_workers or default_workers(target.device.type, gpus)
    with (
        BackgroundWriter(workers, engine=cfg.writer_engine) as writer,
        tqdm(total=todo, unit="tok", unit_scale=True, desc="dump") as bar,
    ):
        for state, shard in pending:
            bufs = writer.buffers(state, shard)
            writer.submit(
                state, shard, _compute_shard(target, split, state, shard, cfg.batch_tokens, bar, bufs)
            )
    elapsed = time.perf_counter() - t0
    _say(
        f"wrote {writer.shards_written} shards, {todo} tokens in {elapsed:.1f}s "
        f"({todo / max(elapsed, 1e-9):.0f} tok/s; {workers} {cfg.writer_engine} writer(s) busy "
        f"{writer.busy_s:.1f}s in all)"
    )
