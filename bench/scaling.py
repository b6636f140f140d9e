"""Memory and time of the steps as the data grows: 1,500 / 20,000 / 60,000 images.

For each size, a project folder gets data/ of that many Fashion-MNIST TRAIN images (the first N
of the train file, as PNGs; the official test split is never read) and this working tree's
params.yaml with `--set` overrides, then each step runs as its own `headstart step` process
(this working tree's code): prepare, baseline, weights, freeze, head, select, evaluate.

Per step: wall seconds, peak total resident memory (VmHWM, what GNU time reports: it includes
file-backed pages of memory-mapped arrays the step touched, which the kernel can drop at any
time) and peak anonymous memory (RssAnon sampled every 20 ms: what the process really holds).

    apt-get install dataset-fashion-mnist
    python bench/scaling.py                                  # 1500 20000 60000
    python bench/scaling.py --sizes 1500 20000 --set head.config=linear
    python bench/scaling.py --sizes 20000 --work /tmp/w --steps prepare baseline weights freeze
    python bench/scaling.py --sizes 20000 --work /tmp/w --steps head select --tag head-select
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import BIN, ROOT, add_overrides, table
from PIL import Image

sys.path.insert(0, str(ROOT / "scripts"))
from make_demo_data import CLASSES, SOURCE, read_idx

sys.path.insert(0, str(ROOT))
from tasks import STEP_NAMES

STEPS = STEP_NAMES[: STEP_NAMES.index("evaluate") + 1]  # the steps up to the test figures
REPORTED = ("prepare", "baseline", "head", "select", "evaluate")
DEFAULT_SETS = ["baseline.epochs=1", "export.formats=[saved_model]"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1500, 20000, 60000])
    add_overrides(parser, always=" ".join(DEFAULT_SETS))
    parser.add_argument("--source", type=Path, default=SOURCE, help="Fashion-MNIST IDX folder")
    parser.add_argument("--work", type=Path, help="folder to keep the projects in (default: temp)")
    parser.add_argument("--tag", default="scaling", help="output: bench/out/TAG.json")
    parser.add_argument(
        "--steps",
        nargs="+",
        choices=STEPS,
        default=list(STEPS),
        help="run only these steps (the earlier ones must have run in the "
        "project kept under --work)",
    )
    return parser.parse_args(argv)


def _status(pid: int) -> dict[str, int]:
    """VmHWM and RssAnon of a process in KiB (empty once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0])
    return values


def measure(command: list[str], cwd: Path, interval: float = 0.02) -> dict:
    """Run a command: wall seconds, peak total RSS (VmHWM) and sampled peak RssAnon/RssFile, MiB."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DVC_NO_ANALYTICS": "1",
    }
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    started = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(child.stdout.read()))
    reader.start()
    while child.poll() is None:
        for key, value in _status(child.pid).items():
            peaks[key] = max(peaks[key], value)
        time.sleep(interval)
    reader.join()
    seconds = time.perf_counter() - started
    text = b"".join(output).decode(errors="replace")
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n{text[-3000:]}")
    return {
        "seconds": round(seconds, 1),
        "peak_mib": round(peaks["VmHWM"] / 1024),
        "anon_mib": round(peaks["RssAnon"] / 1024),
        "file_mib": round(peaks["RssFile"] / 1024),
    }


def make_project(
    folder: Path, pixels: np.ndarray, labels: np.ndarray, size: int, overrides: list[str]
) -> Path:
    """A project folder: params.yaml (with the overrides) and data/ of the first `size` images."""
    sys.path.insert(0, str(ROOT))
    from headstart.params import write_overrides

    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_overrides(folder / "params.yaml", [*DEFAULT_SETS, *overrides])
    for name in CLASSES:
        (folder / "data" / name).mkdir(parents=True)
    for row in range(size):
        Image.fromarray(pixels[row], mode="L").save(
            folder / "data" / CLASSES[labels[row]] / f"fmnist-train-{row:05d}.png"
        )
    return folder


def main(argv=None) -> None:
    args = parse_args(argv)
    pixels = read_idx(args.source / "train-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz")
    if max(args.sizes) > len(pixels):
        sys.exit(f"at most {len(pixels)} images (the Fashion-MNIST train file)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="headstart-scaling-") as temp:
        work = args.work or Path(temp)
        for size in args.sizes:
            project = work / f"n{size}"
            if not project.exists():  # a project kept under --work is reused as it is
                make_project(project, pixels, labels, size, args.overrides)
            results[size] = {}
            for step in args.steps:
                results[size][step] = measure([str(BIN / "headstart"), "step", step], project)
                print(size, step, results[size][step], flush=True)
    rows = [
        (
            f"{size:,}",
            step,
            r[step]["seconds"],
            r[step]["peak_mib"],
            r[step]["anon_mib"],
            r[step]["file_mib"],
        )
        for size, r in results.items()
        for step in REPORTED
        if step in r
    ]
    print(
        table(
            rows,
            ("images", "step", "seconds", "peak MiB (VmHWM)", "peak anon MiB", "peak file MiB"),
        )
    )
    out = ROOT / "bench" / "out" / f"{args.tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({"overrides": [*DEFAULT_SETS, *args.overrides], "results": results}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
