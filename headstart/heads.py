"""Choosing and training the transfer head on cached backbone features.

Heads on cached features cost seconds, so their settings are chosen properly: each candidate
configuration is trained by k-fold cross-validation over the training features, all k folds at
once (one batched model: fold f's weights see only rows outside fold f), and scored after every
epoch on the rows it did not see. The mean held-out curve over all folds is the stopping rule:
it is pooled over every training image, not noise on a 15-image-per-class validation split.
The chosen configuration is then trained on all training features for its best epoch count and
handed over as a plain Keras model (standardisation folded in), so it saves, loads and exports
like any other.

Time: the candidates run cheapest first, and each stops early in one of three ways — `patience`
epochs without a better pooled accuracy; `loss_patience` epochs without a lower pooled loss (the
held-out loss has turned up and the accuracy curve has flattened: on the demo data every
configuration's loss bottoms out by epoch 3-6 and the accuracy gains no more than half a point
after it); or, from epoch `DROP_FROM`, its best pooled accuracy so far is clearly behind (more
than `DROP_Z` paired standard errors, image by image) the leader's best over the same epochs. A
dropped configuration is recorded with its reason and never chosen.

Memory: the training features are held once, standardised in place and handed to TensorFlow as
one tensor that every fold, the scoring and the final fit gather their rows from (N x 1280
float32: 5 KB per training image; the CV steps need them all at hand). They are read from the
memory-mapped cache in slices whose mapped pages are dropped as it goes.

The validation split is left alone here: `select` uses it to compare whole models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

from headstart.artifacts import Rows
from headstart.metrics import per_image_loss


@dataclass(frozen=True)
class HeadConfig:
    name: str
    units: int  # hidden units; 0 = linear (softmax regression)
    dropout: float
    l2: float  # L2 penalty on kernels (per weight, added to the mean loss)
    complexity: int  # for ties: the simpler (lower) wins
    learning_rate_scale: float = 1.0  # times head.learning_rate


def candidates(seed_units: int, seed_dropout: float) -> tuple[HeadConfig, ...]:
    """The configurations compared: a linear head, a small regularised one, and the seed's
    architecture (Dense `seed_units` + Dropout `seed_dropout`)."""
    return (
        # softmax regression converges in a third of the epochs at 3x the rate, same CV accuracy
        HeadConfig("linear", 0, 0.0, 1e-3, 0, learning_rate_scale=3.0),
        HeadConfig("small", 256, 0.5, 1e-4, 1),
        HeadConfig("dense", seed_units, seed_dropout, 0.0, 2),
    )


@dataclass(frozen=True)
class CvResult:
    config: HeadConfig
    accuracy: np.ndarray  # (epochs, folds) held-out accuracy after each epoch
    loss: np.ndarray  # (epochs, folds) held-out cross-entropy
    held_out: np.ndarray  # (folds,) held-out rows per fold
    hits: np.ndarray  # (epochs, images) whether each image was right, by the head not fed it
    # (epochs, images, classes) float16: each image's probabilities from the head not fed it
    out_of_fold: np.ndarray
    dropped: str = ""  # why the configuration was stopped early as clearly behind ("": it was not)

    @property
    def curve(self) -> np.ndarray:
        """Held-out accuracy per epoch, pooled over folds (weighted by fold size)."""
        return (self.accuracy * self.held_out).sum(axis=1) / self.held_out.sum()

    @property
    def pooled_loss(self) -> np.ndarray:
        """Held-out cross-entropy per epoch, pooled over folds."""
        return (self.loss * self.held_out).sum(axis=1) / self.held_out.sum()

    @property
    def best_epochs(self) -> int:
        """The epoch count with the best pooled accuracy, smoothed over neighbours; among tied
        epochs (small data: often every one at 1.000) the one with the lowest pooled loss, not
        the earliest, which is a head a step or two away from its random start."""
        curve = self.curve
        smooth = np.convolve(np.pad(curve, 1, mode="edge"), np.ones(3) / 3, mode="valid")
        tied = np.flatnonzero(smooth >= smooth.max() - 1e-9)
        return int(tied[np.argmin(self.pooled_loss[tied])]) + 1

    @property
    def best_loss(self) -> float:
        return float(self.pooled_loss[self.best_epochs - 1])

    @property
    def score(self) -> float:
        return float(self.curve[self.best_epochs - 1])

    @property
    def best_hits(self) -> np.ndarray:
        return self.hits[self.best_epochs - 1]

    @property
    def best_out_of_fold(self) -> np.ndarray:
        """(images, classes) out-of-fold probabilities at the chosen epoch count: what the
        data doctor's label check reads (headstart/doctor.py)."""
        return self.out_of_fold[self.best_epochs - 1].astype(np.float32)

    def record(self) -> dict:
        return {
            **asdict(self.config),
            "cv_accuracy": round(self.score, 6),
            "cv_loss": round(self.best_loss, 6),
            "best_epochs": self.best_epochs,
            "epochs_run": len(self.curve),
            "dropped": self.dropped or None,
            "curve": [round(float(v), 6) for v in self.curve],
        }


