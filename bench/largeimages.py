"""Image size on large images: `base.image_size: auto` vs 96 px, scored on held-out patches.

The tuning set is cut from scikit-image's bundled 512 px grey textures brick, grass and gravel
(offline). Each texture gives two classes: `sharp` (as photographed) and `soft` (the same
texture after a Gaussian blur of radius 1 source pixel), so half of the task is telling a
texture's fine detail from its slightly softened self: a cue a 96 px view of a 200+ px image
largely loses. Each class gets labelled patches of 200-236 px (random position, rotation up to
4 degrees, crop scale 0.9-1.0, brightness and contrast 0.85-1.15), saved as grey JPEGs
(quality 92). Patches for data/ (which prepare splits into train/val/test) come from the top
half of each texture's rows, held-out patches from the bottom half (each half blurred on its
own): no held-out pixel was trained on.

Per configuration one clone of the project (git clone, data, `dvc add`, commit), reused across
its seeds; per seed `headstart run -S base.seed=SEED -S export.formats=[] [-S ...]` with the
clone's committed code (commit changes here first), then baseline, transfer and release are
scored on the held-out patches with the clone's headstart.predicting.predict_paths. The size
each run trained at is read from prepare's report (artifacts/data-report/report.json).

    python bench/largeimages.py                                  # auto vs 96 px, seeds 1 2 3
    python bench/largeimages.py --configs auto 96 auto-noaug auto-finetune
    python bench/largeimages.py --configs 96 --seeds 1 --tag check   # one run (minutes)
    python bench/largeimages.py --show bench/out/largeimages-*.json  # one table from outputs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import clone_commit, clone_with_data, headstart_run, save_result, table
from PIL import Image, ImageEnhance, ImageFilter

MODELS = ("baseline", "transfer", "release")
CONFIGS = {
    "auto": [],
    "96": ["base.image_size=96"],
    "auto-noaug": ["head.augment=none"],
    "96-noaug": ["base.image_size=96", "head.augment=none"],
    "auto-finetune": ["finetune.enabled=true"],
    "96-finetune": ["base.image_size=96", "finetune.enabled=true"],
}
ALWAYS = ["export.formats=[]"]  # exports do not change accuracy; they only add minutes
SIDES = (200, 236)  # patch sides in px: every source's half fits one, rotated and scaled
MAX_ANGLE = 4.0
SCALES = (0.9, 1.0)  # source pixels per patch pixel
JITTER = (0.85, 1.15)  # brightness and contrast factors
FINISHES = ("sharp", "soft")
SOFT_RADIUS = 1.0  # Gaussian blur of the soft classes, in source pixels


def grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return np.asarray(Image.fromarray(image).convert("L"))


def sources() -> dict[str, np.ndarray]:
    """scikit-image's three grey 512 px textures."""
    from skimage import data

    return {"brick": data.brick(), "grass": data.grass(), "gravel": data.gravel()}


def classes() -> list[str]:
    return [f"{name}-{kind}" for name in sources() for kind in FINISHES]


def finish(region: np.ndarray, name: str) -> np.ndarray:
    """The region as class `name` shows it: as photographed, or softened by a slight blur."""
    if name == "sharp":
        return region
    blurred = Image.fromarray(region).filter(ImageFilter.GaussianBlur(radius=SOFT_RADIUS))
    return np.asarray(blurred)


