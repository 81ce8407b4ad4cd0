"""The store manifest: the stage-1 -> stage-2 handshake, kept in the root attrs of the store.

A trainer reads nothing but the store, so the manifest carries everything it derives its
dims from (target config), everything it must agree with (layer ids and their convention,
tokenizer/chat-template hashes) and everything that determines the arrays, folded into one
`params_fingerprint`: a dump resumed or re-run with a different fingerprint would mix features
from two different runs, so the writer refuses it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_NAME = "dspark-offline-features"
# A store's format_version is the oldest reader version that reads it correctly
# (`needed_format_version`), not the version of its writer: a store every reader reads stays at 1,
# so its manifest (and its DVC identity) does not change when a newer reader is released.
FORMAT_VERSION = 2  # the newest format_version this reader reads (it reads all from 1)
MANIFEST_ATTR = "dspark_offline"
PART_ATTR = "dspark_offline_part"  # attrs of each part group: status, counts, shards done
HEAD_ARRAYS = ("embed_tokens", "lm_head", "final_norm")  # arrays of the `target` group


class StoreError(RuntimeError):
    """A feature store that cannot be opened or written as asked (names the store and the reason)."""


class StoreMismatchError(StoreError):
    """A store whose contents do not match what the caller (drafter config, dump params) needs."""


class StoreIntegrityError(StoreError):
    """A damaged store: an object missing or corrupt, shapes or manifest inconsistent (named)."""


class MissingChunkError(StoreIntegrityError):
    """A chunk or shard object an array needs is absent; zarr would read it as the fill value."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetInfo(_Model):
    """What the drafter needs to know about the target, without loading it."""

    name: str = Field(description="Target as given in params (path or 'embedded:...' name).")
    path: str = Field(description="Resolved local Hugging Face directory the features were computed from.")
    weights_hash: str = Field(description="Hash of the target weights (detects a changed checkpoint).")
    architecture: str = Field(description="HF architecture class, e.g. 'LlamaForCausalLM'.")
    model_type: str = Field(description="HF config model_type, e.g. 'llama', 'qwen3'.")
    num_hidden_layers: int = Field(ge=1, description="Decoder layers N of the target.")
    hidden_size: int = Field(ge=1, description="Hidden size H of the target.")
    num_attention_heads: int = Field(ge=1, description="Attention heads of the target.")
    num_key_value_heads: int = Field(ge=1, description="Key/value heads of the target (GQA).")
    head_dim: int = Field(ge=1, description="Per-head dimension of the target.")
    intermediate_size: int = Field(ge=1, description="MLP width of the target.")
    rms_norm_eps: float = Field(gt=0, description="RMSNorm epsilon of the target.")
    rope_theta: float | None = Field(
        gt=0, description="RoPE base of the target (None when the config has none)."
    )
    vocab_size: int = Field(ge=1, description="Rows V of the embedding / lm_head.")
    max_position_embeddings: int = Field(ge=1, description="Maximum positions of the target.")
    tie_word_embeddings: bool = Field(description="Whether the target ties lm_head to embed_tokens.")
    dtype: str = Field(description="Compute dtype the target ran in, e.g. 'float32', 'bfloat16'.")
    mask_token_id: int | None = Field(description="The tokenizer's mask token id; None when it has none.")
    tokenizer_size: int = Field(ge=1, description="len(tokenizer); embedding rows >= this are spare.")
    special_tokens: dict[str, int] = Field(description="Special tokens of the tokenizer: {token: id}.")


class DataInfo(_Model):
    """Provenance of the tokens the features were computed on."""

    prepared_path: str = Field(description="Prepared-data directory the dump read.")
    split: str = Field(description="Split of the prepared data that was dumped ('train').")
    prepared_fingerprint: str = Field(description="Fingerprint (hash of all arrays) of the prepared split.")
    max_length: int | None = Field(description="max_length the conversations were truncated to in prepare.")
    num_samples: int = Field(ge=0, description="Samples in the store over all parts.")
    num_tokens: int = Field(ge=0, description="Sample tokens in the store over all parts (gaps excluded).")


