"""vLLM backend without vLLM: pure helpers, and the whole backend + dump over a fake engine
(tests/fake_vllm.py) that stacks layer states the way vLLM does. The real engine: test_dump_vllm.py."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import fake_vllm
import pytest
import torch
from test_dump import by_sample_id, make_params
from transformers import AutoModelForCausalLM

from dspark_offline import dump
from dspark_offline.data.prepared import PreparedSplit
from dspark_offline.store import open_store
from dspark_offline.store.inspect import verify
from dspark_offline.target.capture import capture_layers
from dspark_offline.target.vllm_backend import (
    SPOOL_PREFIX,
    VLLMTarget,
    connector_config,
    load_head_tensors,
    plan_aux_ids,
    rms_norm,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_module_import_does_not_import_vllm():
    assert HAS_VLLM or "vllm" not in sys.modules


def test_plan_aux_ids():
    # dspark id i -> aux id i+1; aux id N (raw last layer) is appended for final_hidden
    assert plan_aux_ids([1, 9, 17, 25], 30) == ([2, 10, 18, 26, 30], [0, 1, 2, 3], 4)
    # the last layer already requested: not duplicated
    assert plan_aux_ids([0, 3], 4) == ([1, 4], [0, 1], 1)


def test_plan_aux_ids_unsorted_reads_each_layer_from_its_slot():
    """vLLM stacks aux states in layer order whatever the config order: with [14, 1, 27] the
    capture holds [aux 2, aux 15, aux 28, aux 30], so label 14 must read slot 1, not slot 0."""
    aux, pos, last = plan_aux_ids([14, 1, 27], 30)
    assert aux == sorted(aux) == [2, 15, 28, 30]
    capture = torch.tensor(aux)  # stand-in capture: slot k holds aux id aux[k], as vLLM stacks them
    assert [int(capture[p]) - 1 for p in pos] == [14, 1, 27]  # dspark id = aux id - 1
    assert int(capture[last]) == 30
    assert plan_aux_ids([29, 3], 30) == ([4, 30], [1, 0], 1)  # last layer requested out of order


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_head_tensors_from_safetensors_match_the_model(arch, tiny_llama_dir, tiny_qwen3_dir):
    path = tiny_llama_dir if arch == "llama" else tiny_qwen3_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    heads = load_head_tensors(path, bool(model.config.tie_word_embeddings))
    assert torch.equal(heads["embed_tokens"], model.model.embed_tokens.weight)
    assert torch.equal(heads["lm_head"], model.lm_head.weight)
    assert torch.equal(heads["final_norm"], model.model.norm.weight)
    assert heads["lm_head"].data_ptr() != heads["embed_tokens"].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_target_norm(tiny_qwen3_dir, dtype):
    """final_hidden of the vLLM backend = our RMSNorm of the raw last layer == HF's norm, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=dtype).eval()
    ids = torch.randint(20, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), capture_layers(model, [3]) as cap:
        model.model(input_ids=ids)
        ours = rms_norm(cap.stacked()[:, :, 0], model.model.norm.weight, model.config.rms_norm_eps)
    assert ours.dtype == dtype
    assert torch.equal(ours, cap.final)


def test_missing_safetensors_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_head_tensors(tmp_path, True)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_backend_says_how_to_install(tiny_llama_dir):
    from dspark_offline.target.vllm_backend import VLLMTarget

    with pytest.raises(ImportError, match=r"dspark-offline\[vllm\]"):
        VLLMTarget(tiny_llama_dir, layer_ids=[1])


# --- the backend and the dump over the fake engine ---------------------------------------------


