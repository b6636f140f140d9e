"""Per-epoch and summary metrics in DVCLive's file layout, and DVC reads them through dvc.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, run_in, small_params

from headstart import training
from headstart.artifacts import read_history

HISTORY = {
    "loss": [1.5, 0.9, 0.7],
    "accuracy": [0.4, 0.6, 0.75],
    "val_loss": [1.6, 1.1, 1.0],
    "val_accuracy": [0.35, 0.5, 0.55],
}


def test_the_plots_reader_returns_the_logged_epochs(tmp_path):
    with training.live_logger(tmp_path / "dvclive") as live:
        training.log_history(live, "baseline", HISTORY)
        training.log_history(live, "other", {"loss": [9.0], "accuracy": [0.1]})
    assert read_history(tmp_path / "dvclive", "baseline") == HISTORY
    rows = (tmp_path / "dvclive/plots/metrics/baseline/eval/accuracy.tsv").read_text().split()
    assert rows == ["step", "accuracy", "0", "0.35", "1", "0.5", "2", "0.55"]
    summary = json.loads((tmp_path / "dvclive/metrics.json").read_text())
    assert summary["baseline"] == {
        "train": {"loss": 0.7, "accuracy": 0.75},
        "eval": {"loss": 1.0, "accuracy": 0.55},
    }
    assert summary["step"] == 3  # the last step: "other"'s one epoch after baseline's three


def test_fit_logs_every_epoch_as_it_ends(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    training.compile_classifier(model, keras.optimizers.Adam(0.05))
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    data = training.dataset(x, (x[:, 0] > 0).astype("int32"), 8)
    with training.live_logger(tmp_path / "dvclive") as live:
        history = training.fit(
            model, data, data, "baseline", epochs=3, patience=5, target_accuracy=1.01, live=live
        )
        assert live.step == 3
    assert read_history(tmp_path / "dvclive", "baseline") == history
    assert len(history["val_accuracy"]) == 3


def test_the_head_logs_its_epochs_and_its_choice(tmp_path):
    from tasks import head

    rng = np.random.default_rng(1)
    features = tmp_path / "features"
    features.mkdir()
    for split, n in (("train", 24), ("val", 8)):
        labels = np.arange(n) % 2
        np.save(
            features / f"{split}_features.npy",
            (rng.normal(size=(n, 6)) + 2 * labels[:, None]).astype("float32"),
        )
        np.save(features / f"{split}_labels.npy", labels)
    params = small_params(head={"epochs": 3, "folds": 2, "units": 8})
    out = tmp_path / "out"
    out.mkdir()
    with training.live_logger(out / "dvclive") as live:
        _, record = head._chosen_head(features, 2, params, out, live)
    history = read_history(out / "dvclive", "head")
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history["loss"]) == len(history["val_accuracy"]) == record["epochs"]
    summary = json.loads((out / "dvclive/metrics.json").read_text())["head"]
    selection = json.loads((out / "head_selection.json").read_text())
    chosen = next(c for c in selection["candidates"] if c["name"] == selection["chosen"])
    assert summary["config"] == record["config"] == selection["chosen"]
    assert summary["cv_accuracy"] == pytest.approx(chosen["cv_accuracy"], abs=1e-6)
    assert (summary["folds"], summary["epochs"]) == (2, record["epochs"])
    assert summary["eval"]["accuracy"] == pytest.approx(history["val_accuracy"][-1])


def test_the_logger_touches_no_repository_and_prints_nothing(tmp_path, monkeypatch, capfd):
    """A plain `dvclive.Live` runs `dvc init` in a Git repository without DVC and, with a DVC
    Studio token set, posts to Studio: the project's logger writes its two files only, and
    imports no DVCLive."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("DVC_STUDIO_TOKEN", "a-token")
    monkeypatch.setenv("DVC_STUDIO_REPO_URL", "https://example.invalid/repo.git")
    with training.live_logger(repo / "out" / "dvclive") as live:
        training.log_history(live, "baseline", HISTORY)
        live.log_metric("baseline/kept", True, plot=False)
    assert "dvclive" not in sys.modules
    assert sorted(p.name for p in repo.iterdir()) == [".git", "out"]
    assert sorted(p.name for p in (repo / "out/dvclive").iterdir()) == ["metrics.json", "plots"]
    assert capfd.readouterr() == ("", "")


