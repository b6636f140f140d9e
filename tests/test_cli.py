"""The command line: instant help, one-line errors, and a deployable prefect.yaml."""

from __future__ import annotations

import importlib
import subprocess
import sys

import yaml
from helpers import ROOT, run_cli

from tasks import STEP_NAMES

HEAVY = ("tensorflow", "keras", "prefect", "dvc")


def test_help_imports_no_heavy_module():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from headstart.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0 and 'predict' in result.output, result.output\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_step_is_one_line_error():
    result = run_cli("step", "train", "--project", str(ROOT))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: unknown step 'train' (steps: {', '.join(STEP_NAMES)})"


def test_prefect_yaml_deploys_the_retraining_flow():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    path, name = deployment["entrypoint"].split(":")
    assert (ROOT / path).is_file()
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert flow.name == "headstart-retrain"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    assert deployment["schedules"][0]["cron"] == "0 3 * * *"


def test_steps_out_of_order_say_which_step_to_run(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    result = run_cli("step", "head", "--project", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/artifacts/prepared: missing; "
        "run `headstart step prepare` first (or `headstart run`)"
    )
    (tmp_path / "artifacts/prepared").mkdir(parents=True)  # dvc.yaml's next dep of head
    result = run_cli("step", "head", "--project", str(tmp_path))
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/artifacts/backbone: missing; "
        "run `headstart step freeze` first (or `headstart run`)"
    )


def test_predict_with_a_corrupt_model_is_one_line(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    (tmp_path / "labels.json").write_text('{"classes": ["a", "b"], "image_size": 32}')
    (tmp_path / "x.png").write_bytes(b"")
    result = run_cli("predict", str(tmp_path / "model.keras"), str(tmp_path / "x.png"))
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {tmp_path}/model.keras: not a valid .keras file")
    )


def test_small_mistakes_are_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = (tmp_path / "params.yaml").read_text()
    bad_yaml = run_cli("run", "-S", "base.seed=[1", "--project", str(tmp_path))
    assert bad_yaml.returncode == 1
    assert bad_yaml.stderr.strip().splitlines() == [
        "error: override 'base.seed=[1': the value is not valid YAML (expected ',' or ']', but "
        "got '<stream end>'); quote it, e.g. -S 'section.key=\"text\"'"
    ]
    assert (tmp_path / "params.yaml").read_text() == before
    (tmp_path / "dir.keras").mkdir()
    folder = run_cli("predict", str(tmp_path / "dir.keras"), str(tmp_path / "x.png"))
    assert folder.returncode == 1
    assert folder.stderr.strip().splitlines() == [
        f"error: {tmp_path}/dir.keras: a folder, not a .keras model file; give the model file "
        "(e.g. artifacts/release/model.keras)"
    ]
