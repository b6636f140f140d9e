"""Champion/challenger: the promoted model (a copy of a release, `models/champion/`) and the rule
that lets a new release (the challenger) replace it. Both are scored on the *current* test split,
image by image, so a data refresh compares like with like.

The default rule (`promotion.rule: mcnemar`) replaces the champion only when

1. the challenger is **significantly better**: an exact McNemar test on the images the two models
   disagree about (b: the challenger right and the champion wrong, c: the reverse), one-sided,
   p = P(X >= b) for X ~ Binomial(b + c, 1/2), must be below `promotion.alpha`; and
2. **no class's recall drops** by more than `promotion.recall_tolerance` (absolute).

Why "significantly better" and not merely "not significantly worse": a challenger that differs
from the champion by a few images is indistinguishable from it, and a test split of tens or
hundreds of images cannot tell them apart. "Not significantly worse" would replace the champion
with every such coin toss, so scheduled retrains would churn the model users see (the images the
two disagree about change their answers) and, retrain after retrain, could accumulate small
losses that no single test detects. Putting the burden of proof on the challenger makes the
champion's accuracy a ratchet: it moves only on evidence, and a challenger that is significantly
better can never be significantly worse. So a challenger that differs from the champion on one
image is not promoted whether it is worse or better on it (p = 0.5); with `promotion.rule:
at_least` (the rule before: test accuracy >= the champion's, i.e. b >= c) the one-image
improvement, and a tie, replace it. The recall check applies under both rules
(`recall_tolerance: 1` turns it off, which is the old rule exactly).

A champion trained for other classes, or no champion at all, is replaced without a test.
McNemar rather than a paired bootstrap: exact at any size (the test splits here are small, where
bootstrap intervals are too narrow), deterministic (no seed, no resampling noise at the decision
boundary), and it tests exactly what differs between two classifiers on the same images.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np

from headstart.artifacts import LABELS_FILE, MODEL_FILE, load_split
from headstart.files import atomic_dir, read_json, write_json
from headstart.params import PROMOTION_RULES, Params

log = logging.getLogger("headstart.promotion")

MODEL_CARD_FILE = "MODEL_CARD.md"  # copied beside the champion (headstart/modelcard.py writes it)
TEST_NAME = "exact McNemar, one-sided (is the challenger better?), on the test split"


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic, one rounding)."""
    return sum(math.comb(n, i) for i in range(max(k, 0), n + 1)) / 2**n


def mcnemar(challenger_hits: np.ndarray, champion_hits: np.ndarray) -> dict:
    """The exact McNemar test of two classifiers' per-image hits on the same images."""
    challenger_hits = np.asarray(challenger_hits, dtype=bool)
    champion_hits = np.asarray(champion_hits, dtype=bool)
    b = int(np.sum(challenger_hits & ~champion_hits))
    c = int(np.sum(champion_hits & ~challenger_hits))
    return {
        "name": TEST_NAME,
        "images": len(challenger_hits),
        "b": b,  # the challenger right, the champion wrong
        "c": c,  # the champion right, the challenger wrong
        "p_value": binomial_tail(b, b + c),  # H0: not better; small = significantly better
        "p_value_worse": binomial_tail(c, b + c),  # the other side: significantly worse
    }


def recall_check(
    labels: np.ndarray,
    champion: np.ndarray,
    challenger: np.ndarray,
    classes: list[str],
    tolerance: float,
) -> list[dict]:
    """Per class: both models' test recall, the drop (champion - challenger) and whether it is
    within `tolerance`. A class with no test images has no recall and passes."""
    checks = []
    for index, name in enumerate(classes):
        mask = labels == index
        images = int(mask.sum())
        if not images:
            checks.append(
                {
                    "class": name,
                    "images": 0,
                    "champion": None,
                    "challenger": None,
                    "drop": None,
                    "ok": True,
                }
            )
            continue
        kept = int(np.sum(champion[mask] == index))
        found = int(np.sum(challenger[mask] == index))
        checks.append(
            {
                "class": name,
                "images": images,
                "champion": kept / images,
                "challenger": found / images,
                "drop": (kept - found) / images,
                # compared in image counts, so a drop of exactly the tolerance passes
                "ok": kept - found <= tolerance * images + 1e-9,
            }
        )
    return checks


