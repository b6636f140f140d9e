"""Fixtures and pytest hooks; the helpers they use are in tests/helpers.py."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# DVC binds its console log handlers to sys.stdout/sys.stderr when first imported (dvc/__init__
# calls dvc.logger.setup()). Imported here, under pytest's session-wide capture: otherwise a test
# using capfd or capsys that happens to be the first in its worker to import it (through
# headstart.dvcstate) leaves DVC logging into a stream closed at that test's end, and every later in-process DVC
# commit in that worker fails ("I/O operation on closed file" on "Updating lock file").
import dvc  # noqa: F401
import pytest
from helpers import SHARED, built_once, tiny_project, write_bad_files, write_good_images

for _key, _value in {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (a stable sort: pytest-randomly's order holds within each group).
    xdist hands each worker a contiguous half of this list: one starts on the end-to-end tests
    (building the trained project while the other runs fast tests instead of waiting for it),
    and the short tests are left to fill the end instead of one worker finishing a two-minute
    test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or the only process
        os.environ[SHARED] = tempfile.mkdtemp(prefix="headstart-tests-")


def pytest_unconfigure(config: pytest.Config) -> None:
    """After the last test of every worker: stop the shared Prefect server, if one started."""
    if hasattr(config, "workerinput") or SHARED not in os.environ:
        return
    shared = Path(os.environ.pop(SHARED))
    record = shared / "prefect-server.json"
    if record.is_file():
        pid = json.loads(record.read_text())["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # ProcessLookupError once it is gone
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(shared, ignore_errors=True)


def shared_prefect_server() -> str:
    """The API URL of one real local Prefect server (`prefect server start` through
    flows.scheduling.start_local_server: SQLite, scheduler running) that every process of this
    test run uses; the first to ask starts it, the controller stops it at the end. One server
    instead of one per xdist worker plus one for the schedule test: each start costs ~20 s of
    CPU (mostly database migrations)."""
    from flows.scheduling import start_local_server

    shared = Path(os.environ[SHARED])
    record = shared / "prefect-server.json"
    with open(shared / "prefect-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here until it answers
        if not record.exists():
            # not tied to this worker: the controller stops it when every worker is done
            process, api_url = start_local_server(shared / "prefect-server", tied=False)
            record.write_text(json.dumps({"pid": process.pid, "api_url": api_url}))
    return json.loads(record.read_text())["api_url"]


@pytest.fixture(scope="session")
def prefect_harness() -> str:
    """The shared Prefect server (above) for every test that runs a flow or task, in this
    process and in the `headstart run` subprocesses given its URL as PREFECT_API_URL (which then
    start no temporary server of their own); yields its API URL."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = shared_prefect_server()
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        # also for contexts copied before this fixture (as prefect_test_harness does)
        with _temporary_global_settings_context(get_settings_context()):
            yield api_url


@pytest.fixture
def good_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_good_images(data)
    return data


@pytest.fixture
def messy_data(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    data = tmp_path / "data"
    write_good_images(data)
    return data, write_bad_files(data)


@dataclass(frozen=True)
class Trained:
    root: Path  # never changed by a test: copy it with `trained_copy`
    first_run: dict  # what the first flow run returned
    api_url: str  # the test harness's Prefect server


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, prefect_harness) -> Trained:
    """A tiny git+DVC project after one whole flow run (under the test harness). Tests work on
    their own copy (`trained_copy`), so none depends on another test or on the order."""
    from flows.pipeline import pipeline_flow

    def build(folder: Path) -> dict:
        return pipeline_flow(root=str(tiny_project(folder / "project")))

    folder, first_run = built_once(tmp_path_factory, "trained", build)
    return Trained(folder / "project", first_run, prefect_harness)


@pytest.fixture
def trained_copy(trained_project: Trained, tmp_path: Path) -> Path:
    """A private copy of the trained project (git repo, DVC cache, artifacts and all)."""
    return Path(shutil.copytree(trained_project.root, tmp_path / "project", symlinks=True))