DROP_FROM = 3  # the first epoch at which a configuration may be dropped as clearly behind
DROP_Z = 3.0  # "clearly": paired standard errors (checked after every epoch, hence not 2)


def behind(leader: CvResult, hits: np.ndarray) -> str:
    """Why a configuration whose held-out hits so far are `hits` (epochs, images) is clearly
    behind `leader`, or "" if it is not: its best pooled accuracy over these epochs is lower
    than the leader's best over the same epochs by more than DROP_Z paired standard errors (the
    per-image difference of being right, both scored on the same out-of-fold images)."""
    epochs = len(hits)
    if epochs < DROP_FROM:
        return ""
    lead = leader.hits[: min(epochs, len(leader.hits))]
    difference = (
        lead[np.argmax(lead.mean(axis=1))].astype(np.float64) - hits[np.argmax(hits.mean(axis=1))]
    )
    gap = difference.mean()
    error = difference.std(ddof=1) / math.sqrt(len(difference)) if len(difference) > 1 else 0.0
    if gap <= 0 or gap <= DROP_Z * error:
        return ""
    return (
        f"dropped after {epochs} epochs: best pooled CV accuracy {lead.mean(axis=1).max():.4f} "
        f"for {leader.config.name} vs {hits.mean(axis=1).max():.4f}, "
        f"{gap / max(error, 1e-12):.1f} paired standard errors behind"
    )


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per row, stratified: each class's rows are shuffled and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        fold[rows] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return fold


