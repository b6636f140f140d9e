"""Choosing the transfer head (folds, the CV stopping rule, the choice, the exported head) and the
release rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from headstart import heads


def blobs(
    per_class: int = 30, classes: int = 3, features: int = 8, spread: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around distinct centres: learnable, with a little overlap."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, features)) * 2
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + rng.normal(0, spread, (len(labels), features))).astype(
        "float32"
    ), labels


def test_folds_are_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [9, 10, 11, 30])
    fold = heads.fold_assignment(labels, 3, seed=5)
    for label in range(4):
        counts = np.bincount(fold[labels == label], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(fold, heads.fold_assignment(labels, 3, seed=5))
    assert not np.array_equal(fold, heads.fold_assignment(labels, 3, seed=6))


@pytest.mark.parametrize("name", ["linear", "small"])
def test_cross_validation_learns_separable_features_and_scores_every_image_once(name):
    x, y = blobs()
    config = next(c for c in heads.candidates(32, 0.2) if c.name == name)
    result = heads.cross_validate(
        config,
        x,
        y,
        len(y),
        folds=3,
        epochs=30,
        batch_size=16,
        learning_rate=1e-2,
        seed=1,
        classes=3,
        patience=30,
    )
    assert result.hits.shape == (30, len(y))
    assert result.held_out.sum() == len(y)
    assert np.allclose(result.curve, result.hits.mean(axis=1))  # pooled: each image once
    assert result.score >= 0.95
    assert result.score == pytest.approx(result.best_hits.mean(), abs=0.05)
    unseen = result.best_out_of_fold
    assert unseen.shape == (len(y), 3) and np.allclose(unseen.sum(axis=1), 1.0, atol=5e-3)
    assert np.array_equal(unseen.argmax(axis=1) == y, result.best_hits)


def test_cross_validation_stops_after_patience_epochs_without_improvement():
    x, y = blobs(spread=0.01)  # perfect after an epoch or two: nothing left to gain
    linear = heads.candidates(8, 0.0)[0]
    result = heads.cross_validate(
        linear,
        x,
        y,
        len(y),
        folds=3,
        epochs=50,
        batch_size=16,
        learning_rate=1e-2,
        seed=1,
        classes=3,
        patience=4,
    )
    assert len(result.curve) == int(np.argmax(result.curve)) + 1 + 4 < 50


def test_views_of_one_image_share_its_fold_and_only_first_views_are_scored():
    """Random labels on random features: nothing to learn, only to memorise. A second view of
    each image (nearly the same row) in another fold than its first would let a wide head
    memorise it and score far above chance; in the same fold, the held-out images stay new."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (90, 16)).astype("float32")
    y = rng.integers(0, 3, 90)
    wide = heads.HeadConfig("wide", 256, 0.0, 0.0, 0)
    common = {
        "folds": 3,
        "epochs": 40,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "seed": 1,
        "classes": 3,
        "patience": 40,
    }
    views = heads.cross_validate(wide, np.concatenate([x, x + 0.01]), np.tile(y, 2), 90, **common)
    assert views.hits.shape == (40, 90)  # first views only
    assert views.curve.max() < 0.6
    # the same rows as 180 separate images: copies land in other folds and are memorised
    leaked = heads.cross_validate(wide, np.concatenate([x, x + 0.01]), np.tile(y, 2), 180, **common)
    assert leaked.curve.max() > 0.7  # ~2/3 of the copies sit in another fold


def test_the_final_keras_head_computes_what_was_trained(tmp_path):
    import keras

    x, y = blobs(features=12)
    for config in heads.candidates(16, 0.3):
        model, history = heads.fit_final(
            config, x * 10 + 3, y, epochs=5, batch_size=16, learning_rate=1e-2, seed=2, classes=3
        )
        model.save(tmp_path / f"{config.name}.keras")
        loaded = keras.saving.load_model(tmp_path / f"{config.name}.keras", safe_mode=True)
        probabilities = np.asarray(loaded(x * 10 + 3))
        accuracy = float(np.mean(probabilities.argmax(axis=1) == y))
        assert accuracy == pytest.approx(history["accuracy"][-1])  # inference = training's
        assert len(history["loss"]) == 5


