"""Unknown answers and calibrated confidence of a trained project's release (issue 12, items 2-3).

Default (the check): `headstart predict --reject --json` on the bundled sample photos (every
photograph shipped inside scikit-image and scikit-learn, listed in PHOTOS, fixed before any
measurement) and on the project's test images (the files prepare put in the test split); prints
the rejected fraction of the photos and the kept fraction of the test images, with the release's
ECE before/after temperature scaling from artifacts/metrics/release.json.

--choose-method: how ood.method was chosen, never on the test split nor on the sample photos:
the detectors are fitted on the project's training features, thresholded on its validation
features (ood.keep), and compared on Fashion-MNIST TRAIN images outside the demo subset
(in-distribution: kept fraction), scikit-learn's 8x8 digits and uniform noise (out of
distribution: rejected fraction, AUROC), and leaving two classes out of the fit (near-OOD).

    headstart run                          # (or the steps) in the demo project first
    python bench/unknown.py [--project DIR]
    python bench/unknown.py --choose-method [--project DIR]   # needs dataset-fashion-mnist

Needs scikit-learn: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BIN, ROOT, table
from PIL import Image

# scikit-image's bundled photographs (synthetic images, drawings, silhouettes and data sets that
# need a download are left out) and scikit-learn's two sample images
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
SKLEARN_PHOTOS = ("china", "flower")
DEMO_PER_CLASS = 150  # the demo data: the first 150 train images of each class


def write_photos(folder: Path) -> list[Path]:
    """Every sample photo as a PNG in `folder` (the motorcycle: the left view of the pair)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    arrays["motorcycle_left"] = skimage.data.stereo_motorcycle()[0]
    sample = load_sample_images()
    for path, array in zip(sample.filenames, sample.images, strict=True):
        arrays[Path(path).stem] = array
    paths = []
    for name, array in arrays.items():
        paths.append(folder / f"{name}.png")
        Image.fromarray(np.asarray(array)).save(paths[-1])
    return paths


