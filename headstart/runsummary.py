"""The run summary (markdown) that `headstart run` prints and the flow publishes as a Prefect
artifact: data counts, every candidate on validation and test, the release and why, timings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from headstart.artifacts import EXPORT_RECORD_FILE, REPORT_FILE, SELECTION_FILE
from headstart.calibration import CALIBRATION_FILE
from headstart.files import read_json
from headstart.modelcard import CARD_FILE, NOTES_FILE, training_choices


def run_summary(
    root: Path, params, steps: Sequence[str], ran: list[str], skipped: list[str], seconds: dict
) -> str:
    """Markdown: data counts and quarantine, every candidate on validation and test, each of
    `steps` (in order) ran / up to date with its seconds, plots."""
    lines = ["# headstart run", ""]
    report_path = params.path("data_report", root) / REPORT_FILE
    if report_path.exists():
        totals = read_json(report_path)["totals"]
        lines += [
            f"**Data**: {totals['seen']} files, {totals['used']} used "
            f"({totals['train']} train / {totals['val']} val / {totals['test']} test), "
            f"{totals['quarantined']} quarantined, {totals['ignored']} ignored"
            + (
                f", {totals['excluded']} excluded by the review file"
                if totals.get("excluded")
                else ""
            )
            + f" (details: `{report_path.relative_to(root)}`)",
            "",
        ]
    choices = training_choices(root, params)
    if choices:
        lines += ["**Chosen for this data**: " + "; ".join(f"{k}: {v}" for k, v in choices), ""]
    lines += doctor_lines(root, params)
    lines += candidates_table(root, params)
    lines += exports_table(root, params)
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    for name in steps:
        status = "ran" if name in ran else "up to date" if name in skipped else "-"
        lines.append(f"| {name} | {status} | {seconds.get(name, '')} |")
    lines += [
        "",
        f"**Plots**: `{params.paths.plots}/` (curves.png, *_confusion.png, release_samples.png, "
        "release_reliability.png, learning_curve.png)",
    ]
    return "\n".join(lines) + "\n"


def doctor_lines(root: Path, params) -> list[str]:
    """What the data doctor found (headstart/doctor.py) and what the review file changed."""
    from headstart.doctor import DOCTOR_FILE

    found_path = params.path("plots", root) / DOCTOR_FILE
    report_path = params.path("data_report", root) / REPORT_FILE
    if not found_path.is_file() or not report_path.is_file():
        return []
    found, report = read_json(found_path), read_json(report_path)
    near, decided = report.get("near_duplicates", {}), report.get("review", {})
    return [
        f"**Data doctor**: {len(found['label_issues'])} likely label errors "
        f"({sum(s['strong'] for s in found['label_issues'])} with strong evidence), "
        f"{len(found['off_topic'])} off-topic images, {near.get('count', 0)} near-duplicate "
        f"group{'s' * (near.get('count', 0) != 1)} "
        f"({len(near.get('label_conflicts', []))} across classes), "
        f"{len(found.get('possible_leaks', []))} pairs of images in different splits almost "
        "identical in the backbone's features; the review file "
        f"excluded {len(decided.get('excluded', []))}, relabelled "
        f"{len(decided.get('relabelled', []))} and kept {len(decided.get('together', []))} "
        "lists together (`headstart review`; "
        f"`{params.paths.plots}/suspects.png`)",
        "",
    ]


def candidates_table(root: Path, params) -> list[str]:
    """Every candidate with validation and test figures, the released one marked, and why."""
    selection_path = params.path("release", root) / SELECTION_FILE
    metrics_dir = params.path("metrics", root)
    if not selection_path.exists() or not (metrics_dir / "release.json").exists():
        return []
    selection = read_json(selection_path)
    lines = [
        "| model | val accuracy | val macro-F1 | test accuracy | test macro-F1 | |",
        "|---|---|---|---|---|---|",
    ]
    for name, val in selection["candidates"].items():
        test = read_json(metrics_dir / f"{name}.json")
        mark = "**released**" if name == selection["winner"] else ""
        label = (
            "transfer (fine-tuned)"
            if name == "transfer" and selection["transfer_is_finetuned"]
            else name
        )
        if name == "ensemble":
            label += " (geometric mean of both)"
        lines.append(
            f"| {label} | {val['val_accuracy']:.4f} | {val['val_macro_f1']:.4f} | "
            f"{test['accuracy']:.4f} | {test['macro_f1']:.4f} | {mark} |"
        )
    lines += [
        "",
        f"**Released**: {selection['winner']}, chosen on {selection['reason']} "
        f"(the test split was not looked at). Model: `{params.paths.release}/model.keras`.",
        "",
    ]
    lines += trust_lines(
        read_json(metrics_dir / "release.json"), params.path("release", root) / "ood.json"
    )
    curve = metrics_dir / "learning_curve.json"
    if curve.exists():
        points = read_json(curve)["points"]
        lines += [
            "**Learning curve** (CV accuracy of a linear head on the features): "
            + ", ".join(
                f"{k} of the training images ({v['images']}): {v['cv_accuracy']:.3f}"
                for k, v in points.items()
            ),
            "",
        ]
    return lines


def trust_lines(release: dict, ood_path: Path) -> list[str]:
    """Calibration (ECE on test before/after the temperature) and the "unknown" threshold."""
    if "ece" not in release or not ood_path.exists():  # from before these existed
        return []
    ood = read_json(ood_path)
    fitted = ood_path.parent / CALIBRATION_FILE  # beside it in the release folder
    note = read_json(fitted).get("note", "fitted") if fitted.is_file() else "fitted"
    note = (
        "fitted on validation"
        if note == "fitted"
        else note.replace("fitted", "fitted on validation")
    )
    return [
        f"**Confidence**: temperature {release['temperature']:.3f} ({note}); "
        f"test ECE {release['ece']:.4f} before, {release['ece_calibrated']:.4f} after; "
        "`headstart predict` reports the calibrated probabilities.",
        "",
        f"**Unknown answers** (`headstart predict --reject`): {ood['method']} distance of "
        f"the backbone's features to the nearest class centroid; the threshold keeps "
        f"{100 * ood['val_kept']:.1f} % of the validation images (chosen there) and "
        f"{100 * release['ood_kept']:.1f} % of the test images.",
        "",
    ]


def exports_table(root: Path, params) -> list[str]:
    """The exports with their agreement with the Keras release on test, size and latency (or
    why a format is not available), from export.json."""
    record_path = params.path("export", root) / EXPORT_RECORD_FILE
    if not record_path.exists():
        return []
    record = read_json(record_path)
    reference = record["reference"]
    lines = [
        f"**Exports** (`{params.paths.export}/`; agreement with the Keras release on "
        f"{record['test_images']} test images, single-image latency on this CPU):",
        "",
        "| format | agreement | max \\|Δp\\| | size | latency |",
        "|---|---|---|---|---|",
        f"| keras (release) | | | {_megabytes(reference['bytes'])} | "
        f"{reference['latency_ms']:.1f} ms |",
    ]
    for name, result in record["formats"].items():
        if not result["available"]:
            reason = result["reason"].replace("|", "\\|")
            lines.append(f"| {name} | not available: {reason} | | | |")
            continue
        diff = "-" if result["max_abs_diff"] is None else f"{result['max_abs_diff']:.1e}"
        lines.append(
            f"| {name} | {100 * result['agreement']:.2f} % | {diff} | "
            f"{_megabytes(result['bytes'])} | {result['latency_ms']:.1f} ms |"
        )
    reject = record.get("reject")
    if reject and reject["available"]:
        lines.append(
            f"| {reject['path']} (for `predict --reject`) | "
            f"{100 * reject['decision_agreement']:.2f} % of unknown/known answers | | "
            f"{_megabytes(sum(f['bytes'] for f in reject['files'].values()))} | |"
        )
    card = f"**Model card**: `{params.paths.export}/{CARD_FILE}`"
    notes = root / NOTES_FILE
    if notes.is_file() and "TODO" in notes.read_text():
        card += (
            f" (`{NOTES_FILE}` still holds TODO lines: write your model's intended use and "
            "limitations there, every model card carries them)"
        )
    return [*lines, "", card, ""]


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"
