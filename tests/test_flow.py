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
from helpers import ROOT, command_env, run_in

from headstart import dvcstate
from headstart import params as params_module
from tasks import STEP_NAMES

pytestmark = pytest.mark.slow

ARTIFACTS = [
    "artifacts/data-report/report.json",
    "artifacts/baseline/model.keras",
    "artifacts/weights/efficientnet_lite0.weights.h5",
    "artifacts/backbone/backbone.keras",
    "artifacts/transfer/model.keras",
    "artifacts/release/model.keras",
    "artifacts/release/selection.json",
    "artifacts/metrics/transfer.json",
    "artifacts/metrics/release.json",
    "artifacts/plots/curves.png",
    "artifacts/export/export.json",
    "artifacts/export/MODEL_CARD.md",
]


def set_param(root: Path, old: str, new: str) -> None:
    path = root / "params.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_the_first_flow_run_runs_every_step_and_records_it(trained_project):
    first, root = trained_project.first_run, trained_project.root
    assert first["ran"] == [
        "prepare",
        "baseline",
        "weights",
        "freeze",
        "head",
        "select",
        "evaluate",
        "plots",
        "export",
    ]
    assert all((root / name).is_file() for name in ARTIFACTS)
    assert run_in(root, "dvc", "status", "--json").stdout.strip() == "{}"
    assert "| transfer " in first["summary"] and "quarantined" in first["summary"]
    assert "**Released**" in first["summary"] and "**released**" in first["summary"]


def test_the_flow_skips_current_steps_and_reruns_what_a_param_touches(trained_copy):
    from flows.pipeline import pipeline_flow

    again = pipeline_flow(root=str(trained_copy))
    assert again["ran"] == [] and len(again["skipped"]) == 9

    # what reads evaluate.top_k, and what comes after (export: its model card lists every param)
    params_module.write_overrides(trained_copy / "params.yaml", ["evaluate.top_k=1"])
    changed = pipeline_flow(root=str(trained_copy))
    assert changed["ran"] == ["evaluate", "plots", "export"]
    assert run_in(trained_copy, "dvc", "status", "--json").stdout.strip() == "{}"
    marker = json.loads((trained_copy / "artifacts/metrics/.headstart-output").read_text())
    assert marker["params"]["evaluate.top_k"] == 1  # the outputs are this run's


def test_failing_step_fails_the_flow_with_its_message(trained_copy):
    from flows.pipeline import pipeline_flow

    set_param(trained_copy, "min_per_class: 3 ", "min_per_class: 50 ")
    before = (trained_copy / "artifacts/prepared/manifest.csv").read_bytes()
    with pytest.raises(ValueError, match="fewer than prepare.min_per_class=50"):
        pipeline_flow(root=str(trained_copy))
    assert (trained_copy / "artifacts/prepared/manifest.csv").read_bytes() == before  # kept


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


def test_promotion_uses_the_release_and_keeps_a_better_champion(trained_copy):
    from helpers import write_good_images

    import tasks
    from headstart.promotion import promote_from_params

    params = params_module.load(trained_copy / "params.yaml")
    release, champion = (
        params.path("release", trained_copy),
        params.path("champion", trained_copy),
    )
    # the split is stratified: unequal classes give a test split with a majority class
    write_good_images(trained_copy / "data", classes=1, per_class=4, start=100)
    tasks.get("prepare").run(params, trained_copy)
    counts = np.bincount(
        np.load(params.path("prepared", trained_copy) / "test_labels.npy"), minlength=2
    )
    assert counts[0] != counts[1]
    majority, minority = int(np.argmax(counts)), int(np.argmin(counts))
    constant_model(release, majority, 2)
    first = promote_from_params(params, trained_copy)
    assert first["promoted"] and first["reason"] == "no current model"
    installed = (champion / "model.keras").read_bytes()
    assert installed == (release / "model.keras").read_bytes()

    constant_model(release, minority, 2)
    worse = promote_from_params(params, trained_copy)
    assert not worse["promoted"] and worse["challenger"] < worse["champion"]
    assert (worse["test"]["b"], worse["test"]["c"]) == (counts[minority], counts[majority])
    assert not worse["recall"][majority]["ok"]  # its recall falls from 1 to 0
    assert (champion / "model.keras").read_bytes() == installed  # the champion stays

    constant_model(release, majority, 2)  # the same answers: under the default rule no evidence
    equal = promote_from_params(params, trained_copy)
    assert not equal["promoted"] and equal["challenger"] == equal["champion"]
    assert (equal["test"]["b"], equal["test"]["c"], equal["test"]["p_value"]) == (0, 0, 1.0)
    assert (champion / "model.keras").read_bytes() == installed

    params_module.write_overrides(trained_copy / "params.yaml", ["promotion.rule=at_least"])
    params = params_module.load(trained_copy / "params.yaml")
    at_least = promote_from_params(params, trained_copy)  # the old rule: a tie replaces it
    assert at_least["promoted"] and at_least["rule"] == "at_least"
    assert (champion / "model.keras").read_bytes() == (release / "model.keras").read_bytes()
    assert json.loads((champion / "promotion.json").read_text())["test"]["b"] == 0


