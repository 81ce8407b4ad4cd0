"""The dump stage on tiny random targets: exact features, resume, parts, refusals."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import zarr

from dspark_offline import dump
from dspark_offline.config import Params
from dspark_offline.data.errors import PreparedDataError
from dspark_offline.data.prepared import PreparedSplit
from dspark_offline.store import StoreError, StoreMismatchError, open_store
from dspark_offline.store.finite import NonFiniteFeatureError
from dspark_offline.store.inspect import verify
from dspark_offline.target.hf_backend import HFTarget
from dspark_offline.target.layers import default_layer_ids


def make_params(target_dir, prepared, store, **dump_over) -> Params:
    dump_cfg = {
        "store": str(store),
        "layer_ids": [0, 2, 3],
        "top_k": 8,
        "shard_tokens": 64,
        "chunk_tokens": 16,
        "batch_tokens": 256,
    }
    dump_cfg.update(dump_over)
    return Params.model_validate(
        {
            "target": {"path": str(target_dir), "dtype": "float32", "device": "cpu"},
            "prepare": {"output": str(prepared)},
            "dump": dump_cfg,
        }
    )


def by_sample_id(store) -> dict:
    return {store.sample(i).sample_id: store.sample(i) for i in range(len(store))}


def test_dump_equals_direct_forward(tiny_qwen3_dir, make_prepared, tmp_path):
    prepared = make_prepared(12)
    path = dump.run(make_params(tiny_qwen3_dir, prepared, tmp_path / "one.zarr", batch_tokens=1))
    store = open_store(path)
    m = store.manifest
    assert (m.layer_ids, m.top_k, m.target.hidden_size, m.target.architecture) == (
        [0, 2, 3],
        8,
        64,
        "Qwen3ForCausalLM",
    )
    assert m.num_parts == 1 and m.data.num_samples == 12
    split = PreparedSplit.load(prepared, "train")
    target = HFTarget(tiny_qwen3_dir, layer_ids=[0, 2, 3], top_k=8, dtype="float32", device="cpu")
    for i in range(len(split)):
        ids, mask = split[i]
        ref = target.forward(
            torch.from_numpy(ids.astype(np.int64))[None], torch.ones(1, len(ids), dtype=torch.int64)
        )
        s = by_sample_id(store)[int(split.sample_ids[i])]
        assert torch.equal(s.input_ids, torch.from_numpy(ids.astype(np.int64)))
        assert torch.equal(s.loss_mask, torch.from_numpy(mask.astype(bool)))
        assert torch.equal(s.hidden, ref.hidden[0])  # one sample per batch: bit-exact
        assert torch.equal(s.final_hidden, ref.final_hidden[0])
        assert torch.equal(s.topk_ids, ref.topk_ids[0])
        assert torch.equal(s.topk_probs, ref.topk_probs[0].half().float())
    w = store.target_weights()
    assert torch.equal(w["embed_tokens"], target.model.get_input_embeddings().weight)
    assert torch.equal(w["lm_head"], target.model.get_output_embeddings().weight)
    # padded batches give the same features up to float rounding
    batched = open_store(dump.run(make_params(tiny_qwen3_dir, prepared, tmp_path / "batched.zarr")))
    ref_all, got_all = by_sample_id(store), by_sample_id(batched)
    for sid, ref in ref_all.items():
        torch.testing.assert_close(got_all[sid].hidden, ref.hidden, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_all[sid].topk_probs, ref.topk_probs, atol=1e-3, rtol=1e-2)
    assert verify(path) == []


def test_rerun_is_noop_mismatch_refused_overwrite_recreates(tiny_llama_dir, make_prepared, tmp_path):
    prepared = make_prepared(8)
    params = make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr", hidden_dtype="bfloat16")
    path = dump.run(params)
    shard = tmp_path / "f.zarr" / "part-00000" / "hidden" / "c" / "0" / "0" / "0"
    before = shard.stat().st_mtime_ns
    dump.run(params)
    assert shard.stat().st_mtime_ns == before, "a complete store was rewritten"
    store = open_store(path)
    assert store.manifest.dtypes.hidden == "bfloat16" and store.sample(0).hidden.dtype == torch.bfloat16
    changed = make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr", top_k=4)
    with pytest.raises(StoreMismatchError, match=r"params_fingerprint=.*top_k: 8 -> 4.*overwrite"):
        dump.run(changed)
    dump.run(changed.model_copy(update={"dump": changed.dump.model_copy(update={"overwrite": True})}))
    assert open_store(path).manifest.top_k == 4 and open_store(path).sample(0).topk_ids.shape[1] == 4


def test_bad_prepared_tokens_are_named(tiny_llama_dir, make_prepared, tmp_path):
    prepared = make_prepared(3, vocab=60000)  # ids beyond the tiny target's 49152 rows
    with pytest.raises(
        PreparedDataError, match=r"sample \d \(sample_id \d\) has token id \d+ >= target vocab_size=49152"
    ):
        dump.run(make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr"))


def poison(monkeypatch, field: str, where, value: float) -> list[int]:
    """HFTarget.forward with `value` put into its `field` output at `where` (an index, or a
    function of the attention mask giving a boolean mask); returns the padded tokens per batch."""
    forward, padded = HFTarget.forward, []

    def poisoned(self, ids, attn):
        out = forward(self, ids, attn)
        t = getattr(out, field).clone()
        t[where(attn) if callable(where) else where] = value
        padded.append(int((attn == 0).sum()))
        return dataclasses.replace(out, **{field: t})

    monkeypatch.setattr(HFTarget, "forward", poisoned)
    return padded


@pytest.mark.parametrize(
    "hidden_dtype, field, index, value, message",
    [
        ("float32", "hidden", (0, 3, 1, 7), math.nan, "hidden state is nan at token 3, layer 2, channel 7"),
        ("bfloat16", "hidden", (0, 0, 0, 0), math.inf, "hidden state is inf at token 0, layer 0, channel 0"),
        (
            "float16",
            "final_hidden",
            (0, 2, 9),
            -math.inf,
            "final_hidden is -inf at token 2, after the final norm, channel 9",
        ),
        (  # finite in the target's float32, inf once stored as float16
            "float16",
            "hidden",
            (0, 1, 2, 3),
            7e4,
            (
                r"hidden state is 70000.0 \(beyond float16's ±65504: it would be stored as inf\) at "
                "token 1, layer 3, channel 3"
            ),
        ),
    ],
)
def test_non_finite_features_are_refused_in_every_dtype(
    tiny_llama_dir, make_prepared, tmp_path, monkeypatch, hidden_dtype, field, index, value, message
):
    prepared = make_prepared(3, min_len=8, max_len=12)
    poison(monkeypatch, field, index, value)
    params = make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr", hidden_dtype=hidden_dtype)
    with pytest.raises(NonFiniteFeatureError, match=r"train: sample \d \(sample_id \d+\): " + message):
        dump.run(params)
    with pytest.raises(StoreError, match="incomplete parts"):  # nothing marked complete
        open_store(str(tmp_path / "f.zarr"))


def test_non_finite_padding_is_not_a_feature(tiny_llama_dir, make_prepared, tmp_path, monkeypatch):
    """Only a sample's own tokens are stored, so only they are checked: inf/NaN on the padded
    positions of a batch (what an attention kernel may leave there) is no reason to stop."""
    prepared = make_prepared(6, min_len=5, max_len=30)
    padded = poison(monkeypatch, "hidden", lambda attn: attn == 0, math.nan)
    store = open_store(dump.run(make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr")))
    assert sum(padded) > 0  # the poison was there
    assert all(torch.isfinite(store.sample(i).hidden).all() for i in range(len(store)))


def test_embedded_target_dump_bf16(embedded_target_dir, make_prepared, tmp_path):
    """The real SmolLM2 target: default layer ids, bf16 hidden states, top-k that sum to <= 1."""
    prepared = make_prepared(3, min_len=8, max_len=24, vocab=49152)
    params = Params.model_validate(
        {
            "target": {"path": "embedded:smollm2", "device": "cpu"},
            "prepare": {"output": str(prepared)},
            "dump": {"store": str(tmp_path / "f.zarr"), "top_k": 16, "hidden_dtype": "bfloat16"},
        }
    )
    store = open_store(dump.run(params))
    m = store.manifest
    assert (
        m.layer_ids == default_layer_ids(30, 5)
        and m.target.num_hidden_layers == 30
        and m.target.hidden_size == 576
    )
    s = store.sample(0)
    assert s.hidden.shape == (len(s.input_ids), 5, 576) and s.hidden.dtype == torch.bfloat16
    assert (s.topk_probs.sum(-1) <= 1.001).all() and (s.topk_probs[:, :-1] >= s.topk_probs[:, 1:]).all()
    assert store.target_weights()["lm_head"].shape == (49152, 576)
    assert zarr.open_group(str(tmp_path / "f.zarr"), mode="r")["part-00000/hidden"].dtype == np.uint16
