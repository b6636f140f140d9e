"""Held-out accuracy: train the pipeline on Fashion-MNIST images it never saw, score on others.

Builds a git+DVC clone of this project whose data/ holds Fashion-MNIST TRAIN images that are not
in the demo subset (the first 150 of each class): enough per class that prepare's training split
gets --per-class of them on average (the rest go to its val and test splits), plus a separate
held-out folder of --heldout other such images (class balanced, disjoint from both). The
official test split is never read. For each seed, `headstart run -S base.seed=SEED [-S ...]`
runs in the clone (reused across seeds: DVC reruns only what changed), then every model that
exists (baseline, transfer, release) and the mean of baseline's and transfer's probabilities
(mean2) are scored on the held-out images with headstart.predicting.predict_paths.

The clone runs its own committed code (PYTHONPATH points at it), so uncommitted changes in
this working tree are not measured: commit them first.

    apt-get install dataset-fashion-mnist   # the original IDX files
    python bench/heldout.py                                   # 100 train/class, 3000 held out, seeds 1 2 3
    python bench/heldout.py --per-class 20 --heldout 200 --seeds 1 \\
        --set baseline.epochs=2 --set head.epochs=2           # a quick check (minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    add_overrides,
    clone_commit,
    clone_with_data,
    headstart_run,
    save_result,
    table,
)
from PIL import Image

sys.path.insert(0, str(ROOT / "scripts"))
from make_demo_data import CLASSES, SOURCE, read_idx

DEMO_PER_CLASS = 150  # the demo data: make_demo_data.py --per-class 150 (README, data.dvc)
MODELS = ("baseline", "transfer", "release")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--per-class",
        type=int,
        default=100,
        help="images per class in the training split (data/ holds more: val, test)",
    )
    parser.add_argument("--heldout", type=int, default=3000, help="held-out images in total")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="base.seed values")
    add_overrides(parser)
    parser.add_argument("--data-seed", type=int, default=0, help="which images are drawn")
    parser.add_argument("--source", type=Path, default=SOURCE, help="Fashion-MNIST IDX folder")
    parser.add_argument("--work", type=Path, help="new or empty folder to keep (default: temp)")
    parser.add_argument("--tag", help="output name: bench/out/heldout-TAG.json (default: commit)")
    return parser.parse_args(argv)


def draw_images(
    labels: np.ndarray, pixels: np.ndarray, per_class: int, heldout_per_class: int, seed: int
) -> tuple[dict, dict]:
    """Row numbers per class for training and held-out: outside the demo subset, never an exact
    pixel copy of a demo image or of each other (Fashion-MNIST has a few duplicates)."""
    demo = {
        int(r) for c in range(len(CLASSES)) for r in np.flatnonzero(labels == c)[:DEMO_PER_CLASS]
    }
    seen = {hashlib.sha256(pixels[r].tobytes()).digest() for r in demo}
    rng = np.random.default_rng(seed)
    train, heldout = {}, {}
    for c, name in enumerate(CLASSES):
        rows = []
        for row in rng.permutation(np.flatnonzero(labels == c)):
            digest = hashlib.sha256(pixels[row].tobytes()).digest()
            if int(row) not in demo and digest not in seen:
                seen.add(digest)
                rows.append(int(row))
            if len(rows) == per_class + heldout_per_class:
                break
        if len(rows) < per_class + heldout_per_class:
            sys.exit(f"class {name}: only {len(rows)} usable images, need more")
        train[name], heldout[name] = rows[:per_class], rows[per_class:]
    return train, heldout


def fashion_images(
    source: Path, per_class: int, heldout: int, overrides: list[str] = (), seed: int = 0
) -> tuple[np.ndarray, dict, dict]:
    """(pixels, training rows, held-out rows) from the IDX files in `source`: as many images
    per class in data/ as give prepare's training split `per_class` (`overrides`: its split
    fractions), and `heldout` others, class balanced."""
    labels = read_idx(source / "train-labels-idx1-ubyte.gz")
    pixels = read_idx(source / "train-images-idx3-ubyte.gz")
    train, held = draw_images(
        labels, pixels, data_per_class(per_class, list(overrides)), heldout // len(CLASSES), seed
    )
    return pixels, train, held


def data_per_class(per_class: int, overrides: list[str]) -> int:
    """Images per class in data/ so that prepare's training split holds `per_class` on average."""
    import yaml

    fractions = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("prepare.val_fraction", "prepare.test_fraction"):
            fractions[key.split(".")[1]] = float(value)
    train_fraction = 1.0 - fractions["val_fraction"] - fractions["test_fraction"]
    return math.ceil(per_class / train_fraction)


def write_pngs(pixels: np.ndarray, rows: dict, folder: Path) -> None:
    for name, class_rows in rows.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for row in class_rows:
            Image.fromarray(pixels[row], mode="L").save(
                folder / name / f"fmnist-train-{row:05d}.png"
            )


def make_project(target: Path, pixels: np.ndarray, train: dict) -> Path:
    """A clone of this repository's committed state with `train` as its DVC-tracked data."""
    return clone_with_data(target, lambda folder: write_pngs(pixels, train, folder), who="heldout")


