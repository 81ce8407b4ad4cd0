"""The HF target during evaluation: a KV-cached session with layer capture, plain decode.

The target is loaded by the one loader, ``dspark_offline.target.loader.load_target``.

The plain decode (`target_decode`) is both the speed baseline ("without speculation") and, at
T = 0, the losslessness reference: one token per forward with a KV cache, exactly what a user of
the target alone would run.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark_offline.target.capture import capture_layers
from dspark_offline.target.kv_cache import growing_cache


class TargetSession:
    """One sequence through the target with a KV cache, capturing "dspark" layer states.

    ``forward(ids)`` appends ``ids`` after the cached prefix and returns the logits of every new
    position and their layer states; ``crop(n)`` forgets everything from position ``n`` on (a
    rejected draft suffix). The cache always holds exactly the committed-and-verified prefix.
    """

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        self.model = model
        self.layer_ids = list(layer_ids)
        self.device = next(model.parameters()).device
        self.cache = growing_cache(model)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, last_logits_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [n] -> (logits [n or 1, V] fp32, layer states [n, L, H]; L = 0 without layer ids)."""
        start = self.length
        ids = ids.to(self.device).view(1, -1)  # [1, n]
        positions = torch.arange(start, start + ids.shape[1], device=self.device).view(1, -1)  # [1, n]
        kwargs = {
            "input_ids": ids,
            "position_ids": positions,
            "past_key_values": self.cache,
            "use_cache": True,
            "logits_to_keep": 1 if last_logits_only else 0,
        }
        if not self.layer_ids:  # a drafter that reads no layer (prompt lookup): nothing to hook
            out = self.model(**kwargs)
            hidden = int(self.model.config.hidden_size)
            return out.logits[0].float(), torch.empty(ids.shape[1], 0, hidden, device=self.device)
        with capture_layers(self.model, self.layer_ids, capture_final=False) as cap:
            out = self.model(**kwargs)
            states = cap.stacked()[0]  # [n, L, H]
        return out.logits[0].float(), states

    def crop(self, length: int) -> None:
        """Keep positions ``< length``. (transformers 5.x ``crop`` takes minus the count to drop.)"""
        drop = self.length - length
        if drop < 0:
            raise ValueError(f"cannot crop the KV cache to {length} positions: it holds only {self.length}")
        if drop:
            self.cache.crop(-drop)


@torch.inference_mode()
def target_decode(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Plain autoregressive decode with a KV cache: prompt [P] -> new tokens (stop token included).

    Greedy at T = 0 (the losslessness reference), else samples from softmax(logits / T).
    """
    device = next(model.parameters()).device
    cache = growing_cache(model)
    ids = prompt.to(device).view(1, -1)  # [1, P]
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        logits = logits[0, -1].float()  # [V]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())
        out.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]], device=device)  # [1, 1]
    return out
