"""The pipeline's steps in order: the one list the CLI, the Prefect flow and dvc.yaml agree on."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from headstart import files
from headstart.lock import workspace_lock
from headstart.params import Params, to_dict

log = logging.getLogger("headstart.pipeline")


@dataclass(frozen=True)
class Step:
    name: str  # stage name in dvc.yaml and `headstart step NAME`
    task_name: str  # Prefect task name, in our user's words
    output: str  # the `paths` key of the folder it writes (stamped with its parameters)

    def run(self, params: Params, root: Path | str = ".", wait: bool = False) -> Path:
        """Run the step's plain function on the paths from params (no Prefect involved), holding
        the workspace lock, with its outputs stamped with the parameters it ran with."""
        module = importlib.import_module(f"tasks.{self.name}")
        with workspace_lock(root, wait=wait) as outermost:
            if outermost:
                clean_up(params, root)
            with files.stamping(stamp(self.name, params, root)):
                return module.run(params, Path(root))


STEPS = (
    Step("prepare", "generate_data", "prepared"),
    Step("baseline", "fit_baseline", "baseline"),
    Step("weights", "download_weights", "weights"),
    Step("freeze", "freeze_backbone", "backbone"),
    Step("head", "train_head", "transfer"),
    Step("select", "select_model", "release"),
    Step("evaluate", "evaluate", "metrics"),
    Step("plots", "plot_results", "plots"),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def get(name: str) -> Step:
    for step in STEPS:
        if step.name == name:
            return step
    from headstart.errors import UserError

    raise UserError(f"unknown step '{name}' (steps: {', '.join(STEP_NAMES)})")


def stage_params(name: str, params: Params, root: Path | str) -> dict:
    """The parameters a stage reads, as dvc.yaml lists them (`section` or `section.key`), with
    their values; every parameter when there is no dvc.yaml (a step called outside a project)."""
    import yaml

    values = to_dict(params)
    dvc_yaml = Path(root) / "dvc.yaml"
    stage = (yaml.safe_load(dvc_yaml.read_text())["stages"].get(name, {})
             if dvc_yaml.is_file() else {})  # fmt: skip
    keys = stage.get("params") if stage else None
    if keys is None:
        return values
    picked: dict = {}
    for key in keys:
        section, _, item = str(key).partition(".")
        if item:
            picked[key] = values[section][item]
        else:
            picked[key] = values[section]
    return picked


def stamp(name: str, params: Params, root: Path | str) -> dict:
    return {"step": name, "params": stage_params(name, params, root)}


def written_with(step: Step, params: Params, root: Path | str) -> bool:
    """Does the step's output say it was written with these parameters? (What the flow checks
    before recording it in dvc.lock: a folder written by another run does not match.)"""
    marker = files.read_marker(params.path(step.output, root))
    return marker == {"written_by": "headstart", **stamp(step.name, params, root)}


def clean_up(params: Params, root: Path | str) -> None:
    """Remove what killed runs left (only atomic_dir's own temporary folders, next to outputs)."""
    parents = [params.path(name, root).parent for name in to_dict(params)["paths"]]
    for path in files.remove_stale_temporaries(parents):
        log.info("removed %s, left by a run that did not finish", path)
