"""End to end: `dvc repro` of the tiny profile in a scratch copy of the repo, then re-training
from cached features with `dvc exp run -S train.learning_rate=...` (only train + evaluate run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def test_tiny_profile_dvc_repro_then_retrain_from_cached_features(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "stages", "dspark_offline", ".dvc/config"):
        src = ROOT / name
        dst = repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    shutil.copy(ROOT / "configs" / "tiny.yaml", repo / "params.yaml")
    (repo / ".gitignore").write_text("/data/\n/runs/\n")
    _run(["git", "init", "-q"], repo)
    # a repo-local identity: `dvc exp run` commits, and CI machines may have no global one
    _run(["git", "config", "user.name", "dspark-offline tests"], repo)
    _run(["git", "config", "user.email", "tests@localhost"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny"], repo)

    out = _run(["dvc", "repro"], repo)
    for stage in ("prepare", "generate", "dump", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    # the tiny profile is on-policy: the store was dumped from the target's own answers
    report = json.loads((repo / "data/generated/report.json").read_text())
    assert report["samples"] >= 1 and report["generated_tokens"] >= report["samples"]
    manifest = json.loads((repo / "data/features.zarr/zarr.json").read_text())["attributes"]["dspark_offline"]
    # DVC knows the store by its completion record only
    record = json.loads((repo / "data/features.zarr.complete.json").read_text())
    assert record["params_fingerprint"] == manifest["params_fingerprint"]
    assert manifest["data"]["prepared_path"] == "data/generated"
    metrics = json.loads((repo / "runs/tiny/eval.json").read_text())
    assert metrics["tau"] >= 1.0 and metrics["tau_prompt_lookup"] >= 1.0 and metrics["lossless"] is True
    assert len(metrics["tau_ci95"]) == 2 and metrics["tau_vs_prompt_lookup"] > 0
    assert (
        len((repo / "runs/tiny/eval_per_prompt.tsv").read_text().splitlines()) == 1 + metrics["num_prompts"]
    )
    assert (repo / "runs/tiny/drafter/model.safetensors").exists()
    assert (repo / "runs/tiny/metrics.json").exists()

    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "lock"], repo)
    out = _run(["dvc", "exp", "run", "-S", "train.learning_rate=0.002"], repo)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out, out[-3000:]
    for stage in ("prepare", "generate", "dump"):
        assert f"Running stage '{stage}'" not in out, out[-3000:]
    shown = _run(["dvc", "metrics", "show", "--json"], repo)
    assert all(f'"{key}"' in shown for key in ("tau", "tau_prompt_lookup", "tau_vs_prompt_lookup")), shown
