"""The three ways to run: the Prefect flow (under the test harness), `dvc repro` in a git+DVC
clone, and the served schedule against a real local Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_in, tiny_project

from headstart import dvcstate
from headstart import params as params_module

pytestmark = pytest.mark.slow

ARTIFACTS = [
    "artifacts/prepared/report.json", "artifacts/baseline/model.keras",
    "artifacts/weights/efficientnet_lite0.weights.h5", "artifacts/backbone/backbone.keras",
    "artifacts/transfer/model.keras", "artifacts/release/model.keras",
    "artifacts/release/selection.json", "artifacts/metrics/transfer.json",
    "artifacts/metrics/release.json", "artifacts/plots/curves.png",
]  # fmt: skip


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, prefect_harness) -> Path:
    return tiny_project(tmp_path_factory.mktemp("flow") / "project")


def set_param(root: Path, old: str, new: str) -> None:
    path = root / "params.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_flow_runs_stale_steps_records_them_and_skips_when_current(flow_project):
    from flows.pipeline import pipeline_flow

    root = str(flow_project)
    first = pipeline_flow(root=root)
    assert first["ran"] == ["prepare", "baseline", "weights", "freeze", "head", "select",
                            "evaluate", "plots"]  # fmt: skip
    assert all((flow_project / name).is_file() for name in ARTIFACTS)
    assert run_in(flow_project, "dvc", "status", "--json").stdout.strip() == "{}"
    assert "| transfer |" in first["summary"] and "quarantined" in first["summary"]
    assert "**Released**" in first["summary"] and "**released**" in first["summary"]

    second = pipeline_flow(root=root)
    assert second["ran"] == [] and len(second["skipped"]) == 8

    params_module.write_overrides(flow_project / "params.yaml", ["head.epochs=1"])
    third = pipeline_flow(root=root)
    assert third["ran"] == ["head", "select", "evaluate", "plots"]
    assert run_in(flow_project, "dvc", "status", "--json").stdout.strip() == "{}"
    marker = json.loads((flow_project / "artifacts/transfer/.headstart-output").read_text())
    assert marker["params"]["head"]["epochs"] == 1  # the outputs are this run's


def test_failing_step_fails_the_flow_with_its_message(flow_project, tmp_path):
    from flows.pipeline import pipeline_flow

    set_param(flow_project, "min_per_class: 3 ", "min_per_class: 50 ")
    try:
        with pytest.raises(ValueError, match="fewer than prepare.min_per_class=50"):
            pipeline_flow(root=str(flow_project))
    finally:
        set_param(flow_project, "min_per_class: 50 ", "min_per_class: 3 ")
    assert (flow_project / "artifacts/prepared/manifest.csv").is_file()  # old output kept


def constant_model(release: Path, answer: int, classes: int) -> None:
    """Replace the release with a model that always answers class `answer`."""
    import keras

    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    layer = keras.layers.Dense(classes, activation="softmax")
    model = keras.Model(inputs, layer(pooled))
    bias = np.full(classes, -100.0, dtype="float32")
    bias[answer] = 100.0
    layer.set_weights([np.zeros((3, classes), "float32"), bias])
    model.save(release / "model.keras")


def test_promotion_uses_the_release_and_keeps_a_better_champion(flow_project, tmp_path):
    import shutil

    from headstart.promotion import promote_from_params

    params = params_module.load(flow_project / "params.yaml")
    release, champion = (
        params.path("release", flow_project),
        params.path("champion", flow_project),
    )
    shutil.copytree(release, tmp_path / "original")
    counts = np.bincount(
        np.load(params.path("prepared", flow_project) / "test_labels.npy"), minlength=2
    )
    assert counts[0] != counts[1]  # the tiny test split is deterministic and unbalanced
    majority, minority = int(np.argmax(counts)), int(np.argmin(counts))
    try:
        constant_model(release, majority, 2)
        first = promote_from_params(params, flow_project)
        assert first["promoted"] and first["reason"] == "no current model"
        installed = (champion / "model.keras").read_bytes()
        assert installed == (release / "model.keras").read_bytes()

        constant_model(release, minority, 2)
        worse = promote_from_params(params, flow_project)
        assert not worse["promoted"] and worse["challenger"] < worse["champion"]
        assert (champion / "model.keras").read_bytes() == installed  # the champion stays

        constant_model(release, majority, 2)
        equal = promote_from_params(params, flow_project)
        assert equal["promoted"] and equal["challenger"] == equal["champion"]
    finally:
        shutil.rmtree(release)
        shutil.copytree(tmp_path / "original", release)
        shutil.rmtree(champion, ignore_errors=True)


def test_cli_run_no_op_and_status(flow_project):
    result = run_in(flow_project, "headstart", "status")
    assert all(line.endswith("up to date") for line in result.stdout.strip().splitlines())
    bad = run_in(flow_project, "headstart", "run", "-S", "head.epochs=-1", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "head.epochs must be > 0" in bad.stderr


def test_dvc_repro_rebuilds_and_reruns_only_downstream_of_a_param(tmp_path):
    root = tiny_project(tmp_path / "repro")
    first = run_in(root, "dvc", "repro")
    for stage in (
        "prepare",
        "baseline",
        "weights",
        "freeze",
        "head",
        "select",
        "evaluate",
        "plots",
    ):
        assert f"Running stage '{stage}'" in first.stdout
    assert all((root / name).is_file() for name in ARTIFACTS)
    assert run_in(root, "dvc", "status", "--json").stdout.strip() == "{}"
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "commit", "-qm", "first run")

    params_module.write_overrides(root / "params.yaml", ["head.epochs=1"])
    second = run_in(root, "dvc", "repro")
    ran = [
        line.split("'")[1]
        for line in second.stdout.splitlines()
        if line.startswith("Running stage")
    ]
    assert ran == ["head", "select", "evaluate", "plots"]
    run_in(root, "git", "checkout", "params.yaml")

    run_in(root, "dvc", "exp", "run", "-S", "head.dropout=0.3")
    diff = run_in(root, "dvc", "metrics", "diff", "--json")
    assert "artifacts/metrics/transfer.json" in json.loads(diff.stdout)
    params_diff = json.loads(run_in(root, "dvc", "params", "diff", "--json").stdout)
    assert params_diff["params.yaml"]["head.dropout"]["new"] == 0.3
    plots = run_in(root, "dvc", "plots", "diff", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file(), plots.stdout


def test_schedule_serves_a_deployment_that_runs(flow_project, tmp_path):
    """A real local Prefect server; `headstart schedule --interval` must execute a run."""
    from flows.scheduling import start_local_server

    server, api_url = start_local_server(tmp_path / "server")
    env = {**os.environ, "PREFECT_API_URL": api_url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    served = subprocess.Popen(
        ["headstart", "schedule", "--interval", "5", "--name", "test-schedule"],
        cwd=flow_project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        state = wait_for_completed_run(api_url, "headstart-retrain", timeout=150)
    finally:
        served.send_signal(signal.SIGTERM)
        try:
            output = served.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            served.kill()
            output = served.communicate()[0]
        server.terminate()
        server.wait(timeout=30)
    assert state == "COMPLETED", output[-3000:]
    assert (flow_project / "models/champion/model.keras").is_file()
    assert dvcstate.changed(flow_project, "plots") == []


def wait_for_completed_run(api_url: str, flow_name: str, timeout: float) -> str:
    import urllib.request

    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"{api_url}/flow_runs/filter", data=json.dumps({
                "limit": 20,
                "flows": {"name": {"any_": [flow_name]}},
                "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
            }).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())
        states = [r["state_type"] for r in runs]
        if "COMPLETED" in states:
            return "COMPLETED"
        if "FAILED" in states or "CRASHED" in states:
            return ",".join(states)
        time.sleep(2)
    return f"timeout ({states})"