class _BatchedHeads:
    """`count` independent heads of one configuration, trained together with Adam.

    Every weight has a leading head axis and each head gets a batch of its own rows, so one
    batched matrix product serves all heads and no head computes rows it must not learn from.
    The compiled step and scorer are traced once per shape and reused (see `_heads_for`)."""

    def __init__(self, config: HeadConfig, features: int, classes: int, count: int):
        width = config.units or classes
        shapes = [(count, features, width), *([(count, width, classes)] if config.units else [])]
        self.config, self.count = config, count
        self.kernels = [tf.Variable(tf.zeros(shape)) for shape in shapes]
        self.biases = [tf.Variable(tf.zeros((count, 1, shape[2]))) for shape in shapes]
        self.variables = [*self.kernels, *self.biases]
        self.moments = [
            (tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in self.variables
        ]
        self.steps = tf.Variable(0.0)
        self.dropout_seed = tf.Variable(0, dtype=tf.int64)
        rows = tf.TensorSpec((None, features), tf.float32)
        self.step = tf.function(
            self.train_step,
            input_signature=[
                rows,
                tf.TensorSpec((None,), tf.int32),
                tf.TensorSpec((None,), tf.float32),
                tf.TensorSpec((count, None), tf.int32),
                tf.TensorSpec((), tf.float32),
            ],
        )
        self.probabilities = tf.function(
            lambda x, head: tf.nn.softmax(self.head_logits(x, head)),
            input_signature=[rows, tf.TensorSpec((), tf.int32)],
        )

    def reset(self, seed: int) -> None:
        """Fresh Glorot-uniform kernels from `seed`, zero biases and optimizer state."""
        rng = np.random.default_rng(seed)
        for kernel in self.kernels:
            _, fan_in, fan_out = kernel.shape
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            kernel.assign(rng.uniform(-limit, limit, kernel.shape).astype(np.float32))
        for variable in [*self.biases, *(m for pair in self.moments for m in pair)]:
            variable.assign(tf.zeros_like(variable))
        self.steps.assign(0.0)
        self.dropout_seed.assign(seed)

    def logits(self, x: tf.Tensor, training: bool, step: tf.Tensor | None = None) -> tf.Tensor:
        """(count, batch, classes) from each head's own rows (count, batch, features)."""
        first = tf.matmul(x, self.kernels[0]) + self.biases[0]
        if not self.config.units:
            return first
        hidden = tf.nn.relu(first)
        if training and self.config.dropout > 0:
            keep = 1.0 - self.config.dropout
            seed = tf.stack([self.dropout_seed, tf.cast(step, tf.int64)])
            noise = tf.random.stateless_uniform(tf.shape(hidden), seed=seed)
            hidden = tf.where(noise < keep, hidden / keep, 0.0)
        return tf.matmul(hidden, self.kernels[1]) + self.biases[1]

    def head_logits(self, x: tf.Tensor, head: tf.Tensor) -> tf.Tensor:
        """(batch, classes): one head's inference on (batch, features)."""
        first = tf.matmul(x, self.kernels[0][head]) + self.biases[0][head]
        if not self.config.units:
            return first
        return tf.matmul(tf.nn.relu(first), self.kernels[1][head]) + self.biases[1][head]

    def weights_of(self, head: int) -> list[np.ndarray]:
        """Head `head`'s weights in Keras order (kernel, bias per Dense layer)."""
        return [
            w
            for k, b in zip(self.kernels, self.biases, strict=True)
            for w in (k.numpy()[head], b.numpy()[head, 0])
        ]

    def train_step(self, x_all, y_all, w_all, index, learning_rate):
        """One Adam step; head h learns from rows index[h] of x_all (labels y_all, weights w_all)."""
        x, y, weight = tf.gather(x_all, index), tf.gather(y_all, index), tf.gather(w_all, index)
        self.steps.assign_add(1.0)
        with tf.GradientTape() as tape:
            logits = self.logits(x, training=True, step=tf.cast(self.steps, tf.int32))
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            total = tf.reduce_sum(losses * weight, axis=1) / tf.maximum(
                tf.reduce_sum(weight, axis=1), 1e-7
            )
            loss = tf.reduce_sum(total)
            if self.config.l2:
                loss += self.config.l2 * tf.add_n([tf.reduce_sum(k * k) for k in self.kernels])
        gradients = tape.gradient(loss, self.variables)
        # Adam as one fused kernel per variable: the same update as the textbook formula
        # (bias-corrected rate), but the dense head's 4 M weights per fold are read and written
        # once per step instead of once per elementwise op (half of its step time before).
        b1, b2 = tf.constant(0.9), tf.constant(0.999)
        powers = b1**self.steps, b2**self.steps
        for variable, gradient, (m, v) in zip(self.variables, gradients, self.moments, strict=True):
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle,
                m=m.handle,
                v=v.handle,
                beta1_power=powers[0],
                beta2_power=powers[1],
                lr=learning_rate,
                beta1=b1,
                beta2=b2,
                epsilon=tf.constant(1e-7),
                grad=gradient,
            )


READ_ROWS = 2048  # feature rows copied at a time from the (memory-mapped) cache
VARIANCE_COLUMNS = 64  # np.var's temporary, a block of columns at a time (the same values)


def _aligned_empty(shape: tuple[int, int], alignment: int = 64) -> np.ndarray:
    """An uninitialised float32 array whose data starts on an `alignment`-byte boundary, as
    TensorFlow needs to use a NumPy array's memory as a tensor's (DLPack) without copying."""
    size = shape[0] * shape[1] * 4
    buffer = np.empty(size + alignment, np.uint8)
    offset = -buffer.ctypes.data % alignment
    return buffer[offset : offset + size].view(np.float32).reshape(shape)


