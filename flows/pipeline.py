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
from headstart.files import read_json
from headstart.lock import workspace_lock
from headstart.pipeline import STEPS, clean_up, written_with
from tasks.prefect_tasks import TASKS


@flow(name="headstart-pipeline", log_prints=True)
def pipeline_flow(root: str = ".", force: bool = False, params_file: str = "params.yaml",
                  wait: bool = False) -> dict:  # fmt: skip
    """Run every stale step in order (all of them with `force`), then record each step's outputs
    in dvc.lock so `dvc status` is clean and `dvc push` has everything. Holds the workspace lock
    throughout (`wait`: queue behind a run that holds it, instead of failing at once)."""
    with workspace_lock(root, wait=wait):
        params = params_module.load(Path(root) / params_file)  # fail fast on bad parameters
        clean_up(params, root)  # no step is writing: this process holds the lock, between steps
        return _run_steps(root, params, params_file, force)


def _run_steps(root: str, params, params_file: str, force: bool) -> dict:
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
            TASKS[step.name](root, params_file)
        except UserError as err:
            raise UserError(f"{step.name}: {err}") from None
        if not written_with(step, params, root):
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
    summary = run_summary(Path(root), params, ran, skipped, seconds)
    if unrecorded:
        summary += f"\n**Not recorded in dvc.lock**: {'; '.join(unrecorded)}\n"
    create_markdown_artifact(markdown=summary, key="headstart-run-summary",
                             description="headstart pipeline run")  # fmt: skip
    return {"ran": ran, "skipped": skipped, "seconds": seconds, "summary": summary}


def _describe(changes: list) -> str:
    kinds = sorted({key for entry in changes if isinstance(entry, dict) for key in entry})
    return ", ".join(kinds) or "changed"


def run_summary(root: Path, params, ran: list[str], skipped: list[str], seconds: dict) -> str:
    """Markdown: data counts and quarantine, baseline vs transfer on test, timings, plots."""
    lines = ["# headstart run", ""]
    report_path = params.path("prepared", root) / "report.json"
    if report_path.exists():
        totals = read_json(report_path)["totals"]
        lines += [
            f"**Data**: {totals['seen']} files, {totals['used']} used "
            f"({totals['train']} train / {totals['val']} val / {totals['test']} test), "
            f"{totals['quarantined']} quarantined, {totals['ignored']} ignored "
            f"(details: `{report_path.relative_to(root)}`)",
            "",
        ]
    lines += candidates_table(root, params)
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    for step in STEPS:
        status = "ran" if step.name in ran else "up to date" if step.name in skipped else "-"
        lines.append(f"| {step.name} | {status} | {seconds.get(step.name, '')} |")
    lines += [
        "",
        f"**Plots**: `{params.paths.plots}/` (curves.png, *_confusion.png, release_samples.png, "
        "learning_curve.png)",
    ]
    return "\n".join(lines) + "\n"


def candidates_table(root: Path, params) -> list[str]:
    """Every candidate with validation and test figures, the released one marked, and why."""
    selection_path = params.path("release", root) / "selection.json"
    metrics_dir = params.path("metrics", root)
    if not selection_path.exists() or not (metrics_dir / "release.json").exists():
        return []
    selection = read_json(selection_path)
    lines = ["| model | val accuracy | val macro-F1 | test accuracy | test macro-F1 | |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, val in selection["candidates"].items():
        test = read_json(metrics_dir / f"{name}.json")
        mark = "**released**" if name == selection["winner"] else ""
        label = "transfer (fine-tuned)" if name == "transfer" and selection[
            "transfer_is_finetuned"] else name  # fmt: skip
        if name == "ensemble":
            label += " (mean of both)"
        lines.append(f"| {label} | {val['val_accuracy']:.4f} | {val['val_macro_f1']:.4f} | "
                     f"{test['accuracy']:.4f} | {test['macro_f1']:.4f} | {mark} |")  # fmt: skip
    lines += ["", f"**Released**: {selection['winner']}, chosen on {selection['reason']} "
              f"(the test split was not looked at). Model: `{params.paths.release}/model.keras`.",
              ""]  # fmt: skip
    curve = metrics_dir / "learning_curve.json"
    if curve.exists():
        points = read_json(curve)["points"]
        lines += ["**Learning curve** (CV accuracy of a linear head on the features): "
                  + ", ".join(f"{k} of the training images ({v['images']}): {v['cv_accuracy']:.3f}"
                              for k, v in points.items()), ""]  # fmt: skip
    return lines


if __name__ == "__main__":
    print(pipeline_flow()["summary"])
