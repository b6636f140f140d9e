"""`headstart predict`: a saved model + its labels.json, images decoded exactly as in prepare."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from headstart import images
from headstart.errors import UserError
from headstart.files import read_json
from headstart.progress import progress

log = logging.getLogger("headstart.predict")


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


def predict_paths(model_path: Path | str, inputs: list[Path], top_k: int = 1) -> list[dict]:
    """One result per image file: {"file", "top": [(label, probability), ...]} or {"file",
    "error"} for a file that cannot be read (the rest still run)."""
    model_path = Path(model_path)
    labels_path = model_path.parent / "labels.json"
    if not model_path.is_file():
        raise UserError(f"{model_path}: model not found; train it first (headstart run)")
    if not labels_path.is_file():
        raise UserError(f"{labels_path}: missing; a model needs the labels.json written beside it")
    labels = read_json(labels_path)
    classes, size = labels["classes"], labels["image_size"]
    files = _expand(list(inputs))
    if not files:
        raise UserError("no image files given (pass files or folders)")
    import keras

    from headstart.training import predict_batches

    if not zipfile.is_zipfile(model_path):
        raise UserError(f"{model_path}: not a valid .keras file (damaged or truncated); "
                        "retrain it (headstart run) or restore it (dvc checkout)")  # fmt: skip
    try:
        model = keras.saving.load_model(model_path, safe_mode=True)
    except Exception as err:  # a corrupt or foreign file: say so in one line
        raise UserError(
            f"{model_path}: not a valid .keras file ({type(err).__name__}: {err}); "
            "retrain it (headstart run) or restore it (dvc checkout)"
        ) from None
    results: list[dict] = []
    decoded, rows = [], []
    with progress(len(files), "predict (reading)", log, unit="files") as shown:
        for path in files:
            try:
                decoded.append(images.load(path, size))
                rows.append(len(results))
                results.append({"file": str(path)})
            except images.BadImage as err:
                results.append({"file": str(path), "error": str(err)})
            shown.advance()
    if decoded:
        stacked = np.stack(decoded)
        outputs = []
        with progress(len(stacked), "predict (classifying)", log, unit="images") as shown:
            for _, output in predict_batches(model, stacked):  # as training.predict does
                outputs.append(output)
                shown.advance(len(output))
        probabilities = np.concatenate(outputs)
        k = min(top_k, len(classes))
        for row, p in zip(rows, probabilities, strict=True):
            best = np.argsort(-p)[:k]
            results[row]["top"] = [(classes[i], float(p[i])) for i in best]
    return results


def render(results: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps(results, indent=2)
    width = max(len(r["file"]) for r in results)
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']:<{width}}  ERROR {r['error']}")
        else:
            tops = ", ".join(f"{label} {p:.3f}" for label, p in r["top"])
            lines.append(f"{r['file']:<{width}}  {tops}")
    return "\n".join(lines)
