"""benchmarks/confidence_head.py runs on a tiny trained drafter and scores what validation scores."""

from __future__ import annotations

import json

import pytest
from benchmark_script import load_benchmark
from synthetic_store import make_store
from test_train_loop import make_params

from dspark_offline.train.export import run as export_run
from dspark_offline.train.loop import run as train_run
from dspark_offline.train.metrics import read_tsv


@pytest.fixture(autouse=True)
def _scoped_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")


def _load_script():
    return load_benchmark("confidence_head")


def test_confidence_head_benchmark_scores_the_exported_head_like_validation(tmp_path, capsys):
    store = make_store(tmp_path / "features.zarr", num_samples=10)
    params = make_params(store, tmp_path / "run", max_steps=3, save_every=3, val_samples=3, val_every=3)
    train_run(params)
    export_run(params)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(json.dumps(params.model_dump(mode="json")))  # JSON is YAML

    assert _load_script().main(["-p", str(cfg), "--steps", "20", "--fit-samples", "4"]) == 0
    out = capsys.readouterr().out
    trained = next(ln for ln in out.splitlines() if ln.startswith("trained head"))
    bce, excess, _skill = (float(v) for v in trained.split()[-3:])
    last = read_tsv(tmp_path / "run" / "metrics" / "val.tsv")[-1]  # the same head, samples and anchors
    assert bce == pytest.approx(last["conf"], abs=2e-4)
    assert excess == pytest.approx(last["conf_excess"], abs=2e-4)
    assert "re-fitted alone from zero (20 steps)" in out


def test_confidence_head_benchmark_needs_held_out_samples(tmp_path, capsys):
    store = make_store(tmp_path / "features.zarr", num_samples=4)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(json.dumps(make_params(store, tmp_path / "run").model_dump(mode="json")))
    assert _load_script().main(["-p", str(cfg)]) == 2
    assert "val_samples is 0" in capsys.readouterr().err
