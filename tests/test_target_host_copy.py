"""Device -> host copies of the target's outputs (target/host_copy.py)."""

import pytest
import torch

from dspark_offline.target.host_copy import HostCopies


def test_cpu_tensors_pass_through_untouched():
    copies = HostCopies(torch.device("cpu"))
    t = torch.randn(3, 4)
    assert copies.start(t) is t and copies.start(None) is None
    copies.wait()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_land_in_pinned_memory_after_wait():
    copies = HostCopies(torch.device("cuda"))
    t = (torch.randn(64, 1024, 1024, device="cuda") * 2).to(torch.bfloat16)
    expected = t.cpu()
    t.mul_(1)  # more queued work on the main stream: the copy must wait for it
    host = copies.start(t)
    del t  # the copy keeps the source alive on its stream (record_stream) ...
    junk = torch.full(
        (64, 1024, 1024), 7.0, device="cuda", dtype=torch.bfloat16
    )  # ... so this cannot clobber it
    copies.wait()
    assert host.is_pinned() and host.device.type == "cpu" and host.dtype == torch.bfloat16
    assert torch.equal(host, expected)
    del junk