class ArrayDtypes(_Model):
    """Logical dtypes of the arrays (bfloat16 is stored as uint16 bits, float8_e4m3 as uint8 bits,
    see store/dtypes.py)."""

    input_ids: Literal["int32"] = Field("int32", description="Token ids.")
    loss_mask: Literal["uint8"] = Field("uint8", description="1 on supervised (assistant) tokens.")
    hidden: Literal["float32", "bfloat16", "float16", "float8_e4m3"] = Field(
        description="Target layer states. 'float8_e4m3': e4m3 codes scaled per token per layer by "
        "`hidden_scale` (hidden = code x scale, decoded to float32 by the reader; store/fp8.py)."
    )
    hidden_scale: Literal["bfloat16"] | None = Field(
        None,
        description="Array `hidden_scale` [T, L] of the per-token per-layer scales (amax / 448, "
        "rounded up) of float8 hidden states; None (and no such array) unless hidden is 'float8_e4m3'.",
    )
    final_hidden: Literal["float32", "bfloat16", "float16"] | None = Field(
        description="Final post-norm state; None when not stored."
    )
    topk_ids: Literal["int32"] = Field("int32", description="Top-k token ids.")
    topk_probs: Literal["float16"] = Field("float16", description="Top-k probabilities, sorted descending.")
    head: Literal["float32", "bfloat16", "float16"] = Field(
        description="target/embed_tokens, target/lm_head, target/final_norm."
    )

    @model_validator(mode="after")
    def _scale_iff_float8(self) -> ArrayDtypes:
        if (self.hidden == "float8_e4m3") != (self.hidden_scale is not None):
            raise ValueError(
                f"dtypes.hidden={self.hidden!r} with dtypes.hidden_scale={self.hidden_scale!r}: float8_e4m3 "
                "hidden states need a scale array, other dtypes have none"
            )
        return self


def needed_format_version(hidden_dtype: str | None, has_final_hidden: bool | None) -> int:
    """The oldest reader's format_version that reads a store with these features correctly.

    1: the first format (hidden states in float32 / bfloat16 / float16, final_hidden stored), which
    every reader reads. 2: a store using what the format gained later, float8 hidden states (e4m3
    codes x `hidden_scale`) or no final_hidden (`dump.store_final_hidden`), so that a reader knowing
    only version 1 refuses it by its version instead of misreading it or failing on the manifest.
    """
    if hidden_dtype == "float8_e4m3" or has_final_hidden is False:
        return 2
    return 1


class BackendInfo(_Model):
    """What computed the features: backend, device and library versions."""

    name: Literal["hf", "vllm"] = Field(description="Target backend of the dump (params dump.backend).")
    device: str = Field(description="Device type the target ran on: 'cpu' or 'cuda'.")
    versions: dict[str, str] = Field(
        description="Versions of the libraries that computed the features, e.g. torch, transformers, vllm."
    )


