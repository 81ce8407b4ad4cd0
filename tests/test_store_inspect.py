"""inspect summarises a store; verify reads every shard back and names what is wrong."""

import os
from pathlib import Path

from conftest import synthetic_manifest

from dspark_offline.store.inspect import format_inspect, inspect, verify

LENGTHS = [5, 30, 17, 9, 22, 3, 12, 28, 7, 14] * 2


def test_inspect_counts_and_pretty_print(synthetic_store):
    synth = synthetic_store(LENGTHS, synthetic_manifest(num_parts=2))
    synth.write()
    info = inspect(synth.path)
    assert info["total"]["num_samples"] == len(LENGTHS)
    assert info["total"]["num_tokens"] == sum(LENGTHS)
    assert info["total"]["complete"]
    for part in info["parts"]:
        assert part["complete"] and part["bytes"] > 0 and part["bytes_per_token"] > 0
    text = format_inspect(info)
    assert "part-00001" in text and "complete" in text and "[1, 2]" in text
    assert "backend    hf (not recorded" in text  # a store from before the backend was recorded


def test_inspect_shows_the_backend(synthetic_store):
    from dspark_offline.store.manifest import BackendInfo

    b = BackendInfo(name="vllm", device="cpu", versions={"vllm": "0.32.0", "torch": "2.13.0+cpu"})
    synth = synthetic_store(LENGTHS, synthetic_manifest(backend=b))
    synth.write()
    text = format_inspect(inspect(synth.path))
    assert "backend    vllm on cpu  (vllm 0.32.0, torch 2.13.0+cpu)" in text


def test_verify_clean_store(synthetic_store):
    synth = synthetic_store(LENGTHS)
    synth.write()
    assert verify(synth.path) == []


def _shard_file(path: str, array: str, shard: int) -> Path:
    ndim = {"hidden": 3, "final_hidden": 2, "topk_probs": 2}[array]
    return Path(path, "part-00000", array, "c", str(shard), *["0"] * (ndim - 1))


def test_verify_detects_a_corrupted_shard(synthetic_store):
    synth = synthetic_store(LENGTHS)
    synth.write()
    f = _shard_file(synth.path, "hidden", 1)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x5A  # inside chunk data, not the index
    f.write_bytes(bytes(data))
    problems = verify(synth.path)
    assert len(problems) == 1
    assert "part-00000/hidden shard 1" in problems[0] and "corrupt" in problems[0]


def test_verify_detects_a_corrupted_shard_index(synthetic_store):
    synth = synthetic_store(LENGTHS)
    synth.write()
    f = _shard_file(synth.path, "topk_probs", 0)
    data = bytearray(f.read_bytes())
    data[-6] ^= 0xFF  # the shard index (with its crc32c) sits at the end
    f.write_bytes(bytes(data))
    problems = verify(synth.path)
    assert any("part-00000/topk_probs shard 0" in p and "corrupt" in p for p in problems), problems


def test_verify_detects_a_missing_shard_and_incomplete_part(synthetic_store):
    synth = synthetic_store(LENGTHS, synthetic_manifest(num_parts=2))
    synth.write(parts=[0])
    os.remove(_shard_file(synth.path, "final_hidden", 0))
    synth.write(parts=[1], max_shards=1)
    problems = verify(synth.path)
    assert any(p.startswith("part-00000/final_hidden shard 0") and "missing" in p for p in problems), problems
    assert any(p.startswith("part-00001: incomplete (1/") for p in problems), problems


def test_verify_reports_missing_part_and_bad_store(synthetic_store, tmp_path):
    synth = synthetic_store(LENGTHS, synthetic_manifest(num_parts=2))
    synth.write(parts=[0])
    assert "part-00001: missing" in verify(synth.path)
    problems = verify(str(tmp_path / "nothing.zarr"))
    assert len(problems) == 1 and "no feature store" in problems[0]
