"""Loss mask: exactly the assistant contents + end-of-turn token, checked against the rendered text."""

from __future__ import annotations

import numpy as np
import pytest

from dspark_offline.data.render import RenderSkip, load_tokenizer, render_conversation
from dspark_offline.target.fingerprint import tokenizer_hashes

CONV = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy? Answer like the assistant would."},
    {"role": "assistant", "content": "Rome is the capital of Italy.\nIt has been since 1871."},
]


@pytest.fixture(scope="module")
def tok(embedded_target_dir):
    return load_tokenizer(str(embedded_target_dir))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of mask == 1."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_mask_covers_exactly_assistant_content_and_end_of_turn(tok):
    s = render_conversation(tok, CONV, max_length=4096)
    assert s.input_ids.dtype == np.int32 and s.loss_mask.dtype == np.uint8
    assert s.input_ids.shape == s.loss_mask.shape
    # Same tokens as the template's own tokenisation.
    expected = tok.apply_chat_template(CONV, tokenize=True)["input_ids"]
    assert s.input_ids.tolist() == list(expected)
    runs = _runs(s.loss_mask)
    assert [tok.decode(s.input_ids[a:b]) for a, b in runs] == [
        CONV[2]["content"] + "<|im_end|>",
        CONV[4]["content"] + "<|im_end|>",
    ]
    # Everything unmasked decodes to the rest of the rendered text: system/user turns, headers
    # and the newline after each <|im_end|>.
    text = tok.apply_chat_template(CONV, tokenize=False)
    rest, cursor = "", 0
    for m in (CONV[2], CONV[4]):
        at = text.index(m["content"] + "<|im_end|>", cursor)
        rest += text[cursor:at]
        cursor = at + len(m["content"] + "<|im_end|>")
    rest += text[cursor:]
    assert tok.decode(s.input_ids[s.loss_mask == 0]) == rest
    for a, b in runs:
        assert tok.decode(s.input_ids[b : b + 1]) == "\n"  # the newline after <|im_end|> is not supervised
        assert tok.decode(s.input_ids[:a]).endswith("<|im_start|>assistant\n")  # header not supervised


def test_content_equal_to_header_word_is_not_confused_with_the_header(tok):
    conv = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"}]
    s = render_conversation(tok, conv, max_length=256)
    runs = _runs(s.loss_mask)
    assert [tok.decode(s.input_ids[a:b]) for a, b in runs] == ["assistant<|im_end|>"]
    assert tok.decode(s.input_ids[: runs[0][0]]).endswith("<|im_start|>assistant\n")


def test_truncation_keeps_prefix_and_skips_when_nothing_supervised(tok):
    full = render_conversation(tok, CONV, max_length=4096)
    first_sup = int(np.argmax(full.loss_mask))
    cut = render_conversation(tok, CONV, max_length=first_sup + 3)
    assert len(cut.input_ids) == first_sup + 3 and cut.full_length == len(full.input_ids)
    assert np.array_equal(cut.input_ids, full.input_ids[: first_sup + 3])
    assert np.array_equal(cut.loss_mask, full.loss_mask[: first_sup + 3])
    with pytest.raises(RenderSkip) as info:
        render_conversation(tok, CONV, max_length=first_sup)
    assert info.value.reason == "no_supervised_tokens"


def test_generic_template_with_spaced_end_of_turn(tok):
    """A non-ChatML template (Llama-2 style: content, space, then an end token) also works."""
    tok = _copy(tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}[A] {{ m['content'] }} <|endoftext|>\n"
        "{% else %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[A] {% endif %}"
    )
    s = render_conversation(tok, CONV, max_length=4096)
    decoded = [tok.decode(s.input_ids[a:b]) for a, b in _runs(s.loss_mask)]
    assert [d.strip() for d in decoded] == [
        CONV[2]["content"] + " <|endoftext|>",
        CONV[4]["content"] + " <|endoftext|>",
    ]


def _copy(tok):
    """A private tokenizer to change the chat template of (the module fixture is shared)."""
    import copy

    return copy.deepcopy(tok)


def test_template_without_end_of_turn_token_is_a_template_mismatch(tok):
    tok = _copy(tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(RenderSkip) as info:
        render_conversation(tok, CONV, max_length=4096)
    assert info.value.reason == "template_mismatch"


def test_hashes_are_stable_and_sensitive(tok):
    other = _copy(tok)
    assert tokenizer_hashes(tok) == tokenizer_hashes(other)
    other.chat_template = other.chat_template + " "
    assert tokenizer_hashes(tok)[0] == tokenizer_hashes(other)[0]
    assert tokenizer_hashes(tok)[1] != tokenizer_hashes(other)[1]


def test_template_that_rejects_a_conversation_is_a_template_mismatch(tok):
    tok = _copy(tok)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + tok.chat_template
    )
    with pytest.raises(RenderSkip, match="System role not supported") as info:
        render_conversation(tok, CONV, max_length=4096)
    assert info.value.reason == "template_mismatch"
    assert render_conversation(tok, CONV[1:], max_length=4096).loss_mask.any()
