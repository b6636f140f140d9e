"""Progress of long loops: a bar on a terminal, a few log lines elsewhere, a Prefect artifact in a
run; never on stdout, never one line per item."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, small_params, write_good_images

from headstart import progress as progress_module
from headstart.progress import progress

LOGGER = "headstart.test_progress"


class Terminal(io.StringIO):
    """A stream that says it is a terminal (what a user's stderr is)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars_allowed(monkeypatch):
    monkeypatch.delenv("HEADSTART_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


def lines_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_without_a_terminal_logs_a_few_periodic_lines_and_a_final_one(caplog, capsys):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = io.StringIO()  # not a terminal, like `headstart step prepare 2> log`
    with progress(
        300, "features", logging.getLogger(LOGGER), unit="images", interval=0.02, stream=stream
    ) as shown:
        for n in range(300):
            shown.advance()
            if n % 100 == 99:
                time.sleep(0.05)
    *periodic, final = lines_of(caplog)
    assert 2 <= len(periodic) <= 5, periodic  # periodic, never one per item
    assert all(re.fullmatch(r"features: \d+/300 images \(\d+ %\)", line) for line in periodic)
    assert re.fullmatch(r"features: 300/300 images \(100 %\) in \d+\.\d s", final), final
    assert stream.getvalue() == ""
    assert capsys.readouterr().out == ""


def test_log_lines_are_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with progress(
        10_000, "prepare", logging.getLogger(LOGGER), unit="files", stream=io.StringIO()
    ) as shown:
        for _ in range(10_000):
            shown.advance()
    assert [line.split(" in ")[0] for line in lines_of(caplog)] == [
        "prepare: 10000/10000 files (100 %)"
    ]


def test_on_a_terminal_draws_a_rich_bar_and_logs_nothing(caplog, capsys, bars_allowed):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = Terminal()
    with progress(
        40, "predict (classifying)", logging.getLogger(LOGGER), unit="images", stream=stream
    ) as shown:
        for _ in range(4):
            time.sleep(0.12)
            shown.advance(10)
    drawn = stream.getvalue()
    assert "\x1b[" in drawn  # terminal control sequences: a live display, not text lines
    assert "predict (classifying)" in drawn and "40/40" in drawn and "━" in drawn
    assert lines_of(caplog) == []
    assert capsys.readouterr().out == ""


def test_training_counts_its_epochs_on_the_terminals_bar(monkeypatch, bars_allowed):
    import keras

    from headstart import models, training

    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    model = models.dense_head(4, 2, units=8)
    training.compile_classifier(model, models.optimizer("adam", 1e-3))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype("float32"), np.arange(16) % 2
    data = training.dataset(x, y, 8)
    keras.utils.set_random_seed(0)
    history = training.fit(model, data, data, "head", epochs=3, patience=5, target_accuracy=1.1)
    drawn = stream.getvalue()
    assert len(history["loss"]) == 3
    assert "head (training)" in drawn and "3/3" in drawn and "epochs" in drawn


@pytest.mark.parametrize("setting", [{"HEADSTART_PROGRESS": "0"}, {"TERM": "dumb"}])
def test_bars_can_be_turned_off(caplog, monkeypatch, bars_allowed, setting):
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = Terminal()
    with progress(5, "prepare", logging.getLogger(LOGGER), unit="files", stream=stream) as shown:
        for _ in range(5):
            shown.advance()
    assert stream.getvalue() == ""
    assert [line.split(" in ")[0] for line in lines_of(caplog)] == ["prepare: 5/5 files (100 %)"]


def test_a_failed_loop_claims_no_completion(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    def fail_after_three() -> None:
        with progress(10, "features", logging.getLogger(LOGGER), stream=io.StringIO()) as shown:
            shown.advance(3)
            raise RuntimeError("backbone failed")

    with pytest.raises(RuntimeError, match="backbone failed"):
        fail_after_three()
    assert lines_of(caplog) == []


def test_outside_prefect_asks_nothing_of_prefect_and_does_not_import_it():
    code = (
        "import logging, sys\n"
        "from headstart.progress import progress\n"
        "with progress(3, 'features', logging.getLogger('x'), artifact='feature-extraction')"
        " as shown:\n"
        "    shown.advance(3)\n"
        "print('prefect' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# -- headstart predict on a folder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny saved classifier (16 px, 2 classes) with its labels.json, and a folder of images."""
    import keras

    root = tmp_path_factory.mktemp("predict")
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    )
    keras.Model(inputs, outputs).save(root / "model.keras")
    (root / "labels.json").write_text(json.dumps({"classes": ["a", "b"], "image_size": 16}))
    write_good_images(root / "images", classes=2, per_class=5)
    return root / "model.keras", root / "images"


def expected_rows(images: Path) -> list[str]:
    return [str(p) for p in sorted(images.rglob("*")) if p.is_file()]


def test_predict_on_a_folder_prints_only_results(tiny_model):
    model, images = tiny_model
    # captured: not a terminal; TensorFlow logging everything (whether its C++ start-up lines
    # appear at the default level depends on the CPU), hidden unless --verbose (test_training)
    result = run_cli("predict", str(model), str(images), TF_CPP_MIN_LOG_LEVEL="0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == expected_rows(images)
    assert all(line.split()[1] in ("a", "b") for line in lines), lines
    assert "predict (" not in result.stdout + result.stderr
    assert result.stderr == "", result.stderr


def test_predict_on_a_terminal_draws_the_bar_on_stderr_and_keeps_stdout_clean(tiny_model):
    model, images = tiny_model
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("HEADSTART_PROGRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "headstart.cli", "predict", str(model), str(images), "--json"],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        env=env,
    )
    os.close(follower)
    drawn = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    stdout, _ = process.communicate(timeout=180)
    reader.join(timeout=10)
    os.close(leader)
    terminal = drawn.decode(errors="replace")
    assert process.returncode == 0, terminal
    rows = json.loads(stdout)  # stdout is exactly the results
    assert [r["file"] for r in rows] == expected_rows(images)
    assert "predict (classifying)" in terminal and "10/10" in terminal, terminal
    assert "\x1b[" in terminal


# -- inside Prefect ------------------------------------------------------------------------------


def progress_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [
            a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
            if a.type == "progress"
        ]


@pytest.mark.slow
def test_in_a_prefect_flow_a_progress_artifact_reaches_100_and_no_bar(
    prefect_harness, monkeypatch, bars_allowed
):
    from prefect import flow

    monkeypatch.setattr(progress_module, "ARTIFACT_INTERVAL", 0.0)  # update on every step
    stream = Terminal()

    @flow
    def loop() -> None:
        with progress(
            4,
            "features",
            logging.getLogger(LOGGER),
            unit="images",
            artifact="test-progress",
            stream=stream,
        ) as shown:
            for _ in range(4):
                shown.advance()

    logger, records = logging.getLogger(LOGGER), []  # Prefect's logging setup bypasses caplog
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        state = loop(return_state=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert state.is_completed()
    (artifact,) = progress_artifacts(state.state_details.flow_run_id)
    assert artifact.key == "test-progress" and float(artifact.data) == 100.0
    assert stream.getvalue() == ""  # in a run: log lines for the run log, not a bar
    assert records[-1].getMessage().startswith("features: 4/4 images (100 %)")


@pytest.mark.slow
def test_feature_extraction_in_a_prefect_task_keeps_a_progress_artifact(
    prefect_harness, tmp_path, good_data
):
    import keras
    from prefect import flow, task

    from tasks.head import cache_features
    from tasks.prepare import prepare

    prepared = prepare(good_data, tmp_path / "prepared", small_params())
    inputs = keras.Input((32, 32, 3))
    extractor = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))

    @task
    def extract() -> None:
        cache_features(
            extractor,
            "key",
            prepared,
            tmp_path / "features",
            views=("none", "shift"),
            seed=7,
            batch_size=4,
        )

    @flow
    def features() -> None:
        extract()

    state = features(return_state=True)
    assert state.is_completed()
    (artifact,) = progress_artifacts(state.state_details.flow_run_id)
    assert artifact.key == "feature-extraction" and float(artifact.data) == 100.0
    assert artifact.task_run_id is not None  # attached to the task run that extracted
    rows = json.loads((tmp_path / "features" / "features.json").read_text())["rows"]
    assert np.load(tmp_path / "features" / "train_features.npy").shape[0] == rows["train"]
    assert artifact.description == f"features: {sum(rows.values())} images"
