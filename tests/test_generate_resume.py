"""Acceptance: a SIGKILLed generate run resumes from its saved chunks to exactly the bytes of an
uninterrupted run (greedy and sampled)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_generate import QUESTIONS, _sample, gen_params, make_prepared, same_files
from transformers import AutoTokenizer

from dspark_offline.generate import run

# A worker process: runs generate.run(params); SLOW_BATCH_S slows every decoded batch so that the
# kill lands after the first chunk is saved and before the last one is.
WORKER = """
import os, sys, time
from dspark_offline.generate import engine, runner
delay = float(os.environ.get("SLOW_BATCH_S", "0"))
decode = engine.decode_batch
def slow(*a, **k):
    time.sleep(delay)
    return decode(*a, **k)
engine.decode_batch = slow
from dspark_offline.config import Params
runner.run(Params.model_validate_json(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sigkill_then_resume_equals_uninterrupted(chatty_llama_dir, tmp_path, temperature):
    tok = AutoTokenizer.from_pretrained(chatty_llama_dir)
    train = [_sample(tok, f"{q} ({k})") for k in range(3) for q in QUESTIONS]  # 21 prompts
    prepared = make_prepared(tmp_path / "prep", tok, train)
    settings = {
        "max_new_tokens": 8,
        "batch_size": 2,
        "chunk_samples": 4,
        "temperature": temperature,
        "top_p": 0.9,
        "seed": 7,
    }
    full = run(gen_params(chatty_llama_dir, prepared, tmp_path / "full", **settings))

    killed = gen_params(chatty_llama_dir, prepared, tmp_path / "killed", **settings)
    partial = tmp_path / "killed.partial"
    env = dict(os.environ, OMP_NUM_THREADS="1", SLOW_BATCH_S="0.4")
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, killed.model_dump_json()],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not list(partial.glob("chunk-*.npz")):
        assert proc.poll() is None, f"worker exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "worker made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(partial.glob("chunk-*.npz")))
    assert 1 <= done < 6 and not (tmp_path / "killed").exists(), "the kill did not interrupt the run"

    run(killed)  # resume
    same_files(full, tmp_path / "killed")
    assert not partial.exists()
