"""evaluate: both models on the held-out test split -> artifacts/metrics/ (DVC metrics)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from headstart.files import atomic_dir, read_json, require, write_json
from headstart.params import Params
from tasks.prepare import load_split

log = logging.getLogger("headstart.evaluate")

PRODUCERS = {"baseline": "baseline", "transfer": "head"}  # model name -> the step that trains it


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, classes: list[str],
                           top_k: int) -> tuple[dict, list[list[int]]]:  # fmt: skip
    """Flat metrics (DVC can diff them) and the confusion matrix (rows: true, columns: predicted)."""
    n = len(classes)
    predicted = np.argmax(probabilities, axis=1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
    k = min(top_k, n)
    top = np.argsort(-probabilities, axis=1)[:, :k]
    metrics = {
        "test_images": len(labels),
        "accuracy": float(np.mean(predicted == labels)),
        "loss": float(-np.mean(np.log(picked))),
        f"top{k}_accuracy": float(np.mean(np.any(top == labels[:, None], axis=1))),
    }
    f1s = []
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i].sum() if confusion[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        metrics.update({f"precision.{name}": float(precision), f"recall.{name}": float(recall),
                        f"f1.{name}": float(f1)})  # fmt: skip
    metrics["macro_f1"] = float(np.mean(f1s))
    return metrics, confusion.tolist()


def evaluate_model(
    model_path: Path, prepared_dir: Path, top_k: int
) -> tuple[dict, list, np.ndarray]:
    import keras

    from headstart.training import predict

    classes = read_json(prepared_dir / "labels.json")["classes"]
    x, y = load_split(prepared_dir, "test")
    probabilities = predict(keras.saving.load_model(model_path), x)
    metrics, confusion = classification_metrics(probabilities, y, classes, top_k)
    return metrics, confusion, probabilities


def evaluate(prepared_dir: Path | str, model_paths: dict[str, Path], out_dir: Path | str,
             params: Params) -> Path:  # fmt: skip
    """`<out>/<name>.json` metrics, `<name>_confusion.json`, `<name>_predictions.csv` per model."""
    prepared_dir = Path(prepared_dir)
    classes = read_json(require(prepared_dir / "labels.json", "prepare"))["classes"]
    for name, path in model_paths.items():
        require(path, PRODUCERS[name])
    with open(prepared_dir / "manifest.csv") as handle:
        test_files = [row["file"] for row in csv.DictReader(handle) if row["split"] == "test"]
    _, labels = load_split(prepared_dir, "test")
    with atomic_dir(out_dir) as tmp:
        for name, path in model_paths.items():
            metrics, confusion, probabilities = evaluate_model(
                path, prepared_dir, params.evaluate.top_k
            )
            write_json(tmp / f"{name}.json", metrics)
            write_json(tmp / f"{name}_confusion.json", {"classes": classes, "matrix": confusion})
            with open(tmp / f"{name}_predictions.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["file", "label", "predicted", "confidence"])
                for file, label, row in zip(test_files, labels, probabilities, strict=True):
                    best = int(np.argmax(row))
                    writer.writerow([file, classes[label], classes[best], f"{row[best]:.4f}"])
            log.info("evaluate: %s test accuracy %.4f, macro-F1 %.4f", name, metrics["accuracy"],
                     metrics["macro_f1"])  # fmt: skip
    return Path(out_dir)


def run(params: Params, root: Path) -> Path:
    from tasks.baseline import MODEL_FILE

    models = {"baseline": params.path("baseline", root) / MODEL_FILE,
              "transfer": params.path("transfer", root) / MODEL_FILE}  # fmt: skip
    return evaluate(params.path("prepared", root), models, params.path("metrics", root), params)
