"""Fine-tuning's cost per training image per epoch (the figure `headstart/sizing.py` estimates
`finetune.enabled: auto` from): the end-to-end transfer model with the top `--blocks` blocks
unfrozen (BatchNormalization frozen), trained with `fit` as the head step does, on random images.

python bench/finetune.py [--sizes 96 224] [--blocks 2] [--images 320] [--epochs 3]

The first epoch traces the graph; the later ones are timed. Weights do not change the cost, so
the backbone is built without loading any.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import machine, table

from headstart.files import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=3, help="the first one is not timed")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/out/finetune.json"))
    args = parser.parse_args()

    import keras

    from headstart import backbones, models, training

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    backbone = backbones.get(args.backbone)
    results = {"machine": machine(), "backbone": args.backbone, "batch": args.batch, "runs": []}
    rows = []
    rng = np.random.default_rng(0)
    for size in args.sizes:
        x = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
        y = rng.integers(0, 10, args.images)
        for blocks in args.blocks:
            keras.utils.set_random_seed(0)
            base = backbone.build(size, include_top=backbone.weights.kind == "package")
            extractor = backbones.freeze(backbones.feature_extractor(base, backbone.cut_layer))
            head = models.dense_head(extractor.output_shape[-1], 10, 256, 0.2)
            model = models.end_to_end(extractor, head, size)
            backbones.unfreeze_top(extractor, backbone, blocks)
            training.compile_classifier(model, models.optimizer("adam", 1e-5))
            timer = EpochTimes()
            timer.seconds = []
            model.fit(
                training.dataset(x, y, args.batch, shuffle=True),
                epochs=args.epochs,
                verbose=0,
                callbacks=[timer],
                shuffle=False,
            )
            per_image = statistics.median(timer.seconds[1:]) / args.images
            first = timer.seconds[0] / args.images
            rows.append((size, blocks, f"{per_image * 1000:.2f}", f"{first * 1000:.2f}"))
            results["runs"].append(
                {
                    "size": size,
                    "blocks": blocks,
                    "seconds_per_image_epoch": round(per_image, 5),
                    "first_epoch_seconds_per_image": round(first, 5),
                    "epoch_seconds": [round(s, 2) for s in timer.seconds],
                }
            )
            keras.backend.clear_session()
    print(f"machine: {results['machine']}")
    print(f"{args.backbone}, {args.images} images, batch {args.batch}:")
    print(table(rows, ("size px", "blocks", "ms per image-epoch", "first epoch (tracing)")))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
