"""The frozen backbone's feature cache, computed in one process or as shards in many.

The cache (what the head reads): `<features>/<split>_features.npy` (float32, one row per image
and view, view 0 unaugmented), `<split>_labels.npy`, and `features.json` with the key of the
backbone, data and views it was made from. `views` everywhere is the augmentation policy of each
view of a training image (headstart/augment.py: `view_policies`); val and test have view 0 only.

A shard is a contiguous row range of one split and view; it is computed into its own .npy file
(written to a temporary name, then renamed: a file that exists is complete), and `assemble`
concatenates the shard files into the cache, refusing a missing or short shard. Shards start on
batch boundaries and each augmented batch draws its randomness from (seed, view, first row), so
the sharded cache equals the one-process cache, however many shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.artifacts import (
    BACKBONE_FILE,
    DROP_PAGES_EVERY,
    FEATURES_RECORD,
    MANIFEST_FILE,
    SPLITS,
    drop_pages,
    load_split,
)
from headstart.augment import layers_for, view_policies
from headstart.errors import UserError
from headstart.files import atomic_dir, read_json, read_marker, sha256_file, write_json

log = logging.getLogger("headstart.features")

BATCH_SIZE = 64
MAX_SHARD_ROWS = 4096  # a retried shard costs at most this many rows (≈ 8 s at 96 px, 2 cores)


@dataclass(frozen=True)
class Shard:
    split: str
    view: int
    start: int
    stop: int
    policy: str = "none"  # the view's augmentation (headstart/augment.py)

    @property
    def file_name(self) -> str:
        return f"{self.split}-view{self.view}-{self.start}-{self.stop}.npy"


def cache_key(prepared_dir: Path, backbone_dir: Path, views: tuple[str, ...], seed: int) -> str:
    """What the cache was computed from: the backbone file, the prepared images (their manifest
    names each source file's content and split; the parameters prepare ran with say how they
    were decoded: `prepare.resize` changes the pixels, not the manifest), views and seed."""
    digest = hashlib.sha256()
    for path in (backbone_dir / BACKBONE_FILE, prepared_dir / MANIFEST_FILE):
        digest.update(sha256_file(path).encode())
    prepared_with = (read_marker(prepared_dir) or {}).get("params", {})
    digest.update(json.dumps(prepared_with, sort_keys=True).encode())
    digest.update(f"views={','.join(views)};seed={seed}".encode())
    return digest.hexdigest()


def params_views(params) -> tuple[str, ...]:
    """The policy of each training view the head step of `params` caches."""
    return view_policies(params.head.augment, params.head.views)


def params_key(params, root: Path | str) -> str:
    """`cache_key` of the cache the head step of `params` (a headstart Params) reads in `root`."""
    return cache_key(
        params.path("prepared", root),
        params.path("backbone", root),
        params_views(params),
        params.base.seed,
    )


def is_current(features_dir: Path, key: str) -> bool:
    record = features_dir / FEATURES_RECORD
    return record.exists() and read_json(record).get("key") == key


def shards_root(features_dir: Path) -> Path:
    """The folder of every shard file: beside the cache, outside what DVC tracks. It exists only
    while a run spreads the cache over workers (a killed run's is removed by `clean_up`)."""
    return features_dir.with_name(f"{features_dir.name}-shards")


def shards_dir(features_dir: Path, key: str) -> Path:
    """Where the shards of the cache with `key` go."""
    return shards_root(features_dir) / key[:16]


def _rows(prepared_dir: Path, views: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """split -> (images, views of each)."""
    return {
        split: (len(load_split(prepared_dir, split)[1]), len(views) if split == "train" else 1)
        for split in SPLITS
    }


def plan(
    prepared_dir: Path, views: tuple[str, ...], shards: int, batch_size: int = BATCH_SIZE
) -> list[Shard]:
    """About `shards` shards over every split and view (each split/view is cut separately;
    every shard but a split's last holds a whole number of batches)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1 (got {shards})")
    rows = _rows(prepared_dir, views)
    total = sum(images * n_views for images, n_views in rows.values())
    per_shard = max(1, min(MAX_SHARD_ROWS, -(-total // shards)))
    size = -(-per_shard // batch_size) * batch_size  # whole batches
    return [
        Shard(split, view, start, min(start + size, images), views[view])
        for split, (images, n_views) in rows.items()
        for view in range(n_views)
        for start in range(0, images, size)
    ]


def _augment(augmenter, batch: np.ndarray, seed: int, view: int, row: int):
    """One augmented batch, its randomness fixed by (seed, view, first row) alone."""
    import keras

    state = int(np.random.SeedSequence([seed, view, row]).generate_state(1)[0])
    generator = keras.random.SeedGenerator(state)
    for layer in augmenter:
        change = layer.get_random_transformation(batch, training=True, seed=generator)
        batch = layer.transform_images(batch, change, training=True)
    return batch


def extract(
    extractor,
    x,
    view: int,
    policy: str,
    start: int,
    stop: int,
    seed: int,
    out,
    batch_size: int = BATCH_SIZE,
    shown=None,
) -> None:
    """Backbone features of rows [start, stop) of `x` (view `view`, augmented by `policy`)
    into out[0 : stop - start]. Batch b of the rows is augmented with a seed drawn from
    (seed, view, its first row), so any split of [0, n) into batch-aligned shards gives the
    same values. `out` (a writable memory map) has its written pages flushed and dropped every
    DROP_PAGES_EVERY bytes: else every page written stays in the process's resident memory."""
    from headstart import training

    if start % batch_size:
        raise ValueError(
            f"a shard must start on a batch boundary (row {start}, batch {batch_size})"
        )
    transform = None
    if policy != "none":
        augmenter, rows = layers_for(policy), iter(range(start, stop, batch_size))
        transform = lambda batch: _augment(augmenter, batch, seed, view, next(rows))  # noqa: E731
    written = 0
    for offset, values in training.predict_batches(extractor, x[start:stop], batch_size, transform):
        out[offset : offset + len(values)] = values
        written += values.nbytes
        if written >= DROP_PAGES_EVERY:
            out.flush()
            drop_pages(out)
            written = 0
        if shown is not None:
            shown.advance(len(values))


def _record(key: str, views: tuple[str, ...], width: int, rows: dict[str, tuple[int, int]]) -> dict:
    counts = {split: images * n_views for split, (images, n_views) in rows.items()}
    return {"key": key, "views": list(views), "features": width, "rows": counts}


def _labels(tmp: Path, prepared_dir: Path, rows: dict[str, tuple[int, int]]) -> None:
    for split, (_, n_views) in rows.items():
        np.save(tmp / f"{split}_labels.npy", np.tile(load_split(prepared_dir, split)[1], n_views))


def _open(path: Path, rows: int, width: int):
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))


