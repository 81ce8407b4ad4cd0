"""dump.hidden_dtype=float8_e4m3 end to end on a tiny random target: the stored codes and scales,
the reader's decoding, integrity, training from the store; and dump.store_final_hidden=auto."""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
import zarr

from dspark_offline import dump
from dspark_offline.config import Params
from dspark_offline.data.prepared import PreparedSplit
from dspark_offline.store import StoreError, StoreMismatchError, fp8, open_store
from dspark_offline.store.inspect import format_inspect, inspect, verify
from dspark_offline.target.hf_backend import HFTarget

LAYERS = [0, 2, 3]


@pytest.fixture(autouse=True)
def _scoped_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # dist.setup() sets it for DeepSpeed; keep it from leaking


def make_params(target_dir, prepared, store, out, *, l1_mode="topk", **dump_over) -> Params:
    return Params.model_validate(
        {
            "target": {"path": str(target_dir), "dtype": "float32", "device": "cpu"},
            "prepare": {"output": str(prepared)},
            "dump": {
                "store": str(store),
                "layer_ids": LAYERS,
                "top_k": 8,
                "shard_tokens": 64,
                "chunk_tokens": 16,
                "batch_tokens": 1,
                "hidden_dtype": "float8_e4m3",
                **dump_over,
            },
            "draft": {"num_layers": 1, "block_size": 4, "markov_rank": 8, "mask_token": "<empty_output>"},
            "train": {
                "output_dir": str(out),
                "max_steps": 2,
                "micro_batch_size": 2,
                "num_anchors": 4,
                "chunk_blocks": 4,
                "save_every": 2,
                "l1_mode": l1_mode,
                "dtype": "float32",
            },
        }
    )


def test_fp8_store_holds_codes_and_scales_and_reads_back_decoded(tiny_llama_dir, make_prepared, tmp_path):
    prepared = make_prepared(6, min_len=16, max_len=40)
    path = dump.run(
        make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr", tmp_path / "run", l1_mode="exact")
    )
    store = open_store(path)
    d = store.manifest.dtypes
    assert (d.hidden, d.hidden_scale, d.final_hidden) == ("float8_e4m3", "bfloat16", "bfloat16")
    raw = zarr.open_group(path, mode="r")["part-00000"]
    T = raw["input_ids"].shape[0]
    assert raw["hidden"].dtype == np.uint8 and raw["hidden"].shape == (T, 3, 64)
    assert raw["hidden_scale"].dtype == np.uint16 and raw["hidden_scale"].shape == (T, 3)
    assert raw["hidden"].attrs["logical_dtype"] == "float8_e4m3"

    split = PreparedSplit.load(prepared, "train")
    target = HFTarget(tiny_llama_dir, layer_ids=LAYERS, top_k=8, dtype="float32", device="cpu")
    by_id = {store.sample(i).sample_id: i for i in range(len(store))}
    for k in range(len(split)):
        ids, _ = split[k]
        ref = target.forward(
            torch.from_numpy(ids.astype(np.int64))[None], torch.ones(1, len(ids), dtype=torch.int64)
        )
        i = by_id[int(split.sample_ids[k])]
        s = store.sample(i)
        codes, scale = fp8.encode(ref.hidden[0])
        expect = fp8.decode(
            torch.from_numpy(codes).view(torch.float8_e4m3fn),
            torch.from_numpy(scale.view(np.int16)).view(torch.bfloat16),
        )
        assert s.hidden.dtype == torch.float32 and torch.equal(s.hidden, expect)  # the reader decodes
        rel = (s.hidden - ref.hidden[0]).norm() / ref.hidden[0].norm()
        assert 0 < rel < 0.05, rel
        assert torch.equal(s.final_hidden, ref.final_hidden[0].bfloat16())  # final_hidden: bf16, not fp8
        got = store.arrays(i, ["hidden", "hidden_scale"])  # asked for the scales too: both raw
        assert got["hidden"].dtype == torch.float8_e4m3fn and got["hidden_scale"].shape == (len(ids), 3)
    assert verify(path) == []
    assert "hidden=float8_e4m3 (x bfloat16 scale per token per layer)" in format_inspect(inspect(path))

    shutil.rmtree(tmp_path / "f.zarr" / "part-00000" / "hidden_scale" / "c")  # the scales' shards
    problems = verify(path, quick=True)
    assert problems and all("hidden_scale" in p for p in problems), problems


def test_topk_store_has_no_final_hidden_trains_and_recompute_is_refused(
    tiny_llama_dir, make_prepared, tmp_path
):
    """store_final_hidden=auto with l1_mode=topk: no final_hidden; training from the float8 store
    runs; an l1_mode that reads final_hidden is refused before step 1, naming the way out."""
    from dspark_offline.train.loop import run as train_run

    prepared = make_prepared(6, min_len=16, max_len=40)
    params = make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr", tmp_path / "run")
    assert params.dump.store_final_hidden == "auto"
    store = open_store(dump.run(params))
    assert not store.manifest.has_final_hidden and store.manifest.dtypes.final_hidden is None
    assert "final_hidden" not in zarr.open_group(params.dump.store, mode="r")["part-00000"]
    assert store.sample(0).final_hidden is None
    summary = train_run(params)
    assert summary["step"] == 2 and math.isfinite(summary["loss"]) and math.isfinite(summary["l1"])
    recompute = make_params(
        tiny_llama_dir, prepared, tmp_path / "f.zarr", tmp_path / "run2", l1_mode="recompute"
    )
    with pytest.raises(
        StoreMismatchError, match=r"has_final_hidden=False but train\.l1_mode='recompute' needs"
    ):
        train_run(recompute)
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_non_finite_target_output_names_the_sample(tiny_llama_dir, make_prepared, tmp_path, monkeypatch):
    prepared = make_prepared(3, min_len=8, max_len=12)
    forward = HFTarget.forward

    def poisoned(self, ids, attn):
        out = forward(self, ids, attn)
        hidden = out.hidden.clone()
        hidden[0, 2, 1, 5] = float("inf")
        return dataclasses.replace(out, hidden=hidden)

    monkeypatch.setattr(HFTarget, "forward", poisoned)
    with pytest.raises(
        fp8.NonFiniteFeatureError,
        match=r"train: sample \d \(sample_id \d+\): hidden state is inf "
        r"at token 2, layer 2, channel 5",
    ):
        dump.run(make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr", tmp_path / "run"))
    with pytest.raises(StoreError, match="incomplete parts"):  # nothing marked complete
        open_store(str(tmp_path / "f.zarr"))
