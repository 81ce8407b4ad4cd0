"""Integrity that cannot be skipped: every kind of store damage, a stale target and an edited
manifest end in a one-line refusal (exit 2 for train/export/evaluate/dump, exit 1 and a
PROBLEM line per damaged object for `verify`), never in training on fill values.

Each case damages a fresh copy of a small store the way a disk, a sync tool or a hand edit
does, then runs the CLI in-process through `cli.main()` (the console entry point) and checks
the exit code, the message and that no traceback was printed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import yaml
from conftest import _write_prepared_split
from synthetic_store import TARGET_NAME, make_store

from dspark_offline import cli
from dspark_offline.config import Params
from dspark_offline.store import MissingChunkError, StoreIntegrityError, open_store
from dspark_offline.store.manifest import fingerprint_fields, params_fingerprint
from dspark_offline.train.checkpoint import latest_checkpoint


@pytest.fixture(autouse=True)
def _scoped_local_rank(monkeypatch):
    """dist.setup() sets LOCAL_RANK for DeepSpeed; keep it from leaking into other tests."""
    monkeypatch.setenv("LOCAL_RANK", "0")


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """`dspark-offline *argv` through the console entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["dspark-offline", *map(str, argv)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- a small synthetic store (the real format, a made-up target) -------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("pristine") / "features.zarr", num_samples=12)


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the synthetic store, to be damaged."""
    return Path(shutil.copytree(pristine, tmp_path / "features.zarr"))


# Two optimizer steps of a tiny drafter, saved at the end: enough to exercise every check.
TINY_TRAIN = {
    "max_steps": 2,
    "micro_batch_size": 2,
    "num_anchors": 8,
    "save_every": 2,
    "dtype": "float32",
    "warmup_ratio": 0.0,
}


def train_params(store: Path, out: Path, **over) -> Path:
    p = {
        "target": {"path": TARGET_NAME},
        "dump": {"store": str(store), "layer_ids": [1, 3]},
        "draft": {"num_layers": 1, "block_size": 4, "markov_rank": 8},
        "train": {"output_dir": str(out), **TINY_TRAIN},
    }
    for key, value in over.items():
        section, field = key.split(".")
        p[section][field] = value
    path = out.parent / f"{out.name}.params.yaml"
    path.write_text(yaml.safe_dump(Params.model_validate(p).model_dump(mode="json")))
    return path


def shard_file(store: Path, array: str, index: int) -> Path:
    trailing = {"hidden": ["0", "0"], "final_hidden": ["0"], "topk_ids": ["0"], "topk_probs": ["0"]}[array]
    return Path(store, "part-00000", array, "c", str(index), *trailing)


def manifest_of(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["dspark_offline"]


def write_manifest(store: Path, manifest: dict, *, sign: bool) -> None:
    from dspark_offline.store.manifest import Manifest

    if sign:  # what a thorough hand edit does: recompute the fingerprint, in the parts' attrs too
        m = Manifest.model_validate(manifest)
        manifest = dict(manifest, params_fingerprint=params_fingerprint(fingerprint_fields(m)))
        for part in store.glob("part-*"):
            doc = json.loads((part / "zarr.json").read_text())
            doc["attributes"]["dspark_offline_part"]["params_fingerprint"] = manifest["params_fingerprint"]
            (part / "zarr.json").write_text(json.dumps(doc))
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["dspark_offline"] = manifest
    (store / "zarr.json").write_text(json.dumps(doc))


def assert_train_refuses(monkeypatch, capsys, store, tmp_path, *expected, **over) -> str:
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "-p", train_params(store, tmp_path / "run", **over)
    )
    line = one_error_line(err)
    assert code == 2, out + err
    assert str(store) in line, line
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "run" / "metrics" / "train.tsv").exists()  # refused before step 0
    return line


def assert_verify_names(monkeypatch, capsys, store, *expected, quick=False) -> list[str]:
    code, out, err = run_cli(monkeypatch, capsys, "verify", *(["--quick"] if quick else []), store)
    problems = [ln for ln in err.splitlines() if ln.startswith("PROBLEM:")]
    assert code == 1 and problems, out + err
    for text in expected:
        assert any(text in p for p in problems), problems
    return problems


# -- missing objects: a fill value is never read -----------------------------------------------


@pytest.mark.parametrize(
    "array, key",
    [
        ("hidden", "part-00000/hidden/c/1/0/0"),
        ("final_hidden", "part-00000/final_hidden/c/1/0"),
        ("topk_ids", "part-00000/topk_ids/c/0/0"),
        ("topk_probs", "part-00000/topk_probs/c/2/0"),
        ("input_ids", "part-00000/input_ids/c/1"),
        ("loss_mask", "part-00000/loss_mask/c/0"),
    ],
)
def test_deleted_shard_of_each_token_array(monkeypatch, capsys, store, tmp_path, array, key):
    (store / key).unlink()
    assert_verify_names(
        monkeypatch, capsys, store, f"part-00000/{array} shard", f"({key}): missing", quick=True
    )
    assert_verify_names(monkeypatch, capsys, store, f"({key}): missing")
    assert_train_refuses(monkeypatch, capsys, store, tmp_path, f"({key}): missing")


@pytest.mark.parametrize(
    "name, key",
    [
        ("lm_head", "target/lm_head/c/0/0"),
        ("embed_tokens", "target/embed_tokens/c/0/0"),
        ("final_norm", "target/final_norm/c/0"),
    ],
)
def test_deleted_chunk_of_the_target_head(monkeypatch, capsys, store, tmp_path, name, key):
    """Old code: verify said OK and training used zero rows of the head."""
    (store / key).unlink()
    assert_verify_names(monkeypatch, capsys, store, f"target/{name} chunk 0 ({key}): missing")
    assert_train_refuses(monkeypatch, capsys, store, tmp_path, f"target/{name} chunk 0 ({key}): missing")


@pytest.mark.parametrize("name", ["sample_start", "sample_id", "sample_length"])
def test_deleted_chunk_of_the_sample_index(monkeypatch, capsys, store, tmp_path, name):
    """Old code: verify said OK and every sample read sample 0's tokens (sample_start = 0)."""
    key = f"part-00000/{name}/c/0"
    (store / key).unlink()
    assert_verify_names(monkeypatch, capsys, store, f"part-00000/{name} chunk 0 ({key}): missing", quick=True)
    assert_train_refuses(monkeypatch, capsys, store, tmp_path, f"({key}): missing")


