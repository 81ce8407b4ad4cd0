"""The fault matrix: every user or environment mistake ends in one line and exit code 2, never a
traceback; data-file problems that are skipped by design are counted; what would lose work or
silently change a result needs a flag.

Each case runs the real console entry point (`cli.main`) in this process, so an unexpected
exception fails the test with its traceback (what the user would have seen). Kinds, by group:
params/CLI, data files, outputs/filesystem, faults. (Store damage: tests/test_integrity.py.)
Read-only directories are real (chmod) for a normal user; as root, where permission bits do
not bind, writes under them are refused at `os.open`, the call every write probe goes through.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from synthetic_store import TARGET_NAME, make_store
from test_evaluate_run import _prepared
from test_evaluate_speculative import make_drafter_dir

from dspark_offline import cli
from dspark_offline.store import StoreError, open_store
from dspark_offline.store.lock import lock_path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, f"expected one error line, got:\n{self.err[-3000:]}"
        return lines[0]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # dist.setup() sets it for DeepSpeed; keep it scoped
    monkeypatch.delenv("DSPARK_OFFLINE_DEBUG", raising=False)


@pytest.fixture
def dspark(capsys, monkeypatch):
    """`dspark(*argv, cwd=...)` -> Result of the console entry point, exit code included."""

    def run(*argv, cwd: Path | None = None) -> Result:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["dspark-offline", *map(str, argv)])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def refused(r: Result, *words: str) -> str:
    """Exit 2, no traceback, one `error:` line containing every word; returns that line."""
    assert "Traceback" not in r.err + r.out, r.err[-3000:]
    assert r.code == 2, f"exit {r.code}:\n{r.err[-3000:]}"
    line = r.error_line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


def ok(r: Result) -> Result:
    assert r.code == 0, f"exit {r.code}:\n{r.err[-3000:]}"
    return r


@contextmanager
def read_only(directory: Path, monkeypatch):
    """Make `directory` unwritable for this process (see the module docstring for root)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o555)
    real_open, root = os.open, os.geteuid() == 0
    if root:
        top = str(directory.resolve())

        def guarded(path, flags, *args, **kwargs):
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and str(Path(os.fspath(path)).resolve()).startswith(top):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", guarded)
    try:
        yield directory
    finally:
        if root:
            monkeypatch.setattr(os, "open", real_open)
        directory.chmod(0o755)


# --- shared inputs (module scope: built once) ---------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def store(base) -> Path:
    return make_store(base / "features.zarr", num_samples=12)


def train_params(base: Path, store: Path, out: Path, **train) -> Path:
    """A params file training the tiny synthetic store into `out` (2 steps)."""
    params = {
        "target": {"path": TARGET_NAME},
        "dump": {"store": str(store), "layer_ids": [1, 3]},
        "draft": {"num_layers": 1, "block_size": 4, "markov_rank": 8},
        "train": {
            "output_dir": str(out),
            "max_steps": 2,
            "micro_batch_size": 2,
            "num_anchors": 8,
            "save_every": 2,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "dtype": "float32",
            "min_loss_tokens": 2,
            **train,
        },
        "export": {"output": str(out / "drafter")},
    }
    path = base / f"{out.name}.params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def trained(base, store) -> Path:
    """A finished 2-step run (checkpoint step-00000002) and its params file; tests copy it to change it."""
    from dspark_offline.config import load_params
    from dspark_offline.train.loop import run

    out = base / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("LOCAL_RANK", "0")
    try:
        run(load_params(train_params(base, store, out)))
    finally:
        mp.undo()
    return out


