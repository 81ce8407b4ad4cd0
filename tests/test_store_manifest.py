"""Manifest validation and the drafter/store compatibility check."""

import pytest
from conftest import synthetic_manifest

from dspark_offline.store.manifest import (
    FORMAT_VERSION,
    MANIFEST_ATTR,
    ArrayDtypes,
    Manifest,
    StoreError,
    StoreMismatchError,
    check_compatible,
    fingerprint_fields,
    needed_format_version,
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


def test_parse_refuses_newer_versions_and_foreign_format():
    good = synthetic_manifest().model_dump(mode="json")
    for version in range(1, FORMAT_VERSION + 1):  # every version up to this reader's
        parsed = parse_manifest({MANIFEST_ATTR: {**good, "format_version": version}}, "s")
        assert parsed.format_version == version
    newer = FORMAT_VERSION + 1
    with pytest.raises(
        StoreError,
        match=rf"^s\.zarr: written by a newer dspark-offline .*format_version={newer}, this dspark-offline "
        rf"reads up to format_version={FORMAT_VERSION}\); upgrade dspark-offline",
    ):
        parse_manifest({MANIFEST_ATTR: {**good, "format_version": newer}}, "s.zarr")
    for garbage in (0, "2", True, None, 1.0):
        with pytest.raises(StoreError, match=rf"format_version={garbage!r} is not a format version"):
            parse_manifest({MANIFEST_ATTR: {**good, "format_version": garbage}}, "s.zarr")
    with pytest.raises(StoreError, match="not a dspark-offline feature store"):
        parse_manifest({}, "s.zarr")
    with pytest.raises(StoreError, match="'other'"):
        parse_manifest({MANIFEST_ATTR: {**good, "format": "other"}}, "s.zarr")
    with pytest.raises(StoreError, match="invalid manifest"):
        parse_manifest({MANIFEST_ATTR: {**good, "top_k": "many"}}, "s.zarr")


@pytest.mark.parametrize(
    ("hidden", "final_hidden", "version"),
    [
        ("float32", "float32", 1),
        ("bfloat16", "bfloat16", 1),  # the default store
        ("float16", "float16", 1),
        ("bfloat16", None, 2),  # no final_hidden
        ("float8_e4m3", "bfloat16", 2),
        ("float8_e4m3", None, 2),
    ],
)
def test_format_version_is_the_oldest_reader_that_reads_the_store(hidden, final_hidden, version):
    scale = "bfloat16" if hidden == "float8_e4m3" else None
    dtypes = ArrayDtypes(hidden=hidden, hidden_scale=scale, final_hidden=final_hidden, head="bfloat16")
    m = synthetic_manifest(dtypes=dtypes, has_final_hidden=final_hidden is not None)
    assert m.format_version == needed_format_version(hidden, final_hidden is not None) == version
    assert version <= FORMAT_VERSION  # this reader reads every store it writes
    raw = m.model_dump(mode="json")
    assert parse_manifest({MANIFEST_ATTR: raw}, "s") == m  # read back as written
    # a float8 store written before the rule says 1; this reader still reads it as it is
    assert parse_manifest({MANIFEST_ATTR: {**raw, "format_version": 1}}, "s").format_version == 1


def test_a_store_every_reader_reads_keeps_its_manifest():
    """The default store's manifest (and so its fingerprint and DVC identity) is what it was
    before format_version meant the oldest reader: version 1, the field where it always was."""
    m = synthetic_manifest()
    raw = m.model_dump(mode="json")
    assert raw["format_version"] == 1 and list(raw)[:2] == ["format", "format_version"]
    assert fingerprint_fields(m)["format_version"] == 1


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
