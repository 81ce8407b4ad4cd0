"""The committed JSON Schemas are current, and they accept what the code writes."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import synthetic_manifest

from dspark_offline.schemas import render_schemas, write_schemas

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@pytest.mark.parametrize("name", ["params.schema.json", "feature_store.schema.json"])
def test_committed_schema_is_current(name):
    committed = SCHEMAS / name
    assert committed.exists(), f"{committed} missing: run `python -m dspark_offline.schemas schemas`"
    assert committed.read_text() == render_schemas()[name], (
        f"{committed} is stale: run `python -m dspark_offline.schemas schemas` and commit it"
    )


def test_write_schemas(tmp_path):
    paths = write_schemas(tmp_path / "out")
    assert sorted(p.name for p in paths) == ["feature_store.schema.json", "params.schema.json"]
    for p in paths:
        jsonschema.Draft202012Validator.check_schema(json.loads(p.read_text()))


def test_store_manifest_validates_against_schema(synthetic_store):
    schema = json.loads(render_schemas()["feature_store.schema.json"])
    synth = synthetic_store([4, 7])
    root = synth.write()
    jsonschema.validate(dict(root.attrs)["dspark_offline"], schema)
    bad = dict(synthetic_manifest().model_dump(mode="json"), layer_id_convention="hf")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_params_defaults_and_params_yaml_validate():
    from dspark_offline.config import Params

    schema = json.loads(render_schemas()["params.schema.json"])
    jsonschema.validate(Params().model_dump(mode="json"), schema)
    params_yaml = SCHEMAS.parent / "params.yaml"
    if params_yaml.exists():
        jsonschema.validate(yaml.safe_load(params_yaml.read_text()) or {}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"dump": {"top_k": 0}}, schema)
