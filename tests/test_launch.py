"""Dump under launchers (dspark_offline/launch.py): each rank takes its parts and its local GPU
from torchrun / deepspeed / srun variables; `torchrun --nproc_per_node=2 ... dump` writes the
same store as a 2-part dump made by hand."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from test_dump import make_params

from dspark_offline import dump
from dspark_offline.launch import (
    Launch,
    LaunchError,
    assign_parts,
    from_env,
    local_device,
    vllm_visible_devices,
)
from dspark_offline.store.inspect import verify
from dspark_offline.store.record import read_record

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
SRUN = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}


def test_launch_from_env():
    assert from_env({}) is None
    assert from_env(TORCHRUN) == Launch(1, 4, 1, "torchrun/deepspeed")
    assert from_env(SRUN) == Launch(5, 8, 1, "srun")
    # torchrun started by srun (one per node): torchrun's variables describe the real processes
    assert from_env({**SRUN, **TORCHRUN}).launcher == "torchrun/deepspeed"
    # an sbatch script itself sees SLURM_PROCID=0 and the job's SLURM_NTASKS: not a launched rank
    assert from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}) is None
    with pytest.raises(LaunchError, match="RANK='x' is not an integer"):
        from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="RANK=2, WORLD_SIZE=2"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_assign_parts():
    rank1of4 = Launch(1, 4, 1, "torchrun/deepspeed")
    assert assign_parts(None, None, None) == (1, [0])
    assert assign_parts(3, None, None) == (3, [0, 1, 2])
    assert assign_parts(None, None, rank1of4) == (4, [1])  # default: one part per rank
    assert assign_parts(12, None, rank1of4) == (12, [1, 5, 9])
    assert assign_parts(12, 7, rank1of4) == (12, [7])  # an explicit part index beats the launcher
    with pytest.raises(LaunchError, match=r"dump.num_parts=6 is not a multiple of the 4 processes"):
        assign_parts(6, None, rank1of4)
    with pytest.raises(LaunchError, match=r"part_index=1 must be < dump.num_parts=1"):
        assign_parts(None, 1, None)


def test_local_gpu():
    rank = Launch(3, 8, 3, "srun")
    assert local_device("cuda", rank, 4) == "cuda:3"
    assert local_device("auto", rank, 4) == "cuda:3"
    assert local_device("auto", rank, 0) == "auto"  # no GPU: the CPU
    assert local_device("cuda", rank, 1) == "cuda:0"  # the launcher bound one GPU per process
    assert local_device("cuda:2", rank, 4) == "cuda:2" and local_device("cpu", rank, 4) == "cpu"
    assert local_device("cuda", None, 4) == "cuda"
    with pytest.raises(LaunchError, match="local rank 3 but only 2 GPUs"):
        local_device("cuda", rank, 2)
    assert vllm_visible_devices(rank, None, 4) == "3"
    assert vllm_visible_devices(rank, "4,5,6,7", 4) == "7"
    assert vllm_visible_devices(rank, "6", 1) is None and vllm_visible_devices(None, None, 4) is None


def test_rank_writes_its_parts_from_the_environment(tiny_llama_dir, make_prepared, tmp_path, monkeypatch):
    prepared = make_prepared(8, seed=4)
    store = tmp_path / "s.zarr"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dump.run(make_params(tiny_llama_dir, prepared, store))  # num_parts unset: one per rank
    root = zarr.open_group(str(store), mode="r")
    assert root.attrs["dspark_offline"]["num_parts"] == 2
    assert "part-00001" in root and "part-00000" not in root
    assert read_record(store) is None  # part 0 is missing: not complete
    with pytest.raises(LaunchError, match="not a multiple"):
        dump.run(make_params(tiny_llama_dir, prepared, tmp_path / "t.zarr", num_parts=3))


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_torchrun_dump_equals_two_part_dump_by_hand(tiny_llama_dir, make_prepared, tmp_path):
    prepared = make_prepared(16, seed=6)
    files = {}
    for name in ("torchrun", "hand"):
        params = make_params(tiny_llama_dir, prepared, tmp_path / f"{name}.zarr", shard_tokens=48)
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cli = [sys.executable, "-m", "dspark_offline.cli", "dump"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    procs = [
        _run([*torchrun, "-m", "dspark_offline.cli", "dump", "-p", str(files["torchrun"])], tmp_path, env)
    ]
    procs += [
        _run([*cli, "-p", str(files["hand"]), "--num-parts", "2", "--part-index", str(p)], tmp_path, env)
        for p in (0, 1)
    ]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-4000:]
    a, b = (
        zarr.open_group(str(tmp_path / "torchrun.zarr"), mode="r"),
        zarr.open_group(str(tmp_path / "hand.zarr")),
    )
    assert a.attrs["dspark_offline"]["num_parts"] == b.attrs["dspark_offline"]["num_parts"] == 2
    for group in ("target", "part-00000", "part-00001"):
        names = sorted(n for n, _ in b[group].arrays())
        assert names == sorted(n for n, _ in a[group].arrays()) and names
        for n in names:
            assert np.array_equal(a[f"{group}/{n}"][...], b[f"{group}/{n}"][...]), f"{group}/{n}"
    assert verify(str(tmp_path / "torchrun.zarr")) == []
    # whichever rank finished last recorded the store complete; the same bytes as the hand-made one
    assert read_record(tmp_path / "torchrun.zarr") == read_record(tmp_path / "hand.zarr") is not None