class Manifest(_Model):
    """Root attribute `dspark_offline` of a feature store (schemas/feature_store.schema.json)."""

    format: Literal["dspark-offline-features"] = Field(FORMAT_NAME, description="Format name.")
    format_version: int = Field(
        ge=1,
        le=FORMAT_VERSION,
        description="The oldest reader format version that reads this store correctly: 1 for stores "
        "every dspark-offline reads; 2 with float8_e4m3 hidden states (hidden_scale) or without "
        "final_hidden. Filled in from dtypes.hidden and has_final_hidden when a manifest is built. A "
        "reader refuses a store needing a newer version than it knows (written by a newer dspark-offline).",
    )
    target: TargetInfo = Field(description="The target the features come from.")
    tokenizer_hash: str = Field(description="Hash of the tokenizer (vocab, merges, special tokens).")
    chat_template_hash: str = Field(description="Hash of the chat template used to render conversations.")
    layer_ids: list[int] = Field(min_length=1, description="Stored target layers, in hidden[:, l] order.")
    layer_id_convention: Literal["dspark"] = Field(
        "dspark", description="Layer id i = output of decoder layer i = HF output_hidden_states[i+1]."
    )
    top_k: int = Field(ge=1, description="Entries K of the stored next-token distribution.")
    dtypes: ArrayDtypes = Field(description="Logical dtypes of the arrays.")
    has_final_hidden: bool = Field(description="Whether parts hold final_hidden [T, H].")
    num_parts: int = Field(ge=1, description="Parts (one per dump worker): part-00000 ...")
    shard_tokens: int = Field(ge=1, description="Tokens per Zarr shard (unit of writing and resume).")
    chunk_tokens: int = Field(ge=1, description="Tokens per Zarr chunk inside a shard (unit of reading).")
    compressor: Literal["zstd", "blosc", "none"] = Field(description="Codec of the arrays.")
    compression_level: int = Field(ge=0, description="Codec level.")
    data: DataInfo = Field(description="Provenance of the tokens.")
    params_fingerprint: str = Field(description="Hash of everything above that determines the arrays.")
    created_by: str = Field(description="dspark-offline version that wrote the store.")
    backend: BackendInfo | None = Field(
        None,
        description="Backend that computed the features; None in stores written before it was "
        "recorded (all made by 'hf'). Not part of params_fingerprint; a resume with another backend "
        "name is refused on its own.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_format_version(cls, data: Any) -> Any:
        """A manifest built without format_version gets the one its features need; one read from a
        store keeps its own (a float8 store written before the rule says 1 and is still read here)."""
        if isinstance(data, dict) and "format_version" not in data:
            dtypes = data.get("dtypes")
            hidden = dtypes.hidden if isinstance(dtypes, ArrayDtypes) else (dtypes or {}).get("hidden")
            data = {**data, "format_version": needed_format_version(hidden, data.get("has_final_hidden"))}
        return data


def feature_specs(m: Manifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Feature arrays of a part (written shard by shard by the dump): name -> (logical dtype,
    shape after the token axis)."""
    L, H, K = len(m.layer_ids), m.target.hidden_size, m.top_k
    specs = {"hidden": (m.dtypes.hidden, (L, H))}
    if m.dtypes.hidden_scale is not None:
        specs["hidden_scale"] = (m.dtypes.hidden_scale, (L,))
    if m.has_final_hidden:
        specs["final_hidden"] = (m.dtypes.final_hidden, (H,))
    specs.update(topk_ids=(m.dtypes.topk_ids, (K,)), topk_probs=(m.dtypes.topk_probs, (K,)))
    return specs


def params_fingerprint(fields: dict) -> str:
    """Stable short hash of a JSON-able dict (sorted keys)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_fields(m: Manifest) -> dict:
    """The manifest fields that determine the arrays.

    Locations (target/prepared paths, the target's display name), the writer version, the
    backend (checked on its own on resume, so stores from before it was recorded keep their
    fingerprint) and an absent `dtypes.hidden_scale` (likewise) are left out: moving the prepared
    data or the model cache does not change a single stored value, while the weights hash and the
    prepared fingerprint do.
    """
    exclude: dict = {
        "params_fingerprint": True,
        "created_by": True,
        "backend": True,
        "target": {"name", "path"},
        "data": {"prepared_path"},
    }
    if m.dtypes.hidden_scale is None:  # stores from before float8 keep their fingerprint
        exclude["dtypes"] = {"hidden_scale"}
    return m.model_dump(mode="json", exclude=exclude)


def _mismatch(what: str, store_value, wanted, store: str | None) -> StoreMismatchError:
    where = f" ({store})" if store else ""
    return StoreMismatchError(
        f"feature store{where} {what}={store_value!r} but the drafter config needs {what}={wanted!r}"
    )


def check_compatible(
    manifest: Manifest,
    *,
    architecture: str | None = None,
    target_name: str | None = None,
    layer_ids: list[int] | None = None,
    hidden_size: int | None = None,
    vocab_size: int | None = None,
    need_final_hidden: bool = False,
    store: str | None = None,
) -> None:
    """Raise `StoreMismatchError` naming both values when the store cannot serve this drafter.

    Only the given (non-None) requirements are checked, so callers pass what they know.
    """
    t = manifest.target
    if architecture is not None and t.architecture != architecture:
        raise _mismatch("target.architecture", t.architecture, architecture, store)
    if target_name is not None and target_name not in (t.name, t.path):
        raise _mismatch("target.name", t.name, target_name, store)
    if layer_ids is not None and list(manifest.layer_ids) != list(layer_ids):
        raise _mismatch("layer_ids", list(manifest.layer_ids), list(layer_ids), store)
    if hidden_size is not None and t.hidden_size != hidden_size:
        raise _mismatch("target.hidden_size", t.hidden_size, hidden_size, store)
    if vocab_size is not None and t.vocab_size != vocab_size:
        raise _mismatch("target.vocab_size", t.vocab_size, vocab_size, store)
    if need_final_hidden and not manifest.has_final_hidden:
        raise _mismatch("has_final_hidden", False, True, store)


def parse_manifest(attrs: dict, store: str) -> Manifest:
    """Validate the root attrs of `store`; refuse foreign formats and versions newer than this
    reader (or not versions at all) by name."""
    raw = attrs.get(MANIFEST_ATTR)
    if not isinstance(raw, dict):
        raise StoreError(f"{store}: not a dspark-offline feature store (no '{MANIFEST_ATTR}' root attribute)")
    if raw.get("format") != FORMAT_NAME:
        raise StoreError(f"{store}: format {raw.get('format')!r} is not {FORMAT_NAME!r}")
    version = raw.get("format_version")
    if type(version) is not int or version < 1:
        raise StoreError(
            f"{store}: format_version={version!r} is not a format version "
            f"(this dspark-offline reads format_version 1 to {FORMAT_VERSION})"
        )
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{store}: written by a newer dspark-offline (the store needs a reader of "
            f"format_version={version}, this dspark-offline reads up to format_version={FORMAT_VERSION}); "
            "upgrade dspark-offline to read it"
        )
    try:
        return Manifest.model_validate(raw)
    except ValueError as e:
        raise StoreError(f"{store}: invalid manifest in root attrs['{MANIFEST_ATTR}']: {e}") from e
