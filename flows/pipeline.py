"""The pipeline as a Prefect 3 flow: stale steps only (DVC decides), outputs recorded in dvc.lock.

headstart run                                # or: python -m flows.pipeline
headstart run --workers 4                    # the steps on a local Dask cluster of 4 processes
headstart run --dask-address tcp://host:8786 # ... or on an existing Dask cluster

On Dask (Prefect's DaskTaskRunner), the baseline fit runs in a worker process beside the
weights -> freeze -> head branch, and a stale head's feature cache is computed as one task per
shard (paths and row ranges in, a file out) plus an assembling task, before the head task finds
the cache current. The steps before and after those run in order: on an existing cluster as
worker tasks too, on a local one (`--workers`) in the flow's own process as in a plain run (the
same machine either way, without a TensorFlow start per step). The flow keeps the workspace lock
and lends it to its workers.
"""

from __future__ import annotations

import contextvars
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from headstart import dvcstate, features
from headstart import params as params_module
from headstart.artifacts import REPORT_FILE, SELECTION_FILE
from headstart.errors import UserError
from headstart.files import read_json
from headstart.lock import handoff_token, record_prefect_server, workspace_lock
from headstart.pipeline import clean_up
from headstart.runsummary import run_summary
from tasks import STEP_NAMES, STEPS, get
from tasks.prefect_tasks import TASKS, assemble_features, extract_features

BRANCHES = (("baseline",), ("weights", "freeze", "head"))  # independent: run side by side on Dask
SHARDS_PER_WORKER = 2  # a little slack for uneven shards


@flow(name="headstart-pipeline", log_prints=True)
def pipeline_flow(
    root: str = ".",
    force: bool = False,
    wait: bool = False,
    workers: int = 1,
    dask_address: str = "",
    data: str = "auto",
    echo: bool = False,
) -> dict:
    """Run every stale step in order (all of them with `force`), then record each step's outputs
    in dvc.lock so `dvc status` is clean and `dvc push` has everything. Holds the workspace lock
    throughout (`wait`: queue behind a run that holds it, instead of failing at once).
    `workers` > 1: on a local Dask cluster of that many processes; `dask_address`: on the Dask
    cluster there. `data`: how the data folder and its DVC record are brought in line first
    (headstart.dvcstate.sync_data; `keep`: the caller did it). `echo`: also write one line per
    step to stdout (what `headstart run` shows while the logs go to a file)."""
    check_scale(workers, dask_address)
    with workspace_lock(root, wait=wait):
        params = params_module.load(Path(root) / params_module.PARAMS_FILE)  # fail fast
        if data != "keep":
            synced = dvcstate.sync_data(root, params.paths.data, data)
            if synced:
                get_run_logger().info(synced)
        clean_up(params, root)  # no step is writing: this process holds the lock, between steps
        record_prefect_server(root)
        run = _Run(root, params, force, echo)
        if workers == 1 and not dask_address:
            for step in STEPS:
                run.step(step.name, TASKS[step.name])
        else:
            _run_on_dask(run, workers, dask_address)
        return run.finish()


def check_scale(workers: int, dask_address: str) -> None:
    """One-line errors for a bad --workers or --dask-address (one that nothing answers)."""
    if workers < 1:
        raise UserError(f"--workers: must be 1 or more (got {workers})")
    if not dask_address:
        return
    if workers != 1:
        raise UserError("--workers and --dask-address: give one (the cluster has its workers)")
    url = urlsplit(dask_address)
    try:
        host, port = url.hostname, url.port
    except ValueError:
        host = port = None
    if url.scheme not in ("tcp", "tls") or not host or not port:
        raise UserError(
            f"--dask-address {dask_address}: expected tcp://HOST:PORT, the address "
            "`dask scheduler` prints"
        )
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        raise UserError(
            f"--dask-address {dask_address}: no Dask scheduler answers there "
            f"({err.strerror or err}); start one or fix the address"
        ) from None


