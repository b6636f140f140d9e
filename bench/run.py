"""headstart benchmark: the head step against the hardware floor and the standard Keras recipe.

Measured on the same data, the same machine, in one run:
  floor      bare frozen-backbone forward pass over the images the head step processes (img/s)
  recipe     Keras transfer-learning guide: frozen base inside one model, `model.fit` on a tf.data
             image pipeline for E epochs (the backbone runs every epoch)
  headstart  the head step (feature cache + head training + end-to-end model) for the same E
  scaling    the head step as a command at N, 2N, 4N training images (--quick: N only): time, memory
  startup    `headstart --help`, and a no-op `headstart run` (everything up to date)
  pipeline   every step of the demo pipeline as a command (time, peak memory), test metrics,
             `headstart run` fresh / no-op, and `dvc repro` after changing head.epochs

    python bench/run.py                 # full run on the demo data (several minutes)
    python bench/run.py --quick         # small sizes, a few minutes at most
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import ROOT, add_overrides, machine, median_time, run_child, table

from headstart.files import timings_path, write_json

SECTIONS = ("floor", "recipe", "headstart", "scaling", "startup", "pipeline")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI-friendly)")
    parser.add_argument("--images", type=int, help="N training images (default: all demo train)")
    parser.add_argument("--epochs", type=int, help="E epochs for recipe and head (default 20)")
    parser.add_argument("--size", type=int, help="image size (default: base.image_size auto)")
    parser.add_argument("--repeats", type=int, help="repeats for short timings (median)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="default: all")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="image folder")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "results.json")
    add_overrides(parser, always="head.epochs=E, head.patience=E, head.target_accuracy=0.9999")
    args = parser.parse_args(argv)
    quick = args.quick
    args.epochs = args.epochs or (3 if quick else 20)
    args.repeats = args.repeats or (1 if quick else 3)
    args.images = args.images or (64 if quick else None)
    args.sections = args.sections or [s for s in SECTIONS if not (quick and s == "pipeline")]
    return args


# --- data -----------------------------------------------------------------------------------


def base_params(size: int | str, epochs: int, backbone_cache: Path, overrides=()):
    from headstart import paramfile
    from headstart import params as params_module

    raw = paramfile.read_raw(ROOT / "params.yaml")
    raw = paramfile.apply_overrides(
        raw,
        [
            f"base.image_size={size}",
            f"head.epochs={epochs}",
            f"head.patience={epochs}",
            "head.target_accuracy=0.9999",
            f"weights.cache_dir={backbone_cache}",
            *overrides,
        ],
    )
    return params_module.from_dict(raw)


def subset(prepared: Path, out: Path, n_train: int) -> Path:
    """A prepared folder with `n_train` training images (tiled when more than exist)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("labels.json",):
        shutil.copy(prepared / name, out / name)
    for split in ("val", "test"):
        for kind in ("images", "labels"):
            shutil.copy(prepared / f"{split}_{kind}.npy", out / f"{split}_{kind}.npy")
    x = np.load(prepared / "train_images.npy", mmap_mode="r")
    y = np.load(prepared / "train_labels.npy")
    index = np.arange(n_train) % len(x)
    np.save(out / "train_images.npy", np.asarray(x[index]))
    np.save(out / "train_labels.npy", y[index])
    with open(out / "manifest.csv", "w", newline="") as handle:  # the cache key reads it
        csv.writer(handle).writerows([["file", "split"], *([f"tile-{i}", "train"] for i in index)])
    return out


def setup(args) -> dict:
    """Prepared data, frozen backbone and params for the benchmark, under args.work."""
    import tasks
    from headstart.artifacts import image_size

    size = args.size or "auto"
    params = base_params(size, args.epochs, args.work / "weights-cache", args.overrides)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    link = work / "data"
    if link.is_symlink():
        link.unlink()  # point at this run's --data
    if not link.exists():
        link.symlink_to(args.data.resolve())
    for name in ("prepare", "weights", "freeze"):
        tasks.get(name).run(params, work)
    prepared = params.path("prepared", work)
    size = image_size(prepared)  # what auto chose, or --size
    n_available = len(np.load(prepared / "train_labels.npy"))
    n = args.images or n_available
    return {
        "params": params,
        "size": size,
        "prepared": prepared,
        "n": n,
        "backbone": params.path("backbone", work),
        "n_available": n_available,
    }


