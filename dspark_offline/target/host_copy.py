"""Device -> host copies of a forward's outputs that overlap the rest of the forward (CUDA).

`.cpu()` on a CUDA tensor waits until the GPU has finished everything queued, then copies into
pageable memory (staged through a driver buffer). Here each output is copied as soon as it
exists, into a pinned host buffer, with `non_blocking` on a side stream: the layer states
travel while the GPU still computes the top-k from the final state, and the host waits once,
in `wait()`. Pinned buffers come from torch's caching host allocator, so they are reused
batch after batch (memory: one batch of outputs, as with `.cpu()`).

CPU tensors pass through untouched (`start` returns the tensor itself): the CPU path is exactly
what it was. The CUDA path has not been run by the project's tests on this machine (no GPU);
tests/test_target_hf_backend.py checks it bit for bit wherever CUDA is present.
"""

from __future__ import annotations

import torch


class HostCopies:
    """Start device -> host copies now; `wait()` before reading any of them."""

    def __init__(self, device: torch.device):
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A host tensor that will hold `t` once `wait()` returns (`t` itself when on CPU)."""
        if t is None or not t.is_cuda:
            return t
        # the copy must not start before the kernels that produce t (queued on the current stream)
        self._stream.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self._stream)  # the allocator must not reuse t's memory before the copy read it
        return host

    def wait(self) -> None:
        """Block until every copy started so far has landed."""
        if self._stream is not None:
            self._stream.synchronize()
