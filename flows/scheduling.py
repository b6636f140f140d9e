"""Scheduled retraining: a Prefect deployment of `retrain_flow`, served on a cron or interval.

Prefect's temporary (ephemeral) server cannot run schedules, so `serve` uses the server in
PREFECT_API_URL, or starts a real local one (SQLite, 127.0.0.1, analytics off) and says so.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prefect import flow, get_run_logger

from flows.pipeline import pipeline_flow
from headstart import dvcstate
from headstart import params as params_module
from headstart.errors import UserError
from headstart.lock import workspace_lock
from headstart.promotion import promote_from_params

log = logging.getLogger("headstart.schedule")


@flow(name="headstart-retrain", log_prints=True)
def retrain_flow(root: str = ".") -> dict:
    """Refresh the data, retrain only what changed, and promote the new model only if the
    promotion rule (params.yaml `promotion`, headstart/promotion.py) lets it replace the current
    one on the test split."""
    with workspace_lock(root, wait=True):  # a manual run in progress: retrain after it
        return _retrain(root)


def _retrain(root: str) -> dict:
    logger = get_run_logger()
    params = params_module.load(Path(root) / params_module.PARAMS_FILE)
    if dvcstate.has_remote(root):
        logger.info("refreshing data: dvc pull data.dvc")
        dvcstate.pull_data(root)
    stale = dvcstate.stale_stages(root)
    champion = params.path("champion", root) / "model.keras"
    if not stale and champion.exists():
        logger.info("data, parameters and code unchanged: no retraining")
        return {"retrained": False, "promotion": None}
    result = pipeline_flow(root=root, wait=True) if stale else None
    decision = promote_from_params(params, root)
    if decision["promoted"]:
        dvcstate.track(root, params.paths.champion)
    logger.info("promotion: %s (%s)", "replaced the current model" if decision["promoted"]
                else "kept the current model", decision["reason"])  # fmt: skip
    return {"retrained": result is not None, "promotion": decision}


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


def start_local_server(state_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` on 127.0.0.1 with a SQLite database in `state_dir`."""
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
    command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--analytics-off", "--no-ui"]  # fmt: skip
    with open(state_dir / "server.log", "ab") as server_log:
        process = subprocess.Popen(command, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api_url, process=process)
    except BaseException:
        process.terminate()
        raise
    return process, api_url


def serve(root: Path, name: str = "scheduled-retraining", cron: str | None = "0 3 * * *",
          interval: float | None = None) -> None:  # fmt: skip
    """Serve the retraining deployment until interrupted (Ctrl-C or SIGTERM)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params_module.load(root / "params.yaml")  # fail fast on bad parameters
    api_url = os.environ.get("PREFECT_API_URL", "")
    server = None
    if api_url:
        wait_healthy(api_url, timeout=15)
    else:
        server, api_url = start_local_server(root / ".prefect")
        print(f"started a local Prefect server at {api_url} (database in {root / '.prefect'}); "
              "it stops with this command. Set PREFECT_API_URL to use your own server.",
              flush=True)  # fmt: skip
    schedule = {"interval": interval} if interval else {"cron": cron}
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            retrain_flow.serve(name=name, parameters={"root": str(root)}, limit=1, **schedule)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
