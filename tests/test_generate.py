"""The generate stage on tiny random targets: batched decoding == single-sequence decoding, the
loss mask covers exactly the answer (+ the stop token), bad prompts and caps are counted, the eval
split is copied byte for byte, resume never mixes runs, and `dump` reads the right directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_offline import dump
from dspark_offline.config import Params
from dspark_offline.data.prepared import PreparedSplit, SplitArrays, write_prepared
from dspark_offline.evaluate.target import target_decode
from dspark_offline.generate import run
from dspark_offline.generate.chunks import ChunkDir
from dspark_offline.generate.decode import decode_batch
from dspark_offline.generate.runner import DISABLED_MARKER, GenerateError
from dspark_offline.generate.stops import StopTokenError, end_of_turn_id
from dspark_offline.store import open_store

QUESTIONS = [
    "What is 2 + 2?",
    "Name a colour.",
    "Write a haiku about autumn, please, with a title and a short explanation of the imagery.",
    "Say hello.",
    "Explain speculative decoding in one sentence.",
    "List three prime numbers.",
    "Why is the sky blue?",
]


def _sample(tok, question: str, answer: str = "Fine.") -> tuple[np.ndarray, np.ndarray]:
    """A prepared sample: ChatML prompt (mask 0) + answer and <|im_end|> (mask 1)."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
    )
    reply = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return (
        np.array(prompt + reply, dtype=np.int32),
        np.array([0] * len(prompt) + [1] * len(reply), dtype=np.uint8),
    )


def make_prepared(out: Path, tok, train: list[tuple], num_eval: int = 2, max_length: int = 256) -> Path:
    evals = [_sample(tok, q, "Okay.") for q in QUESTIONS[:num_eval]]
    n = len(train)
    splits = {
        "train": SplitArrays.from_samples(
            [i for i, _ in train], [m for _, m in train], list(range(n)), [f"t{k}" for k in range(n)]
        ),
        "eval": SplitArrays.from_samples(
            [i for i, _ in evals],
            [m for _, m in evals],
            list(range(n, n + len(evals))),
            [f"e{k}" for k in range(len(evals))],
        ),
    }
    write_prepared(out, splits, {"source": "test", "max_length": max_length}, {})
    return out


def gen_params(target_dir, prepared, output, max_length: int = 256, **generate) -> Params:
    cfg = {"enabled": True, "output": str(output), "max_new_tokens": 10, "batch_size": 3, "chunk_samples": 4}
    cfg.update(generate)
    return Params.model_validate(
        {
            "target": {"path": str(target_dir), "dtype": "float32", "device": "cpu"},
            "prepare": {"output": str(prepared), "max_length": max_length},
            "generate": cfg,
        }
    )


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def model(chatty_llama_dir):
    return AutoModelForCausalLM.from_pretrained(chatty_llama_dir, dtype=torch.float32).eval()


def _prompts(tok) -> list[torch.Tensor]:
    return [
        torch.tensor(
            _sample(tok, q)[0][: -len(tok("Fine.<|im_end|>", add_special_tokens=False)["input_ids"])],
            dtype=torch.int64,
        )
        for q in QUESTIONS
    ]


# --- decoding -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_greedy_equals_single_sequence_decode(arch, request, tok):
    target_dir = request.getfixturevalue(f"chatty_{arch}_dir")
    m = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 3  # really left-padded
    budgets = [3, 17, 9, 25, 1, 12, 20]  # rows leave the batch (and the KV cache) at different steps
    got = decode_batch(m, prompts, budgets, frozenset(), pad_id=0)
    for p, b, g in zip(prompts, budgets, got):
        assert g == target_decode(m, p, b, frozenset()), len(p)


def test_batched_stops_on_stop_ids_and_keeps_the_stop_token(model, tok):
    prompts = _prompts(tok)
    free = decode_batch(model, prompts, [15] * len(prompts), frozenset(), pad_id=0)
    stop = free[2][4]  # a token prompt 2 emits at step 5
    got = decode_batch(model, prompts, [15] * len(prompts), frozenset({stop}), pad_id=0)
    for f, g in zip(free, got):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:cut]
    assert got[2][-1] == stop and len(got[2]) <= 5


