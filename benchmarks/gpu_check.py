"""GPU readiness check: a random-weight target of Qwen3-8B's shape through the real dump and train code.

One call, one table. Phases, all in this process, all through the project's own library calls:

1. **target** — a Qwen3 config at Qwen3-8B's shape (hidden 4096, 36 layers, 32 heads / 8 KV heads,
   head_dim 128, MLP 12288, vocab 151936, untied head; ``SHAPES`` below), random weights made on
   the device in bf16 (about 8.2 B parameters, 16.4 GB), saved as a local HF directory with a
   stand-in byte-level tokenizer (no Qwen tokenizer offline; token ids do not change the cost).
   One warm-up forward, so CUDA / cuBLAS initialisation is not billed to the dump.
2. **prompts** — synthetic samples of exactly ``--seq-len`` random token ids (loss mask on the last
   three quarters), written as prepared data with ``dspark_offline.data.prepared.write_prepared``.
3. **dump** — ``dspark_offline.dump.run(params)`` in bf16 with ``configs/qwen3-8b-8gpu.yaml``'s dump
   section (one part instead of 8): its start-up (model load), its loop (target forward, top-k,
   device-to-host copies, background Zarr writes) and the time inside ``HFTarget.forward``.
4. **bare forward** — the same model loaded plainly (``AutoModelForCausalLM``, SDPA) and
   ``model(input_ids, attention_mask)`` with full logits over exactly the batches the dump ran,
   synchronised on the device: the floor the dump's tokens/s is compared with.
5. **train** — ``dspark_offline.train.loop.run(params)`` with the yaml's draft and train sections
   (5 draft layers, block 7, Markov rank 256, 512 anchors, micro 1 x accumulation 4, bf16) for
   ``--steps`` optimizer steps, DeepSpeed ZeRO-2 on NCCL in a world of one (gloo on CPU): step
   times from the run's own ``metrics/train.tsv``, peak device memory of the run.

It prints one markdown table and writes it with every number as JSON to ``--out`` (rewritten
after each phase, so a run killed at a time limit still leaves what it measured).

On a GPU host with torch and transformers but no internet (such as the lent H200 machine)::

    # here, with PyPI: the packages such a host lacks, as wheels for its Python (3.12 there)
    bash benchmarks/gpu_wheels.sh 3.12          # -> .gpu-wheels/ (git-ignored, about 14 MiB)
    # there: carry .gpu-wheels/ with the working tree, then (installs what is missing, runs this)
    bash benchmarks/gpu_check.sh --out /tmp/gpu_check.json

``gpu_check.sh`` installs only the carried wheels whose package is missing there or at another
version (into ``/tmp/gpu-check-site``, no index, no network), puts the repository on ``PYTHONPATH``
(no ``pip install -e``) and runs this script with its arguments. Keep its output, e.g.
``... --out $DIR/gpu_check.json 2>&1 | tee $DIR/gpu_check.log``.

Time on one H200 (estimated, not measured: no GPU was available when this was written), for the
default 64 samples x 2048 tokens and 6 steps: installs and imports ~30 s; random init ~5 s; saving
16.4 GB ~20-60 s (disk speed unknown); dump start-up ~15-25 s (load from the page cache, head
copy written to the store); dump loop ~10-30 s (131k tokens x 16 GFLOP = 2.1 PFLOP is ~3-5 s at
the 400-790 TFLOP/s bf16 matmuls reach there, the rest is ~6.5 GB of features to copy to the host,
compress and write); bare load + forward ~15-25 s (10 GB of logits per 32k-token batch); train
~60-120 s (DeepSpeed start-up; 6 steps of ~1-2 s for a 1.13 B-parameter drafter whose bf16 weights
and gradients, fp32 master copy and AdamW moments take ~18 GB under ZeRO-2; a final checkpoint of
~16 GB with the optimizer state). About 3-5 minutes in all, inside an 8-minute limit with room for
a slow disk; ``--num-samples`` / ``--steps`` scale it. Disk: ~16 GB target + ~9 GB store + ~16 GB
checkpoint in the workdir (removed at the end unless ``--keep`` or ``--workdir``).

CPU (what the tests run; same code path, tiny shape, gloo)::

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --shape tiny --device cpu --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "qwen3-8b-8gpu.yaml"

# Qwen3-8B's config.json (Qwen/Qwen3-8B on the HF hub); "tiny" keeps the architecture, shrinks the dims.
SHAPES = {
    "qwen3-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 12288,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": False,
    },
}
# Workload per shape: samples x tokens for the dump, optimizer steps, and params overrides on top of
# the yaml (the tiny shape needs smaller shards, top-k, drafter and anchors to stay tiny).
WORKLOADS = {
    "qwen3-8b": {"num_samples": 64, "seq_len": 2048, "steps": 6, "overrides": {}},
    "tiny": {
        "num_samples": 8,
        "seq_len": 64,
        "steps": 3,
        "overrides": {
            "dump.batch_tokens": 256,
            "dump.shard_tokens": 256,
            "dump.chunk_tokens": 32,
            "dump.top_k": 16,
            "draft.num_layers": 1,
            "draft.markov_rank": 16,
            "train.num_anchors": 16,
            "train.chunk_blocks": 16,
            "train.grad_accum": 2,
        },
    },
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b", help="Target shape.")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="shape", help="Same as --shape tiny.")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (NCCL) or cpu (gloo).")
    p.add_argument("--num-samples", type=int, default=None, help="Synthetic samples (default: per shape).")
    p.add_argument("--seq-len", type=int, default=None, help="Tokens per sample (default: per shape).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps to train (default: per shape).")
    p.add_argument("--out", default=None, help="Write the table and every number as JSON here.")
    p.add_argument("--workdir", default=None, help="Target, prepared data, store, run (default: a temp dir).")
    p.add_argument("--keep", action="store_true", help="Keep the temp workdir (a --workdir is always kept).")
    args = p.parse_args(argv)
    work = WORKLOADS[args.shape]
    for name in ("num_samples", "seq_len", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, work[name])
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.seq_len < 8:
        p.error(f"--seq-len must be >= 8 (got {args.seq_len}): the loss mask needs supervised tokens")
    if args.device == "cpu" and args.shape != "tiny":
        p.error(f"--shape {args.shape} on CPU would need 16 GiB of bf16 weights and hours; use --shape tiny")
    return args


class Report:
    """Ordered (label, value, unit) rows; rewritten to ``--out`` as JSON at every phase."""

    def __init__(self, out: str | None, context: dict):
        self.out, self.context, self.rows = out, context, []

    def add(self, key: str, label: str, value, unit: str = "") -> None:
        self.rows.append({"key": key, "label": label, "value": value, "unit": unit})
        self.save()

    def values(self) -> dict:
        return {r["key"]: r["value"] for r in self.rows}

    def save(self) -> None:
        if self.out:
            doc = {**self.context, "metrics": self.values(), "table": markdown_table(self.rows)}
            Path(self.out).write_text(json.dumps(doc, indent=2) + "\n")


def markdown_table(rows: list[dict]) -> str:
    """| measure | value | unit | — numbers to 3 significant digits (integers as they are)."""

    def fmt(v) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        return str(v) if isinstance(v, int) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"

    lines = ["| measure | value | unit |", "| --- | ---: | --- |"]
    lines += [f"| {r['label']} | {fmt(r['value'])} | {r['unit']} |" for r in rows]
    return "\n".join(lines)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device: str) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (never resets)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build_tokenizer():
    """A byte-level BPE with no merges (256 tokens) + ChatML specials: a working stand-in tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_target(shape: str, device: str, out: Path, warmup_tokens: int, seq_len: int) -> tuple[int, object]:
    """Random-weight Qwen3 of `shape` made on `device` in bf16, saved to `out`; one warm-up forward.
    -> (parameter count, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = build_tokenizer()
    config = Qwen3Config(
        **SHAPES[shape],
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # random init on the device
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    batch = max(1, warmup_tokens // seq_len)
    ids = torch.randint(0, len(tokenizer), (batch, seq_len), device=device)  # [b, S]
    with torch.inference_mode():
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids))  # warm-up, backbone only
    _sync(device)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    del model
    reset_peak(device)
    return n_params, tokenizer


def write_prompts(out: Path, tokenizer, num_samples: int, seq_len: int) -> None:
    """`num_samples` samples of exactly `seq_len` token ids; the first quarter is the prompt (mask 0)."""
    import numpy as np

    from dspark_offline.data.prepared import SplitArrays, write_prepared
    from dspark_offline.target.fingerprint import tokenizer_hashes

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, len(tokenizer), size=seq_len) for _ in range(num_samples)]
    masks = [(np.arange(seq_len) >= seq_len // 4).astype(np.uint8) for _ in range(num_samples)]

    def split(items: range, first_id: int) -> SplitArrays:
        return SplitArrays.from_samples(
            [ids[i] for i in items],
            [masks[i] for i in items],
            [first_id + k for k in range(len(items))],
            [f"s{i}" for i in items],
        )

    tok_hash, template_hash = tokenizer_hashes(tokenizer)
    write_prepared(
        out,
        {"train": split(range(num_samples), 0), "eval": split(range(1), num_samples)},
        {
            "max_length": seq_len,
            "tokenizer_hash": tok_hash,
            "chat_template_hash": template_hash,
            "source": "synthetic (benchmarks/gpu_check.py)",
        },
        {"records_read": num_samples},
    )


def timed_dump(params) -> dict:
    """`dump.run(params)` with its start-up, loop and backend forward timed, and the batches recorded."""
    from dspark_offline import dump
    from dspark_offline.store.background import BackgroundWriter
    from dspark_offline.target.hf_backend import HFTarget

    rec = {"batches": [], "forward_s": 0.0}
    original_forward, original_open = HFTarget.forward, dump._open_target

    def forward(self, input_ids, attention_mask):
        rec["batches"].append((input_ids.clone(), attention_mask.clone()))
        t = time.perf_counter()
        out = original_forward(self, input_ids, attention_mask)  # ends with .cpu(): synchronised
        rec["forward_s"] += time.perf_counter() - t
        return out

    def open_target(*a, **kw):
        t = time.perf_counter()
        target = original_open(*a, **kw)
        rec["startup_s"] = time.perf_counter() - t
        return target

    class TimedWriter(BackgroundWriter):
        """The dump's loop is the `with BackgroundWriter()` block: time it, keep the writer's counters."""

        def __enter__(self):
            self._t0 = time.perf_counter()
            return super().__enter__()

        def __exit__(self, *exc):
            out = super().__exit__(*exc)
            rec.update(
                loop_s=time.perf_counter() - self._t0, writer_busy_s=self.busy_s, shards=self.shards_written
            )
            return out

    HFTarget.forward, dump._open_target, dump.BackgroundWriter = forward, open_target, TimedWriter
    try:
        t0 = time.perf_counter()
        dump.run(params)
        rec["wall_s"] = time.perf_counter() - t0
    finally:
        HFTarget.forward, dump._open_target, dump.BackgroundWriter = (
            original_forward,
            original_open,
            BackgroundWriter,
        )
    return rec


def bare_forward(target_dir: Path, device: str, batches: list) -> tuple[float, float]:
    """Plain HF load + ``model(...)`` (full logits) over `batches`, synchronised. -> (load s, forward s)."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to(device).eval()
    _sync(device)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, S, V]
            del logits  # computed and freed, as a consumer on the device would
        _sync(device)
    seconds = time.perf_counter() - t0
    del model
    reset_peak(device)
    return load, seconds


