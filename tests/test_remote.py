"""Artifacts through a DVC remote: what a run records is what a colleague's fresh clone pulls and
uses without training; and what this repository ships lets a fresh clone pull cleanly and run
without changing a tracked file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import class_pattern, cli_here, git_clone, run_in

pytestmark = pytest.mark.slow


def test_a_run_pushed_to_a_remote_is_pulled_into_a_fresh_clone_and_predicts_untrained(
    trained_copy, tmp_path
):
    root = trained_copy  # after one whole flow run, as `headstart run` leaves it
    run_in(root, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    run_in(root, "git", "add", "-A")  # what a user commits: dvc.lock and the remote
    run_in(root, "git", "commit", "-qm", "trained")
    run_in(root, "dvc", "push")

    clone = tmp_path / "clone"
    run_in(tmp_path, "git", "clone", "-q", str(root), str(clone))
    pulled = run_in(clone, "dvc", "pull")  # plain pull: exit 0, nothing missing
    assert "missing" not in (pulled.stdout + pulled.stderr).lower(), pulled.stderr
    assert run_in(clone, "dvc", "status", "--json").stdout.strip() == "{}"
    before = mtimes(clone)

    class_pattern(1, seed=4242).save(tmp_path / "photo.png")
    predicted = cli_here("predict", str(tmp_path / "photo.png"), "--json", cwd=clone)
    assert predicted.returncode == 0, predicted.stderr
    (answer,) = json.loads(predicted.stdout)
    assert answer["top"][0][0] in ("class_0", "class_1"), answer
    status = run_in(clone, "headstart", "status").stdout.splitlines()
    assert status and all(line.endswith("up to date") for line in status), status
    again = run_in(clone, "headstart", "run")  # nothing to retrain: no flow run at all
    assert "Every step is up to date" in again.stdout, again.stdout

    assert mtimes(clone) == before  # no step rebuilt anything
    assert run_in(clone, "dvc", "status", "--json").stdout.strip() == "{}"
    assert run_in(clone, "git", "status", "--porcelain").stdout == ""


def test_a_run_changes_no_file_git_tracks(trained_project):
    """dvc.lock is each project's own record, not part of this repository: a run in a fresh
    clone (here the tiny project's first run) leaves `git status` without a modified file."""
    tracked = run_in(trained_project.root, "git", "status", "--porcelain", "--untracked-files=no")
    assert tracked.stdout == ""


def test_a_fresh_clone_pulls_the_demo_data_cleanly(tmp_path):
    clone = git_clone(tmp_path / "clone")
    assert not (clone / "dvc.lock").exists()  # no record of outputs that no remote holds
    pulled = run_in(clone, "dvc", "pull", "data.dvc")  # what `make demo` does first
    assert "missing" not in (pulled.stdout + pulled.stderr).lower(), pulled.stderr
    assert len(list((clone / "data").rglob("*.png"))) >= 1000
    assert run_in(clone, "dvc", "status", "--json", "data.dvc").stdout.strip() == "{}"
    assert run_in(clone, "git", "status", "--porcelain").stdout == ""


def mtimes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for path in (root / "artifacts").rglob("*")
    }
