"""Held-out accuracy on SMALL data sets: the pipeline's models, a nearest-centroid classifier on
the transfer model's own frozen features, and release rules evaluated after the fact.

Data sets (drawn by --data-seed, written as PNGs into a clone's data/, never committed here; all
of data/ is split into train/val/test by prepare itself; held-out images are never in data/):
  fmnist-easy-20/40  Fashion-MNIST TRAIN images of trouser, bag, sneaker: 20/40 per class, 300
                     per class held out (outside the demo subset, no pixel duplicates: as
                     bench/heldout.py draws them; the official test split is never read)
  fmnist-hard-20/40  tshirt_top, pullover, shirt; the same sizes
  fmnist-100         all 10 classes, 143 per class (~100 in the training split), 300 held out
  faces              scikit-image's lfw_subset: face / background, 50 per class, 50 held out
  digits             scikit-learn's 8x8 digits scaled to 0..255, 32x32: 40 per class, rest held out

Per data set one clone of the project at --commit (git clone, data, `dvc add`, commit), reused
across seeds; per seed `headstart run -S base.seed=SEED -S export.formats=[] [-S ...]` with the
clone's code. Scored on the held-out images with the clone's headstart.predicting: baseline,
transfer, release and mean2 (the mean of baseline's and transfer's probabilities); `centroid`:
nearest class centroid (Euclidean, features standardised by the training mean and sd) of the
frozen backbone's features. Release rules pick baseline / transfer / ensemble from validation
probabilities: select (the clone's tasks/select.py choose: what the run released), old (the
rule before issue 23: lowest log-loss, a simpler candidate within one paired SE wins), lowest-loss, best-acc (ties: lower loss), ensemble-unless (a member only when its
loss is lower by more than one paired SE), oracle (best held-out; reference only). The JSON keeps
validation and held-out probabilities so other rules can be evaluated later.

    pip install -e ".[dev,bench]"   # scikit-image and scikit-learn: lfw_subset, load_digits
    python bench/smalldata.py --sets faces --seeds 1          # a smoke test (minutes)
    python bench/smalldata.py --quick --commit dd4e067 --tag before   # all but fmnist-100
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, add_overrides, clone_with_data, headstart_run, table
from heldout import data_per_class, draw_images
from PIL import Image

sys.path.insert(0, str(ROOT / "scripts"))
from make_demo_data import CLASSES, SOURCE, read_idx

EASY, HARD = ("trouser", "bag", "sneaker"), ("tshirt_top", "pullover", "shirt")
FMNIST = {
    "fmnist-easy-20": (EASY, 20),
    "fmnist-easy-40": (EASY, 40),
    "fmnist-hard-20": (HARD, 20),
    "fmnist-hard-40": (HARD, 40),
    "fmnist-100": (tuple(CLASSES), None),
}
SETS = (*FMNIST, "faces", "digits")
FMNIST_HELDOUT = 300  # per class
CANDIDATES = ("baseline", "transfer", "ensemble")
COMPLEXITY = {"baseline": 0, "transfer": 1, "ensemble": 2}
RULES = ("select", "old", "lowest-loss", "best-acc", "ensemble-unless", "oracle")
COLUMNS = ("baseline", "transfer", "centroid", "mean2", "release", *RULES)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--sets", nargs="+", choices=SETS, help="data sets (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="base.seed values")
    add_overrides(parser)
    parser.add_argument("--commit", default="HEAD", help="the project's code to run")
    parser.add_argument("--tag", help="output name: bench/out/smalldata-TAG.json (default: commit)")
    parser.add_argument("--data-seed", type=int, default=0, help="which images are drawn")
    parser.add_argument("--source", type=Path, default=SOURCE, help="Fashion-MNIST IDX folder")
    parser.add_argument("--work", type=Path, help="new or empty folder to keep (default: temp)")
    parser.add_argument("--quick", action="store_true", help="default sets without fmnist-100")
    return parser.parse_args(argv)


@functools.cache
def fmnist_arrays(source: Path) -> tuple[np.ndarray, np.ndarray]:
    return (
        read_idx(source / "train-labels-idx1-ubyte.gz"),
        read_idx(source / "train-images-idx3-ubyte.gz"),
    )


def split_groups(pixels: np.ndarray, groups: dict, per_class: int, seed: int, prefix: str):
    """(data, held out): class -> [(file name, image)]; a seeded permutation of each class, the
    first `per_class` to data/ and the rest held out, pixel duplicates dropped."""
    rng, seen, data, heldout = np.random.default_rng(seed), set(), {}, {}
    for name, rows in groups.items():
        kept = []
        for row in rng.permutation(rows):
            digest = hashlib.sha256(pixels[row].tobytes()).digest()
            if digest not in seen:
                seen.add(digest)
                kept.append((f"{prefix}-{int(row):04d}.png", pixels[row]))
        data[name], heldout[name] = kept[:per_class], kept[per_class:]
    return data, heldout


def make_data(name: str, args) -> tuple[dict, dict]:
    if name in FMNIST:
        classes, per_class = FMNIST[name]
        per_class = per_class or data_per_class(100, args.overrides)
        labels, pixels = fmnist_arrays(args.source)
        data, heldout = draw_images(labels, pixels, per_class, FMNIST_HELDOUT, args.data_seed)
        return tuple(
            {c: [(f"fmnist-train-{r:05d}.png", pixels[r]) for r in rows[c]] for c in classes}
            for rows in (data, heldout)
        )
    if name == "faces":
        from skimage.data import lfw_subset

        pixels = np.round(lfw_subset() * 255).astype(np.uint8)  # 200 x 25 x 25 in [0, 1]
        groups = {"face": np.arange(100), "background": np.arange(100, 200)}
        return split_groups(pixels, groups, 50, args.data_seed, "lfw")
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255 / 16)).astype(np.uint8)
    pixels = np.stack(
        [np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR)) for a in small]
    )
    groups = {str(k): np.flatnonzero(digits.target == k) for k in range(10)}
    return split_groups(pixels, groups, 40, args.data_seed, "digits")


def write_images(images: dict, folder: Path) -> None:
    for name, items in images.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for file_name, pixels in items:
            Image.fromarray(pixels).save(folder / name / file_name)


def make_project(target: Path, commit: str, data: dict) -> Path:
    """A clone of this repository at `commit` with `data` as its DVC-tracked data/."""
    return clone_with_data(target, lambda folder: write_images(data, folder), commit, "smalldata")


def run_pipeline(project: Path, seed: int, overrides: list[str]) -> dict:
    """`headstart run` in the clone with its own code: seconds, peak MiB, split counts, the
    released candidate and the chosen head."""
    child = headstart_run(project, seed, overrides)
    art = project / "artifacts"
    report = next(
        p
        for p in (art / "data-report" / "report.json", art / "prepared" / "report.json")
        if p.is_file()
    )
    totals = json.loads(report.read_text())["totals"]
    return {
        "seconds": child["seconds"],
        "peak_mib": child["peak_mib"],
        "counts": {s: totals[s] for s in ("train", "val", "test")},
        "released": json.loads((art / "release" / "selection.json").read_text())["winner"],
        "head": json.loads((art / "transfer" / "transfer.json").read_text())["config"],
    }


def heldout_probabilities(model: Path, folder: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(images x classes) probabilities from the clone's predict API, files, true class names."""
    from headstart.predicting import predict_paths

    classes = json.loads((model.parent / "labels.json").read_text())["classes"]
    results = predict_paths(model, [folder], top_k=len(classes))
    failed = [r["file"] for r in results if "error" in r]
    if failed:
        sys.exit(f"{model}: could not read {len(failed)} held-out images, e.g. {failed[0]}")
    probs = np.array([[dict(r["top"])[c] for c in classes] for r in results])
    return probs, [r["file"] for r in results], [Path(r["file"]).parent.name for r in results]


