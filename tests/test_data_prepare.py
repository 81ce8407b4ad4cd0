"""End to end `prepare.run`: determinism, splits, format equivalence, counts, atomic output, loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dspark_offline.config import Params
from dspark_offline.data.errors import EmptySelectionError, PreparedDataError, SourceError
from dspark_offline.data.prepared import PreparedSplit
from dspark_offline.prepare import FewerSamplesWarning, run


def _conv(i: int) -> list[tuple[str, str]]:
    turns = [
        ("user", f"Question number {i}: what is {i} plus {i}?"),
        ("assistant", f"{i} plus {i} is {2 * i}."),
    ]
    if i % 3 == 0:
        turns = [("system", "Be exact.")] + turns + [("user", "Sure?"), ("assistant", f"Yes, {2 * i}.")]
    return turns


def _write_jsonl(path: Path, n: int, extra_lines: list[str] = ()) -> Path:
    lines = [
        json.dumps({"id": f"c{i}", "conversations": [{"role": r, "content": c} for r, c in _conv(i)]})
        for i in range(n)
    ]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


def _write_sharegpt(path: Path, n: int) -> Path:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    recs = [
        {"id": f"c{i}", "conversations": [{"from": names[r], "value": c} for r, c in _conv(i)]}
        for i in range(n)
    ]
    path.write_text(json.dumps(recs, indent=1))
    return path


def _params(embedded_target_dir: Path, source: Path, out: Path, **prepare) -> Params:
    p = Params()
    p.target.path = str(embedded_target_dir)
    p.prepare = p.prepare.model_copy(
        update=dict(
            {
                "source": str(source),
                "output": str(out),
                "num_samples": 12,
                "num_eval_samples": 4,
                "max_length": 128,
            },
            **prepare,
        )
    )
    return p


def _arrays(out: Path, split: str) -> dict[str, np.ndarray]:
    return {k: np.load(out / split / f"{k}.npy") for k in ("input_ids", "loss_mask", "offsets", "sample_ids")}


def test_prepare_writes_disjoint_splits_and_counts(tmp_path, embedded_target_dir, capsys):
    src = _write_jsonl(
        tmp_path / "d.jsonl",
        30,
        ['{"id": "bad", "conversations": [{"role": "user", "content": 5}]}', "{oops"],
    )
    out = run(_params(embedded_target_dir, src, tmp_path / "prep"))
    train, ev = PreparedSplit.load(out, "train"), PreparedSplit.load(out, "eval")
    assert (len(train), len(ev)) == (12, 4)
    assert train.sample_ids.tolist() == list(range(12)) and ev.sample_ids.tolist() == list(range(12, 16))
    assert not set(train.source_ids) & set(ev.source_ids)
    assert train.fingerprint == ev.fingerprint == train.meta["fingerprint"]
    for split in (train, ev):
        for i in range(len(split)):
            ids, mask = split[i]
            assert ids.dtype == np.int32 and mask.dtype == np.uint8 and len(ids) == split.lengths[i]
            first = int(np.argmax(mask))
            assert mask.any() and first > 0
    # an eval prompt = tokens up to and including the first assistant header
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_target_dir)
    ids, mask = ev[0]
    assert tok.decode(ids[: int(np.argmax(mask))]).endswith("<|im_start|>assistant\n")
    report = json.loads((out / "report.json").read_text())
    assert report["records_read"] == 32
    assert report["skipped"]["counts"] == {"malformed_json": 1, "non_string_content": 1}
    assert report["skipped"]["examples"]["malformed_json"][0]["where"] == "line 32"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == int(train.lengths.sum())
    assert meta["splits"]["train"]["supervised_tokens"] == int(
        sum(train[i][1].sum() for i in range(len(train)))
    )
    assert meta["tokenizer_hash"] and meta["chat_template_hash"] and meta["max_length"] == 128
    printed = capsys.readouterr().out
    assert "malformed_json" in printed and "non_string_content" in printed and "supervised" in printed
    assert not list(tmp_path.glob(".prep.*"))  # no temporary directory left behind


def test_same_params_same_arrays_and_seed_changes_selection(tmp_path, embedded_target_dir):
    src = _write_jsonl(tmp_path / "d.jsonl", 40)
    a = run(_params(embedded_target_dir, src, tmp_path / "a"))
    b = run(_params(embedded_target_dir, src, tmp_path / "b"))
    c = run(_params(embedded_target_dir, src, tmp_path / "c", seed=1))
    for split in ("train", "eval"):
        xa, xb = _arrays(a, split), _arrays(b, split)
        assert all(np.array_equal(xa[k], xb[k]) for k in xa)
    fp = lambda d: json.loads((d / "meta.json").read_text())["fingerprint"]
    assert fp(a) == fp(b) != fp(c)


def test_jsonl_and_sharegpt_give_the_same_tokens(tmp_path, embedded_target_dir):
    a = run(
        _params(embedded_target_dir, _write_jsonl(tmp_path / "d.jsonl", 20), tmp_path / "a", format="jsonl")
    )
    b = run(
        _params(
            embedded_target_dir, _write_sharegpt(tmp_path / "d.json", 20), tmp_path / "b", format="sharegpt"
        )
    )
    for split in ("train", "eval"):
        xa, xb = _arrays(a, split), _arrays(b, split)
        assert all(np.array_equal(xa[k], xb[k]) for k in xa)
    assert PreparedSplit.load(a, "train").fingerprint == PreparedSplit.load(b, "train").fingerprint


def test_fewer_samples_warns_and_zero_is_an_error(tmp_path, embedded_target_dir):
    src = _write_jsonl(tmp_path / "d.jsonl", 6)
    with pytest.warns(FewerSamplesWarning, match="only 6 samples"):
        out = run(_params(embedded_target_dir, src, tmp_path / "few"))
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["splits"]["train"]["samples"], meta["splits"]["eval"]["samples"]) == (5, 1)
    assert json.loads((out / "report.json").read_text())["warnings"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "conversations": [{"role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(EmptySelectionError, match="bad.jsonl"):
        run(_params(embedded_target_dir, bad, tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    # everything truncated away: nothing supervised survives
    with pytest.raises(EmptySelectionError, match="no_supervised_tokens"):
        run(_params(embedded_target_dir, src, tmp_path / "short", max_length=8))
    with pytest.raises(SourceError, match="missing.jsonl"):
        run(_params(embedded_target_dir, tmp_path / "missing.jsonl", tmp_path / "x"))


def test_rerun_replaces_output_and_load_refuses_partial_or_altered(tmp_path, embedded_target_dir):
    src = _write_jsonl(tmp_path / "d.jsonl", 30)
    out = tmp_path / "prep"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run(_params(embedded_target_dir, src, out))
    assert not (out / "stale.txt").exists()
    with pytest.raises(PreparedDataError, match="not found"):
        PreparedSplit.load(tmp_path / "nowhere", "train")
    with pytest.raises(PreparedDataError, match="unknown split"):
        PreparedSplit.load(out, "validation")
    ids = np.load(out / "train" / "input_ids.npy")
    ids[3] += 1
    np.save(out / "train" / "input_ids.npy", ids)
    with pytest.raises(PreparedDataError, match="fingerprint"):
        PreparedSplit.load(out, "train")
    PreparedSplit.load(out, "eval")  # the other split is untouched and still loads
    (out / "eval" / "offsets.npy").unlink()
    with pytest.raises(PreparedDataError, match=r"eval/offsets\.npy"):
        PreparedSplit.load(out, "eval")
    (out / "meta.json").unlink()
    with pytest.raises(PreparedDataError, match="meta.json"):
        PreparedSplit.load(out, "train")


def test_embedded_sharegpt_end_to_end(tmp_path):
    """The default source (truncated 125 MB ShareGPT) with the default target: read a small pool only."""
    p = Params()
    p.prepare = p.prepare.model_copy(
        update={"output": str(tmp_path / "prep"), "num_samples": 6, "num_eval_samples": 2, "max_length": 256}
    )
    out = run(p)
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_early"] and report["pool_size"] == 4 * 8
    assert report["kept"] == {"train": 6, "eval": 2}
    assert report["skipped"]["counts"].get("wrong_role_order", 0) > 0  # ShareGPT has assistant-first halves
    train = PreparedSplit.load(out, "train")
    assert len(train) == 6 and train.lengths.max() <= 256
    assert train.meta["source"] == "embedded:sharegpt"
