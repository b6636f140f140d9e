"""Multi-device training: the baseline and fine-tuning under tf.distribute.MirroredStrategy.

This machine has no GPUs, so the child processes split the CPU into two logical devices before
TensorFlow starts (it cannot be done in this process: TensorFlow is already initialised here);
`training.strategy` then mirrors over them exactly as it would over two GPUs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import built_once, small_params, write_good_images, write_random_backbone

import tasks
from headstart.artifacts import load_split
from headstart.files import read_json
from headstart.params import ParamsError, from_dict

CHILD = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[2])
import tasks, test_distribute
from pathlib import Path
from headstart import training
for name in ("baseline", "head"):
    tasks.get(name).run(test_distribute.settings("auto"), Path(sys.argv[1]))
print("forced:", training.strategy("1").num_replicas_in_sync)
"""


def settings(devices: str):
    return small_params(
        base={"devices": devices},
        baseline={"epochs": 6, "batch_size": 8, "patience": 6},
        head={"config": "linear", "epochs": 2},
        finetune={"enabled": True, "blocks": 1, "epochs": 1, "batch_size": 8},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The same prepared project: the baseline and fine-tuning trained in a child process whose
    CPU is split into two devices ("two"), and the baseline trained here, on one ("one"). Built
    once per test run (the two tests may run in two xdist workers; ~45 s of CPU per build)."""

    def build(folder: Path) -> None:
        one = folder / "one-device"
        write_good_images(one / "data", classes=3, per_class=20)
        params = settings("auto")
        tasks.get("prepare").run(params, one)
        write_random_backbone(params.path("backbone", one), seed=0)
        two = folder / "two-devices"
        shutil.copytree(one, two)
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(two), str(Path(__file__).parent)],
            capture_output=True,
            text=True,
        )
        assert child.returncode == 0, child.stderr[-3000:]
        assert child.stdout.splitlines()[-1] == "forced: 1"  # base.devices: 1 -> one device
        tasks.get("baseline").run(params, one)

    folder, _ = built_once(tmp_path_factory, "distribute", build)
    return {"one": folder / "one-device", "two": folder / "two-devices"}


def val_accuracy(root: Path) -> float:
    """The baseline's best validation accuracy over its epochs (early stopping keeps the best)."""
    live = read_json(root / "artifacts/baseline/dvclive/metrics.json")
    history = [
        float(line.split("\t")[-1])
        for line in (root / "artifacts/baseline/dvclive/plots/metrics/baseline/eval/accuracy.tsv")
        .read_text()
        .splitlines()[1:]
    ]
    assert live["baseline"]["eval"]["accuracy"] == pytest.approx(history[-1])
    return max(history)


@pytest.mark.slow
def test_training_runs_on_two_replicas_and_learns_as_on_one(trained):
    two, one = trained["two"], trained["one"]
    assert read_json(two / "artifacts/baseline/training.json")["replicas"] == 2
    assert read_json(one / "artifacts/baseline/training.json")["replicas"] == 1
    # an easy task (colour and stripes): both reach the same band
    accuracy_two, accuracy_one = val_accuracy(two), val_accuracy(one)
    assert accuracy_two >= 0.8 and accuracy_one >= 0.8, (accuracy_two, accuracy_one)
    assert abs(accuracy_two - accuracy_one) <= 0.2


@pytest.mark.slow
def test_finetuning_runs_on_two_replicas_and_saves_a_frozen_model(trained):
    import keras

    from headstart.training import predict

    out = trained["two"] / "artifacts/transfer"
    record = read_json(out / "transfer.json")["finetune"]
    assert record["replicas"] == 2
    assert record["kept"] == (record["val_accuracy_after"] > record["val_accuracy_before"])
    saved = keras.saving.load_model(out / "model.keras")
    assert not saved.get_layer("efficientnet_lite0_features").trainable_weights
    # the weights trained on the replicas' copy came back into the saved model (when kept)
    x_val, y_val = load_split(trained["two"] / "artifacts/prepared", "val")
    accuracy = float(np.mean(np.argmax(predict(saved, x_val), axis=1) == y_val))
    expected = record["val_accuracy_after"] if record["kept"] else record["val_accuracy_before"]
    assert accuracy == pytest.approx(expected)
    assert not (out / "finetune" / "before.keras").exists()


def test_devices_accepts_auto_or_one_only():
    assert from_dict({"base": {"devices": 1}}).base.devices == "1"
    assert from_dict({"base": {"devices": "auto"}}).base.devices == "auto"
    with pytest.raises(
        ParamsError, match=r"^params: base.devices must be auto .* or 1 \(got '2'\)$"
    ):
        from_dict({"base": {"devices": 2}})
