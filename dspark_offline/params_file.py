"""Reading params files and `--set` values: YAML that refuses what plain YAML accepts silently.

A repeated key in a mapping (plain YAML keeps the last value without a word), malformed YAML, a
directory or a non-mapping in place of a params file all raise `ParamsError` naming the file,
line and column. No pydantic, no torch: the CLI and the DVC stages load this cheaply.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dspark_offline.errors import UserError


class ParamsError(UserError, ValueError):
    """A params file or override that cannot be read (bad YAML, duplicate key, not a file)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (plain YAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1}; "
                "YAML would keep only the last value: remove one)",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: problem' of a YAML error, on one line."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e).replace("\n", " ")


def parse_yaml_value(raw: str, what: str):
    """A YAML scalar or collection given on the command line; `ParamsError` naming `what` if malformed."""
    try:
        return yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ParamsError(
            f"{what}: {raw!r} is not a valid YAML value ({_yaml_problem(e)}); quote strings, "
            "e.g. -S 'draft.mask_token=\"<x>\"'"
        ) from None


def read_params_file(path: str | Path) -> dict:
    """The mapping of one params file; `ParamsError` naming the file for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"params file not found: {p}")
    if not p.is_file():
        raise ParamsError(f"params file {p} is a directory, not a YAML file")
    try:
        loaded = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{p}: invalid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{p}: not a text file ({e.reason} at byte {e.start})") from None
    if not isinstance(loaded, dict):
        raise ParamsError(f"{p}: top level must be a mapping of sections")
    return loaded