def cache_features(
    extractor,
    key: str,
    prepared_dir: Path,
    features_dir: Path,
    views: tuple[str, ...],
    seed: int,
    batch_size: int = BATCH_SIZE,
) -> Path:
    """The whole cache in this process, streamed batch by batch. Reused when current."""
    if is_current(features_dir, key):
        log.info("head: feature cache is current (%s)", features_dir)
        return features_dir
    from headstart.progress import progress

    started = time.perf_counter()
    width = int(extractor.output.shape[-1])
    rows = _rows(prepared_dir, views)
    total = sum(images * n_views for images, n_views in rows.values())
    with (
        atomic_dir(features_dir) as tmp,
        progress(total, "features", log, unit="images", artifact="feature-extraction") as shown,
    ):
        for split, (images, n_views) in rows.items():
            x = load_split(prepared_dir, split)[0]  # memory-mapped
            out = _open(tmp / f"{split}_features.npy", images * n_views, width)
            for view in range(n_views):
                policy = views[view] if split == "train" else "none"
                rows_out = out[view * images :]
                extract(extractor, x, view, policy, 0, images, seed, rows_out, batch_size, shown)
            out.flush()
            del out
        _labels(tmp, prepared_dir, rows)
        write_json(tmp / FEATURES_RECORD, _record(key, views, width, rows))
    log.info("head: cached features of %d images in %.1fs", total, time.perf_counter() - started)
    return features_dir


_LOADED: dict[tuple, object] = {}  # one loaded backbone per worker process, reused by its shards


def load_backbone(backbone_dir: Path):
    import keras

    path = backbone_dir / BACKBONE_FILE
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = keras.saving.load_model(path)
    return _LOADED[key]


def compute_shard(
    extractor,
    prepared_dir: Path,
    shard: Shard,
    out_dir: Path,
    seed: int,
    batch_size: int = BATCH_SIZE,
) -> Path:
    """One shard's features into `<out_dir>/<shard file>` (kept if already there: complete)."""
    path = out_dir / shard.file_name
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    x = load_split(prepared_dir, shard.split)[0]
    fd, tmp = tempfile.mkstemp(prefix=f".{shard.file_name}.", dir=out_dir)
    os.close(fd)
    try:
        out = _open(Path(tmp), shard.stop - shard.start, int(extractor.output.shape[-1]))
        extract(
            extractor, x, shard.view, shard.policy, shard.start, shard.stop, seed, out, batch_size
        )
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("features: shard %s in %.1fs", shard.file_name, time.perf_counter() - started)
    return path


def assemble(
    key: str,
    prepared_dir: Path,
    features_dir: Path,
    views: tuple[str, ...],
    shards: int,
    batch_size: int = BATCH_SIZE,
) -> Path:
    """Concatenate the files of `plan(..., shards)` into the cache, then delete them. Every shard
    must be there with its full row count and one width: else a UserError naming it, and the
    cache is left as it was."""
    rows = _rows(prepared_dir, views)
    pieces = plan(prepared_dir, views, shards, batch_size)
    folder = shards_dir(features_dir, key)
    width = 0
    for shard in pieces:
        path = folder / shard.file_name
        if not path.is_file():
            raise UserError(f"{path}: feature shard missing (its task did not finish); run again")
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: feature shard unreadable ({err}); run again") from None
        width = width or shape[1]
        if shape != (shard.stop - shard.start, width):
            raise UserError(
                f"{path}: feature shard holds {shape[0]} x {shape[1]} values, "
                f"expected {shard.stop - shard.start} x {width}; run again"
            )
    with atomic_dir(features_dir) as tmp:
        outs = {
            split: _open(tmp / f"{split}_features.npy", images * n_views, width)
            for split, (images, n_views) in rows.items()
        }
        for shard in pieces:
            row = shard.view * rows[shard.split][0] + shard.start
            outs[shard.split][row : row + shard.stop - shard.start] = np.load(
                folder / shard.file_name, mmap_mode="r"
            )
        for out in outs.values():
            out.flush()
        del outs
        _labels(tmp, prepared_dir, rows)
        write_json(tmp / FEATURES_RECORD, _record(key, views, width, rows))
    shutil.rmtree(shards_root(features_dir), ignore_errors=True)
    return features_dir
