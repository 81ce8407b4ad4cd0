"""Acceptance: a SIGKILLed dump resumes to the exact arrays of an uninterrupted one, and two
worker processes writing two parts concurrently give the same features as one worker."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_dump import by_sample_id, make_params

from dspark_offline import dump
from dspark_offline.store import open_store, tensorstore_engine
from dspark_offline.store.inspect import verify

# A worker process: runs dump.run(params); SLOW_FORWARD_S slows each target forward so that a
# kill can land in the middle of the dump (the tiny target is otherwise done in a blink).
WORKER = """
import os, sys, time
from dspark_offline.target import hf_backend
delay = float(os.environ.get("SLOW_FORWARD_S", "0"))
if delay:
    forward = hf_backend.HFTarget.forward
    def slow(self, *a, **k):
        time.sleep(delay)
        return forward(self, *a, **k)
    hf_backend.HFTarget.forward = slow
from dspark_offline import dump
from dspark_offline.config import Params
dump.run(Params.model_validate_json(sys.argv[1]))
"""


def _spawn(params, delay=0.0):
    env = dict(os.environ, OMP_NUM_THREADS="1", SLOW_FORWARD_S=str(delay))
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, params.model_dump_json()],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}


def _shards_done(path, part="part-00000") -> list[int]:
    try:
        return zarr.open_group(path, mode="r")[part].attrs["dspark_offline_part"]["shards_done"]
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return []


def _descendants(pid: int) -> set[int]:
    """Processes below `pid` (its writer processes and their fork server), from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "writer_engine,writer_workers",
    [
        ("zarr", 1),
        ("zarr", 2),
        pytest.param(
            "tensorstore",
            2,
            marks=pytest.mark.skipif(not tensorstore_engine.available(), reason="the `tensorstore` extra"),
        ),
    ],
)
def test_sigkill_then_resume_equals_uninterrupted(
    tiny_llama_dir, make_prepared, tmp_path, writer_engine, writer_workers
):
    prepared = make_prepared(40, seed=3)
    full = make_params(
        tiny_llama_dir,
        prepared,
        tmp_path / "full.zarr",
        shard_tokens=48,
        batch_tokens=96,
        writer_workers=writer_workers,
        writer_engine=writer_engine,
    )
    dump.run(full)
    num_shards = zarr.open_group(str(tmp_path / "full.zarr"))["part-00000"].attrs["dspark_offline_part"][
        "num_shards"
    ]
    assert num_shards >= 8

    killed_path = str(tmp_path / "killed.zarr")
    killed = full.model_copy(update={"dump": full.dump.model_copy(update={"store": killed_path})})
    kill_after = random.Random().randint(1, num_shards - 3)
    proc = _spawn(killed, delay=0.3)
    deadline = time.time() + 240
    while len(_shards_done(killed_path)) < kill_after:
        assert proc.poll() is None, f"worker exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "worker made no progress"
        time.sleep(0.02)
    writers = _descendants(proc.pid)
    if writer_engine == "zarr":
        assert len(writers) >= (2 if writer_workers > 1 else 0)
    else:  # tensorstore's pools are threads of the dump
        assert writers == set()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # no writer outlives the dump (it would race the resumed one)
    while _alive(writers) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(writers), {w: Path(f"/proc/{w}/cmdline").read_bytes()[:200] for w in _alive(writers)}
    done = _shards_done(killed_path)
    assert kill_after <= len(done) < num_shards, "the kill did not interrupt the dump"
    assert verify(killed_path), "an interrupted part must be reported"

    dump.run(killed)  # resume
    a, b = zarr.open_group(str(tmp_path / "full.zarr"), mode="r"), zarr.open_group(killed_path, mode="r")
    names = [n for n, _ in a["part-00000"].arrays()]
    assert {"hidden", "final_hidden", "topk_ids", "topk_probs", "input_ids"} <= set(names)
    for name in names:
        assert np.array_equal(a[f"part-00000/{name}"][...], b[f"part-00000/{name}"][...]), name
    for name in ("embed_tokens", "lm_head", "final_norm"):
        assert np.array_equal(a[f"target/{name}"][...], b[f"target/{name}"][...]), name
    assert verify(killed_path) == []


@pytest.mark.slow
def test_two_worker_processes_equal_one_worker(tiny_llama_dir, make_prepared, tmp_path):
    prepared = make_prepared(16, seed=5)
    # one sample per forward: features of a sample do not depend on its batch mates
    one = make_params(tiny_llama_dir, prepared, tmp_path / "one.zarr", batch_tokens=1)
    dump.run(one)
    two_path = tmp_path / "two.zarr"
    procs = [
        _spawn(make_params(tiny_llama_dir, prepared, two_path, batch_tokens=1, num_parts=2, part_index=p))
        for p in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-3000:]
    two = open_store(str(two_path))
    assert two.parts == ["part-00000", "part-00001"] and two.manifest.num_parts == 2
    ref, got = by_sample_id(open_store(str(tmp_path / "one.zarr"))), by_sample_id(two)
    assert ref.keys() == got.keys()
    for sid, r in ref.items():
        g = got[sid]
        for name in ("input_ids", "loss_mask", "hidden", "final_hidden", "topk_ids", "topk_probs"):
            assert torch.equal(getattr(g, name), getattr(r, name)), (sid, name)
    assert verify(str(two_path)) == []
