"""Incremental reader of a (possibly truncated) JSON array of records.

Why: the embedded ShareGPT file is a 125 MB JSON array cut off in the middle of a record, so
`json.load` fails on it, and we only need its first few hundred conversations anyway. We
decode one element at a time with `json.JSONDecoder.raw_decode` over a growing text buffer,
so memory stays at about one record plus one read block and reading can stop at any point.

A parse failure is "need more text" while the file has more to give. At end of file a
failure can only mean the array was cut off (the tail is counted, not an error); a failure
that more text cannot fix (a syntax error well before the end of the buffer) means the file
is not valid JSON at that point, and since a JSON array cannot be re-synchronised reliably
after that, it is an error naming the file, element and character offset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark_offline.data.errors import SourceError

_READ_CHARS = 1 << 20
# A decode error this close to the end of the buffer may be caused by the cut (a literal,
# number or escape split across two reads), so it asks for more text instead of failing.
_TAIL_MARGIN = 16
_WHITESPACE = " \t\n\r"


@dataclass
class ArrayTail:
    """What was found after the last complete element (filled in when iteration ends)."""

    truncated: bool = False  # the file ended before the closing ']' (inside or between elements)
    truncated_at_char: int | None = None  # character offset where the incomplete tail starts
    closed: bool = False  # the closing ']' was seen


class JsonArrayReader:
    """Iterate the elements of a JSON array file one at a time.

    `for index, element in reader:`; after the loop `reader.tail` says whether the file was
    truncated. Text is decoded as UTF-8 with `surrogateescape`, so invalid bytes reach the
    element as lone surrogates and the caller can skip that one record (`not_utf8`) instead
    of the whole file failing.
    """

    def __init__(self, path: Path, read_chars: int = _READ_CHARS):
        self.path = Path(path)
        self.read_chars = read_chars
        self.tail = ArrayTail()
        self._decoder = json.JSONDecoder()

    def _cut(self, at_char: int) -> None:
        self.tail.truncated = True
        self.tail.truncated_at_char = at_char

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            buf, pos, consumed, eof = "", 0, 0, False  # consumed = chars dropped before buf

            def more() -> bool:
                nonlocal buf, pos, consumed, eof
                chunk = f.read(self.read_chars)
                if not chunk:
                    eof = True
                    return False
                buf, consumed, pos = buf[pos:] + chunk, consumed + pos, 0
                return True

            def skip_ws() -> None:
                nonlocal pos
                while True:
                    while pos < len(buf) and buf[pos] in _WHITESPACE:
                        pos += 1
                    if pos < len(buf) or not more():
                        return

            skip_ws()
            if pos >= len(buf):
                raise SourceError(f"{self.path}: file is empty")
            if buf[pos] != "[":
                raise SourceError(f"{self.path}: expected a JSON array ('['), found {buf[pos]!r}")
            pos += 1
            index = 0
            while True:
                skip_ws()
                if pos >= len(buf):  # end of file before ']': cut between elements
                    self._cut(consumed + pos)
                    return
                if buf[pos] == "]":
                    self.tail.closed = True
                    return
                if index > 0:
                    if buf[pos] != ",":
                        raise SourceError(
                            f"{self.path}: malformed JSON array: expected ',' or ']' after element "
                            f"{index - 1} at character {consumed + pos}, found {buf[pos]!r}"
                        )
                    pos += 1
                    skip_ws()
                    if pos >= len(buf):
                        self._cut(consumed + pos)
                        return
                start = pos
                while True:
                    try:
                        element, end = self._decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as err:
                        fixable = "Unterminated string" in err.msg or err.pos >= len(buf) - _TAIL_MARGIN
                        if fixable and more():
                            start = pos
                            continue
                        if fixable:  # end of file inside an element: the array was cut off
                            self._cut(consumed + start)
                            return
                        raise SourceError(
                            f"{self.path}: malformed JSON in array element {index} "
                            f"(character {consumed + err.pos}): {err.msg}"
                        ) from None
                pos = end
                yield index, element
                index += 1
