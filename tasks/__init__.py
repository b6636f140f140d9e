"""The pipeline's steps, in order: the one list the CLI, the Prefect flow and dvc.yaml agree on
(tests/test_stages.py checks dvc.yaml against it).

Each step is a plain function `run(params, root) -> output folder` in its own module, with no
Prefect inside; no step imports another step (what they share lives in `headstart/`). The
Prefect tasks wrapping them are in `tasks/prefect_tasks.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from headstart import files, pipeline
from headstart.errors import UserError
from headstart.params import Params
from headstart.quiet import start_tensorflow
from tasks import baseline, evaluate, export, freeze, head, plots, prepare, select, weights


@dataclass(frozen=True)
class Step:
    name: str  # stage name in dvc.yaml and `headstart step NAME`
    task_name: str  # Prefect task name, in our user's words
    output: str  # the `paths` key of the folder it writes (stamped with its parameters)
    function: Callable[[Params, Path], Path]
    tensorflow: bool = True  # Step.run starts TensorFlow first (False: the step cannot need
    # it, as prepare and plots, or starts it itself only when it does, as export)

    def run(self, params: Params, root: Path | str = ".", wait: bool = False) -> Path:
        """The step on the paths from params, holding the workspace lock, its output stamped
        with the parameters it ran with (no Prefect involved). TensorFlow is started first
        (quietly, headstart.quiet) by the steps that run it, and only by them."""
        files.check_replaceable(params.path(self.output, root))  # an instant refusal, before
        if self.tensorflow:  # TensorFlow starts (run_step checks again, holding the lock)
            start_tensorflow()
        return pipeline.run_step(
            self.name, self.function, params, Path(root), wait=wait, output=self.output
        )

    def written_with(self, params: Params, root: Path | str) -> bool:
        return pipeline.written_with(self.name, self.output, params, root)


STEPS = (
    Step("prepare", "generate_data", "prepared", prepare.run, tensorflow=False),
    Step("baseline", "fit_baseline", "baseline", baseline.run),
    Step("weights", "download_weights", "weights", weights.run),
    Step("freeze", "freeze_backbone", "backbone", freeze.run),
    Step("head", "train_head", "transfer", head.run),
    Step("select", "select_model", "release", select.run),
    Step("evaluate", "evaluate", "metrics", evaluate.run),
    Step("plots", "plot_results", "plots", plots.run, tensorflow=False),
    Step("export", "export_model", "export", export.run, tensorflow=False),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def get(name: str) -> Step:
    for step in STEPS:
        if step.name == name:
            return step
    raise UserError(f"unknown step '{name}' (steps: {', '.join(STEP_NAMES)})")