def step_times(run_dir: Path, tokens_per_step: float) -> list[float]:
    """Seconds of each optimizer step, from the run's own train.tsv (tokens / tokens_per_s)."""
    from dspark_offline.train.metrics import read_tsv

    return [tokens_per_step / row["tokens_per_s"] for row in read_tsv(run_dir / "metrics" / "train.tsv")]


def drafter_params(store_path: str, params) -> int:
    """Trainable parameters of the drafter `train` builds (counted on the meta device: no memory)."""
    import torch

    from dspark_offline.model import DraftModelConfig, DSparkDraft
    from dspark_offline.store import open_store

    cfg = DraftModelConfig.from_manifest(open_store(store_path).manifest, params.draft)
    with torch.device("meta"):
        return sum(p.numel() for p in DSparkDraft(cfg).parameters() if p.requires_grad)


def make_params(args: argparse.Namespace, work: Path):
    from dspark_offline.config import load_params

    overrides = {
        "target.path": str(work / "target"),
        "target.dtype": "bfloat16",
        "target.device": args.device,
        "prepare.output": str(work / "prepared"),
        "prepare.max_length": args.seq_len,
        "generate.enabled": False,
        "dump.store": str(work / "features.zarr"),
        "dump.backend": "hf",
        "dump.num_parts": 1,
        "dump.overwrite": True,
        "train.output_dir": str(work / "run"),
        "train.max_steps": args.steps,
        "train.val_samples": 0,
        "train.log_every": 1,
        "train.save_every": args.steps,
        "train.overwrite": True,
        "export.output": str(work / "run" / "drafter"),
        **WORKLOADS[args.shape]["overrides"],
    }
    return load_params(BASE_CONFIG, overrides)