def check(project: Path) -> dict:
    """The issue's pair for the project's release: photos rejected, test images kept."""
    rows = list(csv.DictReader(open(project / "artifacts" / "prepared" / "manifest.csv")))
    test_files = [str(project / "data" / row["file"]) for row in rows if row["split"] == "test"]
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp) / "photos")
        result = subprocess.run(
            [
                str(BIN / "headstart"),
                "predict",
                "--reject",
                "--json",
                "--project",
                str(project),
                *map(str, photos),
                *test_files,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            sys.exit(f"headstart predict failed:\n{result.stderr[-3000:]}")
        answers = {row["file"]: row for row in json.loads(result.stdout)}
        photo_rows = [answers[str(path)] for path in photos]
    test_rows = [answers[file] for file in test_files]
    metrics = json.loads((project / "artifacts" / "metrics" / "release.json").read_text())
    return {
        "photos": len(photo_rows),
        "photos_rejected": float(np.mean([r["unknown"] for r in photo_rows])),
        "photos_kept": sorted(Path(r["file"]).stem for r in photo_rows if not r["unknown"]),
        "test_images": len(test_rows),
        "test_kept": float(np.mean([not r["unknown"] for r in test_rows])),
        "threshold": photo_rows[0]["ood_threshold"],
        "method": json.loads((project / "artifacts" / "release" / "ood.json").read_text())[
            "method"
        ],
        "calibrated": all(r["calibrated"] for r in photo_rows + test_rows),
        "scores": {Path(r["file"]).stem: round(r["ood_score"], 3) for r in photo_rows},
        **{
            key: metrics[key]
            for key in (
                "accuracy",
                "loss",
                "loss_calibrated",
                "ece",
                "ece_calibrated",
                "temperature",
                "ood_kept",
            )
        },
    }


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an outside score > an inside score), ties counted half (Mann-Whitney)."""
    scores = np.concatenate([inside, outside])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float(
        (ranks[len(inside) :].sum() - len(outside) * (len(outside) + 1) / 2)
        / (len(inside) * len(outside))
    )


def choose_method(project: Path, heldout: int = 2000) -> dict:
    import keras
    from sklearn.datasets import load_digits

    from headstart import images, ood
    from headstart.artifacts import image_size, load_features
    from headstart.params import OOD_METHODS, load
    from headstart.training import predict

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_demo_data import SOURCE, read_idx

    params = load(project / "params.yaml")
    size = image_size(project / "artifacts" / "prepared")
    backbone = keras.saving.load_model(project / "artifacts" / "release" / "backbone.keras")

    def features(arrays) -> np.ndarray:  # decoded as prepare and predict decode a PNG file
        decoded = []
        for array in arrays:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, "PNG")
            decoded.append(images.decode(buffer.getvalue(), size))
        return predict(backbone, np.stack(decoded))

    cache = params.path("features", project)
    f_train, y_train = (np.asarray(a) for a in load_features(cache, "train"))
    n_train = len(np.load(params.path("prepared", project) / "train_labels.npy"))
    f_train, y_train = f_train[:n_train], y_train[:n_train]
    f_val, y_val = (np.asarray(a) for a in load_features(cache, "val"))
    pixels = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    labels = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    demo = {int(r) for c in range(10) for r in np.flatnonzero(labels == c)[:DEMO_PER_CLASS]}
    rng = np.random.default_rng(0)
    rows = [int(r) for r in rng.permutation(len(labels)) if int(r) not in demo][:heldout]
    f_in, y_in = features(pixels[rows]), labels[rows]
    digits = load_digits().images[::3]
    f_digits = features([(d * 16).clip(0, 255).astype(np.uint8) for d in digits])
    f_noise = features([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(100)])
    results = {}
    for method in OOD_METHODS:
        detector, _ = ood.fit(f_train, y_train, 10, method)
        threshold = ood.choose_threshold(detector.score(f_val), params.ood.keep)
        inside = detector.score(f_in)
        record = {"heldout_kept": float(np.mean(inside <= threshold))}
        for name, f in (("digits", f_digits), ("noise", f_noise)):
            outside = detector.score(f)
            record[f"{name}_rejected"] = float(np.mean(outside > threshold))
            record[f"{name}_auroc"] = _auroc(inside, outside)
        near = []
        for pair in (
            (0, 1),
            (2, 3),
            (4, 5),
            (6, 7),
            (8, 9),
            (0, 6),
            (2, 4),
            (5, 7),
            (1, 8),
            (3, 9),
        ):
            kept = [c for c in range(10) if c not in pair]
            remap = np.full(10, -1)
            remap[kept] = np.arange(len(kept))
            fit_rows = np.isin(y_train, kept)
            part, _ = ood.fit(f_train[fit_rows], remap[y_train[fit_rows]], len(kept), method)
            t = ood.choose_threshold(part.score(f_val[np.isin(y_val, kept)]), params.ood.keep)
            known = np.isin(y_in, kept)
            s_in, s_out = part.score(f_in[known]), part.score(f_in[~known])
            near.append((_auroc(s_in, s_out), np.mean(s_in <= t), np.mean(s_out > t)))
        near = np.mean(near, axis=0)
        record.update(
            near_auroc=float(near[0]), near_kept=float(near[1]), near_rejected=float(near[2])
        )
        results[method] = record
    return {"heldout_images": len(rows), "digits": len(digits), "noise": 100, "methods": results}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--project", type=Path, default=ROOT, help="a trained project")
    parser.add_argument("--choose-method", action="store_true", help="compare the OOD methods")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("sklearn") is None:
        sys.exit('error: bench/unknown.py needs scikit-learn: pip install -e ".[bench]"')
    project = args.project.resolve()
    if args.choose_method:
        results = choose_method(project)
        rows = [
            (
                name,
                f"{r['heldout_kept']:.3f}",
                f"{r['digits_rejected']:.3f}",
                f"{r['digits_auroc']:.3f}",
                f"{r['noise_rejected']:.3f}",
                f"{r['near_auroc']:.3f}",
                f"{r['near_kept']:.3f}",
                f"{r['near_rejected']:.3f}",
            )
            for name, r in results["methods"].items()
        ]
        print(
            table(
                rows,
                (
                    "method",
                    "held-out FMNIST kept",
                    "digits rejected",
                    "digits AUROC",
                    "noise rejected",
                    "2-left-out AUROC",
                    "kept",
                    "left-out rejected",
                ),
            )
        )
    else:
        results = check(project)
        print(
            table(
                [
                    (
                        "sample photos rejected (`predict --reject`)",
                        f"{results['photos_rejected']:.3f} of {results['photos']}",
                    ),
                    (
                        "test images kept (`predict --reject`)",
                        f"{results['test_kept']:.3f} of {results['test_images']}",
                    ),
                    ("photos answered with a class", ", ".join(results["photos_kept"]) or "none"),
                    (
                        "ECE on test, before -> after (T)",
                        f"{results['ece']:.4f} -> {results['ece_calibrated']:.4f} (T = {results['temperature']:.3f})",
                    ),
                    (
                        "log-loss on test, before -> after",
                        f"{results['loss']:.4f} -> {results['loss_calibrated']:.4f}",
                    ),
                ],
                ("what", f"value ({results['method']}, threshold {results['threshold']:.4g})"),
            )
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
