"""`evaluate.run(params)`: prepared eval split -> metrics JSON + per-slot TSV; errors are loud."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evaluate_speculative import BLOCK, make_drafter_dir
from transformers import AutoTokenizer

from dspark_offline.config import Params
from dspark_offline.data.prepared import SplitArrays, write_prepared
from dspark_offline.evaluate import run, runner
from dspark_offline.evaluate.lossless import LosslessnessError
from dspark_offline.evaluate.prompts import PromptError, prompt_from_sample
from dspark_offline.evaluate.speculative import RoundStats, SpecResult

QUESTIONS = ["What is 2 + 2?", "Name a colour.", "Say hello."]


def _sample(tok, question: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
    )
    reply = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = np.array(prompt + reply, dtype=np.int32)
    mask = np.array([0] * len(prompt) + [1] * len(reply), dtype=np.uint8)
    return ids, mask


def _prepared(tmp_path, target_dir, eval_questions, unsupervised: int = 0):
    tok = AutoTokenizer.from_pretrained(target_dir)
    train = [_sample(tok, "Hi", "Hello!")]
    evals = [_sample(tok, q, "Fine.") for q in eval_questions]
    evals += [(ids, np.zeros_like(mask)) for ids, mask in evals[:unsupervised]]  # no prompt in these
    splits = {
        "train": SplitArrays.from_samples([i for i, _ in train], [m for _, m in train], [0], ["t0"]),
        "eval": SplitArrays.from_samples(
            [i for i, _ in evals],
            [m for _, m in evals],
            list(range(1, len(evals) + 1)),
            [f"e{k}" for k in range(len(evals))],
        ),
    }
    out = tmp_path / "prepared"
    write_prepared(out, splits, meta={"source": "test"}, report={})
    return out


def _params(tmp_path, target_dir, prepared, drafter, **evaluate) -> Params:
    return Params.model_validate(
        {
            "target": {"path": str(target_dir)},
            "prepare": {"output": str(prepared)},
            "evaluate": {
                "drafter": str(drafter),
                "num_prompts": 2,
                "max_new_tokens": 8,
                "output": str(tmp_path / "out" / "eval.json"),
                "per_slot_output": str(tmp_path / "out" / "per_slot.tsv"),
                **evaluate,
            },
        }
    )


def test_run_writes_metrics_and_per_slot_plot(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS, unsupervised=1)
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    params = _params(tmp_path, tiny_qwen3_dir, prepared, drafter, num_prompts=5)
    metrics = run(params)
    on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert on_disk == metrics
    assert metrics["lossless"] is True and metrics["num_prompts"] == 3 and metrics["prompts_skipped"] == 1
    assert metrics["tau"] >= 1.0 and metrics["block_size"] == BLOCK
    assert metrics["draft_tokens_proposed"] == BLOCK * metrics["num_rounds"]
    assert 0 <= metrics["draft_tokens_accepted"] <= metrics["draft_tokens_proposed"]
    assert metrics["ms_per_token_spec"] > 0 and metrics["ms_per_token_target"] > 0 and metrics["speedup"] > 0
    assert metrics["generated_tokens"] <= 3 * 8
    rows = (tmp_path / "out" / "per_slot.tsv").read_text().splitlines()
    assert rows[0] == "slot\tacceptance_rate\tproposed"
    assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(BLOCK))
    assert [float(r.split("\t")[1]) for r in rows[1:]] == pytest.approx(
        [v for v in metrics["per_slot_acceptance"].values()], abs=1e-6
    )


def test_run_at_temperature_reports_no_losslessness(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS[:1])
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    metrics = run(
        _params(tmp_path, tiny_qwen3_dir, prepared, drafter, temperature=0.9, confidence_threshold=0.3)
    )
    assert metrics["lossless"] is None and metrics["temperature"] == 0.9 and metrics["num_prompts"] == 1


def test_run_raises_on_a_lossless_violation(tmp_path, tiny_qwen3_dir, monkeypatch):
    """A speculative output that differs from the target's greedy decode is an error, not a metric."""
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS[:2])
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    real = runner.speculative_decode

    def corrupted(*args, **kwargs):
        out = real(*args, **kwargs)
        if len(out.tokens) > 2:
            out.tokens[2] = (out.tokens[2] + 1) % 1000
        return SpecResult(out.tokens, out.rounds or [RoundStats(0, 0)])

    monkeypatch.setattr(runner, "speculative_decode", corrupted)
    with pytest.raises(LosslessnessError, match=r"prompt 0 \(eval sample_id 1\).*position 2"):
        run(_params(tmp_path, tiny_qwen3_dir, prepared, drafter))
    assert not (tmp_path / "out" / "eval.json").exists()


def test_run_refuses_missing_inputs(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, [])
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    with pytest.raises(PromptError, match="eval split is empty"):
        run(_params(tmp_path, tiny_qwen3_dir, prepared, drafter))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run(_params(tmp_path, tiny_qwen3_dir, prepared, tmp_path / "nowhere"))


def test_prompt_is_the_prefix_before_the_first_supervised_token():
    ids = np.arange(6)
    assert prompt_from_sample(ids, np.array([0, 0, 0, 1, 1, 0])).tolist() == [0, 1, 2]
    assert prompt_from_sample(ids, np.zeros(6)) is None
    assert prompt_from_sample(ids, np.ones(6)) is None


def test_run_refuses_a_prompt_longer_than_the_target_positions(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS[:1])
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    params = _params(tmp_path, tiny_qwen3_dir, prepared, drafter, max_new_tokens=2040)  # positions: 2048
    with pytest.raises(runner.PromptTooLongError, match=r"eval prompt 0 \(sample_id 1\).*2048"):
        run(params)
