"""The benchmark script runs end to end on tiny sizes (so it cannot rot); CI skips the full run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, write_good_images


@pytest.mark.slow
def test_bench_quick_runs_every_section_but_pipeline(tmp_path):
    write_good_images(tmp_path / "data", classes=3, per_class=12)
    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--size",
            "32",
            "--images",
            "12",
            "--epochs",
            "2",
            "--data",
            str(tmp_path / "data"),
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["floor"]["images_per_s"] > 0
    assert results["recipe"]["epochs"] == results["headstart"]["epochs"] == 2
    assert list(map(int, results["scaling"])) == [12]  # --quick: N only
    assert "headstart head step / floor" in results["ratios"]
    assert "| ratio" in result.stdout and "startup: headstart --help" in result.stdout