def spools(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob(f"{SPOOL_PREFIX}*"))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """The fake vLLM, and temp dirs (the spool's parent) under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return fake_vllm.install(monkeypatch)


def test_fake_engine_dump_equals_hf_dump_with_unsorted_layer_ids(
    fake, tiny_llama_dir, make_prepared, tmp_path
):
    """Unsorted ids (the silent defect: label 3 held layer 0) through the vLLM stacking order;
    every array equals the HF backend's, the manifest names the backend, the spool is gone."""
    prepared = make_prepared(6)
    over = {"layer_ids": [3, 0, 2], "batch_tokens": 1}  # one sample per forward: HF is bit-exact then
    hf = open_store(dump.run(make_params(tiny_llama_dir, prepared, tmp_path / "hf.zarr", **over)))
    params = make_params(tiny_llama_dir, prepared, tmp_path / "vllm.zarr", backend="vllm", **over)
    params.dump.vllm.enforce_eager = True
    vl = open_store(dump.run(params))
    (llm,) = fake.instances
    assert llm.aux_ids == [1, 3, 4]  # sorted: dspark 0, 2, 3 (= N-1, also the final state)
    longest = int(PreparedSplit.load(prepared, "train").lengths.max())
    assert llm.kwargs["enforce_eager"] is True and llm.kwargs["max_model_len"] == longest + 1
    assert llm.kwargs["kv_transfer_config"]["kv_connector"] == "DsparkCPUHiddenStatesConnector"
    assert llm.shut_down and spools(tmp_path / "tmp") == []
    assert vl.manifest.layer_ids == [3, 0, 2]
    assert vl.manifest.backend.name == "vllm" and vl.manifest.backend.versions["vllm"] == "0.0-fake"
    assert hf.manifest.backend.name == "hf" and "vllm" not in hf.manifest.backend.versions
    ref, got = by_sample_id(hf), by_sample_id(vl)
    for sid, r in ref.items():
        for name in ("input_ids", "loss_mask", "hidden", "final_hidden", "topk_ids", "topk_probs"):
            assert torch.equal(getattr(got[sid], name), getattr(r, name)), (sid, name)
    assert verify(str(tmp_path / "vllm.zarr")) == []


@pytest.mark.parametrize("mode, error", [("error", RuntimeError), ("interrupt", KeyboardInterrupt)])
def test_backend_closed_and_spool_removed_on_error_and_ctrl_c(
    fake, mode, error, tiny_llama_dir, make_prepared, tmp_path
):
    prepared = make_prepared(4)
    fake.mode = mode
    with pytest.raises(error):
        dump.run(make_params(tiny_llama_dir, prepared, tmp_path / "f.zarr", backend="vllm"))
    (llm,) = fake.instances
    assert llm.requests == 1  # it failed mid-batch, after writing a capture file
    assert llm.shut_down and spools(tmp_path / "tmp") == []


def test_spool_removed_when_the_engine_fails_to_start(fake, monkeypatch, tiny_llama_dir):
    def broken(*a, **k):
        raise RuntimeError("no KV cache space")

    monkeypatch.setattr(fake, "__init__", broken)
    with pytest.raises(RuntimeError, match="KV cache"):
        VLLMTarget(tiny_llama_dir, layer_ids=[1])
    assert spools(Path(tempfile.tempdir)) == []


def test_engine_arguments_are_checked(fake, tiny_llama_dir):
    with pytest.raises(ValueError, match=r"\['no_such_arg'\] are not arguments of this vLLM"):
        VLLMTarget(tiny_llama_dir, layer_ids=[1], engine_kwargs={"no_such_arg": 1})
    with pytest.raises(ValueError, match="backend sets those itself"):
        VLLMTarget(tiny_llama_dir, layer_ids=[1], engine_kwargs={"enable_prefix_caching": True})
    assert fake.instances == []  # refused before an engine started


def test_device_must_match_the_vllm_build(fake, monkeypatch, tiny_llama_dir):
    with pytest.raises(ValueError, match="installed vLLM runs on 'cpu'"):
        VLLMTarget(tiny_llama_dir, layer_ids=[1], device="cuda")


def test_connector_by_device(tmp_path):
    cpu, cuda = connector_config("cpu", tmp_path), connector_config("cuda", tmp_path)
    assert cpu["kv_connector_module_path"] == "dspark_offline.target.vllm_connector"
    assert cuda["kv_connector"] == "ExampleHiddenStatesConnector" and "kv_connector_module_path" not in cuda
    for c in (cpu, cuda):
        assert c["kv_connector_extra_config"]["shared_storage_path"] == str(tmp_path)


def test_dump_vllm_params_validated_and_passed_through():
    from dspark_offline.config import load_params

    p = load_params(None, {"dump.vllm.max_model_len": 4096, "dump.vllm.extra": {"swap_space": 1}})
    assert p.dump.vllm.engine_kwargs() == {"max_model_len": 4096, "tensor_parallel_size": 1, "swap_space": 1}
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        load_params(None, {"dump.vllm.gpu_memory_utilization": 1.5})
    with pytest.raises(ValueError, match=r"extra sets \['speculative_config'\]"):
        load_params(None, {"dump.vllm.extra": {"speculative_config": {}}})
    with pytest.raises(ValueError, match="no_such"):
        load_params(None, {"dump.vllm.no_such": 1})
