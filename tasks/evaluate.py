"""evaluate: every candidate and the release, once, on the held-out test split ->
artifacts/metrics/ (DVC metrics). The only step that reads the test split's labels."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np

from headstart.artifacts import (
    MODEL_FILE,
    PROBABILITIES_FILE,
    PRODUCERS,
    load_probabilities,
    load_split,
)
from headstart.files import atomic_dir, read_json, require, write_json
from headstart.metrics import classification_metrics, ensemble_probabilities
from headstart.params import Params

log = logging.getLogger("headstart.evaluate")

RELEASE_TOLERANCE = 1e-4  # float32 differences between one model and its parts run separately


def _write_predictions(path: Path, files: list[str], labels, probabilities, classes) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "predicted", "confidence"])
        for file, label, row in zip(files, labels, probabilities, strict=True):
            best = int(np.argmax(row))
            writer.writerow([file, classes[label], classes[best], f"{row[best]:.4f}"])


def evaluate(prepared_dir: Path | str, model_dirs: dict[str, Path], out_dir: Path | str,
             params: Params) -> Path:  # fmt: skip
    """`<out>/<name>.json` metrics, `<name>_confusion.json`, `<name>_predictions.csv` for the
    baseline, transfer, ensemble (its weight from selection.json) and release models."""
    import keras

    from headstart.training import predict

    prepared_dir = Path(prepared_dir)
    classes = read_json(require(prepared_dir / "labels.json", "prepare"))["classes"]
    for name, folder in model_dirs.items():
        require(folder / (PROBABILITIES_FILE if name == "transfer" else MODEL_FILE),
                PRODUCERS[name])  # fmt: skip
    selection = read_json(model_dirs["release"] / "selection.json")
    with open(prepared_dir / "manifest.csv") as handle:
        test_files = [row["file"] for row in csv.DictReader(handle) if row["split"] == "test"]
    x, labels = load_split(prepared_dir, "test")
    probabilities = {  # the transfer model's were recorded by head (no second backbone pass)
        name: load_probabilities(folder, "test") if name == "transfer"
        else predict(keras.saving.load_model(folder / MODEL_FILE), x)
        for name, folder in model_dirs.items()
    }  # fmt: skip
    weight = selection["ensemble_transfer_weight"]
    probabilities["ensemble"] = ensemble_probabilities(probabilities["baseline"],
                                                       probabilities["transfer"], weight)  # fmt: skip
    # the release is scored as saved; it must agree with the candidate it was built from
    chosen = probabilities[selection["winner"]]
    gap = float(np.max(np.abs(probabilities["release"] - chosen))) if len(chosen) else 0.0
    if gap > RELEASE_TOLERANCE:
        raise RuntimeError(f"evaluate: the released model differs from {selection['winner']} by "
                           f"{gap:.2e} in probability on the test split; rerun select")  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        for name, p in probabilities.items():
            metrics, confusion = classification_metrics(p, labels, classes, params.evaluate.top_k)
            if name in selection["candidates"]:
                metrics.update(selection["candidates"][name])  # its validation figures too
            metrics["released"] = name == selection["winner"] or name == "release"
            write_json(tmp / f"{name}.json", metrics)
            write_json(tmp / f"{name}_confusion.json", {"classes": classes, "matrix": confusion})
            _write_predictions(tmp / f"{name}_predictions.csv", test_files, labels, p, classes)
            log.info("evaluate: %s test accuracy %.4f, macro-F1 %.4f", name, metrics["accuracy"],
                     metrics["macro_f1"])  # fmt: skip
        curve = model_dirs["transfer"] / "learning_curve.json"
        if curve.is_file():
            shutil.copy(curve, tmp / "learning_curve.json")
    return Path(out_dir)


def run(params: Params, root: Path) -> Path:
    models = {name: params.path(name, root) for name in ("baseline", "transfer", "release")}
    return evaluate(params.path("prepared", root), models, params.path("metrics", root), params)
