"""Feature extraction in shards (any number of processes) equals the one-process cache; the flow
runs the shards on Dask (a local cluster, or one started as separate processes) with the same
results; the workspace lock is handed to the flow's own workers and to nobody else."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    command_env,
    run_cli,
    run_in,
    small_params,
    write_good_images,
    write_random_backbone,
)

from headstart import features, lock
from headstart import params as params_module
from headstart.errors import UserError

BATCH = 4  # tiny batches: several batches per shard on a few dozen images
VIEWS = ("none", "flip_shift")  # view 1 augmented


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """Prepared tiny images, a random Lite0 backbone at 32 px, and the one-process cache with
    2 views (view 1 augmented)."""
    import keras

    from tasks.prepare import prepare

    root = tmp_path_factory.mktemp("shards")
    write_good_images(root / "data", classes=2, per_class=12)
    prepared = prepare(root / "data", root / "prepared", small_params())
    write_random_backbone(root / "backbone", seed=3)
    extractor = keras.saving.load_model(root / "backbone" / "backbone.keras")
    single = root / "single"
    features.cache_features(
        extractor, "key", prepared, single, views=VIEWS, seed=7, batch_size=BATCH
    )
    return root, prepared, extractor, single


def sharded(extraction, shards: int, target: Path, skip: int | None = None) -> list[Path]:
    """The cache in `shards` shards (all but number `skip`), each computed as a worker would."""
    root, prepared, extractor, _ = extraction
    plan = features.plan(prepared, VIEWS, shards, BATCH)
    out = features.shards_dir(target, "key")
    return [
        features.compute_shard(extractor, prepared, shard, out, 7, BATCH)
        for n, shard in enumerate(plan)
        if n != skip
    ]


def load_cache(cache: Path) -> dict:
    arrays = {path.name: np.load(path) for path in cache.glob("*.npy")}
    return {**arrays, "features.json": json.loads((cache / "features.json").read_text())}


def assert_same(before: dict, after: dict) -> None:
    """The same cache: features within 1e-6 of their scale (random weights: tiny features), the
    rest equal."""
    assert before.keys() == after.keys()
    for name, value in before.items():
        if name.endswith("_features.npy"):
            assert value.shape == after[name].shape and np.abs(value).max() > 0, name
            assert np.abs(value - after[name]).max() <= 1e-6 * np.abs(value).max(), name
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, after[name]), name
        else:
            assert value == after[name], name


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_shards_assemble_into_the_one_process_cache(extraction, tmp_path, shards):
    root, prepared, _, single = extraction
    files = sharded(extraction, shards, tmp_path / "features")
    assert len(files) >= min(shards, 4)  # 4 pieces at least: train views 0 and 1, val, test
    features.assemble("key", prepared, tmp_path / "features", VIEWS, shards, BATCH)
    assert_same(load_cache(single), load_cache(tmp_path / "features"))
    assert not (tmp_path / "features-shards").exists()  # shards are deleted once assembled


def test_the_augmented_view_is_augmented_and_fixed_by_the_seed(extraction):
    _, prepared, _, single = extraction
    train = np.load(single / "train_features.npy")
    images = len(train) // 2
    change = np.abs(train[:images] - train[images:]).max()
    assert change > 1e-3 * np.abs(train).max()  # view 1 is not a copy of view 0


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_missing_or_short_shard_fails_naming_it_and_writes_no_cache(extraction, tmp_path, damage):
    _, prepared, _, _ = extraction
    files = sharded(extraction, 3, tmp_path / "features")
    broken = files[1]
    if damage == "missing":
        broken.unlink()
    else:
        np.save(broken, np.load(broken)[:-1])
    with pytest.raises(UserError, match=f"{broken.name}: feature shard (missing|holds)"):
        features.assemble("key", prepared, tmp_path / "features", VIEWS, 3, BATCH)
    assert not (tmp_path / "features").exists()


HOLDER = """
import sys, time
from headstart.lock import workspace_lock, handoff_token
with workspace_lock(sys.argv[1]):
    print(handoff_token(sys.argv[1]), flush=True)
    time.sleep(60)
"""


def test_the_next_run_removes_the_shards_a_killed_run_left(tmp_path):
    """A run killed while its workers wrote shards leaves them, half-written ones too: the next
    run's clean-up (holding the lock, before any step) removes them and nothing else."""
    from headstart.pipeline import clean_up

    params = small_params()
    cache = params.path("features", tmp_path)
    left = features.shards_dir(cache, "0" * 64)
    left.mkdir(parents=True)
    (left / "train-view0-0-64.npy").write_bytes(b"complete")
    (left / ".train-view0-64-128.npy.x1y2").write_bytes(b"half")
    cache.mkdir()
    (cache / "train_features.npy").write_bytes(b"the cache")
    clean_up(params, tmp_path)
    assert not features.shards_root(cache).exists()
    assert (cache / "train_features.npy").read_bytes() == b"the cache"


