"""The pipeline as a Prefect 3 flow: stale steps only (DVC decides), outputs recorded in dvc.lock.

headstart run            # or: python -m flows.pipeline
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from headstart import dvcstate
from headstart import params as params_module
from headstart.errors import UserError
from headstart.lock import workspace_lock
from headstart.pipeline import clean_up
from headstart.runsummary import run_summary
from tasks import STEP_NAMES, STEPS
from tasks.prefect_tasks import TASKS


@flow(name="headstart-pipeline", log_prints=True)
def pipeline_flow(root: str = ".", force: bool = False, wait: bool = False) -> dict:
    """Run every stale step in order (all of them with `force`), then record each step's outputs
    in dvc.lock so `dvc status` is clean and `dvc push` has everything. Holds the workspace lock
    throughout (`wait`: queue behind a run that holds it, instead of failing at once)."""
    with workspace_lock(root, wait=wait):
        params = params_module.load(Path(root) / params_module.PARAMS_FILE)  # fail fast
        clean_up(params, root)  # no step is writing: this process holds the lock, between steps
        return _run_steps(root, params, force)


def _run_steps(root: str, params, force: bool) -> dict:
    logger = get_run_logger()
    ran, skipped, seconds, unrecorded = [], [], {}, []
    for step in STEPS:
        changes = dvcstate.changed(root, step.name)
        if not force and not changes:
            logger.info("%s: up to date, skipped", step.name)
            skipped.append(step.name)
            continue
        logger.info("%s: running (%s)", step.name, "forced" if force and not changes else
                    _describe(changes))  # fmt: skip
        started = time.perf_counter()
        try:
            TASKS[step.name](root)
        except UserError as err:
            raise UserError(f"{step.name}: {err}") from None
        if not step.written_with(params, root):
            raise UserError(
                f"{step.name}: {getattr(params.paths, step.output)} was not written with the "
                "current parameters (changed by another process during this run?); run again"
            )
        problem = dvcstate.commit(root, step.name)
        if problem:
            logger.warning("%s: not recorded in dvc.lock: %s", step.name, problem)
            unrecorded.append(f"{step.name} ({problem})")
        seconds[step.name] = round(time.perf_counter() - started, 2)
        ran.append(step.name)
    summary = run_summary(Path(root), params, STEP_NAMES, ran, skipped, seconds)
    if unrecorded:
        summary += f"\n**Not recorded in dvc.lock**: {'; '.join(unrecorded)}\n"
    create_markdown_artifact(markdown=summary, key="headstart-run-summary",
                             description="headstart pipeline run")  # fmt: skip
    return {"ran": ran, "skipped": skipped, "seconds": seconds, "summary": summary}


def _describe(changes: list) -> str:
    kinds = sorted({key for entry in changes if isinstance(entry, dict) for key in entry})
    return ", ".join(kinds) or "changed"


if __name__ == "__main__":
    print(pipeline_flow()["summary"])
