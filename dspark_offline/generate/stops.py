"""Which tokens end an answer: the target's EOS ids, the chat template's end-of-turn token, and
the extra `generate.stop_tokens`.

The end-of-turn token is found the way `prepare` finds it for the loss mask: render a probe
conversation with the target's own template and take the special token that follows the
assistant content (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3). A target whose EOS is
something else (a base model's `</s>` with a ChatML template) would otherwise run past the turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark_offline.data.render import RenderSkip, assistant_spans

_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello there."}]


class StopTokenError(ValueError):
    """A `generate.stop_tokens` entry that is not a single token of the target's vocabulary."""


@dataclass(frozen=True)
class StopIds:
    eos: frozenset[int]  # target EOS ids + the template's end-of-turn token
    extra: frozenset[int]  # from generate.stop_tokens (minus those already in eos)

    @property
    def all(self) -> frozenset[int]:
        return self.eos | self.extra


def end_of_turn_id(tokenizer) -> int | None:
    """Id of the special token the chat template puts right after an assistant message, or None
    when the template has none (or cannot render the probe)."""
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        (start, end), *_ = assistant_spans(tokenizer, _PROBE, text, len(text))
    except (RenderSkip, ValueError, TypeError):
        return None
    eot = text[start + len(_PROBE[1]["content"]) : end].strip()  # the span is content + end-of-turn
    tid = tokenizer.convert_tokens_to_ids(eot)
    return int(tid) if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


def _token_id(tokenizer, entry: int | str, vocab_size: int) -> int:
    if isinstance(entry, int):
        if not 0 <= entry < vocab_size:
            raise StopTokenError(
                f"generate.stop_tokens: id {entry} is outside the vocabulary [0, {vocab_size})"
            )
        return entry
    tid = tokenizer.convert_tokens_to_ids(entry)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        return int(tid)
    ids = tokenizer(entry, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise StopTokenError(
            f"generate.stop_tokens: {entry!r} is {len(ids)} tokens {ids} for this tokenizer; "
            "only single tokens can stop generation (give a token string or id)"
        )
    return int(ids[0])


def resolve_stop_ids(
    model_eos: frozenset[int], tokenizer, extra: list[int | str], vocab_size: int
) -> StopIds:
    """model_eos: `target.loader.stop_token_ids` (generation config / tokenizer EOS)."""
    eos = set(model_eos)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        eos.add(eot)
    if not eos and not extra:
        raise StopTokenError(
            "the target has no EOS id and its chat template no end-of-turn token; set generate.stop_tokens"
        )
    more = {_token_id(tokenizer, e, vocab_size) for e in extra} - eos
    return StopIds(frozenset(eos), frozenset(more))