def test_cli_status_here_and_from_another_folder_and_a_refused_override(trained_copy, tmp_path):
    result = run_in(trained_copy, "headstart", "status")
    assert all(line.endswith("up to date") for line in result.stdout.strip().splitlines())
    params_module.write_overrides(trained_copy / "params.yaml", ["baseline.epochs=3"])
    elsewhere = run_in(tmp_path, "headstart", "status", "--project", str(trained_copy))
    assert [line.split()[-1] for line in elsewhere.stdout.splitlines()] == [
        "date",
        "stale",
        "date",
        "date",
        "date",
        "stale",
        "stale",
        "stale",
        "stale",
    ]
    bad = run_in(trained_copy, "headstart", "run", "-S", "head.epochs=-1", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "head.epochs must be > 0" in bad.stderr


def test_a_run_after_adding_images_records_them_and_a_refused_value_is_taken_back(trained_copy):
    """`headstart run` needs no `dvc add` after images are added; a -S value that a step refuses
    leaves params.yaml as it was; `--data pull` refuses to check out over unrecorded files."""
    from helpers import cli_here, write_good_images

    params_text = (trained_copy / "params.yaml").read_text()
    write_good_images(trained_copy / "data", classes=2, per_class=2, start=300)
    pulled = cli_here("run", "--data", "pull", cwd=trained_copy)
    assert pulled.returncode == 1
    assert pulled.stderr.strip().splitlines() == [
        "error: --data pull: data/ holds 4 file(s) that data.dvc does not record (e.g. "
        "data/class_0/img_300.jpg); --data record records them as a new version, or move them "
        "away"
    ]
    refused = cli_here("run", "-S", "prepare.min_per_class=50", cwd=trained_copy)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "fewer than prepare.min_per_class=50; add images or lower the setting (params.yaml is "
            "back as it was before -S)"
        )
    )
    assert (trained_copy / "params.yaml").read_text() == params_text
    ran = cli_here("run", cwd=trained_copy)
    assert ran.returncode == 0, ran.stderr
    assert "| transfer " in ran.stdout
    report = json.loads((trained_copy / "artifacts/data-report/report.json").read_text())
    assert report["totals"]["used"] == 28  # the 24 first images and the 4 added
    assert run_in(trained_copy, "dvc", "status", "--json").stdout.strip() == "{}"  # data.dvc too


def test_dvc_repro_orders_the_stages_as_the_steps_run():
    """dvc repro's graph (from dvc.yaml's deps and outs) only ever points forward in the step
    order, and has the edges the steps need, so a from-scratch repro runs them as the flow does."""
    dot = run_in(ROOT, "dvc", "dag", "--dot").stdout
    edges = {
        tuple(part.strip().strip('";') for part in line.split("->"))
        for line in dot.splitlines()
        if "->" in line
    }
    order = {name: index for index, name in enumerate(STEP_NAMES)}
    assert all(order[a] < order[b] for a, b in edges if a in order), edges
    assert {
        ("data.dvc", "prepare"),
        ("weights", "freeze"),
        ("freeze", "head"),
        ("prepare", "head"),
        ("baseline", "select"),
        ("head", "select"),
        ("select", "evaluate"),
        ("evaluate", "plots"),
        ("select", "export"),
        ("evaluate", "export"),
    } <= edges