def test_batched_sampling_equals_single_sequence_sampling(model, tok):
    prompts = _prompts(tok)[:4]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    got = decode_batch(model, prompts, [8] * 4, frozenset(), pad_id=0, temperature=0.9, generators=gens)
    for i, p in enumerate(prompts):
        ref = target_decode(model, p, 8, frozenset(), 0.9, torch.Generator().manual_seed(100 + i))
        assert got[i] == ref


def test_end_of_turn_is_found_from_the_template(tok):
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


# --- the stage ------------------------------------------------------------------------------


def test_generated_samples_are_prompt_plus_answer_with_the_answer_supervised(
    chatty_llama_dir, tok, model, tmp_path
):
    train = [_sample(tok, q, "An answer written by someone else.") for q in QUESTIONS]
    prepared = make_prepared(tmp_path / "prep", tok, train)
    out = run(gen_params(chatty_llama_dir, prepared, tmp_path / "gen"))
    src, gen = PreparedSplit.load(prepared, "train"), PreparedSplit.load(out, "train")
    assert list(gen.sample_ids) == list(src.sample_ids) and gen.source_ids == src.source_ids
    for i in range(len(gen)):
        ids, mask = gen[i]
        s_ids, s_mask = src[i]
        p = int(np.flatnonzero(s_mask)[0])  # first-turn prompt = up to the first supervised token
        assert np.array_equal(ids[:p], s_ids[:p]) and not mask[:p].any() and mask[p:].all()
        assert list(ids[p:]) == target_decode(
            model, torch.from_numpy(s_ids[:p].astype(np.int64)), 10, frozenset({2})
        )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["generated"]["source"]["fingerprint"] == src.fingerprint
    assert meta["generated"]["params"]["max_new_tokens"] == 10
    report = json.loads((out / "report.json").read_text())
    assert (
        report["samples"] == len(QUESTIONS)
        and report["stop_reasons"]["max_new_tokens"] == report["truncated"]
    )
    assert not (tmp_path / "gen.partial").exists()  # chunks are removed once the output is complete


def test_eval_split_is_copied_byte_for_byte(chatty_llama_dir, tok, tmp_path):
    prepared = make_prepared(tmp_path / "prep", tok, [_sample(tok, q) for q in QUESTIONS[:3]], num_eval=3)
    out = run(gen_params(chatty_llama_dir, prepared, tmp_path / "gen", max_new_tokens=3))
    files = sorted(p.name for p in (prepared / "eval").iterdir())
    assert files == sorted(p.name for p in (out / "eval").iterdir())
    for name in files:
        assert (prepared / "eval" / name).read_bytes() == (out / "eval" / name).read_bytes(), name
    meta_src, meta_gen = (json.loads((d / "meta.json").read_text()) for d in (prepared, out))
    assert meta_src["splits"]["eval"] == meta_gen["splits"]["eval"]


def _with_eos(tiny_dir: Path, out: Path, eos: list[int]) -> Path:
    """A copy of the tiny target whose generation config lists extra EOS ids."""
    shutil.copytree(tiny_dir, out)
    cfg = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps(dict(cfg, eos_token_id=eos)))
    return out


