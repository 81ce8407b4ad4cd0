"""DraftModelConfig.from_manifest and mask-token resolution."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dspark_offline.config import DraftConfig
from dspark_offline.model import DraftConfigError, DraftModelConfig


def manifest(**target_overrides):
    target = {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "architecture": "LlamaForCausalLM",
        "mask_token_id": None,
        "tokenizer_size": 49152,
        "special_tokens": {"<|endoftext|>": 0, "<|im_start|>": 1, "<repo_name>": 4},
    }
    target.update(target_overrides)
    return SimpleNamespace(target=SimpleNamespace(**target), layer_ids=[1, 7, 13, 19, 26])


def test_dims_from_manifest():
    cfg = DraftModelConfig.from_manifest(manifest(), DraftConfig(mask_token="<repo_name>", num_layers=2))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        576,
        9,
        3,
        64,
    )
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    assert cfg.num_layers == 2 and cfg.block_size == 7 and cfg.markov_rank == 256
    assert cfg.num_target_layers == 30 and cfg.num_context_layers == 5
    assert cfg.target_layer_ids == (1, 7, 13, 19, 26)
    assert cfg.mask_token_id == 4
    assert (
        DraftModelConfig.from_manifest(
            manifest(), DraftConfig(mask_token_id=3, intermediate_size=100)
        ).intermediate_size
        == 100
    )


@pytest.mark.parametrize(
    "target, draft, want",
    [
        ({"mask_token_id": 7}, {"mask_token_id": 5}, 5),  # explicit id wins
        ({"mask_token_id": 7}, {"mask_token": "<repo_name>"}, 7),  # target's own mask token
        ({"vocab_size": 49216}, {"mask_token": "<repo_name>"}, 49152),  # spare embedding row
        ({}, {"mask_token": "<|im_start|>"}, 1),  # named special token
    ],
)
def test_mask_token_resolution_order(target, draft, want):
    assert DraftModelConfig.from_manifest(manifest(**target), DraftConfig(**draft)).mask_token_id == want


def test_mask_token_errors_name_the_field():
    with pytest.raises(DraftConfigError, match="draft.mask_token"):
        DraftModelConfig.from_manifest(manifest(), DraftConfig())
    with pytest.raises(DraftConfigError, match="'<nope>'"):
        DraftModelConfig.from_manifest(manifest(), DraftConfig(mask_token="<nope>"))
    with pytest.raises(DraftConfigError, match="mask_token_id=50000"):
        DraftModelConfig.from_manifest(manifest(), DraftConfig(mask_token_id=50000))


def test_bad_dims_raise():
    with pytest.raises(DraftConfigError, match="out of range"):
        DraftModelConfig.from_manifest(manifest(num_hidden_layers=20), DraftConfig(mask_token_id=1))
    with pytest.raises(DraftConfigError, match="num_key_value_heads"):
        DraftModelConfig.from_manifest(manifest(num_key_value_heads=4), DraftConfig(mask_token_id=1))