def copy_run(trained: Path, tmp_path: Path, **train) -> tuple[Path, Path]:
    """(run dir, params file) of a copy of the finished run, with `train` params changed."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out, train_params(tmp_path, trained.parent / "features.zarr", out, **train)


@pytest.fixture(scope="module")
def prepared_dump(base, tmp_path_factory) -> Path:
    """Prepared data for the dump cases: 6 samples of random tokens (the tiny target's vocab)."""
    from conftest import _write_prepared_split

    rng = np.random.default_rng(0)
    samples = []
    for n in rng.integers(12, 30, size=6):
        samples.append((rng.integers(0, 400, size=n), (np.arange(n) >= n // 2).astype(np.uint8)))
    return _write_prepared_split(base / "prepared_dump", samples)


def dump_args(target: Path, prepared: Path, store: Path, *extra) -> list:
    sets = [
        f"target.path={target}",
        f"prepare.output={prepared}",
        "dump.top_k=8",
        "dump.num_layer_ids=2",
        "dump.shard_tokens=32",
        "dump.chunk_tokens=16",
        "target.dtype=float32",
    ]
    return ["dump", "--store", store, *[a for s in sets for a in ("-S", s)], *extra]


@pytest.fixture(scope="module")
def eval_inputs(base, tiny_qwen3_dir) -> tuple[Path, Path]:
    """(drafter dir, prepared dir with 2 eval prompts) for the tiny Qwen3 target (H=64, 4 layers)."""
    return make_drafter_dir(tiny_qwen3_dir, base / "drafter"), _prepared(
        base, tiny_qwen3_dir, ["Hi?", "Say hello."]
    )


# =============================================================================================
# params / CLI
# =============================================================================================

PARAM_FILES = {
    "malformed-yaml": ("train:\n  learning_rate: [1,\n", ["invalid YAML", "line"]),
    "duplicate-key": (
        "train:\n  learning_rate: 1.0\n  learning_rate: 2.0\n",
        ["duplicate key 'learning_rate'"],
    ),
    "top-level-list": ("- train\n- dump\n", ["top level must be a mapping"]),
    "unknown-key": (
        "train:\n  learnin_rate: 1.0\n",
        ["train.learnin_rate", "did you mean train.learning_rate"],
    ),
    "unknown-section": ("trian:\n  max_steps: 1\n", ["trian", "did you mean train"]),
    "wrong-type": ("train:\n  max_steps: many\n", ["train.max_steps", "'many'"]),
    "section-not-mapping": ("train: 5\n", ["train"]),
    "cross-field": (
        "dump:\n  num_parts: 2\n  part_index: 2\n",
        ["dump.part_index=2 must be < dump.num_parts=2"],
    ),
}


@pytest.mark.parametrize("kind", list(PARAM_FILES))
def test_bad_params_file(kind, dspark, tmp_path):
    text, words = PARAM_FILES[kind]
    (tmp_path / "p.yaml").write_text(text)
    refused(dspark("params", "-p", tmp_path / "p.yaml", cwd=tmp_path), *words)


def test_params_file_that_is_a_directory(dspark, tmp_path):
    (tmp_path / "pdir").mkdir()
    refused(dspark("params", "-p", tmp_path / "pdir", cwd=tmp_path), "is a directory")


def test_params_file_missing(dspark, tmp_path):
    refused(dspark("params", "-p", tmp_path / "nope.yaml", cwd=tmp_path), "not found", "nope.yaml")


def test_params_file_not_text(dspark, tmp_path):
    (tmp_path / "p.yaml").write_bytes(b"\xff\xfe\x00garbage")
    refused(dspark("params", "-p", tmp_path / "p.yaml", cwd=tmp_path), "p.yaml")


SETS = {
    "malformed-yaml-value": (
        "train.learning_rate=[1,",
        ["--set train.learning_rate", "not a valid YAML value"],
    ),
    "no-equals": ("train.learning_rate", ["expected section.field=value"]),
    "unknown-field": ("train.nope=1", ["train.nope", "unknown parameter"]),
    "wrong-type": ("train.learning_rate=fast", ["train.learning_rate", "'fast'"]),
    "out-of-range": ("train.max_steps=0", ["train.max_steps", "greater than or equal to 1"]),
}


@pytest.mark.parametrize("kind", list(SETS))
def test_bad_set_override(kind, dspark, tmp_path):
    item, words = SETS[kind]
    refused(dspark("params", "-S", item, cwd=tmp_path), *words)


def test_params_typo_under_dvc_repro_is_one_line(tmp_path, monkeypatch, capsys):
    """A DVC stage script (as `dvc repro` runs it) reports an unknown key in params.yaml by name."""
    (tmp_path / "params.yaml").write_text("train:\n  learnin_rate: 0.001\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "stages" / "train.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert (
        "params.yaml" in err
        and "train.learnin_rate: unknown parameter (did you mean train.learning_rate?)" in err
    )


def test_train_max_length_too_short_blames_max_length(dspark, base, store, tmp_path):
    params = train_params(tmp_path, store, tmp_path / "run", max_length=2, val_samples=2)
    refused(dspark("train", "-p", params), "train.max_length=2", "train.min_loss_tokens")


# =============================================================================================
# data files (prepare): refused with one line, or skipped and counted by design
# =============================================================================================


def _conv(rid, turns):
    return {"id": rid, "conversations": [{"role": r, "content": c} for r, c in turns]}


GOOD = [
    _conv(f"g{i}", [("user", f"Question number {i}?"), ("assistant", f"Answer number {i}.")])
    for i in range(8)
]
BAD_RECORDS = {
    "malformed_json": '{"id": "x1", "conversations": [',
    "not_an_object": json.dumps([1, 2, 3]),
    "missing_field": json.dumps({"id": "x3"}),
    "unknown_role": json.dumps(_conv("x4", [("user", "hi"), ("robot", "beep")])),
    "wrong_role_order": json.dumps(_conv("x5", [("assistant", "first"), ("user", "second")])),
    "no_assistant_turn": json.dumps(_conv("x6", [("user", "alone")])),
    "empty_assistant_turn": json.dumps(_conv("x7", [("user", "hi"), ("assistant", "   ")])),
    "duplicate_id": json.dumps(GOOD[0]),
}


def prepare_args(target: Path, source: Path, out: Path) -> list:
    return [
        "prepare",
        "--source",
        source,
        "--output",
        out,
        "--num-samples",
        4,
        "-S",
        f"target.path={target}",
        "-S",
        "prepare.num_eval_samples=1",
        "-S",
        "prepare.max_length=64",
    ]


@pytest.fixture(scope="module")
def prepared_with_skips(base, tiny_llama_dir) -> dict:
    """One prepare run over good records with one bad record of every kind; its report."""
    source = base / "mixed.jsonl"
    lines = [json.dumps(g) for g in GOOD] + list(BAD_RECORDS.values())
    source.write_text("\n".join(lines) + "\n")
    from dspark_offline.config import load_params
    from dspark_offline.prepare import run

    params = load_params(
        None,
        {
            "target.path": str(tiny_llama_dir),
            "prepare.source": str(source),
            "prepare.output": str(base / "mixed_prepared"),
            "prepare.num_samples": 4,
            "prepare.num_eval_samples": 1,
            "prepare.max_length": 64,
        },
    )
    out = run(params)
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("reason", list(BAD_RECORDS))
def test_bad_record_is_skipped_and_counted(reason, prepared_with_skips):
    assert prepared_with_skips["skipped"]["counts"][reason] == 1
    assert prepared_with_skips["kept"] == {"train": 4, "eval": 1}


SOURCES = {
    "missing": (None, ["source file not found"]),
    "empty": ("", ["source file is empty"]),
    "not-json": ("just some text\n", ["not JSON or JSON Lines"]),
    "only-bad-records": ("\n".join(list(BAD_RECORDS.values())[1:]) + "\n", ["no usable conversation"]),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_unusable_source_is_refused(kind, dspark, tiny_llama_dir, tmp_path):
    text, words = SOURCES[kind]
    source = tmp_path / "src.jsonl"
    if text is not None:
        source.write_text(text)
    refused(dspark(*prepare_args(tiny_llama_dir, source, tmp_path / "out"), cwd=tmp_path), *words)
    assert not (tmp_path / "out").exists()


def test_source_that_is_a_directory(dspark, tiny_llama_dir, tmp_path):
    refused(
        dspark(*prepare_args(tiny_llama_dir, tmp_path, tmp_path / "out"), cwd=tmp_path), "not a regular file"
    )


def test_dump_without_prepared_data(dspark, tiny_llama_dir, tmp_path):
    refused(dspark(*dump_args(tiny_llama_dir, tmp_path / "none", tmp_path / "s.zarr"), cwd=tmp_path), "none")


def test_dump_top_k_larger_than_the_vocabulary(dspark, tiny_llama_dir, prepared_dump, tmp_path):
    args = dump_args(tiny_llama_dir, prepared_dump, tmp_path / "s.zarr", "-S", "dump.top_k=1000000")
    refused(dspark(*args, cwd=tmp_path), "dump.top_k=1000000", "vocabulary", "lower dump.top_k")


# =============================================================================================
# outputs / filesystem
# =============================================================================================


def test_dump_onto_a_regular_file(dspark, tiny_llama_dir, prepared_dump, tmp_path):
    (tmp_path / "s.zarr").write_text("not a store")
    line = refused(
        dspark(*dump_args(tiny_llama_dir, prepared_dump, tmp_path / "s.zarr"), cwd=tmp_path),
        "dump.store=",
        "is an existing file",
    )
    assert (tmp_path / "s.zarr").read_text() == "not a store", line


def test_export_onto_a_regular_file(dspark, trained, tmp_path):
    _, params = copy_run(trained, tmp_path)
    (tmp_path / "file").write_text("mine")
    refused(
        dspark("export", "-p", params, "--output", tmp_path / "file"), "export.output=", "is an existing file"
    )


def test_train_output_dir_is_a_regular_file(dspark, store, tmp_path):
    (tmp_path / "run").write_text("mine")
    refused(
        dspark("train", "-p", train_params(tmp_path, store, tmp_path / "run")),
        "train.output_dir=",
        "is an existing file",
    )


def test_evaluate_output_is_a_directory(dspark, tmp_path, monkeypatch):
    (tmp_path / "eval.json").mkdir()
    from dspark_offline.evaluate import runner

    monkeypatch.setattr(runner, "load_target", lambda *a: pytest.fail("loaded the target"))
    refused(
        dspark("evaluate", "-S", f"evaluate.output={tmp_path / 'eval.json'}", cwd=tmp_path),
        "evaluate.output=",
        "is a directory",
    )


def test_export_refuses_a_non_empty_directory_without_overwrite(dspark, trained, tmp_path):
    _, params = copy_run(trained, tmp_path)
    drafter = tmp_path / "mine"
    drafter.mkdir()
    (drafter / "config.json").write_text('{"mine": true}')
    refused(dspark("export", "-p", params, "--output", drafter), "is not empty", "config.json", "--overwrite")
    assert json.loads((drafter / "config.json").read_text()) == {"mine": True}
    ok(dspark("export", "-p", params, "--output", drafter, "--overwrite"))
    assert "architectures" in json.loads((drafter / "config.json").read_text())


def test_fresh_train_refuses_existing_checkpoints_without_overwrite(dspark, trained, tmp_path):
    out, params = copy_run(trained, tmp_path)
    refused(dspark("train", "-p", params), "holds 1 checkpoint", "--resume", "--overwrite")
    assert (out / "checkpoints" / "step-00000002" / "meta.json").is_file()
    ok(dspark("train", "-p", params, "--overwrite", "--max-steps", 1, "-S", "train.save_every=1"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]


READ_ONLY = ["prepare", "generate", "dump", "train", "export", "evaluate"]


@pytest.mark.parametrize("stage", READ_ONLY)
def test_read_only_output_is_refused_before_any_work(
    stage, dspark, tmp_path, monkeypatch, trained, store, tiny_llama_dir, prepared_dump
):
    ro = tmp_path / "ro"
    from dspark_offline.evaluate import runner

    monkeypatch.setattr(runner, "load_target", lambda *a: pytest.fail("evaluate loaded the target"))
    args = {
        "prepare": lambda: prepare_args(tiny_llama_dir, tmp_path / "src.jsonl", ro / "prepared"),
        "generate": lambda: ["generate", "--output", ro / "generated"],
        "dump": lambda: dump_args(tiny_llama_dir, prepared_dump, ro / "s.zarr"),
        "train": lambda: ["train", "-p", train_params(tmp_path, store, ro / "run")],
        "export": lambda: [
            "export",
            "-p",
            train_params(tmp_path, store, trained),
            "--output",
            ro / "drafter",
        ],
        "evaluate": lambda: ["evaluate", "-S", f"evaluate.output={ro / 'eval.json'}"],
    }[stage]()
    with read_only(ro, monkeypatch):
        line = refused(dspark(*args, cwd=tmp_path), "cannot write in", str(ro))
    assert list(ro.iterdir()) == [], line


class _FullDisk:
    """Makes zarr's local-store writes of keys containing `key` fail with ENOSPC."""

    def __init__(self, monkeypatch, key: str):
        import zarr.storage._local as local

        real = local._put

        def put(path, value, exclusive=False):
            if key in str(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, value, exclusive=exclusive)

        monkeypatch.setattr(local, "_put", put)
        self.undo = lambda: monkeypatch.setattr(local, "_put", real)


@pytest.mark.parametrize("where", ["target/lm_head/c", "part-00000/hidden/c"], ids=["head", "shard"])
def test_full_disk_while_dumping_leaves_a_resumable_store(
    where, dspark, tiny_llama_dir, prepared_dump, tmp_path, monkeypatch
):
    path = tmp_path / "s.zarr"
    full = _FullDisk(monkeypatch, where)
    refused(
        dspark(*dump_args(tiny_llama_dir, prepared_dump, path), cwd=tmp_path),
        "writing the store failed",
        "No space left on device",
        "re-run dump to resume",
    )
    with pytest.raises(StoreError):  # never marked complete
        open_store(str(path))
    assert not lock_path(str(path), "part-00000").exists()
    full.undo()
    ok(dspark(*dump_args(tiny_llama_dir, prepared_dump, path), cwd=tmp_path))
    assert len(open_store(str(path))) == 6


def test_full_disk_while_saving_a_checkpoint_leaves_a_resumable_run(dspark, store, tmp_path, monkeypatch):
    """torch.save on a full disk (measured on a 600 KiB tmpfs) raises this RuntimeError from its
    C++ stream writer; the checkpoint is left without meta.json and --resume continues before it."""
    import torch

    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-00000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 49536 vs 49400")
        return real_save(obj, path, *args, **kwargs)

    params = train_params(tmp_path, store, tmp_path / "run", save_every=1)
    monkeypatch.setattr(torch, "save", save)
    refused(
        dspark("train", "-p", params),
        "writing the checkpoint of step 2 failed",
        "unexpected pos",
        "re-run with --resume to continue from step-00000001",
    )
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "run" / "checkpoints" / "step-00000002" / "meta.json").exists()
    r = ok(dspark("train", "-p", params, "--resume"))
    assert (
        "resumed from" in r.err + r.out
        and (tmp_path / "run" / "checkpoints" / "step-00000002" / "meta.json").exists()
    )


# =============================================================================================
# faults: mismatches, resume, partial stores, concurrency
# =============================================================================================


def test_evaluate_drafter_of_another_target_size(dspark, tiny_qwen3_dir, eval_inputs, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    other = tmp_path / "other_target"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    ).save_pretrained(other)
    tok.save_pretrained(other)
    drafter, prepared = eval_inputs  # a drafter for H=64, 4 layers
    refused(
        dspark(
            "evaluate",
            "--drafter",
            drafter,
            "-S",
            f"target.path={other}",
            "-S",
            f"prepare.output={prepared}",
            "-S",
            f"evaluate.output={tmp_path / 'e.json'}",
            cwd=tmp_path,
        ),
        "hidden_size=64 but the target has 32",
    )


def test_evaluate_with_fewer_prompts_than_asked_says_so_prominently(
    dspark, tiny_qwen3_dir, eval_inputs, tmp_path
):
    drafter, prepared = eval_inputs
    r = ok(
        dspark(
            "evaluate",
            "--drafter",
            drafter,
            "--num-prompts",
            50,
            "-S",
            f"target.path={tiny_qwen3_dir}",
            "-S",
            f"prepare.output={prepared}",
            "-S",
            "evaluate.max_new_tokens=4",
            "-S",
            "evaluate.bootstrap_resamples=10",
            "-S",
            f"evaluate.output={tmp_path / 'e.json'}",
            "-S",
            f"evaluate.per_slot_output={tmp_path / 's.tsv'}",
            "-S",
            f"evaluate.per_prompt_output={tmp_path / 'p.tsv'}",
            cwd=tmp_path,
        )
    )
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert next(iter(metrics)) == "warnings" and "evaluate.num_prompts=50" in metrics["warnings"][0]
    assert metrics["prompts_shortfall"] == 48
    assert "over 2 prompts (ONLY 2 OF 50 REQUESTED)" in r.out


def test_resume_after_changing_the_drafter_architecture(dspark, trained, tmp_path):
    _, params = copy_run(trained, tmp_path)
    line = refused(
        dspark(
            "train",
            "-p",
            params,
            "--resume",
            "--max-steps",
            4,
            "-S",
            "draft.num_layers=2",
            "--allow-param-change",
        ),
        "drafter architecture differs",
        "num_layers: 1 -> 2",
    )
    assert "Traceback" not in line


def test_resume_with_changed_learning_rate_needs_the_flag(dspark, trained, tmp_path):
    out, params = copy_run(trained, tmp_path)
    refused(
        dspark("train", "-p", params, "--resume", "--max-steps", 3, "-S", "train.learning_rate=0.01"),
        "train.learning_rate: 0.003 -> 0.01",
        "train.max_steps: 2 -> 3",
        "--allow-param-change",
    )
    r = ok(
        dspark(
            "train",
            "-p",
            params,
            "--resume",
            "--max-steps",
            3,
            "-S",
            "train.learning_rate=0.01",
            "--allow-param-change",
        )
    )
    assert "resuming with changed params" in r.err + r.out
    assert (out / "checkpoints" / "step-00000003" / "meta.json").is_file()


@pytest.mark.parametrize("damage", ["missing", "unfinished"])
def test_partial_store_needs_the_flag(damage, dspark, tmp_path):
    store = make_store(tmp_path / "two.zarr", num_samples=12, num_parts=2)
    part = store / "part-00001"
    if damage == "missing":
        shutil.rmtree(part)
    else:
        meta = json.loads((part / "zarr.json").read_text())
        meta["attributes"]["dspark_offline_part"].update(complete=False, status="writing", shards_done=[])
        (part / "zarr.json").write_text(json.dumps(meta))
    params = train_params(tmp_path, store, tmp_path / "run")
    refused(
        dspark("train", "-p", params),
        "1 of 2 parts missing or unfinished",
        "part-00001",
        "--allow-partial-store",
        "6 of the 12 samples",
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = ok(dspark("train", "-p", params, "--allow-partial-store"))
    assert "training on 1 of 2 parts" in r.err + r.out


def test_train_on_a_missing_store(dspark, tmp_path):
    refused(
        dspark("train", "-p", train_params(tmp_path, tmp_path / "nowhere.zarr", tmp_path / "run")),
        "no feature store there",
    )


def test_export_without_a_checkpoint(dspark, store, tmp_path):
    refused(
        dspark("export", "-p", train_params(tmp_path, store, tmp_path / "empty")), "no complete checkpoint"
    )


def test_evaluate_without_a_drafter(dspark, tiny_qwen3_dir, tmp_path):
    refused(
        dspark(
            "evaluate",
            "--drafter",
            tmp_path / "none",
            "-S",
            f"target.path={tiny_qwen3_dir}",
            "-S",
            f"evaluate.output={tmp_path / 'e.json'}",
            cwd=tmp_path,
        ),
        "no config.json",
    )


_HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_concurrent_dump_of_one_part_stops_and_a_killed_holder_does_not_block(
    dspark, tiny_llama_dir, prepared_dump, tmp_path
):
    path = tmp_path / "s.zarr"
    lock = lock_path(str(path), "part-00000")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(
            dspark(*dump_args(tiny_llama_dir, prepared_dump, path), cwd=tmp_path),
            "part-00000 is being written by another dump",
            f"pid {holder.pid}",
        )
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the file stays, stale
        holder.wait()
    assert lock.exists()
    ok(dspark(*dump_args(tiny_llama_dir, prepared_dump, path), cwd=tmp_path))
    assert len(open_store(str(path))) == 6 and not lock.exists()
