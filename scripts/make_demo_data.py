"""Write the demo data set: a class-balanced subset of Fashion-MNIST's train split as PNGs.

Source: Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), the original
IDX files of Fashion-MNIST (Zalando Research, MIT licence). Run once by a maintainer; the result
is tracked by data.dvc and stored in the in-repo DVC remote, so users only need `dvc pull`.

    python scripts/make_demo_data.py --per-class 150 --out data
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()
    pixels = read_idx(args.source / "train-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz")
    for index, name in enumerate(CLASSES):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(labels == index)[: args.per_class]
        for row in rows:
            Image.fromarray(pixels[row], mode="L").save(folder / f"fmnist-train-{row:05d}.png")
    print(f"wrote {len(CLASSES) * args.per_class} images to {args.out}/")


if __name__ == "__main__":
    main()
