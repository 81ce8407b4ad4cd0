"""Manifest validation and the drafter/store compatibility check."""

import pytest
from conftest import synthetic_manifest

from dspark_offline.store.manifest import (
    FORMAT_VERSION,
    MANIFEST_ATTR,
    Manifest,
    StoreError,
    StoreMismatchError,
    check_compatible,
    fingerprint_fields,
    parse_manifest,
)


def test_every_field_has_a_description():
    schema = Manifest.model_json_schema()

    def walk(props, where):
        for name, p in props.items():
            assert p.get("description"), f"{where}.{name} has no description"

    walk(schema["properties"], "Manifest")
    for name, sub in schema.get("$defs", {}).items():
        walk(sub.get("properties", {}), name)


def test_parse_refuses_unknown_version_and_foreign_format():
    good = synthetic_manifest().model_dump(mode="json")
    assert parse_manifest({MANIFEST_ATTR: good}, "s").format_version == FORMAT_VERSION
    with pytest.raises(StoreError, match="format_version=99 is not supported"):
        parse_manifest({MANIFEST_ATTR: {**good, "format_version": 99}}, "s.zarr")
    with pytest.raises(StoreError, match="not a dspark-offline feature store"):
        parse_manifest({}, "s.zarr")
    with pytest.raises(StoreError, match="'other'"):
        parse_manifest({MANIFEST_ATTR: {**good, "format": "other"}}, "s.zarr")
    with pytest.raises(StoreError, match="invalid manifest"):
        parse_manifest({MANIFEST_ATTR: {**good, "top_k": "many"}}, "s.zarr")


@pytest.mark.parametrize(
    ("kwargs", "store_value", "wanted"),
    [
        ({"layer_ids": [1, 3]}, "[1, 2]", "[1, 3]"),
        ({"hidden_size": 16}, "8", "16"),
        ({"vocab_size": 51}, "50", "51"),
        ({"architecture": "Qwen3ForCausalLM"}, "'LlamaForCausalLM'", "'Qwen3ForCausalLM'"),
        ({"target_name": "other"}, "'synthetic'", "'other'"),
    ],
)
def test_mismatch_names_both_values(kwargs, store_value, wanted):
    with pytest.raises(StoreMismatchError) as e:
        check_compatible(synthetic_manifest(), **kwargs)
    assert store_value in str(e.value) and wanted in str(e.value)


def test_compatible_passes_and_final_hidden_requirement():
    m = synthetic_manifest()
    check_compatible(
        m,
        layer_ids=[1, 2],
        hidden_size=8,
        vocab_size=50,
        architecture="LlamaForCausalLM",
        need_final_hidden=True,
    )
    no_final = synthetic_manifest(has_final_hidden=False)
    with pytest.raises(StoreMismatchError, match="has_final_hidden=False"):
        check_compatible(no_final, need_final_hidden=True)


def test_fingerprint_ignores_locations_but_not_contents():
    m = synthetic_manifest()
    moved = m.model_copy(update={"target": m.target.model_copy(update={"path": "/elsewhere"})})
    assert fingerprint_fields(moved) == fingerprint_fields(m)
    assert fingerprint_fields(synthetic_manifest(top_k=5)) != fingerprint_fields(m)
