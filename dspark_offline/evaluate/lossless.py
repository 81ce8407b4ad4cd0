"""The losslessness check: at T = 0 speculative output == the target's own greedy decode.

A mismatch is a bug (wrong accept logic, a stale KV cache, a cache crop off by one, positions
shifted), never a metric, so it raises.

Numerics: the verification forward processes several tokens at once while the reference decodes
one token per forward, so the logits differ in the last bits. Measured on SmolLM2-135M in fp32 on
CPU (3 ShareGPT prompts x 48 tokens): max |logit difference| between single-token decode and
8-token chunks 5.6e-5, smallest top-2 logit margin 1.5e-2, i.e. ~250x headroom; every argmax
agreed, and the full evaluation (8 prompts, 471 tokens, 456 multi-token verifications) was
lossless. We therefore compare exactly and do not loosen the check. In bf16 (the CUDA default)
the drift is ~1e-2 and a near-tie can flip legitimately: the error then says so, and
``target.dtype=float32`` tells a numerics flip from a bug.
"""

from __future__ import annotations


class LosslessnessError(RuntimeError):
    """Speculative greedy decoding diverged from the target's greedy decode."""


def check_lossless(
    prompt_index: int,
    sample_id: int,
    reference: list[int],
    speculative: list[int],
    hint: str = "",
    decoder: str = "speculative",
) -> None:
    """Raise `LosslessnessError` naming the prompt, the decoder and the first differing position."""
    if reference == speculative:
        return
    first = next(
        (i for i, (r, s) in enumerate(zip(reference, speculative)) if r != s),
        min(len(reference), len(speculative)),
    )
    ref_tok = reference[first] if first < len(reference) else "<end>"
    spec_tok = speculative[first] if first < len(speculative) else "<end>"
    raise LosslessnessError(
        f"prompt {prompt_index} (eval sample_id {sample_id}): {decoder} greedy output differs from the "
        f"target's greedy decode at generated position {first}: speculative token {spec_tok}, target token "
        f"{ref_tok} (lengths {len(speculative)} vs {len(reference)}){hint}"
    )
