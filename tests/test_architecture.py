"""DESIGN §2, "one-way imports", checked on the source.

    stages/, cli -> prepare / generate / dump / train / evaluate -> target, store, model, data -> config

The units are the top-level modules and subpackages of `dspark_offline`, in four layers; a unit
imports its own modules and units of LOWER layers only, so nothing imports upwards or sideways:

* entry points: `cli` (and `schemas`, the `python -m` schema writer); the DVC adapters in
  `stages/` are entry points too, and nothing imports `stages/`;
* stages: `prepare`, `generate`, `dump`, `train` (+ export), `evaluate`; a stage never imports
  another stage;
* components: `target`, `store`, `model`, `data`; a component never imports another component
  (a piece two of them need belongs to the foundation, or the stage composes them);
* foundation: `config`, `params_file`, `errors`, `outputs`, `linalg`, `entry`, the package
  `__init__` (version only); the foundation modules may import each other.

Third-party libraries with one home: zarr (with numcodecs) only in `store/`; tensorstore, an
optional extra, only in `store/tensorstore_engine.py` (the dump's second shard writer); deepspeed only in
`train/` (the model is single-device); vllm, an optional extra, only in the vLLM modules: the
dump backend (`target/vllm_backend.py`, `target/vllm_connector.py`, the connector vLLM loads) and
generate's engine (`generate/vllm_engine.py`).

Every import counts: module level or inside a function (lazy imports are still arrows), relative
ones resolved, and `importlib.import_module("...")` / `__import__("...")` with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dspark_offline"

ENTRY, STAGE, COMPONENT, FOUNDATION = "entry point", "stage", "component", "foundation"
RANK = {FOUNDATION: 0, COMPONENT: 1, STAGE: 2, ENTRY: 3}
LAYERS = {
    "cli": ENTRY,
    "schemas": ENTRY,
    "prepare": STAGE,
    "generate": STAGE,
    "dump": STAGE,
    "train": STAGE,
    "evaluate": STAGE,
    "target": COMPONENT,
    "store": COMPONENT,
    "model": COMPONENT,
    "data": COMPONENT,
    "config": FOUNDATION,
    "params_file": FOUNDATION,
    "errors": FOUNDATION,
    "outputs": FOUNDATION,
    "linalg": FOUNDATION,
    "launch": FOUNDATION,
    "entry": FOUNDATION,
    "__init__": FOUNDATION,
}
# third-party top-level package -> the package paths (relative to the repo root) allowed to import it
HOMES = {
    "zarr": ("dspark_offline/store/",),
    "numcodecs": ("dspark_offline/store/",),
    "tensorstore": ("dspark_offline/store/tensorstore_engine.py",),
    "deepspeed": ("dspark_offline/train/",),
    "vllm": (
        "dspark_offline/target/vllm_backend.py",
        "dspark_offline/target/vllm_connector.py",
        "dspark_offline/generate/vllm_engine.py",
    ),
}


@dataclass(frozen=True)
class Import:
    line: int
    name: str  # absolute dotted name
    names: tuple[str, ...] = ()  # for `from X import a, b`: ("a", "b")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect_imports(path: Path, module: str) -> list[Import]:
    """Every import of the file, wherever it is (module level, function body, `if` branch)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from ..x import y`: resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(Import(node.lineno, name, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(Import(node.lineno, node.args[0].value))
    return found


def _units(package_dir: Path) -> set[str]:
    mods = {p.stem for p in package_dir.glob("*.py")}
    return mods | {p.parent.name for p in package_dir.glob("*/__init__.py")}


def _targets(imp: Import, units: set[str]) -> set[str]:
    """The units of the package an import reaches (`from dspark_offline import dump` reaches dump)."""
    parts = imp.name.split(".")
    if parts[0] != PACKAGE:
        return set()
    if len(parts) > 1:
        return {parts[1] if parts[1] in units else "__init__"}
    return {n if n in units else "__init__" for n in imp.names} or {"__init__"}


def violations(root: Path) -> list[str]:
    """The import arrows of the tree at `root` that break the rules above, one line each."""
    package_dir = root / PACKAGE
    units = _units(package_dir)
    problems = [
        f"{PACKAGE}/{u}: in no layer; add it to LAYERS in tests/test_architecture.py"
        for u in sorted(units - set(LAYERS))
    ]
    files = sorted(package_dir.rglob("*.py")) + sorted((root / "stages").glob("*.py"))
    for path in files:
        rel = path.relative_to(root).as_posix()
        module = module_name(root, path)
        in_package = module.split(".")[0] == PACKAGE
        src = (module.split(".")[1] if "." in module else "__init__") if in_package else "stages"
        src_layer = LAYERS.get(src, ENTRY)  # stages/ scripts are entry points
        for imp in collect_imports(path, module):
            top = imp.name.split(".")[0]
            where = f"{rel}:{imp.line}: imports {imp.name}"
            if top in HOMES and not rel.startswith(HOMES[top]):
                problems.append(f"{where}: {top} is imported only in {', '.join(HOMES[top])}")
            if top == "stages":
                problems.append(f"{where}: nothing imports stages/ (DVC adapters are entry points)")
            for dst in sorted(_targets(imp, units)):
                if dst == src or dst not in LAYERS:
                    continue
                dst_layer = LAYERS[dst]
                if RANK[dst_layer] < RANK[src_layer] or src_layer == dst_layer == FOUNDATION:
                    continue
                direction = "sideways" if dst_layer == src_layer else "upwards"
                problems.append(f"{where}: {src_layer} {src} -> {dst_layer} {dst} ({direction})")
    return problems


# -- the tree ----------------------------------------------------------------------------------------


def test_the_tree_keeps_the_one_way_rule():
    problems = violations(ROOT)
    assert not problems, "DESIGN §2 import rule broken:\n" + "\n".join(problems)


def test_allowed_vllm_modules_exist():
    """The allow-list names real files (a renamed module must not leave a stale exception behind)."""
    for home in HOMES["vllm"]:
        assert (ROOT / home).is_file(), home


# -- the checker, on a synthetic package: it must catch what it claims to ----------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "dspark_offline/__init__.py": '__version__ = "0"\n',
    "dspark_offline/config.py": "from dspark_offline.errors import UserError\n",
    "dspark_offline/errors.py": "class UserError(Exception): ...\n",
    "dspark_offline/cli.py": (
        "def dump():\n    from dspark_offline.dump import run\n\n"
        "def prepare():\n    from dspark_offline import prepare\n"
    ),
    "dspark_offline/prepare.py": (
        "from dspark_offline.data.render import x\nfrom dspark_offline.target import y\n"
    ),
    "dspark_offline/dump.py": "from dspark_offline import __version__\nfrom dspark_offline.store import w\n",
    "dspark_offline/data/__init__.py": "",
    "dspark_offline/data/render.py": "from . import skips\nfrom dspark_offline.config import Params\n",
    "dspark_offline/data/skips.py": "",
    "dspark_offline/target/__init__.py": "",
    "dspark_offline/target/vllm_backend.py": "def load():\n    import vllm\n",
    "dspark_offline/store/__init__.py": "import zarr\n",
    "dspark_offline/model/__init__.py": "import torch\n",
    "stages/dump.py": "from dspark_offline.dump import run\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    assert violations(_tree(tmp_path, CLEAN)) == []


def test_checker_catches_each_kind_of_violation(tmp_path):
    planted = {
        # sideways between components, hidden inside a function (what data/render.py once did)
        "dspark_offline/data/render.py": (
            "from . import skips\n\ndef load():\n    from dspark_offline.target.embedded import resolve\n"
        ),
        # sideways through a relative import
        "dspark_offline/model/heads.py": "from ..store import reader\n",
        # upwards: a component importing a stage, by string
        "dspark_offline/store/writer.py": (
            "import importlib\nimportlib.import_module('dspark_offline.dump')\n"
        ),
        # a stage importing another stage (`from package import module`)
        "dspark_offline/dump.py": "from dspark_offline import prepare\n",
        # the foundation importing a component
        "dspark_offline/config.py": "from dspark_offline.model import DraftModelConfig\n",
        # libraries outside their home
        "dspark_offline/model/layers.py": "import zarr.codecs\n",
        "dspark_offline/data/sources.py": "def f():\n    import deepspeed\n",
        "dspark_offline/target/hf_backend.py": "from vllm import LLM\n",
        # importing the DVC adapters
        "dspark_offline/target/__init__.py": "import stages.dump\n",
        # a new top-level module nobody placed in a layer
        "dspark_offline/helpers.py": "",
    }
    got = violations(_tree(tmp_path, {**CLEAN, **planted}))
    expected = [
        "dspark_offline/helpers: in no layer",
        (
            "dspark_offline/config.py:1: imports dspark_offline.model: "
            "foundation config -> component model (upwards)"
        ),
        (
            "dspark_offline/data/render.py:4: imports dspark_offline.target.embedded: "
            "component data -> component target (sideways)"
        ),
        (
            "dspark_offline/data/sources.py:2: imports deepspeed: "
            "deepspeed is imported only in dspark_offline/train/"
        ),
        "dspark_offline/dump.py:1: imports dspark_offline: stage dump -> stage prepare (sideways)",
        (
            "dspark_offline/model/heads.py:1: imports dspark_offline.store: "
            "component model -> component store (sideways)"
        ),
        (
            "dspark_offline/model/layers.py:1: imports zarr.codecs: "
            "zarr is imported only in dspark_offline/store/"
        ),
        (
            "dspark_offline/store/writer.py:2: imports dspark_offline.dump: "
            "component store -> stage dump (upwards)"
        ),
        "dspark_offline/target/__init__.py:1: imports stages.dump: nothing imports stages/",
        "dspark_offline/target/hf_backend.py:1: imports vllm: vllm is imported only in",
    ]
    for line in expected:
        assert sum(g.startswith(line) for g in got) == 1, (line, got)
    assert len(got) == len(expected), got
