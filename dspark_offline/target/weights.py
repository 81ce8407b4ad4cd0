"""Named tensors of a target checkpoint read straight from its safetensors files (no model load).

Two readers need a few tensors of a large target without building it: the vLLM dump backend (the
embedding, head and final norm it stores beside the features) and training's
``train.layer_init: target`` (the decoder layers a drafter starts from).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYER_PREFIX = "model.layers.{}."  # Llama / Qwen decoder layer i in HF checkpoints


def tensor_locations(model_dir: Path, why: str) -> dict[str, str]:
    """{tensor name: safetensors file name} of the checkpoint in ``model_dir``.

    ``why`` completes the error message when there is no safetensors checkpoint (who needs it).
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors(.index.json); {why}")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single.name)


def read_tensors(model_dir: Path, names: dict[str, str], where: dict[str, str]) -> dict[str, torch.Tensor]:
    """{key: tensor} for ``names`` = {key: checkpoint tensor name}; ``where`` from `tensor_locations`.

    Every tensor is a copy (two keys may name one tied tensor)."""
    from safetensors import safe_open

    missing = sorted({n for n in names.values() if n not in where})
    if missing:
        raise KeyError(f"{model_dir}: tensors {missing} not found; expected a Llama/Qwen-style checkpoint")
    out = {}
    for file in sorted({where[n] for n in names.values()}):  # each file opened once
        with safe_open(Path(model_dir) / file, framework="pt") as f:
            for key, name in names.items():
                if where[name] == file:
                    out[key] = f.get_tensor(name).clone()
    return out


def decoder_layer_tensors(model_dir: Path, layer: int) -> dict[str, torch.Tensor]:
    """Every tensor of decoder layer ``layer`` under its name inside the layer
    (``self_attn.q_proj.weight``, ``mlp.down_proj.weight``, ``input_layernorm.weight``, …)."""
    where = tensor_locations(model_dir, "train.layer_init: target reads the target's layers from it")
    prefix = LAYER_PREFIX.format(layer)
    names = {n[len(prefix) :]: n for n in where if n.startswith(prefix)}
    if not names:
        raise KeyError(
            f"{model_dir}: no tensors named {prefix}*; expected a Llama/Qwen-style checkpoint "
            f"with decoder layer {layer}"
        )
    return read_tensors(model_dir, names, where)
