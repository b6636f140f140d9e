"""Pure Keras builders for the two classifiers. No I/O, no globals."""

from __future__ import annotations

import keras
from keras import layers


def baseline_cnn(image_size: int, classes: int) -> keras.Model:
    """The seed's small CNN from scratch: Conv/MaxPool (16, 32, 64) -> Dense 512 -> softmax.
    Takes RGB 0-255."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="scale")(inputs)
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{filters}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{filters}")(x)
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
