"""Memory that does not grow with the data: prepare copies without mapping, readers drop pages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headstart import artifacts

MIB = 2**20


def resident(kind: str = "RssFile") -> int:
    """This process's resident memory of one kind (RssFile, RssAnon, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {kind} in /proc/self/status")


@pytest.fixture
def mapped(tmp_path: Path) -> np.ndarray:
    """A 48 MiB uint8 array on disk, opened memory-mapped (as load_split opens images)."""
    rows = np.random.default_rng(0).integers(0, 256, (48 * 64, 16 * 1024), dtype=np.uint8)
    np.save(tmp_path / "rows.npy", rows)
    return np.load(tmp_path / "rows.npy", mmap_mode="r")


def test_reading_a_whole_mapped_array_through_rows_keeps_memory_flat(mapped, monkeypatch):
    monkeypatch.setattr(artifacts, "DROP_PAGES_EVERY", 4 * MIB)
    before = resident()
    total = 0
    rows = artifacts.Rows(mapped, np.float32)
    for start in range(0, len(mapped), 64):  # 1 MiB of the file per read
        batch = rows[start : start + 64]
        assert batch.dtype == np.float32 and not np.shares_memory(batch, mapped)
        total += int(batch[:, 0].sum())
        assert resident() - before < 8 * MIB  # at most DROP_PAGES_EVERY mapped (+ a read)
    assert total == int(mapped[:, 0].astype(np.int64).sum())  # dropped pages still read right
    shuffled = np.sort(np.random.default_rng(1).permutation(len(mapped))[:500])
    assert np.array_equal(artifacts.Rows(mapped)[shuffled], mapped[shuffled])


def test_a_plain_read_of_the_same_array_grows_memory_with_the_data(mapped):
    """The control for the test above: the growth it prevents is real."""
    before = resident()
    for start in range(0, len(mapped), 64):
        np.array(mapped[start : start + 64])
    assert resident() - before > 40 * MIB
    artifacts.drop_pages(mapped)
    assert resident() - before < 4 * MIB


def test_streamed_dataset_gives_the_same_batches_as_the_in_memory_one(tmp_path, monkeypatch):
    from headstart import training

    x = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    y = (np.arange(50) % 3).astype(np.int32)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    in_memory = list(training.dataset(mapped, y, 16).as_numpy_iterator())
    monkeypatch.setattr(training, "IN_MEMORY_LIMIT", 100)
    streamed = list(training.dataset(mapped, y, 16).as_numpy_iterator())
    assert len(streamed) == len(in_memory) == 4
    for (xs, ys), (xm, ym) in zip(streamed, in_memory, strict=True):
        assert xs.dtype == np.float32 and np.array_equal(xs, xm) and np.array_equal(ys, ym)
    shuffled = training.dataset(mapped, y, 16, shuffle=True, seed=3)
    epochs = [np.concatenate([b for _, b in shuffled.as_numpy_iterator()]) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(y) and not np.array_equal(epochs[0], epochs[1])


PREPARE_CHILD = """
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[2])
from helpers import small_params
from tasks import prepare
root = Path(sys.argv[1])
params = small_params(base={"image_size": 96})
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
prepare.prepare(root / "data", root / "prepared", params)
print((hwm() - before) * 1024)
"""


@pytest.mark.slow
def test_prepare_memory_does_not_grow_with_the_images(tmp_path):
    """1,500 images at 96 px are 40 MiB of arrays (and as much again in the decoded-image file):
    prepare's peak resident memory grows by far less than that (it grew by twice that when it
    copied through memory maps)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(3):
        folder = tmp_path / "data" / f"class_{label}"
        folder.mkdir(parents=True)
        for n in range(500):  # tiny files (decoding is not measured), upscaled to 96 px
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{n:03d}.png")
    child = subprocess.run(
        [sys.executable, "-c", PREPARE_CHILD, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth = int(child.stdout.split()[-1])
    arrays = sum(f.stat().st_size for f in (tmp_path / "prepared").glob("*_images.npy"))
    assert arrays > 39 * MIB
    # 9 MiB without the near-duplicate hashing, 13 with its working buffers (measured before the
    # coefficient ranks; their blocks are kept to 1 MiB so it stays under this bound)
    assert growth < 16 * MIB, f"prepare's peak memory grew by {growth / MIB:.0f} MiB"
    images = np.load(tmp_path / "prepared" / "train_images.npy", mmap_mode="r")
    assert images.shape[1:] == (96, 96, 3) and images.dtype == np.uint8


def peak_growth(run) -> int:
    """How far this process's peak resident memory (VmHWM) rose above its resident memory while
    `run()` ran, in bytes (the peak is reset first: /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = resident("VmRSS")
    run()
    return resident("VmHWM") - before


def mapped_features(folder: Path, width: int) -> np.ndarray:
    """48 MiB of float32 features on disk, memory-mapped (as load_features opens the cache)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(48 * MIB // 4 // width, width)).astype(np.float32) + 1
    np.save(folder / "features.npy", features)
    return np.load(folder / "features.npy", mmap_mode="r")


def test_fitting_the_ood_detector_reads_the_features_a_batch_at_a_time(tmp_path, monkeypatch):
    """The whole split as float64 (96 MiB here), centred and squared, was the select step's
    growth with the data."""
    from headstart import ood

    monkeypatch.setattr(artifacts, "DROP_PAGES_EVERY", 4 * MIB)
    features = mapped_features(tmp_path, 128)
    labels = np.arange(len(features)) % 5
    grown = peak_growth(lambda: ood.fit(features, labels, 5, "mahalanobis"))
    assert grown < 24 * MIB


def test_the_head_holds_one_standardised_copy_of_the_features(tmp_path, monkeypatch):
    """One 48 MiB float32 copy, which the tensor shares, and small temporaries (the mapped pages
    dropped as they are read); the copy's values outlive the function's own reference."""
    import gc

    from headstart import heads

    monkeypatch.setattr(artifacts, "DROP_PAGES_EVERY", 4 * MIB)
    features = mapped_features(tmp_path, 512)
    heads._standardise(features[:64])  # TensorFlow's own start-up is not the data's
    tensors = []
    grown = peak_growth(lambda: tensors.append(heads._standardise(features)))
    assert grown < 48 * MIB + 16 * MIB
    x, mean, variance = tensors[0]
    gc.collect()
    np.ones(features.shape, np.float32)  # reuses freed memory, if any
    expected = (np.asarray(features[-3:]) - mean) / np.sqrt(variance)
    assert np.allclose(x[-3:].numpy(), expected, atol=1e-5)
