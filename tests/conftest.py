"""Shared fixtures: tiny random targets that use the real SmolLM2 tokenizer (and chat template).

The tokenizer comes from the embedded GGUF (converted once into the user cache), so tests need
no network. Models are random and tiny (hidden 64, 4 layers) so every test runs in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def embedded_target_dir() -> Path:
    """The converted SmolLM2-135M-Instruct HF directory (real weights, 30 layers)."""
    from dspark_offline.target.embedded import resolve_target_path

    return resolve_target_path("embedded:smollm2")


def _save_tiny(out: Path, tokenizer_dir: Path, arch: str, **config) -> Path:
    """A random 4-layer, H=64 Llama or Qwen3 (seed 0) with the given tokenizer, saved to `out`;
    `config` adds to or overrides the shared shape."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **config,
    }
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _make_tiny(out: Path, tokenizer_dir: Path, arch: str) -> Path:
    return _save_tiny(out, tokenizer_dir, arch, tie_word_embeddings=arch == "llama")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_target_dir) -> Path:
    """Tiny random Llama (4 layers, H=64, tied head) with the SmolLM2 tokenizer."""
    return _make_tiny(tmp_path_factory.mktemp("tiny_llama"), embedded_target_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, embedded_target_dir) -> Path:
    """Tiny random Qwen3 (4 layers, H=64, untied head) with the SmolLM2 tokenizer."""
    return _make_tiny(tmp_path_factory.mktemp("tiny_qwen3"), embedded_target_dir, "qwen3")