def check(args: argparse.Namespace, work: Path) -> Report:
    """All phases in `work`; the report holds every row."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        from dspark_offline.errors import UserError

        raise UserError(
            "--device cuda: torch sees no CUDA device here; for the CPU check use --shape tiny --device cpu"
        )
    os.environ["DS_ACCELERATOR"] = args.device  # before DeepSpeed picks one (dist.select_accelerator)
    params = make_params(args, work)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rep = Report(
        args.out,
        {
            "shape": args.shape,
            "target_config": SHAPES[args.shape],
            "device": device_name,
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
            },
            "workload": {
                "num_samples": args.num_samples,
                "seq_len": args.seq_len,
                "steps": args.steps,
                "base_config": str(BASE_CONFIG.relative_to(ROOT)),
            },
        },
    )
    t_all = time.perf_counter()
    mem_unit = "GiB (CUDA peak allocated)" if args.device == "cuda" else "GiB (process peak RSS so far)"

    t0 = time.perf_counter()
    n_params, tokenizer = build_target(
        args.shape, args.device, work / "target", params.dump.batch_tokens, args.seq_len
    )
    rep.add(
        "target_params_b", f"target parameters (Qwen3, {args.shape}, bf16, random)", n_params / 1e9, "billion"
    )
    rep.add("build_s", "build + warm-up + save target", time.perf_counter() - t0, "s")

    write_prompts(work / "prepared", tokenizer, args.num_samples, args.seq_len)
    tokens = args.num_samples * args.seq_len
    rep.add("dump_tokens", f"dump tokens ({args.num_samples} samples x {args.seq_len})", tokens)

    d = timed_dump(params)
    rep.add("dump_startup_s", "dump start-up (model load)", d["startup_s"], "s")
    rep.add(
        "dump_loop_tok_s", "dump loop (forward, top-k, copies, Zarr writes)", tokens / d["loop_s"], "tok/s"
    )
    rep.add("dump_forward_tok_s", "dump HFTarget.forward only", tokens / d["forward_s"], "tok/s")
    rep.add("dump_writer_busy_s", "dump writer thread busy", d["writer_busy_s"], "s")
    rep.add("dump_wall_s", "dump whole run", d["wall_s"], "s")
    rep.add("dump_peak_gib", "dump peak memory", peak_memory_gib(args.device), mem_unit)
    reset_peak(args.device)

    load_s, bare_s = bare_forward(work / "target", args.device, d["batches"])
    rep.add("bare_load_s", "bare HF load", load_s, "s")
    rep.add("bare_forward_tok_s", "bare HF forward (full logits), same batches", tokens / bare_s, "tok/s")
    rep.add("dump_loop_over_bare", "dump loop time / bare forward time", d["loop_s"] / bare_s, "x")
    rep.add(
        "dump_forward_over_bare", "HFTarget.forward time / bare forward time", d["forward_s"] / bare_s, "x"
    )

    from dspark_offline.train.loop import run as train_run

    reset_peak(args.device)
    t0 = time.perf_counter()
    summary = train_run(params)
    train_wall = time.perf_counter() - t0
    steps = step_times(work / "run", summary["tokens"])
    later = steps[1:] or steps  # the first step pays one-off costs (allocations, kernel selection)
    rep.add(
        "drafter_params_m",
        "drafter trainable parameters",
        drafter_params(params.dump.store, params) / 1e6,
        "million",
    )
    rep.add(
        "train_global_batch",
        "train global batch (micro x accum x world 1)",
        summary["plan"]["global_batch"],
        "samples",
    )
    rep.add("train_first_step_s", "train first step", steps[0], "s")
    rep.add(
        "train_step_s",
        f"train step, mean of steps 2-{len(steps)}" if len(steps) > 1 else "train step",
        sum(later) / len(later),
        "s",
    )
    rep.add(
        "train_tok_s", "train tokens/s (those steps)", summary["tokens"] * len(later) / sum(later), "tok/s"
    )
    rep.add("train_peak_gib", "train peak memory", peak_memory_gib(args.device), mem_unit)
    rep.add("train_wall_s", "train whole run (DeepSpeed start-up, steps, checkpoint)", train_wall, "s")
    rep.add("total_s", "whole check", time.perf_counter() - t_all, "s")
    return rep


def main(argv: list[str] | None = None) -> None:
    from dspark_offline.entry import report_errors, setup_process_env

    args = parse_args(argv)
    setup_process_env()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rep = report_errors(lambda: check(args, work))
    finally:  # tens of GB at the Qwen3-8B shape: never left behind in a temp dir unless asked
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ctx = rep.context
    print(
        f"\n[gpu_check] {ctx['device']}, torch {ctx['versions']['torch']} (CUDA {ctx['versions']['cuda']}), "
        f"shape {args.shape}; {args.num_samples} samples x {args.seq_len} tokens, {args.steps} steps"
    )
    print(markdown_table(rep.rows))
    bad = [
        k for k, v in rep.values().items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)
    ]
    if bad:
        raise SystemExit(f"[gpu_check] not finite and positive: {bad}")


if __name__ == "__main__":
    main()
