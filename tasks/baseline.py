"""baseline: prepared images -> artifacts/baseline/ (the small CNN trained from scratch)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from headstart.artifacts import LABELS_FILE, LIVE_DIR, MODEL_FILE, load_split
from headstart.files import atomic_dir, read_json, require, save_keras, write_json, write_summary
from headstart.params import Params

log = logging.getLogger("headstart.baseline")


def fit_baseline(prepared_dir: Path | str, out_dir: Path | str, params: Params) -> Path:
    import keras

    from headstart import augment, models, training

    prepared_dir = Path(prepared_dir)
    p, seed = params.baseline, params.base.seed
    keras.utils.set_random_seed(seed)
    classes = read_json(require(prepared_dir / LABELS_FILE, "prepare"))["classes"]
    x_train, y_train = load_split(prepared_dir, "train")
    x_val, y_val = load_split(prepared_dir, "val")
    strategy = training.strategy(params.base.devices)
    with strategy.scope():
        model = models.baseline_cnn(x_train.shape[1], len(classes), p.arch)
        training.compile_classifier(model, models.optimizer("adam", p.learning_rate))
    with atomic_dir(out_dir) as tmp, training.live_logger(tmp / LIVE_DIR) as live:
        training.fit(
            model,
            training.dataset(
                x_train,
                y_train,
                p.batch_size,
                shuffle=True,
                seed=seed,
                augment=augment.layers_for(p.augment, seed),
            ),
            training.dataset(x_val, y_val, p.batch_size),
            "baseline",
            p.epochs,
            p.patience,
            p.target_accuracy,
            live=live,
        )
        save_keras(model, tmp / MODEL_FILE)
        write_summary(model, tmp / "summary.txt")
        write_json(tmp / "training.json", {"replicas": strategy.num_replicas_in_sync})
        shutil.copy(prepared_dir / LABELS_FILE, tmp / LABELS_FILE)
    return Path(out_dir)


def run(params: Params, root: Path) -> Path:
    return fit_baseline(params.path("prepared", root), params.path("baseline", root), params)