def split_counts(prepared: Path) -> dict:
    return {s: len(np.load(prepared / f"{s}_labels.npy")) for s in ("train", "val", "test")}


# --- sections ---------------------------------------------------------------------------------


def bench_floor(ctx, args) -> dict:
    import keras

    from headstart.training import inference_fn

    prepared = subset(ctx["prepared"], args.work / "subsets" / f"n{ctx['n']}", ctx["n"])
    counts = split_counts(prepared)
    images = np.concatenate([np.load(prepared / f"{s}_images.npy") for s in counts])
    extractor = keras.saving.load_model(ctx["backbone"] / "backbone.keras")
    call = inference_fn(extractor)
    call(images[:32].astype("float32"))  # trace

    def one_pass():
        for start in range(0, len(images), 32):
            call(images[start : start + 32].astype("float32"))

    seconds = median_time(one_pass, args.repeats)
    return {
        "images": len(images),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / seconds, 1),
    }


def test_accuracy(model, prepared: Path) -> float:
    from headstart.training import predict

    x = np.load(prepared / "test_images.npy")
    y = np.load(prepared / "test_labels.npy")
    return float(np.mean(np.argmax(predict(model, x), axis=1) == y))


def with_seed(params, seed: int):
    return dataclasses.replace(params, base=dataclasses.replace(params.base, seed=seed))


def bench_recipe(ctx, args) -> dict:
    """The Keras guide's recipe: frozen base inside the model, fit on images every epoch.
    Repeated with seeds seed, seed+1, ...: median time, mean test accuracy."""
    runs = [
        _recipe_once(ctx, args, with_seed(ctx["params"], ctx["params"].base.seed + r))
        for r in range(args.repeats)
    ]
    return {
        "epochs": args.epochs,
        "seconds": round(statistics.median(r[0] for r in runs), 3),
        "val_accuracy": round(float(np.mean([r[1] for r in runs])), 4),
        "test_accuracy": round(float(np.mean([r[2] for r in runs])), 4),
        "test_accuracies": [round(r[2], 4) for r in runs],
    }


