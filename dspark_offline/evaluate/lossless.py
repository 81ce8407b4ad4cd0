"""The losslessness check: at T = 0 speculative output == the target's own greedy decode.

A mismatch is a bug (wrong accept logic, a stale KV cache, a cache crop off by one, positions
shifted), never a metric, so it raises. Numerics: the verification forward processes several
tokens at once while the reference decodes one token per forward; in fp32 on CPU both give the
same argmax on every prompt we tried (tests on tiny random targets and on SmolLM2). In lower
precision (bf16 on GPU) a near-tie between the top two logits can legitimately flip, which is
why the error reports the position so the logits there can be inspected.
"""

from __future__ import annotations


class LosslessnessError(RuntimeError):
    """Speculative greedy decoding diverged from the target's greedy decode."""


def check_lossless(prompt_index: int, sample_id: int, reference: list[int], speculative: list[int]) -> None:
    """Raise `LosslessnessError` naming the prompt and the first differing generated position."""
    if reference == speculative:
        return
    first = next(
        (i for i, (r, s) in enumerate(zip(reference, speculative)) if r != s),
        min(len(reference), len(speculative)),
    )
    ref_tok = reference[first] if first < len(reference) else "<end>"
    spec_tok = speculative[first] if first < len(speculative) else "<end>"
    raise LosslessnessError(
        f"prompt {prompt_index} (eval sample_id {sample_id}): speculative greedy output differs from the "
        f"target's greedy decode at generated position {first}: speculative token {spec_tok}, target token "
        f"{ref_tok} (lengths {len(speculative)} vs {len(reference)})"
    )
