"""dvc.yaml and the layering against the code: one stage per step, each stage's deps name every
project module its step imports (directly or through other modules), so `dvc repro` reruns a
step whenever code it runs changes; no step imports another step; the library (headstart/)
imports neither tasks/ nor flows/, except the command line. Computed from the import
statements, not a hand list."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import yaml
from helpers import ROOT

from tasks import STEP_NAMES, STEPS

PACKAGES = ("headstart", "tasks", "flows")


def module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if name.split(".")[0] in PACKAGES and path.is_file() else None


def imported_names(path: Path) -> set[str]:
    """Every module name one file imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {
                f"{node.module}.{alias.name}" for alias in node.names
            }  # `from pkg import mod`
    return found


def imported_modules(path: Path) -> set[str]:
    """Project modules (files in headstart/, tasks/, flows/) one file imports."""
    return {name for name in imported_names(path) if module_file(name)}


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
    for step in STEPS:
        assert step.function is importlib.import_module(f"tasks.{step.name}").run


def test_the_import_walk_sees_function_level_imports():
    assert "headstart.training" in closure("tasks.baseline")  # imported inside fit_baseline


def missing_deps(stages: dict) -> dict[str, list[str]]:
    """Per stage, the project modules its step imports that its deps do not list."""
    missing = {}
    for name, stage in stages.items():
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        files = {str(module_file(m).relative_to(ROOT)) for m in closure(f"tasks.{name}")}
        if files - deps:
            missing[name] = sorted(files - deps)
    return missing


def test_stage_deps_cover_every_project_module_the_step_imports():
    assert missing_deps(stages()) == {}


def test_stage_deps_name_no_module_the_step_does_not_import():
    """An extra code dep reruns a stage for nothing."""
    extra = {}
    for name, stage in stages().items():
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        code = {d for d in deps if d.endswith(".py")}
        files = {str(module_file(m).relative_to(ROOT)) for m in closure(f"tasks.{name}")}
        if code - files:
            extra[name] = sorted(code - files)
    assert extra == {}


def test_a_removed_dep_is_found():
    changed = stages()
    changed["evaluate"]["deps"].remove("headstart/metrics.py")
    assert missing_deps(changed) == {"evaluate": ["headstart/metrics.py"]}


def test_no_step_imports_another_step():
    for name in STEP_NAMES:
        others = {m for m in closure(f"tasks.{name}") if m.split(".")[0] in ("tasks", "flows")}
        assert others == {f"tasks.{name}"}, name


def test_the_library_imports_tasks_and_flows_only_in_the_command_line():
    upward = {}
    for path in sorted((ROOT / "headstart").glob("*.py")):
        found = {m for m in imported_names(path) if m.split(".")[0] in ("tasks", "flows")}
        if found and path.name != "cli.py":
            upward[path.name] = sorted(found)
    assert upward == {}
    assert imported_names(ROOT / "headstart" / "cli.py") >= {"tasks", "flows.pipeline"}


def calls(path: Path, function: str) -> bool:
    return any(
        isinstance(node, ast.Call) and getattr(node.func, "id", None) == function
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_the_steps_that_start_tensorflow_are_those_whose_code_imports_it():
    """Step.run starts TensorFlow (quietly) before a step flagged `tensorflow`: a step whose
    modules may import TensorFlow or Keras is flagged or starts it itself (export, only when it
    converts), and one whose modules cannot (prepare, plots) must not pay its ~7 s start in a
    `headstart run` or a `dvc repro` stage."""
    imports = {
        step.name: any(
            name.split(".")[0] in ("tensorflow", "keras")
            for module in closure(f"tasks.{step.name}")
            for name in imported_names(module_file(module))
        )
        for step in STEPS
    }
    starts_itself = {
        step.name for step in STEPS if calls(module_file(f"tasks.{step.name}"), "start_tensorflow")
    }
    assert starts_itself == {"export"}
    assert {step.name: step.tensorflow or step.name in starts_itself for step in STEPS} == imports
    assert [step.name for step in STEPS if not step.tensorflow] == ["prepare", "plots", "export"]
