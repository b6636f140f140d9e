"""head: frozen backbone + prepared images -> artifacts/transfer/ (end-to-end model).

The backbone is frozen, so its output per image never changes: features are computed once per
image (and per augmented view) into a cache, and the dense head trains on the cache. The cache
is keyed by backbone, data and views, so a change to head settings alone reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from headstart.files import atomic_dir, read_json, require, sha256_file, write_json
from headstart.params import Params
from headstart.summaries import write_summary
from headstart.training import predict, predict_batches
from tasks.freeze import BACKBONE_FILE
from tasks.prepare import SPLITS, load_split

log = logging.getLogger("headstart.head")

MODEL_FILE = "model.keras"
HEAD_STEPS_PER_EXECUTION = 32  # the head is tiny: per-batch Python overhead would dominate


def _augmenter(seed: int):
    import keras
    from keras import layers

    return keras.Sequential([
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed + 1),
        layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
    ], name=f"augment_{seed}")  # fmt: skip


def cache_key(prepared_dir: Path, backbone_dir: Path, views: int, seed: int) -> str:
    digest = hashlib.sha256()
    for path in (backbone_dir / BACKBONE_FILE, prepared_dir / "manifest.csv"):
        digest.update(sha256_file(path).encode())
    digest.update(f"views={views};seed={seed}".encode())
    return digest.hexdigest()


def cache_features(extractor, key: str, prepared_dir: Path, features_dir: Path, views: int,
                   seed: int, batch_size: int = 64) -> Path:  # fmt: skip
    """Backbone features of every prepared image (train: `views` views, the first unaugmented),
    streamed batch by batch into `<features_dir>/<split>_features.npy`. Reused when current."""
    record = features_dir / "features.json"
    if record.exists() and read_json(record).get("key") == key:
        log.info("head: feature cache is current (%s)", features_dir)
        return features_dir
    started = time.perf_counter()
    width = int(extractor.output.shape[-1])
    with atomic_dir(features_dir) as tmp:
        counts = {}
        for split in SPLITS:
            x, y = load_split(prepared_dir, split)
            n_views = views if split == "train" else 1
            out = np.lib.format.open_memmap(tmp / f"{split}_features.npy", mode="w+",
                                            dtype=np.float32, shape=(n_views * len(x), width))  # fmt: skip
            for view in range(n_views):
                augment = _augmenter(seed + 10 * view) if view else None
                transform = (lambda b, a=augment: a(b, training=True)) if augment else None
                for start, features in predict_batches(extractor, x, batch_size, transform):
                    row = view * len(x) + start
                    out[row : row + len(features)] = features
            out.flush()
            del out
            np.save(tmp / f"{split}_labels.npy", np.tile(y, n_views))
            counts[split] = n_views * len(x)
        write_json(tmp / "features.json", {
            "key": key, "views": views, "features": width, "rows": counts,
            "seconds": round(time.perf_counter() - started, 3),
        })  # fmt: skip
    log.info("head: cached features of %d images in %.1fs", sum(counts.values()),
             time.perf_counter() - started)  # fmt: skip
    return features_dir


def load_features(features_dir: Path, split: str):
    return (np.load(features_dir / f"{split}_features.npy", mmap_mode="r"),
            np.load(features_dir / f"{split}_labels.npy"))  # fmt: skip


def train_head(prepared_dir: Path | str, backbone_dir: Path | str, features_dir: Path | str,
               out_dir: Path | str, params: Params) -> Path:  # fmt: skip
    import keras

    from headstart import models, training

    prepared_dir, backbone_dir = Path(prepared_dir), Path(backbone_dir)
    features_dir = Path(features_dir)
    p, seed = params.head, params.base.seed
    keras.utils.set_random_seed(seed)
    classes = read_json(require(prepared_dir / "labels.json", "prepare"))["classes"]
    extractor = keras.saving.load_model(require(backbone_dir / BACKBONE_FILE, "freeze"))
    timings = {}
    started = time.perf_counter()
    key = cache_key(prepared_dir, backbone_dir, p.views, seed)
    cache_features(extractor, key, prepared_dir, features_dir, p.views, seed)
    timings["features"] = time.perf_counter() - started
    f_train, y_train = load_features(features_dir, "train")
    f_val, y_val = load_features(features_dir, "val")
    head = models.dense_head(f_train.shape[1], len(classes), p.units, p.dropout)
    training.compile_classifier(head, models.optimizer(p.optimizer, p.learning_rate),
                                steps_per_execution=HEAD_STEPS_PER_EXECUTION)  # fmt: skip
    weights = (
        training.balanced_class_weight(y_train, len(classes))
        if p.class_weight == "balanced"
        else None
    )
    with atomic_dir(out_dir) as tmp:
        started = time.perf_counter()
        training.fit(
            head,
            training.dataset(f_train, y_train, p.batch_size, shuffle=True, seed=seed),
            training.dataset(f_val, y_val, p.batch_size),
            tmp, "head", p.epochs, p.patience, p.target_accuracy, class_weight=weights,
        )  # fmt: skip
        timings["head_fit"] = time.perf_counter() - started
        transfer = models.end_to_end(extractor, head, params.base.image_size)
        record = {"val_accuracy_head_only": _accuracy(head, f_val, y_val)}
        if params.finetune.enabled:
            started = time.perf_counter()
            record.update(finetune(transfer, extractor, prepared_dir, params, tmp))
            timings["finetune"] = time.perf_counter() - started
            # a fresh, uncompiled wrapper around the same (tuned) layers: the saved model then
            # carries no optimizer state from fine-tuning
            transfer = models.end_to_end(extractor, head, params.base.image_size)
        transfer.save(tmp / MODEL_FILE)
        head.save(tmp / "head.keras")
        write_summary(transfer, tmp / "summary.txt")
        shutil.copy(prepared_dir / "labels.json", tmp / "labels.json")
        record["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        write_json(tmp / "transfer.json", record)
    return Path(out_dir)


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(predict(model, x), axis=1) == y)) if len(y) else 0.0


def finetune(transfer, extractor, prepared_dir: Path, params: Params, tmp: Path) -> dict:
    """Unfreeze the top `finetune.blocks` blocks (BatchNormalization stays frozen), train on
    images at a low learning rate, and keep the result only if validation accuracy improves."""
    import keras

    from headstart import backbones, models, training

    f = params.finetune
    x_train, y_train = load_split(prepared_dir, "train")
    x_val, y_val = load_split(prepared_dir, "val")
    before = _accuracy(transfer, x_val, y_val)
    saved = transfer.get_weights()
    start = backbones.block_start_index(extractor, backbones.get(params.base.backbone), f.blocks)
    extractor.trainable = True
    for index, layer in enumerate(extractor.layers):
        is_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= start and not is_norm
    training.compile_classifier(transfer, models.optimizer("adam", f.learning_rate))
    finetune_dir = tmp / "finetune"
    finetune_dir.mkdir()
    training.fit(
        transfer,
        training.dataset(x_train, y_train, f.batch_size, shuffle=True, seed=params.base.seed),
        training.dataset(x_val, y_val, f.batch_size),
        finetune_dir, "finetune", f.epochs, params.head.patience, params.head.target_accuracy,
    )  # fmt: skip
    after = _accuracy(transfer, x_val, y_val)
    kept = after > before
    if not kept:
        transfer.set_weights(saved)
    backbones.freeze(extractor)
    log.info("finetune: val accuracy %.4f -> %.4f, %s", before, after,
             "kept" if kept else "discarded (head-only model kept)")  # fmt: skip
    return {"finetune": {"val_accuracy_before": before, "val_accuracy_after": after,
                         "kept": kept, "blocks": f.blocks}}  # fmt: skip


def run(params: Params, root: Path) -> Path:
    return train_head(params.path("prepared", root), params.path("backbone", root),
                      params.path("features", root), params.path("transfer", root), params)  # fmt: skip
