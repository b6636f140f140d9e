"""The export step: SavedModel, LiteRT and ONNX exports of a tiny real release, each checked
against the Keras model (the parity gate), and the model card. Fast tests of the pieces first;
the `project` ones export a real 32 px release (Lite0 backbone with its real weights)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ROOT, built_once, cli_here, run_cli

import tasks
from headstart import exporting, modelcard
from headstart import params as params_module
from headstart.errors import UserError
from headstart.files import MARKER, read_json, sha256_file
from headstart.metrics import classification_metrics, macro_f1
from headstart.runsummary import run_summary
from tasks import export as export_step

NOTES = "## Intended use\n\nSorting test patterns (a line only this test writes: 7f3a).\n"


def git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True, env=env
    ).stdout


# ---- fast: the pieces ------------------------------------------------------------------------


def test_params_hold_the_export_section_and_path():
    params = params_module.load(ROOT / "params.yaml")
    assert params.export.formats == exporting.FORMATS == params_module.EXPORT_FORMATS
    assert 0 < params.export.min_agreement <= 1 and params.export.latency_runs >= 1
    assert params.paths.export == "artifacts/export"
    assert params_module.to_dict(params)["export"]["formats"] == list(exporting.FORMATS)
    for bad, problem in [
        ({"formats": "onnx"}, "must be a list"),
        ({"formats": ["onnx", "onnx"]}, "must list each of"),
        ({"formats": ["tflite"]}, "must list each of"),
        ({"min_agreement": 1.5}, r"must be in \[0, 1\]"),
        ({"latency_runs": 0}, "must be >= 1"),
    ]:
        with pytest.raises(params_module.ParamsError, match=rf"export\.\w+ {problem}"):
            params_module.from_dict({"export": bad})
    with pytest.raises(params_module.ParamsError, match="paths.export and paths.release overlap"):
        params_module.from_dict({"paths": {"export": "artifacts/release/export"}})


def test_the_export_stage_tracks_every_parameter_the_card_lists():
    """The stage's params, expanded to keys, are exactly every setting but the operational ones
    (what modelcard lists), so a change to any listed setting rewrites the card."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["export"]
    every = params_module.to_dict(params_module.Params())
    listed = {
        f"{section}.{key}"
        for entry in stage["params"]
        for section in [entry.split(".")[0]]
        for key in ([entry.split(".")[1]] if "." in entry else every[section])
    }
    card = params_module.to_dict(params_module.Params(), operational=False)
    assert listed == {f"{section}.{key}" for section in card for key in card[section]}
    assert not listed & set(params_module.OPERATIONAL)
    assert {"${paths.data}", modelcard.NOTES_FILE} <= set(stage["deps"])
    assert (ROOT / modelcard.NOTES_FILE).is_file()


def test_bootstrap_intervals_are_seeded_and_bracket_the_test_figures():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    predicted = np.where(rng.random(300) < 0.8, labels, rng.integers(0, 4, 300))
    result = modelcard.bootstrap_intervals(labels, predicted, 4, seed=5)
    probabilities = np.eye(4)[predicted]
    metrics, _ = classification_metrics(probabilities, labels, list("abcd"), 1)
    for name in ("accuracy", "macro_f1"):
        figure = result[name]
        assert figure["value"] == pytest.approx(metrics[name])
        assert figure["low"] < figure["value"] < figure["high"]
        assert 0.04 < figure["high"] - figure["low"] < 0.2  # about 4 standard errors at n = 300
    assert modelcard.bootstrap_intervals(labels, predicted, 4, seed=5) == result
    assert modelcard.bootstrap_intervals(labels, predicted, 4, seed=6) != result
    perfect = modelcard.bootstrap_intervals(labels, labels, 4, seed=5)
    assert perfect["macro_f1"] == {"value": 1.0, "low": 1.0, "high": 1.0}