def one_hot_ish(labels: np.ndarray, right: np.ndarray, confidence: float) -> np.ndarray:
    """Two-class probabilities: `confidence` on the true class where `right`, else on the other."""
    p = np.full((len(labels), 2), 1 - confidence)
    answer = np.where(right, labels, 1 - labels)
    p[np.arange(len(labels)), answer] = confidence
    return p


def test_the_release_is_the_ensemble_unless_a_member_is_clearly_better():
    from tasks.select import choose

    labels = np.arange(12) % 2
    rng = np.random.default_rng(0)
    good = one_hot_ish(labels, rng.random(12) < 0.9, 0.8)
    close = one_hot_ish(labels, rng.random(12) < 0.85, 0.8)
    tied = {"baseline": good, "transfer": close, "ensemble": (good + close) / 2}
    winner, reason, metrics = choose(tied, labels)
    assert winner == "ensemble" and "(the default)" in reason and "12 images" in reason
    assert metrics["baseline"]["paired_standard_error"] > 0

    perfect = one_hot_ish(labels, np.ones(12, bool), 0.99)
    wrong = one_hot_ish(labels, np.zeros(12, bool), 0.99)  # a broken member drags the mean
    clear = {"baseline": perfect, "transfer": wrong, "ensemble": (perfect + wrong) / 2}
    winner, reason, _ = choose(clear, labels)
    assert winner == "baseline" and "by more than one paired standard error" in reason


def cv_result(name: str, complexity: int, pooled: list[float]) -> heads.CvResult:
    """A CV result whose pooled curve is `pooled` (one fold of 100 images)."""
    config = heads.HeadConfig(name, 0, 0.0, 0.0, complexity)
    accuracy = np.array(pooled)[:, None]
    hits = np.zeros((len(pooled), 100), dtype=bool)
    unseen = np.full((len(pooled), 100, 2), 0.5, np.float16)
    return heads.CvResult(config, accuracy, 1 - accuracy, np.array([100.0]), hits, unseen)


def test_the_head_with_the_highest_pooled_cv_accuracy_is_chosen_even_if_more_complex():
    simple = cv_result("simple", 0, [0.70, 0.80, 0.80, 0.80])
    complex_ = cv_result("complex", 1, [0.70, 0.81, 0.81, 0.81])
    chosen, reason = heads.choose([simple, complex_])
    assert chosen is complex_ and reason.startswith("complex: highest pooled CV accuracy (0.8100")
    assert "simple 0.8000" in reason
    tied = cv_result("tied", 2, [0.70, 0.81, 0.81, 0.81])
    assert heads.choose([tied, complex_])[0] is complex_  # an exact tie goes to the simpler


def test_a_feature_constant_in_training_does_not_swamp_new_images():
    """Backbone features that are zero on every training image (ReLU units a few dozen images
    never fire) but not on a new one: the head must still answer from the features that vary."""
    x, y = blobs(per_class=20, classes=2, features=8, seed=3)
    silent = np.zeros((len(y), 40), np.float32)
    config = next(c for c in heads.candidates(32, 0.2) if c.name == "linear")
    head, _ = heads.fit_final(
        config,
        np.hstack([x, silent]),
        y,
        epochs=30,
        batch_size=16,
        learning_rate=1e-2,
        seed=1,
        classes=2,
    )
    fresh_x, fresh_y = blobs(per_class=50, classes=2, features=8, seed=3)
    awake = np.full((len(fresh_y), 40), 0.05, np.float32)  # small, as such features are
    predicted = head.predict(np.hstack([fresh_x, awake]), verbose=0).argmax(axis=1)
    assert np.mean(predicted == fresh_y) >= 0.95