def test_eos_and_extra_stop_tokens_end_answers_and_are_supervised(chatty_llama_dir, tok, model, tmp_path):
    train = [_sample(tok, q) for q in QUESTIONS[:4]]
    prepared = make_prepared(tmp_path / "prep", tok, train)
    prompts = [torch.from_numpy(i[: int(np.flatnonzero(m)[0])].astype(np.int64)) for i, m in train]
    free = [target_decode(model, p, 10, frozenset()) for p in prompts]
    eos_tok = free[0][3]  # prompt 0 ends on a (made-up) EOS at step 4 at the latest
    extra_tok = next(t for t in free[1] if t != eos_tok and t not in free[0][:4])  # prompt 1 on a stop token
    target = _with_eos(chatty_llama_dir, tmp_path / "target", [2, eos_tok])
    out = run(gen_params(target, prepared, tmp_path / "gen", stop_tokens=[extra_tok]))
    gen = PreparedSplit.load(out, "train")
    stops = {"eos": 0, "stop_token": 0}
    for i, f in enumerate(free):
        ids, mask = gen[i]
        answer = list(ids[len(prompts[i]) :])
        cut = next((k + 1 for k, t in enumerate(f) if t in (eos_tok, extra_tok, 2)), len(f))
        assert answer == f[:cut] and mask[len(prompts[i]) :].all() and int(mask.sum()) == len(answer)
        if answer[-1] in (eos_tok, 2):
            stops["eos"] += 1
        elif answer[-1] == extra_tok:
            stops["stop_token"] += 1
    report = json.loads((out / "report.json").read_text())
    assert stops["eos"] >= 1 and stops["stop_token"] >= 1
    assert {k: report["stop_reasons"][k] for k in stops} == stops


def test_multi_token_stop_string_is_refused(chatty_llama_dir, tok, tmp_path):
    prepared = make_prepared(tmp_path / "prep", tok, [_sample(tok, QUESTIONS[0])])
    with pytest.raises(StopTokenError, match="generate.stop_tokens"):
        run(gen_params(chatty_llama_dir, prepared, tmp_path / "gen", stop_tokens=["two words here"]))


def test_bad_prompts_and_capped_answers_are_counted_not_fatal(chatty_llama_dir, tok, tmp_path):
    good, long_q = _sample(tok, QUESTIONS[0]), _sample(tok, " ".join(["word"] * 80))
    no_sup = (good[0], np.zeros_like(good[1]))
    starts_sup = (good[0], np.ones_like(good[1]))
    train = [good, no_sup, long_q, starts_sup, _sample(tok, QUESTIONS[1])]
    max_length = len(good[0]) + 4  # room for 4 answer tokens after the short prompts
    prepared = make_prepared(tmp_path / "prep", tok, train, max_length=max_length)
    out = run(
        gen_params(chatty_llama_dir, prepared, tmp_path / "gen", max_length=max_length, max_new_tokens=30)
    )
    gen = PreparedSplit.load(out, "train")
    assert list(gen.sample_ids) == [0, 4]
    assert all(len(gen[i][0]) <= max_length for i in range(len(gen)))
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["sample_ids"] == {
        "no_supervised_token": [1],
        "empty_prompt": [3],
        "prompt_too_long": [2],
    }
    assert report["stop_reasons"]["max_length"] + report["stop_reasons"]["eos"] == 2
    assert report["truncated"] == report["stop_reasons"]["max_length"]


def test_every_prompt_bad_is_an_error(chatty_llama_dir, tok, tmp_path):
    ids, mask = _sample(tok, QUESTIONS[0])
    prepared = make_prepared(tmp_path / "prep", tok, [(ids, np.zeros_like(mask))])
    with pytest.raises(GenerateError, match="no_supervised_token"):
        run(gen_params(chatty_llama_dir, prepared, tmp_path / "gen"))