def test_macro_f1_counts_a_class_never_seen_nor_said_as_zero():
    labels, predicted = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    # class a: F1 2/3; b: 4/5; c: never seen nor said, 0
    assert macro_f1(labels, predicted, 3)[0] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    metrics, _ = classification_metrics(np.eye(3)[predicted], labels, list("abc"), 1)
    assert metrics["f1.a"] == pytest.approx(2 / 3) and metrics["f1.c"] == 0.0


def test_top_confusions_are_the_largest_off_diagonal_cells():
    matrix = [[5, 2, 0], [4, 7, 1], [0, 9, 3]]
    assert modelcard.top_confusions(["a", "b", "c"], matrix, 3) == [
        ["c", "b", 9],
        ["b", "a", 4],
        ["a", "b", 2],
    ]


def test_the_card_is_rendered_from_facts_alone():
    facts = {
        "model": {
            "file": "artifacts/release/model.keras",
            "sha256": "ab" * 32,
            "winner": "baseline",
            "reason": "validation: a tie",
            "classes": ["a", "b"],
        },
        "data": {
            "path": "data",
            "dvc": None,
            "manifest": "artifacts/prepared/manifest.csv",
            "manifest_sha256": "cd" * 32,
            "per_class": {
                "a": {"train": 5, "val": 2, "test": 2, "quarantined": 1, "ignored": 0},
                "b": {"train": 6, "val": 1, "test": 3, "quarantined": 0, "ignored": 2},
            },
            "totals": {"seen": 22, "used": 19, "quarantined": 1, "ignored": 2},
        },
        "backbone": {
            "backbone": "efficientnet_lite0",
            "file": "w.weights.h5",
            "sha256": "ef" * 32,
            "source": "pypi:x",
        },
        "parameters": {"base": {"seed": 3}},
        "code": {"revision": "0123abc", "dirty": True, "changed": ["params.yaml"]},
        "test": modelcard.bootstrap_intervals(
            np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1]), 2, seed=3
        ),
        "calibration": None,
        "confusions": [["b", "a", 1]],
        "exports": {
            "image_size": 32,
            "test_images": 5,
            "min_agreement": 0.995,
            "formats": {"onnx": {"available": False, "reason": "ImportError: no | module"}},
        },
        "notes": "## Intended use\n\nNone yet.\n",
    }
    before = copy.deepcopy(facts)
    card = modelcard.render(facts)
    assert facts == before  # rendering reads the facts and nothing else
    for line in [
        "- Backbone: efficientnet_lite0 (not used by the released baseline CNN), ImageNet weights "
        f"`w.weights.h5` sha256 `{'ef' * 32}` (from pypi:x)",
        "- Code revision: `0123abc` (with uncommitted changes to `params.yaml`)",
        "## Intended use",
        "None yet.",
        "- Version: unknown (`data` is not tracked by DVC)",
        "| a | 5 | 2 | 2 | 1 | 0 |",
        "- Accuracy: 0.8000 (95 % CI ",
        "- b -> a: 1",
        "Not calibrated: the probabilities are the model's own.",
        "| onnx | not available: ImportError: no \\| module | | | |",
        "  seed: 3",
    ]:
        assert line in card, line