def patch(region: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A randomly placed, rotated, scaled and lit square patch of `region`."""
    side = int(rng.integers(SIDES[0], SIDES[1] + 1))
    scale = rng.uniform(*SCALES)
    angle = rng.uniform(-MAX_ANGLE, MAX_ANGLE)
    spread = abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))
    inner = side * scale  # source pixels the patch shows
    crop = math.ceil(inner * spread)  # room to rotate without black corners
    height, width = region.shape
    if crop > min(height, width):
        raise ValueError(f"a {crop} px crop does not fit a {height}x{width} region")
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    image = Image.fromarray(region[top : top + crop, left : left + crop])
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    margin = (crop - inner) / 2
    image = image.crop((margin, margin, margin + inner, margin + inner))
    image = image.resize((side, side), Image.Resampling.LANCZOS)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(*JITTER))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(*JITTER))


def write_patches(folder: Path, part: str, per_class: int, seed: int) -> None:
    """`per_class` patches per class into folder/<class>/: part "data" from the top half of each
    source's rows, "heldout" from the bottom half."""
    for index, (texture, image) in enumerate(sources().items()):
        half = image.shape[0] // 2
        half_image = image[:half] if part == "data" else image[half:]
        for variant, kind in enumerate(FINISHES):
            region = finish(half_image, kind)  # each half blurred alone: no pixel crosses
            rng = np.random.default_rng([seed, index, variant, part == "heldout"])
            name = f"{texture}-{kind}"
            (folder / name).mkdir(parents=True, exist_ok=True)
            for number in range(per_class):
                path = folder / name / f"{name}-{part}-{number:03d}.jpg"
                patch(region, rng).save(path, quality=92)


def choices(project: Path) -> dict:
    """What the run chose: the size prepare decoded to (and why), the transfer head, its
    augmentation, whether fine-tuning was kept, and the released candidate."""
    artifacts = project / "artifacts"
    size = json.loads((artifacts / "data-report" / "report.json").read_text())["image_size"]
    transfer = json.loads((artifacts / "transfer" / "transfer.json").read_text())
    selection = json.loads((artifacts / "release" / "selection.json").read_text())
    return {
        "image_size": size["size"],
        "size_reason": size["reason"],
        "head": transfer["config"],
        "augment": transfer.get("augment"),
        "finetune_kept": transfer.get("finetune", {}).get("kept"),
        "released": selection["winner"],
    }


def score(project: Path, heldout: Path) -> dict[str, float]:
    """Held-out accuracy of every model the run produced."""
    from headstart.predicting import predict_paths

    accuracy = {}
    for name in MODELS:
        model = project / "artifacts" / name / "model.keras"
        if not model.is_file():
            continue
        results = predict_paths(model, [heldout])
        failed = [r["file"] for r in results if "error" in r]
        if failed:
            sys.exit(f"{model}: could not read {len(failed)} held-out images, e.g. {failed[0]}")
        right = [r["top"][0][0] == Path(r["file"]).parent.name for r in results]
        accuracy[name] = round(float(np.mean(right)), 4)
    return accuracy


def summarize(runs: dict[int, dict]) -> dict[str, dict]:
    """Per model: accuracy per seed (None where absent), mean and sd over the seeds present."""
    summary = {}
    for name in MODELS:
        values = [run["accuracy"].get(name) for run in runs.values()]
        present = [v for v in values if v is not None]
        if present:
            sd = statistics.stdev(present) if len(present) > 1 else None
            summary[name] = {
                "per_seed": values,
                "mean": round(statistics.mean(present), 4),
                "sd": None if sd is None else round(sd, 4),
            }
    seconds = [run["seconds"] for run in runs.values()]
    summary["seconds"] = {"per_seed": seconds, "mean": round(statistics.mean(seconds), 1)}
    return summary


def cell(stats: dict | None) -> str:
    if stats is None:
        return "–"
    spread = "" if stats["sd"] is None else f" ± {stats['sd']:.3f}"
    seeds = " / ".join("–" if v is None else f"{v:.3f}" for v in stats["per_seed"])
    return f"{stats['mean']:.3f}{spread} ({seeds})"


def report(results: dict[str, dict]) -> str:
    """Held-out accuracy mean ± sd (per seed) of each model, per configuration."""
    shown = ("release", "transfer", "baseline")
    header = ("configuration", "size", *shown, "s per run")
    rows = []
    for result in results.values():
        summary = result["summary"]
        sizes = sorted({run["image_size"] for run in result["runs"].values()})
        rows.append(
            (
                " ".join(f"-S {item}" for item in result["overrides"]) or "defaults (auto)",
                "/".join(str(s) for s in sizes),
                *(cell(summary.get(name)) for name in shown),
                f"{summary['seconds']['mean']:.0f}",
            )
        )
    return table(rows, header)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=["auto", "96"])
    parser.add_argument(
        "--show",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print one table from earlier outputs (bench/out/largeimages-*.json); run nothing",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="base.seed values")
    parser.add_argument("--per-class", type=int, default=57, help="patches per class in data/")
    parser.add_argument("--heldout", type=int, default=50, help="held-out patches per class")
    parser.add_argument("--data-seed", type=int, default=0, help="which patches are cut")
    parser.add_argument("--work", type=Path, help="new or empty folder to keep (default: temp)")
    parser.add_argument(
        "--tag", help="output name: bench/out/largeimages-TAG.json (default: commit)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.show:
        results = {}
        for path in args.show:
            results.update(json.loads(path.read_text())["configs"])
        print(report(results))
        return results
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before scoring imports TensorFlow
    work = args.work or Path(tempfile.mkdtemp(prefix="largeimages-"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work}: not empty; give a new or empty --work folder")
    work.mkdir(parents=True, exist_ok=True)
    write_patches(work / "heldout", "heldout", args.heldout, args.data_seed)
    results = {}
    for config in args.configs:
        project = clone_with_data(
            work / f"project-{config}",
            lambda folder: write_patches(folder, "data", args.per_class, args.data_seed),
            who="largeimages",
        )
        if str(project) not in sys.path:  # score with the clone's code, like the pipeline runs
            sys.path.insert(0, str(project))
        runs = {}
        for seed in args.seeds:
            print(f"[{config} seed {seed}] headstart run in {project}", file=sys.stderr, flush=True)
            child = headstart_run(project, seed, [*ALWAYS, *CONFIGS[config]])
            runs[seed] = {
                "seconds": child["seconds"],
                "peak_mib": child["peak_mib"],
                **choices(project),
                "accuracy": score(project, work / "heldout"),
            }
            print(f"[{config} seed {seed}] {runs[seed]}", file=sys.stderr, flush=True)
        results[config] = {"overrides": CONFIGS[config], "runs": runs, "summary": summarize(runs)}
    commit = clone_commit(project)
    print(report(results))
    result = {
        "tag": args.tag or commit,
        "commit": commit,
        "argv": sys.argv[1:],
        "settings": {
            "classes": classes(),
            "soft_radius": SOFT_RADIUS,
            "per_class": args.per_class,
            "heldout_per_class": args.heldout,
            "sides": SIDES,
            "seeds": args.seeds,
            "always": ALWAYS,
            "data_seed": args.data_seed,
        },
        "configs": results,
    }
    save_result(f"largeimages-{result['tag']}", result, work, keep=bool(args.work))
    return result


if __name__ == "__main__":
    main()
