"""`headstart predict`: a saved model + its labels.json, images decoded exactly as in prepare.

A release folder also holds calibration.json (its probabilities are then reported temperature
scaled: `calibrated` true) and, for `--reject`, ood.json/ood.npz and backbone.keras: an image
whose OOD score is above the threshold is answered "unknown" instead of a class.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headstart import calibration, images
from headstart.artifacts import LABELS_FILE
from headstart.errors import UserError
from headstart.files import read_json
from headstart.progress import progress
from headstart.quiet import start_tensorflow

log = logging.getLogger("headstart.predict")
BATCH = 64  # images per call


def _expand(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(
                p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")
            )
        else:
            files.append(item)
    return files


def _check_keras_file(path: Path, what: str) -> None:
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: not a valid .keras file (damaged or truncated); "
            f"retrain {what} (headstart run) or restore it (dvc checkout)"
        )


def _load_model(path: Path, what: str):
    _check_keras_file(path, what)
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as err:  # a corrupt or foreign file: say so in one line
        raise UserError(
            f"{path}: not a valid .keras file ({type(err).__name__}: {err}); "
            f"retrain {what} (headstart run) or restore it (dvc checkout)"
        ) from None


def _require_backbone(model_dir: Path) -> Path:
    from headstart.artifacts import BACKBONE_FILE

    path = model_dir / BACKBONE_FILE
    if not path.is_file():
        raise UserError(
            f"{path}: missing; --reject needs a release made by `headstart step select` (rerun it)"
        )
    return path


def _backbone(model_dir: Path):
    """The release's copy of the frozen backbone (its features give the OOD score)."""
    path = _require_backbone(model_dir)
    backbone = _load_model(path, "it")
    size = read_json(model_dir / LABELS_FILE)["image_size"]
    if tuple(backbone.input_shape[1:3]) != (size, size):
        raise UserError(
            f"{path}: takes {backbone.input_shape[1]} px images but labels.json says "
            f"{size}; rerun `headstart step select`"
        )
    return backbone


FAST_MAX_ABS_DIFF = 1e-4  # the ONNX export answers for the release only this close to it


def _checked_export(
    model_path: Path, folders: list[Path], reject: bool
) -> tuple[Path, dict] | None:
    """(folder, export record) of an ONNX export made from exactly this model file, that agreed
    with it on every test image to FAST_MAX_ABS_DIFF, whose files are as recorded (and with
    `reject`, the backbone's ONNX file, made from the backbone beside the model, giving the
    same unknown/known answer on every test image); None when no folder holds one."""
    from headstart.artifacts import BACKBONE_FILE, EXPORT_RECORD_FILE
    from headstart.exporting import files_of
    from headstart.files import sha256_file

    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = sha256_file(path) if path.is_file() else ""
        return digests[path]

    for folder in folders:
        try:
            record = read_json(folder / EXPORT_RECORD_FILE)
            onnx, features = record["formats"].get("onnx"), record.get("reject")
            usable = (
                onnx
                and onnx["available"]
                and onnx["agreement"] == 1.0
                and onnx["max_abs_diff"] <= FAST_MAX_ABS_DIFF
                and record["source"]["release_sha256"] == digest(model_path)
                and files_of(folder / onnx["path"]) == onnx["files"]
            )
            if usable and reject:
                usable = (
                    features
                    and features["available"]
                    and features["decision_agreement"] == 1.0
                    and record["source"].get("backbone_sha256")
                    == digest(model_path.parent / BACKBONE_FILE)
                    and files_of(folder / features["path"]) == features["files"]
                )
        except (OSError, ValueError, KeyError, TypeError):  # none there, or not one of ours
            continue
        if usable:
            return folder, record
    return None


def _runners(model_path: Path, export_dirs: list[Path], reject: bool):
    """(runtime name, classifier, backbone or None): the release's checked ONNX export when one
    exists (onnxruntime starts in ~0.2 s), else the Keras model itself (TensorFlow, ~5 s)."""
    from headstart import exporting

    found = _checked_export(model_path, [model_path.parent, *export_dirs], reject)
    if found:
        folder, record = found
        features = record["reject"] if reject else None
        return (
            "onnx",
            exporting.CONVERTERS["onnx"].load(folder / record["formats"]["onnx"]["path"]),
            exporting.CONVERTERS["onnx"].load(folder / features["path"]) if features else None,
        )
    start_tensorflow()
    from headstart.training import predict

    model = _load_model(model_path, "it")
    backbone = _backbone(model_path.parent) if reject else None
    return (
        "keras",
        lambda batch: predict(model, batch),
        (lambda batch: predict(backbone, batch)) if backbone else None,
    )


