"""Readers: each bad-input case is skipped under its reason or is an error naming the file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dspark_offline.data.errors import SourceError
from dspark_offline.data.jsonstream import JsonArrayReader
from dspark_offline.data.skips import SkipLog
from dspark_offline.data.sources import SourceStats, detect_container, read_conversations, resolve_source

GOOD = {
    "id": "ok",
    "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
}


def _read(path: Path, fmt: str = "auto", **kw):
    skips = SkipLog()
    stats = SourceStats(path=str(path), container=detect_container(path))
    convs = list(read_conversations(path, fmt, skips, stats, **kw))
    return convs, skips, stats


def _turns(*pairs, keys=("role", "content")):
    return [{keys[0]: r, keys[1]: c} for r, c in pairs]


BAD_RECORDS = {
    "not_an_object": [1, 2, 3],
    "missing_field": {"conversations": _turns(("user", "a"), ("assistant", "b"))},
    "unknown_fields": {"id": "x", "conversations": [{"speaker": "user", "text": "a"}]},
    "non_string_content": {"id": "x", "conversations": [{"role": "user", "content": ["a"]}]},
    "unknown_role": {"id": "x", "conversations": _turns(("user", "a"), ("tool", "b"))},
    "wrong_role_order": {
        "id": "x",
        "conversations": _turns(("user", "a"), ("user", "b"), ("assistant", "c")),
    },
    "no_assistant_turn": {"id": "x", "conversations": []},
    "empty_assistant_turn": {"id": "x", "conversations": _turns(("user", "a"), ("assistant", "  \n"))},
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_each_bad_record_is_skipped_and_counted(tmp_path, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(BAD_RECORDS[reason]) + "\n")
    convs, skips, stats = _read(path)
    assert [c.id for c in convs] == ["ok"]
    assert dict(skips.counts) == {reason: 1}
    assert skips.examples[reason][0]["where"] == "line 2"
    assert stats.records_read == 2 and stats.valid == 1
    assert reason in skips.table()


def test_line_level_problems_malformed_json_and_non_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    bad_utf8 = json.dumps(dict(GOOD, id="latin1")).encode().replace(b"hello", b"h\xe9llo")
    path.write_bytes(b'{"id": "broken", "conv\n' + json.dumps(GOOD).encode() + b"\n\n" + bad_utf8 + b"\n")
    convs, skips, stats = _read(path)
    assert [c.where for c in convs] == ["line 2"]
    assert dict(skips.counts) == {"malformed_json": 1, "not_utf8": 1}
    assert skips.examples["malformed_json"][0]["where"] == "line 1"
    assert skips.examples["not_utf8"][0]["where"] == "line 4"  # blank line 3 is not a record
    assert stats.records_read == 3


def test_more_order_rules_and_duplicates(tmp_path):
    records = [
        {"id": "a", "conversations": _turns(("assistant", "first"), ("user", "q"), ("assistant", "r"))},
        {"id": "b", "conversations": _turns(("user", "q"), ("assistant", "r"), ("system", "late"))},
        {
            "id": "c",
            "conversations": _turns(("system", "s"), ("user", "q"), ("assistant", "r"), ("user", "left")),
        },
        {"id": "c", "conversations": _turns(("user", "q"), ("assistant", "r"))},
        {"id": "d", "conversations": _turns(("system", "s"), ("user", "q"))},
        {"id": "e", "conversations": [{"role": "user"}]},
        {"id": "f", "conversations": [{"role": "user", "content": "q"}, {"from": "gpt", "value": "r"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    convs, skips, stats = _read(path)
    assert [c.id for c in convs] == ["c"]
    # A trailing user turn is dropped (counted), a leading system turn kept.
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant"]
    assert stats.dropped_trailing_user_turns == 1
    assert dict(skips.counts) == {
        "wrong_role_order": 2,
        "duplicate_id": 1,
        "no_assistant_turn": 1,
        "missing_field": 1,
        "unknown_fields": 1,
    }


def test_sharegpt_roles_are_mapped_and_format_is_enforced(tmp_path):
    rec = {
        "id": 7,
        "conversations": _turns(
            ("human", "q1"), ("chatgpt", "a1"), ("Human", "q2"), ("bing", "a2"), keys=("from", "value")
        ),
    }
    path = tmp_path / "s.json"
    path.write_text(json.dumps([rec]))
    convs, skips, _ = _read(path)
    assert convs[0].id == "7"
    assert [m["role"] for m in convs[0].messages] == ["user", "assistant", "user", "assistant"]
    convs, skips, _ = _read(path, fmt="jsonl")
    assert convs == [] and dict(skips.counts) == {"unknown_fields": 1}


def test_truncated_json_array_keeps_only_complete_records(tmp_path):
    records = [
        {
            "id": f"r{i}",
            "conversations": _turns(
                ("human", f'q{i} "x" \\u00e9 ]}}'), ("gpt", "a" * 300), keys=("from", "value")
            ),
        }
        for i in range(40)
    ]
    parts = [json.dumps(r, indent=2) for r in records]
    text = "[\n" + ",\n".join(parts) + "\n]\n"
    ends, pos = [], 2
    for part in parts:  # character offset where each element ends
        ends.append(pos + len(part))
        pos += len(part) + 2
    for cut in (len(text) // 2, ends[-1] - 1, ends[7] + 1, ends[7], ends[3] - 40, 3):
        path = tmp_path / f"cut{cut}.json"
        path.write_text(text[:cut])
        reader = JsonArrayReader(path, read_chars=97)  # tiny reads: records span many reads
        got = [e for _, e in reader]
        n_complete = sum(e <= cut for e in ends)
        assert got == records[:n_complete]  # complete records, identical to the originals
        assert reader.tail.truncated and not reader.tail.closed
    path = tmp_path / "full.json"
    path.write_text(text)
    reader = JsonArrayReader(path, read_chars=97)
    assert [e for _, e in reader] == records and reader.tail.closed and not reader.tail.truncated


def test_truncation_is_reported_not_an_error(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps([dict(GOOD, id="a"), dict(GOOD, id="b")])
    path.write_text(text[: text.index('"b"') + 10])
    convs, skips, stats = _read(path)
    assert [c.id for c in convs] == ["a"] and stats.truncated_tail == 1 and skips.total == 0


def test_malformed_json_array_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a", "conversations": []},\n {"id": "b" "conversations": []}, {"id": "c"}]')
    with pytest.raises(SourceError, match=r"broken\.json.*element 1"):
        _read(path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p, "not found"),
        (lambda p: (p.mkdir(), p)[1], "not a regular file"),
        (lambda p: (p.write_text("  \n\n"), p)[1], "empty"),
        (lambda p: (p.write_text("id,conversations\n1,2\n"), p)[1], "not JSON"),
    ],
)
def test_unreadable_files_are_errors_naming_them(tmp_path, make, match):
    path = make(tmp_path / "input.jsonl")
    with pytest.raises(SourceError, match=match) as info:
        _read(resolve_source(str(path)))
    assert "input.jsonl" in str(info.value)


def test_limits_stop_reading_early(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(dict(GOOD, id=str(i))) + "\n" for i in range(10)))
    convs, _, stats = _read(path, max_records=4)
    assert len(convs) == 4 and stats.records_read == 4 and stats.stopped_early
    convs, _, stats = _read(path, max_valid=3)
    assert len(convs) == 3 and stats.stopped_early


def test_embedded_sharegpt_gives_64_conversations_quickly():
    path = resolve_source("embedded:sharegpt")
    start = time.perf_counter()
    convs, _skips, stats = _read(path, max_valid=64)
    elapsed = time.perf_counter() - start
    assert len(convs) == 64 and len({c.id for c in convs}) == 64
    assert all(m["role"] in ("system", "user", "assistant") for c in convs for m in c.messages)
    assert all(c.messages[-1]["role"] == "assistant" for c in convs)
    assert stats.records_read < 500 and elapsed < 10  # streamed: the 125 MB file is not loaded


def test_sharegpt_as_jsonl_and_non_utf8_inside_a_json_array(tmp_path):
    sg = {"id": "s", "conversations": _turns(("human", "q"), ("gpt", "a"), keys=("from", "value"))}
    path = tmp_path / "sg.jsonl"
    path.write_text(json.dumps(sg) + "\n" + json.dumps(GOOD) + "\n")
    convs, skips, stats = _read(path)
    assert stats.container == "jsonl" and [c.id for c in convs] == ["s", "ok"] and skips.total == 0
    assert convs[0].messages == (
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    )
    # an invalid byte inside one element of a JSON array skips that element only
    raw = json.dumps([dict(GOOD, id="a"), dict(GOOD, id="b"), dict(GOOD, id="c")]).encode()
    raw = raw.replace(
        b'"b", "conversations": [{"role": "user", "content": "hi"',
        b'"b", "conversations": [{"role": "user", "content": "h\xffi"',
    )
    path = tmp_path / "arr.json"
    path.write_bytes(raw)
    convs, skips, _ = _read(path)
    assert [c.id for c in convs] == ["a", "c"]
    assert dict(skips.counts) == {"not_utf8": 1} and skips.examples["not_utf8"][0]["where"] == "element 1"
