"""Safety: output paths, owned folders, the workspace lock, symlinks, strict input, one-line
errors. Each test here reproduced a defect found by trying to break a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    ROOT,
    command_env,
    image_bytes,
    run_cli,
    run_in,
    small_params,
    write_good_images,
)

from headstart import files, lock
from headstart import params as params_module
from headstart.errors import UserError
from tasks.prepare import prepare


def project_copy(tmp_path: Path) -> Path:
    """A project folder with params.yaml and stand-ins for the code a bad path could destroy."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for folder in ("headstart", "tasks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "keep.py").write_text("# source code\n")
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".headstart" not in p.parts
    }


@pytest.mark.parametrize(
    "value",
    [
        "headstart",
        "tasks",
        ".",
        "/tmp/x",
        "data",
        "..",
        "artifacts/../tasks",
        ".git/objects",
        "params.yaml",
    ],
)
def test_an_output_path_outside_the_allowed_area_is_one_line_and_touches_nothing(tmp_path, value):
    root = project_copy(tmp_path)
    before = snapshot(root)
    result = run_cli("run", "--project", str(root), "-S", f"paths.baseline={value}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "paths.baseline" in result.stderr
    assert snapshot(root) == before


def test_a_path_edited_in_params_yaml_is_refused_by_step(tmp_path):
    root = project_copy(tmp_path)
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(
        text.replace("prepared: artifacts/prepared", "prepared: tasks")
    )
    before = snapshot(root)
    result = run_cli("step", "prepare", "--project", str(root))
    assert result.returncode == 1 and "paths.prepared" in result.stderr
    assert snapshot(root) == before


def test_nested_output_paths_are_refused():
    with pytest.raises(
        params_module.ParamsError, match="paths.baseline and paths.prepared overlap"
    ):
        small_params(paths={"baseline": "artifacts/prepared/baseline"})


def test_a_step_never_replaces_a_folder_it_did_not_create(tmp_path):
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")
    with pytest.raises(UserError, match="was not written by headstart"):
        with files.atomic_dir(foreign) as tmp:
            (tmp / "model.keras").write_text("x")
    assert (foreign / "thesis.tex").read_text() == "years of work\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_owned_folders_are_replaced_and_stamped(tmp_path):
    target = tmp_path / "out"
    with files.stamping({"step": "demo", "params": {"a": 1}}):
        with files.atomic_dir(target) as tmp:
            (tmp / "one.txt").write_text("1")
        with files.atomic_dir(target) as tmp:
            (tmp / "two.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == [files.MARKER, "two.txt"]
    assert files.read_marker(target) == {
        "written_by": "headstart",
        "step": "demo",
        "params": {"a": 1},
    }


def test_stale_temporaries_are_removed_but_nothing_else(tmp_path):
    for name in (".baseline.tmp-abc123", ".prepared.old-4242"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.npy").write_bytes(b"0" * 100)
    for name in (".baseline.tmp-notes.txt", "baseline", ".other"):
        (tmp_path / name).mkdir() if "." not in name[1:] else (tmp_path / name).write_text("x")
    removed = files.remove_stale_temporaries([tmp_path])
    assert sorted(p.name for p in removed) == [".baseline.tmp-abc123", ".prepared.old-4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".baseline.tmp-notes.txt",
        ".other",
        "baseline",
    ]


HOLDER = """
import sys, time
from headstart.lock import workspace_lock
with workspace_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def start_holder(root: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_then_a_dead_holder_is_taken_over(
    tmp_path, caplog
):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(lock.LockedError, match=f"pid {holder.pid} "):
            with lock.workspace_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level("WARNING", logger="headstart.lock"):
        with lock.workspace_lock(tmp_path) as outermost:
            assert outermost
            with lock.workspace_lock(tmp_path) as nested:  # re-entrant in one process
                assert not nested
    assert f"stale lock: pid {holder.pid}" in caplog.text


def test_a_waiting_writer_gets_the_lock_when_the_holder_ends(tmp_path):
    holder = start_holder(tmp_path)
    started = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
    with lock.workspace_lock(tmp_path, wait=True, poll=0.1):
        waited = time.monotonic() - started
    holder.wait()
    assert waited >= 0.9


def fake_dvc_repro(root: Path, seconds: float) -> subprocess.Popen:
    """A process that looks like `dvc repro` running in `root` (its command line and folder),
    returned once it does (until its exec, a new process shows its parent's command line)."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({seconds})", "dvc", "repro"], cwd=root
    )
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    while b"repro" not in cmdline.read_bytes():
        time.sleep(0.01)
    return process


def test_a_run_between_dvc_repro_stages_is_refused_before_touching_params(tmp_path):
    """DVC releases its lock while a stage's command runs and holds none of ours between
    stages: a run must see the repro itself, refuse in one line and leave params.yaml alone."""
    root = project_copy(tmp_path)
    params_text = (root / "params.yaml").read_text()
    repro = fake_dvc_repro(root, 30)
    try:
        result = run_cli("run", "-S", "baseline.epochs=10", "--project", str(root))
        subfolder = root / "headstart"
        assert lock.dvc_runs(subfolder) == []  # a run in another folder is not this one's
        assert [pid for pid, _ in lock.dvc_runs(root)] == [repro.pid]
    finally:
        repro.kill()
        repro.wait()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {root}: `dvc repro` (pid {repro.pid}) is running in this workspace; wait for it "
        "to finish (or use --wait)"
    ]
    assert (root / "params.yaml").read_text() == params_text


def test_a_waiting_run_starts_after_dvc_repro_ends(tmp_path):
    repro = fake_dvc_repro(tmp_path, 1.0)
    started = time.monotonic()
    with lock.workspace_lock(tmp_path, wait=True, poll=0.1):
        waited = time.monotonic() - started
        # an exiting process drops its command line a moment before it can be reaped
        assert repro.wait(timeout=5) == 0
    assert waited >= 0.5


def test_cli_step_refuses_while_a_run_holds_the_workspace(tmp_path):
    root = project_copy(tmp_path)
    holder = start_holder(root)
    try:
        result = run_cli("step", "prepare", "--project", str(root))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert f"another headstart run holds this workspace: pid {holder.pid}" in result.stderr


def test_symlinks_follow_one_policy_and_every_entry_is_reported(tmp_path):
    data = tmp_path / "data"
    write_good_images(data)
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "x.png").write_bytes(image_bytes(99))
    for n in range(3):
        (outside / "folder" / f"{n}.png").write_bytes(image_bytes(200 + n))
    links = {
        "class_0/loop_a": "loop_b",
        "class_0/loop_b": "loop_a",
        "class_0/dangling.png": "/nonexistent/x.png",
        "class_0/hostname.png": "/etc/hostname",
        "class_1/outside.png": str(outside / "x.png"),
        "class_1/outside_folder": str(outside / "folder"),
        "class_1/inside.png": str(data / "class_0" / "img_001.png"),
        "class_1/inside_folder": str(data / "class_0"),
        "linked_class": str(outside / "folder"),
    }
    for link, target in links.items():
        os.symlink(target, data / link)
    (data / "class_0" / "fake\nquarantined line.png").write_bytes(b"not an image")
    out = prepare(data, tmp_path / "prepared", small_params(), tmp_path / "report")
    assert out == tmp_path / "prepared" and not (out / "report.json").exists()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    fate = {item["file"]: item["reason"] for item in report["quarantined"] + report["ignored"]}
    assert fate["class_0/loop_a"].startswith("symlink loop")
    assert fate["class_0/dangling.png"].startswith("dangling symlink")
    assert fate["class_0/hostname.png"] == "points outside data/: /etc/hostname"
    assert fate["class_1/outside.png"].startswith("points outside data/")
    assert fate["class_1/outside_folder"].startswith("points outside data/")
    assert fate["linked_class"].startswith("points outside data/")
    assert fate["class_1/inside_folder"].startswith("symlinked folder")
    # a link to an image inside data/ is read once, so it is a same-content copy of its target
    assert fate["class_1/inside.png"].startswith("conflicting labels")
    assert report["reconciles"] and report["entries_under_data"] == report["totals"]["seen"]
    assert report["classes"] == ["class_0", "class_1"]
    text = (tmp_path / "report" / "report.txt").read_text()
    assert "fake\\nquarantined line.png" in text
    assert not any(line.startswith("quarantined line") for line in text.splitlines())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("head.learning_rate=.inf", "head.learning_rate must be a finite number"),
        ("baseline.learning_rate=.nan", "baseline.learning_rate must be a finite number"),
        ("base.seed=4294967296", "base.seed must be in [0, 2**32)"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(override, message):
    with pytest.raises(params_module.ParamsError) as caught:
        params_module.load(ROOT / "params.yaml", [override])
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "command", [["status"], ["run", "-S", "head.epochs=3"], ["step", "prepare"]]
)
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda text: text.replace("  epochs: 15\n", "  epochs: 15\n  epochs: 16\n", 1),
            "duplicate key 'epochs'",
        ),
        (lambda text: text + "head: [unclosed\n", "not valid YAML"),
        (lambda text: text.replace("  top_k: 3\n", ""), "missing key evaluate.top_k"),
        (None, "not found"),
    ],
)
def test_broken_parameter_files_are_one_line_for_every_command(tmp_path, command, damage, message):
    params_file = tmp_path / "params.yaml"
    if damage is not None:
        params_file.write_text(damage((ROOT / "params.yaml").read_text()))
        before = params_file.read_text()
    result = run_cli(*command, "--project", str(tmp_path))
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    if damage is not None:
        assert params_file.read_text() == before


