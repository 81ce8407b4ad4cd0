"""`evaluate.run(params)`: prepared eval split -> metrics JSON + per-slot and per-prompt TSVs, the
prompt-lookup baseline and an optional second drafter beside the drafter; errors are loud."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evaluate_speculative import BLOCK, make_drafter_dir
from transformers import AutoTokenizer

from dspark_offline.config import Params
from dspark_offline.data.prepared import SplitArrays, write_prepared
from dspark_offline.evaluate import run, runner
from dspark_offline.evaluate.bootstrap import tau_interval, tau_ratio_interval
from dspark_offline.evaluate.lossless import LosslessnessError
from dspark_offline.evaluate.prompt_lookup import PromptLookupDrafter
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
                "per_prompt_output": str(tmp_path / "out" / "per_prompt.tsv"),
                **evaluate,
            },
        }
    )


def test_run_writes_metrics_and_per_slot_plot(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS, unsupervised=1)
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    params = _params(tmp_path, tiny_qwen3_dir, prepared, drafter, num_prompts=5)
    with pytest.warns(runner.FewerPromptsWarning):
        metrics = run(params)
    on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert on_disk == metrics
    assert metrics["lossless"] is True and metrics["num_prompts"] == 3 and metrics["prompts_skipped"] == 1
    assert metrics["num_prompts_requested"] == 5 and metrics["prompts_shortfall"] == 2
    assert metrics["tau"] >= 1.0 and metrics["block_size"] == BLOCK
    assert metrics["draft_tokens_proposed"] == BLOCK * metrics["num_rounds"]
    assert 0 <= metrics["draft_tokens_accepted"] <= metrics["draft_tokens_proposed"]
    for name in ("target", "drafter", "prompt_lookup"):
        assert metrics[f"ms_per_token_{name}"] > 0
    assert metrics["speedup"] > 0 and metrics["prompt_lookup"]["speedup"] > 0
    assert metrics["generated_tokens"] == metrics["target_generated_tokens"] <= 3 * 8
    assert metrics["prompt_lookup"]["generated_tokens"] == metrics["generated_tokens"]  # T = 0: same output
    rows = [r.split("\t") for r in (tmp_path / "out" / "per_slot.tsv").read_text().splitlines()]
    assert rows[0] == [
        "slot",
        "acceptance_rate",
        "proposed",
        "prompt_lookup_acceptance_rate",
        "prompt_lookup_proposed",
    ]
    assert [int(r[0]) for r in rows[1:]] == list(range(BLOCK))
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(
        [v for v in metrics["per_slot_acceptance"].values()], abs=1e-6
    )
    assert [float(r[3]) for r in rows[1:]] == pytest.approx(
        [v or 0.0 for v in metrics["prompt_lookup"]["per_slot_acceptance"].values()], abs=1e-6
    )
    assert sum(int(r[4]) for r in rows[1:]) == metrics["prompt_lookup"]["draft_tokens_proposed"]


def _read_tsv(path) -> list[dict[str, str]]:
    header, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(header, row)) for row in rows]


def test_every_tau_and_interval_is_rederived_from_the_per_prompt_table(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS)
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    metrics = run(_params(tmp_path, tiny_qwen3_dir, prepared, drafter, num_prompts=3, max_new_tokens=24))
    table = _read_tsv(tmp_path / "out" / "per_prompt.tsv")
    assert [int(r["prompt_index"]) for r in table] == [0, 1, 2]
    assert [int(r["sample_id"]) for r in table] == [1, 2, 3]
    col = {
        k: np.array([int(r[k]) for r in table])
        for k in table[0]
        if k.endswith(("_rounds", "_committed", "_tokens"))
    }
    for name, key in (("drafter", "tau"), ("prompt_lookup", "tau_prompt_lookup")):
        assert metrics[key] == pytest.approx(col[f"{name}_committed"].sum() / col[f"{name}_rounds"].sum())
        assert metrics[f"{key}_ci95"] == pytest.approx(
            list(tau_interval(col[f"{name}_committed"], col[f"{name}_rounds"], seed=0))
        )
        assert (col[f"{name}_tokens"] == col["target_tokens"]).all()
    assert metrics["tau_vs_prompt_lookup"] == pytest.approx(metrics["tau"] / metrics["tau_prompt_lookup"])
    assert metrics["tau_vs_prompt_lookup_ci95"] == pytest.approx(
        list(
            tau_ratio_interval(
                col["drafter_committed"],
                col["drafter_rounds"],
                col["prompt_lookup_committed"],
                col["prompt_lookup_rounds"],
                seed=0,
            )
        )
    )
    assert metrics["tau_ci95"][0] <= metrics["tau_ci95"][1]
    assert metrics["bootstrap"]["resamples"] == 2000 and "tau_compare" not in metrics


def test_compare_drafter_is_decoded_and_paired(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS)
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    other = make_drafter_dir(tiny_qwen3_dir, tmp_path / "other", confidence_head=False)
    metrics = run(_params(tmp_path, tiny_qwen3_dir, prepared, drafter, num_prompts=3, compare=str(other)))
    assert metrics["compare"]["drafter"] == str(other) and metrics["tau_compare"] >= 1.0
    assert metrics["tau_vs_compare"] == pytest.approx(metrics["tau"] / metrics["tau_compare"])
    assert len(metrics["tau_compare_ci95"]) == 2 and metrics["ms_per_token_compare"] > 0
    assert {"compare_rounds", "compare_committed"} <= set(_read_tsv(tmp_path / "out" / "per_prompt.tsv")[0])
    # the drafter against itself: identical rounds on every prompt, so the paired ratio is exactly 1
    same = run(_params(tmp_path, tiny_qwen3_dir, prepared, drafter, num_prompts=3, compare=str(drafter)))
    assert same["tau_vs_compare"] == 1.0 and same["tau_vs_compare_ci95"] == [1.0, 1.0]


def test_fewer_prompts_than_asked_is_loud(tmp_path, tiny_qwen3_dir, capsys):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS[:2])
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    with pytest.warns(
        runner.FewerPromptsWarning, match="evaluate.num_prompts=5 but .* only 2 usable prompts"
    ):
        metrics = run(_params(tmp_path, tiny_qwen3_dir, prepared, drafter, num_prompts=5))
    assert (metrics["num_prompts"], metrics["num_prompts_requested"], metrics["prompts_shortfall"]) == (
        2,
        5,
        3,
    )
    assert "WARNING: 2 prompts, 3 fewer than evaluate.num_prompts=5" in capsys.readouterr().out


def test_run_at_temperature_reports_no_losslessness(tmp_path, tiny_qwen3_dir):
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS[:2])
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    metrics = run(
        _params(tmp_path, tiny_qwen3_dir, prepared, drafter, temperature=0.9, confidence_threshold=0.3)
    )
    assert metrics["lossless"] is None and metrics["temperature"] == 0.9 and metrics["num_prompts"] == 2
    assert metrics["tau_prompt_lookup"] >= 1.0 and metrics["prompt_lookup"]["generated_tokens"] >= 2


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
    with pytest.raises(LosslessnessError, match=r"prompt 0 \(eval sample_id 1\): drafter .*position 2"):
        run(_params(tmp_path, tiny_qwen3_dir, prepared, drafter))
    assert not (tmp_path / "out" / "eval.json").exists()


def test_run_raises_on_a_prompt_lookup_lossless_violation(tmp_path, tiny_qwen3_dir, monkeypatch):
    """The baseline is checked token for token too, and the error names it."""
    prepared = _prepared(tmp_path, tiny_qwen3_dir, QUESTIONS[:2])
    drafter = make_drafter_dir(tiny_qwen3_dir, tmp_path / "drafter")
    real = runner.speculative_decode

    def corrupted(model, decoder, *args, **kwargs):
        out = real(model, decoder, *args, **kwargs)
        if isinstance(decoder, PromptLookupDrafter) and len(out.tokens) > 1 and kwargs["max_new_tokens"] > 2:
            out.tokens[1] = (out.tokens[1] + 1) % 1000
        return out

    monkeypatch.setattr(runner, "speculative_decode", corrupted)
    with pytest.raises(LosslessnessError, match=r"prompt 0 \(eval sample_id 1\): prompt_lookup .*position 1"):
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
    params = _params(
        tmp_path, tiny_qwen3_dir, prepared, drafter, num_prompts=1, max_new_tokens=2040
    )  # 2048 positions
    with pytest.raises(runner.PromptTooLongError, match=r"eval prompt 0 \(sample_id 1\).*2048"):
        run(params)
