"""Tiny synthetic feature stores for the training tests, written with the real store writer.

Why synthetic: a store from a real (tiny) target carries the full 49k-token vocabulary, which
makes every drafter step pay for a 49k-wide softmax. Here V = 97 and H = 32, so a training step
takes milliseconds, while the store itself (manifest, parts, shards, dtypes) is the real format
read through the real reader. The "target" is a fixed random bigram model, so the features are
consistent (top-k = softmax(final_hidden @ lm_head.T)) and a drafter can actually learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dspark_offline.store.dtypes import to_storage
from dspark_offline.store.manifest import (
    ArrayDtypes,
    DataInfo,
    Manifest,
    TargetInfo,
    fingerprint_fields,
    params_fingerprint,
)
from dspark_offline.store.plan import effective_sizes, plan_part
from dspark_offline.store.writer import open_part, open_store_for_write

TARGET_NAME = "synthetic-tiny"
VOCAB, HIDDEN, NUM_LAYERS = 97, 32, 6


def make_store(
    path: str | Path,
    *,
    num_samples: int = 12,
    min_len: int = 12,
    max_len: int = 40,
    layer_ids: tuple[int, ...] = (1, 3),
    top_k: int = 8,
    final_hidden: bool = True,
    target_name: str = TARGET_NAME,
    num_parts: int = 1,
    seed: int = 0,
) -> Path:
    """Write a complete store at ``path``; returns the path."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(1234)  # the "target" is the same for every store
    embed = torch.randn(VOCAB, HIDDEN, generator=g) * 0.5  # [V, H]
    lm_head = torch.randn(VOCAB, HIDDEN, generator=g) * 0.5  # [V, H]
    mix = torch.randn(NUM_LAYERS, HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5  # per-layer "state" maps

    lengths = rng.integers(min_len, max_len + 1, size=num_samples)
    tokens = [rng.integers(0, VOCAB - 1, size=n) for n in lengths]  # row V-1 stays spare (mask token)
    shard, chunk = effective_sizes(64, 16, int(lengths.max()))
    L = len(layer_ids)
    target = TargetInfo(
        name=target_name,
        path=f"/nonexistent/{target_name}",
        weights_hash="synthetic",
        architecture="LlamaForCausalLM",
        model_type="llama",
        num_hidden_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        dtype="float32",
        mask_token_id=None,
        tokenizer_size=VOCAB - 1,
        special_tokens={},
    )
    manifest = Manifest(
        target=target,
        tokenizer_hash="tok",
        chat_template_hash="tpl",
        layer_ids=list(layer_ids),
        top_k=top_k,
        dtypes=ArrayDtypes(
            hidden="float32", final_hidden="float32" if final_hidden else None, head="float32"
        ),
        has_final_hidden=final_hidden,
        num_parts=num_parts,
        shard_tokens=shard,
        chunk_tokens=chunk,
        compressor="zstd",
        compression_level=1,
        data=DataInfo(
            prepared_path="synthetic",
            split="train",
            prepared_fingerprint=f"seed{seed}",
            max_length=max_len,
            num_samples=num_samples,
            num_tokens=int(lengths.sum()),
        ),
        params_fingerprint="pending",
        created_by="tests",
    )
    manifest = manifest.model_copy(
        update={"params_fingerprint": params_fingerprint(fingerprint_fields(manifest))}
    )
    head = {"embed_tokens": embed, "lm_head": lm_head, "final_norm": torch.ones(HIDDEN)}
    root = open_store_for_write(str(path), manifest, lambda: head)

    for p in range(num_parts):
        plan = plan_part(lengths, num_parts, p, shard)
        T = plan.num_positions
        ids = np.zeros(T, np.int64)
        mask = np.zeros(T, np.uint8)
        for row, src in enumerate(plan.source_index):
            s, n = int(plan.sample_start[row]), int(lengths[src])
            ids[s : s + n] = tokens[src]
            mask[s + n // 3 : s + n] = 1  # prompt third unsupervised, answer supervised
        x = embed[torch.from_numpy(ids)]  # [T, H]
        states = torch.stack([torch.tanh(x @ mix[i]) for i in layer_ids], dim=1)  # [T, L, H]
        final = torch.tanh(x @ mix[-1]) + x  # [T, H]
        probs = torch.softmax(final @ lm_head.T, dim=-1)  # [T, V]
        tp, ti = probs.topk(top_k, dim=-1)  # [T, K]
        token_arrays = (ids.astype(np.int32), mask, plan.source_index.astype(np.int64))
        part = open_part(root, manifest, plan, lambda arrays=token_arrays: arrays)
        for sh in part.pending():
            sl = slice(sh.start, sh.stop)
            arrays = {
                "hidden": to_storage(states[sl].reshape(-1, L, HIDDEN), "float32"),
                "topk_ids": to_storage(ti[sl].int(), "int32"),
                "topk_probs": to_storage(tp[sl], "float16"),
            }
            if final_hidden:
                arrays["final_hidden"] = to_storage(final[sl], "float32")
            part.write_shard(sh, arrays)
    return Path(path)


def inflate_shards(path: str | Path, extra_bytes: int) -> int:
    """Make every shard of every part array `extra_bytes` larger without using disk: a hole (a
    sparse region) is put in front of the shard's data and its index offsets are shifted (crc32c
    recomputed), so the store stays valid and reads the same values. Returns the shards inflated.

    This gives tests a store of "many large shards" (hundreds of GB apparent) that costs nothing,
    for checking that something does not read the store's bytes (DVC) or reads only shard indexes.
    """
    import os

    import google_crc32c
    import zarr

    from dspark_offline.store.objects import all_coords, object_key, shard_index_bytes

    root, count = zarr.open_group(str(path), mode="r"), 0
    for name, group in root.groups():
        if not name.startswith("part-"):
            continue
        for _, arr in group.arrays():
            size = shard_index_bytes(arr)
            if size is None:
                continue
            for c in all_coords(arr):
                file = Path(path) / object_key(arr, c)
                data = file.read_bytes()
                entries = np.frombuffer(data[-size:-4], dtype="<u8").reshape(-1, 2).copy()  # (offset, nbytes)
                present = ~(entries == np.uint64(2**64 - 1)).all(axis=1)
                entries[present, 0] += np.uint64(extra_bytes)
                index = entries.tobytes()
                tmp = file.with_name(file.name + ".inflating")
                with open(tmp, "wb") as f:
                    f.seek(extra_bytes)  # the hole: no disk blocks
                    f.write(data[:-size])
                    f.write(index + google_crc32c.value(index).to_bytes(4, "little"))
                os.replace(tmp, file)
                count += 1
    return count
