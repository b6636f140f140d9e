"""The OOD score behind "unknown" answers (headstart/ood.py), on small arrays checked against
direct formulas."""

from __future__ import annotations

import numpy as np
import pytest

from headstart import ood
from headstart.errors import UserError


def blobs(seed: int = 0, per_class: int = 60, classes: int = 3, width: int = 8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, width)) + 3
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(0, 0.3, (len(labels), width)), labels


@pytest.mark.parametrize("n", [1, 7, 20, 212, 1000])
def test_the_threshold_keeps_at_least_the_asked_fraction(n):
    scores = np.random.default_rng(n).normal(size=n)
    for keep in (0.5, 0.9, 0.95, 1.0):
        threshold = ood.choose_threshold(scores, keep)
        kept = np.mean(scores <= threshold)
        assert kept >= keep
        assert kept - 1 / n < keep  # one image fewer would not do: the fewest that keep enough
        ordered = np.sort(scores)
        kept_images = round(kept * n)
        assert threshold > ordered[kept_images - 1]  # no score sits on the threshold
        if kept_images < n:  # halfway to the first score past it
            assert threshold == pytest.approx((ordered[kept_images - 1] + ordered[kept_images]) / 2)


def test_ledoit_wolf_matches_the_textbook_formula():
    """Ledoit & Wolf (2004) written out sample by sample (scikit-learn's normalisation: the
    squared Frobenius norms divided by the dimension); ours sums |x|^4 instead."""
    x = np.random.default_rng(0).normal(size=(40, 60)) * np.linspace(0.5, 2, 60)
    x -= x.mean(axis=0)
    n, p = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / p
    delta = np.sum((sample - mu * np.eye(p)) ** 2) / p
    beta = sum(np.sum((np.outer(row, row) - sample) ** 2) for row in x) / n**2 / p
    expected = min(beta, delta) / delta
    ours, shrinkage = ood.ledoit_wolf(x)
    assert 0.1 < expected < 0.9  # a real mix of the sample covariance and the scaled identity
    assert shrinkage == pytest.approx(expected)
    assert np.allclose(ours, (1 - expected) * sample + expected * mu * np.eye(p))


def test_cosine_score_is_one_minus_the_best_cosine_similarity():
    features, labels = blobs()
    detector, record = ood.fit(features, labels, 3, "cosine")
    assert record["method"] == "cosine" and record["train_images"] == 180
    x = np.random.default_rng(1).normal(size=(5, 8))
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    centroids = unit(np.stack([unit(features[labels == c]).mean(axis=0) for c in range(3)]))
    expected = 1 - (unit(x) @ centroids.T).max(axis=1)
    assert np.allclose(detector.score(x), expected)


def test_mahalanobis_score_is_the_distance_to_the_nearest_centroid():
    features, labels = blobs()
    detector, record = ood.fit(features, labels, 3, "mahalanobis")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(axis=0) for c in range(3)])
    covariance, shrinkage = ood.ledoit_wolf(unit - means[labels])
    assert record["shrinkage"] == shrinkage
    precision = np.linalg.inv(covariance)
    x = np.random.default_rng(2).normal(size=(5, 8)) + 3
    x_unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.sqrt(
        np.min([np.einsum("ij,jk,ik->i", x_unit - m, precision, x_unit - m) for m in means], axis=0)
    )
    assert np.allclose(detector.score(x), expected)


@pytest.mark.parametrize("method", ["mahalanobis", "cosine"])
def test_fitting_and_scoring_batch_by_batch_equals_all_rows_at_once(method, tmp_path):
    features, labels = blobs(per_class=50)
    features[::3] *= 4  # rows of different lengths: normalising must happen per row
    whole, record = ood.fit(features, labels, 3, method, rows=len(labels))
    mapped = np.lib.format.open_memmap(tmp_path / "f.npy", "w+", np.float32, features.shape)
    mapped[:] = features
    stored = features.astype(np.float32).astype(np.float64)  # as the cache holds them
    once, _ = ood.fit(stored, labels, 3, method, rows=len(labels))
    batched, batched_record = ood.fit(mapped, labels, 3, method, rows=7)  # 150 = 21 x 7 + 3
    assert np.allclose(batched.centroids, once.centroids, rtol=1e-5, atol=1e-6)
    if method == "mahalanobis":
        assert np.allclose(batched.whitening, once.whitening, rtol=1e-4, atol=1e-6)
        assert batched_record["shrinkage"] == pytest.approx(record["shrinkage"], rel=1e-4)
        assert batched_record["shrinkage"] > 0
    x = np.random.default_rng(4).normal(size=(2500, 8)) + 3  # more rows than ood.ROWS
    assert np.allclose(batched.score(x), once.score(x), rtol=1e-4)
    assert np.allclose(
        np.concatenate([once.score(x[:1000]), once.score(x[1000:])]), once.score(x), rtol=1e-12
    )


@pytest.mark.parametrize("method", ["mahalanobis", "cosine"])
def test_far_features_score_past_a_threshold_that_keeps_the_known_ones(method, tmp_path):
    features, labels = blobs(per_class=100)
    detector, record = ood.fit(features[::2], labels[::2], 3, method)
    threshold = ood.choose_threshold(detector.score(features[1::2]), 0.95)
    fitted = ood.Detector(detector.method, detector.centroids, detector.whitening, threshold)
    far = np.random.default_rng(3).normal(0, 1, (50, 8)) - 3  # another part of feature space
    assert fitted.unknown(fitted.score(far)).all()
    ood.save(fitted, tmp_path, {**record, "keep": 0.95})
    loaded, stored = ood.load(tmp_path)
    assert stored["threshold"] == threshold and stored["keep"] == 0.95
    assert np.allclose(loaded.score(far), fitted.score(far), rtol=1e-4)  # float32 on disk


def test_a_missing_or_damaged_detector_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="ood.json: missing; --reject needs a release"):
        ood.load(tmp_path)
    (tmp_path / ood.OOD_FILE).write_text('{"method": "mahalanobis", "threshold": 1.0}')
    np.savez(tmp_path / ood.OOD_ARRAYS, centroids=np.zeros((2, 3)))
    with pytest.raises(UserError, match="incomplete method 'mahalanobis'"):
        ood.load(tmp_path)
    (tmp_path / ood.OOD_ARRAYS).write_bytes(b"not an npz")
    with pytest.raises(UserError, match="unreadable OOD detector"):
        ood.load(tmp_path)


def test_an_unknown_method_names_the_setting():
    features, labels = blobs()
    with pytest.raises(UserError, match="ood.method must be one of mahalanobis, cosine"):
        ood.fit(features, labels, 3, "knn")
