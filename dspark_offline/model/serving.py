"""The serving export: the directory SGLang's DSpark (or DFlash) loader reads.

`config.json` is a Qwen3 config (the draft layers are Qwen3-style whatever the target is) plus
the DFlash/DSpark keys; `model.safetensors` holds the drafter's own weights under the serving
names and never the embedding or lm_head (the server shares the target's).

Facts taken from SGLang `models/dspark.py`, `models/dflash.py` and `dspark_config.py`:
- `num_target_layers` is the depth of the *target*: SGLang rejects a `target_layer_ids` entry
  ≥ it. `dflash_config.{mask_token_id, target_layer_ids}` carry the rest.
- DSpark refuses `markov_rank = 0`. A drafter trained without the Markov head is a plain
  DFlash drafter and is exported as such: `architectures: ["DFlashDraftModel"]`,
  `markov_rank: 0`, no Markov/confidence tensors.
- SGLang builds the confidence head whenever the config is DSpark and errors if its weights are
  missing. A DSpark drafter trained with the confidence head off therefore exports a neutral
  head (`enable_confidence_head: false`, `confidence_head_with_markov: false`, weight 0 and a
  large bias, sigmoid ≈ 1: it never cuts a block), so every loader version accepts it.
- A DFlash drafter trained with a confidence head (on `h_j` alone) keeps it in the file with
  `enable_confidence_head: true`: SGLang's DFlash loader ignores unknown tensors, our
  `evaluate` uses it for early stopping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# Beside config.json: where the drafter came from (checkpoint, store, target weights hash), written
# by `export`, read by `evaluate` to check the drafter still belongs to the target.
PROVENANCE_FILE = "dspark_offline_export.json"

from .config import DraftModelConfig
from .draft import DSparkDraft

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NEUTRAL_CONFIDENCE_BIAS = 20.0  # sigmoid(20) ≈ 1 - 2e-9


class ServingFormatError(ValueError):
    """An export directory that is not a drafter this code wrote or can load."""


def serving_config(cfg: DraftModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` dict for a drafter with dims `cfg`."""
    dspark = cfg.markov_head
    return {
        "architectures": ["Qwen3DSparkModel" if dspark else "DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "block_size": cfg.block_size,
        "num_target_layers": cfg.num_target_layers,
        "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
        "markov_rank": cfg.markov_rank if dspark else 0,
        "markov_head_type": "vanilla",
        "enable_confidence_head": bool(cfg.confidence_head),
        "confidence_head_with_markov": bool(dspark and cfg.confidence_head),
    }


def save_serving(model: DSparkDraft, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `model.safetensors` into `out_dir` (created); returns the dir."""
    core = getattr(model, "module", model)
    cfg: DraftModelConfig = core.cfg
    dtype = dtype or core.fc.weight.dtype
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in core.state_dict().items()}
    if cfg.markov_head and not cfg.confidence_head:
        h = cfg.hidden_size
        tensors["confidence_head.proj.weight"] = torch.zeros(1, h, dtype=dtype)
        tensors["confidence_head.proj.bias"] = torch.full((1,), NEUTRAL_CONFIDENCE_BIAS, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(serving_config(cfg, dtype), indent=2) + "\n")
    return out


def config_from_serving(conf: dict, where: str = CONFIG_FILE) -> DraftModelConfig:
    """Rebuild `DraftModelConfig` from an exported `config.json` dict."""
    try:
        dspark = conf["architectures"][0] == "Qwen3DSparkModel" and int(conf["markov_rank"]) > 0
        return DraftModelConfig(
            hidden_size=conf["hidden_size"],
            num_layers=conf["num_hidden_layers"],
            num_attention_heads=conf["num_attention_heads"],
            num_key_value_heads=conf["num_key_value_heads"],
            head_dim=conf["head_dim"],
            intermediate_size=conf["intermediate_size"],
            rms_norm_eps=conf["rms_norm_eps"],
            rope_theta=conf["rope_theta"],
            max_position_embeddings=conf["max_position_embeddings"],
            vocab_size=conf["vocab_size"],
            num_target_layers=conf["num_target_layers"],
            target_layer_ids=conf["dflash_config"]["target_layer_ids"],
            block_size=conf["block_size"],
            markov_rank=int(conf["markov_rank"]) if dspark else 1,
            markov_head=dspark,
            confidence_head=bool(conf.get("enable_confidence_head", False)),
            mask_token_id=conf["dflash_config"]["mask_token_id"],
        )
    except (KeyError, IndexError, TypeError) as exc:
        raise ServingFormatError(f"{where}: missing or malformed drafter field {exc}") from exc


def load_serving(
    path: str | Path, embed_tokens: torch.Tensor | nn.Module, lm_head: torch.Tensor | nn.Module
) -> DSparkDraft:
    """Load an exported drafter (eval mode) and attach the target's frozen embedding/lm_head."""
    d = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise ServingFormatError(f"{d}: no {name}; not a drafter export directory")
    cfg = config_from_serving(json.loads((d / CONFIG_FILE).read_text()), str(d / CONFIG_FILE))
    tensors = load_file(str(d / WEIGHTS_FILE))
    if not cfg.confidence_head:  # the neutral head written for SGLang's loader is not ours to load
        tensors = {k: v for k, v in tensors.items() if not k.startswith("confidence_head.")}
    model = DSparkDraft(cfg)
    dtype = next(iter(tensors.values())).dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ServingFormatError(
            f"{d / WEIGHTS_FILE}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    model.set_target_head(embed_tokens, lm_head)
    return model.eval()
