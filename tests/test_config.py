import pytest
from pydantic import ValidationError

from dspark_offline.config import Params, load_params


def test_defaults_validate():
    p = Params()
    assert p.draft.block_size == 7 and p.dump.top_k == 64
    assert (p.train.ce_weight, p.train.l1_weight, p.train.confidence_weight) == (0.1, 0.9, 1.0)


def test_every_field_has_a_description():
    missing = []
    for section_name, section in Params.model_fields.items():
        assert section.description, section_name
        for name, field in section.annotation.model_fields.items():
            if not field.description:
                missing.append(f"{section_name}.{name}")
    assert not missing, missing


def test_unknown_key_is_refused(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ValidationError, match="learning_rat"):
        load_params(f)


def test_overrides_and_part_index_check(tmp_path):
    p = load_params(None, {"train.learning_rate": 1e-3})
    assert p.train.learning_rate == 1e-3
    with pytest.raises(ValidationError, match="part_index"):
        load_params(None, {"dump.num_parts": 2, "dump.part_index": 2})


def test_nested_section_merges_across_files_and_takes_dotted_overrides(tmp_path):
    """dump.vllm is a section inside a section: files merge it field by field, -S reaches into it."""
    from dspark_offline.config import VLLMEngineConfig

    assert all(f.description for f in VLLMEngineConfig.model_fields.values())
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("dump:\n  backend: vllm\n  vllm:\n    enforce_eager: true\n    max_num_seqs: 8\n")
    b.write_text("dump:\n  vllm:\n    max_num_seqs: 16\n")
    p = load_params([a, b], {"dump.vllm.max_model_len": 2048})
    assert p.dump.backend == "vllm"
    assert p.dump.vllm.engine_kwargs() == {
        "enforce_eager": True,
        "max_num_seqs": 16,
        "max_model_len": 2048,
        "tensor_parallel_size": 1,
    }
