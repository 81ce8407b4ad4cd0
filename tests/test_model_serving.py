"""Serving export (issue "Stage 2" item 6) and the inference path evaluate uses."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from dspark_offline.model import ServingFormatError, load_serving, save_serving

QWEN3_DIMS = {
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "max_position_embeddings",
    "vocab_size",
    "attention_bias",
    "tie_word_embeddings",
    "layer_types",
    "dtype",
}
DSPARK_KEYS = {
    "architectures",
    "model_type",
    "block_size",
    "num_target_layers",
    "dflash_config",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
}
LAYER_TENSORS = {
    "input_layernorm.weight": (32,),
    "post_attention_layernorm.weight": (32,),
    "self_attn.q_proj.weight": (32, 32),
    "self_attn.k_proj.weight": (16, 32),
    "self_attn.v_proj.weight": (16, 32),
    "self_attn.o_proj.weight": (32, 32),
    "self_attn.q_norm.weight": (8,),
    "self_attn.k_norm.weight": (8,),
    "mlp.gate_proj.weight": (48, 32),
    "mlp.up_proj.weight": (48, 32),
    "mlp.down_proj.weight": (32, 48),
}


def expected_tensors(num_layers=2, markov=True, confidence=True):
    want = {"fc.weight": (32, 64), "hidden_norm.weight": (32,), "norm.weight": (32,)}
    for i in range(num_layers):
        want.update({f"layers.{i}.{k}": v for k, v in LAYER_TENSORS.items()})
    if markov:
        want.update(
            {
                "markov_head.markov_w1.weight": (97, 8),
                "markov_head.markov_w2.weight": (97, 8),
                "confidence_head.proj.weight": (1, 32 + 8 if confidence else 32),
                "confidence_head.proj.bias": (1,),
            }
        )
    return want


def test_export_names_shapes_and_config(make_tiny_draft, tmp_path):
    model = make_tiny_draft()
    save_serving(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_tensors()
    conf = json.loads((tmp_path / "config.json").read_text())
    assert set(conf) == QWEN3_DIMS | DSPARK_KEYS
    assert conf["architectures"] == ["Qwen3DSparkModel"] and conf["model_type"] == "qwen3"
    assert conf["dflash_config"] == {"mask_token_id": 96, "target_layer_ids": [1, 3]}
    assert conf["num_target_layers"] == 6 and conf["block_size"] == 4 and conf["num_hidden_layers"] == 2
    assert conf["markov_rank"] == 8 and conf["markov_head_type"] == "vanilla"
    assert conf["enable_confidence_head"] is True and conf["confidence_head_with_markov"] is True


def test_config_is_a_valid_qwen3_config(make_tiny_draft, tmp_path):
    from transformers import AutoConfig

    save_serving(make_tiny_draft(), tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen3Config"
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim, hf.vocab_size) == (32, 2, 8, 97)


@pytest.mark.parametrize("markov, confidence", [(True, True), (True, False), (False, False), (False, True)])
def test_export_reload_gives_identical_logits(make_tiny_draft, tmp_path, markov, confidence):
    model = make_tiny_draft(markov_head=markov, confidence_head=confidence).eval()
    save_serving(model, tmp_path)
    back = load_serving(tmp_path, model.embed_weight, model.lm_head_weight)
    # markov_rank means nothing without the Markov head (exported as 0, read back as 1)
    assert back.cfg == (model.cfg if markov else dataclasses.replace(model.cfg, markov_rank=1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (1, 16), generator=g)
    hidden = torch.randn(1, 16, 2, 32, generator=g)
    anchors, keep = torch.tensor([[0, 5, 11]]), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        a = model(ids, hidden, anchors, keep).hidden
        b = back(ids, hidden, anchors, keep).hidden
        prev = ids[:, :4].expand(3, 4)[None]
        torch.testing.assert_close(back.block_logits(b, prev), model.block_logits(a, prev), rtol=0, atol=0)
        if confidence:
            torch.testing.assert_close(back.confidence_logits(b, prev), model.confidence_logits(a, prev))


def test_disabled_heads_export_for_sglang(make_tiny_draft, tmp_path):
    # Markov on, confidence off: SGLang's DSpark loader always builds the confidence head, so a
    # neutral one (sigmoid ~ 1, never cuts a block) is exported and flagged off.
    save_serving(make_tiny_draft(confidence_head=False), tmp_path / "noconf")
    conf = json.loads((tmp_path / "noconf" / "config.json").read_text())
    t = load_file(str(tmp_path / "noconf" / "model.safetensors"))
    assert conf["enable_confidence_head"] is False and conf["confidence_head_with_markov"] is False
    assert {k: tuple(v.shape) for k, v in t.items()} == expected_tensors(confidence=False)
    assert (
        torch.sigmoid(t["confidence_head.proj.bias"]).item() > 0.999
        and not t["confidence_head.proj.weight"].any()
    )
    # Markov off = DFlash baseline: SGLang's DSpark refuses markov_rank 0 -> a DFlash export
    save_serving(make_tiny_draft(markov_head=False, confidence_head=False), tmp_path / "dflash")
    conf = json.loads((tmp_path / "dflash" / "config.json").read_text())
    t = load_file(str(tmp_path / "dflash" / "model.safetensors"))
    assert conf["architectures"] == ["DFlashDraftModel"] and conf["markov_rank"] == 0
    assert conf["enable_confidence_head"] is False
    assert {k: tuple(v.shape) for k, v in t.items()} == expected_tensors(markov=False)
    # DFlash with a trained confidence head (on h alone): kept, flagged, ignored by SGLang's DFlash
    save_serving(make_tiny_draft(markov_head=False), tmp_path / "dflash_conf")
    conf = json.loads((tmp_path / "dflash_conf" / "config.json").read_text())
    t = load_file(str(tmp_path / "dflash_conf" / "model.safetensors"))
    assert conf["enable_confidence_head"] is True and conf["confidence_head_with_markov"] is False
    assert tuple(t["confidence_head.proj.weight"].shape) == (1, 32)


def test_load_serving_errors(make_tiny_draft, tmp_path):
    with pytest.raises(ServingFormatError, match="config.json"):
        load_serving(tmp_path, torch.zeros(97, 32), torch.zeros(97, 32))
    save_serving(make_tiny_draft(), tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["dflash_config"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ServingFormatError, match="dflash_config"):
        load_serving(tmp_path, torch.zeros(97, 32), torch.zeros(97, 32))


def test_draft_block_matches_training_forward(make_tiny_draft):
    """Greedy drafting = the teacher-forced training forward fed with the drafted tokens."""
    model = make_tiny_draft().eval()
    g = torch.Generator().manual_seed(0)
    s, a = 20, 9
    hidden = torch.randn(1, s, 2, 32, generator=g)
    ids = torch.randint(0, 96, (1, s), generator=g)
    ctx = model.context(hidden)  # [1, S, H]; draft_block must only use positions < a
    tokens, conf, probs = model.draft_block(ctx, torch.arange(s), int(ids[0, a]), a, temperature=0.0)
    b = model.cfg.block_size
    assert tokens.shape == (b,) and conf.shape == (b,) and probs.shape == (b, 97)
    forced = ids.clone()
    forced[0, a + 1 : a + b] = tokens[:-1]  # prev_j = x[a+j] = the token drafted at slot j-1
    with torch.no_grad():
        out = model(forced, hidden, torch.tensor([[a]]), torch.ones(1, 1, dtype=torch.bool)).hidden[0, 0]
        prev = forced[0, a : a + b]
        logits = model.block_logits(out, prev)
        torch.testing.assert_close(conf, model.confidence_logits(out, prev))
    assert torch.equal(logits.argmax(-1), tokens)
    assert torch.equal(probs.argmax(-1), tokens) and torch.allclose(probs.sum(-1), torch.ones(b))
    # context strictly before the block: rows >= a are ignored
    ctx2 = ctx.clone()
    ctx2[:, a:] = 0
    again = model.draft_block(ctx2, torch.arange(s), int(ids[0, a]), a)
    assert torch.equal(again.tokens, tokens)


def test_draft_block_sampling_is_seeded(make_tiny_draft):
    model = make_tiny_draft().eval()
    ctx = model.context(torch.randn(1, 8, 2, 32))
    run = lambda seed: model.draft_block(ctx, torch.arange(8), 3, 8, 1.0, torch.Generator().manual_seed(seed))
    r1, r2 = run(0), run(0)
    assert torch.equal(r1.tokens, r2.tokens)
    assert torch.allclose(r1.probs.sum(-1), torch.ones(4)) and (r1.probs > 0).all()
