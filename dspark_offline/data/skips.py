"""Why records are skipped: the fixed list of reasons, and a log that counts them.

Every per-record problem in `prepare` is skipped and counted under exactly one reason, with
the first few offending records (line or element number, id, detail) kept for the report,
so a user can find and fix them. Nothing is silently dropped or substituted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# reason -> what it means (printed in the console table and stored in report.json)
REASONS: dict[str, str] = {
    "malformed_json": "a JSONL line that is not valid JSON",
    "not_utf8": "a JSONL line with non-UTF-8 bytes, or text that cannot be encoded as UTF-8",
    "not_an_object": "a record that is not a JSON object",
    "missing_field": "no 'id' / 'conversations', or a turn without its role or content key",
    "unknown_fields": "turn keys are neither role/content nor from/value (or not the configured format)",
    "non_string_content": "a turn whose content/value (or role/from) is not a string",
    "unknown_role": "a role outside system/user/human/assistant/gpt/chatgpt/bing/bard",
    "wrong_role_order": "not [system] user assistant user assistant ... "
    "(assistant first, two users in a row, late system)",
    "no_assistant_turn": "no assistant turn at all (e.g. empty conversation, a lone user turn)",
    "empty_assistant_turn": "an assistant turn whose content is empty or only whitespace",
    "duplicate_id": "the same record id was already used by an earlier record",
    "template_mismatch": "the chat template rejects the conversation, its rendered text does not tokenise "
    "to apply_chat_template(tokenize=True), or an assistant message is not found in it",
    "no_supervised_tokens": "no assistant token left after truncation to max_length",
}

MAX_EXAMPLES = 5


@dataclass
class SkipLog:
    """Counts of skipped records per reason plus the first `MAX_EXAMPLES` of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, reason: str, where: str, record_id: str | None = None, detail: str = "") -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown skip reason {reason!r}")
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append({"where": where, "id": record_id, "detail": detail[:200]})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        order = [r for r in REASONS if self.counts[r]]
        return {
            "total": self.total,
            "counts": {r: self.counts[r] for r in order},
            "examples": {r: self.examples[r] for r in order},
        }

    def table(self) -> str:
        """A small console table: reason, count, first offending records."""
        if not self.total:
            return "  (no records skipped)"
        rows = []
        for reason in REASONS:
            if not self.counts[reason]:
                continue
            first = ", ".join(
                e["where"] + (f" id={e['id']}" if e["id"] is not None else "")
                for e in self.examples[reason][:3]
            )
            rows.append((reason, str(self.counts[reason]), first))
        w0 = max(len("reason"), *(len(r[0]) for r in rows))
        w1 = max(len("count"), *(len(r[1]) for r in rows))
        lines = [f"  {'reason':<{w0}}  {'count':>{w1}}  first records"]
        lines += [f"  {r:<{w0}}  {c:>{w1}}  {f}" for r, c, f in rows]
        return "\n".join(lines)
