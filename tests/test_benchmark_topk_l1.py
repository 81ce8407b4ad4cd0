"""benchmarks/topk_l1.py scores every L1 estimator against the exact L1 on a synthetic store."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_script import load_benchmark
from synthetic_store import make_store
from test_train_loop import make_params

from dspark_offline.model import DraftModelConfig, DSparkDraft, save_serving
from dspark_offline.store import open_store


def _load_script():
    return load_benchmark("topk_l1")


def _rows(out: str, title: str) -> dict[tuple[str, int], list[float]]:
    """{(estimator, k): [bytes, mean err, mean |err|, p95, max, accept err]} of one table (k "-" -> 0)."""
    block = out.split(f"## {title}")[1].split("\n\n")[0]
    rows = {}
    for line in block.splitlines()[2:]:
        name, k, *nums = line.split()
        rows[(name, 0 if k == "-" else int(k))] = [float(v) for v in nums]
    return rows


def test_benchmark_ranks_the_estimators_against_the_exact_l1(tmp_path, capsys):
    store = make_store(tmp_path / "features.zarr", num_samples=8, top_k=8)
    params = make_params(store, tmp_path / "run", val_samples=3, vocab_size=40)
    torch.manual_seed(0)
    model = DSparkDraft(DraftModelConfig.from_manifest(open_store(str(store)).manifest, params.draft))
    save_serving(model, params.export.output)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(json.dumps(params.model_dump(mode="json")))  # JSON is YAML

    assert _load_script().main(["-p", str(cfg), "--ks", "1,4,8,16", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "q over a training vocabulary of 40 ids" in out
    rows = _rows(out, f"drafter {params.export.output}")
    assert {k for (name, k) in rows if name == "topk"} == {1, 4, 8, 16}
    assert ("recompute", 16) not in rows  # needs the stored probabilities: k <= the stored 8
    for k in (1, 4, 8, 16):
        topk, capped, upper = rows[("topk", k)], rows[("capped", k)], rows[("upper", k)]
        assert topk[1] <= capped[1] + 1e-6 <= 1e-6 <= upper[1] + 2e-6  # mean errors: bounds on each side
        assert topk[0] == 6 * k
    recompute = rows[("recompute", 8)]
    assert recompute[0] == 6 * 8 + 4 * 32  # top-8 + final_hidden (H = 32, float32 in the synthetic store)
    assert ("exact", 0) not in rows  # scored as an estimator only against the target's own final_hidden
    assert recompute[2] < 1e-2 < rows[("topk", 8)][2]  # fp16 probabilities: close, not exact
    for mode in ("topk", "capped", "recompute", "exact"):
        assert f"\n{mode} " in out.split("l1_mode")[1]


def test_benchmark_reference_from_the_target(tmp_path, capsys, monkeypatch):
    """--reference target: the exact L1 from the final_hidden the target recomputes (here a stand-in
    returning the stored one plus noise), and l1_mode exact on the stored final_hidden scored as an
    estimator against it."""
    store = make_store(tmp_path / "features.zarr", num_samples=8, top_k=8)
    params = make_params(store, tmp_path / "run", val_samples=3)
    torch.manual_seed(0)
    save_serving(
        DSparkDraft(DraftModelConfig.from_manifest(open_store(str(store)).manifest, params.draft)),
        params.export.output,
    )
    cfg = tmp_path / "params.yaml"
    cfg.write_text(json.dumps(params.model_dump(mode="json")))
    script = _load_script()
    calls = []

    def fake_reference(params_, store_):
        def final_hidden(batch):
            calls.append(batch["input_ids"].shape)
            return batch["final_hidden"].float() + 0.05 * torch.randn(batch["final_hidden"].shape)

        return final_hidden

    monkeypatch.setattr(script, "target_reference", fake_reference)
    assert script.main(["-p", str(cfg), "--ks", "8", "--repeat", "1", "--reference", "target"]) == 0
    out = capsys.readouterr().out
    assert calls and "exact L1 from the target final_hidden" in out
    rows = _rows(out, f"drafter {params.export.output}")
    assert (
        rows[("exact", 0)][0] == 4 * 32 and 0 < rows[("exact", 0)][2] < 0.5
    )  # the stored final_hidden's error


def test_benchmark_needs_held_out_samples(tmp_path, capsys):
    store = make_store(tmp_path / "features.zarr", num_samples=4)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(json.dumps(make_params(store, tmp_path / "run").model_dump(mode="json")))
    assert _load_script().main(["-p", str(cfg)]) == 2
    assert "val_samples is 0" in capsys.readouterr().err


def test_benchmark_needs_final_hidden(tmp_path, capsys):
    store = make_store(tmp_path / "features.zarr", num_samples=6, final_hidden=False)
    cfg = tmp_path / "params.yaml"
    cfg.write_text(json.dumps(make_params(store, tmp_path / "run", val_samples=2).model_dump(mode="json")))
    assert _load_script().main(["-p", str(cfg)]) == 2
    assert "has no final_hidden" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _scoped_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
