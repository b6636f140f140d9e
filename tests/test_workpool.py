"""prefect.yaml on a Prefect work pool, as the README tells a user to do on other machines: a
real Prefect server, `prefect work-pool create`, `prefect deploy`, `prefect worker start` and a
run triggered by `prefect deployment run`, executed by the worker inside the project."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
from conftest import ROOT, command_env, run_in

pytestmark = pytest.mark.slow

POOL = "headstart"  # the work pool prefect.yaml names
DEPLOYMENT = "headstart-retrain/scheduled-retraining"


def test_a_worker_runs_the_deployed_retraining_in_the_project(trained_copy, trained_project,
                                                              tmp_path):  # fmt: skip
    root = trained_copy
    shutil.copy(ROOT / "prefect.yaml", root / "prefect.yaml")  # the file under review
    shutil.rmtree(root / "artifacts/plots")  # something for the run to rebuild (plots only)
    api_url = trained_project.api_url  # the test harness's server: a real Prefect API
    run_in(root, "prefect", "work-pool", "create", POOL, "--type", "process", api_url=api_url)
    deployed = run_in(root, "prefect", "--no-prompt", "deploy", "--all", api_url=api_url)
    assert "scheduled-retraining" in deployed.stdout, deployed.stdout

    # elsewhere: the worker starts outside the project; prefect.yaml's pull step moves each run
    # into HEADSTART_ROOT
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen(
            ["prefect", "worker", "start", "--pool", POOL],
            cwd=tmp_path,
            # polling every second instead of Prefect's 10: the run starts without idling
            env={
                **command_env(api_url),
                "HEADSTART_ROOT": str(root),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its flow-run processes can be stopped with it
        )
    try:
        triggered = run_in(root, "prefect", "deployment", "run", DEPLOYMENT, "--watch",
                           "--watch-timeout", "300", check=False, api_url=api_url)  # fmt: skip
    finally:
        stop(worker)
    output = f"{triggered.stdout}\n{triggered.stderr}\nworker:\n{worker_log.read_text()[-4000:]}"
    assert triggered.returncode == 0, output
    assert "finished successfully in 'Completed'" in triggered.stdout, output
    assert worker.returncode == 0, output

    # the run rebuilt what was missing, in the project, recorded it and installed a champion
    assert (root / "artifacts/plots/release_samples.png").is_file()
    assert (root / "models/champion/model.keras").is_file()
    assert run_in(root, "dvc", "status", "--json").stdout.strip() == "{}"


def stop(worker: subprocess.Popen) -> None:
    """Ctrl-C for the worker (it shuts down cleanly); then nothing of it is left running."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    try:
        os.killpg(worker.pid, signal.SIGKILL)  # a flow-run process it left behind
    except ProcessLookupError:
        pass
