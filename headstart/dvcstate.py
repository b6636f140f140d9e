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
    from dvc.repo import Repo

    previous = os.getcwd()
    try:
        os.chdir(root)  # DVC resolves targets and outputs against the working directory
        with Repo(".") as handle:
            yield handle
    except NotDvcRepoError:
        raise UserError(f"{Path(root).resolve()}: not a DVC project (no .dvc/); run from the "
                        "project root or `dvc init`") from None  # fmt: skip
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
            direct = {s.addressing for s in handle.index.stages if s.cmd
                      and changed(root, s.addressing)}  # fmt: skip
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
    """`dvc add` a folder (the promoted model), so it is versioned like every other artifact."""
    with repo(root) as handle:
        handle.add(path)
