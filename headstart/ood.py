"""The "unknown" answer: an out-of-distribution (OOD) score from the frozen backbone's features.

Fitted on the training split's features (class centroids, and for Mahalanobis one covariance
shared by every class, shrunk towards a multiple of the identity by the Ledoit-Wolf formula:
1280 features from ~1000 images give a singular sample covariance). Fitting and scoring read
`ROWS` rows at a time (the sums behind the centroids and the covariance are sums over rows): no
split's features are held at once, whatever its size. The threshold is the score
that keeps `keep` of the validation images (their score at or below it). An image whose score is
above the threshold is answered "unknown".

Methods (`ood.method`):
- cosine: 1 - the cosine similarity of the image's features to the nearest class centroid (of
  L2-normalised training features);
- mahalanobis: the Mahalanobis distance of the L2-normalised features to the nearest class
  centroid under the shared, shrunk covariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headstart.artifacts import Rows
from headstart.errors import UserError
from headstart.files import read_json, write_json
from headstart.params import OOD_METHODS as METHODS

OOD_FILE = "ood.json"  # in a release folder: method, threshold, kept fraction on validation
OOD_ARRAYS = "ood.npz"  # in a release folder: what the score needs (centroids, whitening)
ROWS = 1024  # feature rows fitted or scored at a time: float64 batches of 10 MB at 1280 features


@dataclass(frozen=True)
class Detector:
    method: str
    centroids: np.ndarray  # classes x features, in the space the score is measured in
    whitening: np.ndarray | None = None  # mahalanobis: features x features, W with W W^T = Σ⁻¹
    threshold: float = math.inf

    def score(self, features: np.ndarray) -> np.ndarray:
        """One score per row of `features` (backbone features): larger = less like the
        training data."""
        scores = [self._score(x) for _, x in _batches(features)]
        return np.concatenate(scores) if scores else np.zeros(0)

    def _score(self, x: np.ndarray) -> np.ndarray:
        if self.method == "cosine":
            return 1.0 - (x @ self.centroids.T).max(axis=1)
        z = x @ self.whitening
        # squared distances to every whitened centroid: |z|² - 2 z·c + |c|²
        distances = (
            (z * z).sum(axis=1, keepdims=True)
            - 2.0 * z @ self.centroids.T
            + (self.centroids * self.centroids).sum(axis=1)
        )
        return np.sqrt(np.maximum(distances.min(axis=1), 0.0))

    def unknown(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _batches(features, rows: int = ROWS):
    """(start, L2-normalised float64 rows) of `features`, `rows` at a time (read through
    `Rows`: a memory-mapped feature cache's pages are dropped as it goes)."""
    reader = Rows(features, np.float64)
    for start in range(0, len(reader), rows):
        yield start, _normalise(reader[start : start + rows])


def _float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32).astype(np.float64)


