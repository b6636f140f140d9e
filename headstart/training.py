"""Shared training machinery: streamed datasets, callbacks, one `fit` for every model."""

from __future__ import annotations

import functools
import logging
import warnings
import weakref
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from headstart.artifacts import Rows
from headstart.files import write_json
from headstart.progress import progress

log = logging.getLogger("headstart.training")


IN_MEMORY_LIMIT = 64 * 2**20  # arrays up to this size are batched from memory


def dataset(
    x, y, batch_size: int, shuffle: bool = False, seed: int = 0, augment: list | None = None
) -> tf.data.Dataset:
    """Batches of (float32 inputs, int labels) from arrays (memory-mapped is fine).

    Arrays up to IN_MEMORY_LIMIT are read once and batched inside TensorFlow (fast for small
    ones); larger ones are streamed from disk one batch at a time with their mapped pages
    dropped as they go (`Rows`), so memory does not grow with the data set. Shuffling is seeded
    and differs per epoch. Autotune is off: with it on, a third of epochs ran on one core on
    these machines.
    """
    n = len(x)
    label_dtype = tf.as_dtype(np.asarray(y[:1]).dtype)
    if x.nbytes <= IN_MEMORY_LIMIT:
        data = tf.data.Dataset.from_tensor_slices((np.asarray(x), np.asarray(y)))
        if shuffle:
            data = data.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        data = data.batch(batch_size)
    else:
        epoch = [0]
        rows = Rows(x)

        def batches():
            order = np.arange(n)
            if shuffle:
                np.random.default_rng(seed + epoch[0]).shuffle(order)
                epoch[0] += 1
            for start in range(0, n, batch_size):
                index = np.sort(order[start : start + batch_size])
                yield rows[index], np.asarray(y[index])

        signature = (
            tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
            tf.TensorSpec((None,), label_dtype),
        )
        data = tf.data.Dataset.from_generator(batches, output_signature=signature)
        data = data.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
    data = data.map(lambda a, b: (tf.cast(a, tf.float32), b))
    for layer in augment or []:  # Keras preprocessing layers, random in each batch and epoch
        data = data.map(lambda a, b, layer=layer: (layer(a, training=True), b))
    options = tf.data.Options()
    options.autotune.enabled = False
    return data.prefetch(2).with_options(options)


@functools.cache  # one per process: two MirroredStrategy objects reuse collective keys and clash
def strategy(devices: str = "auto") -> tf.distribute.Strategy:
    """Where a model trains: `tf.distribute.MirroredStrategy` over every GPU when there are
    several (or over the CPU's logical devices when it has been split into several, as the tests
    do), else TensorFlow's default (one device). `devices` "1" (base.devices) forces one device.

    Build, load and compile the model inside `strategy.scope()`; Keras's `fit` then splits each
    batch (the global batch size) across the replicas and averages their gradients."""
    found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if devices == "1" or len(found) < 2:
        return tf.distribute.get_strategy()
    chosen = tf.distribute.MirroredStrategy([device.name for device in found])
    log.info(
        "training on %d devices (MirroredStrategy): %s",
        chosen.num_replicas_in_sync,
        ", ".join(device.name for device in found),
    )
    return chosen


class TargetAccuracy(keras.callbacks.Callback):
    """The seed's callback: stop training once training accuracy reaches `target`."""

    def __init__(self, target: float):
        super().__init__()
        self.target = target
        self.reached_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        if (logs or {}).get("accuracy", 0.0) >= self.target:
            self.reached_at = epoch
            log.info(
                "accuracy %.3f reached the target %.3f: stopping", logs["accuracy"], self.target
            )
            self.model.stop_training = True


