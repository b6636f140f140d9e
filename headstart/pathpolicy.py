"""The `paths` section and where its folders may be: inside the project, apart from its code, the
data and each other (a step replaces its output folder whole)."""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass

from headstart.errors import ParamsError


@dataclass(frozen=True)
class Paths:
    data: str = "data"
    prepared: str = "artifacts/prepared"
    data_report: str = "artifacts/data-report"
    baseline: str = "artifacts/baseline"
    weights: str = "artifacts/weights"
    backbone: str = "artifacts/backbone"
    transfer: str = "artifacts/transfer"
    release: str = "artifacts/release"
    features: str = "artifacts/features"
    metrics: str = "artifacts/metrics"
    plots: str = "artifacts/plots"
    export: str = "artifacts/export"
    champion: str = "models/champion"


# Top-level names a path may never be or enter: the project's code, tooling and VCS folders.
PROTECTED = ("headstart", "tasks", "flows", "tests", "bench", "scripts", "demo-remote")
INPUT_PATHS = ("data",)  # read, never written


def _problem(clean: str) -> str | None:
    parts = clean.split("/")
    if not clean or clean == ".":
        return "must name a folder inside the project, not the project itself"
    if posixpath.isabs(clean) or parts[0] == "..":
        return "must be a relative path inside the project (no absolute path, no '..')"
    if any(part.startswith(".") for part in parts):
        return "must not contain hidden parts (.git, .dvc, .name ...)"
    if parts[0] in PROTECTED or (len(parts) == 1 and "." in parts[0]):
        return f"must not be or enter the project's code or files ({', '.join(PROTECTED)})"
    return None


def check_paths(paths: Paths) -> None:
    """Every path: relative, inside the project, no hidden part, not the code. Output paths: not
    the data, and no output inside another."""
    normal = {}
    for name, value in dataclasses.asdict(paths).items():
        clean = posixpath.normpath(value.replace("\\", "/")) if value else ""
        problem = _problem(clean)
        if problem:
            raise ParamsError(f"params: paths.{name} {problem} (got {value!r})")
        normal[name] = clean
    for name, clean in normal.items():
        for other, other_clean in normal.items():
            if other == name or (name in INPUT_PATHS and other in INPUT_PATHS):
                continue
            if clean == other_clean or clean.startswith(other_clean + "/"):
                first, second = sorted((name, other), key=lambda n: n in INPUT_PATHS)
                raise ParamsError(
                    f"params: paths.{first} and paths.{second} overlap ({normal[first]!r}, "
                    f"{normal[second]!r}); give every step its own folder, apart from the data"
                )
