"""prefect.yaml on a Prefect work pool, as the README tells a user to do on other machines: a
real Prefect server, `prefect work-pool create`, `prefect deploy`, `prefect worker start` and a
run triggered by `prefect deployment run`, executed by the worker inside the project. The worker
runs with `--run-once`: it exits by itself once the run ends (a Ctrl-C shutdown of a long-running
worker sometimes took over 30 s on this loaded machine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

import pytest
from helpers import ROOT, command_env, run_in

pytestmark = pytest.mark.slow

POOL = "headstart"  # the work pool prefect.yaml names
DEPLOYMENT = "headstart-retrain/scheduled-retraining"


def test_a_worker_runs_the_deployed_retraining_in_the_project(
    trained_copy, trained_project, tmp_path
):
    root = trained_copy
    shutil.copy(ROOT / "prefect.yaml", root / "prefect.yaml")  # the file under review
    shutil.rmtree(root / "artifacts/plots")  # something for the run to rebuild (plots only)
    api_url = trained_project.api_url  # the test harness's server: a real Prefect API
    run_in(root, "prefect", "work-pool", "create", POOL, "--type", "process", api_url=api_url)
    deployed = run_in(root, "prefect", "--no-prompt", "deploy", "--all", api_url=api_url)
    assert "scheduled-retraining" in deployed.stdout, deployed.stdout

    # a run now, not at 03:00: created on the server, waiting for a worker of the pool
    triggered = run_in(root, "prefect", "deployment", "run", DEPLOYMENT, api_url=api_url)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout)
    assert run_id, triggered.stdout

    # elsewhere: the worker starts outside the project (prefect.yaml's pull step moves each run
    # into HEADSTART_ROOT); --run-once: it runs what is due, waits for it, and exits by itself
    env = {**command_env(api_url), "HEADSTART_ROOT": str(root)}
    worker = subprocess.run(
        ["prefect", "worker", "start", "--pool", POOL, "--run-once", "--limit", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = f"{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    assert worker.returncode == 0, output
    assert flow_run_state(api_url, run_id.group(1)) == "COMPLETED", output

    # the run rebuilt what was missing, in the project, recorded it and installed a champion
    assert (root / "artifacts/plots/release_samples.png").is_file()
    assert (root / "models/champion/model.keras").is_file()
    assert run_in(root, "dvc", "status", "--json").stdout.strip() == "{}"


def flow_run_state(api_url: str, run_id: str) -> str:
    with urllib.request.urlopen(f"{api_url}/flow_runs/{run_id}", timeout=10) as response:
        return json.loads(response.read())["state"]["type"]