def test_code_revision_and_uncommitted_changes(tmp_path):
    assert modelcard.code_revision(tmp_path) == {"revision": None, "dirty": None, "changed": []}
    git(tmp_path, "init", "-q")
    for name in ("code.py", "dvc.lock"):
        (tmp_path / name).write_text("one\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    (tmp_path / "new_untracked.py").write_text("x\n")
    (tmp_path / "dvc.lock").write_text("two\n")  # the pipeline's own record: not a code change
    assert modelcard.code_revision(tmp_path) == {"revision": head, "dirty": False, "changed": []}
    (tmp_path / "code.py").write_text("two\n")
    assert modelcard.code_revision(tmp_path) == {
        "revision": head,
        "dirty": True,
        "changed": ["code.py"],
    }


def test_the_gate_names_each_format_below_the_agreement_and_its_figures():
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    flipped = reference.copy()
    flipped[2] = [0.4, 0.6]
    results = {
        "saved_model": {"available": True, **exporting.compare(reference, reference)},
        "onnx": {"available": True, **exporting.compare(flipped, reference)},
        "litert": {"available": False, "reason": "ImportError: no"},
    }
    assert exporting.compare(flipped, reference) == {
        "agreement": 0.75,
        "disagreements": 1,
        "max_abs_diff": pytest.approx(0.2),
    }
    with pytest.raises(exporting.ParityError) as raised:
        exporting.check_parity(results, 0.995, 4)
    message = str(raised.value)
    assert (
        "onnx agrees with the Keras model on 75.00 % of the test images (1 differ; max |dp| 0.2)"
        in message
        and "export.min_agreement 99.5 %" in message
    )
    assert "saved_model" not in message and "litert" not in message and "\n" not in message
    exporting.check_parity(results, 0.75, 4)  # at the threshold: passes
    wrong_shape = exporting.compare(reference[:, :1], reference)
    assert wrong_shape["agreement"] == 0 and "output shape (4, 1)" in wrong_shape["problem"]


def test_export_without_a_release_is_a_one_line_error(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    for made_by_prepare in ("prepared", "data-report"):
        (tmp_path / "artifacts" / made_by_prepare).mkdir(parents=True)
    result = run_cli("export", "--project", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/artifacts/release: missing; "
        "run `headstart step select` first (or `headstart run`)"
    )
    assert not (tmp_path / "artifacts" / "export").exists()


def tiny_ensemble_release(path: Path):
    """A released ensemble as select builds it (Resizing in front; the transfer half: a small
    BatchNormalization backbone and a Dense + Dropout head), saved and loaded back."""
    import keras
    from keras import layers

    from headstart.models import baseline_cnn, dense_head, end_to_end
    from tasks.select import release_model

    keras.utils.set_random_seed(1)
    image = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 255.0)(image)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    backbone = keras.Model(image, layers.GlobalAveragePooling2D()(x), name="backbone")
    backbone.get_layer(index=3).set_weights(
        [np.full(8, 2.0), np.full(8, 0.5), np.full(8, 0.1), np.full(8, 3.0)]
    )
    transfer = end_to_end(backbone, dense_head(8, 3, units=16, dropout=0.5), 32)
    release = release_model("ensemble", baseline_cnn(32, 3), transfer, 32, 0.5)
    release.save(path)
    return keras.saving.load_model(path)


@pytest.mark.slow
def test_each_format_of_an_ensemble_release_agrees_and_runs_in_inference_mode(tmp_path):
    """The ensemble's head has Dropout: an export traced without training=False applies it
    (Keras's plain `export(format="tf_saved_model")` did: 92.5 % agreement here, 97.98 % on the
    demo); BatchNormalization after Resizing is the case where an ONNX export was found silently
    wrong (FACTS.md): Resizing's call defaults to training=True, which the layers after it
    inherit when the call does not say training=False."""
    from headstart.training import predict

    model = tiny_ensemble_release(tmp_path / "model.keras")
    images = np.random.default_rng(2).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    reference = predict(model, images)
    out = tmp_path / "export"
    out.mkdir()
    results = exporting.export_all(model, 32, out, exporting.FORMATS, images, reference, 3)
    for name, result in results.items():
        assert result["available"], (name, result)
        assert result["agreement"] == 1.0 and result["max_abs_diff"] < 1e-5, (name, result)
    # the release itself runs its members with training=False: a plain call is inference too
    # (before select passed training=False, Dropout was on here and this differed by > 0.1)
    plain = np.asarray(model(images[:8].astype("float32")))
    assert np.allclose(plain, reference[:8], atol=1e-5)


# ---- a tiny real release, exported ------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project) -> tuple[Path, params_module.Params]:
    """The tiny trained project (git + DVC, one whole flow run on Lite0's real weights) with
    model card notes, exported again in all three formats."""

    def build(folder: Path) -> None:
        root = Path(shutil.copytree(trained_project.root, folder / "project", symlinks=True))
        (root / modelcard.NOTES_FILE).write_text(NOTES)
        params_module.write_overrides(
            root / "params.yaml", [f"export.formats=[{', '.join(exporting.FORMATS)}]"]
        )
        git(root, "add", "-A")
        git(root, "commit", "-qm", "notes, every export format")
        tasks.get("export").run(params_module.load(root / "params.yaml"), root)

    folder, _ = built_once(tmp_path_factory, "export-project", build)
    root = folder / "project"
    return root, params_module.load(root / "params.yaml")


@pytest.mark.slow
def test_every_format_is_exported_and_agrees_with_the_release(project):
    import keras

    root, params = project
    out = params.path("export", root)
    record = read_json(out / "export.json")
    assert list(record["formats"]) == list(exporting.FORMATS)
    images = np.load(params.path("prepared", root) / "test_images.npy")
    assert record["test_images"] == len(images) and record["image_size"] == 32
    for name, result in record["formats"].items():
        assert result["available"], (name, result)
        assert result["agreement"] == 1.0 and result["disagreements"] == 0
        assert result["max_abs_diff"] < 1e-4
        assert result["latency_ms"] > 0
        assert result["bytes"] == sum(f["bytes"] for f in result["files"].values()) > 10_000
        for file, info in result["files"].items():
            assert sha256_file(out / file) == info["sha256"], file
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert (out / "labels.json").read_bytes() == (
        params.path("release", root) / "labels.json"
    ).read_bytes()
    assert (out / "calibration.json").is_file() == (
        params.path("release", root) / "calibration.json"
    ).is_file()
    assert read_json(out / MARKER)["step"] == "export"
    assert tasks.get("export").written_with(params, root)  # export.formats: a list in JSON too
    assert record["source"] == {
        "release_sha256": sha256_file(params.path("release", root) / "model.keras"),
        "test_images_sha256": sha256_file(params.path("prepared", root) / "test_images.npy"),
        "backbone_sha256": sha256_file(params.path("release", root) / "backbone.keras"),
    }

    # each export on its own, with its own runtime, matches the Keras release on new images
    release = keras.saving.load_model(params.path("release", root) / "model.keras")
    fresh = np.random.default_rng(3).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    expected = np.asarray(release(fresh))
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    assert np.allclose(session.run(None, {"image": fresh})[0], expected, atol=1e-4)
    interpreter = Interpreter(model_path=str(out / "model.tflite"))
    given = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(given["index"], fresh.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], fresh)
    interpreter.invoke()
    litert = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert np.allclose(litert, expected, atol=1e-4)


