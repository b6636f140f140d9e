"""Near-duplicate linking without training: recall of injected copies and the share of clean
images flagged, for the perceptual hash alone and with the coefficient-rank correlation.

1. Synthesis (where neardup.MIN_CORRELATION was chosen): Fashion-MNIST TRAIN images outside the
   demo and outside bench/doctor.py's data (never the official test split): 5,000 clean images
   (the share of them in any group), and 1,000 others each with one copy: JPEG q70-95 after
   every change at once (resize ±10 %, crop <= 5 %, brightness ±10 %) or one of them alone.
2. bench/doctor.py's "copies" data (its 150 copies, made by its own add_copies): pairs linked,
   and, for each seed, how many pairs prepare (the real step) puts in two splits; its images
   without the copies: the share flagged.
3. Other clean data: the demo (--demo, default data/ if present) and scikit-image's 200 LFW
   photos: the share flagged.

    python bench/neardup.py          # about a minute here
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, table
from doctor import add_copies
from heldout import DEMO_PER_CLASS, SOURCE, fashion_images, read_idx, write_pngs
from PIL import Image, ImageEnhance

sys.path.insert(0, str(ROOT))
from headstart import images, neardup, paramfile, params
from tasks.prepare import prepare

SIZE = 96  # the default image size: prepare hashes the decoded images
MODES = ("all", "resize", "crop", "brightness", "jpeg")


def decode(data: bytes) -> np.ndarray:
    return images.decode(data, SIZE, "pad")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def copy_of(image: Image.Image, mode: str, rng: np.random.Generator) -> bytes:
    """A copy as the issue describes it: `mode` "all" makes every change, else that one only;
    every copy is saved as JPEG q70-95."""
    if mode in ("all", "resize"):
        scale = 1 + rng.uniform(-0.1, 0.1)
        w, h = image.size
        image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))))
    if mode in ("all", "crop"):
        crop, (w, h) = rng.uniform(0, 0.05), image.size
        dx, dy = round(w * crop * rng.uniform()), round(h * crop * rng.uniform())
        image = image.crop((dx, dy, w - round(w * crop) + dx, h - round(h * crop) + dy))
    if mode in ("all", "brightness"):
        image = ImageEnhance.Brightness(image).enhance(1 + rng.uniform(-0.1, 0.1))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


def flagged_share(arrays: np.ndarray, use_ranks: bool) -> float:
    hashes, ranks = neardup.signatures(arrays)
    found = neardup.group(hashes, ranks=ranks if use_ranks else None)
    return sum(len(g) for g in found.groups) / len(arrays)


def pair_links(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: (Hamming distance, rank correlation)."""
    (h1, r1), (h2, r2) = neardup.signatures(first), neardup.signatures(second)
    distances = np.array([neardup.distance(a, b) for a, b in zip(h1, h2, strict=True)])
    rhos = np.array([neardup.correlation(a, b) for a, b in zip(r1, r2, strict=True)])
    return distances, rhos


def synthesis(bench_rows: set[int]) -> list[tuple]:
    labels = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    pixels = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    demo = {int(r) for c in range(10) for r in np.flatnonzero(labels == c)[:DEMO_PER_CLASS]}
    pool = np.array([r for r in range(len(labels)) if r not in demo | bench_rows])
    rng = np.random.default_rng(2026)
    rows = rng.choice(pool, 6000, replace=False)
    clean = np.stack([decode(png(Image.fromarray(pixels[r]).convert("RGB"))) for r in rows[:5000]])
    originals, copies, modes = [], [], []
    for n, row in enumerate(rows[5000:]):
        image = Image.fromarray(pixels[row]).convert("RGB")
        mode = ("all", "all", *MODES[1:])[n % 6]
        originals.append(decode(png(image)))
        copies.append(decode(copy_of(image, mode, rng)))
        modes.append(mode)
    distances, rhos = pair_links(np.stack(originals), np.stack(copies))
    modes_array = np.array(modes)
    hashes, ranks = neardup.signatures(clean)
    hash_flagged = {i for g in neardup.group(hashes).groups for i in g}
    rows_out = []
    for rho in (None, 0.90, 0.91, 0.92, 0.93, 0.94):
        linked = distances <= neardup.MAX_DISTANCE
        flagged = set(hash_flagged)
        if rho is not None:
            linked = linked | (rhos >= rho)
            for i, j, _ in neardup.correlated_pairs(ranks, rho):
                flagged |= {i, j}
        per_mode = " ".join(f"{m} {linked[modes_array == m].mean():.3f}" for m in MODES)
        rows_out.append(
            (
                "hash only" if rho is None else f"hash or rho >= {rho}",
                f"{linked.mean():.3f}",
                per_mode,
                f"{len(flagged) / len(clean):.2%}",
            )
        )
    return rows_out


