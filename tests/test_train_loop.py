"""Stage 2 end to end in one process (DeepSpeed ZeRO-2 on CPU, gloo, world of one):
training outputs, resume equivalence, store/drafter compatibility, export round trip."""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import pytest
import torch
from synthetic_store import TARGET_NAME, make_store

from dspark_offline.config import Params
from dspark_offline.model import DraftModelConfig, DSparkDraft, LossConfig
from dspark_offline.model.serving import load_serving
from dspark_offline.store import StoreIntegrityError, StoreMismatchError, open_store
from dspark_offline.train import checkpoint
from dspark_offline.train.dataset import FeatureDataset, SampleReadError
from dspark_offline.train.export import consolidated_state_dict
from dspark_offline.train.export import run as export_run
from dspark_offline.train.loop import run as train_run
from dspark_offline.train.metrics import read_tsv
from dspark_offline.train.selection import select_samples
from dspark_offline.train.validate import Validator, split_validation


@pytest.fixture(autouse=True)
def _scoped_local_rank(monkeypatch):
    """dist.setup() sets LOCAL_RANK for DeepSpeed; keep it from leaking into other tests."""
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "features.zarr", num_samples=12)


def make_params(store, out, **train) -> Params:
    base = {
        "output_dir": str(out),
        "max_steps": 4,
        "micro_batch_size": 2,
        "num_anchors": 8,
        "save_every": 2,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "dtype": "float32",
    }
    return Params.model_validate(
        {
            "target": {"path": TARGET_NAME},
            "dump": {"store": str(store), "layer_ids": [1, 3]},
            "draft": {"num_layers": 1, "block_size": 4, "markov_rank": 8},
            "train": {**base, **train},
            "export": {"output": str(out / "drafter")},
        }
    )


def test_training_writes_metrics_checkpoints_and_meta(store, tmp_path):
    summary = train_run(make_params(store, tmp_path, max_steps=6, save_every=4))
    rows = read_tsv(tmp_path / "metrics" / "train.tsv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for col in ("loss", "ce", "l1", "conf", "conf_excess", "acc", "tau_probabilistic", "lr", "tokens_per_s"):
        assert all(math.isfinite(r[col]) for r in rows), col
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns (fixed seeds: deterministic)
    assert 1.0 <= rows[-1]["tau_probabilistic"] <= 1 + 4
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["step"] == 6 and saved["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-5)
    assert saved["plan"]["global_batch"] == 2 and saved["plan"]["steps_per_epoch"] == 6
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path))
    assert meta["step"] == 6 and meta["epoch"] == 1 and meta["sampler"] == {"epoch": 1, "index": 0}
    assert meta["store_fingerprint"] == open_store(str(store)).manifest.params_fingerprint
    assert meta["params"]["train"]["max_steps"] == 6 and meta["draft_config"]["target_layer_ids"] == [1, 3]
    assert summary["loss"] == saved["loss"]