def run_pipeline(project: Path, seed: int, overrides: list[str]) -> dict:
    """`headstart run` in the clone, with the clone's own code: wall seconds, peak MiB, training
    images, the released candidate, the chosen transfer head and what fine-tuning did."""
    child = headstart_run(project, seed, overrides)
    report = json.loads((project / "artifacts" / "data-report" / "report.json").read_text())
    train_images = sum(counts["train"] for counts in report["per_class"].values())
    artifacts = project / "artifacts"
    released = json.loads((artifacts / "release" / "selection.json").read_text())["winner"]
    transfer = json.loads((artifacts / "transfer" / "transfer.json").read_text())
    return {
        "seconds": child["seconds"],
        "peak_mib": child["peak_mib"],
        "train_images": train_images,
        "released": released,
        "head": transfer["config"],
        "finetune": transfer.get("finetune", {}).get("outcome"),
    }


def probabilities(model: Path, heldout: Path) -> tuple[np.ndarray, list[str]]:
    """(images x CLASSES) probabilities from the project's predict API, and the true labels."""
    from headstart.predicting import predict_paths

    results = predict_paths(model, [heldout], top_k=len(CLASSES))
    failed = [r["file"] for r in results if "error" in r]
    if failed:
        sys.exit(f"{model}: could not read {len(failed)} held-out images, e.g. {failed[0]}")
    probs = np.array([[dict(r["top"])[name] for name in CLASSES] for r in results])
    return probs, [Path(r["file"]).parent.name for r in results]


def score(project: Path, heldout: Path) -> dict[str, float]:
    """Held-out accuracy of every model the run produced, and of mean2."""
    probs, truth = {}, None
    for name in MODELS:
        model = project / "artifacts" / name / "model.keras"
        if model.is_file():
            probs[name], labels = probabilities(model, heldout)
            if truth is not None and labels != truth:
                sys.exit(f"{name}: held-out images came back in a different order")
            truth = labels
    if {"baseline", "transfer"} <= set(probs):
        probs["mean2"] = (probs["baseline"] + probs["transfer"]) / 2
    selection_file = project / "artifacts" / "release" / "selection.json"
    if selection_file.is_file():  # the ensemble as select weighed it, and a no-tie-rule choice
        selection = json.loads(selection_file.read_text())
        w = selection["ensemble_transfer_weight"]
        from headstart.metrics import ensemble_probabilities

        probs["ensemble"] = ensemble_probabilities(probs["baseline"], probs["transfer"], w)
        candidates = selection["candidates"]
        best_val = max(candidates, key=lambda n: candidates[n]["val_accuracy"])
        probs["best-val"] = probs[best_val]
    y = np.array([CLASSES.index(label) for label in truth or []])
    return {name: round(float(np.mean(p.argmax(axis=1) == y)), 4) for name, p in probs.items()}


def summarize(runs: dict[int, dict]) -> dict[str, dict]:
    """Per model: accuracy per seed (None where absent), mean and sd over the seeds present."""
    summary = {}
    for name in [*MODELS, "mean2", "ensemble", "best-val"]:
        values = [run["accuracy"].get(name) for run in runs.values()]
        present = [v for v in values if v is not None]
        if present:
            sd = statistics.stdev(present) if len(present) > 1 else None
            summary[name] = {
                "per_seed": values,
                "mean": round(statistics.mean(present), 4),
                "sd": None if sd is None else round(sd, 4),
            }
    return summary


def report(runs: dict[int, dict], summary: dict) -> str:
    header = ("model", *(f"seed {s}" for s in runs), "mean ± sd")
    rows = []
    for name, s in summary.items():
        spread = "n/a" if s["sd"] is None else f"{s['sd']:.3f}"
        cells = ["–" if v is None else f"{v:.3f}" for v in s["per_seed"]]
        rows.append((name, *cells, f"{s['mean']:.3f} ± {spread}"))
    seconds = [r["seconds"] for r in runs.values()]
    rows.append(("run seconds", *(f"{v:.1f}" for v in seconds), f"{statistics.mean(seconds):.1f}"))
    return table(rows, header)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before scoring imports TensorFlow
    if args.heldout % len(CLASSES):
        sys.exit(f"--heldout must be a multiple of {len(CLASSES)} (class balanced)")
    work = args.work or Path(tempfile.mkdtemp(prefix="heldout-"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work}: not empty; give a new or empty --work folder")
    work.mkdir(parents=True, exist_ok=True)
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz")
    pixels = read_idx(args.source / "train-images-idx3-ubyte.gz")
    in_data = data_per_class(args.per_class, args.overrides)
    train, heldout = draw_images(
        labels, pixels, in_data, args.heldout // len(CLASSES), args.data_seed
    )
    project = make_project(work / "project", pixels, train)
    write_pngs(pixels, heldout, work / "heldout")
    sys.path.insert(0, str(project))  # score with the clone's code, like the pipeline runs
    commit = clone_commit(project)
    runs = {}
    for seed in args.seeds:
        print(f"[seed {seed}] headstart run in {project}", file=sys.stderr, flush=True)
        runs[seed] = run_pipeline(project, seed, args.overrides)
        runs[seed]["accuracy"] = score(project, work / "heldout")
        print(f"[seed {seed}] {runs[seed]}", file=sys.stderr, flush=True)
    summary = summarize(runs)
    print(report(runs, summary))
    result = {
        "tag": args.tag or commit,
        "commit": commit,
        "argv": sys.argv[1:],
        "settings": {
            "per_class": args.per_class,
            "data_per_class": in_data,
            "heldout": args.heldout,
            "seeds": args.seeds,
            "overrides": args.overrides,
            "data_seed": args.data_seed,
            "classes": CLASSES,
        },
        "runs": runs,
        "summary": summary,
    }
    save_result(f"heldout-{result['tag']}", result, work, keep=bool(args.work))
    return result


if __name__ == "__main__":
    main()
