"""dvc.yaml stays honest: every stage lists the library code its script imports (transitively),
so DVC notices a code change; outputs and metrics come from params.yaml."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

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
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("dspark_offline"):
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


def test_feature_store_is_persistent_and_uncached():
    (store_out,) = _stages()["dump"]["outs"]
    ((path, opts),) = store_out.items()
    assert path == "${dump.store}"
    assert opts == {"cache": False, "persist": True}


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
    assert {"${prepare.output}", "${generate.output}"} <= set(dump["deps"]) and "generate.enabled" in dump["params"]
    # evaluate's prompts are the eval split of the prepare output, never the generated data
    assert "${prepare.output}" in evaluate["deps"] and "${generate.output}" not in evaluate["deps"]


def test_analytics_off():
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()