def decide(
    rule: str, test: dict, recall: list[dict], alpha: float, tolerance: float
) -> tuple[bool, str]:
    """(promoted, reason) from the test and the per-class recall check under `rule`."""
    b, c = test["b"], test["c"]
    if rule == "at_least":
        passed = b >= c
        accuracy = (
            f"test accuracy {'>=' if passed else '<'} the champion's (right on {b} "
            f"image(s) it missed, wrong on {c} it got right)"
        )
    else:
        passed = test["p_value"] < alpha
        accuracy = (
            f"{'significantly' if passed else 'not significantly'} better than the "
            f"champion (right on {b} image(s) it missed, wrong on {c} it got right; "
            f"McNemar one-sided p={test['p_value']:.4g} "
            f"{'<' if passed else '>='} alpha {alpha:g})"
        )
    dropped = [entry for entry in recall if not entry["ok"]]
    if dropped:
        worst = max(dropped, key=lambda entry: entry["drop"])
        recall_text = (
            f"recall of class '{worst['class']}' drops by {worst['drop']:.4f} "
            f"({worst['champion']:.4f} -> {worst['challenger']:.4f}), more than "
            f"promotion.recall_tolerance {tolerance:g}"
        )
    else:
        recall_text = f"no class's recall drops by more than {tolerance:g}"
    return passed and not dropped, f"{accuracy}; {recall_text}"


def promote(
    challenger_dir: Path | str,
    prepared_dir: Path | str,
    champion_dir: Path | str,
    top_k: int = 3,
    rule: str = "mcnemar",
    alpha: float = 0.05,
    recall_tolerance: float = 0.05,
    model_card: Path | str | None = None,
) -> dict:
    """Install the challenger as champion if the promotion rule lets it replace the current one.

    Returns the decision (also written as `promotion.json` beside an installed champion):
    promoted, reason, rule, alpha, recall_tolerance, both test accuracies, the McNemar `test`
    (b, c, p-values) and the per-class `recall` check (None when there was nothing to compare).
    `model_card`: a MODEL_CARD.md to copy beside the champion (skipped when the file is absent).
    """
    from headstart.metrics import evaluate_model

    if rule not in PROMOTION_RULES:
        raise ValueError(
            f"promotion rule must be one of {', '.join(PROMOTION_RULES)} (got {rule!r})"
        )
    challenger_dir, champion_dir = Path(challenger_dir), Path(champion_dir)
    prepared_dir = Path(prepared_dir)
    challenger, _, challenger_probabilities = evaluate_model(
        challenger_dir / MODEL_FILE, prepared_dir, top_k
    )
    decision = {
        "promoted": False,
        "reason": "",
        "rule": rule,
        "alpha": alpha,
        "recall_tolerance": recall_tolerance,
        "challenger": challenger["accuracy"],
        "champion": None,
        "test": None,
        "recall": None,
    }
    classes = read_json(prepared_dir / LABELS_FILE)["classes"]
    if not (champion_dir / MODEL_FILE).exists():
        decision.update(promoted=True, reason="no current model")
    elif read_json(champion_dir / LABELS_FILE)["classes"] != classes:
        decision.update(promoted=True, reason="the classes changed")
    else:
        champion, _, champion_probabilities = evaluate_model(
            champion_dir / MODEL_FILE, prepared_dir, top_k
        )
        labels = load_split(prepared_dir, "test")[1]
        champion_answers = np.argmax(champion_probabilities, axis=1)
        challenger_answers = np.argmax(challenger_probabilities, axis=1)
        test = mcnemar(challenger_answers == labels, champion_answers == labels)
        recall = recall_check(
            labels, champion_answers, challenger_answers, classes, recall_tolerance
        )
        promoted, reason = decide(rule, test, recall, alpha, recall_tolerance)
        decision.update(
            promoted=promoted,
            reason=reason,
            champion=champion["accuracy"],
            test=test,
            recall=recall,
        )
    if decision["promoted"]:
        with atomic_dir(champion_dir) as tmp:
            for path in sorted(Path(challenger_dir).iterdir()):  # the whole release: model,
                if path.is_file() and not path.name.startswith("."):  # labels, calibration,
                    shutil.copy(path, tmp / path.name)  # detector, backbone copy
            if model_card is not None and Path(model_card).is_file():
                shutil.copy(model_card, tmp / MODEL_CARD_FILE)
            write_json(tmp / "metrics.json", challenger)
            write_json(tmp / "promotion.json", decision)
        log.info("promotion: new model installed in %s (%s)", champion_dir, decision["reason"])
    else:
        log.warning(
            "promotion: kept the current model in %s (%s)", champion_dir, decision["reason"]
        )
    return decision


def promote_from_params(params: Params, root: Path | str) -> dict:
    """`promote` with the project's paths and `promotion` settings. The model card copied beside
    the champion is the export step's (`paths.export`, with the export checksums), else the one
    beside the release, when either exists."""
    release = params.path("release", root)
    exported = params.path("export", root) / MODEL_CARD_FILE
    card = exported if exported.is_file() else release / MODEL_CARD_FILE
    settings = params.promotion
    return promote(
        release,
        params.path("prepared", root),
        params.path("champion", root),
        params.evaluate.top_k,
        rule=settings.rule,
        alpha=settings.alpha,
        recall_tolerance=settings.recall_tolerance,
        model_card=card,
    )
