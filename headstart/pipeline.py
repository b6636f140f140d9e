"""How a step runs, whichever way it is started (`headstart step`, a Prefect task, `dvc repro`):
under the workspace lock, after removing what killed runs left, with its output folder stamped
with the parameters dvc.yaml lists for its stage. The step list itself is `tasks.STEPS`."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from headstart import features, files
from headstart.errors import UserError, describe, environment_failure
from headstart.lock import stop_orphaned_server, workspace_lock
from headstart.params import Params, to_dict

log = logging.getLogger("headstart.pipeline")


def run_step(
    name: str,
    function: Callable[[Params, Path], Path],
    params: Params,
    root: Path,
    wait: bool = False,
    output: str | None = None,
) -> Path:
    """`output`: the `paths` key of the folder the step replaces, refused up front (before any
    work) when something there was not written by headstart."""
    with workspace_lock(root, wait=wait) as outermost:
        if outermost:
            clean_up(params, root)
        if output is not None:
            files.check_replaceable(params.path(output, root))
        with files.stamping(stamp(name, params, root)):
            try:
                return function(params, root)
            except UserError:
                raise
            except Exception as err:
                if environment_failure(err):  # a full disk: one line, not a traceback
                    raise UserError(
                        f"{name}: {describe(err)}; free space or fix the folder's "
                        "permissions, then run again"
                    ) from None
                raise


def _stages(root: Path | str) -> dict:
    """dvc.yaml's stages in the project at `root` (empty without a dvc.yaml)."""
    import yaml

    dvc_yaml = Path(root) / "dvc.yaml"
    return yaml.safe_load(dvc_yaml.read_text())["stages"] if dvc_yaml.is_file() else {}


def stage_params(name: str, params: Params, root: Path | str) -> dict:
    """The parameters a stage reads, as dvc.yaml lists them (`section` or `section.key`), with
    their values; every parameter when there is no dvc.yaml (a step called outside a project)."""
    values = to_dict(params)
    stage = _stages(root).get(name, {})
    keys = stage.get("params") if stage else None
    if keys is None:
        return values
    picked: dict = {}
    for key in keys:
        section, _, item = str(key).partition(".")
        if item:
            picked[key] = values[section][item]
        else:
            picked[key] = values[section]
    return picked


def check_inputs(name: str, params: Params, root: Path | str) -> None:
    """Before a step starts (and TensorFlow loads): every output of another step that dvc.yaml
    lists among stage `name`'s deps exists, or a UserError naming the step that makes it. Needs
    the project's dvc.yaml (without one the step's own checks still say it, later)."""
    stages = _stages(root)
    producers = {
        path: stage
        for stage, spec in stages.items()
        for out in spec.get("outs", [])
        for path in ([out] if isinstance(out, str) else out)
    }
    for dep in stages.get(name, {}).get("deps", []):
        key = re.fullmatch(r"\$\{paths\.(\w+)\}(/.*)?", str(dep))
        if key is None:
            continue
        producer = producers.get(f"${{paths.{key.group(1)}}}")
        if producer and producer != name:
            files.require(
                params.path(key.group(1), root) / (key.group(2) or "").lstrip("/"), producer
            )


def stamp(name: str, params: Params, root: Path | str) -> dict:
    return {"step": name, "params": stage_params(name, params, root)}


def written_with(name: str, output: str, params: Params, root: Path | str) -> bool:
    """Does step `name`'s output folder (the `paths` key `output`) say it was written with these
    parameters? (What the flow checks before recording it in dvc.lock: a folder written by
    another run does not match.)"""
    marker = files.read_marker(params.path(output, root))
    return marker == {"written_by": "headstart", **stamp(name, params, root)}


def clean_up(params: Params, root: Path | str) -> None:
    """Remove what killed runs left: atomic_dir's own temporary folders next to outputs, and
    the feature shards of a run spread over workers (complete or not: a run makes its own)."""
    parents = [params.path(name, root).parent for name in to_dict(params)["paths"]]
    left = files.remove_stale_temporaries(parents)
    server = stop_orphaned_server(root)
    if server is not None:
        log.info("stopped the temporary Prefect server (pid %d) of a run that was killed", server)
    shards = features.shards_root(params.path("features", root))
    if shards.is_dir():
        shutil.rmtree(shards)
        left.append(shards)
    for path in left:
        log.info("removed %s, left by a run that did not finish", path)