@pytest.mark.slow
def test_an_unchanged_release_keeps_its_exports_and_the_card_shows_the_new_settings(
    project, tmp_path
):
    """A setting the exports do not depend on (plots.samples; the card lists every setting):
    the step, in a fresh process, converts nothing and starts no TensorFlow; the files and
    figures are the last export's, the card and the stamp are new."""
    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy", symlinks=True))
    out = params.path("export", copy)
    before = read_json(out / "export.json")
    params_module.write_overrides(
        copy / "params.yaml", [f"plots.samples={params.plots.samples + 1}"]
    )
    script = (
        "import sys, tasks; from headstart import params; "
        "tasks.get('export').run(params.load(sys.argv[1] + '/params.yaml'), sys.argv[1]); "
        "print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    )
    # not in the project folder: `python -c` would import the project's own copy of the code
    result = subprocess.run(
        [sys.executable, "-c", script, str(copy)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    after = read_json(out / "export.json")
    assert after["formats"] == before["formats"]  # the same latencies: measured once
    for result in after["formats"].values():
        for file, info in result["files"].items():
            assert sha256_file(out / file) == info["sha256"], file
    assert f"  samples: {params.plots.samples + 1}" in (out / "MODEL_CARD.md").read_text()
    assert tasks.get("export").written_with(params_module.load(copy / "params.yaml"), copy)


@pytest.mark.slow
def test_exports_are_made_again_when_anything_they_came_from_differs(
    project, tmp_path, monkeypatch
):
    root, params = project
    out = params.path("export", root)
    record = read_json(out / "export.json")
    formats, runs, source = params.export.formats, params.export.latency_runs, record["source"]
    assert exporting.reusable(out, formats, runs, source) == record
    for other in ({**source, "release_sha256": "0" * 64}, {**source, "test_images_sha256": "0"}):
        assert exporting.reusable(out, formats, runs, other) is None
    assert exporting.reusable(out, formats, runs + 1, source) is None
    assert exporting.reusable(out, formats[:2], runs, source) is None
    copy = Path(shutil.copytree(out, tmp_path / "export"))
    onnx = bytearray((copy / "model.onnx").read_bytes())
    onnx[-1] ^= 1
    (copy / "model.onnx").write_bytes(onnx)
    assert exporting.reusable(copy, formats, runs, source) is None
    shutil.copy(out / "model.onnx", copy / "model.onnx")
    assert exporting.reusable(copy, formats, runs, source) == record
    for older in ({k: v for k, v in record.items() if k != "source"}, []):  # before f1c483c; junk
        (copy / "export.json").write_text(json.dumps(older))
        assert exporting.reusable(copy, formats, runs, source) is None
    monkeypatch.setattr(exporting, "_versions", lambda packages: dict.fromkeys(packages, "0"))
    assert exporting.reusable(out, formats, runs, source) is None


@pytest.mark.slow
def test_the_run_summary_shows_the_exports(project):
    root, params = project
    summary = run_summary(root, params, tasks.STEP_NAMES, [], list(tasks.STEP_NAMES), {})
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    for name in exporting.FORMATS:
        (row,) = [r for r in rows if r.startswith(f"| {name} |")]
        assert "| 100.00 % |" in row and " MB |" in row and row.endswith(" ms |")
    assert any(r.startswith("| keras (release) |") for r in rows)
    assert "artifacts/export/MODEL_CARD.md" in summary


def tamper_onnx(path: Path, classes: int) -> None:
    """Add 50 to the second entry of the ONNX file's class-bias vector: one weight changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    biases = [t for t in model.graph.initializer if list(t.dims) == [classes]]
    assert biases, [list(t.dims) for t in model.graph.initializer]
    bias = biases[0]
    values = numpy_helper.to_array(bias).copy()
    values[1] += 50.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(path))


@pytest.mark.slow
def test_a_tampered_export_fails_the_gate_naming_its_format(project, tmp_path):
    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy", symlinks=True))
    before = {p.name: p.read_bytes() for p in params.path("export", copy).iterdir() if p.is_file()}
    classes = len(read_json(params.path("release", copy) / "labels.json")["classes"])
    onnx = exporting.CONVERTERS["onnx"]

    def convert_then_tamper(model, image_size, target):
        onnx.convert(model, image_size, target)
        tamper_onnx(target, classes)

    tampered = {
        **exporting.CONVERTERS,
        "onnx": dataclasses.replace(onnx, convert=convert_then_tamper),
    }
    only_onnx = dataclasses.replace(
        params, export=dataclasses.replace(params.export, formats=("onnx",))
    )
    with pytest.raises(
        exporting.ParityError,
        match=r"^export: onnx agrees with the Keras model on "
        r"\d+\.\d\d % of the test images \(\d+ differ; max \|dp\| ",
    ):
        export_step.export_release(copy, only_onnx, converters=tampered)
    after = {p.name: p.read_bytes() for p in params.path("export", copy).iterdir() if p.is_file()}
    assert after == before  # nothing half-written: the previous export is untouched
    assert not [p for p in params.path("export", copy).parent.iterdir() if ".tmp-" in p.name]
    # untampered, the same step passed on this release: the fixture's export
    assert (
        before["export.json"]
        and read_json(params.path("export", root) / "export.json")["formats"]["onnx"]["agreement"]
        == 1.0
    )


@pytest.mark.slow
def test_a_full_disk_fails_the_step_and_the_next_run_writes_the_export(project, tmp_path):
    """ENOSPC from a converter (TensorFlow reports it as its own error type, the system's message
    in the text) is a failed step naming the file, not a format "not available" that later runs
    would keep; the previous export stays, and a run with space writes the export."""
    import tensorflow as tf

    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy", symlinks=True))
    out = params.path("export", copy)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    saved_model = exporting.CONVERTERS["saved_model"]

    def disk_full(model, image_size, target):
        target.mkdir()
        (target / "half-written.pb").write_bytes(b"\0" * 100)
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{target}/variables; No space left on device"
        )

    full = {
        **exporting.CONVERTERS,
        "saved_model": dataclasses.replace(saved_model, convert=disk_full),
    }
    only = dataclasses.replace(
        params, export=dataclasses.replace(params.export, formats=("saved_model",))
    )
    (out / "export.json").unlink()  # nothing to keep: the step must convert
    with pytest.raises(
        UserError,
        match=r"^export: writing .*saved_model: ResourceExhaustedError: "
        r".*No space left on device; free space",
    ):
        export_step.export_release(copy, only, converters=full)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        name: data for name, data in before.items() if name != "export.json"
    }
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    export_step.export_release(copy, only)
    assert read_json(out / "export.json")["formats"]["saved_model"]["available"] is True
    assert (out / "saved_model" / "saved_model.pb").is_file()


def test_an_unavailable_format_is_never_kept_for_the_next_run(tmp_path):
    versions = exporting._versions(exporting.CONVERTERS["onnx"].packages)
    record = {
        "source": {"release": "x"},
        "latency_runs": 2,
        "formats": {
            "onnx": {"available": False, "reason": "ImportError: no", "versions": versions}
        },
    }
    (tmp_path / "export.json").write_text(json.dumps(record))
    assert exporting.reusable(tmp_path, ["onnx"], 2, {"release": "x"}) is None


@pytest.mark.slow
def test_an_unavailable_converter_is_reported_and_the_others_are_written(
    project, tmp_path, monkeypatch
):
    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy", symlinks=True))
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if the package were not installed
    two = dataclasses.replace(
        params, export=dataclasses.replace(params.export, formats=("onnx", "saved_model"))
    )
    tasks.get("export").function(two, copy)
    out = params.path("export", copy)
    record = read_json(out / "export.json")
    onnx = record["formats"]["onnx"]
    assert onnx["available"] is False
    assert onnx["reason"].startswith("ModuleNotFoundError: import of tf2onnx halted")
    assert not (out / "model.onnx").exists() and not (out / "model.tflite").exists()
    assert record["formats"]["saved_model"]["available"]
    assert (out / "saved_model" / "saved_model.pb").is_file()
    summary = run_summary(copy, params, tasks.STEP_NAMES, [], [], {})
    assert "| onnx | not available: ModuleNotFoundError: import of tf2onnx halted" in summary
    card = (out / "MODEL_CARD.md").read_text()
    assert "| onnx | not available: ModuleNotFoundError" in card


@pytest.mark.slow
def test_the_model_card_names_what_the_run_used(project):
    root, params = project
    out = params.path("export", root)
    card = (out / modelcard.CARD_FILE).read_text()
    data_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    assert f"md5 `{data_md5}`" in card
    weights = read_json(params.path("weights", root) / "weights.json")
    weights_file = params.path("weights", root) / weights["file"]
    assert weights["sha256"] == sha256_file(weights_file)  # the file the run built on
    assert f"sha256 `{weights['sha256']}`" in card and "efficientnet_lite0" in card
    assert NOTES.strip() in card
    manifest = sha256_file(params.path("prepared", root) / "manifest.csv")
    assert f"manifest.csv` sha256 `{manifest}`" in card
    release = params.path("release", root) / "model.keras"
    assert f"sha256 `{sha256_file(release)}`" in card
    head = git(root, "rev-parse", "HEAD").strip()
    assert f"Code revision: `{head}` (clean" in card  # artifacts/ are untracked: not dirty
    metrics = read_json(params.path("metrics", root) / "release.json")
    assert f"- Accuracy: {metrics['accuracy']:.4f} (95 % CI " in card
    assert f"- Macro-F1: {metrics['macro_f1']:.4f} (95 % CI " in card
    assert "1000 bootstrap resamples" in card and f"numpy seed {params.base.seed}" in card
    report = read_json(params.path("data_report", root) / "report.json")
    for name, counts in report["per_class"].items():
        assert (
            f"| {name} | {counts['train']} | {counts['val']} | {counts['test']} | "
            f"{counts['quarantined']} | {counts['ignored']} |"
        ) in card
    record = read_json(out / "export.json")
    for result in record["formats"].values():
        for file, info in result["files"].items():
            assert f"| `{file}` | `{info['sha256']}` |" in card
    parameters = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    expected = params_module.to_dict(params)  # every setting but how work is done
    for section, key in (
        ("weights", "cache_dir"),
        ("weights", "retries"),
        ("export", "latency_runs"),
    ):
        del expected[section][key]
    assert parameters == expected
    calibration = (
        read_json(params.path("release", root) / "calibration.json")
        if (params.path("release", root) / "calibration.json").is_file()
        else None
    )
    if calibration is None:
        assert "Not calibrated" in card
    else:
        assert f"- temperature: {calibration['temperature']:.4g}" in card


@pytest.mark.slow
def test_the_card_says_what_it_cannot_know(project, tmp_path):
    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy", symlinks=True))
    shutil.rmtree(copy / ".git")
    (copy / "data.dvc").unlink()
    record = read_json(params.path("export", copy) / "export.json")
    card = modelcard.render(modelcard.collect(copy, params, record))
    assert "Code revision: unknown" in card
    assert "Version: unknown (`data` is not tracked by DVC)" in card
    (copy / modelcard.NOTES_FILE).unlink()
    with pytest.raises(UserError, match=rf"{modelcard.NOTES_FILE}: missing; create it"):
        modelcard.collect(copy, params, record)


@pytest.mark.slow
def test_headstart_export_runs_the_step(project, tmp_path):
    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy", symlinks=True))
    raw = params_module.to_dict(params)
    raw["export"]["formats"] = ["saved_model"]
    (copy / "params.yaml").write_text(yaml.safe_dump(raw))
    result = cli_here("export", "--project", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"export: wrote {params.path('export', copy)}"
    record = json.loads((params.path("export", copy) / "export.json").read_text())
    assert list(record["formats"]) == ["saved_model"]
    assert record["formats"]["saved_model"]["available"]
    assert "export: saved_model agrees on 100.00 %" in result.stderr


ONNX_LINES = """session = onnxruntime.InferenceSession(f"{folder}/model.onnx")
p = session.run(None, {session.get_inputs()[0].name: x})[0][0]
"""


def readme_snippet(runtime: str) -> str:
    """The README's deployment snippet (Pillow + onnxruntime), as a user copies it; for LiteRT,
    with its two `session` lines replaced by the README's LiteRT block, as it says."""
    text = (ROOT / "README.md").read_text()

    def block(opening: str) -> str:
        start = text.index("```python\n" + opening)
        return text[start + len("```python\n") : text.index("```", start + 10)]

    code = block("import json\n\nimport numpy as np\nimport onnxruntime")
    assert ONNX_LINES in code
    if runtime == "litert":
        code = code.replace(ONNX_LINES, block("from ai_edge_litert.interpreter import Interpreter"))
    return code


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx", "litert"])
@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_the_readme_deployment_snippet_gives_predicts_probabilities(
    project, tmp_path, resize, runtime
):
    from PIL import Image

    from headstart.predicting import predict_paths

    root, params = project
    release = Path(shutil.copytree(params.path("release", root), tmp_path / "release"))
    export = Path(shutil.copytree(params.path("export", root), tmp_path / "export"))
    for folder in (release, export):  # the record both follow (the model is the same)
        labels = read_json(folder / "labels.json")
        labels["preprocessing"]["resize"] = resize
        (folder / "labels.json").write_text(json.dumps(labels))
    source = sorted((root / "data" / "class_1").iterdir())[0]
    photo = tmp_path / "wide.png"  # not square: pad and stretch differ
    Image.open(source).convert("RGB").resize((48, 24)).save(photo)
    code = readme_snippet(runtime).replace(
        'folder, photo = "artifacts/export", "photo.jpg"', f'folder, photo = "{export}", "{photo}"'
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own code
    [expected] = predict_paths(release / "model.keras", [photo], top_k=10)
    assert expected["calibrated"]
    by_class = dict(expected["top"])
    got = dict(zip(namespace["labels"]["classes"], namespace["p"].tolist(), strict=True))
    assert set(got) == set(by_class)
    assert max(abs(got[name] - by_class[name]) for name in got) <= 1e-5


@pytest.mark.slow
def test_predict_answers_through_the_checked_onnx_export_like_the_release(project, tmp_path):
    from headstart.predicting import predict_paths

    root, params = project
    release, export = params.path("release", root), params.path("export", root)
    features = read_json(export / "export.json")["reject"]
    assert features["available"] and features["decision_agreement"] == 1.0
    assert sha256_file(export / "backbone.onnx") == features["files"]["backbone.onnx"]["sha256"]
    photos = sorted((root / "data").rglob("*.png"))[:12]
    noise = tmp_path / "noise.png"  # far from every class: --reject may answer "unknown"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(noise)
    photos.append(noise)
    keras_answers = predict_paths(release / "model.keras", photos, top_k=2, reject=True)
    fast = predict_paths(
        release / "model.keras", photos, top_k=2, reject=True, export_dirs=[export]
    )
    assert {r["runtime"] for r in keras_answers} == {"keras"}
    assert {r["runtime"] for r in fast} == {"onnx"}
    for want, got in zip(keras_answers, fast, strict=True):
        assert want["unknown"] == got["unknown"]
        assert abs(want["ood_score"] - got["ood_score"]) < 1e-3
        if "top" in want:
            assert [c for c, _ in want["top"]] == [c for c, _ in got["top"]]
            assert (
                max(abs(a - b) for (_, a), (_, b) in zip(want["top"], got["top"], strict=True))
                <= 1e-4
            )


@pytest.mark.slow
def test_predict_uses_keras_when_the_export_is_not_this_models(project, tmp_path):
    from headstart.predicting import predict_paths

    root, params = project
    export = Path(shutil.copytree(params.path("export", root), tmp_path / "export"))
    release = Path(shutil.copytree(params.path("release", root), tmp_path / "release"))
    photo = sorted((root / "data").rglob("*.png"))[0]

    def runtime(**kwargs) -> str:
        [answer] = predict_paths(release / "model.keras", [photo], export_dirs=[export], **kwargs)
        return answer["runtime"]

    assert runtime() == "onnx" and runtime(reject=True) == "onnx"
    backbone_onnx = (export / "backbone.onnx").read_bytes()
    (export / "backbone.onnx").write_bytes(backbone_onnx[:-1] + b"\0")  # changed after export
    assert runtime() == "onnx" and runtime(reject=True) == "keras"
    (export / "backbone.onnx").write_bytes(backbone_onnx)
    classes = len(read_json(release / "labels.json")["classes"])
    tamper_onnx(export / "model.onnx", classes)
    assert runtime() == "keras"
    shutil.copy(params.path("export", root) / "model.onnx", export / "model.onnx")
    assert runtime() == "onnx"
    with open(release / "model.keras", "ab") as handle:  # another model than the exported one
        handle.write(b"\0")
    assert runtime() == "keras"