def test_dvc_experiments_rerun_only_downstream_of_a_param(trained_copy, tmp_path):
    root = trained_copy
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "commit", "-qm", "first run")
    experiment = run_in(root, "dvc", "exp", "run", "-S", "evaluate.top_k=1")
    ran = [
        line.split("'")[1]
        for line in experiment.stdout.splitlines()
        if line.startswith("Running stage")
    ]
    # what reads evaluate.top_k, and what comes after (export: its model card lists every param)
    assert ran == ["evaluate", "plots", "export"]
    # the release is the same: export keeps its files (its output persists under dvc repro)
    assert "export: the release, its test images" in experiment.stderr, experiment.stderr
    assert run_in(root, "dvc", "status", "--json").stdout.strip() == "{}"
    diff = json.loads(run_in(root, "dvc", "metrics", "diff", "--json").stdout)
    assert diff == {}  # top-k is not a headline figure (a DVC metric): no column changes
    details = json.loads((root / "artifacts/metrics/transfer.json").read_text())
    assert "top1_accuracy" in details and "top2_accuracy" not in details
    params_diff = json.loads(run_in(root, "dvc", "params", "diff", "--json").stdout)
    assert params_diff["params.yaml"]["evaluate.top_k"] == {"old": 3, "new": 1, "diff": -2}
    plots = run_in(root, "dvc", "plots", "diff", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file(), plots.stdout

    # the experiments table: headline figures only (it had a column per class, model and figure)
    header = run_in(root, "dvc", "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    assert {"accuracy", "macro_f1", "loss", "ece", "transfer"} <= set(header), header
    assert not [name for name in header if "class_0" in name or "metrics.json" in name], header


def test_schedule_serves_a_deployment_that_runs(trained_copy, prefect_harness):
    """`headstart schedule --interval` against a real Prefect server (the test run's, whose
    scheduler creates the runs) must execute a run."""
    # the served runner asks for due runs every second instead of Prefect's 10: no idling
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_harness,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    served = subprocess.Popen(
        ["headstart", "schedule", "--interval", "5", "--name", "test-schedule"],
        cwd=trained_copy,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        state = wait_for_completed_run(prefect_harness, "test-schedule", timeout=150)
    finally:
        served.send_signal(signal.SIGTERM)
        try:
            output = served.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            served.kill()
            output = served.communicate()[0]
    assert state == "COMPLETED", output[-3000:]
    assert (trained_copy / "models/champion/model.keras").is_file()
    assert dvcstate.changed(trained_copy, "plots") == []


def flow_run_logs(api_url: str, flow_run_id, timeout: float = 30) -> list[str]:
    """The messages the Prefect server holds for one flow run (its tasks' included), once the
    flow's last one ("Finished in state ...", sent in the background like every record) is in."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(
            f"{api_url}/logs/filter",
            data=json.dumps(
                {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200}
            ).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            records = json.loads(response.read())
        finished = any(
            record["message"].startswith("Finished in state") and not record["task_run_id"]
            for record in records
        )
        if finished or time.monotonic() > deadline:
            return [record["message"] for record in records]
        time.sleep(0.5)


def test_scheduled_retraining_records_added_images_retrains_and_reports(
    trained_copy, prefect_harness
):
    """The retrain flow as the schedule calls it, tick by tick: images copied into data/ without
    `dvc add` are recorded as a new data.dvc and trained on; a tick that fails says why in one
    line and the next one, after the cause is gone, succeeds; an idle tick does nothing."""
    from helpers import class_pattern, write_good_images

    from flows.scheduling import retrain_flow

    root = str(trained_copy)
    first = retrain_flow(root=root)  # nothing stale: the release becomes the first champion
    assert first["retrained"] is False and first["promotion"]["promoted"] is True
    recorded = (trained_copy / "data.dvc").read_text()

    def newcomers(count: int, start: int) -> None:
        folder = trained_copy / "data" / "newcomer"
        folder.mkdir(exist_ok=True)
        for n in range(start, start + count):
            class_pattern(2, seed=2000 + n).save(folder / f"new_{n:03d}.png")

    write_good_images(trained_copy / "data", classes=2, per_class=3, start=100)
    newcomers(2, start=0)  # fewer than prepare.min_per_class: prepare refuses
    failed = retrain_flow(root=root, return_state=True)
    assert failed.is_failed() and "min_per_class=3" in failed.message
    messages = flow_run_logs(prefect_harness, failed.state_details.flow_run_id)
    assert not [m for m in messages if "Traceback" in m or "UserError" in m], messages
    assert [m for m in messages if "min_per_class=3" in m] != []
    assert any("data.dvc: 8 added" in m for m in messages), messages  # recorded as they are

    newcomers(2, start=10)
    state = retrain_flow(root=root, return_state=True)
    result = state.result()
    assert result["retrained"] is True
    assert (trained_copy / "data.dvc").read_text() != recorded  # the new version, recorded
    assert run_in(trained_copy, "dvc", "status", "--json").stdout.strip() == "{}"
    classes = json.loads((trained_copy / "artifacts/prepared/labels.json").read_text())
    assert classes["classes"] == ["class_0", "class_1", "newcomer"]
    messages = flow_run_logs(prefect_harness, state.state_details.flow_run_id)
    assert any("data.dvc: 2 added (data/newcomer/new_010.png" in m for m in messages), messages
    assert any(m.startswith("prepare   ran in ") and " images (" in m for m in messages), messages
    summary = next(m for m in messages if m.startswith("retraining summary"))
    assert "| transfer " in summary and "**Promotion**: replaced" in summary  # new classes

    idle = retrain_flow(root=root)
    assert idle == {"retrained": False, "promotion": None}

    from flows.pipeline import pipeline_flow  # a manual run rebuilds the release meanwhile

    params_module.write_overrides(trained_copy / "params.yaml", ["head.learning_rate=0.002"])
    assert "head" in pipeline_flow(root=root)["ran"]
    compared = retrain_flow(root=root)  # nothing stale, but a release never compared
    assert compared["retrained"] is False and compared["promotion"]["champion"] is not None
    assert retrain_flow(root=root) == {"retrained": False, "promotion": None}


def wait_for_completed_run(api_url: str, deployment: str, timeout: float) -> str:
    """The state of the deployment's runs once one has ended (other tests' runs of the same flow
    on the shared server do not count)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"{api_url}/flow_runs/filter",
            data=json.dumps(
                {
                    "limit": 20,
                    "deployments": {"name": {"any_": [deployment]}},
                    "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())
        states = [r["state_type"] for r in runs]
        if "COMPLETED" in states:
            return "COMPLETED"
        if "FAILED" in states or "CRASHED" in states:
            return ",".join(states)
        time.sleep(2)
    return f"timeout ({states})"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_schedule(root: Path) -> tuple[subprocess.Popen, list[int]]:
    """`headstart schedule` with its own local Prefect server, once it serves; its children."""
    env = {**command_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    served = subprocess.Popen(
        ["headstart", "schedule", "--interval", "3600"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in served.stdout:
        if line.startswith("serving "):
            return served, children(served.pid)
    raise AssertionError(f"schedule did not start: {served.stderr.read()}")


def test_schedule_stops_on_sigterm_and_leaves_no_server_even_after_kill_9(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    served, started = start_schedule(tmp_path)
    assert started  # its local Prefect server
    began = time.monotonic()
    served.send_signal(signal.SIGTERM)
    _, errors = served.communicate(timeout=10)
    assert time.monotonic() - began < 10
    assert errors.strip().splitlines()[-1] == "headstart schedule: stopped (SIGTERM)"
    assert "Traceback" not in errors
    assert not [pid for pid in started if alive(pid)]

    served, started = start_schedule(tmp_path)
    served.kill()  # what the OOM killer does: the parent alone, no chance to clean up
    served.wait()
    deadline = time.monotonic() + 15
    while [pid for pid in started if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)]


def test_the_next_run_stops_the_temporary_server_of_a_killed_run(trained_copy):
    """Prefect's temporary server outlives a `headstart run` killed with kill -9 (the OOM
    killer); the next run stops it."""
    params_text = (trained_copy / "params.yaml").read_text()
    record = trained_copy / ".headstart" / "prefect-server.json"
    killed = subprocess.Popen(
        ["headstart", "run", "-S", "plots.samples=4"],
        cwd=trained_copy,
        env=command_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not record.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert record.is_file(), "the run never recorded its server"
    killed.kill()
    killed.wait()
    server = json.loads(record.read_text())["pid"]
    time.sleep(1)
    assert alive(server)  # orphaned, as Prefect leaves it
    (trained_copy / "params.yaml").write_text(params_text)
    run_in(trained_copy, "headstart", "run")
    deadline = time.monotonic() + 10
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(server)
    assert not record.exists()


def test_headstart_export_leaves_dvc_status_clean(trained_copy):
    from helpers import cli_here

    params_module.write_overrides(trained_copy / "params.yaml", ["export.latency_runs=3"])
    result = cli_here("export", cwd=trained_copy)
    assert result.returncode == 0, result.stderr
    assert run_in(trained_copy, "dvc", "status", "--json").stdout.strip() == "{}"


def test_a_run_prints_one_line_per_step_and_the_summary_and_nothing_on_stderr(
    trained_copy, prefect_harness
):
    from tasks import STEP_NAMES

    result = run_in(trained_copy, "headstart", "run", "--force", api_url=prefect_harness)
    # one warning at most (the tiny project's: no validation error to fit a temperature on); no
    # Prefect, DVC, TensorFlow or LiteRT line; the model card's TODO is a note in the summary
    warnings = result.stderr.splitlines()
    assert all("| WARNING |" in line and "temperature" in line for line in warnings), warnings
    assert len(warnings) <= 1, warnings
    assert "MODEL_CARD_NOTES.md` still holds TODO lines" in result.stdout
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[: len(STEP_NAMES)]] == list(STEP_NAMES)
    assert all(" ran in " in line for line in lines[: len(STEP_NAMES)]), lines
    assert "# headstart run" in result.stdout and "| transfer " in result.stdout
    assert len(lines) <= 60
    log = (trained_copy / ".headstart" / "run.log").read_text()
    assert "Finished in state Completed()" in log and "prepare: running" in log  # the rest
    verbose = run_in(
        trained_copy, "headstart", "-v", "run", "-S", "plots.samples=4", api_url=prefect_harness
    )
    assert "Finished in state Completed()" in verbose.stderr


def test_operational_settings_retrain_nothing(trained_copy):
    """How the checksum-verified weights are fetched (weights.retries, weights.cache_dir) and
    how many calls time each export (export.latency_runs) change no result: every step stays
    up to date (they made weights, freeze and everything after it run again), and the model
    card, which lists every setting a result depends on, does not list them."""
    params_module.write_overrides(
        trained_copy / "params.yaml",
        ["weights.retries=7", "weights.cache_dir=~/elsewhere", "export.latency_runs=3"],
    )
    assert set(params_module.OPERATIONAL) == {
        "weights.retries",
        "weights.cache_dir",
        "export.latency_runs",
    }
    status = run_in(trained_copy, "headstart", "status").stdout
    assert [line.split()[0] for line in status.splitlines() if "stale" in line] == []
    card = (trained_copy / "artifacts" / "export" / "MODEL_CARD.md").read_text()
    assert "retries:" not in card and "latency_runs:" not in card and "min_agreement:" in card
    params_module.write_overrides(
        trained_copy / "params.yaml", ["base.backbone=efficientnet_lite2"]
    )
    assert "weights    stale" in run_in(trained_copy, "headstart", "status").stdout
