"""The data doctor: training and validation images whose label is doubtful, images unlike any
class, and near-duplicate groups across classes, for a person to review (headstart/review.py).

Label errors by confident learning (Northcutt, Jiang and Chuang, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 2021), on out-of-sample probabilities: each
training image's from the cross-validation head that was not fed it (the head step's
`train_out_of_fold.npy`), each validation image's from the transfer model (never trained on it).

1. Per class j, a threshold t_j: the mean probability of class j over the images labelled j.
2. The confident joint C[i, j]: images labelled i whose probability of j reaches t_j (the most
   probable such j when several do), calibrated so that row i sums to the images labelled i.
3. Prune by noise rate: for each i != j, the round(C[i, j]) images labelled i with the largest
   margin p_j - p_i are flagged; an image whose most probable class is its label is not.
4. Ranked by self-confidence (the probability of the given label), lowest first; marked
   `strong` where it is far under its class's threshold (`strong_evidence`).

The probabilities are a second opinion joined to the model's: each image's NEIGHBOURS nearest
training images by their frozen-backbone features vote for their labels (a training image's
own vote left out), and the doctor reads the normalised geometric mean of the model's
probabilities and the votes' shares (`neighbour_votes`, `doubts`). A label the model doubts and
none of the image's look-alikes share is strong evidence; one the model doubts but its
neighbours share is a hard image more often than a wrong label. On bench/doctor.py's data
(Fashion-MNIST, 10 % of the labels flipped, 5 seeds) the strong list's precision went from
0.75 +- 0.11 to 0.80 +- 0.02 and its recall from 0.72 +- 0.08 to 0.75 +- 0.03 (bench/RESULTS.md,
*Data doctor*).

Off-topic images: the training images the release's OOD detector scores above its threshold
(headstart/ood.py), highest first.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from headstart.artifacts import (
    LABELS_FILE,
    MANIFEST_FILE,
    OUT_OF_FOLD_FILE,
    PROBABILITIES_FILE,
    REPORT_FILE,
    SPLITS,
    load_features,
)
from headstart.files import read_json

log = logging.getLogger("headstart.doctor")

DOCTOR_FILE = "doctor.json"  # in the plots folder: every finding, for `headstart review`


STRONG = 0.02  # strong evidence: p(given) under this fraction of its class's mean p(given)


def label_issues(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged rows ranked by self-confidence, lowest first; each one's suggested class)."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    images, classes = probabilities.shape
    counts = np.bincount(labels, minlength=classes)
    thresholds = np.array(
        [probabilities[labels == j, j].mean() if counts[j] else np.inf for j in range(classes)]
    )
    above = probabilities >= thresholds
    confident = above.any(axis=1)
    likely = np.where(above, probabilities, -1.0).argmax(axis=1)
    joint = np.zeros((classes, classes))
    np.add.at(joint, (labels[confident], likely[confident]), 1)
    rows = joint.sum(axis=1, keepdims=True)
    calibrated = np.divide(joint * counts[:, None], rows, out=np.zeros_like(joint), where=rows > 0)
    flagged = np.zeros(images, dtype=bool)
    for given in range(classes):
        members = np.flatnonzero(labels == given)
        for other in range(classes):
            take = int(round(calibrated[given, other])) if other != given else 0
            if take:
                margin = probabilities[members, other] - probabilities[members, given]
                flagged[members[np.argsort(-margin, kind="stable")[:take]]] = True
    flagged &= probabilities.argmax(axis=1) != labels
    rows_flagged = np.flatnonzero(flagged)
    order = np.argsort(probabilities[rows_flagged, labels[rows_flagged]], kind="stable")
    ranked = rows_flagged[order]
    others = probabilities[ranked].copy()
    others[np.arange(len(ranked)), labels[ranked]] = -1.0
    return ranked, others.argmax(axis=1)


def strong_evidence(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: is the probability of its given label under STRONG times the mean that its
    class's images give it (the confident-learning threshold)? Relative, so it holds for a
    cautious head as for a confident one. Confident learning's own set had precision 0.39 on
    Fashion-MNIST with 10 % of the labels flipped (as cleanlab's find_label_issues): a head
    72 % right on its held-out folds counts the real shirt / T-shirt / pullover confusions as
    noise; its ranking was good (0.97 precision in its top 60), and this cut kept precision
    0.62 at recall 0.80 there (bench/RESULTS.md, *Data doctor*)."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    given = probabilities[np.arange(len(labels)), labels]
    classes = probabilities.shape[1]
    means = np.array(
        [given[labels == j].mean() if np.any(labels == j) else 0.0 for j in range(classes)]
    )
    return given < STRONG * means[labels]


NEIGHBOURS = 10  # training images that vote on an image's label
PSEUDO_VOTES = 0.1  # spread evenly over the classes: no class's share is ever 0


def neighbour_votes(
    query: np.ndarray, base: np.ndarray, labels: np.ndarray, classes: int, own: bool
) -> np.ndarray:
    """(len(query), classes): the shares of the labels of each query row's NEIGHBOURS nearest
    `base` rows (cosine similarity; features centred on the base's mean), with PSEUDO_VOTES
    spread over the classes. `own`: the query is the base, and a row does not vote for itself."""
    centre = base.mean(axis=0)

    def unit(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.float32) - centre
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    query, base = unit(query), unit(base)
    count = min(NEIGHBOURS, len(base) - own)
    votes = np.full((len(query), classes), PSEUDO_VOTES / classes)
    for start in range(0, len(query), LEAK_ROWS):
        similarity = query[start : start + LEAK_ROWS] @ base.T
        if own:
            rows = np.arange(len(similarity))
            similarity[rows, start + rows] = -np.inf
        nearest = np.argpartition(-similarity, count - 1, axis=1)[:, :count]
        np.add.at(
            votes[start : start + LEAK_ROWS], (np.arange(len(nearest))[:, None], labels[nearest]), 1
        )
    return votes / votes.sum(axis=1, keepdims=True)


def joined(model: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """The normalised geometric mean of two opinions' probabilities (rows sum to 1)."""
    mean = np.sqrt(np.maximum(np.asarray(model, np.float64), 1e-12) * votes)
    return mean / mean.sum(axis=1, keepdims=True)


def doubts(
    prepared: Path, transfer: Path, views: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split the doctor examines (train, val): (probabilities, given labels), the model's
    out-of-sample probabilities joined to the training images' votes (`neighbour_votes`;
    `views`: each split's features, from `first_views`)."""
    sources = {"train": transfer / OUT_OF_FOLD_FILE, "val": transfer / PROBABILITIES_FILE}
    train = views["train"]
    train_labels = np.load(prepared / "train_labels.npy")
    found = {}
    for split, source in sources.items():
        if not source.is_file():  # head.config: seed runs no cross-validation
            continue
        labels = np.load(prepared / f"{split}_labels.npy")
        if split == "train":
            model = np.load(source)
        else:
            with np.load(source) as recorded:
                model = recorded["val"]
        votes = neighbour_votes(
            views[split], train, train_labels, model.shape[1], own=split == "train"
        )
        found[split] = (joined(model, votes), labels)
    return found


def first_views(prepared: Path, features: Path) -> dict[str, np.ndarray]:
    """Each prepared split's cached features of the images as they are (the first views;
    augmented views, where cached, follow them), read once for every check."""
    views = {}
    for split in SPLITS:
        if (prepared / f"{split}_labels.npy").is_file():
            count = len(np.load(prepared / f"{split}_labels.npy"))
            views[split] = np.asarray(load_features(features, split)[0][:count], np.float32)
    return views


def _files(prepared: Path) -> dict[str, list[str]]:
    """Each split's files in row order, from one read of the manifest."""
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    with open(prepared / MANIFEST_FILE, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] in files:
                files[row["split"]].append(row["file"])
    return files


def examine(
    prepared: Path, transfer: Path, release: Path, features: Path, report: Path, keep: set[str]
) -> dict:
    """Every finding: `label_issues` (file, split, given, suggested, self_confidence),
    `off_topic` (file, label, ood_score, threshold), `label_conflicts` (near-duplicate groups
    across classes, from prepare's report). Files a person marked `keep` are left out."""
    classes = read_json(prepared / LABELS_FILE)["classes"]
    files_of = _files(prepared)
    suspects = []
    views = first_views(prepared, features)
    for split, (probabilities, labels) in doubts(prepared, transfer, views).items():
        files = files_of[split]
        ranked, suggested = label_issues(probabilities, labels)
        strong = strong_evidence(probabilities, labels)
        suspects += [
            {
                "file": files[row],
                "split": split,
                "given": classes[labels[row]],
                "suggested": classes[other],
                "strong": bool(strong[row]),
                "self_confidence": round(float(probabilities[row, labels[row]]), 4),
            }
            for row, other in zip(ranked, suggested, strict=True)
            if files[row] not in keep
        ]
    suspects.sort(key=lambda s: s["self_confidence"])
    return {
        "method": "confident learning (Northcutt et al. 2021): out-of-fold probabilities "
        f"joined (geometric mean) to the votes of each image's {NEIGHBOURS} nearest training "
        "images by backbone features, per-class thresholds, prune by noise rate, ranked by "
        f"self-confidence; strong: self-confidence under {STRONG} x its class's threshold",
        "label_issues": suspects,
        "off_topic": _off_topic(
            prepared, release, views["train"], classes, keep, files_of["train"]
        ),
        "possible_leaks": possible_leaks(prepared, views),
        "label_conflicts": read_json(report / REPORT_FILE)["near_duplicates"]["label_conflicts"]
        if (report / REPORT_FILE).is_file()
        else [],
    }


def _off_topic(
    prepared: Path,
    release: Path,
    train: np.ndarray,
    classes: list[str],
    keep: set[str],
    files: list[str],
) -> list[dict]:
    from headstart import ood

    if not (release / ood.OOD_FILE).is_file():
        return []
    detector, _ = ood.load(release)
    labels = np.load(prepared / "train_labels.npy")
    scores = detector.score(train)  # first views: the images as they are
    rows = [int(r) for r in np.argsort(-scores, kind="stable") if scores[r] > detector.threshold]
    return [
        {
            "file": files[r],
            "label": classes[int(labels[r])],
            "ood_score": round(float(scores[r]), 3),
            "threshold": round(detector.threshold, 3),
        }
        for r in rows
        if files[r] not in keep
    ]


LEAK_SIMILARITY = 0.95  # cosine of backbone features above which a pair is reported
LEAK_ROWS = 512  # rows compared at a time
LEAK_SPLITS = (("val", "train"), ("test", "train"), ("test", "val"))  # (image, its match)


def possible_leaks(prepared: Path, views: dict[str, np.ndarray]) -> list[dict]:
    """Images whose frozen-backbone features are almost those of an image in another split
    (cosine similarity >= LEAK_SIMILARITY; a validation image against training images, a test
    image against training and validation images): copies prepare's near-duplicate tests did
    not link (a larger crop, another rendering), reported for a person to check; `headstart
    review --group-leaks` keeps each pair in one split from the next run on (`views`: each
    split's features, from `first_views`). Highest first."""
    units = {
        split: rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        for split, rows in views.items()
    }
    files_of = _files(prepared)
    found = []
    for split, other in LEAK_SPLITS:
        if split not in units or other not in units:
            continue
        held, base = units[split], units[other]
        files, matches = files_of[split], files_of[other]
        for start in range(0, len(held), LEAK_ROWS):
            similarity = held[start : start + LEAK_ROWS] @ base.T
            best = similarity.argmax(axis=1)
            for row in np.flatnonzero(similarity[np.arange(len(best)), best] >= LEAK_SIMILARITY):
                found.append(
                    {
                        "file": files[start + row],
                        "split": split,
                        "match": matches[best[row]],
                        "match_split": other,
                        "similarity": round(float(similarity[row, best[row]]), 4),
                    }
                )
    return sorted(found, key=lambda leak: -leak["similarity"])
