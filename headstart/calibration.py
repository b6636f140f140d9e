"""Calibrated confidence: temperature scaling, fitted on the validation split, and the expected
calibration error (ECE) with the reliability table behind it.

Temperature scaling divides the model's logits by one number T > 0 (T > 1 softens over-confident
probabilities, T < 1 sharpens under-confident ones) and never changes which class wins. The
released model outputs probabilities, not logits; log(p) equals the logits up to a constant per
image, which softmax ignores, so softmax(log(p) / T) is exactly temperature scaling for one
network, and the same one-number correction for the ensemble's mean of two networks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from headstart.errors import UserError
from headstart.files import read_json

CALIBRATION_FILE = "calibration.json"  # in a release folder, beside model.keras
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)
# the search interval for T: beyond it a temperature says more about the validation split than
# about the model (a perfectly separated split pulls T towards 0 without end)
TEMPERATURE_RANGE = (0.2, 10.0)
# fewer validation errors: nothing to fit T on; it stays 1. One error is enough with T bounded:
# on held-out images of six small data sets, requiring 5 lost all of the fit's gain on digits
# (ECE 0.042 -> 0.087) and changed nothing elsewhere (bench/RESULTS.md)
MIN_ERRORS = 1
_FLOOR = 1e-12  # probabilities are floored here before the log (float32 softmax can give 0)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) per row; T = 1 gives p back (up to the floor)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), _FLOOR, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class) (headstart.metrics.per_image_loss)."""
    from headstart.metrics import per_image_loss

    return float(np.mean(per_image_loss(probabilities, labels)))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray, iterations: int = 80) -> float:
    """The T in TEMPERATURE_RANGE that minimises the NLL of softmax(log(p) / T) on (p, labels).

    The NLL is convex in 1/T (a log-sum-exp of a linear function minus a linear term), so it has
    one minimum along log T: a golden-section search on log T finds it (to ~1e-15 in log T after
    80 iterations). No labels, or one class only, gives T = 1 (nothing to fit)."""
    labels = np.asarray(labels)
    if len(labels) == 0 or np.asarray(probabilities).shape[1] < 2:
        return 1.0
    log_p = np.log(np.clip(np.asarray(probabilities, np.float64), _FLOOR, 1.0))
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        logits = log_p / math.exp(log_t)
        top = logits.max(axis=1)
        return float(
            np.mean(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - logits[rows, labels])
        )

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(iterations):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    best = (low + high) / 2
    return float(math.exp(best)) if loss(best) < loss(0.0) else 1.0


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin ((0, 1/bins], ..., ((bins-1)/bins, 1]): images, mean
    confidence (the top probability) and accuracy; `ece` = sum over bins of
    images/total * |accuracy - confidence|. Empty bins hold 0 images and None values."""
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
    correct = (
        (probabilities.argmax(axis=1) == np.asarray(labels))
        if len(probabilities)
        else np.zeros(0, bool)
    )
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts: list[int] = []
    mean_confidence: list[float | None] = []
    accuracy: list[float | None] = []
    ece = 0.0
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        counts.append(n)
        if n:
            conf, acc = float(confidence[members].mean()), float(correct[members].mean())
            ece += n / len(confidence) * abs(acc - conf)
            mean_confidence.append(conf)
            accuracy.append(acc)
        else:
            mean_confidence.append(None)
            accuracy.append(None)
    return {
        "bins": bins,
        "edges": [b / bins for b in range(bins + 1)],
        "counts": counts,
        "confidence": mean_confidence,
        "accuracy": accuracy,
        "ece": float(ece),
    }


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    return reliability(probabilities, labels, bins)["ece"]


def fit(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """What select stores as calibration.json: T, why (`fitted`, or the reason it stays 1) and
    the validation NLL before and after. With no wrong validation image there is nothing to fit:
    on a perfectly separated split the NLL keeps falling as T -> 0 and every answer would read
    1.000."""
    errors = int(np.sum(np.argmax(probabilities, axis=1) != np.asarray(labels)))
    if errors < MIN_ERRORS:
        temperature = 1.0
        note = (
            f"kept at 1: {errors} wrong validation image(s): a perfectly separated split "
            "has nothing to fit a temperature on"
        )
    else:
        temperature = fit_temperature(probabilities, labels)
        low, high = TEMPERATURE_RANGE
        bound = not low * 1.001 < temperature < high / 1.001
        note = "fitted" + (" (at the bound of its range)" if bound else "")
    before = negative_log_likelihood(probabilities, labels)
    after = (
        before
        if temperature == 1.0
        else negative_log_likelihood(apply_temperature(probabilities, temperature), labels)
    )
    return {
        "method": "temperature scaling of log-probabilities, fitted on the validation split",
        "temperature": temperature,
        "note": note,
        "val_errors": errors,
        "val_images": int(len(labels)),
        "val_nll_before": before,
        "val_nll_after": after,
    }


def read_temperature(model_dir: Path | str) -> float | None:
    """The temperature stored beside a model (None when the folder has no calibration.json)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        temperature = float(read_json(path)["temperature"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{path}: unreadable ({type(err).__name__}: {err}); rerun "
            "`headstart step select` or delete the file"
        ) from None
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(
            f"{path}: temperature must be a positive number (got {temperature}); "
            "rerun `headstart step select`"
        )
    return temperature
