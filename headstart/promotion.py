"""Champion/challenger: the promoted model (a copy of a release) is replaced only by a release at
least as good on the test split. Both are scored on the *current* test split, so a data refresh compares like with like."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from headstart.artifacts import MODEL_FILE
from headstart.files import atomic_dir, read_json, write_json
from headstart.params import Params

log = logging.getLogger("headstart.promotion")


def promote(challenger_dir: Path | str, prepared_dir: Path | str, champion_dir: Path | str,
            top_k: int = 3) -> dict:  # fmt: skip
    """Install the challenger as champion unless the champion scores higher on the test split.

    Returns the decision: {"promoted": bool, "reason": str, "challenger": acc, "champion": acc}.
    """
    from headstart.metrics import evaluate_model

    challenger_dir, champion_dir = Path(challenger_dir), Path(champion_dir)
    prepared_dir = Path(prepared_dir)
    challenger = evaluate_model(challenger_dir / MODEL_FILE, prepared_dir, top_k)[0]
    decision = {"challenger": challenger["accuracy"], "champion": None}
    if not (champion_dir / MODEL_FILE).exists():
        decision.update(promoted=True, reason="no current model")
    elif (
        read_json(champion_dir / "labels.json")["classes"]
        != read_json(prepared_dir / "labels.json")["classes"]
    ):
        decision.update(promoted=True, reason="the classes changed")
    else:
        champion = evaluate_model(champion_dir / MODEL_FILE, prepared_dir, top_k)[0]
        decision["champion"] = champion["accuracy"]
        better = challenger["accuracy"] >= champion["accuracy"]
        decision.update(promoted=better, reason=(
            f"test accuracy {challenger['accuracy']:.4f} "
            f"{'>=' if better else '<'} current {champion['accuracy']:.4f}"
        ))  # fmt: skip
    if decision["promoted"]:
        with atomic_dir(champion_dir) as tmp:
            for name in (MODEL_FILE, "labels.json"):
                shutil.copy(challenger_dir / name, tmp / name)
            write_json(tmp / "metrics.json", challenger)
            write_json(tmp / "promotion.json", decision)
        log.info("promotion: new model installed in %s (%s)", champion_dir, decision["reason"])
    else:
        log.warning(
            "promotion: kept the current model in %s (%s)", champion_dir, decision["reason"]
        )
    return decision


def promote_from_params(params: Params, root: Path | str) -> dict:
    return promote(params.path("release", root), params.path("prepared", root),
                   params.path("champion", root), params.evaluate.top_k)  # fmt: skip
