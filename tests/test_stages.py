"""dvc.yaml against the code: one stage per step, and each stage's deps name every project
module its step imports (directly or through other modules), so `dvc repro` reruns a step
whenever code it runs changes. Computed from the import statements, not a hand list."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from conftest import ROOT

from headstart.pipeline import STEP_NAMES

PACKAGES = ("headstart", "tasks")


def module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if name.split(".")[0] in PACKAGES and path.is_file() else None


def imported_modules(path: Path) -> set[str]:
    """Project modules one file imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {
                f"{node.module}.{alias.name}" for alias in node.names
            }  # `from pkg import mod`
    return {name for name in found if module_file(name)}


def closure(module: str) -> set[str]:
    seen, pending = set(), [module]
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending += imported_modules(module_file(name))
    return seen


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_step_is_a_stage_in_order_that_runs_it():
    assert list(stages()) == list(STEP_NAMES)
    for name, stage in stages().items():
        assert stage["cmd"] == f"headstart step {name}"


def test_the_import_walk_sees_function_level_imports():
    assert "headstart.training" in closure("tasks.baseline")  # imported inside fit_baseline


def test_stage_deps_cover_every_project_module_the_step_imports():
    missing = {}
    for name, stage in stages().items():
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        files = {str(module_file(m).relative_to(ROOT)) for m in closure(f"tasks.{name}")}
        if files - deps:
            missing[name] = sorted(files - deps)
    assert missing == {}