def test_resumed_run_matches_uninterrupted_run(store, tmp_path, monkeypatch):
    """Acceptance (5): killed after step s=3, resumed, reaches 2s=6 with the same parameters.

    grad_accum 2 and an epoch boundary inside the run (12 samples / global batch 2 = 6 steps)
    exercise the sampler position, the anchor seeds and the LR scheduler state.
    """
    kw = {
        "max_steps": 6,
        "save_every": 3,
        "micro_batch_size": 1,
        "grad_accum": 2,
        "warmup_ratio": 0.3,
        "max_length": 32,
        "val_samples": 2,
        "val_every": 2,
    }
    straight = tmp_path / "straight"
    train_run(make_params(store, straight, **kw))

    class Killed(Exception):
        pass

    real_save = checkpoint.save

    def save_then_die(engine, out, step, meta, *, is_main):
        path = real_save(engine, out, step, meta, is_main=is_main)
        if step == 3:
            raise Killed
        return path

    broken = tmp_path / "broken"
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train_run(make_params(store, broken, **kw))
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert checkpoint.latest_checkpoint(broken).name == "step-00000003"
    train_run(make_params(store, broken, resume=True, **kw))

    a = consolidated_state_dict(checkpoint.latest_checkpoint(straight))
    b = consolidated_state_dict(checkpoint.latest_checkpoint(broken))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    rows_a, rows_b = read_tsv(straight / "metrics" / "train.tsv"), read_tsv(broken / "metrics" / "train.tsv")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b):
        assert rb["loss"] == ra["loss"] and rb["lr"] == ra["lr"]
    val_a, val_b = read_tsv(straight / "metrics" / "val.tsv"), read_tsv(broken / "metrics" / "val.tsv")
    assert [r["step"] for r in val_b] == [0, 2, 4, 6]  # step 2 kept from before the kill, not scored twice
    for ra, rb in zip(val_a, val_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    # no checkpoint after the last: resuming a finished run is a no-op that keeps the summary
    again = train_run(make_params(store, broken, resume=True, **kw))
    assert again["step"] == 6 and again["loss"] == pytest.approx(
        rows_a[-1]["loss"], rel=1e-5
    )  # TSV: 6 digits
    assert again["val"]["loss"] == pytest.approx(val_a[-1]["loss"], rel=1e-5)


def test_validation_scores_held_out_samples_with_the_current_weights(store, tmp_path):
    params = make_params(store, tmp_path, max_steps=4, save_every=4, val_samples=3, val_every=3)
    summary = train_run(params)
    assert summary["plan"]["num_samples"] == 12 - 3  # held out of training
    rows = read_tsv(tmp_path / "metrics" / "val.tsv")
    assert [r["step"] for r in rows] == [0, 3, 4]  # untrained, every val_every, the last step
    for r in rows:
        for col in (
            "loss",
            "ce",
            "l1",
            "conf",
            "conf_floor",
            "conf_excess",
            "conf_skill",
            "acc",
            "tau_probabilistic",
        ):
            assert math.isfinite(r[col]), col
        assert r["loss"] == pytest.approx(0.1 * r["ce"] + 0.9 * r["l1"] + r["conf"], rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["val"]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-5)

    # the last row is the exported drafter scored on the held-out samples, with the same anchors
    export_run(params)
    fs = open_store(str(store))
    head = fs.target_weights()
    served = load_serving(tmp_path / "drafter", head["embed_tokens"], head["lm_head"])
    _, val = split_validation(select_samples(fs, None, params.train.min_loss_tokens, progress=False), 3, 0)
    again = Validator(
        FeatureDataset(fs, val, None),
        LossConfig.from_train(params.train),
        micro_batch_size=2,
        num_anchors=8,
        seed=0,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
    )(served)
    for col in ("loss", "ce", "l1", "conf", "conf_skill", "tau_probabilistic"):
        assert again[col] == pytest.approx(rows[-1][col], rel=1e-4), col

    with pytest.raises(ValueError, match="val_samples=12 would hold out every one of the 12 usable samples"):
        train_run(make_params(store, tmp_path / "all", val_samples=12))


@pytest.mark.parametrize(
    ("store_kw", "params_kw", "message"),
    [
        (
            {"target_name": "another-target"},
            {},
            r"target\.name='another-target'.*needs target\.name='synthetic-tiny'",
        ),
        ({"layer_ids": (2, 4)}, {}, r"layer_ids=\[2, 4\].*needs layer_ids=\[1, 3\]"),
        ({"final_hidden": False}, {"l1_mode": "exact"}, r"has_final_hidden=False.*has_final_hidden=True"),
        (
            {"final_hidden": False},
            {},
            r"has_final_hidden=False but train\.l1_mode='recompute' needs.*l1_mode=capped",
        ),
        (
            {"top_k": 4, "drop": "topk_ids"},
            {},
            r"bad\.zarr: damaged feature store: part-00000/topk_ids: array missing",
        ),
    ],
    ids=[
        "other-target",
        "other-layer-ids",
        "exact-without-final-hidden",
        "default-without-final-hidden",
        "missing-topk",
    ],
)
def test_incompatible_store_is_refused_before_step_one(tmp_path, store_kw, params_kw, message):
    """Acceptance (7): the error names the store's value and the one the drafter needs."""
    drop = store_kw.pop("drop", None)
    bad = make_store(tmp_path / "bad.zarr", **store_kw)
    if drop:
        shutil.rmtree(bad / "part-00000" / drop)
    with pytest.raises((StoreMismatchError, StoreIntegrityError, SampleReadError), match=message):
        train_run(make_params(bad, tmp_path / "out", **params_kw))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_refuses_a_different_store(store, tmp_path):
    train_run(make_params(store, tmp_path, max_steps=2))
    other = make_store(tmp_path / "other.zarr", seed=1)
    with pytest.raises(
        StoreMismatchError, match="checkpoint being resumed was trained on params_fingerprint"
    ):
        train_run(make_params(other, tmp_path, max_steps=4, resume=True))


def test_export_round_trip_gives_the_trained_logits(store, tmp_path):
    params = make_params(store, tmp_path, max_steps=3, save_every=3)
    train_run(params)
    result = export_run(params)
    assert result["step"] == 3 and (tmp_path / "drafter" / "config.json").is_file()

    last = checkpoint.latest_checkpoint(tmp_path)
    cfg = DraftModelConfig(**checkpoint.read_meta(last)["draft_config"])
    trained = DSparkDraft(cfg)  # the live module weights DeepSpeed saved, independent of zero_to_fp32
    trained.load_state_dict(torch.load(last / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    fs = open_store(str(store))
    head = fs.target_weights()
    trained.set_target_head(head["embed_tokens"], head["lm_head"])
    served = load_serving(tmp_path / "drafter", head["embed_tokens"], head["lm_head"])

    s = fs.sample(0)
    anchors = torch.tensor([[2, 5, 9]])  # [1, A]
    keep = torch.ones_like(anchors, dtype=torch.bool)
    block_ids = torch.full((1, 3, cfg.block_size), cfg.mask_token_id)  # [1, A, B]: [x[a], MASK, ...]
    block_ids[0, :, 0] = s.input_ids[anchors[0]]
    with torch.no_grad():
        logits = []
        for model in (trained.eval(), served):
            out = model(s.input_ids[None], s.hidden[None], anchors, keep)  # hidden [1, A, B, H]
            logits.append(model.block_logits(out.hidden, block_ids))  # [1, A, B, V]
    assert torch.equal(logits[0], logits[1])


def test_bf16_training_and_export(store, tmp_path):
    params = make_params(store, tmp_path, max_steps=2, dtype="bfloat16")
    summary = train_run(params)
    assert math.isfinite(summary["loss"])
    export_run(params)
    conf = json.loads((tmp_path / "drafter" / "config.json").read_text())
    assert conf["dtype"] == "bfloat16"


@pytest.mark.slow
def test_train_and_export_from_a_real_dump(tiny_llama_dir, make_prepared, tmp_path):
    """prepare -> dump (tiny random Llama, real 49k vocabulary) -> train -> export -> load."""
    from dspark_offline import dump

    prepared = make_prepared(6, min_len=16, max_len=40)
    params = Params.model_validate(
        {
            "target": {"path": str(tiny_llama_dir), "dtype": "float32", "device": "cpu"},
            "prepare": {"output": str(prepared)},
            "dump": {
                "store": str(tmp_path / "features.zarr"),
                "num_layer_ids": 2,
                "top_k": 8,
                "shard_tokens": 64,
                "chunk_tokens": 16,
                "batch_tokens": 256,
            },
            "draft": {"num_layers": 1, "block_size": 4, "markov_rank": 8, "mask_token": "<empty_output>"},
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 2,
                "micro_batch_size": 2,
                "num_anchors": 4,
                "chunk_blocks": 4,
                "save_every": 2,
                "l1_mode": "exact",
            },
            "export": {"output": str(tmp_path / "drafter")},
        }
    )
    dump.run(params)
    summary = train_run(params)
    assert summary["step"] == 2 and math.isfinite(summary["loss"]) and math.isfinite(summary["l1"])
    export_run(params)
    head = open_store(params.dump.store).target_weights()
    served = load_serving(tmp_path / "drafter", head["embed_tokens"], head["lm_head"])
    from dspark_offline.target.layers import default_layer_ids

    assert served.cfg.vocab_size == 49152 and list(served.cfg.target_layer_ids) == default_layer_ids(4, 2)


def test_training_vocabulary_bigram_start_and_bf16(store, tmp_path):
    """The fast CPU recipe (a training vocabulary, the bigram Markov start, bf16 weights) trains
    through DeepSpeed, validates over the whole vocabulary and exports a full-size drafter."""
    params = make_params(
        store,
        tmp_path,
        max_steps=6,
        vocab_size=40,
        markov_init="bigram",
        dtype="bfloat16",
        val_samples=2,
        val_every=3,
    )
    summary = train_run(params)
    rows = read_tsv(tmp_path / "metrics" / "train.tsv")
    assert all(math.isfinite(r["loss"]) and 1.0 <= r["tau_greedy"] <= 5.0 for r in rows)
    assert math.isfinite(summary["val"]["tau_greedy"])
    # the bigram start is already a bigram model: held-out CE at step 0 beats a random start's
    random_start = make_params(
        store, tmp_path / "random", max_steps=1, vocab_size=40, dtype="bfloat16", val_samples=2, val_every=3
    )
    train_run(random_start)
    ce0 = lambda out: read_tsv(out / "metrics" / "val.tsv")[0]["ce"]
    assert ce0(tmp_path) < ce0(tmp_path / "random")
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path))
    assert meta["dtype"] == "bfloat16"
    export_run(params)
    back = load_serving(tmp_path / "drafter", torch.zeros(97, 32), torch.zeros(97, 32))
    assert back.markov_head.markov_w2.weight.shape == (97, 8)


