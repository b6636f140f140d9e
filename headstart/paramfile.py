"""params.yaml as text: read strictly, `section.key=value` overrides, and writing overrides back
with the user's comments and quotes kept (as `dvc exp run -S` does). Validation is params.py's."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml

from headstart.errors import ParamsError


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last
    one silently, while DVC and ruamel refuse the file)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_raw(path: Path | str) -> dict[str, Any]:
    """The file's mapping as YAML reads it (not validated)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the project folder or pass --project DIR")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {err.problem}; fix the file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err}); fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read it ({err})") from None
    return raw or {}


def parse_override(item: str) -> tuple[str, str, Any]:
    """DVC-style `section.key=value` -> (section, key, YAML-typed value)."""
    name, sep, value = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ParamsError(f"override '{item}' must look like section.key=value")
    try:
        return section, key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError as err:
        where = getattr(err, "problem", None) or "not valid YAML"
        raise ParamsError(
            f"override '{item}': the value is not valid YAML ({where}); quote "
            "it, e.g. -S 'section.key=\"text\"'"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw params mapping (a copy)."""
    merged = {section: dict(values or {}) for section, values in raw.items()}
    for section, key, value in map(parse_override, overrides):
        merged.setdefault(section, {})[key] = value
    return merged


def write_overrides(path: Path | str, overrides: list[str]) -> None:
    """Write `section.key=value` overrides into the file; every other line stays as written.
    Validate first (params.write_overrides does)."""
    from ruamel.yaml import YAML

    from headstart.files import write_text

    parser = YAML()
    parser.preserve_quotes = True
    document = parser.load(Path(path).read_text())
    for section, key, value in map(parse_override, overrides):
        document.setdefault(section, {})[key] = value
    buffer = io.StringIO()
    parser.dump(document, buffer)
    write_text(Path(path), buffer.getvalue())
