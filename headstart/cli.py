"""The `headstart` command. Heavy imports (TensorFlow, Prefect, DVC) happen inside commands,
so `headstart --help` stays instant."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from headstart import quiet
from headstart.errors import UserError


class _OneErrorPath(TyperGroup):
    """Every command's user-fixable failure (a UserError, whatever raised it) ends here: one
    line on stderr, `error: ...`, and exit status 1. Anything else is a bug and keeps its
    traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_OneErrorPath,
    help="headstart: a transfer-learning image classifier, orchestrated by Prefect, versioned by DVC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ProjectOption = Annotated[
    Path,
    typer.Option(
        "--project",
        "-C",
        help="Project folder (its params.yaml, dvc.yaml and artifacts); default: this folder.",
    ),
]


def _quiet_environment() -> None:
    """Defaults that keep TensorFlow, Prefect and DVC quiet and offline-safe (user wins)."""
    for key, value in {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "headstart",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }.items():
        os.environ.setdefault(key, value)


WaitOption = Annotated[
    bool, typer.Option("--wait", help="If another run holds this workspace, wait for it.")
]
DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="auto: record added/changed/removed images as a new data.dvc version, pull a "
        "missing data folder | record: record the folder as it is | pull: check out the "
        "version data.dvc records.",
    ),
]


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Debug logs; full tracebacks from Prefect; TensorFlow's start-up lines.",
        ),
    ] = False,
) -> None:
    _quiet_environment()
    quiet.set_verbose(verbose)
    logger = logging.getLogger("headstart")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _log_to_stderr() -> None:
    """Plain progress lines for commands run outside Prefect (inside a flow, Prefect's own
    handlers show the `headstart` loggers, see PREFECT_LOGGING_EXTRA_LOGGERS)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("headstart").addHandler(handler)


@app.command()
def step(
    name: Annotated[
        str,
        typer.Argument(
            help="prepare | baseline | weights | freeze | head | select | evaluate | plots | export"
        ),
    ],
    project: ProjectOption = Path("."),
    wait: WaitOption = False,
) -> None:
    """Run one pipeline step (what each `dvc repro` stage calls)."""
    import tasks
    from headstart import params as params_module
    from headstart import pipeline
    from headstart.lock import TOKEN_ENV, borrowed

    _log_to_stderr()
    token = os.environ.get(TOKEN_ENV)  # a flow's Dask worker: that flow lends its lock
    step = tasks.get(name)
    params = params_module.load(project / params_module.PARAMS_FILE)
    if not wait:  # (with --wait, a run holding the workspace may be making them)
        pipeline.check_inputs(name, params, project)  # before TensorFlow: an instant error
    with borrowed(project, token):
        out = step.run(params, project, wait=wait)
    typer.echo(f"{name}: wrote {out}")


@app.command("export")
def export_release(project: ProjectOption = Path("."), wait: WaitOption = False) -> None:
    """Export the release (SavedModel, LiteRT, ONNX), check each against it on the test split,
    and write the model card: the `export` step, as `headstart step export` runs it, then
    recorded in dvc.lock (as a run records it), so `dvc status` stays clean."""
    from headstart import dvcstate

    step("export", project=project, wait=wait)
    if (project / "dvc.yaml").is_file():
        problem = dvcstate.commit(project, "export")
        if problem:
            typer.echo(f"export: not recorded in dvc.lock: {problem}", err=True)


@app.command()
def run(
    set_: Annotated[
        list[str] | None,
        typer.Option("--set-param", "-S", help="Override section.key=value (written to params)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Run every step, stale or not.")] = False,
    project: ProjectOption = Path("."),
    wait: WaitOption = False,
    workers: Annotated[
        int, typer.Option("--workers", help="Run the steps on a local Dask cluster of N processes.")
    ] = 1,
    dask_address: Annotated[
        str,
        typer.Option(
            "--dask-address", help="Run the steps on the Dask cluster at tcp://HOST:PORT."
        ),
    ] = "",
    data: DataOption = "auto",
) -> None:
    """Trigger a Prefect flow run of the whole pipeline (stale steps only).

    A run that fails leaves params.yaml as it was before its -S values."""
    from headstart import dvcstate
    from headstart import params as params_module
    from headstart.files import write_text
    from headstart.lock import STATE_DIR, workspace_lock

    root = project.resolve()
    params_file = root / params_module.PARAMS_FILE
    before = None
    if workers != 1 or dask_address:
        from flows.pipeline import check_scale

        check_scale(workers, dask_address)  # before anything starts
    # the lock first: -S rewrites params.yaml, which a running flow is reading
    with workspace_lock(root, wait=wait):
        try:
            if set_ and params_file.is_file():
                before = params_file.read_text()
                params_module.write_overrides(params_file, set_)
            params = params_module.load(params_file)
            synced = dvcstate.sync_data(root, params.paths.data, data)
            if synced:
                typer.echo(synced, err=True)
            if not force and _nothing_to_run(root, params):
                return
            from flows.pipeline import pipeline_flow  # (TensorFlow: when a step needs it)

            quiet.hide_user_error_tracebacks()
            quiet.console_to_file(root / STATE_DIR / "run.log")
            result = pipeline_flow(
                root=str(root),
                force=force,
                workers=workers,
                dask_address=dask_address,
                data="keep",
                echo=not quiet.verbose(),
            )
        except BaseException as err:
            if before is not None and params_file.read_text() != before:
                write_text(params_file, before)
                if isinstance(err, UserError):
                    raise UserError(f"{err} (params.yaml is back as it was before -S)") from None
            raise
    typer.echo(result["summary"])


def _nothing_to_run(root: Path, params) -> bool:
    """When DVC says every step is up to date and no Prefect server is configured, print the
    last run's summary and say so, instead of starting Prefect's temporary server (~10 s) to
    skip every step. With a configured server the flow runs, so the run is recorded there."""
    from headstart import dvcstate, prefectconfig
    from headstart.pipeline import clean_up
    from headstart.runsummary import run_summary
    from tasks import STEP_NAMES

    if prefectconfig.api_url(root) or dvcstate.stale_stages(root):
        return False
    clean_up(params, root)  # what the flow does first: leftovers of a killed run
    typer.echo(run_summary(root, params, STEP_NAMES, [], list(STEP_NAMES), {}))
    typer.echo(
        "Every step is up to date (DVC), so no Prefect flow run was started; "
        "`headstart run --force` runs them all."
    )
    return True


@app.command()
def status(project: ProjectOption = Path(".")) -> None:
    """Show which steps are stale (would run) and which are up to date."""
    from headstart import dvcstate
    from headstart import params as params_module

    params_module.load(project / params_module.PARAMS_FILE)
    stale = dvcstate.stale_stages(project)
    from tasks import STEP_NAMES

    for name in STEP_NAMES:
        typer.echo(f"{name:10s} {'stale' if name in stale else 'up to date'}")


@app.command()
def review(
    top: Annotated[int, typer.Option("--top", "-n", min=1, help="Suspects listed per kind.")] = 20,
    accept: Annotated[
        int,
        typer.Option(
            "--accept",
            min=0,
            help="Write the top N label suggestions into data-review.yaml as `relabel` "
            "(the next `headstart run` applies them).",
        ),
    ] = 0,
    accept_strong: Annotated[
        bool,
        typer.Option(
            "--accept-strong",
            help="Write every suggestion marked * (strong evidence) as `relabel`.",
        ),
    ] = False,
    exclude_strong: Annotated[
        bool,
        typer.Option(
            "--exclude-strong",
            help="Write every image marked * as `exclude` (its label is doubtful, the "
            "suggested class not checked).",
        ),
    ] = False,
    group_leaks: Annotated[
        bool,
        typer.Option(
            "--group-leaks",
            help="Write every possible leak (two images in different splits whose features "
            "almost match) as `together`: the next run keeps each pair in one split.",
        ),
    ] = False,
    project: ProjectOption = Path("."),
) -> None:
    """List the images the data doctor doubts (likely label errors, off-topic images,
    near-duplicates across classes, possible leaks), from the last run's plots step."""
    if sum([accept_strong, exclude_strong, accept > 0]) > 1:
        raise UserError("review: choose one of --accept N, --accept-strong, --exclude-strong")
    from headstart import params as params_module
    from headstart import review as review_module
    from headstart.doctor import DOCTOR_FILE
    from headstart.files import read_json

    params = params_module.load(project / params_module.PARAMS_FILE)
    found_file = params.path("plots", project) / DOCTOR_FILE
    if not found_file.is_file():
        raise UserError(
            f"{found_file}: missing; run `headstart run` first (the plots step writes it)"
        )
    found = read_json(found_file)
    review_file = project / review_module.REVIEW_FILE
    decided = review_module.load(review_file)
    issues = [s for s in found["label_issues"] if s["file"] not in decided.named()]
    strong = [s for s in issues if s["strong"]]
    typer.echo(
        f"Likely label errors: {len(issues)}, {len(strong)} with strong evidence (*) "
        "(confident learning on out-of-sample probabilities; lowest p(given) first)"
    )
    for n, s in enumerate(issues[:top], 1):
        typer.echo(
            f"{n:4d}.{'*' if s['strong'] else ' '} {s['file']}  [{s['split']}]  "
            f"{s['given']} -> {s['suggested']}  (p(given) {s['self_confidence']:.3f})"
        )
    off_topic = [s for s in found["off_topic"] if s["file"] not in decided.named()]
    typer.echo(f"Off-topic (unlike every class): {len(off_topic)}")
    for s in off_topic[:top]:
        typer.echo(f"      {s['file']}  OOD score {s['ood_score']:.1f} > {s['threshold']:.1f}")
    typer.echo(f"Near-duplicate groups across classes: {len(found['label_conflicts'])}")
    for group in found["label_conflicts"][:top]:
        typer.echo(f"      {', '.join(group['files'])}")
    together = {frozenset(group) for group in decided.together}
    leaks = [
        leak
        for leak in found.get("possible_leaks", [])
        if not any({leak["file"], leak["match"]} <= group for group in together)
    ]
    typer.echo(f"Images almost identical to one in another split (features): {len(leaks)}")
    for leak in leaks[:top]:
        typer.echo(
            f"      {leak['file']}  [{leak['split']}] ~ {leak['match']}  [{leak['match_split']}]"
            f"  (cosine {leak['similarity']:.3f})"
        )
    if group_leaks and leaks:
        decided.together += [[leak["file"], leak["match"]] for leak in leaks]
        review_module.save(decided, review_file)
        typer.echo(
            f"wrote {len(leaks)} together pair(s) to {review_file}; the next `headstart run` "
            "puts each pair in one split"
        )
    accepted = strong if accept_strong or exclude_strong else issues[:accept]
    if accepted:
        for s in accepted:
            if exclude_strong:
                decided.exclude.append(s["file"])
            else:
                decided.relabel[s["file"]] = s["suggested"]
        review_module.save(decided, review_file)
        typer.echo(
            f"wrote {len(accepted)} {'exclude' if exclude_strong else 'relabel'} decision(s) "
            f"to {review_file}; check them, then `headstart run`"
        )
    elif issues or off_topic or found["label_conflicts"] or (leaks and not group_leaks):
        typer.echo(  # nothing accepted: say how
            f"Decide in {review_module.REVIEW_FILE} (relabel / exclude / keep / together), or "
            "`headstart review --exclude-strong` (or --accept-strong, --accept N; "
            "--group-leaks); the next run applies it."
        )


