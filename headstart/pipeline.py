"""The pipeline's steps in order: the one list the CLI, the Prefect flow and dvc.yaml agree on."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from headstart.params import Params


@dataclass(frozen=True)
class Step:
    name: str  # stage name in dvc.yaml and `headstart step NAME`
    task_name: str  # Prefect task name, in our user's words

    def run(self, params: Params, root: Path | str = ".") -> Path:
        """Run the step's plain function on the paths from params (no Prefect involved)."""
        module = importlib.import_module(f"tasks.{self.name}")
        return module.run(params, Path(root))


STEPS = (
    Step("prepare", "generate_data"),
    Step("baseline", "fit_baseline"),
    Step("weights", "download_weights"),
    Step("freeze", "freeze_backbone"),
    Step("head", "train_head"),
    Step("evaluate", "evaluate"),
    Step("plots", "plot_results"),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def get(name: str) -> Step:
    for step in STEPS:
        if step.name == name:
            return step
    from headstart.errors import UserError

    raise UserError(f"unknown step '{name}' (steps: {', '.join(STEP_NAMES)})")
