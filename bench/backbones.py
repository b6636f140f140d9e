"""Backbone costs: Lite0 conversion, backbone build+load, forward throughput.

python bench/backbones.py [--sizes 224 96] [--batch 32] [--batches 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import machine, median_time, table

from headstart.files import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per throughput timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/out/backbones.json"))
    args = parser.parse_args()

    from headstart import backbones
    from headstart.params import from_dict
    from headstart.training import inference_fn
    from tasks.weights import fetch_weights

    results = {"machine": machine(), "backbone": args.backbone, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        params = from_dict(
            {"base": {"backbone": args.backbone}, "weights": {"cache_dir": f"{tmp}/cache"}}
        )
        started = time.perf_counter()
        weights = fetch_weights(Path(tmp) / "weights", params)
        results["fetch_and_convert_s"] = round(time.perf_counter() - started, 3)
        weights_file = weights / f"{args.backbone}.weights.h5"
        backbone = backbones.get(args.backbone)
        rows = []
        for size in args.sizes:

            def build_and_load(size=size):
                base = backbone.build(size, include_top=backbone.weights.kind == "package")
                base.load_weights(str(weights_file))
                return backbones.freeze(backbones.feature_extractor(base, backbone.cut_layer))

            build_s = median_time(build_and_load, args.repeats)
            extractor = build_and_load()
            call = inference_fn(extractor)
            x = (
                np.random.default_rng(0)
                .uniform(0, 255, (args.batch, size, size, 3))
                .astype("float32")
            )
            call(x)  # trace once
            per_pass = median_time(
                lambda call=call, x=x: [call(x) for _ in range(args.batches)], args.repeats
            )
            throughput = args.batch * args.batches / per_pass
            rows.append((size, round(build_s, 2), round(throughput, 1)))
            results[f"size_{size}"] = {
                "build_and_load_s": round(build_s, 3),
                "images_per_s": round(throughput, 1),
            }
    print(f"machine: {results['machine']}")
    print(f"{args.backbone}: weights fetch + conversion {results['fetch_and_convert_s']} s")
    print(table(rows, ("size px", "build+load s", f"forward img/s (batch {args.batch})")))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
