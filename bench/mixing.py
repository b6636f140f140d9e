"""Mixing the two members, and test-time augmentation, scored on held-out Fashion-MNIST images.

Issue 27, items 4 and 5. One project as bench/heldout.py builds it (Fashion-MNIST TRAIN images
outside the demo; the official test split is never read); for each seed, `headstart run`, then
the baseline's and the transfer model's probabilities on the validation split and on the held-out
images (as they are, and mirrored), and these ways of mixing them, each scored on the held-out
images (accuracy, log-loss):

- mean: the equal mean of probabilities (what select releases today);
- geometric: the normalised geometric mean (the mean of log-probabilities);
- calibrated mean: each member temperature-scaled first (the baseline on the validation split,
  the transfer head on its cross-validated out-of-fold training probabilities), then the mean;
- tta: each member the mean over the image and its mirror image, then the mean.

    python bench/mixing.py                    # 100 train/class, 3000 held out, seeds 1 2 3
    python bench/mixing.py --seeds 1 --heldout 500
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import add_overrides, table
from heldout import SOURCE, fashion_images, make_project, run_pipeline, write_pngs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    add_overrides(parser)
    parser.add_argument("--source", type=Path, default=SOURCE)
    return parser.parse_args(argv)


def held_out_images(folder: Path, prepared: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out images decoded as prepare decodes them, and their labels in the project's
    class order (labels.json: sorted folder names, not Fashion-MNIST's)."""
    from headstart import images
    from headstart.files import read_json

    labels = read_json(prepared / "labels.json")
    files = sorted(folder.glob("*/*.png"))
    size = labels["image_size"]
    x = np.stack([images.load(f, size, "pad") for f in files]).astype("float32")
    y = np.array([labels["classes"].index(f.parent.name) for f in files])
    return x, y


def member_probabilities(project: Path, x_held: np.ndarray) -> dict:
    import keras

    from headstart.artifacts import load_split
    from headstart.training import predict

    artifacts = project / "artifacts"
    x_val, y_val = load_split(artifacts / "prepared", "val")
    out = {"y_val": y_val}
    for name, folder in (("baseline", "baseline"), ("transfer", "transfer")):
        model = keras.saving.load_model(artifacts / folder / "model.keras")
        out[f"{name}_val"] = predict(model, x_val)
        out[f"{name}_held"] = predict(model, x_held)
        out[f"{name}_flip"] = predict(model, x_held[:, :, ::-1])
    out["transfer_oof"] = np.load(artifacts / "transfer" / "train_out_of_fold.npy")
    out["y_train"] = np.load(artifacts / "prepared" / "train_labels.npy")
    return out


def geometric(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    log = 0.5 * (np.log(np.clip(a, 1e-7, 1)) + np.log(np.clip(b, 1e-7, 1)))
    p = np.exp(log - log.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def rules(m: dict) -> dict[str, np.ndarray]:
    from headstart import calibration

    b, t = m["baseline_held"], m["transfer_held"]
    t_base = calibration.fit_temperature(m["baseline_val"], m["y_val"])
    t_head = calibration.fit_temperature(m["transfer_oof"], m["y_train"][: len(m["transfer_oof"])])
    tb = calibration.apply_temperature(b, t_base)
    tt = calibration.apply_temperature(t, t_head)
    b_tta, t_tta = (b + m["baseline_flip"]) / 2, (t + m["transfer_flip"]) / 2
    return {
        "baseline": b,
        "transfer": t,
        "mean": (b + t) / 2,
        "geometric": geometric(b, t),
        "calibrated mean": (tb + tt) / 2,
        "tta mean": (b_tta + t_tta) / 2,
        "tta calibrated mean": (
            calibration.apply_temperature(b_tta, t_base)
            + calibration.apply_temperature(t_tta, t_head)
        )
        / 2,
    }, {"T_baseline": t_base, "T_transfer": t_head}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(tempfile.mkdtemp(prefix="mixing-"))
    pixels, train, heldout = fashion_images(
        args.source, args.per_class, args.heldout, args.overrides
    )
    project = make_project(work / "project", pixels, train)
    write_pngs(pixels, heldout, work / "heldout")
    sys.path.insert(0, str(project))
    from headstart.metrics import per_image_loss

    scores: dict[str, list[tuple[float, float]]] = {}
    for seed in args.seeds:
        run = run_pipeline(project, seed, args.overrides)
        x_held, y_held = held_out_images(work / "heldout", project / "artifacts/prepared")
        found, temperatures = rules(member_probabilities(project, x_held))
        print(f"[seed {seed}] {run['released']} {temperatures}", file=sys.stderr, flush=True)
        for name, p in found.items():
            accuracy = float(np.mean(p.argmax(axis=1) == y_held))
            loss = float(np.mean(per_image_loss(p, y_held)))
            scores.setdefault(name, []).append((accuracy, loss))
            print(f"[seed {seed}] {name}: {accuracy:.4f} {loss:.4f}", file=sys.stderr, flush=True)
    rows = []
    for name, values in scores.items():
        acc = [a for a, _ in values]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        loss = statistics.mean(value for _, value in values)
        mean = f"{statistics.mean(acc):.4f} ± {spread:.4f}"
        rows.append((name, *(f"{a:.4f}" for a in acc), mean, f"{loss:.4f}"))
    print(table(rows, ("rule", *(f"seed {s}" for s in args.seeds), "accuracy", "log-loss")))
    print(f"work folder kept: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