def test_the_lock_is_lent_with_its_token_only_while_its_holder_holds_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        token = holder.stdout.readline().strip()
        with lock.borrowed(tmp_path, token):  # the holder's own worker
            with lock.workspace_lock(tmp_path) as outermost:
                assert not outermost  # a step inside runs as part of the holder's run
        with pytest.raises(lock.LockedError, match=f"pid {holder.pid} "):
            with lock.borrowed(tmp_path, "not-the-token"):
                pass
        with pytest.raises(lock.LockedError, match=f"pid {holder.pid} "):
            with lock.workspace_lock(tmp_path):  # lending changed nothing for anyone else
                pass
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(lock.LockedError, match="no longer holds"):
        with lock.borrowed(tmp_path, token):
            pass


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "error: --workers: must be 1 or more (got 0)"),
        (
            ["--dask-address", "tcp://127.0.0.1:1"],
            "error: --dask-address tcp://127.0.0.1:1: no Dask scheduler answers there",
        ),
        (
            ["--dask-address", "127.0.0.1:8786"],
            "error: --dask-address 127.0.0.1:8786: expected tcp://",
        ),
    ],
)
def test_bad_workers_or_address_fail_in_one_line(tmp_path, args, message):
    result = run_cli("run", "-C", str(tmp_path), *args)
    assert result.returncode == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1


def cache_and_metrics(root: Path) -> tuple[dict, dict]:
    params = params_module.load(root / "params.yaml")
    metrics = {
        path.name: json.loads(path.read_text())
        for path in params.path("metrics", root).glob("*.json")
    }
    return load_cache(params.path("features", root)), metrics


@pytest.fixture
def dask_cluster(tmp_path):
    """A Dask scheduler and two workers started as their own processes (`dask scheduler`,
    `dask worker`), as on other machines, on 127.0.0.1; yields the scheduler's address."""
    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": command_env()}
    processes = [
        subprocess.Popen(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            **quiet,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        # --no-nanny: a nanny would start the worker with one BLAS/OpenMP thread, and numpy's
        # sums then differ from a plain run's in the last bits
        processes += [
            subprocess.Popen(
                [dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                **quiet,
            )
            for _ in range(2)
        ]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.slow
def test_a_run_on_a_separate_dask_cluster_gives_the_cache_and_metrics_of_a_plain_run(
    trained_copy, trained_project, dask_cluster
):
    """`headstart run --dask-address` on a cluster started as separate processes, both branches
    stale: the baseline fit beside the head's feature shards, every step on the cluster's
    workers; the feature cache and the metrics are those of the one-process run."""
    from distributed import Client

    root = trained_copy
    before, metrics = cache_and_metrics(root)
    params = params_module.load(root / "params.yaml")
    for name in ("features", "baseline"):
        shutil.rmtree(params.path(name, root))
    result = run_in(
        root, "headstart", "run", "--dask-address", dask_cluster, api_url=trained_project.api_url
    )
    assert "| baseline | ran |" in result.stdout and "| head | ran |" in result.stdout
    run_log = (root / ".headstart" / "run.log").read_text()  # the run's INFO lines
    assert "4 feature shards" in run_log  # two per worker thread
    after, metrics_after = cache_and_metrics(root)
    assert_same(before, after)
    assert metrics_after == metrics
    assert not list(root.glob("artifacts/*-shards"))  # assembled, then deleted
    with Client(dask_cluster) as client:  # the tasks ran on the separate workers
        ran = client.run(lambda dask_worker: len(dask_worker.state.log))
    assert len(ran) == 2 and sum(ran.values()) > 0, ran
    assert run_in(root, "dvc", "status", "-q", check=False).returncode == 0


@pytest.mark.slow
def test_workers_2_runs_a_branch_step_on_a_local_cluster_of_two_processes(
    trained_copy, trained_project
):
    """`--workers 2`: a local Dask cluster of two worker processes, the branch steps on it (here
    the weights step alone: it writes the same bytes again, so nothing after it is stale)."""
    root = trained_copy
    params = params_module.load(root / "params.yaml")
    shutil.rmtree(params.path("weights", root))
    result = run_in(root, "headstart", "run", "--workers", "2", api_url=trained_project.api_url)
    assert "processes=2 threads=2" in (root / ".headstart" / "run.log").read_text()
    assert "| weights | ran |" in result.stdout and "| freeze | up to date |" in result.stdout
    # the step's own log line, from the `headstart step` process a Dask worker started
    assert re.search(r"Task run 'download_weights-\w+' - weights: \w+ from ", result.stderr)
    assert run_in(root, "dvc", "status", "-q", check=False).returncode == 0
