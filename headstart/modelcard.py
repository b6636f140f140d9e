"""The model card: what a released model was trained on, with what, how well it does on test
(with 95 % bootstrap intervals), and what its exports are. `collect` reads the facts from the
pipeline's files; `render` turns them into markdown (pure), so a card can be rebuilt or copied
beside another model (the champion) from the same facts.

The intended use and limitations are the user's words: MODEL_CARD_NOTES.md at the project root
(tracked in git, kept across retrains), copied into every card.
"""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from headstart.artifacts import (
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    REPORT_FILE,
    SELECTION_FILE,
    TRANSFER_RECORD,
    WEIGHTS_RECORD,
)
from headstart.calibration import CALIBRATION_FILE
from headstart.errors import UserError
from headstart.files import read_json, require, sha256_file
from headstart.metrics import macro_f1
from headstart.params import Params, to_dict

CARD_FILE = "MODEL_CARD.md"
NOTES_FILE = "MODEL_CARD_NOTES.md"  # at the project root: the user's intended use / limitations
RESAMPLES = 1000  # bootstrap resamples of the test images
LEVEL = 0.95  # confidence level of the intervals
CONFUSIONS = 5  # most frequent confusions listed
# written by the pipeline while it runs (after every stage): not a change to the code
PIPELINE_FILES = ("dvc.lock",)


