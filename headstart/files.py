"""Atomic writes, output ownership and small file helpers shared by every step."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headstart.errors import UserError

# Every output folder a step writes carries this file: a step replaces only folders that hold
# it (or that dvc.lock records as outputs, for folders written before the marker existed).
MARKER = ".headstart-output"
_STAMP: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "headstart_stamp", default=None
)
_OURS = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]+$")  # atomic_dir's temporary names


@contextlib.contextmanager
def stamping(stamp: dict) -> Iterator[None]:
    """Within this block, output markers record `stamp` (the step and the parameters it ran
    with). Deterministic content only: the marker is part of a DVC-tracked output."""
    token = _STAMP.set(stamp)
    try:
        yield
    finally:
        _STAMP.reset(token)


def read_marker(folder: Path | str) -> dict | None:
    path = Path(folder) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _owned(target: Path) -> bool:
    """Is `target` a folder headstart may replace? Ours by marker, or recorded in dvc.lock."""
    if (target / MARKER).is_file():
        return True
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return True  # an empty folder holds nothing to lose
    for parent in (target.parent, *target.parents):
        lock = parent / "dvc.lock"
        if lock.is_file():
            import yaml

            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            outs = {out["path"] for stage in stages.values() for out in stage.get("outs", [])}
            rel = os.path.relpath(target, parent)
            return any(out == rel or out.startswith(rel + "/") for out in outs)
    return False


def check_replaceable(target: Path | str) -> Path:
    """`target`, or a UserError when something there was not written by headstart."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not _owned(target)):
        raise UserError(
            f"{target}: exists and was not written by headstart; refusing to replace it "
            "(move it away, or point the paths.* setting at another folder)"
        )
    return target


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` whole.

    On any error the temporary folder is removed, so a failed step leaves nothing half-written
    (and an earlier complete output, if any, stays as it was). `target` is replaced only when
    headstart made it: anything else there is refused, never deleted.
    """
    target = check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        stamp = {"written_by": "headstart", **(_STAMP.get() or {})}
        (tmp / MARKER).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folders: list[Path]) -> list[Path]:
    """Delete atomic_dir's leftovers (`.NAME.tmp-*`, `.NAME.old-*`) in `folders`: what a killed
    run leaves. Call only while holding the workspace lock (no live run is writing them)."""
    removed = []
    for folder in dict.fromkeys(folders):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _OURS.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def write_text(path: Path | str, text: str) -> Path:
    """Write text atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path | str, data: Any) -> Path:
    """Strict JSON (a NaN or infinity is a bug: it raises instead of writing invalid JSON)."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def timings_path(out_dir: Path | str) -> Path:
    """Where a step keeps its timings: beside its output, outside it (timings differ run to run,
    so inside a DVC-tracked output they would make identical results look changed)."""
    out_dir = Path(out_dir)
    return out_dir.parent / ".timings" / f"{out_dir.name}.json"


def write_timings(out_dir: Path | str, seconds: dict[str, float]) -> Path:
    return write_json(timings_path(out_dir), {k: round(v, 3) for k, v in seconds.items()})


def file_digest(path: Path | str, kind: str = "sha256") -> str:
    """The hex digest of a file's bytes (`kind`: a hashlib name), read 1 MiB at a time."""
    digest = hashlib.new(kind)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path | str) -> str:
    return file_digest(path, "sha256")


def require(path: Path | str, producer: str) -> Path:
    """`path`, or a UserError saying which step makes it (for steps run out of order)."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path}: missing; run `headstart step {producer}` first (or `headstart run`)"
        )
    return path


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def save_keras(model, path: Path | str) -> Path:
    """`model.save(path)`, made byte-identical for identical models: Keras stamps the save time
    into the zip's entries and into metadata.json ("date_saved"), so every rerun of a step gave
    a new file, and DVC reran every step after it. Both stamps are taken out."""
    path = Path(path)
    model.save(path)
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as target:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=_ZIP_EPOCH)
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            target.writestr(fixed, data)
    os.replace(tmp, path)
    return path


def write_summary(model, path: Path | str) -> Path:
    """A Keras model's summary as a text artifact (what `model.summary()` prints)."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=110)
    return write_text(path, "\n".join(lines) + "\n")
