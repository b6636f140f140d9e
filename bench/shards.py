"""Feature extraction: one process against shards on a local Dask cluster of 1, 2, 4 workers.

Works on a copy of a prepared set and a frozen backbone (default: this project's
artifacts/prepared and artifacts/backbone, 1,500 demo images at 96 px, Lite0), or with
`--fashion N` on the first N Fashion-MNIST TRAIN images (never the official test split)
resized to the backbone's input size, as a prepared set.

1. One process, same run: the bare backbone (`predict_on_batch`, batch 64, after one warm-up
   batch) and the feature step (`headstart.features.cache_features`: trace, augment, writes).
2. Per worker count: a LocalCluster of that many single-threaded worker processes (spawned),
   each warmed up (backbone loaded, graph traced on one batch), then the shards of
   `features.plan(..., 2 x workers)` computed by `tasks.head.extract_shard` on the workers and
   assembled here; images/s counts extraction only, assembly is shown apart. Plain Dask, no
   Prefect: a Prefect task adds about 0.1-0.3 s of API calls per shard.

    python bench/shards.py                         # demo set, workers 1 2 4
    python bench/shards.py --fashion 20000 --workers  # only the one-process comparison
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, table

sys.path.insert(0, str(ROOT / "scripts"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=ROOT / "artifacts/prepared")
    parser.add_argument("--backbone", type=Path, default=ROOT / "artifacts/backbone")
    parser.add_argument("--fashion", type=int, default=0, help="use N Fashion-MNIST train images")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def fashion_prepared(out: Path, images: int, size: int) -> Path:
    """A prepared set (80/10/10) of the first `images` Fashion-MNIST train images, RGB, size px."""
    from make_demo_data import SOURCE, read_idx
    from PIL import Image

    pixels = read_idx(SOURCE / "train-images-idx3-ubyte.gz")[:images]
    labels = read_idx(SOURCE / "train-labels-idx1-ubyte.gz")[:images].astype(np.int32)
    out.mkdir(parents=True)
    cuts = {
        "train": (0, int(0.8 * images)),
        "val": (int(0.8 * images), int(0.9 * images)),
        "test": (int(0.9 * images), images),
    }
    for split, (start, stop) in cuts.items():
        x = np.lib.format.open_memmap(
            out / f"{split}_images.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(stop - start, size, size, 3),
        )
        for row in range(start, stop):
            image = Image.fromarray(pixels[row]).convert("RGB").resize((size, size), Image.BILINEAR)
            x[row - start] = np.asarray(image)
        x.flush()
        np.save(out / f"{split}_labels.npy", labels[start:stop])
    (out / "manifest.csv").write_text(f"fashion-mnist train images 0-{images}\n")
    return out


def one_process(prepared: Path, backbone: Path, work: Path) -> dict:
    import keras

    from headstart import features, training
    from headstart.artifacts import SPLITS, load_split

    extractor = keras.saving.load_model(backbone / "backbone.keras")
    x = np.concatenate([load_split(prepared, split)[0] for split in SPLITS])
    batches = [x[i : i + 64].astype(np.float32) for i in range(0, len(x), 64)]
    extractor.predict_on_batch(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        extractor.predict_on_batch(batch)
    bare = len(x) / (time.perf_counter() - started)
    del batches
    training._COMPILED.clear()  # the feature step pays its own trace, as in a real run
    started = time.perf_counter()
    features.cache_features(
        extractor, "bench", prepared, work / "features", views=("none",), seed=0
    )
    step = len(x) / (time.perf_counter() - started)
    return {
        "images": len(x),
        "bare_images_per_s": round(bare, 1),
        "feature_step_images_per_s": round(step, 1),
        "ratio": round(step / bare, 3),
    }


def _warm(backbone: str, prepared: str) -> int:
    from headstart import features, training
    from headstart.artifacts import load_split

    extractor = features.load_backbone(Path(backbone))
    x = load_split(Path(prepared), "train")[0][:64]
    training.inference_fn(extractor)(x.astype(np.float32))
    return os.getpid()


def _shard(project: str, split: str, view: int, start: int, stop: int) -> str:
    from headstart import params as params_module
    from tasks import head

    params = params_module.load(Path(project) / "params.yaml")
    return str(head.extract_shard(params, project, split, view, start, stop))


def on_dask(project: Path, workers: int) -> dict:
    from distributed import Client, LocalCluster

    from headstart import features
    from headstart import params as params_module
    from tasks import head

    params = params_module.load(project / "params.yaml")
    prepared, backbone = params.path("prepared", project), params.path("backbone", project)
    shutil.rmtree(params.path("features", project), ignore_errors=True)
    shards = 2 * workers
    plan = features.plan(prepared, features.params_views(params), shards)
    started = time.perf_counter()
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster_s = time.perf_counter() - started
        started = time.perf_counter()
        client.run(_warm, str(backbone), str(prepared))
        warm_s = time.perf_counter() - started
        started = time.perf_counter()
        futures = [
            client.submit(_shard, str(project), s.split, s.view, s.start, s.stop, pure=False)
            for s in plan
        ]
        client.gather(futures)
        extract_s = time.perf_counter() - started
    started = time.perf_counter()
    head.assemble_features(params, project, shards)
    assemble_s = time.perf_counter() - started
    images = sum(s.stop - s.start for s in plan)
    return {
        "workers": workers,
        "shards": len(plan),
        "images": images,
        "cluster_start_s": round(cluster_s, 1),
        "warm_up_s": round(warm_s, 1),
        "extract_s": round(extract_s, 2),
        "images_per_s": round(images / extract_s, 1),
        "assemble_s": round(assemble_s, 2),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(tempfile.mkdtemp(prefix="headstart-shards-"))
    try:
        project = work / "project"
        artifacts = project / "artifacts"
        artifacts.mkdir(parents=True)
        shutil.copy(ROOT / "params.yaml", project / "params.yaml")
        shutil.copytree(args.backbone, artifacts / "backbone")
        if args.fashion:
            import keras

            size = keras.saving.load_model(args.backbone / "backbone.keras").input_shape[1]
            fashion_prepared(artifacts / "prepared", args.fashion, size)
        else:
            shutil.copytree(args.prepared, artifacts / "prepared")
        results = {
            "load_average": os.getloadavg(),
            "one_process": one_process(artifacts / "prepared", artifacts / "backbone", work),
        }
        print(json.dumps(results["one_process"]))
        results["dask"] = []
        for workers in args.workers:
            results["dask"].append(on_dask(project, workers))
            print(json.dumps(results["dask"][-1]), flush=True)
        results["load_average_after"] = os.getloadavg()
        if results["dask"]:
            print(
                table([tuple(row.values()) for row in results["dask"]], tuple(results["dask"][0]))
            )
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