def centroid_hits(project: Path, files: list[str], y: np.ndarray) -> tuple[np.ndarray, float]:
    """Nearest-centroid hits on the held-out files with the frozen backbone's features (decoded
    as prepare does), and the largest gap between recomputed and cached training features."""
    import keras

    from headstart import images, params
    from headstart.artifacts import image_size, load_features, load_split
    from headstart.training import predict

    p = params.load(project / "params.yaml")
    backbone = keras.saving.load_model(project / "artifacts" / "backbone" / "backbone.keras")
    x_train, y_train = load_split(project / "artifacts" / "prepared", "train")
    f_train = predict(backbone, x_train)
    cached, cached_y = load_features(project / "artifacts" / "features", "train")
    same = np.array_equal(cached_y[: len(y_train)], y_train)
    gap = float(np.max(np.abs(cached[: len(y_train)] - f_train))) if same else float("nan")
    size, resize = image_size(project / "artifacts" / "prepared"), p.prepare.resize
    held = np.stack([images.load(f, size, resize, p.prepare.max_pixels) for f in files])
    f_held = predict(backbone, held)
    mean, sd = f_train.mean(axis=0), np.maximum(f_train.std(axis=0), 1e-6)
    z_train, z_held = (f_train - mean) / sd, (f_held - mean) / sd
    centroids = np.stack([z_train[y_train == k].mean(axis=0) for k in range(int(y.max()) + 1)])
    distances = ((z_held[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return distances.argmin(axis=1) == y, gap


def simpler_within_noise(losses: dict[str, np.ndarray]) -> str:
    """The release rule before issue 23: the lowest mean validation log-loss, unless a simpler
    candidate (baseline < transfer < ensemble) is within one paired standard error of it."""
    from headstart.metrics import paired_standard_error

    mean = {n: float(np.mean(v)) for n, v in losses.items()}
    best = min(mean, key=lambda n: (mean[n], COMPLEXITY[n]))
    tied = [
        n
        for n in mean
        if COMPLEXITY[n] < COMPLEXITY[best]
        and mean[n] - mean[best] <= paired_standard_error(losses[best], losses[n])
    ]
    return min(tied, key=lambda n: (COMPLEXITY[n], mean[n])) if tied else best


def pick_rules(val: dict, y_val: np.ndarray, held: dict) -> tuple[dict, dict]:
    """Each rule's pick among CANDIDATES, and validation loss and accuracy per candidate."""
    from headstart.metrics import paired_standard_error, per_image_loss

    losses = {n: per_image_loss(p, y_val) for n, p in val.items()}
    loss = {n: float(np.mean(v)) for n, v in losses.items()}
    acc = {n: float(np.mean(p.argmax(axis=1) == y_val)) for n, p in val.items()}
    from tasks.select import choose  # what select does at the clone's commit

    better = [
        m
        for m in ("baseline", "transfer")
        if loss["ensemble"] - loss[m] > paired_standard_error(losses["ensemble"], losses[m])
    ]
    picks = {
        "select": choose(val, y_val)[0],
        "old": simpler_within_noise(losses),
        "lowest-loss": min(loss, key=loss.get),
        "best-acc": min(CANDIDATES, key=lambda n: (-acc[n], loss[n])),
        "ensemble-unless": min(better, key=loss.get) if better else "ensemble",
        "oracle": max(CANDIDATES, key=lambda n: (held[n], -COMPLEXITY[n])),
    }
    return picks, {"loss": loss, "accuracy": acc}


def score(project: Path, heldout: Path) -> dict:
    import keras

    from headstart.artifacts import load_probabilities, load_split
    from headstart.training import predict

    art = project / "artifacts"
    probs, files, truth = {}, None, None
    for name in ("baseline", "transfer", "release"):
        probs[name], these, names = heldout_probabilities(art / name / "model.keras", heldout)
        if files is not None and these != files:
            sys.exit(f"{name}: held-out images came back in a different order")
        files, truth = these, names
    classes = json.loads((art / "transfer" / "labels.json").read_text())["classes"]
    y = np.array([classes.index(t) for t in truth])
    probs["mean2"] = (probs["baseline"] + probs["transfer"]) / 2
    hits = {n: p.argmax(axis=1) == y for n, p in probs.items()}
    hits["centroid"], gap = centroid_hits(project, files, y)
    accuracy = {n: round(float(np.mean(h)), 4) for n, h in hits.items()}
    t = probs["transfer"]
    top, wrong = t.max(axis=1), ~hits["transfer"]
    transfer = {
        "top_p_errors": round(float(top[wrong].mean()), 4) if wrong.any() else None,
        "top_p_all": round(float(top.mean()), 4),
        "log_loss": round(float(-np.mean(np.log(np.clip(t[np.arange(len(y)), y], 1e-7, 1)))), 4),
    }
    x_val, y_val = load_split(art / "prepared", "val")
    val = {
        "baseline": predict(keras.saving.load_model(art / "baseline" / "model.keras"), x_val),
        "transfer": load_probabilities(art / "transfer", "val"),
    }
    val["ensemble"] = 0.5 * val["transfer"] + 0.5 * val["baseline"]
    held = {
        "baseline": accuracy["baseline"],
        "transfer": accuracy["transfer"],
        "ensemble": accuracy["mean2"],
    }
    picks, val_metrics = pick_rules(val, y_val, held)
    accuracy.update({rule: held[pick] for rule, pick in picks.items()})
    keras.utils.clear_session()
    as_list = lambda a: np.round(a, 5).tolist()  # noqa: E731
    return {
        "accuracy": accuracy,
        "transfer": transfer,
        "picks": picks,
        "feature_cache_max_gap": gap,
        "val": {
            **val_metrics,
            "labels": y_val.tolist(),
            "probabilities": {n: as_list(p) for n, p in val.items()},
        },
        "heldout": {
            "classes": classes,
            "labels": y.tolist(),
            "files": [Path(f).name for f in files],
            "probabilities": {n: as_list(probs[n]) for n in ("baseline", "transfer")},
            "correct": {n: h.astype(int).tolist() for n, h in hits.items()},
        },
    }


def spread(values: list[float]) -> str:
    sd = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "n/a"
    return f"{statistics.mean(values):.3f} ± {sd}"


def report(results: dict) -> str:
    rows = [
        (name, *(spread([r["accuracy"][c] for r in runs.values()]) for c in COLUMNS))
        for name, runs in results.items()
        if runs
    ]
    per_run = [
        (
            name,
            seed,
            r["accuracy"]["transfer"],
            r["accuracy"]["centroid"],
            r["released"],
            r["head"],
            *(r["picks"][rule] for rule in RULES),
            r["transfer"]["top_p_errors"],
            r["transfer"]["log_loss"],
            "/".join(str(v) for v in r["counts"].values()),
            r["seconds"],
        )
        for name, runs in results.items()
        for seed, r in runs.items()
    ]
    return (
        table(rows, ("data set", *COLUMNS))
        + "\n\n"
        + table(
            per_run,
            (
                "data set",
                "seed",
                "transfer",
                "centroid",
                "released",
                "head",
                *RULES,
                "top p on errors",
                "log-loss",
                "train/val/test",
                "seconds",
            ),
        )
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before scoring imports TensorFlow
    names = args.sets or [s for s in SETS if not (args.quick and s == "fmnist-100")]
    overrides = ["export.formats=[]", *args.overrides]  # later overrides win
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.commit],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    work = args.work or Path(tempfile.mkdtemp(prefix="smalldata-"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work}: not empty; give a new or empty --work folder")
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "bench" / "out" / f"smalldata-{args.tag or commit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results, sizes = {}, {}
    for name in names:
        data, heldout = make_data(name, args)
        sizes[name] = {
            "data": sum(map(len, data.values())),
            "heldout": sum(map(len, heldout.values())),
        }
        project = make_project(work / name / "project", commit, data)
        write_images(heldout, work / name / "heldout")
        if str(project) not in sys.path:  # score with the clone's code (every clone: `commit`)
            sys.path.insert(0, str(project))
        results[name] = {}
        for seed in args.seeds:
            print(f"[{name} seed {seed}] headstart run in {project}", file=sys.stderr, flush=True)
            run = run_pipeline(project, seed, overrides)
            run.update(score(project, work / name / "heldout"))
            results[name][seed] = run
            print(
                f"[{name} seed {seed}] {run['seconds']:.0f}s {run['counts']} "
                f"released {run['released']} head {run['head']} {run['accuracy']} "
                f"picks {run['picks']} transfer {run['transfer']}",
                file=sys.stderr,
                flush=True,
            )
            result = {
                "tag": args.tag or commit,
                "commit": commit,
                "argv": sys.argv[1:],
                "settings": {
                    "sets": names,
                    "seeds": args.seeds,
                    "overrides": overrides,
                    "data_seed": args.data_seed,
                },
                "sizes": sizes,
                "results": results,
            }
            out.write_text(json.dumps(result))  # after every run: a crash keeps what was measured
    print(report(results))
    print(f"wrote {out}" + ("" if args.work else f"; removing {work}"), file=sys.stderr)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
