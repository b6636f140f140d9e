"""Scheduled retraining: a Prefect deployment of `retrain_flow`, served on a cron or interval.

Prefect's temporary (ephemeral) server cannot run schedules, so `serve` uses the server in
PREFECT_API_URL, or starts a real local one (SQLite, 127.0.0.1, analytics off) and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.pipeline import pipeline_flow
from headstart import dvcstate, quiet
from headstart import params as params_module
from headstart.artifacts import MODEL_FILE
from headstart.errors import UserError
from headstart.files import read_json, sha256_file, write_json
from headstart.lock import STATE_DIR, workspace_lock
from headstart.promotion import promote_from_params

log = logging.getLogger("headstart.schedule")


@flow(name="headstart-retrain", log_prints=True)
def retrain_flow(root: str = ".", data: str = "auto"):
    """Bring in new data (`data`: headstart.dvcstate.sync_data: images added to the data folder
    are recorded as a new data.dvc version), retrain what is stale, and promote the release only
    if the promotion rule (params.yaml `promotion`, headstart/promotion.py) lets it replace the
    current model. Logs the run's summary and keeps it as a markdown artifact. A cause the user
    can fix is one log line and a Failed run (no traceback); the next run tries again."""
    quiet.hide_user_error_tracebacks()
    try:
        with workspace_lock(root, wait=True):  # a manual run in progress: retrain after it
            return _retrain(root, data)
    except UserError as err:
        return Failed(message=f"retraining failed: {err}")


LAST_DECISION = "promotion.json"  # in the lock's folder: the last release/champion compared


def _retrain(root: str, data: str) -> dict:
    logger = get_run_logger()
    params = params_module.load(Path(root) / params_module.PARAMS_FILE)
    synced = dvcstate.sync_data(root, params.paths.data, data)
    if synced:
        logger.info(synced)
    stale = dvcstate.stale_stages(root)
    release = params.path("release", root) / MODEL_FILE
    champion = params.path("champion", root) / MODEL_FILE
    pair = _pair(release, champion)
    last = Path(root) / STATE_DIR / LAST_DECISION
    if (
        not stale
        and champion.exists()
        and (pair[0] == pair[1] or (last.is_file() and read_json(last).get("pair") == list(pair)))
    ):
        logger.info(
            "data, parameters and code unchanged, and the release already compared "
            "with the current model: no retraining"
        )
        return {"retrained": False, "promotion": None}
    result = pipeline_flow.fn(root=root, wait=True, data="keep") if stale else None
    quiet.start_tensorflow()  # promotion scores both models: TensorFlow without its start-up lines
    decision = promote_from_params(params, root)
    if decision["promoted"]:
        dvcstate.track(root, params.paths.champion)
    write_json(last, {"pair": list(_pair(release, champion)), "promoted": decision["promoted"]})
    verdict = "replaced the current model" if decision["promoted"] else "kept the current model"
    text = (
        result["summary"]
        if result
        else "No step was stale; the release (built by an "
        "earlier run) was compared with the current model.\n"
    )
    text += f"\n**Promotion**: {verdict} ({decision['reason']})\n"
    logger.info("retraining summary:\n%s", text)
    create_markdown_artifact(
        markdown=text, key="headstart-retrain-summary", description="headstart scheduled retraining"
    )
    return {"retrained": result is not None, "promotion": decision, "summary": text}


def _pair(release: Path, champion: Path) -> tuple[str, str]:
    """sha256 of the release's and the champion's model files ("" where there is none)."""
    return tuple(sha256_file(path) if path.is_file() else "" for path in (release, champion))


def _free_port(preferred: int = 4200) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]


def wait_healthy(api_url: str, timeout: float = 90.0, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise UserError(f"the local Prefect server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise UserError(f"Prefect server at {api_url} is not answering; check PREFECT_API_URL")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _tie_to(parent: int):
    """A preexec_fn: the child gets SIGTERM from the kernel when `parent` dies, however it dies
    (kill -9, the OOM killer), so no server outlives the command that started it. Linux only."""

    def tie() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)

    return tie if sys.platform.startswith("linux") else None


def start_local_server(
    state_dir: Path, port: int | None = None, tied: bool = True
) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` on 127.0.0.1 with a SQLite database in `state_dir`, in a
    session of its own (a Ctrl-C at the terminal reaches the command that owns it, which stops
    it, not the server first); `tied`: it dies with this process."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    env = {
        **os.environ,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state_dir / 'server.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    command = [
        str(prefect),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--analytics-off",
        "--no-ui",
    ]
    with open(state_dir / "server.log", "ab") as server_log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_tie_to(os.getpid()) if tied else None,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api_url, process=process)
    except BaseException:
        stop_server(process)
        raise
    return process, api_url


def stop_server(process: subprocess.Popen, timeout: float = 8.0) -> None:
    """Stop a server started by `start_local_server` and everything it started."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(
    root: Path,
    name: str = "scheduled-retraining",
    cron: str | None = "0 3 * * *",
    interval: float | None = None,
    data: str = "auto",
) -> None:
    """Serve the retraining deployment until SIGINT (Ctrl-C) or SIGTERM, which stop it within
    seconds: a run in progress is cancelled (Prefect's runner), the local server stopped.

    Prefect's runner (what `flow.serve` starts) runs in a thread of its own, so this one keeps
    the signals: in the main thread it would take SIGTERM for itself, and under asyncio a
    Ctrl-C only cancels a task the runner waits out."""
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params_module.load(root / "params.yaml")  # fail fast on bad parameters
    if data not in dvcstate.DATA_MODES:
        raise UserError(f"--data {data}: must be one of {', '.join(dvcstate.DATA_MODES)}")
    api_url = os.environ.get("PREFECT_API_URL", "")
    server = None
    if api_url:
        wait_healthy(api_url, timeout=15)
    else:
        server, api_url = start_local_server(root / ".prefect")
        print(
            f"started a local Prefect server at {api_url} (database in {root / '.prefect'}); "
            "it stops with this command. Set PREFECT_API_URL to use your own server.",
            flush=True,
        )
    schedule = {"interval": interval} if interval else {"cron": cron}
    received: list[int] = []
    wake = threading.Event()

    def on_signal(number, frame) -> None:
        received.append(number)
        wake.set()

    previous = {
        number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            runner = Runner(name=name, limit=1)
            runner.add_flow(
                retrain_flow, name=name, parameters={"root": str(root), "data": data}, **schedule
            )
            context = contextvars.copy_context()  # the settings, in the runner's thread too
            thread = threading.Thread(
                target=context.run,
                name="prefect-runner",
                daemon=True,
                args=(asyncio.run, runner.start()),
            )
            thread.start()
            when = f"every {interval:g} s" if interval else f"on cron '{cron}'"
            print(
                f"serving {retrain_flow.name}/{name} {when}; Ctrl-C or SIGTERM stops it", flush=True
            )
            while thread.is_alive() and not wake.wait(0.5):
                pass
            if thread.is_alive() and runner.started:
                runner.handle_sigterm()  # cancels a run in progress, stops polling
                thread.join(timeout=5)  # (not started yet: the thread ends with this process)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if server is not None:
            stop_server(server, timeout=3)
    cause = f" ({signal.Signals(received[0]).name})" if received else ""
    print(f"headstart schedule: stopped{cause}", file=sys.stderr, flush=True)