def same_files(a: Path, b: Path) -> None:
    files = sorted(x.relative_to(a) for x in a.rglob("*") if x.is_file())
    assert files == sorted(x.relative_to(b) for x in b.rglob("*") if x.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_resume_uses_saved_chunks_and_discards_other_params(
    chatty_llama_dir, tok, tmp_path, monkeypatch, capsys
):
    from dspark_offline.generate import runner

    prepared = make_prepared(tmp_path / "prep", tok, [_sample(tok, q) for q in QUESTIONS])
    full = run(gen_params(chatty_llama_dir, prepared, tmp_path / "full"))
    params = gen_params(chatty_llama_dir, prepared, tmp_path / "gen")  # 7 prompts, 2 chunks of 4

    real_save = ChunkDir.save

    def save_then_stop(self, k, result):
        real_save(self, k, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(ChunkDir, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(params)
    monkeypatch.setattr(ChunkDir, "save", real_save)
    assert [p.name for p in (tmp_path / "gen.partial").glob("chunk-*.npz")] == ["chunk-00000.npz"]
    assert not (tmp_path / "gen").exists()

    calls = []
    real_chunk = runner._generate_chunk
    monkeypatch.setattr(runner, "_generate_chunk", lambda *a: calls.append(list(a[3])) or real_chunk(*a))
    run(params)
    assert len(calls) == 1 and len(calls[0]) == 3  # only the second chunk was generated again
    same_files(full, tmp_path / "gen")

    # Other params: saved chunks are discarded with a message, never mixed in.
    (tmp_path / "gen.partial").mkdir()
    (tmp_path / "gen.partial" / "state.json").write_text(json.dumps({"fingerprint": "0123"}))
    (tmp_path / "gen.partial" / "chunk-00000.npz").write_bytes(b"junk")
    capsys.readouterr()
    calls.clear()
    run(gen_params(chatty_llama_dir, prepared, tmp_path / "gen", max_new_tokens=4))
    assert "discarding 1 chunk(s)" in capsys.readouterr().err and len(calls) == 2


# --- where dump reads ---------------------------------------------------------------------------


def test_disabled_writes_a_marker_and_dump_reads_prepare_output(chatty_llama_dir, tok, tmp_path):
    prepared = make_prepared(tmp_path / "prep", tok, [_sample(tok, q) for q in QUESTIONS[:3]])
    dump_cfg = {"layer_ids": [0, 2], "top_k": 4, "shard_tokens": 256, "chunk_tokens": 16, "batch_tokens": 512}
    for enabled in (False, True):
        p = gen_params(chatty_llama_dir, prepared, tmp_path / "gen", enabled=enabled, max_new_tokens=4)
        p = p.model_copy(
            update={
                "dump": p.dump.model_copy(update={**dump_cfg, "store": str(tmp_path / f"{enabled}.zarr")})
            }
        )
        out = run(p)
        if not enabled:
            assert sorted(x.name for x in out.iterdir()) == [DISABLED_MARKER]
            assert p.train_data_dir() == str(prepared)
        else:
            assert p.train_data_dir() == str(tmp_path / "gen")
        manifest = open_store(dump.run(p)).manifest
        expected = PreparedSplit.load(p.train_data_dir(), "train")
        assert manifest.data.prepared_path == p.train_data_dir()
        assert manifest.data.prepared_fingerprint == expected.fingerprint
        assert manifest.data.num_tokens == int(expected.lengths.sum())


def test_output_must_differ_from_prepare_output_and_not_clobber_other_dirs(chatty_llama_dir, tok, tmp_path):
    with pytest.raises(ValueError, match="generate.output"):
        Params.model_validate({"prepare": {"output": "data/x"}, "generate": {"output": "data/x"}})
    prepared = make_prepared(tmp_path / "data" / "prep", tok, [_sample(tok, QUESTIONS[0])])
    for enabled in (True, False):  # generate.output = the parent of the prepared data: refused, untouched
        with pytest.raises(GenerateError, match="refusing to replace"):
            run(gen_params(chatty_llama_dir, prepared, tmp_path / "data", enabled=enabled))
        assert PreparedSplit.load(prepared, "train")


def test_vllm_engine_without_vllm_names_the_param(tok, tmp_path):
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    from dspark_offline.config import GenerateConfig, TargetConfig
    from dspark_offline.generate.engine import make_engine

    with pytest.raises(ImportError, match=r"dump.backend='vllm'.*dspark-offline\[vllm\]"):
        make_engine(TargetConfig(path=str(tmp_path)), GenerateConfig(enabled=True), "vllm")
