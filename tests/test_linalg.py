"""`vocab_logits` / `VocabHead`: the faster layout of vocabulary-sized products gives the same values."""

from __future__ import annotations

import pytest
import torch
from benchmark_script import load_benchmark
from torch import nn

from dspark_offline.linalg import VocabHead, use_vocab_head, vocab_logits


@pytest.mark.parametrize("shape", [(7, 32), (1, 32), (2, 5, 32), (3, 1, 4, 32)])
def test_vocab_logits_equals_linear(shape):
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(97, 32, generator=g), torch.randn(*shape, generator=g)
    out = vocab_logits(x, weight)
    assert out.shape == (*shape[:-1], 97)
    torch.testing.assert_close(out, nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_vocab_logits_has_the_gradients_of_linear():
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(50, 16, generator=g, requires_grad=True)
    x1 = torch.randn(3, 4, 16, generator=g, requires_grad=True)
    w2, x2 = w1.detach().clone().requires_grad_(), x1.detach().clone().requires_grad_()
    up = torch.randn(3, 4, 50, generator=g)
    (vocab_logits(x1, w1) * up).sum().backward()
    (nn.functional.linear(x2, w2) * up).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)


class _TinyLM(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.head = head

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("bias", [False, True])
def test_use_vocab_head_keeps_weights_and_values(bias):
    head = nn.Linear(8, 40, bias=bias)
    model = _TinyLM(head)
    model.head.weight = model.embed.weight  # tied, as in SmolLM2
    x = torch.randn(2, 3, 8)
    before = model.head(x)
    use_vocab_head(model)
    assert type(model.head) is VocabHead and model.head.weight is model.embed.weight
    assert set(model.state_dict()) == {"embed.weight", "head.weight"} | ({"head.bias"} if bias else set())
    torch.testing.assert_close(model.head(x), before, rtol=1e-5, atol=1e-5)


def test_use_vocab_head_leaves_other_heads_alone():
    class ScaledHead(nn.Linear):  # e.g. a head with logit scaling: its forward must survive
        def forward(self, x):
            return super().forward(x) * 2

    model = _TinyLM(ScaledHead(8, 40))
    use_vocab_head(model)
    assert type(model.head) is ScaledHead


def test_benchmark_reports_both_layouts_agree():
    bench = load_benchmark("vocab_matmul")
    m = bench.measure(vocab=300, width=16, rows=7, dtype=torch.float32, repeats=1)
    assert m["linear_ms"] > 0 and m["vocab_logits_ms"] > 0 and m["max_abs_diff"] < 1e-4