def _standardise(features: np.ndarray) -> tuple[tf.Tensor, np.ndarray, np.ndarray]:
    """(standardised rows as one float32 tensor, mean, variance), as keras Normalization
    computes them. One float32 copy of the features, scaled in place; the tensor shares its
    memory (tf.constant would copy it, twice over for a moment).

    The variance is floored at the mean variance of all features: a feature that is (nearly)
    constant on a few dozen training images would otherwise be scaled up by orders of magnitude
    and swamp every other feature on a new image where it is not (held-out accuracy 0.83 vs a
    nearest-centroid 0.94 on 3 classes x 40 images), while the CV's rows, standardised with
    their own statistics, never show it (bench/RESULTS.md)."""
    reader = Rows(features, np.float32)
    x = _aligned_empty((len(reader), np.shape(features)[1]))
    for start in range(0, len(x), READ_ROWS):
        x[start : start + READ_ROWS] = reader[start : start + READ_ROWS]
    mean = x.mean(axis=0)
    variance = np.concatenate(
        [x[:, j : j + VARIANCE_COLUMNS].var(axis=0) for j in range(0, x.shape[1], VARIANCE_COLUMNS)]
    )
    variance = np.maximum(variance, max(float(np.mean(variance)), 1e-14))
    x -= mean
    x /= np.sqrt(variance)
    return tf.experimental.dlpack.from_dlpack(x.__dlpack__()), mean, variance


