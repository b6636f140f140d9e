"""DVC as the single notion of "up to date": which stages are stale, and recording a run's
outputs in dvc.lock (what `dvc commit` does) so `dvc status` is clean afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from headstart.errors import UserError

log = logging.getLogger("headstart.dvc")


@contextlib.contextmanager
def repo(root: Path | str = ".") -> Iterator:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.exceptions import NotDvcRepoError
    from dvc.lock import LockError
    from dvc.repo import Repo

    previous = os.getcwd()
    try:
        os.chdir(root)  # DVC resolves targets and outputs against the working directory
        with Repo(".") as handle:
            yield handle
    except NotDvcRepoError:
        raise UserError(
            f"{Path(root).resolve()}: not a DVC project (no .dvc/); run from the "
            "project root or `dvc init`"
        ) from None
    except LockError:
        raise UserError(
            f"{Path(root).resolve()}: another DVC command holds this project's "
            "lock (.dvc/tmp/lock); wait for it to finish and run again"
        ) from None
    finally:
        os.chdir(previous)


def changed(root: Path | str, stage: str) -> list:
    """What DVC reports as changed for one stage (empty when it is up to date). A dependency DVC
    cannot read (a symlink loop or a dangling link in data/) makes the stage changed: prepare
    reports such links, and running it is the only way to say which."""
    with repo(root) as handle:
        try:
            return handle.status(targets=[stage]).get(stage, [])
        except OSError as err:
            log.warning("%s: DVC cannot check it (%s); treating it as changed", stage, _why(err))
            return [{"unreadable dependency": _why(err)}]


def commit(root: Path | str, stage: str) -> str | None:
    """Record a stage's current deps, params and outputs in dvc.lock and the DVC cache. Returns
    why it could not (a dependency DVC cannot read), or None when it is recorded."""
    with repo(root) as handle:
        try:
            handle.commit(target=stage, force=True)
        except OSError as err:
            return f"DVC cannot read {_why(err)}; remove or fix that link in the data folder"
    return None


def _why(err: OSError) -> str:
    return f"{err.filename}: {err.strerror}" if err.filename else str(err)


def stale_stages(root: Path | str = ".") -> list[str]:
    """Stages `dvc repro` would run now: changed ones and everything downstream of them."""
    with repo(root) as handle:
        try:
            direct = set(handle.status())
        except OSError:  # an unreadable dependency: ask stage by stage
            direct = {
                s.addressing for s in handle.index.stages if s.cmd and changed(root, s.addressing)
            }
        stages = [s for s in handle.index.stages if s.cmd]
        outs = {s.addressing: [str(o.fs_path) for o in s.outs] for s in stages}
        stale: list[str] = []
        for stage in stages:  # dvc.yaml order is topological for headstart's pipeline
            deps = [str(d.fs_path) for d in stage.deps]
            upstream = any(
                dep == out or dep.startswith(out + os.sep) or out.startswith(dep + os.sep)
                for name in stale
                for out in outs[name]
                for dep in deps
            )
            if stage.addressing in direct or upstream:
                stale.append(stage.addressing)
        return stale


def has_remote(root: Path | str = ".") -> bool:
    with repo(root) as handle:
        return bool(handle.config["core"].get("remote"))


def pull_data(root: Path | str = ".", target: str = "data.dvc") -> None:
    with repo(root) as handle:
        handle.pull(targets=[target])


def track(root: Path | str, path: str) -> None:
    """`dvc add` a folder (the data, the promoted model), so it is versioned like every other
    artifact; without DVC's "git add" hint (the caller says what to commit)."""
    with repo(root) as handle:
        handle.scm_context.quiet = True
        handle.add(path)


CHANGE_KINDS = {"added": "added", "modified": "changed", "deleted": "removed"}
DATA_MODES = ("auto", "record", "pull")  # headstart run/schedule --data


def data_changes(root: Path | str, data: str) -> dict[str, list[str]]:
    """Files under the data folder that differ from the version its .dvc file records, by kind
    (added, modified, deleted), as `dvc data status` lists them."""
    with repo(root) as handle:
        status = handle.data_status(granular=True, untracked_files="no")
    prefix = data.rstrip("/") + "/"
    uncommitted = status.get("uncommitted", {})
    return {
        kind: sorted(
            path
            for path in uncommitted.get(kind, [])
            if path.startswith(prefix) and not path.endswith("/")
        )
        for kind in CHANGE_KINDS
    }


def describe_changes(changes: dict[str, list[str]], shown: int = 3) -> str:
    counts = ", ".join(
        f"{len(files)} {CHANGE_KINDS[kind]}" for kind, files in changes.items() if files
    )
    names = [path for files in changes.values() for path in files]
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return f"{counts} ({', '.join(names[:shown])}{more})"


def sync_data(root: Path | str, data: str, mode: str = "auto") -> str | None:
    """Make the data version DVC records match the data the run will train on; returns one line
    saying what was done (None: nothing to do).

    `auto`: the data folder as it is is the source: files added, changed or removed since its
    .dvc file are recorded as a new version (`dvc add`, never a pull over them); a missing or
    empty data folder is pulled from the DVC remote when one is configured (a fresh clone).
    `record`: record the folder as it is. `pull`: check out the recorded version from the
    remote, refused while the folder holds files that version does not have."""
    if mode not in DATA_MODES:
        raise UserError(f"--data {mode}: must be one of {', '.join(DATA_MODES)}")
    root = Path(root)
    folder, record = root / data, root / f"{data}.dvc"
    empty = not folder.is_dir() or not any(folder.iterdir())
    if mode == "pull" or (mode == "auto" and empty and record.is_file()):
        if not record.is_file():
            raise UserError(
                f"--data pull: {record.name} not found; nothing records a version "
                f"of {data}/ to pull (`--data record` records it)"
            )
        if not has_remote(root):
            if mode == "pull":
                raise UserError(
                    "--data pull: no DVC remote is configured (dvc remote add -d "
                    "NAME URL), or use --data record"
                )
            return None
        unsaved = (
            []
            if empty
            else [path for kind in ("added", "modified") for path in data_changes(root, data)[kind]]
        )
        if unsaved:
            raise UserError(
                f"--data pull: {data}/ holds {len(unsaved)} file(s) that "
                f"{record.name} does not record (e.g. {unsaved[0]}); --data record "
                "records them as a new version, or move them away"
            )
        pull_data(root, record.name)
        return f"data: checked out the version {record.name} records (dvc pull)"
    if empty:
        return None  # prepare says what is missing
    try:
        if not record.is_file():
            track(root, data)
            return (
                f"data: recorded {data}/ in {record.name} (new); commit it: git add "
                f"{record.name} .gitignore"
            )
        changes = data_changes(root, data)
        if not any(changes.values()):
            return None
        track(root, data)
    except OSError as err:  # a link DVC cannot follow: prepare reports it, the run goes on
        return (
            f"data: not recorded in {record.name}: DVC cannot read {_why(err)}; remove or "
            "fix that link in the data folder"
        )
    return (
        f"data: recorded a new version in {record.name}: {describe_changes(changes)}; "
        f"commit it: git add {record.name}"
    )
