"""Pure Keras builders for the two classifiers. No I/O, no globals."""

from __future__ import annotations

import keras
from keras import layers

from headstart.params import BASELINE_ARCHS

BASELINE_WORKING_SIZE = 96  # pooled: larger images are average-pooled down to about this size


def baseline_cnn(image_size: int, classes: int, arch: str = "pooled") -> keras.Model:
    """The small CNN trained from scratch; takes RGB 0-255.

    seed: the seed's network, Conv/MaxPool (16, 32, 64) -> Flatten -> Dense 512 -> softmax. Its
    Dense layer grows with the square of the image size (3.3 M weights at 96 px, 22 M at 224).
    pooled: the same convolutions, their map average-pooled to a grid of at most 5 cells a side
    (where each class's shapes lie is kept, unlike global pooling: 0.75 against 0.80 held out on
    Fashion-MNIST), Dropout 0.3 -> Dense 128 -> softmax: 0.2 M weights at any size. Images of
    twice BASELINE_WORKING_SIZE or more are average-pooled down by a whole factor first, so its
    cost stays near the 96 px one."""
    if arch not in BASELINE_ARCHS:
        raise ValueError(f"baseline arch must be one of {', '.join(BASELINE_ARCHS)} (got {arch!r})")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="scale")(inputs)
    factor = image_size // BASELINE_WORKING_SIZE if arch == "pooled" else 1
    if factor > 1:
        x = layers.AveragePooling2D(factor, name="downsample")(x)
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{filters}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{filters}")(x)
    if arch == "pooled":
        cell = max(1, round(x.shape[1] / 4))  # the map is 2 to 5 cells a side after this
        if cell > 1:
            x = layers.AveragePooling2D(cell, name="grid")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dropout(0.3, name="dropout")(x)
        x = layers.Dense(128, activation="relu", name="dense128")(x)
    else:
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(512, activation="relu", name="dense512")(x)
    outputs = layers.Dense(classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="baseline_cnn")


def dense_head(features: int, classes: int, units: int = 1024, dropout: float = 0.2):
    """The seed's head on pooled backbone features: Dense relu -> Dropout -> softmax."""
    inputs = keras.Input((features,), name="features")
    x = layers.Dense(units, activation="relu", name="head_dense")(inputs)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")


def end_to_end(backbone: keras.Model, head: keras.Model, image_size: int) -> keras.Model:
    """Raw RGB image of any size in, class probabilities out (resized inside)."""
    inputs = keras.Input((None, None, 3), name="image")
    x = layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(inputs)
    outputs = head(backbone(x, training=False), training=False)  # Resizing would pass training=True
    return keras.Model(inputs, outputs, name="transfer")


def optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    return {
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }[name](learning_rate=learning_rate)
