"""The committed JSON Schemas of the two long-lived contracts, generated from the pydantic models.

- `schemas/params.schema.json` from `config.Params` (validates `params.yaml`, incl. `dvc exp run -S` edits);
- `schemas/feature_store.schema.json` from `store.manifest.Manifest` (the root attribute
  `dspark_offline` of a feature store: the stage-1 -> stage-2 handshake).

Regenerate after changing either model: `python -m dspark_offline.schemas [schemas/]`;
`tests/test_schemas.py` fails while the committed files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def render_schemas() -> dict[str, str]:
    """File name -> schema text (stable key order, trailing newline)."""
    from dspark_offline.config import Params
    from dspark_offline.store.manifest import FORMAT_VERSION, MANIFEST_ATTR, Manifest

    params = {"$schema": DRAFT, **Params.model_json_schema()}
    params["title"] = "dspark-offline params.yaml"
    store = {"$schema": DRAFT, **Manifest.model_json_schema()}
    store["title"] = f"dspark-offline feature store manifest (format_version 1 to {FORMAT_VERSION})"
    store["description"] = f"Root attribute '{MANIFEST_ATTR}' of a dspark-offline Zarr v3 feature store. " + (
        store.get("description") or ""
    )
    return {
        "params.schema.json": json.dumps(params, indent=2) + "\n",
        "feature_store.schema.json": json.dumps(store, indent=2) + "\n",
    }


def write_schemas(directory: str | Path) -> list[Path]:
    """Write both schema files into `directory`; return their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_schemas().items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths


if __name__ == "__main__":
    for p in write_schemas(sys.argv[1] if len(sys.argv) > 1 else "schemas"):
        print(p)
