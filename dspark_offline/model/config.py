"""Draft model dimensions: everything the drafter needs to be built, derived from the store.

Why a separate config (and not `config.DraftConfig`): the params only say what the user chose
(number of draft layers, block size, heads on/off); the rest of the dims come from the target
that produced the feature store, so a drafter can never be built with dims that disagree with
the features it is trained on. The same object is rebuilt from an exported `config.json` by
`serving.load_serving`.

Naming follows the serving side (SGLang / DeepSpec): `num_target_layers` is the depth of the
*target* (what SGLang validates `target_layer_ids` against), while `num_context_layers`
(= `len(target_layer_ids)`, "L") is how many layer states are concatenated into `fc`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class DraftConfigError(ValueError):
    """Drafter dims or mask token cannot be derived; the message names the field to fix."""


@dataclass(frozen=True)
class DraftModelConfig:
    hidden_size: int  # H (draft hidden = target hidden: ctx and the frozen embedding live in it)
    num_layers: int  # draft decoder layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # V (rows of the target embedding / lm_head)
    num_target_layers: int  # depth N of the target (serving validates layer ids against it)
    target_layer_ids: tuple[int, ...]  # "dspark" convention, order = store layer order
    block_size: int = 7
    markov_rank: int = 256
    markov_head: bool = True
    confidence_head: bool = True
    mask_token_id: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        for name in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "block_size",
            "markov_rank",
        ):
            if int(getattr(self, name)) < 1:
                raise DraftConfigError(f"DraftModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DraftConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise DraftConfigError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if not self.target_layer_ids:
            raise DraftConfigError("target_layer_ids is empty: the drafter needs at least one layer state")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise DraftConfigError(
                f"target_layer_ids {bad} out of range for a target with {self.num_target_layers} layers"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DraftConfigError(
                f"mask_token_id={self.mask_token_id} outside the vocabulary [0, {self.vocab_size})"
            )

    @property
    def num_context_layers(self) -> int:
        """L: number of target layer states concatenated into `fc` (L·H → H)."""
        return len(self.target_layer_ids)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_layer_ids"] = list(self.target_layer_ids)
        return d

    @classmethod
    def from_manifest(cls, manifest: Any, draft: Any) -> DraftModelConfig:
        """Dims from `manifest.target`, layer ids from `manifest.layer_ids`, choices from `draft`.

        `draft` is a `config.DraftConfig` (num_layers, block_size, markov_head, markov_rank,
        confidence_head, mask_token_id, mask_token, intermediate_size).
        """
        t = manifest.target
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
        return cls(
            hidden_size=int(t.hidden_size),
            num_layers=int(draft.num_layers),
            num_attention_heads=int(t.num_attention_heads),
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=int(draft.intermediate_size or t.intermediate_size),
            rms_norm_eps=float(t.rms_norm_eps),
            rope_theta=float(t.rope_theta),
            max_position_embeddings=int(t.max_position_embeddings),
            vocab_size=int(t.vocab_size),
            num_target_layers=int(t.num_hidden_layers),
            target_layer_ids=tuple(int(i) for i in manifest.layer_ids),
            block_size=int(draft.block_size),
            markov_rank=int(draft.markov_rank),
            markov_head=bool(draft.markov_head),
            confidence_head=bool(draft.confidence_head),
            mask_token_id=resolve_mask_token_id(t, draft),
        )


def resolve_mask_token_id(target: Any, draft: Any) -> int:
    """The block's MASK token (DESIGN §4, last paragraph), first match wins:

    1. `draft.mask_token_id` set explicitly in params;
    2. the target tokenizer's own mask token (`target.mask_token_id`);
    3. a spare embedding row: the embedding has more rows than the tokenizer has tokens, so
       row `tokenizer_size` is never produced by the tokenizer and cannot collide with text;
    4. `draft.mask_token` (a rarely used special token) looked up in `target.special_tokens`.
    """
    vocab = int(target.vocab_size)
    if getattr(draft, "mask_token_id", None) is not None:
        tid = int(draft.mask_token_id)
        if not 0 <= tid < vocab:
            raise DraftConfigError(f"draft.mask_token_id={tid} is outside the target vocabulary [0, {vocab})")
        return tid
    if getattr(target, "mask_token_id", None) is not None:
        return int(target.mask_token_id)
    tok_size = getattr(target, "tokenizer_size", None)
    if tok_size is not None and vocab > int(tok_size):
        return int(tok_size)
    name = getattr(draft, "mask_token", None)
    specials = dict(getattr(target, "special_tokens", None) or {})
    if name is not None:
        if name not in specials:
            raise DraftConfigError(
                f"draft.mask_token={name!r} is not a special token of the target tokenizer; "
                f"known special tokens: {sorted(specials)}"
            )
        return int(specials[name])
    raise DraftConfigError(
        "cannot choose a mask token: the target tokenizer has no mask token and its embedding has "
        f"no spare row (vocab_size={vocab}, tokenizer_size={tok_size}); set draft.mask_token in "
        f"params.yaml to a rarely used special token (one of {sorted(specials)}) or draft.mask_token_id"
    )
