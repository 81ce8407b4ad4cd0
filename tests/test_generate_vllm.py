"""`dspark-offline generate` with `dump.backend: vllm` (generate/vllm_engine.py) on the embedded
SmolLM2, run for real with vLLM's CPU build (the `.venv-vllm` of `.ci/setup_vllm.sh`, as in
tests/test_dump_vllm.py; skipped where there is no vLLM), against the HF engine's output.

Both decode greedily in float32, so the answers must agree token for token, except where the
target cannot tell two tokens apart: at a first difference the HF target's logits of the two
tokens must be within TIE of each other (then the rest of that answer is not compared).
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
import yaml
from test_dump_vllm import CLI_TIMEOUT, vllm_cli  # noqa: F401 -- vllm_cli is a fixture used below
from test_generate import QUESTIONS, _sample, gen_params, make_prepared
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_offline.data.prepared import PreparedSplit
from dspark_offline.generate.runner import run as generate_run

pytestmark = pytest.mark.slow

MAX_NEW = 24
TIE = 1e-4  # |logit difference| / |largest logit| at which float32 engines may pick either token


def test_vllm_generate_equals_the_hf_engine(vllm_cli, embedded_target_dir, tmp_path):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(embedded_target_dir)
    prepared = make_prepared(tmp_path / "prepared", tok, [_sample(tok, q) for q in QUESTIONS])
    hf_out, vllm_out = tmp_path / "gen_hf", tmp_path / "gen_vllm"
    generate_run(gen_params(embedded_target_dir, prepared, hf_out, max_new_tokens=MAX_NEW))

    params = {
        "target": {"path": str(embedded_target_dir), "dtype": "float32"},
        "prepare": {"output": str(prepared), "max_length": 256},
        "generate": {"enabled": True, "output": str(vllm_out), "max_new_tokens": MAX_NEW},
        "dump": {"backend": "vllm", "vllm": {"enforce_eager": True}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*vllm_cli, "generate", "-p", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "kv_cache_memory_bytes" in log and "'max_model_len': 256" in log, log[-4000:]

    hf, vl = PreparedSplit.load(hf_out, "train"), PreparedSplit.load(vllm_out, "train")
    assert len(hf) == len(vl) == len(QUESTIONS)
    model = AutoModelForCausalLM.from_pretrained(embedded_target_dir, dtype=torch.float32).eval()
    exact = 0
    for i in range(len(hf)):
        (ids_h, mask_h), (ids_v, mask_v) = (np.asarray(a) for a in hf[i]), (np.asarray(a) for a in vl[i])
        if np.array_equal(ids_h, ids_v) and np.array_equal(mask_h, mask_v):
            exact += 1
            continue
        n = min(len(ids_h), len(ids_v))
        j = int(np.nonzero(ids_h[:n] != ids_v[:n])[0][0]) if (ids_h[:n] != ids_v[:n]).any() else n
        assert j < n, f"sample {i}: one answer is a prefix of the other (lengths {len(ids_h)}, {len(ids_v)})"
        assert mask_h[j] == 1, f"sample {i}: the prompts differ at token {j}"
        with torch.inference_mode():
            logits = model(torch.from_numpy(ids_h[None, :j].astype(np.int64))).logits[0, -1]
        gap = abs(float(logits[ids_h[j]] - logits[ids_v[j]])) / float(logits.abs().max())
        assert gap <= TIE, f"sample {i}, token {j}: HF picked {ids_h[j]}, vLLM {ids_v[j]}, gap {gap:.2e}"
    assert exact >= len(hf) - 1, f"only {exact} of {len(hf)} answers identical"
    assert (
        PreparedSplit.load(vllm_out, "eval").sample_ids.tolist()
        == PreparedSplit.load(prepared, "eval").sample_ids.tolist()
    )