def test_a_loss_that_becomes_nan_stops_training_with_one_line(tmp_path):
    import keras

    from headstart import training

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    training.compile_classifier(model, keras.optimizers.SGD(learning_rate=1e38))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32") * 1e6
    y = np.arange(64) % 2
    data = training.dataset(x, y, 16)
    with pytest.raises(
        UserError,
        match=r"head: the training loss became nan in epoch \d+; lower "
        r"head.learning_rate",
    ):
        training.fit(model, data, data, "head", epochs=5, patience=5, target_accuracy=1.0)


def test_strict_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        files.write_json(tmp_path / "m.json", {"accuracy": float("nan")})
    assert not (tmp_path / "m.json").exists()


def test_a_bad_cached_weights_file_is_removed_before_the_advice_to_copy_one_there(tmp_path):
    from headstart.download import DownloadError, fetch

    cached = tmp_path / "w.h5"
    cached.write_bytes(b"corrupt")
    with pytest.raises(
        DownloadError, match=f"download failed after 2 tries .*copy the file to {cached}"
    ):
        fetch((tmp_path / "missing.h5").as_uri(), "w.h5", "0" * 64, tmp_path, retries=2, backoff=0)
    assert not cached.exists()


def wait_for(predicate, timeout: float = 120.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(every)


def headstart_process(root: Path, *args: str, api_url: str | None = None) -> subprocess.Popen:
    """`headstart ARGS` in its own process group (killing the group also stops a temporary
    Prefect server it starts), output to files in ../logs."""
    env = command_env(api_url)
    logs = root.parent / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        return subprocess.Popen(
            ["headstart", *args], cwd=root, env=env, stdout=out, stderr=err, start_new_session=True
        )


def output_of(root: Path) -> str:
    return (root.parent / "logs" / "stderr").read_text()[-3000:]


def temporaries(root: Path) -> list[str]:
    return [
        p.name for p in (root / "artifacts").glob(".*") if ".tmp-" in p.name or ".old-" in p.name
    ]


def kill_inside(root: Path, killed_in: str, api_url: str, *changes: str) -> None:
    """Start `headstart run -S change...` and kill -9 its process group while the step whose
    temporary folder starts with `killed_in` is writing."""
    overrides = [arg for change in changes for arg in ("-S", change)]
    victim = headstart_process(root, "run", *overrides, api_url=api_url)
    try:
        wait_for(
            lambda: (
                any(killed_in in name for name in temporaries(root)) or victim.poll() is not None
            )
        )
        assert victim.poll() is None, output_of(root)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)  # no clean-up code runs
        victim.wait()
    assert any(killed_in in name for name in temporaries(root))  # it left its temporary folder


