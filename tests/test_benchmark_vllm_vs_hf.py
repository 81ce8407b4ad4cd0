"""benchmarks/vllm_vs_hf.py: its log parsing and table (the benchmark itself needs vLLM)."""

import pytest
from benchmark_script import load_benchmark

bench = load_benchmark("vllm_vs_hf")

LOG = """[dump] vllm backend ready in 52.3s (model load / engine start-up)
[dump] target LlamaForCausalLM N=30 ...
[dump] wrote 3 shards, 12000 tokens in 20.0s (600 tok/s; writer thread busy 1.0s)
"""


def test_parse_log():
    assert bench.parse_log(LOG) == (52.3, 12000, 20.0)
    with pytest.raises(RuntimeError, match="timing lines"):
        bench.parse_log("[dump] nothing to do")


def test_best_of_rounds_and_table():
    a = {"startup": 5.0, "tokens": 1000, "loop": 2.0, "tok_s": 500.0, "wall": 12.0}
    b = {"startup": 4.0, "tokens": 1000, "loop": 2.5, "tok_s": 400.0, "wall": 11.0}
    best = bench.keep_best(a, b)
    assert best == {"startup": 4.0, "loop": 2.0, "wall": 11.0, "tokens": 1000, "tok_s": 500.0}
    v = {"startup": 40.0, "tokens": 1000, "loop": 1.0, "tok_s": 1000.0, "wall": 50.0}
    text = bench.table({"hf": best, "vllm": v})
    assert text.splitlines()[2].split() == ["vllm", "40.0", "1000", "50.0", "10.00", "2.00"]
