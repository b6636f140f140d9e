"""Near-duplicate linking without training: recall of injected copies and the share of clean
images flagged, for the perceptual hash alone, with the coefficient-rank correlation, and with
the distinct-nearest-neighbour test.

1. Synthesis (where neardup.MIN_CORRELATION and the NEAREST_ thresholds were chosen):
   Fashion-MNIST TRAIN images outside the demo and outside bench/doctor.py's data (never the
   official test split): 5,000 clean images (the share of them in any group), and 1,000 others
   each with one copy: JPEG q70-95 after every change at once (resize ±10 %, crop <= 5 %,
   brightness ±10 %) or one of them alone; all 7,000 in one set.
2. bench/doctor.py's "copies" data (its 150 copies, made by its own add_copies): pairs linked,
   and, for each seed, how many pairs prepare (the real step) puts in two splits; its images
   without the copies: the share flagged.
3. Other clean data: the demo (--demo, default data/ if present) and scikit-image's 200 LFW
   photos: the share flagged.
Each also gives what prepare keeps in one split without flagging it: the look-alike pairs
(neardup.LOOK_ALIKE_*), as pairs kept together and as the share of clean images in them.

    python bench/neardup.py          # about 20 s here
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


def links(arrays: np.ndarray, rules: list[tuple]) -> list[set]:
    """Per rule (rho, nearest), the (i, j) pairs it links among `arrays`: the hash, or with
    `rho` also the rank correlation, and with `nearest` (min rho, max ratio) also distinct
    nearest neighbours. The signatures and one correlation pass serve every rule."""
    hashes, ranks = neardup.signatures(arrays)
    hashed = {(i, j) for i, j, _ in neardup.close_pairs(hashes)}
    lowest = min((rho for rho, _ in rules if rho is not None), default=None)
    if lowest is not None:
        above, values, index = neardup.rank_scan(ranks, lowest)
    found = []
    for rho, nearest in rules:
        pairs = set(hashed)
        if rho is not None:
            pairs |= {(i, j) for i, j, r in above if r >= rho}
            if nearest is not None:
                pairs |= {(i, j) for i, j, *_ in neardup.nearest_pairs(values, index, *nearest)}
        found.append(pairs)
    return found


def rule_name(rho: float | None, nearest: tuple[float, float] | None) -> str:
    name = "hash only" if rho is None else f"hash or rho >= {rho}"
    if nearest is None:
        return name
    return f"{name} or nearest (rho >= {nearest[0]}, ratio <= {nearest[1]})"


RULES = [(None, None), *((rho, None) for rho in (0.90, 0.91, 0.92, 0.93))]
RULES += [(neardup.MIN_CORRELATION, (0.8, ratio)) for ratio in (0.4, 0.5, 0.6)]
RULES += [(neardup.MIN_CORRELATION, (floor, 0.5)) for floor in (0.7, 0.85)]


def kept_together(arrays: np.ndarray) -> tuple[np.ndarray, float]:
    """As prepare splits them: each image's unit (the images that go to one split whole; -1
    when alone), and the share of images in a look-alike pair (kept together, not flagged)."""
    hashes, ranks = neardup.signatures(arrays)
    found = neardup.group(hashes, ranks=ranks)
    unit = np.full(len(arrays), -1)
    for n, members in enumerate(found.units):
        unit[members] = n
    in_pairs = {i for pair in found.look_alikes for i in pair}
    return unit, len(in_pairs) / len(arrays)


def flagged_shares(arrays: np.ndarray, rules: list[tuple]) -> list[float]:
    """Per rule, the share of `arrays` it links to another (what prepare would group)."""
    return [
        len({i for pair in found for i in pair}) / len(arrays) for found in links(arrays, rules)
    ]


def synthesis(bench_rows: set[int]) -> list[tuple]:
    """One set: 5,000 clean images, then 1,000 originals, then their 1,000 copies (the nearest
    neighbour test needs every image's neighbours, so the pairs are found among all 7,000)."""
    labels = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    pixels = read_idx(SOURCE / "train-images-idx3-ubyte.gz")
    demo = {int(r) for c in range(10) for r in np.flatnonzero(labels == c)[:DEMO_PER_CLASS]}
    pool = np.array([r for r in range(len(labels)) if r not in demo | bench_rows])
    rng = np.random.default_rng(2026)
    rows = rng.choice(pool, 6000, replace=False)
    arrays = [decode(png(Image.fromarray(pixels[r]).convert("RGB"))) for r in rows]
    modes = []
    for n, row in enumerate(rows[5000:]):
        mode = ("all", "all", *MODES[1:])[n % 6]
        arrays.append(decode(copy_of(Image.fromarray(pixels[row]).convert("RGB"), mode, rng)))
        modes.append(mode)
    stacked, modes_array = np.stack(arrays), np.array(modes)
    rows_out = []
    for (rho, nearest), found in zip(RULES, links(stacked, RULES), strict=True):
        linked = np.array([(5000 + k, 6000 + k) in found for k in range(1000)])
        flagged = {i for pair in found for i in pair if i < 5000}
        if (rho, nearest) == DEFAULT:
            flagged_default = len(flagged) / 5000
        per_mode = " ".join(f"{m} {linked[modes_array == m].mean():.3f}" for m in MODES)
        rows_out.append(
            (
                rule_name(rho, nearest),
                f"{linked.mean():.3f}",
                per_mode,
                f"{len(flagged) / 5000:.2%}",
            )
        )
    unit, _ = kept_together(stacked)
    together = np.array(
        [unit[5000 + k] >= 0 and unit[5000 + k] == unit[6000 + k] for k in range(1000)]
    )
    rows_out.append(
        (
            "default, and look-alikes kept in one split (not flagged)",
            f"{together.mean():.3f}",
            " ".join(f"{m} {together[modes_array == m].mean():.3f}" for m in MODES),
            f"{flagged_default:.2%}, and {np.mean(unit[:5000] >= 0) - flagged_default:.2%} more "
            "kept together",
        )
    )
    return rows_out


DEFAULT = (neardup.MIN_CORRELATION, (neardup.NEAREST_MIN_CORRELATION, neardup.NEAREST_MAX_RATIO))
DOCTOR_RULES = [(None, None), (neardup.MIN_CORRELATION, None), DEFAULT]


def doctor_copies(seeds: list[int]) -> tuple[list[tuple], dict]:
    """bench/doctor.py's copies: pairs linked among all its images under each rule, the share of
    its images without the copies flagged, and (the default rule: prepare itself) how many pairs
    straddle two splits per seed."""
    pixels, train, _ = fashion_images(SOURCE, 100, 1000)
    work = Path(tempfile.mkdtemp(prefix="neardup-"))
    write_pngs(pixels, train, work / "data")
    clean = np.stack([decode(p.read_bytes()) for p in sorted((work / "data").rglob("*.png"))])
    pairs = add_copies(work / "data", 150, seed=0)
    files = sorted(p.relative_to(work / "data").as_posix() for p in (work / "data").rglob("*.*"))
    at = {name: n for n, name in enumerate(files)}
    everything = np.stack([decode((work / "data" / name).read_bytes()) for name in files])
    wanted = [tuple(sorted((at[a], at[b]))) for a, b in pairs]
    straddling = {}
    raw = paramfile.read_raw(ROOT / "params.yaml")
    for seed in seeds:
        raw["base"]["seed"] = seed
        out = prepare(work / "data", work / f"prepared-{seed}", params.from_dict(raw))
        with open(out / "manifest.csv", newline="") as handle:
            split = {row["file"]: row["split"] for row in csv.DictReader(handle)}
        straddling[seed] = sum(split[a] != split[b] for a, b in pairs)
    rows, missed = [], []
    shares = flagged_shares(clean, DOCTOR_RULES)
    for rule, found, share in zip(
        DOCTOR_RULES, links(everything, DOCTOR_RULES), shares, strict=True
    ):
        linked = [pair in found for pair in wanted]
        rows.append(
            (
                rule_name(*rule),
                f"{sum(linked)}/150",
                f"{share:.2%}",
                ", ".join(f"seed {s}: {n}" for s, n in straddling.items())
                if rule == DEFAULT
                else "",
            )
        )
        missed = [pairs[n][0] for n, ok in enumerate(linked) if not ok]
    unit, _ = kept_together(everything)
    _, kept_share = kept_together(clean)
    together = sum(unit[i] >= 0 and unit[i] == unit[j] for i, j in wanted)
    rows.append(
        (
            "default, and look-alikes kept in one split (not flagged)",
            f"{together}/150 in one unit",
            f"{rows[-1][2]}, and {kept_share:.2%} kept together",
            "",
        )
    )
    rows_by_row = {r for rows in train.values() for r in rows}
    return rows, {"missed": missed, "rows": rows_by_row}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--demo", type=Path, default=ROOT / "data")
    args = parser.parse_args(argv)
    rows, extra = doctor_copies(args.seeds)
    print(table(rows, ("bench/doctor.py copies", "pairs linked", "clean flagged", "straddling")))
    print("not linked by the default rule (original):", extra["missed"], "\n")
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
    if "scikit-image lfw_subset" in clean_sets:
        photos = clean_sets["scikit-image lfw_subset"]
        copies = [
            decode(
                png(
                    Image.fromarray((f * 255).round().astype(np.uint8))
                    .crop((1, 1, 25, 25))
                    .resize((27, 27))
                )
            )
            for f in faces
        ]
        both = np.stack(photos + copies)
        linked = [
            (rule_name(*rule), f"{sum((k, 200 + k) in found for k in range(200))}/200")
            for rule, found in zip(DOCTOR_RULES, links(both, DOCTOR_RULES), strict=True)
        ]
        unit, _ = kept_together(both)
        together = sum(unit[k] >= 0 and unit[k] == unit[200 + k] for k in range(200))
        linked.append(("default, and look-alikes kept in one split", f"{together}/200"))
        heading = "LFW photos cropped by 1 px in 25, scaled back to 27 px, among all 400"
        print(table(linked, (heading, "linked")))
        print()
    rows = [
        (
            name,
            len(arrays),
            *(f"{share:.2%}" for share in flagged_shares(np.stack(arrays), DOCTOR_RULES)),
            f"{kept_together(np.stack(arrays))[1]:.2%}",
        )
        for name, arrays in clean_sets.items()
    ]
    print()
    print(
        table(
            rows,
            (
                "clean data",
                "images",
                *(f"flagged: {rule_name(*r)}" for r in DOCTOR_RULES),
                "look-alikes kept together",
            ),
        )
    )


if __name__ == "__main__":
    main()