def _epoch_order(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """(heads, rows) one shuffled pass over each head's rows; a head with fewer rows than the
    largest repeats a few of its own, so all heads step together."""
    length = max(len(rows) for rows in members)
    order = []
    for rows in members:
        shuffled = rng.permutation(rows)
        order.append(np.resize(shuffled, length))  # np.resize repeats from the start
    return np.stack(order).astype(np.int32)


_TRAINERS: dict[tuple, _BatchedHeads] = {}


def _heads_for(
    config: HeadConfig, features: int, classes: int, count: int, seed: int
) -> _BatchedHeads:
    """Heads of this configuration and shape, freshly initialised from `seed`. Made once per
    process: tracing the step costs about a second, more than training on a thousand rows, and
    the head step trains up to seven sets of heads (three CVs, the final fit, the curve)."""
    key = (config, features, classes, count)
    if key not in _TRAINERS:
        _TRAINERS[key] = _BatchedHeads(config, features, classes, count)
    _TRAINERS[key].reset(seed)
    return _TRAINERS[key]


def _train(
    config: HeadConfig,
    x: tf.Tensor,
    y: np.ndarray,
    members: list[np.ndarray],
    sample_weight: np.ndarray | None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    classes: int,
    after_epoch=None,
) -> _BatchedHeads:
    """Train one head per entry of `members` (the rows it learns from); `after_epoch(epoch,
    heads)` may return True to stop early."""
    heads = _heads_for(config, x.shape[1], classes, len(members), seed)
    rate = tf.constant(learning_rate * config.learning_rate_scale, tf.float32)
    x_all, y_all = tf.convert_to_tensor(x), tf.constant(y.astype(np.int32))
    w_all = tf.constant(
        np.ones(len(y), np.float32)
        if sample_weight is None
        else np.asarray(sample_weight, np.float32)
    )
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = _epoch_order(members, rng)
        for start in range(0, order.shape[1], batch_size):
            heads.step(x_all, y_all, w_all, tf.constant(order[:, start : start + batch_size]), rate)
        if after_epoch is not None and after_epoch(epoch, heads):
            break
    return heads


def cross_validate(
    config: HeadConfig,
    features: np.ndarray,
    labels: np.ndarray,
    images: int,
    folds: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    classes: int,
    patience: int,
    sample_weight=None,
    loss_patience: int = 0,
    leader: CvResult | None = None,
) -> CvResult:
    """k-fold CV of one configuration. Rows may hold several views per image (row r shows image
    r % images): all views of an image share its fold, and only first views are scored.
    Stops once the pooled held-out accuracy has not improved for `patience` epochs, or (when
    `loss_patience` > 0) the pooled held-out loss has not for `loss_patience` epochs, or (when
    a `leader` is given: the best configuration run so far) as soon as this one is clearly
    behind it (`behind`); the result then says why (`dropped`)."""
    x, _, _ = _standardise(features)
    labels = np.asarray(labels)
    fold = fold_assignment(labels[:images], folds, seed)
    row_fold = fold[np.arange(len(labels)) % images]
    members = [np.flatnonzero(row_fold != f) for f in range(folds)]
    held_out = np.bincount(fold, minlength=folds)
    rows = [np.flatnonzero(fold == f) for f in range(folds)]
    accuracy, loss, image_hits, out_of_fold = [], [], [], []
    dropped = []

    def after_epoch(epoch: int, heads: _BatchedHeads) -> bool:
        hits, nlls = np.zeros(folds), np.zeros(folds)
        right = np.zeros(images, dtype=bool)
        unseen = np.zeros((images, classes), np.float16)
        for f, r in enumerate(rows):  # each fold by the head that did not see it
            y_f = labels[r]
            probabilities = heads.probabilities(tf.gather(x, r), tf.constant(f)).numpy()
            unseen[r] = probabilities
            right[r] = probabilities.argmax(axis=1) == y_f
            hits[f] = np.sum(right[r])
            nlls[f] = np.sum(per_image_loss(probabilities, y_f))
        image_hits.append(right)
        out_of_fold.append(unseen)
        accuracy.append(hits / np.maximum(held_out, 1))
        loss.append(nlls / np.maximum(held_out, 1))
        pooled = [float((a * held_out).sum() / held_out.sum()) for a in accuracy]
        if epoch + 1 - (int(np.argmax(pooled)) + 1) >= patience:
            return True
        pooled_loss = [float((n * held_out).sum() / held_out.sum()) for n in loss]
        if loss_patience and epoch - int(np.argmin(pooled_loss)) >= loss_patience:
            return True
        if leader is not None and (why := behind(leader, np.array(image_hits))):
            dropped.append(why)
            return True
        return False

    _train(
        config,
        x,
        labels,
        members,
        sample_weight,
        epochs,
        batch_size,
        learning_rate,
        seed,
        classes,
        after_epoch,
    )
    return CvResult(
        config,
        np.array(accuracy),
        np.array(loss),
        held_out.astype(np.float64),
        np.array(image_hits),
        np.array(out_of_fold),
        "".join(dropped),
    )


def choose(results: list[CvResult]) -> tuple[CvResult, str]:
    """The configuration with the highest pooled CV accuracy (an exact tie: the lower pooled CV
    loss, then the simpler); configurations dropped early as clearly behind are not chosen.

    No one-standard-error rule here, unlike `select`: pooled over every training image the CV
    ranking held on held-out data, and the rule kept picking the linear head, 2-4 points below
    the dense one on held-out Fashion-MNIST images (bench/RESULTS.md)."""
    finished = [r for r in results if not r.dropped]
    best = max(finished, key=lambda r: (r.score, -r.best_loss, -r.config.complexity))
    others = ", ".join(
        f"{r.config.name} {r.score:.4f}{' (dropped early)' * bool(r.dropped)}"
        for r in results
        if r is not best
    )
    return best, f"{best.config.name}: highest pooled CV accuracy ({best.score:.4f}; {others})"


def fit_final(
    config: HeadConfig,
    features: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    classes: int,
    sample_weight=None,
):
    """Train the chosen configuration on all rows; return (Keras head, per-epoch history)."""
    x_all, mean, variance = _standardise(features)
    labels = np.asarray(labels)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}

    def after_epoch(epoch: int, heads: _BatchedHeads) -> bool:
        probabilities = heads.probabilities(x_all, tf.constant(0)).numpy()
        history["loss"].append(float(per_image_loss(probabilities, labels).mean()))
        history["accuracy"].append(float((probabilities.argmax(axis=1) == labels).mean()))
        return False

    heads = _train(
        config,
        x_all,
        labels,
        [np.arange(len(labels))],
        sample_weight,
        epochs,
        batch_size,
        learning_rate,
        seed,
        classes,
        after_epoch,
    )
    model = keras_head(config, x_all.shape[1], classes, mean, variance)
    model.set_weights(heads.weights_of(0))
    return model, history


def keras_head(config: HeadConfig, features: int, classes: int, mean=None, variance=None):
    """The head as a Keras model: standardisation -> [Dense relu -> Dropout] -> softmax."""
    import keras
    from keras import layers

    inputs = keras.Input((features,), name="features")
    x = layers.Normalization(mean=mean, variance=variance, name="standardise")(inputs)
    if config.units:
        x = layers.Dense(config.units, activation="relu", name="head_dense")(x)
        x = layers.Dropout(config.dropout, name="head_dropout")(x)
    outputs = layers.Dense(classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")