def _recipe_once(ctx, args, params) -> tuple[float, float, float]:
    import keras
    import tensorflow as tf

    from headstart.files import read_json

    prepared = subset(ctx["prepared"], args.work / "subsets" / f"n{ctx['n']}", ctx["n"])
    keras.utils.set_random_seed(params.base.seed)
    base = keras.saving.load_model(ctx["backbone"] / "backbone.keras")
    base.trainable = False
    inputs = keras.Input(base.input_shape[1:])
    x = base(inputs, training=False)
    x = keras.layers.Dense(params.head.units, activation="relu")(x)
    x = keras.layers.Dropout(params.head.dropout)(x)
    classes = read_json(prepared / "labels.json")["classes"]
    outputs = keras.layers.Dense(len(classes), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(params.head.learning_rate),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    def images(split, shuffle):
        data = tf.data.Dataset.from_tensor_slices(
            (
                np.load(prepared / f"{split}_images.npy").astype("float32"),
                np.load(prepared / f"{split}_labels.npy"),
            )
        )
        if shuffle:
            data = data.shuffle(1000, seed=params.base.seed)
        return data.batch(32).prefetch(tf.data.AUTOTUNE)

    started = time.perf_counter()
    history = model.fit(
        images("train", True), validation_data=images("val", False), epochs=args.epochs, verbose=0
    )
    seconds = time.perf_counter() - started
    return seconds, float(history.history["val_accuracy"][-1]), test_accuracy(model, prepared)


def bench_headstart(ctx, args) -> dict:
    """The head step in-process, repeated with the recipe's seeds (fresh feature cache each)."""
    import keras

    from headstart.files import read_json
    from tasks.head import train_head

    prepared = subset(ctx["prepared"], args.work / "subsets" / f"n{ctx['n']}", ctx["n"])
    runs = []
    for repeat in range(args.repeats):
        params = with_seed(ctx["params"], ctx["params"].base.seed + repeat)
        features = args.work / "features" / f"hs{repeat}"
        shutil.rmtree(features, ignore_errors=True)
        out = args.work / "transfer-bench"
        started = time.perf_counter()
        train_head(prepared, ctx["backbone"], features, out, params)
        seconds = time.perf_counter() - started
        record = {**read_json(out / "transfer.json"), "seconds": read_json(timings_path(out))}
        model = keras.saving.load_model(out / "model.keras")
        runs.append((seconds, record, test_accuracy(model, prepared)))
    record = runs[len(runs) // 2][1]
    return {
        "epochs": args.epochs,
        "seconds": round(statistics.median(r[0] for r in runs), 3),
        "features_s": record["seconds"]["features"],
        "head_fit_s": record["seconds"]["head"],
        "val_accuracy": round(float(np.mean([r[1]["val_accuracy_head_only"] for r in runs])), 4),
        "test_accuracy": round(float(np.mean([r[2] for r in runs])), 4),
        "test_accuracies": [round(r[2], 4) for r in runs],
    }


def _head_command_params(ctx, args, n: int) -> Path:
    """A params.yaml whose paths point at a subset of n training images."""
    from headstart import params as params_module

    folder = args.work / "scaling" / f"n{n}"
    prepared = subset(ctx["prepared"], folder / "prepared", n)
    shutil.rmtree(folder / "features", ignore_errors=True)
    target = folder / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    link = folder / "backbone"  # paths must lie inside the project folder: link the backbone in
    if not link.exists():
        link.symlink_to(Path(ctx["backbone"]).resolve(), target_is_directory=True)
    params_module.write_overrides(
        target,
        [
            f"base.image_size={ctx['size']}",
            f"head.epochs={args.epochs}",
            f"head.patience={args.epochs}",
            "head.target_accuracy=0.9999",
            f"paths.prepared={Path(prepared).relative_to(folder)}",
            "paths.backbone=backbone",
            "paths.features=features",
            "paths.transfer=transfer",
        ],
    )
    return target


def bench_scaling(ctx, args) -> dict:
    from headstart.files import read_json

    rows = {}
    for factor in (1,) if args.quick else (1, 2, 4):
        n = ctx["n"] * factor
        params_file = _head_command_params(ctx, args, n)
        child = run_child(
            [
                str(Path(sys.executable).with_name("headstart")),
                "step",
                "head",
                "--project",
                str(params_file.parent),
            ]
        )
        record = {"seconds": read_json(timings_path(params_file.parent / "transfer"))}
        rows[n] = {
            "seconds": child["seconds"],
            "peak_mib": child["peak_mib"],
            "features_s": record["seconds"]["features"],
            "head_fit_s": record["seconds"]["head"],
        }
    return rows


def bench_startup(ctx, args) -> dict:
    headstart = str(Path(sys.executable).with_name("headstart"))
    help_s = statistics.median(run_child([headstart, "--help"])["seconds"] for _ in range(5))
    return {"help_s": round(help_s, 3)}


def _clone(target: Path, data: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    shutil.copytree(data, target / "data")
    return target


def bench_pipeline(ctx, args) -> dict:
    """The demo pipeline with default parameters: each step as a command, then the flow."""
    from headstart import params as params_module
    from headstart.files import read_json

    headstart = str(Path(sys.executable).with_name("headstart"))
    dvc = str(Path(sys.executable).with_name("dvc"))
    steps_root = _clone(args.work / "pipeline-steps", args.data)
    steps = {}
    from tasks import STEP_NAMES

    for name in STEP_NAMES:
        child = run_child([headstart, "step", name], cwd=steps_root)
        steps[name] = {"seconds": child["seconds"], "peak_mib": child["peak_mib"]}
    metrics = {
        m: read_json(steps_root / f"artifacts/metrics/{m}.json") for m in ("baseline", "transfer")
    }
    transfer = {"seconds": read_json(timings_path(steps_root / "artifacts/transfer"))}

    flow_root = _clone(args.work / "pipeline-flow", args.data)
    fresh = run_child([headstart, "run"], cwd=flow_root)
    noop = [run_child([headstart, "run"], cwd=flow_root)["seconds"] for _ in range(args.repeats)]
    status = [
        run_child([headstart, "status"], cwd=flow_root)["seconds"] for _ in range(args.repeats)
    ]
    predict = _predict_times(flow_root, args.repeats)
    artifacts_mib = round(
        sum(f.stat().st_size for f in (flow_root / "artifacts").rglob("*") if f.is_file()) / 2**20,
        1,
    )
    epochs = params_module.load(flow_root / "params.yaml").head.epochs
    params_module.write_overrides(flow_root / "params.yaml", [f"head.epochs={epochs + 5}"])
    repro = run_child([dvc, "repro"], cwd=flow_root)
    ran = [
        line.split("'")[1]
        for line in repro["output"].splitlines()
        if line.startswith("Running stage")
    ]
    return {
        "steps": steps,
        "features_s": transfer["seconds"]["features"],
        "metrics": {
            m: {
                k: round(v, 4)
                for k, v in metrics[m].items()
                if k in ("accuracy", "macro_f1", "loss", "top3_accuracy")
            }
            for m in metrics
        },
        "flow_fresh_s": fresh["seconds"],
        "flow_fresh_peak_mib": fresh["peak_mib"],
        "flow_noop_s": round(statistics.median(noop), 3),
        "status_s": round(statistics.median(status), 3),
        "prefect_overhead_s": round(statistics.median(noop) - statistics.median(status), 3),
        "repro_after_head_epochs_s": repro["seconds"],
        "repro_ran": ran,
        "predict": predict,
        "artifacts_mib": artifacts_mib,
    }


def _predict_times(project: Path, repeats: int) -> dict:
    """`headstart predict` on one test image, a cold process each time (median seconds): as a
    user runs it (the checked ONNX export answers) and with the release's model file named
    (its folder holds no export record: Keras answers, as before the ONNX path existed)."""
    headstart = str(Path(sys.executable).with_name("headstart"))
    photo = next(p for p in sorted((project / "data").rglob("*")) if p.is_file())
    times = {}
    for name, model in (("onnx", []), ("keras", ["artifacts/release/model.keras"])):
        for reject in ([], ["--reject"]):
            command = [headstart, "predict", "--json", *model, str(photo), *reject]
            runs = [run_child(command, cwd=project) for _ in range(repeats)]
            answer = json.loads(runs[-1]["output"][runs[-1]["output"].index("[\n") :])
            assert answer[0]["runtime"] == name, answer
            times[name + (" --reject" if reject else "")] = round(
                statistics.median(r["seconds"] for r in runs), 3
            )
    return times


# --- report -----------------------------------------------------------------------------------


def report(results: dict) -> str:
    lines = [f"machine: {results['machine']}", f"settings: {results['settings']}", ""]
    floor, recipe, hs = (results.get(k) for k in ("floor", "recipe", "headstart"))
    rows = []
    if floor:
        rows.append(
            (
                "floor: backbone forward pass",
                f"{floor['seconds']:.2f}",
                f"{floor['images_per_s']} img/s over {floor['images']} images",
                "",
            )
        )
    if recipe:
        rows.append(
            (
                f"recipe: fit through frozen base, E={recipe['epochs']}",
                f"{recipe['seconds']:.2f}",
                f"val {recipe['val_accuracy']}",
                f"{recipe['test_accuracies']} mean {recipe['test_accuracy']}",
            )
        )
    if hs:
        rows.append(
            (
                f"headstart head step, E={hs['epochs']}",
                f"{hs['seconds']:.2f}",
                f"features {hs['features_s']} s + head {hs['head_fit_s']} s",
                f"{hs['test_accuracies']} mean {hs['test_accuracy']}",
            )
        )
    if rows:
        lines += [table(rows, ("what", "seconds (median)", "detail", "test accuracy per seed")), ""]
    ratios = results.get("ratios", {})
    if ratios:
        lines += [
            table([(k, v, g) for k, (v, g) in ratios.items()], ("ratio", "value", "goal")),
            "",
        ]
    if "scaling" in results:
        rows = [
            (n, r["seconds"], r["features_s"], r["head_fit_s"], r["peak_mib"])
            for n, r in results["scaling"].items()
        ]
        lines += [
            table(rows, ("train images", "command s", "features s", "head fit s", "peak MiB")),
            "",
        ]
    if "startup" in results:
        lines += [f"startup: headstart --help {results['startup']['help_s']} s", ""]
    if "pipeline" in results:
        p = results["pipeline"]
        rows = [(name, s["seconds"], s["peak_mib"]) for name, s in p["steps"].items()]
        lines += [table(rows, ("step (headstart step NAME)", "seconds", "peak MiB")), ""]
        rows = [(m, v["accuracy"], v["macro_f1"], v["loss"]) for m, v in p["metrics"].items()]
        lines += [table(rows, ("model (test split)", "accuracy", "macro-F1", "loss")), ""]
        lines += [
            f"headstart run (fresh clone, whole pipeline): {p['flow_fresh_s']} s, "
            f"peak {p['flow_fresh_peak_mib']} MiB",
            f"headstart run (no-op, all up to date): {p['flow_noop_s']} s; headstart status: "
            f"{p['status_s']} s; Prefect overhead per run ~ {p['prefect_overhead_s']} s",
            f"dvc repro after changing head.epochs: {p['repro_after_head_epochs_s']} s, "
            f"ran {p['repro_ran']}",
            f"artifacts/ after the run: {p['artifacts_mib']} MiB",
            "",
            table(
                list(p["predict"].items()),
                ("headstart predict, one image, cold (runtime)", "seconds (median)"),
            ),
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    ctx = setup(args)
    results = {
        "machine": machine(),
        "settings": {
            "size": ctx["size"],
            "train_images": ctx["n"],
            "epochs": args.epochs,
            "repeats": args.repeats,
            "backbone": ctx["params"].base.backbone,
            "quick": args.quick,
            "sections": args.sections,
        },
    }
    runners = {
        "floor": bench_floor,
        "recipe": bench_recipe,
        "headstart": bench_headstart,
        "scaling": bench_scaling,
        "startup": bench_startup,
        "pipeline": bench_pipeline,
    }
    for section in args.sections:
        started = time.perf_counter()
        results[section] = runners[section](ctx, args)
        print(
            f"[{section} done in {time.perf_counter() - started:.1f}s]", file=sys.stderr, flush=True
        )
    if {"floor", "headstart"} <= set(results):
        results["ratios"] = {
            "headstart head step / floor": (
                round(results["headstart"]["seconds"] / results["floor"]["seconds"], 2),
                "<= 1.3",
            )
        }
    if {"recipe", "headstart"} <= set(results):
        results.setdefault("ratios", {})["recipe / headstart"] = (
            round(results["recipe"]["seconds"] / results["headstart"]["seconds"], 2),
            ">= 8 at E=20",
        )
        results["ratios"]["test accuracy headstart - recipe (points)"] = (
            round(
                100 * (results["headstart"]["test_accuracy"] - results["recipe"]["test_accuracy"]),
                2,
            ),
            "within 1",
        )
    text = report(results)
    print(text)
    write_json(args.out, results)
    args.out.with_suffix(".md").write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
