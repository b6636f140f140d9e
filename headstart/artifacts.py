"""The on-disk contract between steps: file names and readers every step shares."""

from __future__ import annotations

import csv
import mmap
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
MODEL_FILE = "model.keras"  # every model folder: model.keras + labels.json beside it
LABELS_FILE = "labels.json"
SELECTION_FILE = "selection.json"
MANIFEST_FILE = "manifest.csv"
TRANSFER_RECORD = "transfer.json"
HEAD_SELECTION_FILE = "head_selection.json"
WEIGHTS_RECORD = "weights.json"
FEATURES_RECORD = "features.json"
# the split record: every used image's split, by content (git-tracked at the project root, read
# and rewritten by prepare, so adding images never moves one and a fresh clone splits the same)
SPLIT_RECORD = "splits.csv"
REPORT_FILE = "report.json"  # prepare's report (paths.data_report), beside report.txt
EXPORT_RECORD_FILE = "export.json"  # in paths.export: every format's files and figures
# the transfer model's class probabilities on the val and test splits, written by head so that
# select and evaluate do not run the backbone again (arrays named by split)
PROBABILITIES_FILE = "probabilities.npz"
# in the transfer folder: each training image's probabilities from the CV head not fed it
# (images x classes, training-split order; the data doctor's label check reads it)
OUT_OF_FOLD_FILE = "train_out_of_fold.npy"
LIVE_DIR = "dvclive"  # in a model folder: DVCLive's per-epoch and summary metrics (dvc.yaml reads)
BACKBONE_FILE = "backbone.keras"  # the frozen feature extractor (freeze -> head)
# model name -> the step that makes it (for "run that step first" messages)
PRODUCERS = {"baseline": "baseline", "transfer": "head", "ensemble": "select", "release": "select"}


def weights_file_name(backbone: str) -> str:
    """The converted ImageNet weights of a backbone in the weights folder (weights -> freeze)."""
    return f"{backbone}.weights.h5"


def image_size(prepared: Path | str) -> int:
    """The size the models train at: what prepare decoded the images to (labels.json), whether
    base.image_size pinned it or chose it (auto)."""
    from headstart.files import read_json, require

    return int(read_json(require(Path(prepared) / LABELS_FILE, "prepare"))["image_size"])


def load_split(prepared: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x S x S x 3 memory-mapped, labels int32 N) of one prepared split."""
    prepared = Path(prepared)
    return (
        np.load(prepared / f"{split}_images.npy", mmap_mode="r"),
        np.load(prepared / f"{split}_labels.npy"),
    )


# reading a memory-mapped array maps its pages into the process (resident memory, file-backed);
# `Rows` hands them back to the page cache after this many bytes read in order
DROP_PAGES_EVERY = 64 * 2**20


def drop_pages(array) -> None:
    """Take the pages of the memory mapping behind `array` (or a view of it) out of this
    process's resident memory (MADV_DONTNEED: they stay in the OS page cache and the data stays
    readable; the next read maps them in again). No-op for arrays in memory."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and not base.closed and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


class Rows:
    """Rows of a (memory-mapped) array read as copies, with the mapped pages dropped every
    DROP_PAGES_EVERY bytes of slices read in order, and after every read of scattered rows (the
    kernel maps the pages around each one too: 53 MB of shuffled batches mapped a whole 400 MB
    split). Reading a whole split, in order or shuffled, does not grow the process's memory."""

    def __init__(self, array, dtype=None):
        self.array, self.dtype = array, dtype
        self._read = 0

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index) -> np.ndarray:
        rows = np.array(self.array[index], dtype=self.dtype)  # a copy, never a view of the map
        self._read += rows.size * self.array.itemsize
        if self._read >= DROP_PAGES_EVERY or not isinstance(index, slice):
            drop_pages(self.array)
            self._read = 0
        return rows


def load_features(features_dir: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(backbone features float32 memory-mapped, labels) of one split from the feature cache."""
    features_dir = Path(features_dir)
    return (
        np.load(features_dir / f"{split}_features.npy", mmap_mode="r"),
        np.load(features_dir / f"{split}_labels.npy"),
    )


def load_probabilities(model_dir: Path | str, split: str) -> np.ndarray:
    """A model's recorded probabilities (N x classes) on one prepared split."""
    with np.load(Path(model_dir) / PROBABILITIES_FILE) as recorded:
        return recorded[split]


def read_history(live_dir: Path | str, name: str) -> dict[str, list[float]]:
    """The per-epoch values `live_logger` wrote for `name`, in Keras's keys (`loss`,
    `val_accuracy`, ...), in step order."""
    metrics = Path(live_dir) / "plots" / "metrics" / name
    history = {}
    for split, prefix in (("train", ""), ("eval", "val_")):
        for path in sorted((metrics / split).glob("*.tsv")):
            with open(path, newline="") as handle:
                rows = sorted(csv.DictReader(handle, delimiter="\t"), key=lambda r: int(r["step"]))
            history[prefix + path.stem] = [float(row[path.stem]) for row in rows]
    return history
