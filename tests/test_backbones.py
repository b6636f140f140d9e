"""Backbones: the EfficientNet-Lite ports on real photos, downloads against a real loopback HTTP
server, the restricted unpickler, and freezing that really freezes."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import small_params
from PIL import Image

from headstart import backbones, download, images
from headstart.convert import load_lite_state
from headstart.errors import UserError
from headstart.torchfile import UnsafeCheckpoint, read_state_dict
from tasks.freeze import freeze_backbone
from tasks.weights import fetch_weights, package_file

LITE = ("efficientnet_lite0", "efficientnet_lite2")


@pytest.fixture(scope="module", params=LITE)
def lite_weights(request, tmp_path_factory) -> Path:
    """A Lite backbone's real converted weights (from its pip-installed package), made once."""
    out = tmp_path_factory.mktemp("weights") / "weights"
    return fetch_weights(out, small_params(base={"backbone": request.param}))


def lite_name(weights: Path) -> str:
    return __import__("json").loads((weights / "weights.json").read_text())["backbone"]


def imagenet_top1(model, photo: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    x = images.decode(buffer.getvalue(), model.input_shape[1], "stretch")[None].astype("float32")
    return int(np.argmax(model(x, training=False).numpy()[0]))


def test_lite_ports_classify_real_photos_at_native_size(lite_weights):
    skimage_data = pytest.importorskip("skimage.data")
    backbone = backbones.get(lite_name(lite_weights))
    model = backbone.build(backbone.default_size, include_top=True)
    model.load_weights(str(lite_weights / f"{backbone.name}.weights.h5"))
    assert imagenet_top1(model, skimage_data.chelsea()) in (281, 282, 285)  # tabby/tiger/Egyptian
    assert imagenet_top1(model, skimage_data.coffee()) == 967  # espresso


def test_weights_record_names_source_and_hash(lite_weights):
    record = __import__("json").loads((lite_weights / "weights.json").read_text())
    assert record["source_hash"] == backbones.REGISTRY[record["backbone"]].weights.file_hash
    target = lite_weights / record["file"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == record["sha256"]


@pytest.mark.parametrize("name", LITE)
def test_conversion_refuses_missing_or_extra_tensors(name):
    backbone = backbones.get(name)
    state = read_state_dict(package_file(backbone.weights.package, backbone.weights.file_name))
    model = backbone.build(32, include_top=True)
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(UserError, match="_blocks.3._bn1.running_var"):
        load_lite_state(model, missing)
    with pytest.raises(UserError, match="unused"):
        load_lite_state(model, {**state, "_extra.weight": np.zeros(3, np.float32)})
    wrong = {**state, "_conv_stem.weight": np.zeros((32, 3, 5, 5), np.float32)}
    with pytest.raises(UserError, match="_conv_stem.weight has shape"):
        load_lite_state(model, wrong)


@pytest.mark.parametrize(
    ("name", "blocks"), [("efficientnet_lite0", 16), ("efficientnet_lite2", 21)]
)
def test_lite_block_starts_name_every_block_from_the_top(name, blocks):
    backbone = backbones.get(name)
    model = backbone.build(32)
    dwconvs = [layer.name for layer in model.layers if layer.name.endswith("_dwconv")]
    assert len(dwconvs) == len(backbone.block_starts) == blocks
    assert [start + "dwconv" for start in backbone.block_starts] == dwconvs[::-1]
    first = model.layers[backbones.block_start_index(model, backbone, blocks)]
    assert first.name == "block00_dwconv"  # block 0 has no expansion


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump({"weight": _Evil()}, handle, protocol=2)
    with pytest.raises(UnsafeCheckpoint, match="refusing to load global (posix|os|nt).system"):
        read_state_dict(path)


# --- downloads against a real HTTP server on 127.0.0.1 ------------------------------------------

PAYLOAD = np.random.default_rng(0).bytes(300_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: Counter = Counter()
    files: dict[str, bytes] = {}  # path -> body; anything else gets PAYLOAD

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # http.server's name
        _Handler.hits[self.path] += 1
        if self.path == "/missing.bin":
            self.send_error(404, "Not Found")
            return
        body = _Handler.files.get(self.path, PAYLOAD)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/drop.bin":  # the connection dies halfway
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_then_cache_hit(server, tmp_path):
    path = download.fetch(f"{server}/cached.bin", "good.bin", SHA, tmp_path, backoff=0)
    assert path.read_bytes() == PAYLOAD
    again = download.fetch(f"{server}/cached.bin", "good.bin", SHA, tmp_path, backoff=0)
    assert again == path and _Handler.hits["/cached.bin"] == 1  # a path no other test fetches
    assert leftovers(tmp_path) == ["good.bin"]


def test_md5_pins_work_like_keras(server, tmp_path):
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    path = download.fetch(f"{server}/good.bin", "md5.bin", md5, tmp_path, backoff=0)
    assert path.read_bytes() == PAYLOAD


def test_hash_mismatch_names_both_hashes_and_keeps_nothing(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(download.DownloadError, match=f"expected {wrong} but got {SHA}"):
        download.fetch(f"{server}/good.bin", "x.bin", wrong, tmp_path, backoff=0)
    assert leftovers(tmp_path) == []


def test_dropped_connection_is_retried_then_fails_cleanly(server, tmp_path):
    before = _Handler.hits["/drop.bin"]
    with pytest.raises(download.DownloadError, match="after 3 tries"):
        download.fetch(f"{server}/drop.bin", "drop.bin", SHA, tmp_path, retries=3, backoff=0)
    assert _Handler.hits["/drop.bin"] - before == 3
    assert leftovers(tmp_path) == []


def test_404_fails_at_once_with_how_to(server, tmp_path):
    before = _Handler.hits["/missing.bin"]
    with pytest.raises(download.DownloadError, match="HTTP 404.*copy the file to"):
        download.fetch(f"{server}/missing.bin", "m.bin", SHA, tmp_path, retries=3, backoff=0)
    assert _Handler.hits["/missing.bin"] - before == 1


def test_offline_without_cache_says_how_to_provide_the_file(tmp_path):
    with pytest.raises(download.DownloadError, match="offline\\? copy the file to"):
        download.fetch("http://127.0.0.1:9/none.h5", "none.h5", SHA, tmp_path, retries=2, backoff=0)


def test_plain_http_to_other_hosts_is_refused(tmp_path):
    with pytest.raises(download.DownloadError, match="only https://"):
        download.fetch("http://example.com/w.h5", "w.h5", SHA, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), [("efficientnetb0", 32), ("inceptionv3", 75)])
def test_download_backbones_end_to_end_from_a_loopback_server(
    name, size, server, tmp_path, monkeypatch
):
    """Keras's published-file path, served from 127.0.0.1: a legacy .h5 made from Keras's own
    architecture is downloaded, hash-checked, loaded into our builder and frozen."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    stock = {
        "efficientnetb0": keras.applications.EfficientNetB0,
        "inceptionv3": keras.applications.InceptionV3,
    }[name](include_top=False, weights=None, input_shape=(size, size, 3))
    rng = np.random.default_rng(1)
    stock.set_weights(
        [w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in stock.get_weights()]
    )
    served = tmp_path / "served.h5"
    with h5py.File(served, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, stock)
    _Handler.files[f"/{name}.h5"] = served.read_bytes()
    entry = backbones.REGISTRY[name]
    pinned = dataclasses.replace(
        entry.weights, file_hash=hashlib.md5(served.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(backbones.REGISTRY, name, dataclasses.replace(entry, weights=pinned))
    cache = tmp_path / "cache"
    params = small_params(
        base={"backbone": name, "image_size": size},
        weights={"cache_dir": str(cache), "url": f"{server}/{name}.h5"},
    )
    weights = fetch_weights(tmp_path / "weights", params)
    assert (cache / entry.weights.file_name).read_bytes() == served.read_bytes()
    rebuilt = backbones.get(name).build(size)
    rebuilt.load_weights(str(weights / f"{name}.weights.h5"))
    assert len(rebuilt.get_weights()) == len(stock.get_weights())
    assert all(
        np.array_equal(a, b)
        for a, b in zip(rebuilt.get_weights(), stock.get_weights(), strict=True)
    )
    frozen = freeze_backbone(weights, tmp_path / "backbone", params, size)
    assert_frozen(keras.saving.load_model(frozen / "backbone.keras"))


def assert_frozen(extractor) -> None:
    norms = [layer for layer in extractor.layers if type(layer).__name__ == "BatchNormalization"]
    assert norms and not any(layer.trainable for layer in norms)
    assert not extractor.trainable_weights
    x = np.random.default_rng(2).uniform(0, 255, (3, 32 * 3, 32 * 3, 3)).astype("float32")
    x = x[:, : extractor.input_shape[1], : extractor.input_shape[2]]
    assert np.allclose(extractor(x, training=True), extractor(x, training=False), atol=1e-5)


def test_freeze_step_on_real_lite_weights(lite_weights, tmp_path):
    import keras

    params = small_params(base={"backbone": lite_name(lite_weights)})
    out = freeze_backbone(lite_weights, tmp_path / "backbone", params, 32)
    extractor = keras.saving.load_model(out / "backbone.keras")
    assert extractor.output_shape == (None, 1280)
    assert_frozen(extractor)
    assert "Trainable params: 0" in (out / "summary.txt").read_text()


@pytest.mark.parametrize(("name", "size"), [("efficientnetb0", 32), ("inceptionv3", 75)])
def test_other_backbones_freeze_without_dropout_effects(name, size):
    backbone = backbones.get(name)
    extractor = backbones.freeze(
        backbones.feature_extractor(backbone.build(size), backbone.cut_layer)
    )
    assert_frozen(extractor)
