"""dvc.yaml stays honest: every stage lists the library code its script imports (transitively),
so DVC notices a code change; outputs and metrics come from params.yaml; DVC knows the feature
store only by its completion record, so its bookkeeping does not grow with the store."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from synthetic_store import inflate_shards, make_store

from dspark_offline.store.record import RECORD_SUFFIX, record_path, write_record

ROOT = Path(__file__).resolve().parents[1]


def _module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """dspark_offline modules imported anywhere in the file (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dspark_offline")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("dspark_offline")
        ):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def _closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        f = todo.pop()
        for mod in _imports(f):
            parts = mod.split(".")
            # importing a.b.c also executes a/__init__.py and a/b/__init__.py
            for i in range(1, len(parts) + 1):
                file = _module_file(".".join(parts[:i]))
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_the_code_it_imports():
    problems = []
    for name, stage in _stages().items():
        script = ROOT / stage["cmd"].split()[-1]
        deps = [d for d in stage["deps"] if not str(d).startswith("${")]
        assert str(script.relative_to(ROOT)) in deps, f"{name}: its script is not a dep"
        for file in sorted(_closure(script)):
            rel = file.relative_to(ROOT).as_posix()
            if rel == "dspark_offline/__init__.py":
                continue  # version string only
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                problems.append(f"stage {name}: imports {rel} but does not list it in deps")
    assert not problems, "\n".join(problems)


def test_store_is_known_to_dvc_by_its_completion_record_only():
    """DVC would md5 every byte of a store it tracks; the dump's output and train's dependency is
    the small completion record instead, and no stage names the store directory itself (so DVC
    neither caches nor deletes it: a re-run dump resumes it)."""
    stages = _stages()
    (record_out,) = stages["dump"]["outs"]
    ((path, opts),) = record_out.items()
    assert path == "${dump.store}" + RECORD_SUFFIX and opts == {"cache": False}
    assert record_path("data/features.zarr") == "data/features.zarr" + RECORD_SUFFIX  # what DVC interpolates
    assert path in stages["train"]["deps"]
    for name, stage in stages.items():
        named = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage["deps"]]
        assert "${dump.store}" not in named, f"stage {name} names the store directory itself"


def test_training_params_do_not_touch_stage_1():
    stages = _stages()
    for name in ("prepare", "generate", "dump"):
        assert "train" not in stages[name]["params"] and "draft" not in stages[name]["params"]
    assert "train" in stages["train"]["params"]


def test_generate_sits_between_prepare_and_dump():
    stages = _stages()
    assert list(stages)[:3] == ["prepare", "generate", "dump"]
    gen, dump, evaluate = stages["generate"], stages["dump"], stages["evaluate"]
    assert "${prepare.output}" in gen["deps"] and gen["outs"] == ["${generate.output}"]
    assert {"target", "generate", "prepare.max_length"} <= set(gen["params"])
    # dump reads one of the two directories, chosen by generate.enabled: it depends on both and on the switch
    assert {"${prepare.output}", "${generate.output}"} <= set(dump["deps"]) and "generate.enabled" in dump[
        "params"
    ]
    # evaluate's prompts are the eval split of the prepare output, never the generated data
    assert "${prepare.output}" in evaluate["deps"] and "${generate.output}" not in evaluate["deps"]


def test_analytics_off():
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()


def _scratch_repo(tmp_path: Path) -> Path:
    """A git + DVC repo with this repo's pipeline and the tiny params (as in test_pipeline_e2e)."""
    repo = tmp_path / "repo"
    for name in ("dvc.yaml", ".dvcignore", "stages", "dspark_offline", ".dvc/config"):
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    shutil.copy(ROOT / "configs" / "tiny.yaml", repo / "params.yaml")
    (repo / ".gitignore").write_text("/data/\n/runs/\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "scratch"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def _run(cmd: list[str], repo: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - t0, proc


def test_dvc_bookkeeping_does_not_read_the_store(tmp_path):
    """A store of hundreds of shards of 1 GiB each (sparse: no disk used): `dvc commit` and
    `dvc status` of the dump stage take seconds, where hashing the store would take minutes; a
    store changed behind DVC's back is refused by the train stage."""
    repo = _scratch_repo(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for d in (params["prepare"]["output"], params["generate"]["output"]):  # the dump stage's data deps
        (repo / d).mkdir(parents=True)
        (repo / d / "meta.json").write_text("{}")
    store = make_store(repo / params["dump"]["store"], num_samples=200, num_parts=2)
    shards = inflate_shards(store, 1 << 30)
    apparent = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert shards >= 200 and apparent > 200 << 30
    write_record(store)

    took_commit, proc = _run(["dvc", "commit", "--force", "dump"], repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    took_status, proc = _run(["dvc", "status", "dump"], repo)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stdout + proc.stderr
    print(
        f"{shards} shards, {apparent / 2**30:.0f} GiB apparent: dvc commit {took_commit:.1f} s, "
        f"dvc status {took_status:.1f} s"
    )
    # md5 of 200+ GiB takes minutes even of holes; DVC's own start-up is ~1-3 s on a loaded machine
    assert took_commit < 20 and took_status < 10
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["dump"]
    assert [o["path"] for o in lock["outs"]] == [params["dump"]["store"] + RECORD_SUFFIX]
    assert not any(d["path"] == params["dump"]["store"] for d in lock["deps"])

    # behind DVC's back: a shard deleted. DVC cannot see it; the train stage refuses the store.
    victim = next(f for f in (store / "part-00000" / "hidden" / "c").rglob("*") if f.is_file())
    victim.unlink()
    _, proc = _run(["dvc", "status", "dump"], repo)
    assert "up to date" in proc.stdout, proc.stdout + proc.stderr
    _, proc = _run([sys.executable, "stages/train.py"], repo)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "store changed since the dump recorded it" in proc.stderr and "part-00000" in proc.stderr, (
        proc.stderr
    )
    assert json.loads((store.parent / (store.name + RECORD_SUFFIX)).read_text())["num_parts"] == 2