class _Run:
    """One flow run's steps: each checked with DVC, run if stale, recorded in dvc.lock."""

    def __init__(self, root: str, params, force: bool, echo: bool = False):
        self.root, self.params, self.force, self.echo = root, params, force, echo
        self.ran, self.skipped, self.seconds, self.unrecorded = [], [], {}, []
        self.dvc = threading.Lock()  # one DVC call at a time (branches run side by side)

    def step(self, name: str, call) -> None:
        logger, step = get_run_logger(), get(name)
        with self.dvc:
            changes = dvcstate.changed(self.root, name)
        if not self.force and not changes:
            logger.info("%s: up to date, skipped", name)
            self._say(f"{name:9s} up to date")
            self.skipped.append(name)
            return
        logger.info(
            "%s: running (%s)", name, "forced" if self.force and not changes else _describe(changes)
        )
        started = time.perf_counter()
        try:
            call(self.root)
        except UserError as err:
            raise UserError(f"{name}: {err}") from None
        if not step.written_with(self.params, self.root):
            raise UserError(
                f"{name}: {getattr(self.params.paths, step.output)} was not written with the "
                "current parameters (changed by another process during this run?); run again"
            )
        with self.dvc:
            problem = dvcstate.commit(self.root, name)
        if problem:
            logger.warning("%s: not recorded in dvc.lock: %s", name, problem)
            self.unrecorded.append(f"{name} ({problem})")
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.ran.append(name)
        figure = headline(name, self.params, Path(self.root))
        self._say(
            f"{name:9s} ran in {self.seconds[name]:.1f} s" + (f": {figure}" if figure else "")
        )

    def _say(self, line: str) -> None:
        """A step's one line: on stdout for `headstart run` (the console), else logged (a
        scheduled run's log shows the same lines)."""
        if self.echo:  # not print(): the flow's log_prints would make it a log record
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        else:
            get_run_logger().info(line)

    def finish(self) -> dict:
        ran = sorted(self.ran, key=STEP_NAMES.index)
        summary = run_summary(
            Path(self.root), self.params, STEP_NAMES, ran, self.skipped, self.seconds
        )
        if self.unrecorded:
            summary += f"\n**Not recorded in dvc.lock**: {'; '.join(self.unrecorded)}\n"
        create_markdown_artifact(
            markdown=summary, key="headstart-run-summary", description="headstart pipeline run"
        )
        return {"ran": ran, "skipped": self.skipped, "seconds": self.seconds, "summary": summary}


def _run_on_dask(run: _Run, workers: int, dask_address: str) -> None:
    """The BRANCHES side by side as tasks on a Dask cluster (local: `workers` processes, started
    with spawn, distributed's default), the other steps in order: on the cluster too when it is
    an existing one, here when it is local."""
    from prefect_dask import DaskTaskRunner

    run.root = str(Path(run.root).resolve())  # workers may run elsewhere
    token = handoff_token(run.root)
    runner = (
        DaskTaskRunner(address=dask_address)
        if dask_address
        else DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "env": _plain_threads(),
            }
        )
    )

    def submit(task, **parameters):
        return runner.submit(task, {"root": run.root, "token": token, **parameters})

    parallel = [name for branch in BRANCHES for name in branch]

    def call(name: str):
        if name not in parallel and not dask_address:
            return TASKS[name]

        def on_dask(root: str) -> None:
            if name == "head":
                _features_on_dask(run, submit, shards)
            submit(TASKS[name]).result()

        return on_dask

    def in_order(names) -> None:
        for name in names:
            run.step(name, call(name))

    first = STEP_NAMES.index(parallel[0])
    with runner:
        shards = SHARDS_PER_WORKER * sum(runner.client.nthreads().values())
        get_run_logger().info("running on Dask: %s, %d feature shards", runner.client, shards)
        in_order(STEP_NAMES[:first])
        with ThreadPoolExecutor(len(BRANCHES)) as pool:
            branches = [
                pool.submit(contextvars.copy_context().run, in_order, branch) for branch in BRANCHES
            ]
            for branch in branches:
                branch.result()
        in_order([name for name in STEP_NAMES[first:] if name not in parallel])


def _plain_threads() -> dict:
    """Dask's nanny starts workers with OMP/MKL/OPENBLAS_NUM_THREADS=1, and numpy then sums in
    another order than in a plain run (last-bit differences in the metrics): local workers get
    this process's settings, or the libraries' default (one thread per core)."""
    return {
        name: os.environ.get(name, str(os.cpu_count()))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }


def _features_on_dask(run: _Run, submit, shards: int) -> None:
    """The head's feature cache, one task per shard, then the assembling task (unless current)."""
    params, root = run.params, run.root
    prepared, features_dir = params.path("prepared", root), params.path("features", root)
    key = features.params_key(params, root)
    if features.is_current(features_dir, key):
        return
    futures = [
        submit(
            extract_features,
            split=shard.split,
            view=shard.view,
            start=shard.start,
            stop=shard.stop,
            key=key,
        )
        for shard in features.plan(prepared, features.params_views(params), shards)
    ]
    for future in futures:
        future.result()  # a shard that failed twice fails the run: never a short cache
    submit(assemble_features, shards=shards).result()


def headline(name: str, params, root: Path) -> str:
    """A step's headline figure, from the output it just wrote ("" for steps without one)."""
    if name == "prepare":
        totals = read_json(params.path("data_report", root) / REPORT_FILE)["totals"]
        return (
            f"{totals['used']} images ({totals['train']} train / {totals['val']} val / "
            f"{totals['test']} test), {totals['quarantined']} quarantined"
        )
    if name == "select":
        selection = read_json(params.path("release", root) / SELECTION_FILE)
        return f"released {selection['winner']}"
    if name == "evaluate":
        release = read_json(params.path("metrics", root) / "release.json")
        return f"release test accuracy {release['accuracy']:.4f} on {release['test_images']} images"
    return ""


def _describe(changes: list) -> str:
    kinds = sorted({key for entry in changes if isinstance(entry, dict) for key in entry})
    return ", ".join(kinds) or "changed"


if __name__ == "__main__":
    print(pipeline_flow()["summary"])
