"""Exports of the released Keras model, each checked against it: the parity gate.

Formats: a TensorFlow SavedModel, a LiteRT (TFLite) file and an ONNX file. Each takes raw RGB
0-255 float32 images of the model's input size (batch size free) and returns the class
probabilities. Each is loaded back with its own runtime (TensorFlow, ai-edge-litert,
onnxruntime), run on every test image and compared with the Keras model: top-1 agreement, the
largest absolute probability difference, size, single-image CPU latency, sha256 of every file.

A converter (or runtime) that raises makes its format "not available" with the reason: reported,
never skipped silently, nothing of it is left in the export folder, and the next run tries it
again. A failure of the machine (disk full, I/O error, permissions) fails the step instead. A format that converts
but disagrees with the Keras model fails the gate (`ParityError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from headstart.artifacts import EXPORT_RECORD_FILE
from headstart.errors import UserError, describe, environment_failure
from headstart.files import sha256_file
from headstart.quiet import native_noise_dropped

log = logging.getLogger("headstart.exporting")

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
FEATURES_NAME = "features"
BACKBONE_ONNX = "backbone.onnx"  # in the export folder: the release's backbone, for --reject
BATCH = 64  # images per call when comparing on the test split

Runner = Callable[[np.ndarray], np.ndarray]  # float32 N x S x S x 3 -> N x classes


class ParityError(UserError):
    """An export that converted but does not agree with the Keras model."""


@dataclass(frozen=True)
class Converter:
    target: str  # file or folder name in the export folder
    convert: Callable[[object, int, Path], None]  # (keras model, input size, target path)
    load: Callable[[Path], Runner]
    packages: tuple[str, ...]  # converter and runtime packages, versions recorded


def input_spec(image_size: int):
    import tensorflow as tf

    return tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name=INPUT_NAME)


def _to_saved_model(model, image_size: int, target: Path) -> None:
    """Keras's ExportArchive with the inference call spelled out, as Keras's own LiteRT export
    does. (`model.export(format="tf_saved_model")` traces `model(x)` with no `training`
    argument, and in the released ensemble a Resizing layer, whose call defaults to
    training=True, then switched the head's Dropout on: measured on the demo, 3 to 7 of 198
    test images changed class from call to call.)"""
    import functools

    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        functools.partial(model.__call__, training=False),
        input_signature=[input_spec(image_size)],
    )
    archive.write_out(str(target), verbose=False)


def _run_saved_model(target: Path) -> Runner:
    """Through the `serving_default` signature, as TensorFlow Serving calls it."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(target)).signatures["serving_default"]

    def run(batch: np.ndarray) -> np.ndarray:
        outputs = signature(**{INPUT_NAME: tf.constant(batch)})
        if len(outputs) != 1:
            raise ValueError(f"the SavedModel returns {len(outputs)} outputs, expected 1")
        return np.asarray(next(iter(outputs.values())))

    return run


def _to_litert(model, image_size: int, target: Path) -> None:
    model.export(
        str(target), format="litert", input_signature=[input_spec(image_size)], verbose=False
    )


def _run_litert(target: Path) -> Runner:
    """The ai-edge-litert interpreter (default threads); resized to each batch's size."""
    from ai_edge_litert.interpreter import Interpreter

    with native_noise_dropped():
        interpreter = Interpreter(model_path=str(target))
    (given,), (returned,) = interpreter.get_input_details(), interpreter.get_output_details()
    shape: list[tuple[int, ...] | None] = [None]

    def run(batch: np.ndarray) -> np.ndarray:
        if shape[0] != batch.shape:
            interpreter.resize_tensor_input(given["index"], batch.shape)
            with native_noise_dropped():  # LiteRT's "Created ... XNNPACK delegate" line
                interpreter.allocate_tensors()
            shape[0] = batch.shape
        interpreter.set_tensor(given["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(returned["index"]).copy()

    return run


def _to_onnx(model, image_size: int, target: Path, output_name: str = OUTPUT_NAME) -> None:
    """tf2onnx on the model's inference graph with every variable and captured constant frozen
    in. (Keras's `export(format="onnx")` hands tf2onnx the graph with its captured constants still
    as inputs: a Normalization layer's mean and variance became extra ONNX inputs, measured on
    this project's transfer head.)"""
    import tensorflow as tf
    import tf2onnx

    # Two private imports, on purpose: Keras's own patch that makes tf2onnx 1.17 work with
    # NumPy 2 (what `export(format="onnx")` applies; keras is pinned ==3.15.1 in pyproject for
    # it), and TensorFlow's freezing of a concrete function (what tf2onnx.convert.from_function
    # does inside, pinned with tensorflow-cpu ==2.21.0). The export step's parity check on the
    # test split catches a conversion that breaks after an upgrade.
    from keras.src.export.tf2onnx_lib import patch_tf2onnx
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    function = tf.function(
        lambda image: model(image, training=False), input_signature=[input_spec(image_size)]
    )
    frozen = convert_variables_to_constants_v2(
        function.get_concrete_function(), lower_control_flow=False, aggressive_inlining=True
    )
    inputs, outputs = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"the frozen graph has {len(inputs)} inputs and {len(outputs)} outputs, "
            "expected 1 and 1"
        )
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # tf2onnx calls TensorFlow 1 APIs: deprecation notices
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # numpy 2 about np.object
            patch_tf2onnx()  # numpy 2 compatibility (Keras's own patch for tf2onnx 1.17)
        tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(add_shapes=True),
            input_names=inputs,
            output_names=outputs,
            tensors_to_rename={inputs[0]: INPUT_NAME, outputs[0]: output_name},
            output_path=str(target),
        )
    finally:
        tf_logger.setLevel(level)


