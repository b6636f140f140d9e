"""The thin Prefect tasks, one per step, named in our user's words (generate_data, ...).

Each calls the step's plain function through `Step.run` and returns the output path. No Prefect
retries: the download retries by itself (weights.retries, with backoff), and a training failure
is a real error.
Results are paths, never models or arrays, and nothing is cached by Prefect: DVC decides what
is up to date.

`token`: set when the flow runs its tasks in other processes (Dask workers): the flow holds the
workspace lock and lends it to them with this token (`headstart.lock.borrowed`). The feature
cache's shard tasks (`extract_features`, `assemble_features`) exist for that case only; a shard
retries once (a worker that died mid-shard left no file: the retry writes it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from headstart import params as params_module
from headstart import pipeline
from headstart.errors import UserError
from headstart.lock import TOKEN_ENV, borrowed, workspace_lock
from tasks import STEPS, Step, head


def _params(root: str):
    return params_module.load(Path(root) / params_module.PARAMS_FILE)


def _make_task(step: Step):
    @task(name=step.task_name, cache_policy=NO_CACHE, persist_result=False)
    def run_step(root: str, token: str = "") -> str:
        if token:
            return _in_child(step.name, root, token)
        return str(step.run(_params(root), root))

    return run_step


def _in_child(name: str, root: str, token: str) -> str:
    """`headstart step NAME` in a process of its own (as `dvc repro` runs it), on the lent lock.
    In a Dask worker, the worker's threads draw jitter from Python's global random generator,
    from which Keras also draws the seeds of new layers: a model built there could start from
    other weights than in a plain run (seen for the baseline CNN in 2 of 4 runs)."""
    command = [sys.executable, "-m", "headstart.cli", "step", name, "-C", root]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, TOKEN_ENV: token}
    )
    logger = get_run_logger()
    for line in result.stderr.splitlines():
        logger.info("%s", line)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise UserError(last.removeprefix("error: "))
    return result.stdout.strip().removeprefix(f"{name}: wrote ")


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    task_run_name="extract_features-{split}-view{view}-{start}",
)
def extract_features(
    root: str, split: str, view: int, start: int, stop: int, key: str = "", token: str = ""
) -> str:
    with borrowed(root, token), workspace_lock(root):
        return str(head.extract_shard(_params(root), root, split, view, start, stop, key))


@task(cache_policy=NO_CACHE, persist_result=False)
def assemble_features(root: str, shards: int, token: str = "") -> str:
    def assemble(params, root: Path) -> Path:
        return head.assemble_features(params, root, shards)

    with borrowed(root, token):  # as the head step: its lock, its output stamp
        return str(pipeline.run_step("head", assemble, _params(root), Path(root)))


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
