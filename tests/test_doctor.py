"""The data doctor: confident learning finds flipped labels; on a real run an injected mislabel
is ranked first, drawn on the contact sheet, listed by `headstart review`, and an accepted
suggestion is applied by the next prepare."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from helpers import class_pattern, run_in

from headstart import doctor
from headstart.doctor import label_issues


def noisy_probabilities(seed: int, images: int = 300, classes: int = 3, flips: int = 15):
    """Probabilities of a decent model (right class ~0.7 on average, spread by a Dirichlet),
    the true labels, and the given labels with `flips` of them changed to another class."""
    rng = np.random.default_rng(seed)
    truth = np.arange(images) % classes
    alpha = np.ones((images, classes))
    alpha[np.arange(images), truth] = 6.0
    probabilities = np.array([rng.dirichlet(a) for a in alpha])
    given = truth.copy()
    flipped = rng.choice(images, flips, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, classes, flips)) % classes
    return probabilities, truth, given, set(flipped.tolist())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_confident_learning_finds_most_flipped_labels_and_suggests_the_true_class(seed):
    probabilities, truth, given, flipped = noisy_probabilities(seed)
    ranked, suggested = label_issues(probabilities, given)
    found = set(ranked.tolist())
    assert len(found & flipped) / len(found) >= 0.6  # precision
    assert len(found & flipped) / len(flipped) >= 0.6  # recall
    right = [truth[row] == s for row, s in zip(ranked, suggested, strict=True) if row in flipped]
    assert np.mean(right) >= 0.8
    confidence = probabilities[ranked, given[ranked]]
    assert np.all(np.diff(confidence) >= 0)  # lowest self-confidence first
    assert not np.any(probabilities[ranked].argmax(axis=1) == given[ranked])


def test_strong_evidence_is_a_given_label_far_under_its_classes_mean():
    from headstart.doctor import STRONG, strong_evidence

    labels = np.array([0, 0, 0, 1, 1, 1])
    given = np.array([0.9, 0.9, 0.03, 0.5, 0.5, 0.004])  # class means 0.61 and 0.335
    probabilities = np.stack([given, 1 - given], axis=1)
    probabilities[labels == 1] = probabilities[labels == 1][:, ::-1]  # column 1 = class 1
    # 0.03 > 0.02 x 0.61 = 0.0122: not strong; 0.004 < 0.02 x 0.335 = 0.0067: strong
    assert STRONG == 0.02
    assert strong_evidence(probabilities, labels).tolist() == [False] * 5 + [True]


def test_clean_labels_of_a_confident_model_flag_nothing():
    probabilities, truth, _, _ = noisy_probabilities(4, flips=0)
    probabilities = 0.1 * probabilities + 0.9 * np.eye(3)[truth]  # every image well separated
    ranked, _ = label_issues(probabilities, truth)
    assert len(ranked) == 0


@pytest.mark.slow
def test_neighbours_vote_without_an_images_own_label_and_never_give_a_class_zero():
    """Three clusters of 12 images; one image in cluster 0 is labelled 1. Its own vote left
    out, its 10 neighbours all say 0; a validation image in cluster 2 gets cluster 2's votes."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(3, 8)) * 5
    base = np.repeat(centres, 12, axis=0) + rng.normal(size=(36, 8)) * 0.3
    labels = np.repeat(np.arange(3), 12)
    labels[4] = 1
    votes = doctor.neighbour_votes(base, base, labels, 3, own=True)
    assert votes.shape == (36, 3) and np.allclose(votes.sum(axis=1), 1)
    floor = doctor.PSEUDO_VOTES / 3 / (doctor.NEIGHBOURS + doctor.PSEUDO_VOTES)
    assert votes[4, 1] == pytest.approx(floor) and votes[4, 0] == votes[4].max()
    counted = doctor.neighbour_votes(base, base, labels, 3, own=False)  # itself among its 10
    assert counted[4, 1] == pytest.approx(floor + 1 / (doctor.NEIGHBOURS + doctor.PSEUDO_VOTES))
    held = doctor.neighbour_votes(centres[2:] + 0.1, base, labels, 3, own=False)
    assert held.argmax() == 2 and held[0, 2] > 0.9


def test_two_opinions_join_as_their_normalised_geometric_mean():
    joined = doctor.joined(np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert joined == pytest.approx(np.array([[0.75, 0.25], [0.2, 0.8]]))


def test_an_injected_mislabel_is_ranked_first_and_a_review_relabels_it(trained_copy):
    root = trained_copy
    class_pattern(1, seed=4242).save(root / "data" / "class_0" / "odd_one.png")  # a class_1 image
    run_in(root, "headstart", "run")
    found = json.loads((root / "artifacts/plots/doctor.json").read_text())
    first = found["label_issues"][0]
    assert (first["file"], first["given"], first["suggested"]) == (
        "class_0/odd_one.png",
        "class_0",
        "class_1",
    )
    assert (root / "artifacts/plots/suspects.png").stat().st_size > 5_000
    listed = run_in(root, "headstart", "review").stdout
    assert re.search(r"\n +1\.[ *] class_0/odd_one\.png +\[train\] +class_0 -> class_1", listed)
    run_in(root, "headstart", "review", "--accept", "1")
    decided = yaml.safe_load((root / "data-review.yaml").read_text())
    assert decided == {"relabel": {"class_0/odd_one.png": "class_1"}}
    status = run_in(root, "headstart", "status").stdout
    assert "prepare    stale" in status  # the review file is a dependency of prepare
    run_in(root, "headstart", "step", "prepare")
    report = json.loads((root / "artifacts/data-report/report.json").read_text())
    assert report["review"]["relabelled"] == [
        {"file": "class_0/odd_one.png", "from": "class_0", "to": "class_1"}
    ]
    assert report["per_class"]["class_1"]["used"] == report["per_class"]["class_0"]["used"] + 1


def test_images_with_the_features_of_one_in_another_split_are_possible_leaks(tmp_path):
    from headstart.doctor import LEAK_SIMILARITY, possible_leaks

    prepared, features = tmp_path / "prepared", tmp_path / "features"
    prepared.mkdir()
    features.mkdir()
    rng = np.random.default_rng(0)
    train, val, test = (rng.normal(size=(n, 64)) for n in (20, 3, 6))
    test[4] = 3.0 * train[7] + rng.normal(scale=0.01, size=64)  # the same image, rescaled
    val[1] = 0.5 * train[2] + rng.normal(scale=0.01, size=64)
    test[0] = 2.0 * val[2] + rng.normal(scale=0.01, size=64)
    rows = [["file", "sha256", "label", "split", "index"]]
    for split, x in (("train", train), ("val", val), ("test", test)):
        rows += [[f"a/{split}_{i}.png", "", "a", split, i] for i in range(len(x))]
    (prepared / "manifest.csv").write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    for split, x in (("train", train), ("val", val), ("test", test)):
        np.save(prepared / f"{split}_labels.npy", np.zeros(len(x), np.int32))
        np.save(features / f"{split}_features.npy", x.astype(np.float32))
        np.save(features / f"{split}_labels.npy", np.zeros(len(x), np.int32))
    leaks = possible_leaks(prepared, doctor.first_views(prepared, features))
    assert sorted((leak["file"], leak["match"], leak["match_split"]) for leak in leaks) == [
        ("a/test_0.png", "a/val_2.png", "val"),
        ("a/test_4.png", "a/train_7.png", "train"),
        ("a/val_1.png", "a/train_2.png", "train"),
    ]
    assert min(leak["similarity"] for leak in leaks) >= LEAK_SIMILARITY