def predict_paths(
    model_path: Path | str,
    inputs: list[Path],
    top_k: int = 1,
    reject: bool = False,
    export_dirs: Sequence[Path] = (),
) -> list[dict]:
    """One result per image file: {"file", "top": [(label, probability), ...], "calibrated",
    "runtime"} or {"file", "error"} for a file that cannot be read (the rest still run).
    Probabilities are temperature scaled when calibration.json sits beside the model
    (`calibrated`: true). `reject`: also "ood_score" and "ood_threshold"; an image scored above
    the threshold gets "unknown": true and no "top" (no class is claimed).

    `runtime` "onnx": the model's ONNX export answered, found in the model's folder or in one of
    `export_dirs` and used only when its export record proves it is this model's (same sha256)
    and agreed with it on every test image (see `_checked_export`); else "keras". TensorFlow
    loads only for Keras, and only once every check that needs none has passed."""
    model_path = Path(model_path)
    labels_path = model_path.parent / LABELS_FILE
    if model_path.is_dir():
        raise UserError(
            f"{model_path}: a folder, not a .keras model file; give the model file "
            "(e.g. artifacts/release/model.keras)"
        )
    if not model_path.is_file():
        raise UserError(f"{model_path}: model not found; train it first (headstart run)")
    if not labels_path.is_file():
        raise UserError(f"{labels_path}: missing; a model needs the labels.json written beside it")
    labels = read_json(labels_path)
    classes, size = labels["classes"], labels["image_size"]
    resize = labels.get("preprocessing", {}).get("resize", "pad")  # older models: always pad
    if resize not in images.RESIZE_MODES:
        raise UserError(
            f"{labels_path}: preprocessing.resize must be one of "
            f"{', '.join(images.RESIZE_MODES)} (got {resize!r})"
        )
    files = _expand(list(inputs))
    if not files:
        raise UserError("no image files given (pass files or folders)")
    temperature = calibration.read_temperature(model_path.parent)
    detector = None
    if reject:
        from headstart import ood

        detector, _ = ood.load(model_path.parent)
        _require_backbone(model_path.parent)
    _check_keras_file(model_path, "it")
    results: list[dict] = []
    decoded, rows = [], []
    with progress(len(files), "predict (reading)", log, unit="files") as shown:
        for path in files:
            try:
                decoded.append(images.load(path, size, resize))
                rows.append(len(results))
                results.append({"file": str(path)})
            except images.BadImage as err:
                results.append({"file": str(path), "error": str(err)})
            shown.advance()
    if not decoded:
        return results
    runtime, classify, features = _runners(model_path, list(export_dirs), reject)
    stacked = np.stack(decoded)
    outputs = []
    with progress(len(stacked), "predict (classifying)", log, unit="images") as shown:
        for start in range(0, len(stacked), BATCH):
            outputs.append(classify(stacked[start : start + BATCH].astype(np.float32)))
            shown.advance(len(outputs[-1]))
    raw = np.concatenate(outputs)
    # the ranking comes from the model's own scores: scaling keeps their order, but a small
    # temperature can round runners-up to equal values, which would then rank by label
    ranking = np.argsort(-raw, axis=1, kind="stable")
    probabilities = raw if temperature is None else calibration.apply_temperature(raw, temperature)
    scores = None
    if detector:
        scores = detector.score(
            np.concatenate(
                [
                    features(stacked[start : start + BATCH].astype(np.float32))
                    for start in range(0, len(stacked), BATCH)
                ]
            )
        )
    k = min(top_k, len(classes))
    for index, (row, p) in enumerate(zip(rows, probabilities, strict=True)):
        result = results[row]
        if scores is not None and detector is not None:
            result.update(
                ood_score=float(scores[index]),
                ood_threshold=detector.threshold,
                unknown=bool(scores[index] > detector.threshold),
            )
        if not result.get("unknown"):
            result["top"] = [(classes[i], float(p[i])) for i in ranking[index, :k]]
        result["calibrated"] = temperature is not None
        result["runtime"] = runtime
    return results


def render(results: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps(results, indent=2)
    width = max(len(r["file"]) for r in results)
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']:<{width}}  ERROR {r['error']}")
        elif r.get("unknown"):
            lines.append(
                f"{r['file']:<{width}}  unknown (OOD score {r['ood_score']:.3f} > "
                f"threshold {r['ood_threshold']:.3f})"
            )
        else:
            tops = ", ".join(f"{label} {p:.3f}" for label, p in r["top"])
            if "ood_score" in r:
                tops += f"  (OOD score {r['ood_score']:.3f} <= {r['ood_threshold']:.3f})"
            lines.append(f"{r['file']:<{width}}  {tops}")
    return "\n".join(lines)
