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
        logger.info("data, parameters and code unchanged, and the release already compared "
                    "with the current model: no retraining")  # fmt: skip
        return {"retrained": False, "promotion": None}
    result = pipeline_flow.fn(root=root, wait=True, data="keep") if stale else None
    decision = promote_from_params(params, root)
    if decision["promoted"]:
        dvcstate.track(root, params.paths.champion)
    write_json(last, {"pair": list(_pair(release, champion)), "promoted": decision["promoted"]})
    verdict = "replaced the current model" if decision["promoted"] else "kept the current model"
    text = (result["summary"] if result else "No step was stale; the release (built by an "
            "earlier run) was compared with the current model.\n")  # fmt: skip
    text += f"\n**Promotion**: {verdict} ({decision['reason']})\n"
    logger.info("retraining summary:\n%s", text)
    create_markdown_artifact(markdown=text, key="headstart-retrain-summary",
                             description="headstart scheduled retraining")  # fmt: skip
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
          interval: float | None = None, data: str = "auto") -> None:  # fmt: skip
    """Serve the retraining deployment until interrupted (Ctrl-C or SIGTERM)."""
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
        print(f"started a local Prefect server at {api_url} (database in {root / '.prefect'}); "
              "it stops with this command. Set PREFECT_API_URL to use your own server.",
              flush=True)  # fmt: skip
    schedule = {"interval": interval} if interval else {"cron": cron}
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            retrain_flow.serve(name=name, parameters={"root": str(root), "data": data}, limit=1,
                               **schedule)  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