def bootstrap_intervals(
    labels: np.ndarray,
    predicted: np.ndarray,
    classes: int,
    seed: int,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> dict:
    """Accuracy and macro-F1 with percentile bootstrap intervals: the test images resampled with
    replacement `resamples` times by a numpy RNG seeded with `seed`."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(labels), size=(resamples, len(labels)))
    tail = 100 * (1 - level) / 2
    values = {
        "accuracy": (
            float(np.mean(labels == predicted)),
            np.mean(labels[rows] == predicted[rows], axis=1),
        ),
        "macro_f1": (
            float(macro_f1(labels, predicted, classes)[0]),
            macro_f1(labels[rows], predicted[rows], classes),
        ),
    }
    result: dict[str, Any] = {
        "images": int(len(labels)),
        "resamples": resamples,
        "seed": seed,
        "level": level,
    }
    for name, (value, resampled) in values.items():
        low, high = np.percentile(resampled, [tail, 100 - tail])
        result[name] = {"value": value, "low": float(low), "high": float(high)}
    return result


def top_confusions(classes: list[str], matrix: list[list[int]], count: int = CONFUSIONS) -> list:
    """The `count` largest off-diagonal cells: [true class, predicted class, images]."""
    cells = [
        (int(n), t, p)
        for t, row in enumerate(matrix)
        for p, n in enumerate(row)
        if t != p and n > 0
    ]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [[classes[t], classes[p], n] for n, t, p in cells[:count]]


def code_revision(root: Path | str) -> dict:
    """The git commit of the project and the tracked files changed since (None: unknown)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if revision else None
    if revision is None or status is None:
        return {"revision": None, "dirty": None, "changed": []}
    changed = [line[3:] for line in status.splitlines() if line[3:] not in PIPELINE_FILES]
    return {"revision": revision.strip(), "dirty": bool(changed), "changed": changed}


def data_version(dvc_file: Path) -> dict | None:
    """md5, files and bytes DVC recorded for the data folder (None: not tracked by DVC)."""
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return {
        "file": dvc_file.name,
        "md5": outs[0].get("md5"),
        "files": outs[0].get("nfiles"),
        "bytes": outs[0].get("size"),
    }


def _test_predictions(metrics_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {name: i for i, name in enumerate(classes)}
    with open(require(metrics_dir / "release_predictions.csv", "evaluate"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (
        np.array([index[row["label"]] for row in rows], dtype=np.int64),
        np.array([index[row["predicted"]] for row in rows], dtype=np.int64),
    )


def training_choices(root: Path, params) -> list[tuple[str, str]]:
    """(setting, what was chosen and why) for the choices made from the data: the image size
    (prepare's report), the head's augmentation and fine-tuning (the head step's record)."""
    choices = []
    report_path = params.path("data_report", root) / REPORT_FILE
    if report_path.is_file() and "image_size" in (report := read_json(report_path)):
        size = report["image_size"]
        choices.append(("image size", f"{size['size']} px ({size['reason']})"))
    transfer_path = params.path("transfer", root) / TRANSFER_RECORD
    if transfer_path.is_file():
        record = read_json(transfer_path)
        if "augment" in record:
            choices.append(("augmentation", f"{record['augment']} ({record['augment_reason']})"))
        tuned = record.get("finetune")
        if tuned:
            choices.append(("fine-tuning", finetune_choice(tuned)))
    return choices


def finetune_choice(tuned: dict) -> str:
    """What the head step decided about fine-tuning and why (transfer.json's `finetune`)."""
    if tuned["ran"]:
        return f"{tuned['outcome']} ({tuned['reason']})"
    return tuned["outcome"]


def collect(root: Path | str, params: Params, exports: dict) -> dict:
    """Every fact of the card, from the pipeline's files under `root` (paths from params) and the
    export record (export.json's content)."""
    root = Path(root)
    prepared, release = params.path("prepared", root), params.path("release", root)
    metrics, weights = params.path("metrics", root), params.path("weights", root)
    notes = root / NOTES_FILE
    if not notes.is_file():
        raise UserError(
            f"{notes}: missing; create it with your model's intended use and "
            "limitations (every model card carries its text)"
        )
    classes = read_json(require(release / LABELS_FILE, "select"))["classes"]
    selection = read_json(require(release / SELECTION_FILE, "select"))
    report = read_json(require(params.path("data_report", root) / REPORT_FILE, "prepare"))
    labels, predicted = _test_predictions(metrics, classes)
    confusion = read_json(require(metrics / "release_confusion.json", "evaluate"))
    release_json = metrics / "release.json"
    release_metrics = read_json(release_json) if release_json.is_file() else {}
    calibration = (
        read_json(release / CALIBRATION_FILE) if (release / CALIBRATION_FILE).is_file() else None
    )
    if calibration is not None:
        calibration = {
            key: value for key, value in calibration.items() if isinstance(value, (int, float, str))
        }
        calibration.update(
            {
                f"test_{key}": release_metrics[key]
                for key in ("ece", "ece_calibrated")
                if key in release_metrics
            }
        )
    return {
        "model": {
            "file": f"{params.paths.release}/{MODEL_FILE}",
            "sha256": exports["reference"]["sha256"],  # hashed by the export step
            "winner": selection["winner"],
            "reason": selection["reason"],
            "classes": classes,
        },
        "data": {
            "path": params.paths.data,
            "dvc": data_version(root / f"{params.paths.data}.dvc"),
            "manifest": f"{params.paths.prepared}/manifest.csv",
            "manifest_sha256": sha256_file(require(prepared / MANIFEST_FILE, "prepare")),
            "totals": report["totals"],
            "per_class": report["per_class"],
            "near_duplicate_groups": report.get("near_duplicates", {}).get("count", 0),
            "relabelled": len(report.get("review", {}).get("relabelled", [])),
        },
        "backbone": read_json(require(weights / WEIGHTS_RECORD, "weights")),
        "choices": training_choices(root, params),
        "parameters": to_dict(params, operational=False),
        "code": code_revision(root),
        "test": bootstrap_intervals(labels, predicted, len(classes), params.base.seed),
        "calibration": calibration,
        "confusions": top_confusions(confusion["classes"], confusion["matrix"]),
        "exports": exports,
        "notes": re.sub(r"<!--.*?-->", "", notes.read_text(), flags=re.DOTALL),
    }


def _interval(figure: dict) -> str:
    return f"{figure['value']:.4f} (95 % CI {figure['low']:.4f} to {figure['high']:.4f})"


def render(facts: dict) -> str:
    """The card's markdown from `collect`'s facts (no I/O)."""
    model, data, backbone, code = facts["model"], facts["data"], facts["backbone"], facts["code"]
    test, exports = facts["test"], facts["exports"]
    lines = [
        "# Model card",
        "",
        "## Model",
        "",
        f"- File: `{model['file']}` (sha256 `{model['sha256']}`)",
        f"- Released: **{model['winner']}**, chosen on {model['reason']}",
        f"- Classes ({len(model['classes'])}): {', '.join(model['classes'])}",
    ]
    used = "" if model["winner"] != "baseline" else " (not used by the released baseline CNN)"
    lines += [
        f"- Backbone: {backbone['backbone']}{used}, ImageNet weights "
        f"`{backbone['file']}` sha256 `{backbone['sha256']}` (from {backbone['source']})"
    ]
    if code["revision"] is None:
        lines.append("- Code revision: unknown (not a git repository, or git is not installed)")
    else:
        state = (
            "with uncommitted changes to " + ", ".join(f"`{f}`" for f in code["changed"])
            if code["dirty"]
            else "clean: no uncommitted changes to tracked files"
        )
        lines.append(f"- Code revision: `{code['revision']}` ({state})")
    lines += [
        f"- Chosen for this data: {name}: {value}" for name, value in facts.get("choices", [])
    ]
    lines += ["", facts["notes"].strip(), "", "## Data", ""]
    dvc = data["dvc"]
    lines.append(
        f"- Version: md5 `{dvc['md5']}` ({dvc['files']} files, {dvc['bytes']} bytes; "
        f"`{dvc['file']}`)"
        if dvc
        else f"- Version: unknown (`{data['path']}` is not tracked by DVC)"
    )
    lines.append(
        f"- Images used: `{data['manifest']}` sha256 `{data['manifest_sha256']}` (every "
        "used file with the sha256 of its content and its split)"
    )
    totals = data["totals"]
    lines += [
        f"- {totals['seen']} files: {totals['used']} used, {totals['quarantined']} "
        f"quarantined, {totals['ignored']} ignored, {totals.get('excluded', 0)} excluded "
        f"and {data.get('relabelled', 0)} relabelled by the data review file; "
        f"{data.get('near_duplicate_groups', 0)} near-duplicate groups, each kept in one "
        "split",
        "",
        "| class | train | val | test | quarantined | ignored |",
        "|---|---|---|---|---|---|",
    ]
    for name, counts in data["per_class"].items():
        lines.append(
            f"| {name} | {counts['train']} | {counts['val']} | {counts['test']} | "
            f"{counts['quarantined']} | {counts['ignored']} |"
        )
    lines += [
        "",
        "## Test metrics",
        "",
        f"{test['images']} held-out test images; 95 % intervals from {test['resamples']} "
        f"bootstrap resamples of them (numpy seed {test['seed']}).",
        "",
        f"- Accuracy: {_interval(test['accuracy'])}",
        f"- Macro-F1: {_interval(test['macro_f1'])}",
        "",
        "Most frequent confusions (true -> predicted: test images):",
        "",
    ]
    lines += [f"- {true} -> {said}: {count}" for true, said, count in facts["confusions"]] or [
        "- none"
    ]
    lines += ["", "## Calibration", ""]
    if facts["calibration"] is None:
        lines.append("Not calibrated: the probabilities are the model's own.")
    else:
        lines += [
            f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}"
            for key, value in facts["calibration"].items()
        ]
        lines.append(
            "- The exports output the uncalibrated probabilities p; calibrated: "
            "softmax(log(p) / temperature), temperature from `calibration.json`."
        )
    lines += [
        "",
        "## Exports",
        "",
        f"Input: float32 RGB 0-255, batch x {exports['image_size']} x "
        f"{exports['image_size']} x 3; output: class probabilities in `labels.json` order. "
        f"Checked on {exports['test_images']} test images against the Keras model "
        f"(gate: top-1 agreement >= {100 * exports['min_agreement']:g} %).",
        "",
        "| format | agreement | max \\|Δp\\| | file | sha256 |",
        "|---|---|---|---|---|",
    ]
    for name, result in exports["formats"].items():
        if not result["available"]:
            reason = result["reason"].replace("|", "\\|")
            lines.append(f"| {name} | not available: {reason} | | | |")
            continue
        for file, info in result["files"].items():
            lines.append(
                f"| {name} | {100 * result['agreement']:.2f} % | "
                f"{result['max_abs_diff']:.1e} | `{file}` | `{info['sha256']}` |"
            )
    lines += [
        "",
        "## Parameters",
        "",
        "```yaml",
        yaml.safe_dump(facts["parameters"], sort_keys=False).rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"
