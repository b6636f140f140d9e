"""plots: per-epoch metrics (DVCLive's), test metrics and test images -> artifacts/plots/*.png."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from headstart.artifacts import LIVE_DIR, MANIFEST_FILE, PRODUCERS, load_split, read_history
from headstart.files import atomic_dir, read_json, require, write_json
from headstart.params import Params
from headstart.review import REVIEW_FILE

log = logging.getLogger("headstart.plots")


def plot_results(
    prepared_dir: Path | str,
    histories: dict[str, tuple[Path, str]],
    metrics_dir: Path | str,
    out_dir: Path | str,
    params: Params,
    doctor_sources: dict[str, Path] | None = None,
) -> Path:
    """`histories`: model name -> (its DVCLive folder, the name its epochs were logged under).
    `doctor_sources`: the folders the data doctor reads (transfer, release, features, report,
    review file); its findings go to doctor.json and contact sheets beside the figures."""
    import matplotlib

    matplotlib.use("Agg")
    from headstart import plotting

    prepared_dir, metrics_dir = Path(prepared_dir), Path(metrics_dir)
    for name, (live_dir, _) in histories.items():
        require(live_dir, PRODUCERS[name])
    require(metrics_dir / "release_confusion.json", "evaluate")
    images, _ = load_split(require(prepared_dir, "prepare"), "test")
    with atomic_dir(out_dir) as tmp:
        figures = {
            "curves.png": plotting.training_curves(
                {name: read_history(*logged) for name, logged in histories.items()}
            )
        }
        for name in (*histories, "release"):
            confusion = read_json(metrics_dir / f"{name}_confusion.json")
            figures[f"{name}_confusion.png"] = plotting.confusion_matrix(
                confusion["matrix"], confusion["classes"], f"{name}: confusion (test, normalised)"
            )
        with open(metrics_dir / "release_predictions.csv") as handle:
            rows = list(csv.DictReader(handle))
        picks = _pick_samples(rows, params.plots.samples)
        figures["release_samples.png"] = plotting.sample_predictions(
            np.asarray(images[picks]),
            [rows[i]["label"] for i in picks],
            [rows[i]["predicted"] for i in picks],
            "release: test predictions (errors in red)",
        )
        tables = read_json(require(metrics_dir / "release_calibration.json", "evaluate"))
        figures["release_reliability.png"] = plotting.reliability_diagram(
            tables["before"], tables["after"], tables["temperature"]
        )
        curve_file = metrics_dir / "learning_curve.json"
        if curve_file.is_file():
            curve = read_json(curve_file)
            figures["learning_curve.png"] = plotting.learning_curve(curve["points"], curve["head"])
        if doctor_sources is not None:
            figures.update(_data_doctor(prepared_dir, doctor_sources, tmp))
        for file_name, figure in figures.items():
            figure.savefig(tmp / file_name, dpi=100)
    log.info("plots: %d figures in %s", len(figures), out_dir)
    return Path(out_dir)


SHEET = 24  # images per contact sheet


def _data_doctor(prepared: Path, sources: dict[str, Path], tmp: Path) -> dict:
    """doctor.json and the contact sheets of its findings (headstart/doctor.py)."""
    from headstart import doctor, plotting, review

    keep = set(review.load(sources["review"]).keep)
    found = doctor.examine(
        prepared,
        sources["transfer"],
        sources["release"],
        sources["features"],
        sources["report"],
        keep,
    )
    write_json(tmp / doctor.DOCTOR_FILE, found)
    log.info(
        "plots: data doctor: %d likely label errors, %d off-topic images, %d near-duplicate "
        "group(s) across classes",
        len(found["label_issues"]),
        len(found["off_topic"]),
        len(found["label_conflicts"]),
    )
    where = _rows_by_file(prepared)
    sheets = {
        "suspects.png": (
            "data doctor: likely label errors (given → suggested, self-confidence)",
            [
                (s["file"], f"{s['given']} → {s['suggested']}\n{s['self_confidence']:.3f}")
                for s in found["label_issues"][:SHEET]
            ],
        ),
        "off_topic.png": (
            "data doctor: unlike every class (class, OOD score)",
            [
                (s["file"], f"{s['label']}\n{s['ood_score']:.1f}")
                for s in found["off_topic"][:SHEET]
            ],
        ),
        "near_duplicates.png": (
            "near-duplicate groups across classes (group: class)",
            [
                (f, f"group {n + 1}: {f.split('/')[0]}")
                for n, group in enumerate(found["label_conflicts"][: SHEET // 2])
                for f in group["files"]
            ],
        ),
    }
    figures = {}
    for name, (title, shown) in sheets.items():
        shown = [(file, caption) for file, caption in shown if file in where]
        if shown:
            pictures = [
                np.asarray(load_split(prepared, where[f][0])[0][where[f][1]]) for f, _ in shown
            ]
            figures[name] = plotting.contact_sheet(pictures, [c for _, c in shown], title)
    return figures


def _rows_by_file(prepared: Path) -> dict[str, tuple[str, int]]:
    """file -> (split, row in that split's arrays), from the manifest."""
    with open(prepared / MANIFEST_FILE, newline="") as handle:
        return {row["file"]: (row["split"], int(row["index"])) for row in csv.DictReader(handle)}


def _pick_samples(rows: list[dict], count: int) -> list[int]:
    """Up to half errors first (they are what people look for), the rest correct, in order."""
    wrong = [i for i, r in enumerate(rows) if r["label"] != r["predicted"]]
    right = [i for i, r in enumerate(rows) if r["label"] == r["predicted"]]
    chosen = _spread(wrong, count // 2)
    return sorted(chosen + _spread(right, count - len(chosen)))


def _spread(items: list[int], count: int) -> list[int]:
    """Up to `count` items evenly spaced through `items` (so every class tends to show up)."""
    if len(items) <= count:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count)]


def run(params: Params, root: Path) -> Path:
    histories = {
        "baseline": (params.path("baseline", root) / LIVE_DIR, "baseline"),
        "transfer": (params.path("transfer", root) / LIVE_DIR, "head"),
    }
    sources = {name: params.path(name, root) for name in ("transfer", "release", "features")}
    sources.update(report=params.path("data_report", root), review=Path(root) / REVIEW_FILE)
    return plot_results(
        params.path("prepared", root),
        histories,
        params.path("metrics", root),
        params.path("plots", root),
        params,
        sources,
    )