def ledoit_wolf(centered: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of rows already centred: (1 - s) S + s (tr S / d) I with
    the Ledoit-Wolf (2004) estimate of s (as scikit-learn's `ledoit_wolf`, without centring)."""
    return _shrunk(centered.T @ centered, _square_norms_squared(centered), len(centered))


def _square_norms_squared(centered: np.ndarray) -> float:
    """sum((X*X)^T (X*X)), Ledoit-Wolf's beta sum, as the sum over rows of |x|^4."""
    return float(np.sum(np.square(np.einsum("ij,ij->i", centered, centered))))


def _shrunk(cross: np.ndarray, beta_sum: float, n: int) -> tuple[np.ndarray, float]:
    """`ledoit_wolf` from sums over the n centred rows X: cross = X^T X and the beta sum."""
    d = len(cross)
    sample = cross / n
    mu = float(np.trace(sample)) / d
    delta_sum = float(np.sum(sample * sample))  # == sum((X^T X)^2) / n^2
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2.0 * mu * float(np.trace(sample)) + d * mu * mu) / d
    shrinkage = 0.0 if beta == 0 else min(beta, delta) / delta
    shrunk = (1.0 - shrinkage) * sample
    shrunk[np.diag_indices(d)] += shrinkage * mu
    return shrunk, shrinkage


def fit(
    features: np.ndarray, labels: np.ndarray, classes: int, method: str, rows: int = ROWS
) -> tuple[Detector, dict]:
    """A detector (no threshold yet) from training features and labels, and a record of it.
    Two passes of `rows` rows at a time over `features` (an array or the memory-mapped cache):
    class sums, then the centred rows' sums for Ledoit-Wolf."""
    if method not in METHODS:
        raise UserError(f"ood.method must be one of {', '.join(METHODS)} (got {method!r})")
    labels = np.asarray(labels)
    present = [c for c in range(classes) if np.any(labels == c)]
    index = np.searchsorted(present, labels)  # row -> its class's row of `means`
    width = np.shape(features)[1]
    sums = np.zeros((len(present), width))
    for start, x in _batches(features, rows):
        batch = index[start : start + len(x)]
        for k in np.unique(batch):
            sums[k] += x[batch == k].sum(axis=0)
    means = sums / np.bincount(index, minlength=len(present))[:, None]
    record = {"method": method, "train_images": int(len(labels)), "features": int(width)}
    if method == "cosine":
        return Detector(method, _float32(_normalise(means))), record
    cross, beta_sum = np.zeros((width, width)), 0.0
    for start, x in _batches(features, rows):
        centered = x - means[index[start : start + len(x)]]
        cross += centered.T @ centered
        beta_sum += _square_norms_squared(centered)
    covariance, shrinkage = _shrunk(cross, beta_sum, len(labels))
    values, vectors = np.linalg.eigh(covariance)
    whitening = vectors / np.sqrt(np.maximum(values, values.max() * 1e-12))
    record["shrinkage"] = shrinkage
    # stored as float32 (ood.npz): scored here as predict will score with the stored arrays
    return Detector(method, _float32(means @ whitening), _float32(whitening)), record


def choose_threshold(scores: np.ndarray, keep: float) -> float:
    """A threshold that keeps (score <= threshold) the fewest of `scores` that make at least
    `keep` of them: halfway between the last score kept and the next, so that rounding (float32
    storage, another batch size) cannot move a validation image across it."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1] (got {keep})")
    ordered = np.sort(np.asarray(scores, np.float64))
    if not len(ordered):
        return math.inf
    kept = max(1, math.ceil(keep * len(ordered) - 1e-9))
    if kept == len(ordered):
        return float(ordered[-1] + 1e-6 * max(1.0, abs(ordered[-1])))
    return float((ordered[kept - 1] + ordered[kept]) / 2)


def save(detector: Detector, folder: Path | str, record: dict) -> None:
    folder = Path(folder)
    arrays: dict[str, Any] = {"centroids": detector.centroids.astype(np.float32)}
    if detector.whitening is not None:
        arrays["whitening"] = detector.whitening.astype(np.float32)
    np.savez(folder / OOD_ARRAYS, **arrays)
    write_json(
        folder / OOD_FILE, {**record, "method": detector.method, "threshold": detector.threshold}
    )


def load(folder: Path | str) -> tuple[Detector, dict]:
    """The detector stored in a release folder (UserError naming the file when absent or bad)."""
    folder = Path(folder)
    record_path, arrays_path = folder / OOD_FILE, folder / OOD_ARRAYS
    for path in (record_path, arrays_path):
        if not path.is_file():
            raise UserError(
                f"{path}: missing; --reject needs a release made by "
                "`headstart step select` (rerun it)"
            )
    try:
        record = read_json(record_path)
        with np.load(arrays_path) as arrays:
            centroids = arrays["centroids"].astype(np.float64)
            whitening = arrays["whitening"].astype(np.float64) if "whitening" in arrays else None
        detector = Detector(record["method"], centroids, whitening, float(record["threshold"]))
    except Exception as err:  # a damaged file: one line naming it
        raise UserError(
            f"{folder}: unreadable OOD detector ({type(err).__name__}: {err}); "
            "rerun `headstart step select`"
        ) from None
    if detector.method not in METHODS or (
        detector.method == "mahalanobis" and detector.whitening is None
    ):
        raise UserError(
            f"{record_path}: unknown or incomplete method {detector.method!r}; "
            "rerun `headstart step select`"
        )
    return detector, record