def _run_onnx(target: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    names = [given.name for given in session.get_inputs()]
    if names != [INPUT_NAME]:
        raise ValueError(f"the ONNX model wants inputs {names}, expected only '{INPUT_NAME}'")

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: batch})[0]

    return run


CONVERTERS: dict[str, Converter] = {
    "saved_model": Converter("saved_model", _to_saved_model, _run_saved_model, ("tensorflow",)),
    "litert": Converter("model.tflite", _to_litert, _run_litert, ("tensorflow", "ai-edge-litert")),
    "onnx": Converter("model.onnx", _to_onnx, _run_onnx, ("tf2onnx", "onnx", "onnxruntime")),
}
FORMATS = tuple(CONVERTERS)


def run_batches(run: Runner, images: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """`run` over `images` (uint8 or float, memory-mapped is fine) as float32 batches."""
    parts = [
        run(np.asarray(images[start : start + batch], dtype=np.float32))
        for start in range(0, len(images), batch)
    ]
    return np.concatenate(parts)


def latency_ms(run: Runner, image: np.ndarray, runs: int) -> float:
    """Median wall time of one single-image call (after one warm-up call), milliseconds."""
    image = np.asarray(image, dtype=np.float32)[None]
    run(image)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)


def compare(probabilities: np.ndarray, reference: np.ndarray) -> dict:
    """Top-1 agreement and the largest absolute probability difference with the reference."""
    if probabilities.shape != reference.shape:
        return {
            "agreement": 0.0,
            "disagreements": len(reference),
            "max_abs_diff": None,
            "problem": f"output shape {probabilities.shape}, the Keras model's {reference.shape}",
        }
    same = np.argmax(probabilities, axis=1) == np.argmax(reference, axis=1)
    return {
        "agreement": float(np.mean(same)),
        "disagreements": int(np.sum(~same)),
        "max_abs_diff": float(np.max(np.abs(probabilities.astype(np.float64) - reference))),
    }


def files_of(target: Path) -> dict[str, dict]:
    """Every file of an export (a folder or one file): relative path -> bytes and sha256."""
    paths = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return {
        (p.relative_to(target.parent)).as_posix(): {
            "bytes": p.stat().st_size,
            "sha256": sha256_file(p),
        }
        for p in paths
    }


# a package -> the distributions that provide it (TensorFlow's CPU build on Linux x86-64)
_DISTRIBUTIONS = {"tensorflow": ("tensorflow-cpu", "tensorflow")}


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for package in packages:
        found[package] = "not installed"
        for distribution in _DISTRIBUTIONS.get(package, (package,)):
            try:
                found[package] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def export_one(
    name: str,
    converter: Converter,
    model,
    image_size: int,
    out_dir: Path,
    images: np.ndarray,
    reference: np.ndarray,
    latency_runs: int,
) -> dict:
    """Convert, load back, run on `images`, compare with `reference` (the Keras model's output).
    A converter or runtime that raises gives {"available": False, "reason": ...} and leaves no
    file behind."""
    target = out_dir / converter.target
    record: dict = {"versions": _versions(converter.packages)}
    started = time.perf_counter()
    try:
        with _root_logging_kept():
            converter.convert(model, image_size, target)
            run = converter.load(target)
            probabilities = run_batches(run, images)
        figures = compare(probabilities, reference)
        figures["latency_ms"] = latency_ms(run, images[0], latency_runs)
    except Exception as err:  # a converter or runtime that cannot handle the model
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        if environment_failure(err):  # a full disk is not a missing converter: fail the step
            raise UserError(
                f"export: writing {target}: {describe(err)}; free space or fix the "
                "folder's permissions, then run again"
            ) from None
        log.warning("export: %s not available: %s", name, describe(err))
        return {"available": False, "reason": describe(err), **record}
    files = files_of(target)
    difference = figures.get("problem") or f"max |dp| {figures['max_abs_diff']:.1e}"
    log.info(
        "export: %s agrees on %.2f %% of %d test images (%s), %.1f ms per image, %.1f s",
        name,
        100 * figures["agreement"],
        len(reference),
        difference,
        figures["latency_ms"],
        time.perf_counter() - started,
    )
    return {
        "available": True,
        "path": converter.target,
        **figures,
        "bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
        **record,
    }


