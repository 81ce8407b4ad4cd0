"""Render a conversation with the target's own chat template and build its loss mask.

The mask is 1 exactly on the tokens of each assistant message's content plus the
end-of-turn token that closes it (`<|im_end|>` for SmolLM2/Qwen, `<|eot_id|>` for Llama 3,
...), and 0 on system/user turns, on role headers (`<|im_start|>assistant\\n`) and on
whatever the template puts after the end-of-turn token (the newline in ChatML).

Why character spans and not token arithmetic: it works for any template. We render the text
once, locate each assistant content in it, extend the span over the special token that
follows it, and map spans to tokens with the fast tokenizer's offset mapping (a token is
supervised when it overlaps a span). To locate a content without being fooled by the same
words earlier in the chat (or by a content equal to "assistant"), the search starts after
the rendering of the preceding turns *with the generation prompt*, i.e. after this turn's
header, whenever that rendering is a prefix of the full text (true for ChatML, Llama 3,
Qwen 3...). Each sample's tokens are checked against `apply_chat_template(tokenize=True)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import TemplateError

from dspark_offline.data.errors import DataError


class RenderSkip(Exception):
    """This conversation cannot be used; `reason` is a key of `skips.REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class RenderedSample:
    input_ids: np.ndarray  # int32 [S], S <= max_length
    loss_mask: np.ndarray  # uint8 [S]
    full_length: int  # tokens before truncation


def load_tokenizer(path: str | Path) -> Any:
    """The fast tokenizer (offset mapping is needed for the mask), with a chat template, of the
    local model directory ``path`` (`prepare` resolves the embedded target to one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{path}: the tokenizer is not a fast tokenizer; offset mapping is needed for the loss mask"
        )
    if not tokenizer.chat_template:
        raise DataError(f"{path}: the tokenizer has no chat template")
    return tokenizer


def _special_pattern(tokenizer: Any) -> re.Pattern:
    """Regex matching any special added token (the end-of-turn token is one of them)."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens)
    if not specials:
        raise DataError("the tokenizer defines no special tokens, so no end-of-turn token can be found")
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def _template_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def assistant_spans(
    tokenizer: Any, messages: Sequence[dict], text: str, stop_char: int
) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant content + its end-of-turn token.

    Only spans that start before `stop_char` (the end of the last kept token) are located.
    """
    special = _special_pattern(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header_end = cursor
        for add_prompt in (True, False):
            try:
                prefix = tokenizer.apply_chat_template(
                    list(messages[:k]), tokenize=False, add_generation_prompt=add_prompt
                )
            except TemplateError:  # e.g. a template that insists on ending with an assistant turn
                continue
            if text.startswith(prefix):
                header_end = max(cursor, len(prefix))
                break
        if header_end >= stop_char:
            break
        content = message["content"]
        start = text.find(content, header_end)
        if start < 0 and content.strip() != content:  # templates that trim the content
            content = content.strip()
            start = text.find(content, header_end)
        if start < 0:
            raise RenderSkip(
                "template_mismatch", f"turn {k}: assistant content not found in the rendered text"
            )
        end = start + len(content)
        eot = special.search(text, end)
        if eot is None or text[end : eot.start()].strip():
            raise RenderSkip(
                "template_mismatch", f"turn {k}: no end-of-turn token right after the assistant content"
            )
        spans.append((start, eot.end()))
        cursor = eot.end()
    return spans


def render_conversation(tokenizer: Any, messages: Sequence[dict], max_length: int) -> RenderedSample:
    """Chat-template tokens and loss mask of one conversation, truncated to `max_length` tokens."""
    messages = list(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as err:  # templates may reject e.g. a system turn (Gemma) via raise_exception
        raise RenderSkip("template_mismatch", f"the chat template rejected the conversation: {err}") from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if ids != _template_ids(tokenizer, messages):
        raise RenderSkip(
            "template_mismatch", "tokens of the rendered text differ from apply_chat_template(tokenize=True)"
        )
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [S_full, 2]
    keep = min(len(ids), max_length)
    offsets = offsets[:keep]  # [S, 2]
    stop_char = int(offsets[-1, 1]) if keep else 0
    mask = np.zeros(keep, dtype=np.uint8)  # [S]
    for start, end in assistant_spans(tokenizer, messages, text, stop_char):
        mask |= ((offsets[:, 0] < end) & (offsets[:, 1] > start)).astype(np.uint8)
    if not mask.any():
        raise RenderSkip(
            "no_supervised_tokens", f"no assistant token in the first {keep} of {len(ids)} tokens"
        )
    return RenderedSample(
        input_ids=np.asarray(ids[:keep], dtype=np.int32), loss_mask=mask, full_length=len(ids)
    )