@pytest.mark.slow
def test_runs_killed_inside_steps_then_two_runs_at_once_end_clean_and_never_mix(
    trained_copy, trained_project
):
    """One scenario (each `headstart run` here costs a TensorFlow start and a flow): two runs
    killed with kill -9 inside a step, then a run that must clean up after them while a second
    run started beside it is refused."""
    root, api_url = trained_copy, trained_project.api_url
    kill_inside(root, ".baseline.tmp-", api_url, "baseline.epochs=3")
    # after taking over the lock; baseline.epochs back to its recorded 2: only the head runs
    kill_inside(root, ".transfer.tmp-", api_url, "baseline.epochs=2", "head.epochs=3")

    first = headstart_process(root, "run", "-S", "baseline.epochs=5", api_url=api_url)
    wait_for(
        lambda: (
            (root / ".headstart" / "lock").is_file()
            and "baseline.epochs=5" in (root / ".headstart" / "lock").read_text()
        )
    )
    second = run_in(root, "headstart", "run", "-S", "baseline.epochs=1", check=False)
    assert first.wait(timeout=600) == 0, output_of(root)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"error: {root}: another headstart run holds this workspace: pid {first.pid} "
        f"(`headstart run -S baseline.epochs=5`, since " + second.stderr.split("since ")[1].strip()
    ]
    log = (root.parent / "logs" / "stderr").read_text()
    assert "stale lock" in log, output_of(root)  # a warning: on the console
    run_log = (root / ".headstart" / "run.log").read_text()  # the first run's INFO lines
    assert "left by a run that did not finish" in run_log, output_of(root)
    assert temporaries(root) == []
    assert run_in(root, "dvc", "status", "--json").stdout.strip() == "{}"
    baseline = (root / "params.yaml").read_text().split("baseline:")[1].split("\n\n")[0]
    assert "\n  epochs: 5" in baseline  # the run's -S value, written back with the comments
    assert files.read_marker(root / "artifacts" / "baseline")["params"]["baseline.epochs"] == 5
    assert files.read_marker(root / "artifacts" / "transfer")["params"]["head"]["epochs"] == 3
    metrics = json.loads((root / "artifacts/metrics/baseline.json").read_text())
    from headstart.metrics import evaluate_model

    again = evaluate_model(root / "artifacts/baseline/model.keras", root / "artifacts/prepared", 3)
    assert again[0]["accuracy"] == metrics["accuracy"]  # the metrics are of the model saved
    # nothing stale and no Prefect server configured: the last summary, no temporary server
    noop = run_in(root, "headstart", "run")
    assert "no Prefect flow run was started" in noop.stdout
    assert "| baseline | up to date |" in noop.stdout and "**released**" in noop.stdout
    assert "temporary server" not in noop.stdout + noop.stderr