def _make_chatty(out: Path, tokenizer_dir: Path, arch: str) -> Path:
    """Like `_make_tiny` but with a wider init and an untied head, so that greedy answers vary
    with the prompt (the tiny targets above answer every prompt with one repeated token, which
    makes decoding comparisons vacuous)."""
    return _save_tiny(out, tokenizer_dir, arch, initializer_range=0.1, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def chatty_llama_dir(tmp_path_factory, embedded_target_dir) -> Path:
    """Tiny random Llama (H=64, untied head, init std 0.1) whose greedy answers vary by prompt."""
    return _make_chatty(tmp_path_factory.mktemp("chatty_llama"), embedded_target_dir, "llama")


@pytest.fixture(scope="session")
def chatty_qwen3_dir(tmp_path_factory, embedded_target_dir) -> Path:
    """Tiny random Qwen3 (H=64, untied head, init std 0.1) whose greedy answers vary by prompt."""
    return _make_chatty(tmp_path_factory.mktemp("chatty_qwen3"), embedded_target_dir, "qwen3")


@pytest.fixture
def make_tiny_draft():
    """Factory for a tiny random DSparkDraft (H=32, V=97) with a frozen random target head.

    `make_tiny_draft(**overrides)` -> model; overrides go to DraftModelConfig (block_size,
    markov_head, confidence_head, num_layers, ...). Seeded, so two calls give equal weights.
    """
    import torch

    from dspark_offline.model import DraftModelConfig, DSparkDraft

    def make(seed: int = 0, **overrides):
        dims = {
            "hidden_size": 32,
            "num_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 48,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 512,
            "vocab_size": 97,
            "num_target_layers": 6,
            "target_layer_ids": (1, 3),
            "block_size": 4,
            "markov_rank": 8,
            "mask_token_id": 96,
        }
        dims.update(overrides)
        torch.manual_seed(seed)
        model = DSparkDraft(DraftModelConfig(**dims))
        g = torch.Generator().manual_seed(seed + 1)
        v, h = dims["vocab_size"], dims["hidden_size"]
        model.set_target_head(torch.randn(v, h, generator=g) * 0.5, torch.randn(v, h, generator=g) * 0.2)
        return model

    return make


# --- feature store helpers (store/dump tests) ------------------------------------------------


def _write_prepared_split(out: Path, samples: list[tuple], meta: dict | None = None) -> Path:
    """A prepared-data directory (train = `samples`, eval = first sample) via dspark_offline.data."""
    import numpy as np

    from dspark_offline.data.prepared import SplitArrays, write_prepared

    def arrays(items, first_id):
        ids = [np.asarray(i, np.int32) for i, _ in items]
        masks = [np.asarray(m, np.uint8) for _, m in items]
        n = len(items)
        return SplitArrays.from_samples(
            ids, masks, list(range(first_id, first_id + n)), [f"r{k}" for k in range(n)]
        )

    write_prepared(
        out,
        {"train": arrays(samples, 0), "eval": arrays(samples[:1], len(samples))},
        dict({"max_length": max(len(i) for i, _ in samples)}, **(meta or {})),
        {"records_read": len(samples)},
    )
    return out


@pytest.fixture
def make_prepared(tmp_path):
    """Factory: `make_prepared(num_samples, seed=0, min_len=5, max_len=40, vocab=400)` -> prepared dir.

    Random token ids (below `vocab`) with a loss mask covering the second half of each sample.
    """
    import numpy as np

    def make(
        num_samples: int, seed: int = 0, min_len: int = 5, max_len: int = 40, vocab: int = 400, name="prep"
    ):
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(num_samples):
            n = int(rng.integers(min_len, max_len + 1))
            ids = rng.integers(0, vocab, size=n)
            mask = (np.arange(n) >= n // 2).astype(np.uint8)
            samples.append((ids, mask))
        return _write_prepared_split(tmp_path / name, samples)

    return make


def synthetic_manifest(**over):
    """A valid Manifest for a made-up target (V=50, H=8, 2 layers, K=4); `over` replaces fields."""
    from dspark_offline.store.manifest import ArrayDtypes, DataInfo, Manifest, TargetInfo

    target = TargetInfo(
        name="synthetic",
        path="/nowhere",
        weights_hash="w0",
        architecture="LlamaForCausalLM",
        model_type="llama",
        num_hidden_layers=4,
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        vocab_size=50,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        dtype="bfloat16",
        mask_token_id=None,
        tokenizer_size=48,
        special_tokens={"<s>": 1},
    )
    fields = {
        "target": target,
        "tokenizer_hash": "t0",
        "chat_template_hash": "c0",
        "layer_ids": [1, 2],
        "top_k": 4,
        "dtypes": ArrayDtypes(hidden="bfloat16", final_hidden="bfloat16", head="bfloat16"),
        "has_final_hidden": True,
        "num_parts": 1,
        "shard_tokens": 32,
        "chunk_tokens": 8,
        "compressor": "zstd",
        "compression_level": 1,
        "data": DataInfo(
            prepared_path="p",
            split="train",
            prepared_fingerprint="d0",
            max_length=30,
            num_samples=0,
            num_tokens=0,
        ),
        "params_fingerprint": "f0",
        "created_by": "test",
    }
    fields.update(over)
    m = Manifest(**fields)
    if "params_fingerprint" in over:
        return m
    # signed like a real dump, so the reader's manifest consistency check accepts it
    from dspark_offline.store.manifest import fingerprint_fields, params_fingerprint

    return m.model_copy(update={"params_fingerprint": params_fingerprint(fingerprint_fields(m))})


class SyntheticStore:
    """Writes a store with random features through the real writer and remembers what it wrote."""

    def __init__(self, path: str, lengths, manifest=None, seed: int = 0):
        import numpy as np
        import torch

        from dspark_offline.store.plan import plan_part

        self.path, self.lengths = str(path), np.asarray(lengths)
        self.manifest = manifest or synthetic_manifest()
        g = torch.Generator().manual_seed(seed)
        m = self.manifest
        L, H, K, V = len(m.layer_ids), m.target.hidden_size, m.top_k, m.target.vocab_size
        hdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
            m.dtypes.hidden
        ]
        self.samples = []  # per prepared index: dict of tensors
        for i, n in enumerate(self.lengths):
            probs = torch.rand(n, K, generator=g).sort(dim=-1, descending=True).values / K
            self.samples.append(
                {
                    "input_ids": torch.randint(0, V, (n,), generator=g),
                    "loss_mask": torch.rand(n, generator=g) > 0.5,
                    "hidden": torch.randn(n, L, H, generator=g).to(hdt),
                    "final_hidden": torch.randn(n, H, generator=g).to(hdt),
                    "topk_ids": torch.randint(0, V, (n, K), generator=g),
                    "topk_probs": probs.half().float(),
                }
            )
        self.head = {
            "embed_tokens": torch.randn(V, H, generator=g).to(hdt),
            "lm_head": torch.randn(V, H, generator=g).to(hdt),
            "final_norm": torch.randn(H, generator=g).to(hdt),
        }
        self.plans = [plan_part(self.lengths, m.num_parts, p, m.shard_tokens) for p in range(m.num_parts)]

    def tokens(self, plan):
        import numpy as np

        def make():
            ids = np.zeros(plan.num_positions, np.int32)
            mask = np.zeros(plan.num_positions, np.uint8)
            for src, start, n in zip(plan.source_index, plan.sample_start, plan.sample_length):
                ids[start : start + n] = self.samples[src]["input_ids"].numpy()
                mask[start : start + n] = self.samples[src]["loss_mask"].numpy()
            return ids, mask, plan.source_index.astype(np.int64) + 1000

        return make

    def shard_arrays(self, state, shard):
        import numpy as np

        from dspark_offline.store.dtypes import storage_dtype, to_storage

        width = shard.stop - shard.start
        out = {}
        for name, (logical, trailing) in state.specs.items():
            buf = np.zeros((width, *trailing), storage_dtype(logical))
            for r in range(shard.row_start, shard.row_stop):
                off = int(state.plan.sample_start[r]) - shard.start
                n = int(state.plan.sample_length[r])
                buf[off : off + n] = to_storage(self.samples[int(state.plan.source_index[r])][name], logical)
            out[name] = buf
        return out

    def write(self, parts=None, max_shards=None, overwrite=False):
        """Write (or resume) the given parts; stop after `max_shards` shards (leaves a part incomplete)."""
        from dspark_offline.store.background import BackgroundWriter
        from dspark_offline.store.writer import open_part, open_store_for_write

        root = open_store_for_write(self.path, self.manifest, lambda: self.head, overwrite=overwrite)
        written = 0
        with BackgroundWriter() as w:
            for plan in [self.plans[p] for p in (parts if parts is not None else range(len(self.plans)))]:
                state = open_part(root, self.manifest, plan, self.tokens(plan))
                for shard in state.pending():
                    if max_shards is not None and written >= max_shards:
                        return root
                    w.submit(state, shard, self.shard_arrays(state, shard))
                    written += 1
        return root


@pytest.fixture
def synthetic_store(tmp_path):
    """Factory: `synthetic_store(lengths, manifest=None, path=None)` -> SyntheticStore (not yet written)."""

    def make(lengths, manifest=None, path=None, seed=0):
        return SyntheticStore(path or str(tmp_path / "features.zarr"), lengths, manifest, seed)

    return make