def doctor_copies(seeds: list[int]) -> tuple[list[tuple], dict]:
    pixels, train, _ = fashion_images(SOURCE, 100, 1000)
    work = Path(tempfile.mkdtemp(prefix="neardup-"))
    write_pngs(pixels, train, work / "data")
    clean_files = sorted((work / "data").rglob("*.png"))
    clean = np.stack([decode(p.read_bytes()) for p in clean_files])
    pairs = add_copies(work / "data", 150, seed=0)
    first = np.stack([decode((work / "data" / a).read_bytes()) for a, _ in pairs])
    second = np.stack([decode((work / "data" / b).read_bytes()) for _, b in pairs])
    distances, rhos = pair_links(first, second)
    linked = (distances <= neardup.MAX_DISTANCE) | (rhos >= neardup.MIN_CORRELATION)
    straddling = {}
    raw = paramfile.read_raw(ROOT / "params.yaml")
    for seed in seeds:
        raw["base"]["seed"] = seed
        out = prepare(work / "data", work / f"prepared-{seed}", params.from_dict(raw))
        with open(out / "manifest.csv", newline="") as handle:
            split = {row["file"]: row["split"] for row in csv.DictReader(handle)}
        straddling[seed] = sum(split[a] != split[b] for a, b in pairs)
    rows = [
        (
            "hash only",
            f"{int((distances <= neardup.MAX_DISTANCE).sum())}/150",
            f"{flagged_share(clean, False):.2%}",
            "",
        ),
        (
            f"hash or rho >= {neardup.MIN_CORRELATION}",
            f"{int(linked.sum())}/150",
            f"{flagged_share(clean, True):.2%}",
            ", ".join(f"seed {s}: {n}" for s, n in straddling.items()),
        ),
    ]
    missed = [
        (pairs[i][0], int(distances[i]), round(float(rhos[i]), 3)) for i in np.flatnonzero(~linked)
    ]
    rows_by_row = {r for rows in train.values() for r in rows}
    return rows, {"missed": missed, "rows": rows_by_row}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--demo", type=Path, default=ROOT / "data")
    args = parser.parse_args(argv)
    rows, extra = doctor_copies(args.seeds)
    print(table(rows, ("bench/doctor.py copies", "pairs linked", "clean flagged", "straddling")))
    print("not linked (original, distance, rho):", extra["missed"], "\n")
    print(
        table(
            synthesis(extra["rows"]),
            ("synthesis", "recall (1,000 pairs)", "per change", "5,000 clean flagged"),
        )
    )
    clean_sets = {}
    if args.demo.is_dir():
        clean_sets[f"demo ({args.demo})"] = [
            decode(p.read_bytes()) for p in sorted(args.demo.rglob("*.png"))
        ]
    try:
        import skimage.data

        faces = skimage.data.lfw_subset()
        clean_sets["scikit-image lfw_subset"] = [
            decode(png(Image.fromarray((f * 255).round().astype(np.uint8)))) for f in faces
        ]
    except ImportError:
        pass
    rows = [
        (
            name,
            len(arrays),
            f"{flagged_share(np.stack(arrays), False):.2%}",
            f"{flagged_share(np.stack(arrays), True):.2%}",
        )
        for name, arrays in clean_sets.items()
    ]
    print()
    print(table(rows, ("clean data", "images", "flagged, hash only", "flagged, hash or rho")))


if __name__ == "__main__":
    main()