def test_max_samples_trains_on_a_prefix_and_keeps_the_validation_split(store, tmp_path):
    """train.max_samples (data-size experiments) cuts the training samples, not the held-out ones."""
    full = train_run(make_params(store, tmp_path / "full", max_steps=1, val_samples=2, val_every=5))
    cut = train_run(
        make_params(store, tmp_path / "cut", max_steps=1, val_samples=2, val_every=5, max_samples=4)
    )
    assert full["plan"]["steps_per_epoch"] == 5 and cut["plan"]["steps_per_epoch"] == 2  # 10 vs 4 samples
    first_val = lambda out: read_tsv(out / "metrics" / "val.tsv")[0]
    assert first_val(tmp_path / "full")["ce"] == first_val(tmp_path / "cut")["ce"]  # same samples, same init


def test_loader_workers_move_the_reads_not_the_results_and_the_wait_is_logged(
    store, tmp_path, capsys, monkeypatch
):
    """train.loader_workers on CPU: the same losses as the default's inline reads; train.tsv's
    data_wait is each window's share of the step spent in next(batches); reads too slow for the
    workers end in one warning naming the field."""
    kw = {"max_steps": 6, "log_every": 2, "save_every": 6}
    train_run(make_params(store, tmp_path / "inline", **kw))
    assert "reading is part of the step" in capsys.readouterr().out
    train_run(make_params(store, tmp_path / "workers", loader_workers=2, **kw))
    assert "loader: 2 DataLoader worker(s) per rank (train.loader_workers)" in capsys.readouterr().out
    inline, workers = (read_tsv(tmp_path / run / "metrics" / "train.tsv") for run in ("inline", "workers"))
    assert [r["loss"] for r in workers] == [r["loss"] for r in inline]
    for rows in (inline, workers):
        assert [r["step"] for r in rows] == [2, 4, 6]
        assert all(0 <= r["data_wait"] < 1 for r in rows), rows

    real_read = FeatureDataset._read

    def slow_read(self, k):
        time.sleep(0.2)
        return real_read(self, k)

    monkeypatch.setattr(FeatureDataset, "_read", slow_read)  # the forked workers inherit it
    train_run(make_params(store, tmp_path / "slow", loader_workers=1, cache_gb=0, **{**kw, "max_steps": 4}))
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and "train.loader_workers" in warnings[0], warnings
    assert re.search(r"about \d+ worker\(s\) would keep up", warnings[0]), warnings
    rows = read_tsv(tmp_path / "slow" / "metrics" / "train.tsv")
    assert all(r["data_wait"] > 0.02 for r in rows), rows