def test_tied_cv_epochs_are_broken_by_the_pooled_loss_not_taken_earliest():
    x, y = blobs(per_class=20, spread=0.05)  # perfectly separable: accuracy 1.0 from epoch 1
    config = next(c for c in heads.candidates(32, 0.2) if c.name == "linear")
    result = heads.cross_validate(
        config,
        x,
        y,
        len(y),
        folds=3,
        epochs=12,
        batch_size=16,
        learning_rate=1e-2,
        seed=1,
        classes=3,
        patience=12,
    )
    perfect = np.flatnonzero(result.curve == 1.0)  # several epochs tie at 1.000
    assert len(perfect) >= 4
    assert np.all(np.diff(result.pooled_loss[perfect]) < 0)  # ... while the loss still falls
    assert result.best_epochs > perfect[0] + 2  # so the tie goes to a later, surer epoch


def test_a_configuration_that_cannot_learn_is_dropped_early_and_recorded_as_such():
    x, y = blobs()
    common = {
        "folds": 3,
        "epochs": 20,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "seed": 1,
        "classes": 3,
        "patience": 20,
    }
    linear, small = heads.candidates(32, 0.2)[:2]
    leader = heads.cross_validate(linear, x, y, len(y), **common)
    stuck = heads.HeadConfig("stuck", 0, 0.0, 0.0, 3, learning_rate_scale=0.0)  # never moves
    dropped = heads.cross_validate(stuck, x, y, len(y), leader=leader, **common)
    assert len(dropped.curve) == heads.DROP_FROM  # stopped at the first check
    assert dropped.dropped.startswith(f"dropped after {heads.DROP_FROM} epochs")
    assert "for linear" in dropped.dropped and dropped.record()["dropped"] == dropped.dropped
    kept = heads.cross_validate(small, x, y, len(y), leader=leader, **common)  # as good: runs on
    assert not kept.dropped and len(kept.curve) == 20 and kept.record()["dropped"] is None
    chosen, reason = heads.choose([leader, dropped, kept])
    assert chosen is not dropped and "stuck" in reason and "(dropped early)" in reason


def test_a_dropped_configuration_is_never_chosen_even_with_a_higher_score():
    finished = cv_result("finished", 1, [0.70, 0.80])
    early = dataclasses.replace(cv_result("early", 0, [0.90, 0.90]), dropped="dropped after 2")
    chosen, reason = heads.choose([early, finished])
    assert chosen is finished and "early 0.9000 (dropped early)" in reason


def test_the_cv_stops_once_the_pooled_loss_has_not_fallen_for_loss_patience_epochs():
    x, y = blobs(per_class=15, features=60, spread=3.0)  # few, noisy images: it overfits soon
    small = heads.candidates(32, 0.2)[1]
    common = {
        "folds": 3,
        "epochs": 40,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "seed": 1,
        "classes": 3,
        "patience": 40,
    }
    full = heads.cross_validate(small, x, y, len(y), **common)
    stopped = heads.cross_validate(small, x, y, len(y), loss_patience=4, **common)
    lowest = int(np.argmin(full.pooled_loss))
    assert lowest + 1 + 4 < 40  # the loss turned up well before the last epoch ...
    assert len(stopped.curve) == lowest + 1 + 4  # ... and the run stopped 4 epochs after its low
    assert np.array_equal(stopped.accuracy, full.accuracy[: len(stopped.curve)])  # same epochs


def test_cross_validation_is_deterministic_for_a_seed():
    x, y = blobs()
    dense = heads.candidates(32, 0.3)[2]
    runs = [
        heads.cross_validate(
            dense,
            x,
            y,
            len(y),
            folds=3,
            epochs=4,
            batch_size=16,
            learning_rate=1e-2,
            seed=seed,
            classes=3,
            patience=4,
        )
        for seed in (7, 7, 8)
    ]
    assert np.array_equal(runs[0].loss, runs[1].loss)
    assert np.array_equal(runs[0].out_of_fold, runs[1].out_of_fold)
    assert not np.array_equal(runs[0].loss, runs[2].loss)