def test_missing_object_is_an_error_on_read_even_after_open(store):
    """The strict store: an object deleted after the store was opened (or on a path that skips the
    open-time check) raises MissingChunkError naming it instead of reading zeros."""
    s = open_store(str(store))
    shutil.rmtree(store / "part-00000" / "hidden" / "c")
    (store / "target" / "lm_head" / "c" / "0" / "0").unlink()
    with pytest.raises(MissingChunkError, match=r"part-00000/hidden/c/\d+/0/0 is missing"):
        for i in range(len(s)):
            s.sample(i)
    with pytest.raises(MissingChunkError, match="target/lm_head/c/0/0 is missing"):
        s.target_weights()


# -- damaged objects and metadata ---------------------------------------------------------------


def test_truncated_shard(monkeypatch, capsys, store, tmp_path):
    f = shard_file(store, "hidden", 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_verify_names(monkeypatch, capsys, store, "part-00000/hidden shard 1", "crc32c", quick=True)
    assert_train_refuses(monkeypatch, capsys, store, tmp_path, "part-00000/hidden shard 1", "crc32c")


def test_inner_chunk_marked_absent_in_a_valid_shard_index(monkeypatch, capsys, store, tmp_path):
    """A shard index (crc32c intact) that marks an inner chunk absent would read it as zeros."""
    f = shard_file(store, "topk_probs", 0)
    data = bytearray(f.read_bytes())
    n = 4  # shard_tokens 64 / chunk_tokens 16
    index = np.frombuffer(bytes(data[-(16 * n + 4) : -4]), "<u8").copy().reshape(n, 2)
    index[1] = 2**64 - 1
    body = index.tobytes()
    data[-(16 * n + 4) :] = body + np.uint32(google_crc32c.value(body)).tobytes()
    f.write_bytes(bytes(data))
    assert_verify_names(
        monkeypatch,
        capsys,
        store,
        "part-00000/topk_probs shard 0",
        "inner chunks absent from the shard index (chunk(s) [1])",
        quick=True,
    )
    assert_train_refuses(monkeypatch, capsys, store, tmp_path, "inner chunks absent from the shard index")


def test_flipped_byte_inside_a_chunk(monkeypatch, capsys, store):
    """Decoding is needed to see it: `verify` (full) names it, the quick check does not; a read
    of that sample fails with the store and the arrays named."""
    f = shard_file(store, "hidden", 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x5A
    f.write_bytes(bytes(data))
    code, _, _ = run_cli(monkeypatch, capsys, "verify", "--quick", store)
    assert code == 0
    assert_verify_names(monkeypatch, capsys, store, "part-00000/hidden shard 1", "corrupt")
    s = open_store(str(store))
    with pytest.raises(StoreIntegrityError, match=r"part-00000/\{.*hidden.*\} of sample \d+ .*unreadable"):
        for i in range(len(s)):
            s.sample(i)


def test_garbled_root_metadata(monkeypatch, capsys, store, tmp_path):
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    assert_train_refuses(monkeypatch, capsys, store, tmp_path, "zarr.json: root metadata unreadable")
    assert_verify_names(monkeypatch, capsys, store, "root metadata unreadable")
    code, _, err = run_cli(monkeypatch, capsys, "inspect", store)
    assert code == 2 and "root metadata unreadable" in one_error_line(err)


def test_garbled_array_metadata(monkeypatch, capsys, store, tmp_path):
    (store / "part-00000" / "hidden" / "zarr.json").write_text("not json")
    assert_verify_names(
        monkeypatch, capsys, store, "part-00000/hidden/zarr.json: metadata unreadable", quick=True
    )
    assert_train_refuses(
        monkeypatch, capsys, store, tmp_path, "part-00000/hidden/zarr.json: metadata unreadable"
    )


def test_deleted_array(monkeypatch, capsys, store, tmp_path):
    shutil.rmtree(store / "part-00000" / "topk_probs")
    assert_verify_names(monkeypatch, capsys, store, "part-00000/topk_probs: array missing", quick=True)
    assert_train_refuses(monkeypatch, capsys, store, tmp_path, "part-00000/topk_probs: array missing")


def test_part_from_another_dump(monkeypatch, capsys, store, tmp_path):
    doc = json.loads((store / "part-00000" / "zarr.json").read_text())
    doc["attributes"]["dspark_offline_part"]["params_fingerprint"] = "0123456789abcdef"
    (store / "part-00000" / "zarr.json").write_text(json.dumps(doc))
    assert_train_refuses(
        monkeypatch, capsys, store, tmp_path, "part-00000: written with params_fingerprint=0123456789abcdef"
    )


def test_inspect_shows_the_damage_and_exits_2(monkeypatch, capsys, store):
    code, out, err = run_cli(monkeypatch, capsys, "inspect", store)
    assert code == 0 and "integrity  quick check OK" in out and not err  # healthy
    (store / "part-00000" / "sample_start" / "c" / "0").unlink()
    (store / "part-00000" / "topk_ids" / "c" / "1" / "0").unlink()
    code, out, err = run_cli(monkeypatch, capsys, "inspect", store)
    assert "integrity  DAMAGED: part-00000/sample_start chunk 0" in out  # the summary still comes first
    line = one_error_line(err)
    assert code == 2, out + err
    assert line.startswith(f"error: StoreIntegrityError: {store}: damaged feature store: "), line
    assert "part-00000/sample_start chunk 0" in line and "(and 1 more)" in line, line
    assert f"dspark-offline verify {store}" in line, line


def test_inspect_of_an_unfinished_store_exits_0(monkeypatch, capsys, synthetic_store):
    """A store still being dumped is incomplete, not damaged: inspect shows how far it got."""
    from conftest import synthetic_manifest

    synth = synthetic_store([5, 30, 17, 9, 22] * 4, synthetic_manifest(num_parts=2))
    synth.write(parts=[0])
    synth.write(parts=[1], max_shards=1)
    code, out, err = run_cli(monkeypatch, capsys, "inspect", synth.path)
    assert code == 0 and not err, out + err
    assert "INCOMPLETE" in out and "quick check OK" in out


# -- an edited manifest -------------------------------------------------------------------------


def test_edited_layer_ids_without_fingerprint(monkeypatch, capsys, store, tmp_path):
    """The edit the issue measured: layer_ids changed in zarr.json, params changed to match."""
    write_manifest(store, dict(manifest_of(store), layer_ids=[2, 3]), sign=False)
    assert_train_refuses(
        monkeypatch, capsys, store, tmp_path, "edited after the dump", **{"dump.layer_ids": [2, 3]}
    )


def test_edited_layer_count_with_recomputed_fingerprint(monkeypatch, capsys, store, tmp_path):
    """Even with the fingerprint recomputed, the stored arrays say how many layers they hold."""
    write_manifest(store, dict(manifest_of(store), layer_ids=[1, 3, 5]), sign=True)
    line = assert_train_refuses(
        monkeypatch, capsys, store, tmp_path, "part-00000/hidden: shape [", **{"dump.layer_ids": [1, 3, 5]}
    )
    assert ", 2, 32] but the manifest needs [" in line and ", 3, 32]" in line


# -- old stores stay readable -------------------------------------------------------------------


def test_store_of_an_older_writer_is_readable(synthetic_store, tmp_path):
    """Older writers did not write all-zero chunks: a gap-only inner chunk of a feature shard and,
    in a part of one sample, the [0] chunk of sample_start / sample_id. Still readable; a missing
    chunk that held data is still refused."""
    from conftest import synthetic_manifest

    synth = synthetic_store([5], synthetic_manifest(num_parts=1, shard_tokens=32, chunk_tokens=8))
    synth.write()
    path = Path(synth.path)
    doc = json.loads((path / "part-00000" / "zarr.json").read_text())
    del doc["attributes"]["dspark_offline_part"]["write_empty_chunks"]  # the mark of the new writer
    (path / "part-00000" / "zarr.json").write_text(json.dumps(doc))
    for name in ("sample_start", "sample_id"):
        (path / "part-00000" / name / "c" / "0").unlink()
    s = open_store(str(path))
    assert s.sample_ids.tolist() == [0] and s._starts.tolist() == [0] and len(s.sample(0).input_ids) == 5
    (path / "part-00000" / "sample_length" / "c" / "0").unlink()
    with pytest.raises(StoreIntegrityError, match=r"part-00000/sample_length chunk 0 .*: missing"):
        open_store(str(path))


# -- dump resume: a damaged store is repaired, not declared done --------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_llama_dir):
    """prepare (synthetic tokens) -> dump -> train 2 steps -> export, on a private copy of the tiny
    Llama target (the stale-target case rewrites its weights)."""
    from dspark_offline import dump
    from dspark_offline.train.export import run as export_run
    from dspark_offline.train.loop import run as train_run

    root = tmp_path_factory.mktemp("pipeline")
    target = Path(shutil.copytree(tiny_llama_dir, root / "target"))
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(10):
        n = int(rng.integers(12, 40))
        samples.append((rng.integers(0, 400, size=n), (np.arange(n) >= n // 2).astype(np.uint8)))
    prepared = _write_prepared_split(root / "prepared", samples)
    params = Params.model_validate(
        {
            "target": {"path": str(target), "dtype": "float32", "device": "cpu"},
            "prepare": {"output": str(prepared)},
            "dump": {
                "store": str(root / "features.zarr"),
                "layer_ids": [0, 2, 3],
                "top_k": 8,
                "shard_tokens": 64,
                "chunk_tokens": 16,
                "batch_tokens": 256,
            },
            "draft": {"num_layers": 1, "block_size": 4, "markov_rank": 8, "mask_token": "<empty_output>"},
            "train": {"output_dir": str(root / "run"), **TINY_TRAIN, "val_samples": 0},
            "export": {"output": str(root / "run" / "drafter")},
            "evaluate": {
                "num_prompts": 1,
                "max_new_tokens": 4,
                "output": str(root / "eval" / "eval.json"),
                "per_slot_output": str(root / "eval" / "slot.tsv"),
                "per_prompt_output": str(root / "eval" / "prompt.tsv"),
            },
        }
    )
    dump.run(params)
    train_run(params)
    export_run(params)
    return {
        "root": root,
        "target": target,
        "params": params,
        "store": root / "features.zarr",
        "drafter": root / "run" / "drafter",
    }


def write_params(params: Params, path: Path, **over) -> Path:
    doc = params.model_dump(mode="json")
    for key, value in over.items():
        section, field = key.split(".")
        doc[section][field] = value
    path.write_text(yaml.safe_dump(doc))
    return path


def test_dump_rerun_rewrites_a_deleted_shard_and_head_chunk(monkeypatch, capsys, caplog, pipeline, tmp_path):
    """Old code: 'nothing to do', and the store kept its hole."""
    store = Path(shutil.copytree(pipeline["store"], tmp_path / "features.zarr"))
    before = open_store(str(store))
    want = [before.sample(i) for i in range(len(before))]
    (store / "part-00000" / "hidden" / "c" / "1" / "0" / "0").unlink()
    (store / "target" / "lm_head" / "c" / "0" / "0").unlink()
    params = write_params(pipeline["params"], tmp_path / "p.yaml", **{"dump.store": str(store)})
    code, out, err = run_cli(monkeypatch, capsys, "dump", "-p", params)
    assert code == 0, out + err
    assert "nothing to do" not in out and "1 to go" in out, out
    assert "recomputing shard(s) [1]" in caplog.text and "target head damaged" in caplog.text, caplog.text
    code, out, _ = run_cli(monkeypatch, capsys, "verify", store)
    assert code == 0 and "OK" in out
    after = open_store(str(store))
    for i, s in enumerate(want):
        assert torch.equal(after.sample(i).hidden, s.hidden) and torch.equal(
            after.sample(i).topk_ids, s.topk_ids
        )
    assert torch.equal(after.target_weights()["lm_head"], before.target_weights()["lm_head"])


# -- a stale target: weights changed at the same path after the dump -----------------------------


@pytest.fixture
def changed_weights(pipeline):
    """Every weight of the target scaled by 1.01 in place (a fine-tune at the same path)."""
    from safetensors.torch import load_file, save_file

    f = pipeline["target"] / "model.safetensors"
    original = f.read_bytes()
    sd = load_file(f)
    save_file({k: v * 1.01 for k, v in sd.items()}, f, metadata={"format": "pt"})
    yield
    f.write_bytes(original)


def test_stale_target_is_refused_by_train_export_and_evaluate(
    monkeypatch, capsys, pipeline, changed_weights, tmp_path
):
    p = pipeline["params"]
    run = tmp_path / "run"
    params = write_params(
        p, tmp_path / "p.yaml", **{"train.output_dir": str(run), "export.output": str(tmp_path / "d")}
    )
    for argv in (
        ["train"],
        ["export", "--checkpoint", str(latest_checkpoint(pipeline["root"] / "run"))],
        ["evaluate", "--drafter", str(pipeline["drafter"])],
    ):
        code, out, err = run_cli(monkeypatch, capsys, *argv, "-p", params)
        line = one_error_line(err)
        assert code == 2, out + err
        assert "StaleTargetError" in line and f"target {pipeline['target']}: weights changed since" in line, (
            line
        )
        assert "dump.overwrite=true" in line and "target.allow_changed_weights=true" in line, line
    assert not (run / "metrics" / "train.tsv").exists() and not (tmp_path / "d").exists()
    # the explicit override
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "export",
        "--checkpoint",
        str(latest_checkpoint(pipeline["root"] / "run")),
        "-p",
        params,
        "-S",
        "target.allow_changed_weights=true",
    )
    assert code == 0, out + err


def test_unchanged_target_passes_the_checks(monkeypatch, capsys, pipeline, tmp_path):
    params = write_params(pipeline["params"], tmp_path / "p.yaml")
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "-p", params)
    assert code == 0, out + err
    assert "target weights unchanged since the dump" in out and "layer spot check of" in out, out
    provenance = json.loads((pipeline["drafter"] / "dspark_offline_export.json").read_text())
    assert (
        provenance["target_weights_hash"] == open_store(str(pipeline["store"])).manifest.target.weights_hash
    )


def test_relabelled_layers_are_caught_by_the_spot_check(monkeypatch, capsys, pipeline, tmp_path):
    """layer_ids edited and the fingerprint recomputed: nothing but the target can tell. Evaluate
    recomputes the layers for a few stored tokens and names the mislabelled one."""
    store = Path(shutil.copytree(pipeline["store"], tmp_path / "features.zarr"))
    write_manifest(store, dict(manifest_of(store), layer_ids=[1, 2, 3]), sign=True)  # hidden[:, 0] is layer 0
    drafter = Path(shutil.copytree(pipeline["drafter"], tmp_path / "drafter"))
    prov = json.loads((drafter / "dspark_offline_export.json").read_text())
    prov.update(store=str(store), store_fingerprint=manifest_of(store)["params_fingerprint"])
    (drafter / "dspark_offline_export.json").write_text(json.dumps(prov))
    params = write_params(pipeline["params"], tmp_path / "p.yaml")
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--drafter", drafter, "-p", params)
    line = one_error_line(err)
    assert code == 2, out + err
    assert "LayerMismatchError" in line and "stored hidden[:, 0] is not target layer 1" in line, line
    assert "matches target layer 0" in line, line


def test_dump_onto_a_garbled_store_and_a_hand_edited_manifest(
    monkeypatch, capsys, caplog, pipeline, tmp_path
):
    """A garbled root zarr.json: dump refuses without overwrite (old code: a zarr traceback). An
    edited manifest that still matches the dump's fingerprint is written back by a re-run dump."""
    store = Path(shutil.copytree(pipeline["store"], tmp_path / "features.zarr"))
    params = write_params(pipeline["params"], tmp_path / "p.yaml", **{"dump.store": str(store)})
    good = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text("{garbled")
    code, out, err = run_cli(monkeypatch, capsys, "dump", "-p", params)
    line = one_error_line(err)
    assert code == 2 and "zarr.json: root metadata unreadable" in line and "dump.overwrite=true" in line, line
    (store / "zarr.json").write_text(good)
    write_manifest(store, dict(manifest_of(store), layer_ids=[1, 2, 3]), sign=False)
    code, out, err = run_cli(monkeypatch, capsys, "dump", "-p", params)
    assert code == 0 and "nothing to do" in out, out + err
    assert "edited after the dump" in caplog.text and manifest_of(store)["layer_ids"] == [0, 2, 3]
    assert run_cli(monkeypatch, capsys, "verify", store)[0] == 0


def test_benchmark_script_runs(pristine, capsys):
    from benchmark_script import load_benchmark

    load_benchmark("integrity_check").main(["--store", str(pristine), "--target", "none", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| verify --quick (train's check before step 0) |" in out and "| open_store" in out
