"""freeze: weights -> artifacts/backbone/ (frozen feature extractor, cut and pooled, + summary)."""

from __future__ import annotations

import logging
from pathlib import Path

from headstart.artifacts import BACKBONE_FILE, WEIGHTS_RECORD, image_size, weights_file_name
from headstart.errors import UserError
from headstart.files import atomic_dir, read_json, save_keras, write_json, write_summary
from headstart.params import Params

log = logging.getLogger("headstart.freeze")


def frozen_backbone(weights_dir: Path | str, params: Params, image_size: int):
    """Build the configured backbone at `image_size`, load its weights, cut, freeze."""
    from headstart import backbones

    backbone = backbones.get(params.base.backbone)
    weights_dir = Path(weights_dir)
    record = weights_dir / WEIGHTS_RECORD
    if not record.exists() or read_json(record)["backbone"] != backbone.name:
        raise UserError(
            f"{weights_dir}: no weights for {backbone.name}; run `headstart step weights`"
        )
    base = backbone.build(image_size, include_top=read_json(record)["includes_top"])
    base.load_weights(str(weights_dir / weights_file_name(backbone.name)))
    cut = params.freeze.cut_layer or backbone.cut_layer
    return backbones.freeze(backbones.feature_extractor(base, cut)), cut


def freeze_backbone(
    weights_dir: Path | str, out_dir: Path | str, params: Params, image_size: int
) -> Path:
    model, cut = frozen_backbone(weights_dir, params, image_size)
    with atomic_dir(out_dir) as tmp:
        save_keras(model, tmp / BACKBONE_FILE)
        write_summary(model, tmp / "summary.txt")
        write_json(
            tmp / "backbone.json",
            {
                "backbone": params.base.backbone,
                "cut_layer": cut,
                "image_size": image_size,
                "features": int(model.output.shape[-1]),
                "trainable_weights": len(model.trainable_weights),
                "batchnorm_layers_trainable": sum(
                    1
                    for layer in model.layers
                    if type(layer).__name__ == "BatchNormalization" and layer.trainable
                ),
            },
        )
    log.info("freeze: %s cut at %s, %d features", params.base.backbone, cut, model.output.shape[-1])
    return Path(out_dir)


def run(params: Params, root: Path) -> Path:
    return freeze_backbone(
        params.path("weights", root),
        params.path("backbone", root),
        params,
        image_size(params.path("prepared", root)),
    )