@app.command()
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Image files or folders; a first argument ending in .keras is the "
            "model to use (default: the project's release)."
        ),
    ],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    reject: Annotated[
        bool,
        typer.Option(
            "--reject",
            help='Answer "unknown" (with the OOD score and threshold) for images unlike the '
            "training data, instead of a class.",
        ),
    ] = False,
    project: ProjectOption = Path("."),
) -> None:
    """Classify images with the released model (or a .keras model given first).

    Probabilities are calibrated when the model's folder holds calibration.json (a release)."""
    from headstart import predicting

    exports = []
    if inputs and inputs[0].suffix == ".keras":
        model, inputs = inputs[0], inputs[1:]
    else:
        from headstart import params as params_module
        from headstart.artifacts import MODEL_FILE

        params = params_module.load(project / params_module.PARAMS_FILE)
        model = params.path("release", project) / MODEL_FILE
        exports = [params.path("export", project)]  # used when made from this very model
    results = predicting.predict_paths(model, inputs, top_k, reject=reject, export_dirs=exports)
    typer.echo(predicting.render(results, as_json))
    if not as_json and any(r.get("calibrated") and "top" in r for r in results):
        typer.echo("(probabilities calibrated: the temperature in calibration.json)", err=True)
    if any("error" in r for r in results):  # the others are answered above
        raise typer.Exit(2)


@app.command()
def schedule(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 3 * * *'.")] = "0 3 * * *",
    interval: Annotated[
        float | None, typer.Option(help="Instead of cron: every N seconds.")
    ] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled-retraining",
    project: ProjectOption = Path("."),
    data: DataOption = "auto",
) -> None:
    """Serve a Prefect deployment that retrains on a schedule (needs a real Prefect server)."""
    from flows import scheduling

    scheduling.serve(project.resolve(), name=name, cron=cron, interval=interval, data=data)


if __name__ == "__main__":
    app()
