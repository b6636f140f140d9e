"""The baseline CNN's architectures side by side: weights, file size, step time, held-out accuracy.

Fashion-MNIST TRAIN images outside the demo subset (as bench/heldout.py draws them; the official
test split is never read): `headstart step prepare`'s own code splits them once per image size,
then for each architecture (`baseline.arch`) and seed the baseline step's own function
(tasks/baseline.fit_baseline) trains it with the project's parameters, and the model scores the
held-out images, decoded as `headstart predict` decodes them.

    python bench/baseline.py                          # 96 and 224 px, seed and pooled, seeds 1 2 3
    python bench/baseline.py --sizes 64 --seeds 1     # a quick check
    python bench/baseline.py --sizes 96 --archs pooled --augments none shift flip_shift
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, add_overrides, machine, table
from heldout import SOURCE, fashion_images, write_pngs

ARCHS = ("seed", "pooled")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument(
        "--augments", nargs="+", default=["none"], help="baseline.augment policies to compare"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out images in total")
    parser.add_argument("--source", type=Path, default=SOURCE, help="Fashion-MNIST IDX folder")
    add_overrides(parser)
    return parser.parse_args(argv)


def heldout_accuracy(model, classes: list[str], folder: Path, size: int) -> float:
    """Accuracy on the images under `folder`/<class>/; `classes`: the model's labels.json."""
    from headstart import images
    from headstart.training import predict

    files = sorted(folder.rglob("*.png"))
    pictures = np.stack([images.load(path, size, "pad") for path in files])
    truth = np.array([classes.index(path.parent.name) for path in files])
    return float(np.mean(predict(model, pictures).argmax(axis=1) == truth))


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import tasks
    from headstart import params as params_module
    from headstart.files import read_json, write_json
    from tasks.baseline import fit_baseline

    work = Path(tempfile.mkdtemp(prefix="baseline-"))
    pixels, train, heldout = fashion_images(args.source, args.per_class, args.heldout)
    write_pngs(pixels, train, work / "data")
    write_pngs(pixels, heldout, work / "heldout")
    defaults = params_module.load(ROOT / "params.yaml", args.overrides)
    rows, runs = [], {}
    for size in args.sizes:
        params = dataclasses.replace(
            defaults, base=dataclasses.replace(defaults.base, image_size=size)
        )
        tasks.get("prepare").run(params, work)
        for arch, policy in [(a, p) for a in args.archs for p in args.augments]:
            found = []
            for seed in args.seeds:
                run = dataclasses.replace(
                    params,
                    base=dataclasses.replace(params.base, seed=seed),
                    baseline=dataclasses.replace(params.baseline, arch=arch, augment=policy),
                )
                out = work / f"baseline-{size}-{arch}-{policy}-{seed}"
                started = time.perf_counter()
                fit_baseline(params.path("prepared", work), out, run)
                seconds = time.perf_counter() - started
                model = keras.saving.load_model(out / "model.keras")
                found.append(
                    {
                        "seconds": round(seconds, 1),
                        "weights": model.count_params(),
                        "mib": round((out / "model.keras").stat().st_size / 2**20, 2),
                        "heldout": heldout_accuracy(
                            model, read_json(out / "labels.json")["classes"], work / "heldout", size
                        ),
                    }
                )
                print(f"[{size} px {arch} {policy} seed {seed}] {found[-1]}", file=sys.stderr)
                shutil.rmtree(out)
            accuracies = [f["heldout"] for f in found]
            runs[f"{size}-{arch}-{policy}"] = found
            rows.append(
                (
                    size,
                    arch,
                    policy,
                    found[0]["weights"],
                    found[0]["mib"],
                    round(statistics.median(f["seconds"] for f in found), 1),
                    f"{statistics.mean(accuracies):.3f} ± "
                    f"{statistics.stdev(accuracies) if len(accuracies) > 1 else 0:.3f}",
                )
            )
    header = (
        "px",
        "baseline.arch",
        "baseline.augment",
        "weights",
        "model.keras MiB",
        "step s (median)",
        f"held-out accuracy ({len(args.seeds)} seeds)",
    )
    print(table(rows, header))
    out = write_json(
        ROOT / "bench" / "out" / "baseline.json",
        {"machine": machine(), "argv": sys.argv[1:], "runs": runs},
    )
    print(f"wrote {out}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return runs


if __name__ == "__main__":
    main()
