"""Map an EfficientNet-Lite PyTorch state dict onto our Keras builder, tensor by tensor."""

from __future__ import annotations

import numpy as np

from headstart.errors import UserError

# Counters, not weights: the only source entries deliberately left unused.
_UNUSED_SUFFIXES = (".num_batches_tracked",)


def _lite_layer_sources(blocks: int) -> dict[str, str]:
    """Keras layer name -> PyTorch module prefix, for a Lite model with `blocks` blocks."""
    mapping = {
        "stem_conv": "_conv_stem",
        "stem_bn": "_bn0",
        "top_conv": "_conv_head",
        "top_bn": "_bn1",
        "predictions": "_fc",
    }
    for i in range(blocks):
        k, t = f"block{i:02d}", f"_blocks.{i}"
        mapping.update(
            {
                f"{k}_expand_conv": f"{t}._expand_conv",
                f"{k}_expand_bn": f"{t}._bn0",
                f"{k}_dwconv": f"{t}._depthwise_conv",
                f"{k}_dw_bn": f"{t}._bn1",
                f"{k}_project_conv": f"{t}._project_conv",
                f"{k}_project_bn": f"{t}._bn2",
            }
        )
    return mapping


def _source_arrays(layer, prefix: str, state: dict[str, np.ndarray]) -> tuple[list, list[str]]:
    kind = type(layer).__name__
    if kind == "BatchNormalization":
        names = ["weight", "bias", "running_mean", "running_var"]
        keys = [f"{prefix}.{n}" for n in names]
        return [state[k] for k in keys], keys
    if kind == "DepthwiseConv2D":  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
        key = f"{prefix}.weight"
        return [state[key].transpose(2, 3, 0, 1)], [key]
    if kind == "Conv2D":  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        key = f"{prefix}.weight"
        return [state[key].transpose(2, 3, 1, 0)], [key]
    if kind == "Dense":  # torch (out, in) -> keras (in, out)
        keys = [f"{prefix}.weight", f"{prefix}.bias"]
        return [state[keys[0]].T, state[keys[1]]], keys
    raise UserError(f"no conversion rule for layer {layer.name} ({kind})")


def load_lite_state(model, state: dict[str, np.ndarray]) -> None:
    """Assign every weight of the EfficientNet-Lite `model` exactly once from `state`, using
    every source tensor.

    Raises UserError on a missing tensor, a shape mismatch, or an unused tensor.
    """
    what = f"{model.name} conversion"
    blocks = sum(1 for layer in model.layers if layer.name.endswith("_dwconv"))
    sources = _lite_layer_sources(blocks)
    used: set[str] = set()
    assigned = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in sources:
            raise UserError(f"{what}: Keras layer {layer.name} has no source tensors")
        try:
            arrays, keys = _source_arrays(layer, sources[layer.name], state)
        except KeyError as err:
            raise UserError(f"{what}: source tensor {err} missing") from None
        current = layer.get_weights()
        if len(arrays) != len(current):
            raise UserError(
                f"{what}: {layer.name} has {len(current)} weights, source gives {len(arrays)}"
            )
        for key, array, target in zip(keys, arrays, current, strict=True):
            if array.shape != target.shape:
                raise UserError(
                    f"{what}: {key} has shape {array.shape}, {layer.name} needs {target.shape}"
                )
            if key in used:
                raise UserError(f"{what}: {key} used twice")
            used.add(key)
        layer.set_weights([a.astype(np.float32) for a in arrays])
        assigned += len(arrays)
    leftover = sorted(k for k in state if k not in used and not k.endswith(_UNUSED_SUFFIXES))
    if leftover:
        raise UserError(f"{what}: {len(leftover)} source tensors unused, e.g. {leftover[0]}")
    if assigned != len(model.weights):
        raise UserError(f"{what}: assigned {assigned} of {len(model.weights)} weights")
