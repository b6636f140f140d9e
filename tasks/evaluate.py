"""evaluate: every candidate and the release, once, on the held-out test split ->
artifacts/metrics/: `<model>.json` every figure (per class too), and `headline.json`, the one
DVC metrics file (see `headline`). The only step that reads the test split's labels.

For the release also: the expected calibration error before and after its temperature
(`ece`, `ece_calibrated`; the reliability tables behind them in release_calibration.json, for
the plots step), and the fraction of test images its OOD threshold keeps (`ood_kept`), scored
on the head step's cached test features: the cache must have been computed by the release's own
copy of the backbone (what `headstart predict --reject` runs), from these prepared images."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np

from headstart import calibration, features, ood
from headstart.artifacts import (
    BACKBONE_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    PROBABILITIES_FILE,
    PRODUCERS,
    SELECTION_FILE,
    load_features,
    load_probabilities,
    load_split,
)
from headstart.errors import UserError
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


def release_extras(
    release_dir: Path,
    features_dir: Path,
    prepared_dir: Path,
    probabilities: np.ndarray,
    labels: np.ndarray,
    params: Params,
) -> tuple[dict, dict]:
    """(flat metrics, reliability tables) of the release's calibration and OOD threshold on test."""
    require(release_dir / calibration.CALIBRATION_FILE, "select")
    temperature = calibration.read_temperature(release_dir)
    calibrated = calibration.apply_temperature(probabilities, temperature)
    before = calibration.reliability(probabilities, labels)
    after = calibration.reliability(calibrated, labels)
    detector, _ = ood.load(release_dir)
    require(release_dir / BACKBONE_FILE, "select")
    views = features.params_views(params)
    key = features.cache_key(prepared_dir, release_dir, views, params.base.seed)
    if not features.is_current(features_dir, key):
        raise UserError(
            f"{features_dir}: the feature cache was not computed by the release's "
            "backbone from these prepared images; run `headstart step head`, then "
            "`headstart step select`"
        )
    test_features, test_labels = load_features(features_dir, "test")
    if not np.array_equal(test_labels, labels):
        raise UserError(
            f"{features_dir}: its test rows are not the prepared test split; run "
            "`headstart step head`"
        )
    scores = detector.score(test_features)
    metrics = {
        "temperature": temperature,
        "ece": before["ece"],
        "ece_calibrated": after["ece"],
        "loss_calibrated": calibration.negative_log_likelihood(calibrated, labels),
        "ood_threshold": detector.threshold,
        "ood_kept": float(np.mean(scores <= detector.threshold)) if len(scores) else 1.0,
    }
    return metrics, {"temperature": temperature, "before": before, "after": after}


def evaluate(
    prepared_dir: Path | str,
    model_dirs: dict[str, Path],
    features_dir: Path | str,
    out_dir: Path | str,
    params: Params,
) -> Path:
    """`<out>/<name>.json` metrics, `<name>_confusion.json`, `<name>_predictions.csv` for the
    baseline, transfer, ensemble (its weight from selection.json) and release models."""
    import keras

    from headstart.training import predict

    prepared_dir = Path(prepared_dir)
    classes = read_json(require(prepared_dir / LABELS_FILE, "prepare"))["classes"]
    for name, folder in model_dirs.items():
        require(
            folder / (PROBABILITIES_FILE if name == "transfer" else MODEL_FILE), PRODUCERS[name]
        )
    selection = read_json(model_dirs["release"] / SELECTION_FILE)
    with open(prepared_dir / MANIFEST_FILE) as handle:
        test_files = [row["file"] for row in csv.DictReader(handle) if row["split"] == "test"]
    x, labels = load_split(prepared_dir, "test")
    probabilities = {  # the transfer model's were recorded by head (no second backbone pass)
        name: load_probabilities(folder, "test")
        if name == "transfer"
        else predict(keras.saving.load_model(folder / MODEL_FILE), x)
        for name, folder in model_dirs.items()
    }
    weight = selection["ensemble_transfer_weight"]
    probabilities["ensemble"] = ensemble_probabilities(
        probabilities["baseline"], probabilities["transfer"], weight
    )
    # the release is scored as saved; it must agree with the candidate it was built from
    chosen = probabilities[selection["winner"]]
    gap = float(np.max(np.abs(probabilities["release"] - chosen))) if len(chosen) else 0.0
    if gap > RELEASE_TOLERANCE:
        raise UserError(
            f"evaluate: the released model differs from {selection['winner']} by "
            f"{gap:.2e} in probability on the test split; rerun select"
        )
    extras, tables = release_extras(
        model_dirs["release"],
        Path(features_dir),
        prepared_dir,
        probabilities["release"],
        labels,
        params,
    )
    figures = {}
    with atomic_dir(out_dir) as tmp:
        for name, p in probabilities.items():
            metrics, confusion = classification_metrics(p, labels, classes, params.evaluate.top_k)
            if name in selection["candidates"]:
                metrics.update(selection["candidates"][name])  # its validation figures too
            metrics["released"] = name == selection["winner"] or name == "release"
            if name == "release":
                metrics.update(extras)
            figures[name] = metrics
            write_json(tmp / f"{name}.json", metrics)
            write_json(tmp / f"{name}_confusion.json", {"classes": classes, "matrix": confusion})
            _write_predictions(tmp / f"{name}_predictions.csv", test_files, labels, p, classes)
            log.info(
                "evaluate: %s test accuracy %.4f, macro-F1 %.4f",
                name,
                metrics["accuracy"],
                metrics["macro_f1"],
            )
        write_json(tmp / "release_calibration.json", tables)
        write_json(tmp / HEADLINE_FILE, headline(figures))
        log.info(
            "evaluate: release ECE %.4f -> %.4f calibrated (T = %.3f); OOD threshold keeps "
            "%.1f %% of the test images",
            extras["ece"],
            extras["ece_calibrated"],
            extras["temperature"],
            100 * extras["ood_kept"],
        )
        curve = model_dirs["transfer"] / "learning_curve.json"
        if curve.is_file():
            shutil.copy(curve, tmp / "learning_curve.json")
    return Path(out_dir)


HEADLINE_FILE = "headline.json"  # the DVC metrics file (dvc.yaml's `metrics:` lists only it)


def headline(figures: dict[str, dict]) -> dict:
    """What `dvc exp show` and `dvc metrics diff` compare: the release as a user gets it
    (calibrated loss and ECE), each candidate's test accuracy and the test size. Eight short,
    unique names: every key of a DVC metrics file is a column of `dvc exp show`, and a name two
    files share is shown with its whole path (the per-model files made the table 246 columns
    wide). After a change to the transfer head all but test_images may change, and the table
    must still fit 120 columns. Everything else is in `<model>.json` (which candidate was
    released: selection.json)."""
    release = figures["release"]
    shown = {
        "accuracy": release["accuracy"],
        "macro_f1": release["macro_f1"],
        "loss": release["loss_calibrated"],
        "ece": release["ece_calibrated"],
        **{name: figures[name]["accuracy"] for name in ("baseline", "transfer", "ensemble")},
    }  # to 4 decimals, as a table shows them (`<model>.json` keeps every digit)
    return {
        **{key: round(value, 4) for key, value in shown.items()},
        "test_images": release["test_images"],
    }


def run(params: Params, root: Path) -> Path:
    models = {name: params.path(name, root) for name in ("baseline", "transfer", "release")}
    return evaluate(
        params.path("prepared", root),
        models,
        params.path("features", root),
        params.path("metrics", root),
        params,
    )
