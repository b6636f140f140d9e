"""Classification metrics and model evaluation on a prepared split (used by evaluate and by
promotion)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from headstart.artifacts import LABELS_FILE, load_split
from headstart.files import read_json


def macro_f1(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 per row of (resamples x images) label / prediction arrays (one row: a plain
    array); per class 2 TP / (2 TP + FP + FN), a class with no true and no predicted image 0."""
    labels, predicted = np.atleast_2d(labels), np.atleast_2d(predicted)
    scores = np.zeros(len(labels))
    for c in range(classes):
        true, said = labels == c, predicted == c
        tp = np.sum(true & said, axis=1)
        wrong = np.sum(true ^ said, axis=1)  # false positives + false negatives
        denominator = 2 * tp + wrong
        scores += np.divide(2 * tp, denominator, out=np.zeros(len(labels)), where=denominator > 0)
    return scores / classes


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, classes: list[str], top_k: int
) -> tuple[dict, list[list[int]]]:
    """Flat metrics (DVC can diff them) and the confusion matrix (rows: true, columns: predicted)."""
    n = len(classes)
    predicted = np.argmax(probabilities, axis=1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    k = min(top_k, n)
    top = np.argsort(-probabilities, axis=1)[:, :k]
    metrics = {
        "test_images": len(labels),
        "accuracy": float(np.mean(predicted == labels)),
        "loss": float(np.mean(per_image_loss(probabilities, labels))),
        f"top{k}_accuracy": float(np.mean(np.any(top == labels[:, None], axis=1))),
    }
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i].sum() if confusion[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics.update(
            {
                f"precision.{name}": float(precision),
                f"recall.{name}": float(recall),
                f"f1.{name}": float(f1),
            }
        )
    metrics["macro_f1"] = float(macro_f1(labels, predicted, n)[0])
    return metrics, confusion.tolist()


def ensemble_probabilities(baseline: np.ndarray, transfer: np.ndarray, share: float) -> np.ndarray:
    """The ensemble's probabilities: the weighted geometric mean of the two models' (the mean of
    their log-probabilities, `share` on the transfer model's), normalised; what the released
    ensemble computes from the two models' logits. On 3,000 held-out Fashion-MNIST images it
    beat the arithmetic mean in accuracy and log-loss in each seed (bench/mixing.py): a member
    that is sure an image is not of a class vetoes it, where the arithmetic mean lets the other
    member's confidence through."""
    floor = np.finfo(np.float64).tiny
    log_p = share * np.log(np.maximum(np.asarray(transfer, np.float64), floor)) + (
        1.0 - share
    ) * np.log(np.maximum(np.asarray(baseline, np.float64), floor))
    log_p -= log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def evaluate_model(
    model_path: Path, prepared_dir: Path, top_k: int, split: str = "test"
) -> tuple[dict, list, np.ndarray]:
    import keras

    from headstart.training import predict

    classes = read_json(prepared_dir / LABELS_FILE)["classes"]
    x, y = load_split(prepared_dir, split)
    probabilities = predict(keras.saving.load_model(model_path), x)
    metrics, confusion = classification_metrics(probabilities, y, classes, top_k)
    return metrics, confusion, probabilities


LOSS_FLOOR = 1e-7  # Keras's epsilon: the losses match the ones Keras reports in training


def per_image_loss(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log p(true class) of each image (the one cross-entropy every step reports)."""
    picked = np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, LOSS_FLOOR, 1.0))


def paired_standard_error(hits_a: np.ndarray, hits_b: np.ndarray) -> float:
    """Standard error of the accuracy difference of two models scored on the same items."""
    difference = hits_a.astype(np.float64) - hits_b.astype(np.float64)
    return (
        float(difference.std(ddof=1) / math.sqrt(len(difference))) if len(difference) > 1 else 0.0
    )