CAPTURED_FIRST = """
import logging


def test_a_first_import_of_dvc_while_capfd_captures(capfd):
    import dvc.repo  # imports dvc, as headstart.dvcstate does


def test_b_dvc_logs_afterwards():
    logging.getLogger("dvc.dvcfile").info("Updating lock file 'dvc.lock'")
"""


def test_dvc_still_logs_after_a_test_that_captured_its_first_import(tmp_path):
    """The two tests above, in this order, with the project's conftest: without its early
    `import dvc`, the second fails with DVC's LoggingException (a closed capture stream)."""
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(ROOT / "tests" / name, tmp_path / name)
    (tmp_path / "test_order.py").write_text(CAPTURED_FIRST)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 passed" in result.stdout


@pytest.mark.slow
def test_dvc_plots_metrics_and_experiments_read_dvclive_after_a_run(trained_copy):
    root = trained_copy  # after one whole `headstart` flow run
    live = root / "artifacts/baseline/dvclive"
    epochs = read_history(live, "baseline")["loss"]
    assert 1 <= len(epochs) <= 2  # baseline.epochs=2 in the tiny project

    # DVCLive's summaries are not in dvc.yaml's `metrics:` (the headline is: see
    # test_the_experiment_table_fits_120_columns); DVC reads them when named
    files = ["artifacts/baseline/dvclive/metrics.json", "artifacts/transfer/dvclive/metrics.json"]
    metrics = json.loads(run_in(root, "dvc", "metrics", "show", "--json", *files).stdout)
    logged = metrics[""]["data"][files[0]]["data"]
    assert logged["step"] == len(epochs) - 1
    assert logged["baseline"]["train"]["loss"] == pytest.approx(epochs[-1])
    assert set(logged["baseline"]["eval"]) == {"loss", "accuracy"}
    head = metrics[""]["data"][files[1]]["data"]["head"]
    assert head["config"] in ("linear", "small", "dense") and 0 <= head["cv_accuracy"] <= 1

    plots = json.loads(run_in(root, "dvc", "plots", "show", "--json").stdout)
    assert "errors" not in plots or not plots["errors"], plots.get("errors")
    for name in ("accuracy", "loss"):
        rows = plots["data"][name][0]["content"]["data"]["values"]
        files = {row["filename"].split("dvclive/plots/metrics/")[-1] for row in rows}
        assert files == {
            f"{model}/{split}/{name}.tsv"
            for model in ("baseline", "head")
            for split in ("train", "eval")
        }

    experiments = json.loads(run_in(root, "dvc", "exp", "show", "--json").stdout)
    workspace = next(e for e in experiments if e["rev"] == "workspace")["data"]["metrics"]
    assert list(workspace) == ["artifacts/metrics/headline.json"]
    release = json.loads((root / "artifacts/metrics/release.json").read_text())
    assert workspace["artifacts/metrics/headline.json"]["data"]["accuracy"] == release["accuracy"]

    status = run_in(root, "git", "status", "--porcelain", "dvc.yaml", "artifacts").stdout
    assert status == ""  # DVCLive changed no dvc.yaml and left no file for git to add


@pytest.mark.slow
def test_the_experiment_table_fits_120_columns(trained_copy):
    """After a one-value experiment, the changed metrics and parameters read on a 120-column
    terminal: no column collapsed to "…", no line wider. The changed artifact folders are
    dropped from the table (the README's command): DVC shows each as a 36-character md5."""
    root = trained_copy
    run_in(root, "git", "add", "dvc.lock")  # the trained state committed, as the README says
    run_in(root, "git", "commit", "-qm", "trained", "--allow-empty")
    run_in(root, "dvc", "exp", "run", "-S", "head.dropout=0.3")
    # the worst case: every figure a head change can move shown as changed (--keep), whether or
    # not it moved on this tiny, perfectly separated project
    moved = "^(accuracy|macro_f1|loss|ece|transfer|ensemble)$"
    table = run_in(
        root,
        "env",
        "COLUMNS=120",
        "dvc",
        "exp",
        "show",
        "--only-changed",
        "--drop",
        "artifacts/",
        "--keep",
        moved,
        "--no-pager",
    ).stdout
    lines = table.splitlines()
    header = next(line for line in lines if "Experiment" in line).split()
    assert header == [
        "Experiment",
        "Created",
        "accuracy",
        "macro_f1",
        "loss",
        "ece",
        "transfer",
        "ensemble",
        "head.dropout",
    ], table
    assert "…" not in table, table
    assert max(len(line) for line in lines) <= 120, table
