"""export: the release -> artifacts/export/ (what you deploy).

Each format in export.formats (TensorFlow SavedModel, LiteRT, ONNX), run on the whole test split
and compared with the Keras release (headstart/exporting.py): figures and checksums in
export.json; an export agreeing on fewer than export.min_agreement of the test images fails the
step. Beside them: labels.json, the release's calibration.json (when it has one) and
MODEL_CARD.md (headstart/modelcard.py). Only the test images are read, never their labels.
The exports of an unchanged release are kept (the card is rewritten): see `export_release`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from headstart import exporting, modelcard, ood
from headstart.artifacts import (
    BACKBONE_FILE,
    EXPORT_RECORD_FILE,
    LABELS_FILE,
    MODEL_FILE,
    image_size,
)
from headstart.calibration import CALIBRATION_FILE
from headstart.errors import UserError
from headstart.files import atomic_dir, require, sha256_file, write_json, write_text
from headstart.params import Params
from headstart.quiet import start_tensorflow

log = logging.getLogger("headstart.export")


def export_release(
    root: Path | str, params: Params, converters: dict[str, exporting.Converter] | None = None
) -> Path:
    """The exports, export.json, labels.json and the model card in paths.export (paths from
    params under `root`); `converters`: format -> converter (default: exporting.CONVERTERS).
    Exports made from the same release and test images with the same settings and converters
    are kept as they are (exporting.reusable): a change the card shows but the exports do not
    depend on (any other parameter, the data's report, the notes) rewrites the card only, and
    starts no TensorFlow."""
    root = Path(root)
    release_dir, out_dir = params.path("release", root), params.path("export", root)
    size = image_size(params.path("prepared", root))
    images_file = require(params.path("prepared", root) / "test_images.npy", "prepare")
    images = np.load(images_file, mmap_mode="r")
    if images.shape[1:] != (size, size, 3) or not len(images):
        raise UserError(
            f"{params.paths.prepared}/test_images.npy: holds {images.shape[0]} images "
            f"of {images.shape[1:]}, expected some of ({size}, {size}, 3) "
            "(labels.json); rerun `headstart step prepare`"
        )
    model_file = require(release_dir / MODEL_FILE, "select")
    source = {
        "release_sha256": sha256_file(model_file),
        "test_images_sha256": sha256_file(images_file),
    }
    if _with_reject(release_dir, params):
        source["backbone_sha256"] = sha256_file(release_dir / BACKBONE_FILE)
    previous = (
        None
        if converters is not None
        else exporting.reusable(out_dir, params.export.formats, params.export.latency_runs, source)
    )
    with atomic_dir(out_dir) as tmp:
        if previous:
            exporting.copy_exports(previous, out_dir, tmp)
            results, keras_latency = previous["formats"], previous["reference"]["latency_ms"]
            reject = previous.get("reject")
            log.info(
                "export: the release, its test images, export.formats, latency_runs and "
                "the converters are as at the last export: its files are kept"
            )
        else:
            results, keras_latency = _convert(model_file, images, tmp, params, converters)
            reject = (
                _convert_backbone(release_dir, images, tmp, params)
                if "backbone_sha256" in source and results["onnx"]["available"]
                else None
            )
        exporting.check_parity(results, params.export.min_agreement, len(images))
        record = {
            "image_size": size,
            "test_images": len(images),
            "min_agreement": params.export.min_agreement,
            "latency_runs": params.export.latency_runs,
            "source": source,
            "reference": {
                "format": "keras",
                "path": f"{params.paths.release}/{MODEL_FILE}",
                "bytes": model_file.stat().st_size,
                "sha256": source["release_sha256"],
                "latency_ms": keras_latency,
            },
            "formats": results,
            "reject": reject,
        }
        write_json(tmp / EXPORT_RECORD_FILE, record)
        shutil.copy(require(release_dir / LABELS_FILE, "select"), tmp / LABELS_FILE)
        if (release_dir / CALIBRATION_FILE).is_file():
            shutil.copy(release_dir / CALIBRATION_FILE, tmp / CALIBRATION_FILE)
        card = modelcard.render(modelcard.collect(root, params, record))
        write_text(tmp / modelcard.CARD_FILE, card)
    if "TODO" in (root / modelcard.NOTES_FILE).read_text():
        log.info(
            "export: %s still holds TODO lines; write your model's intended use and "
            "limitations there (every model card carries them)",
            modelcard.NOTES_FILE,
        )
    missing = [name for name, result in results.items() if not result["available"]]
    log.info(
        "export: %d of %d formats written to %s%s",
        len(results) - len(missing),
        len(results),
        out_dir,
        f" ({', '.join(missing)} not available)" if missing else "",
    )
    return out_dir


def _convert(
    model_file: Path,
    images: np.ndarray,
    out_dir: Path,
    params: Params,
    converters: dict[str, exporting.Converter] | None,
) -> tuple[dict, float]:
    """Each format converted into `out_dir` and checked against the release on `images`:
    (format -> record, the Keras model's own single-image latency in ms)."""
    start_tensorflow()  # here, not before the step: kept exports need none
    import keras

    from headstart.training import inference_fn, predict

    model = keras.saving.load_model(model_file)
    reference = predict(model, images)
    call = inference_fn(model)
    keras_latency = exporting.latency_ms(
        lambda batch: np.asarray(call(batch)), images[0], params.export.latency_runs
    )
    results = exporting.export_all(
        model,
        images.shape[1],
        out_dir,
        params.export.formats,
        images,
        reference,
        params.export.latency_runs,
        converters,
    )
    return results, keras_latency


def _with_reject(release_dir: Path, params: Params) -> bool:
    """Whether the export includes the backbone as ONNX (`predict --reject` without TensorFlow):
    the release has an OOD detector and ONNX is one of the formats."""
    return "onnx" in params.export.formats and all(
        (release_dir / name).is_file() for name in (BACKBONE_FILE, ood.OOD_FILE, ood.OOD_ARRAYS)
    )


def _convert_backbone(release_dir: Path, images: np.ndarray, out_dir: Path, params: Params) -> dict:
    import keras

    backbone = keras.saving.load_model(release_dir / BACKBONE_FILE)
    detector, _ = ood.load(release_dir)
    return exporting.export_features(backbone, detector, images.shape[1], out_dir, images)


def run(params: Params, root: Path) -> Path:
    return export_release(root, params)