@pytest.mark.slow
def test_status_and_run_complete_with_bad_links_in_the_data(
    trained_copy, trained_project, tmp_path
):
    root, api_url = trained_copy, trained_project.api_url
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(image_bytes(77))
    for link, target in {
        "class_0/loop_a": "loop_b",
        "class_0/loop_b": "loop_a",
        "class_0/dangling.png": "/nonexistent.png",
        "class_0/hostname.png": "/etc/hostname",
        "class_1/outside.png": str(outside / "x.png"),
        "class_1/folder": str(outside),
    }.items():
        os.symlink(target, root / "data" / link)
    status = run_in(root, "headstart", "status")
    assert "prepare    stale" in status.stdout
    result = run_in(root, "headstart", "run", api_url=api_url)
    assert "Not recorded in dvc.lock**: prepare (DVC cannot read" in result.stdout
    # every link is quarantined or ignored: the images the models learn from are unchanged, so
    # only the report changed (artifacts/data-report) and no training step ran again
    for name in ("baseline", "head", "select", "evaluate"):
        assert f"| {name} | up to date |" in result.stdout, result.stdout
    report = (root / "artifacts/data-report/report.txt").read_text()
    for name in ("loop_a", "loop_b", "dangling.png", "hostname.png", "outside.png", "folder"):
        assert name in report
    failed = run_in(
        root, "headstart", "run", "-S", "prepare.min_per_class=50", check=False, api_url=api_url
    )
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if "rror" in line]
    assert len(errors) == 1 and errors[0].startswith("error: prepare: "), failed.stderr


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_dvc_repro_after_a_hand_edit_deletes_nothing(trained_copy):
    """DVC removes a stage's outputs before its command runs; every output persists, so a hand
    edit that the step refuses costs nothing: not a folder of the user's, not a tracked file,
    not .git, not the previous outputs (dvc repro fails, naming the cause)."""
    root = trained_copy
    (root / "mystuff").mkdir()
    (root / "mystuff" / "notes.txt").write_text("precious\n")
    outputs = {
        name: tree(root / "artifacts" / name)
        for name in ("prepared", "baseline", "metrics", "plots")
    }
    originals = {name: (root / name).read_bytes() for name in ("README.md", "Makefile")}
    git_objects = sorted((root / ".git" / "objects").rglob("*"))
    params_text = (root / "params.yaml").read_text()
    edits = [
        ("  baseline: artifacts/baseline", "  baseline: mystuff", "baseline"),
        ("  baseline: artifacts/baseline", "  baseline: README.md", "baseline"),
        ("  plots: artifacts/plots", "  plots: Makefile", "plots"),
        ("  data: data\n", "  data: .git/objects\n", "prepare"),
        ("  epochs: 2\n", "  epochs: -1\n", "baseline"),  # baseline's (head's has a comment)
        ("  epochs: 2\n", "  epochs: abc\n", "baseline"),
        ("  epochs: 2\n", "  epochs: .nan\n", "baseline"),
        ("evaluate:\n  top_k: 3\n", "", "evaluate"),
    ]
    for old, new, stage in edits:
        assert old in params_text, old
        (root / "params.yaml").write_text(params_text.replace(old, new, 1))
        result = run_in(root, "dvc", "repro", stage, check=False)
        assert result.returncode != 0, (new, result.stdout, result.stderr)
        assert (root / "mystuff" / "notes.txt").read_text() == "precious\n", new
        assert {name: (root / name).read_bytes() for name in originals} == originals, new
        assert sorted((root / ".git" / "objects").rglob("*")) == git_objects, new
        for name, files_before in outputs.items():
            assert tree(root / "artifacts" / name) == files_before, (new, name)
    (root / "params.yaml").write_text(params_text)
    assert run_in(root, "dvc", "status", "--json").stdout.strip() == "{}"