class NonFiniteLoss(keras.callbacks.Callback):
    """Stop with one clear line when the loss becomes NaN or infinite (a model trained to NaN
    would otherwise be saved and reported as if it were fine)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            from headstart.errors import UserError

            raise UserError(
                f"{self.name}: the training loss became {loss} in epoch {epoch + 1}; lower "
                f"{self.name}.learning_rate (or check the data)"
            )


class _ProgressLog(keras.callbacks.Callback):
    """One log line per epoch, and the epoch count on the progress display (a bar on a
    terminal: headstart/progress.py)."""

    def __init__(self, name: str, epochs: int, shown):
        super().__init__()
        self.name, self.epochs, self.shown = name, epochs, shown

    def on_epoch_end(self, epoch, logs=None):
        self.shown.advance()
        logs = logs or {}
        log.info(
            "%s: epoch %d/%d loss %.4f acc %.4f val_loss %.4f val_acc %.4f",
            self.name,
            epoch + 1,
            self.epochs,
            logs.get("loss", np.nan),
            logs.get("accuracy", np.nan),
            logs.get("val_loss", np.nan),
            logs.get("val_accuracy", np.nan),
        )


def fit(
    model: keras.Model,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    name: str,
    epochs: int,
    patience: int,
    target_accuracy: float,
    class_weight: dict[int, float] | None = None,
    live=None,
) -> dict[str, list[float]]:
    """Train with early stopping (the best epoch's weights restored when training ends, however
    it ends: no checkpoint file is written) and the target-accuracy stop; with `live` (see
    `live_logger`), each epoch's values are logged to DVCLive as `<name>/train/...` and
    `<name>/eval/...` as the epoch ends."""
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=max(patience, 1), restore_best_weights=True
        ),
        TargetAccuracy(target_accuracy),
        NonFiniteLoss(name),
    ]
    if live is not None:
        callbacks.append(_LiveLog(live, name))
    with progress(epochs, f"{name} (training)", log, unit="epochs") as shown:
        history = model.fit(
            train,
            validation_data=val,
            epochs=epochs,
            verbose=0,
            class_weight=class_weight,
            callbacks=[*callbacks, _ProgressLog(name, epochs, shown)],
            shuffle=False,
        )
    return history.history


class LiveLog:
    """Per-epoch and summary values in DVCLive's file layout, written directly under one folder:
    `plots/metrics/<name>.tsv` (columns step and the name's last part) for each plotted value,
    and `metrics.json` with the latest of every value, nested by the parts of its name, and the
    step. dvc.yaml lists these files, so `dvc plots`, `dvc metrics` and `dvc exp show` read them
    as DVCLive's; nothing else is written, no repository is opened and nothing is sent anywhere
    (DVCLive's own `Live` runs `dvc init` in a Git repository without DVC and can post to DVC
    Studio: it needed three private methods overridden, so an exact pin)."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.step = 0
        self._latest: dict[str, Any] = {}
        self._unsaved = False

    def __enter__(self) -> LiveLog:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._unsaved:
            self._save()

    def log_metric(self, name: str, value, plot: bool = True) -> None:
        node = self._latest
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self._unsaved = True
        if plot:
            path = self.directory / "plots" / "metrics" / f"{name}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            with open(path, "a", encoding="utf-8") as handle:
                handle.write((f"step\t{leaf}\n" if new else "") + f"{self.step}\t{value}\n")

    def next_step(self) -> None:
        """The values logged so far belong to this step: save them, then count the next."""
        self._save()
        self.step += 1

    def _save(self) -> None:
        write_json(self.directory / "metrics.json", {**self._latest, "step": self.step})
        self._unsaved = False


def live_logger(directory: Path | str) -> LiveLog:
    """Where a training step logs its per-epoch and summary values (see `LiveLog`); use it as a
    context manager: the files are final when it exits."""
    return LiveLog(directory)


def live_name(name: str, key: str) -> str:
    """DVCLive's name for one of a Keras history's keys: `<name>/train/accuracy` for `accuracy`,
    `<name>/eval/accuracy` for `val_accuracy` (the split names DVCLive's own Keras logger uses)."""
    return f"{name}/eval/{key[4:]}" if key.startswith("val_") else f"{name}/train/{key}"


def log_history(live, name: str, history: dict[str, list[float]]) -> None:
    """Log a finished per-epoch history (Keras-style keys) to DVCLive, one step per epoch."""
    for epoch in range(len(history.get("loss", []))):
        for key, values in history.items():
            live.log_metric(live_name(name, key), float(values[epoch]))
        live.next_step()


class _LiveLog(keras.callbacks.Callback):
    def __init__(self, live, name: str):
        super().__init__()
        self.live, self.name = live, name

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.live.log_metric(live_name(self.name, key), float(value))
        self.live.next_step()


def compile_classifier(model: keras.Model, optimizer, steps_per_execution: int = 1):
    """Sparse categorical cross-entropy + accuracy. A small model (the head) trains much faster
    with several batches per compiled call (`steps_per_execution`); callbacks here are per epoch."""
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def balanced_class_weight(labels: np.ndarray, classes: int) -> dict[int, float]:
    counts = np.bincount(labels, minlength=classes).astype(float)
    counts[counts == 0] = 1.0
    return {i: float(len(labels) / (classes * counts[i])) for i in range(classes)}


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_fn(model: keras.Model):
    """The model's inference call as one compiled graph (eager calls run op by op: slow),
    made once per model and reused (each new graph costs a trace).

    Models loaded from .keras record their input as a one-element list; Keras then warns on
    every call with a plain tensor, which is harmless, so the warning is silenced here.
    """
    if model not in _COMPILED:
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        function = tf.function(lambda batch: model(batch, training=False), input_signature=[spec])
        with warnings.catch_warnings():  # Keras warns while tracing only: trace it here, once
            warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
            function.get_concrete_function()
        _COMPILED[model] = function
    return _COMPILED[model]


def predict_batches(model: keras.Model, x, batch_size: int = 64, transform=None):
    """Yield (start row, outputs) for `x` (memory-mapped is fine), one compiled batch at a time."""
    call = inference_fn(model)
    rows = Rows(x, np.float32)
    for start in range(0, len(x), batch_size):
        batch = rows[start : start + batch_size]
        if transform is not None:
            batch = transform(batch)
        yield start, np.asarray(call(batch))


def predict(model: keras.Model, x, batch_size: int = 64) -> np.ndarray:
    out = [outputs for _, outputs in predict_batches(model, x, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, *model.output_shape[1:]), np.float32)
