"""The thin Prefect tasks, one per step, named in our user's words (generate_data, ...).

Each calls the step's plain function through `Step.run` and returns the output path. No Prefect
retries: the download retries by itself (weights.retries, with backoff), and a training failure
is a real error.
Results are paths, never models or arrays, and nothing is cached by Prefect: DVC decides what
is up to date.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from headstart import params as params_module
from tasks import STEPS, Step


def _make_task(step: Step):
    @task(name=step.task_name, cache_policy=NO_CACHE, persist_result=False)  # fmt: skip
    def run_step(root: str) -> str:
        params = params_module.load(Path(root) / params_module.PARAMS_FILE)
        return str(step.run(params, root))

    return run_step


TASKS = {step.name: _make_task(step) for step in STEPS}
generate_data = TASKS["prepare"]
fit_baseline = TASKS["baseline"]
download_weights = TASKS["weights"]
freeze_backbone = TASKS["freeze"]
train_head = TASKS["head"]
select_model = TASKS["select"]
evaluate = TASKS["evaluate"]
plot_results = TASKS["plots"]
export_model = TASKS["export"]