def export_all(
    model,
    image_size: int,
    out_dir: Path,
    formats,
    images: np.ndarray,
    reference: np.ndarray,
    latency_runs: int,
    converters: dict[str, Converter] | None = None,
) -> dict[str, dict]:
    """Each of `formats` exported into `out_dir` and checked; format -> record."""
    converters = CONVERTERS if converters is None else converters
    return {
        name: export_one(
            name,
            converters[name],
            model,
            image_size,
            Path(out_dir),
            images,
            reference,
            latency_runs,
        )
        for name in formats
    }


def export_features(backbone, detector, image_size: int, out_dir: Path, images: np.ndarray) -> dict:
    """The release's frozen backbone as `BACKBONE_ONNX` (features out), for `predict --reject`
    without TensorFlow, checked like a format: on `images` its OOD scores (`detector`'s) against
    the Keras backbone's, and the "unknown" decisions they give. A converter that raises gives
    {"available": False, "reason": ...} and no file."""
    from headstart.training import predict

    target = out_dir / BACKBONE_ONNX
    try:
        with _root_logging_kept():
            _to_onnx(backbone, image_size, target, output_name=FEATURES_NAME)
            features = run_batches(_run_onnx(target), images)
    except Exception as err:
        target.unlink(missing_ok=True)
        if environment_failure(err):
            raise UserError(
                f"export: writing {target}: {describe(err)}; free space or fix the "
                "folder's permissions, then run again"
            ) from None
        log.warning("export: the backbone (for --reject) not available as ONNX: %s", describe(err))
        return {"available": False, "reason": describe(err)}
    expected, got = detector.score(predict(backbone, images)), detector.score(features)
    same = detector.unknown(expected) == detector.unknown(got)
    figures = {
        "decision_agreement": float(np.mean(same)),
        "max_abs_score_diff": float(np.max(np.abs(expected - got))),
    }
    log.info(
        "export: the backbone's ONNX file gives the same unknown/known answer on %.2f %% of "
        "%d test images (max |d score| %.1e)",
        100 * figures["decision_agreement"],
        len(images),
        figures["max_abs_score_diff"],
    )
    return {"available": True, "path": BACKBONE_ONNX, **figures, "files": files_of(target)}


def reusable(out_dir: Path, formats, latency_runs: int, source: dict) -> dict | None:
    """The previous export record (`out_dir`/export.json) when its exports can be kept as they
    are, None otherwise: made from the same release file and test images (`source`: their
    sha256), in the same formats with the same latency_runs, with the converter and runtime
    versions installed now, and every exported file still as recorded. Any other parameter (the
    model card lists all of them) then costs no conversion."""
    try:
        record = json.loads((Path(out_dir) / EXPORT_RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        if (
            record["source"] != source
            or record["latency_runs"] != latency_runs
            or list(record["formats"]) != list(formats)
        ):
            return None
        for name, result in record["formats"].items():
            if not result["available"]:  # tried again: its cause may be gone
                return None
            if result["versions"] != _versions(CONVERTERS[name].packages):
                return None
            if result["available"] and files_of(Path(out_dir) / result["path"]) != result["files"]:
                return None
        reject = record.get("reject")
        if reject and (
            not reject["available"] or files_of(Path(out_dir) / reject["path"]) != reject["files"]
        ):
            return None
    except (KeyError, TypeError):  # an older record (no "source"), or not one of ours
        return None
    return record


def copy_exports(record: dict, from_dir: Path, to_dir: Path) -> None:
    """The exported files of `record` (see `reusable`) from one export folder to another."""
    for result in [*record["formats"].values(), *filter(None, [record.get("reject")])]:
        if result["available"]:
            source = Path(from_dir) / result["path"]
            if source.is_dir():
                shutil.copytree(source, Path(to_dir) / result["path"])
            else:
                shutil.copy2(source, Path(to_dir) / result["path"])


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """TensorFlow's SavedModel writer logs through absl, which calls logging.basicConfig() when
    the root logger has no handler: every later headstart line would print twice. Remove any
    root handler added meanwhile."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)


def parity_failures(results: dict[str, dict], min_agreement: float) -> list[str]:
    """One phrase per available format below `min_agreement` (empty: the gate passes)."""
    failures = []
    for name, result in results.items():
        if not result["available"] or result["agreement"] >= min_agreement:
            continue
        problem = result.get("problem") or (f"max |dp| {result['max_abs_diff']:.3g}")
        failures.append(
            f"{name} agrees with the Keras model on {100 * result['agreement']:.2f} % "
            f"of the test images ({result['disagreements']} differ; {problem})"
        )
    return failures


def check_parity(results: dict[str, dict], min_agreement: float, images: int) -> None:
    failures = parity_failures(results, min_agreement)
    if failures:
        raise ParityError(
            f"export: {'; '.join(failures)}, below export.min_agreement "
            f"{100 * min_agreement:g} % on {images} test images; do not ship it: remove it from "
            "export.formats, or report the converter's bug"
        )
