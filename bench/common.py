"""Shared helpers for the benchmark scripts: timing, child processes with peak memory, machine."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def machine() -> dict:
    import tensorflow as tf

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_child(command: list[str], cwd: Path | str = ROOT, env: dict | None = None) -> dict:
    """Run a command; wall seconds and its peak resident memory in MiB.

    Peak memory comes from GNU time, which forks from a small process: a child forked straight
    from this (TensorFlow-sized) process would report this process's size as its own peak.
    """
    full_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DVC_NO_ANALYTICS": "1",
        **(env or {}),
    }
    timer = shutil.which("time") or "/usr/bin/time"
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as peak_file:
        wrapped = (
            [timer, "-f", "%M", "-o", peak_file.name, *command] if Path(timer).exists() else command
        )
        started = time.perf_counter()
        result = subprocess.run(
            wrapped, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        seconds = time.perf_counter() - started
        output = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{output[-3000:]}"
            )
        lines = Path(peak_file.name).read_text().split()
    peak = round(int(lines[-1]) / 1024, 1) if lines and lines[-1].isdigit() else None
    return {"seconds": round(seconds, 3), "peak_mib": peak, "output": output}


def table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def clone_with_data(
    target: Path, write_data, commit: str | None = None, who: str = "bench"
) -> Path:
    """A clone of this repository (at `commit`; default: its committed HEAD) whose data/ is what
    `write_data(folder)` writes there, `dvc add`-ed and committed."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    if commit:
        subprocess.run(["git", "checkout", "-q", commit], cwd=target, check=True)
    write_data(target / "data")
    run_child([str(BIN / "dvc"), "add", "-q", "data"], cwd=target)
    subprocess.run(["git", "add", "data.dvc", ".gitignore"], cwd=target, check=True)
    subprocess.run(
        [
            "git",
            "-c",
            f"user.name={who}",
            "-c",
            f"user.email={who}@localhost",
            "commit",
            "-qm",
            f"{who} benchmark data",
        ],
        cwd=target,
        check=True,
    )
    return target


def headstart_run(project: Path, seed: int, overrides: list[str]) -> dict:
    """`headstart run -S base.seed=SEED [-S ...]` in a clone, with the clone's own code (its
    folder first on PYTHONPATH): run_child's seconds and peak memory."""
    sets = [arg for item in [*overrides, f"base.seed={seed}"] for arg in ("-S", item)]
    pythonpath = os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))
    return run_child(
        [str(BIN / "headstart"), "run", *sets], cwd=project, env={"PYTHONPATH": pythonpath}
    )


def add_overrides(parser, always: str = "") -> None:
    """`--set SECTION.KEY=VALUE` (repeatable) into `args.overrides`: parameter overrides;
    `always`: the overrides the script adds itself, for the help text."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="parameter override (repeatable" + (f"; always: {always})" if always else ")"),
    )


def clone_commit(project: Path) -> str:
    """The commit whose code a `clone_with_data` clone runs (its own last commit adds data)."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD~1"],
        cwd=project,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def save_result(name: str, result: dict, work: Path, keep: bool) -> Path:
    """`bench/out/<name>.json`; the work folder is removed unless `keep`."""
    import shutil

    from headstart.files import write_json

    out = write_json(ROOT / "bench" / "out" / f"{name}.json", result)
    print(f"wrote {out}" + ("" if keep else f"; removing {work}"), file=sys.stderr)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out
