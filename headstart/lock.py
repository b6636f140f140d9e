"""One writer per workspace: an exclusive lock that the flow, `headstart step` (so `dvc repro`)
and the scheduled retrain all take before touching artifacts.

The lock is `fcntl.flock` on `<root>/.headstart/lock`: the kernel drops it when its holder dies,
so a killed run never blocks the next one. The file records the holder's pid and command, which
is what a refused run reports; a record left by a dead pid is a stale lock, taken over and said
so. Re-entrant within one process (the flow holds it while its steps take it again).

The holder can lend the lock to its own workers in other processes (the flow's Dask workers):
it passes them the random token the lock file records (`handoff_token`), and a worker holding
`borrowed(root, token)` runs steps as part of the holder's run, while the holder holds the lock;
any other process is refused as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from headstart.errors import UserError

log = logging.getLogger("headstart.lock")

STATE_DIR = ".headstart"  # per-workspace state: the lock; ignored by git and DVC
TOKEN_ENV = "HEADSTART_LOCK_TOKEN"  # `headstart step` borrows the lock with this token, if set
_held: dict[Path, list] = {}  # lock file -> [open handle, depth, token]
_borrowed: dict[Path, int] = {}  # lock file -> tasks of this process running on a lent lock
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


def _held_by(holder: dict) -> str:
    """The one wording of a refusal, whichever path found the workspace taken."""
    return f"another headstart run holds this workspace: {_describe(holder)}"


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} (`{holder.get('command', '?')}`, since {holder.get('since', '?')})"


@contextlib.contextmanager
def workspace_lock(root: Path | str, wait: bool = False, poll: float = 1.0) -> Iterator[bool]:
    """Hold the workspace lock for the block. Yields True for the outermost holder in this
    process (the one that may clean up after dead runs). With `wait`, block until the holder is
    done (saying so once); without, fail at once with one line naming the holder."""
    path = _path(root)
    with _guard:
        nested = path in _held
        if nested:
            _held[path][1] += 1
        lent = not nested and path in _borrowed
    if lent:  # part of the run that lent this process the lock
        yield False
        return
    if nested:
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
            except BlockingIOError:
                holder = _held_by(_holder(path))
            else:
                repro = dvc_runs(root)  # between its stages, dvc repro holds no lock of ours
                if not repro:
                    break
                fcntl.flock(handle, fcntl.LOCK_UN)
                holder = f"`{repro[0][1]}` (pid {repro[0][0]}) is running in this workspace"
            if not wait:
                raise LockedError(
                    f"{Path(root).resolve()}: {holder}; wait for it to finish (or use --wait)"
                )
            if not told:
                log.warning("waiting: %s", holder)
                told = True
            time.sleep(poll)
        previous = _holder(path)
        if previous.get("pid") and previous["pid"] != os.getpid() and not _alive(previous["pid"]):
            log.warning(
                "taking over a stale lock: %s ended without releasing it", _describe(previous)
            )
            _repair_dvc_rwlock(root)
        token = secrets.token_hex(16)
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "token": token,
                }
            )
        )
        handle.flush()
        with _guard:
            _held[path] = [handle, 0, token]
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


def _repair_dvc_rwlock(root: Path | str) -> None:
    """DVC's own lock table (.dvc/tmp/rwlock), truncated by a run killed while DVC rewrote it,
    makes every later DVC call fail with a JSON traceback. With the workspace lock held and no
    DVC run alive (checked just before), a table that is not JSON is removed: DVC starts a
    fresh one."""
    table = Path(root) / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(table.read_text())
    except FileNotFoundError:
        return
    except ValueError:  # empty or cut short
        table.unlink(missing_ok=True)
        log.warning("removed DVC's damaged lock table %s (left by the run that ended)", table)


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        fields = _stat(pid)
        if len(fields) < 2:
            break
        pid = int(fields[1])
    return found


def dvc_runs(root: Path | str) -> list[tuple[int, str]]:
    """(pid, command) of each `dvc repro` / `dvc exp run` working in the project at `root` that
    is not this process's own ancestor (its stages run `headstart step`). DVC takes its lock
    per stage and releases it while a stage's command runs, so another run could otherwise slip
    in between two of its stages; this makes it one writer for the whole of its work. Linux
    (/proc); elsewhere none are seen."""
    top = os.path.realpath(root)
    mine, runs = _ancestors(os.getpid()), []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            args = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(Path(entry.path, "cwd"))
        except OSError:
            continue
        words = [Path(arg).name for arg in args if arg]
        at = words.index("dvc") if "dvc" in words else -1
        rest = words[at + 1 :] if at >= 0 else []
        writes = "repro" in rest or ("exp" in rest and "run" in rest)
        if writes and (cwd == top or cwd.startswith(top + os.sep)):
            runs.append((int(entry.name), " ".join(words[at:])))
    return runs


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _command(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


SERVER_RECORD = "prefect-server.json"  # in STATE_DIR: the temporary Prefect server of a run
PREFECT_SERVER_APP = "prefect.server.api.server:create_app"  # in its command line


def record_prefect_server(root: Path | str) -> None:
    """Record the temporary Prefect server this process started (Prefect starts one when no
    server is configured, and stops it when the process exits normally), so the next run can
    stop it if this process is killed first (kill -9, the OOM killer)."""
    me = str(os.getpid())
    servers = (
        [
            int(entry.name)
            for entry in os.scandir("/proc")
            if entry.name.isdigit()
            and _stat(int(entry.name))[1:2] == [me]
            and PREFECT_SERVER_APP in _command(int(entry.name))
        ]
        if os.path.isdir("/proc")
        else []
    )
    if servers:
        record = Path(root) / STATE_DIR / SERVER_RECORD
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"pid": servers[0], "parent": os.getpid()}))


def stop_orphaned_server(root: Path | str) -> int | None:
    """Stop the temporary Prefect server a killed run left (see `record_prefect_server`);
    returns its pid, or None when there is none."""
    record = Path(root) / STATE_DIR / SERVER_RECORD
    try:
        pid, parent = (json.loads(record.read_text())[key] for key in ("pid", "parent"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _stat(parent)[:1] not in ([], ["Z"]):
        return None  # its run is still going
    record.unlink(missing_ok=True)
    state = _stat(pid)
    if not state or state[0] == "Z" or int(state[1]) == parent:
        return None
    if PREFECT_SERVER_APP not in _command(pid):
        return None  # the pid now belongs to something else
    os.kill(pid, signal.SIGTERM)
    return pid


def _path(root: Path | str) -> Path:
    return (Path(root) / STATE_DIR / "lock").resolve()


def handoff_token(root: Path | str) -> str:
    """The token that lends the lock this process holds to its workers (see `borrowed`)."""
    with _guard:
        if _path(root) not in _held:
            raise RuntimeError(f"{root}: this process does not hold the workspace lock")
        return _held[_path(root)][2]


@contextlib.contextmanager
def borrowed(root: Path | str, token: str | None) -> Iterator[None]:
    """Within the block, this process works under the lock its holder lent it with `token`:
    `workspace_lock` is then re-entrant here. Refused (LockedError) when another run holds the
    workspace, or when no run holds it any more (the lender ended: its work is void). No token
    (nothing lent): the block runs as it is, taking the lock itself where it needs it."""
    if not token:
        yield
        return
    path = _path(root)
    with _guard:
        lent = path in _held and _held[path][2] == token  # the holder itself
    if not lent:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(path)
                if holder.get("token") != token:
                    raise LockedError(f"{Path(root).resolve()}: {_held_by(holder)}") from None
            else:
                fcntl.flock(probe, fcntl.LOCK_UN)
                raise LockedError(
                    f"{Path(root).resolve()}: the run that handed out this task "
                    "no longer holds the workspace; run again"
                )
    with _guard:
        _borrowed[path] = _borrowed.get(path, 0) + 1
    try:
        yield
    finally:
        with _guard:
            _borrowed[path] -= 1
            if not _borrowed[path]:
                del _borrowed[path]
