"""One writer per workspace: an exclusive lock that the flow, `headstart step` (so `dvc repro`)
and the scheduled retrain all take before touching artifacts.

The lock is `fcntl.flock` on `<root>/.headstart/lock`: the kernel drops it when its holder dies,
so a killed run never blocks the next one. The file records the holder's pid and command, which
is what a refused run reports; a record left by a dead pid is a stale lock, taken over and said
so. Re-entrant within one process (the flow holds it while its steps take it again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from headstart.errors import UserError

log = logging.getLogger("headstart.lock")

STATE_DIR = ".headstart"  # per-workspace state: the lock; ignored by git and DVC
_held: dict[Path, list] = {}  # lock file -> [open handle, depth]
_guard = threading.Lock()


class LockedError(UserError):
    """Another run holds the workspace."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} (`{holder.get('command', '?')}`, since {holder.get('since', '?')})"


@contextlib.contextmanager
def workspace_lock(root: Path | str, wait: bool = False, poll: float = 1.0) -> Iterator[bool]:
    """Hold the workspace lock for the block. Yields True for the outermost holder in this
    process (the one that may clean up after dead runs). With `wait`, block until the holder is
    done (saying so once); without, fail at once with one line naming the holder."""
    path = (Path(root) / STATE_DIR / "lock").resolve()
    with _guard:
        if path in _held:
            _held[path][1] += 1
            outermost = False
        else:
            outermost = True
    if not outermost:
        try:
            yield False
        finally:
            with _guard:
                _held[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise LockedError(
                        f"{Path(root).resolve()}: another headstart run holds this workspace: "
                        f"{_describe(holder)}; wait for it to finish (or use --wait)"
                    ) from None
                if not told:
                    log.warning("waiting for the run holding this workspace: %s", _describe(holder))
                    told = True
                time.sleep(poll)
        previous = _holder(path)
        if previous.get("pid") and previous["pid"] != os.getpid() and not _alive(previous["pid"]):
            log.warning("taking over a stale lock: %s ended without releasing it",
                        _describe(previous))  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }))  # fmt: skip
        handle.flush()
        with _guard:
            _held[path] = [handle, 0]
        try:
            yield True
        finally:
            with _guard:
                del _held[path]
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
