"""benchmarks/gpu_check.py: the GPU readiness check. Its tiny CPU mode runs end to end (the same
dump and train library calls as on a GPU, gloo instead of NCCL); the Qwen3-8B shape is checked
on the meta device (no memory); its arguments and params come from configs/qwen3-8b-8gpu.yaml."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from benchmark_script import BENCHMARKS, load_benchmark

bench = load_benchmark("gpu_check")

METRICS = {
    "target_params_b",
    "build_s",
    "dump_tokens",
    "dump_startup_s",
    "dump_loop_tok_s",
    "dump_forward_tok_s",
    "dump_writer_busy_s",
    "dump_wall_s",
    "dump_peak_gib",
    "bare_load_s",
    "bare_forward_tok_s",
    "dump_loop_over_bare",
    "dump_forward_over_bare",
    "drafter_params_m",
    "train_global_batch",
    "train_first_step_s",
    "train_step_s",
    "train_tok_s",
    "train_peak_gib",
    "train_wall_s",
    "total_s",
}


def test_qwen3_8b_shape_has_qwen3_8b_parameter_count():
    """Qwen3-8B: 8.2 B parameters, 6.95 B of them outside the (untied) embedding and head."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            Qwen3Config(**bench.SHAPES["qwen3-8b"]), dtype=torch.bfloat16
        )
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert 8.15e9 < total < 8.25e9
    assert 6.9e9 < total - embedding < 7.0e9


def test_params_are_the_8gpu_config_with_one_part_and_a_few_steps(tmp_path):
    args = bench.parse_args([])
    assert (args.shape, args.device, args.num_samples, args.seq_len, args.steps) == (
        "qwen3-8b",
        "cuda",
        64,
        2048,
        6,
    )
    p = bench.make_params(args, tmp_path)
    assert (p.target.dtype, p.target.device, p.target.path) == ("bfloat16", "cuda", str(tmp_path / "target"))
    assert (p.dump.num_parts, p.dump.part_index, p.dump.backend, p.dump.batch_tokens, p.dump.top_k) == (
        1,
        None,
        "hf",
        32768,
        64,
    )
    assert (p.draft.num_layers, p.draft.block_size, p.draft.markov_rank) == (5, 7, 256)
    assert (p.train.max_steps, p.train.micro_batch_size, p.train.grad_accum, p.train.num_anchors) == (
        6,
        1,
        4,
        512,
    )
    assert (p.train.dtype, p.train.zero_stage, p.train.val_samples) == ("bfloat16", 2, 0)
    assert p.prepare.max_length == 2048 and not p.generate.enabled
    tiny = bench.make_params(bench.parse_args(["--tiny", "--device", "cpu", "--steps", "2"]), tmp_path)
    assert (tiny.target.device, tiny.train.max_steps, tiny.draft.num_layers, tiny.dump.top_k) == (
        "cpu",
        2,
        1,
        16,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cpu"], "use --shape tiny"),
        (["--tiny", "--steps", "0"], "--steps must be >= 1"),
        (["--tiny", "--seq-len", "4"], "--seq-len must be >= 8"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_markdown_table():
    rows = [
        {"key": "a", "label": "tokens", "value": 131072, "unit": ""},
        {"key": "b", "label": "step", "value": 0.123456, "unit": "s"},
        {"key": "c", "label": "rate", "value": 12345.6, "unit": "tok/s"},
    ]
    assert bench.markdown_table(rows).splitlines() == [
        "| measure | value | unit |",
        "| --- | ---: | --- |",
        "| tokens | 131072 |  |",
        "| step | 0.123 | s |",
        "| rate | 12346 | tok/s |",
    ]


@pytest.mark.slow
def test_tiny_cpu_run_end_to_end(tmp_path):
    """The whole check on CPU: every number finite and positive, in the JSON and the printed table,
    and the dump and train really wrote a bf16 store and a checkpoint."""
    out, work = tmp_path / "gpu_check.json", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        sys.executable,
        str(BENCHMARKS / "gpu_check.py"),
        "--tiny",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--workdir",
        str(work),
    ]
    proc = subprocess.run(
        cmd, check=False, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) == METRICS
    bad = {k: v for k, v in doc["metrics"].items() if not (math.isfinite(v) and v > 0)}
    assert not bad
    assert doc["metrics"]["dump_tokens"] == 8 * 64 and doc["metrics"]["train_global_batch"] == 2
    assert (doc["shape"], doc["device"], doc["workload"]["steps"]) == ("tiny", "cpu", 3)
    table = doc["table"].splitlines()
    assert len(table) == 2 + len(METRICS) and all(line in proc.stdout for line in table)

    from dspark_offline.store import open_store

    store = open_store(str(work / "features.zarr"))
    assert (
        store.manifest.dtypes.hidden == "bfloat16"
        and store.manifest.target.architecture == "Qwen3ForCausalLM"
    )
    assert len(store) == 8
    assert (work / "run" / "checkpoints" / "step-00000003").is_dir()


def test_cuda_requested_without_cuda_is_one_line_exit_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        bench.main(["--tiny"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        (
            "error: --device cuda: torch sees no CUDA device here; "
            "for the CPU check use --shape tiny --device cpu"
        )
    ]