def test_a_full_disk_in_a_step_is_one_line_and_keeps_the_previous_output(tmp_path, monkeypatch):
    import errno

    import tasks
    from tasks import prepare as prepare_step

    write_good_images(tmp_path / "data")
    step, params = tasks.get("prepare"), small_params()
    step.run(params, tmp_path)
    before = (tmp_path / "artifacts/prepared/manifest.csv").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "train_images.npy")

    monkeypatch.setattr(prepare_step, "_write", no_space)
    with pytest.raises(UserError) as refused:
        step.run(params, tmp_path)
    assert str(refused.value) == (
        "prepare: OSError: train_images.npy: No space left on device; free space or fix the "
        "folder's permissions, then run again"
    )
    assert (tmp_path / "artifacts/prepared/manifest.csv").read_bytes() == before
    assert not [p for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("table", "kept"),
    [("", False), ('{"read": {}, "wr', False), ('{"read": {}, "write": {}}', True)],
)
def test_taking_over_a_stale_lock_removes_dvcs_damaged_lock_table(tmp_path, table, kept):
    """A run killed while DVC rewrote .dvc/tmp/rwlock leaves it cut short: every later DVC
    call then fails with a JSON traceback. The run that takes over the stale lock removes it
    (DVC starts a fresh one); a sound table is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = tmp_path / ".headstart" / "lock"
    record.parent.mkdir()
    record.write_text(json.dumps({"pid": dead.pid, "command": "headstart run", "since": "-"}))
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True)
    rwlock.write_text(table)
    with lock.workspace_lock(tmp_path):
        assert rwlock.exists() == kept
