"""export: the release -> artifacts/export/ (what you deploy).

Each format in export.formats (TensorFlow SavedModel, LiteRT, ONNX), run on the whole test split
and compared with the Keras release (headstart/exporting.py): figures and checksums in
export.json; an export agreeing on fewer than export.min_agreement of the test images fails the
step. Beside them: labels.json, the release's calibration.json (when it has one) and
MODEL_CARD.md (headstart/modelcard.py). Only the test images are read, never their labels.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from headstart import exporting, modelcard
from headstart.artifacts import LABELS_FILE, MODEL_FILE
from headstart.calibration import CALIBRATION_FILE
from headstart.errors import UserError
from headstart.files import atomic_dir, require, sha256_file, write_json, write_text
from headstart.params import Params

log = logging.getLogger("headstart.export")


def export_release(root: Path | str, params: Params,
                   converters: dict[str, exporting.Converter] | None = None) -> Path:  # fmt: skip
    """The exports, export.json, labels.json and the model card in paths.export (paths from
    params under `root`); `converters`: format -> converter (default: exporting.CONVERTERS)."""
    import keras

    from headstart.training import inference_fn, predict

    root = Path(root)
    release_dir, out_dir = params.path("release", root), params.path("export", root)
    size = params.base.image_size
    images = np.load(require(params.path("prepared", root) / "test_images.npy", "prepare"),
                     mmap_mode="r")  # fmt: skip
    if images.shape[1:] != (size, size, 3) or not len(images):
        raise UserError(f"{params.paths.prepared}/test_images.npy: holds {images.shape[0]} images "
                        f"of {images.shape[1:]}, expected some of ({size}, {size}, 3) "
                        "(base.image_size); rerun `headstart step prepare`")  # fmt: skip
    model_file = require(release_dir / MODEL_FILE, "select")
    model = keras.saving.load_model(model_file)
    reference = predict(model, images)
    call = inference_fn(model)
    keras_latency = exporting.latency_ms(lambda batch: np.asarray(call(batch)), images[0],
                                         params.export.latency_runs)  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        results = exporting.export_all(model, size, tmp, params.export.formats, images, reference,
                                       params.export.latency_runs, converters)  # fmt: skip
        exporting.check_parity(results, params.export.min_agreement, len(images))
        record = {
            "image_size": size, "test_images": len(images),
            "min_agreement": params.export.min_agreement,
            "latency_runs": params.export.latency_runs,
            "reference": {"format": "keras", "path": f"{params.paths.release}/{MODEL_FILE}",
                          "bytes": model_file.stat().st_size, "sha256": sha256_file(model_file),
                          "latency_ms": keras_latency},
            "formats": results,
        }  # fmt: skip
        write_json(tmp / "export.json", record)
        shutil.copy(require(release_dir / LABELS_FILE, "select"), tmp / LABELS_FILE)
        if (release_dir / CALIBRATION_FILE).is_file():
            shutil.copy(release_dir / CALIBRATION_FILE, tmp / CALIBRATION_FILE)
        card = modelcard.render(modelcard.collect(root, params, record))
        write_text(tmp / modelcard.CARD_FILE, card)
    if "TODO" in (root / modelcard.NOTES_FILE).read_text():
        log.warning("export: %s still holds TODO lines; write your model's intended use and "
                    "limitations there (every model card carries them)", modelcard.NOTES_FILE)  # fmt: skip
    missing = [name for name, result in results.items() if not result["available"]]
    log.info("export: %d of %d formats written to %s%s", len(results) - len(missing), len(results),
             out_dir, f" ({', '.join(missing)} not available)" if missing else "")  # fmt: skip
    return out_dir


def run(params: Params, root: Path) -> Path:
    return export_release(root, params)
