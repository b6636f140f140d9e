"""Training, evaluation, plots and predict on tiny real images (32 px, 1-2 epochs)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_here, real_lite0_project, run_cli, small_params, stepped_project

import tasks
from headstart import backbones
from headstart.artifacts import load_features
from headstart.errors import UserError
from headstart.files import MARKER, read_json
from headstart.metrics import classification_metrics
from headstart.runsummary import run_summary


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, object]:
    """A tiny project run through every step but weights/freeze (random frozen backbone)."""
    return stepped_project(tmp_path_factory)


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_the_pooled_baseline_keeps_its_size_where_the_seeds_grows(size):
    from headstart.models import baseline_cnn

    pooled, seed = baseline_cnn(size, 5, "pooled"), baseline_cnn(size, 5, "seed")
    assert pooled.count_params() < 240_000  # at most 5 x 5 x 64 features into the Dense 128
    side = ((((size - 2) // 2 - 2) // 2) - 2) // 2  # after the three conv/pool blocks
    assert seed.count_params() > side * side * 64 * 512  # the Dense 512 on the flattened map
    # at 224 px the pooled network averages 2 x 2 pixels first: its convolutions see 112 px
    downsample = [layer for layer in pooled.layers if layer.name == "downsample"]
    assert [layer.pool_size for layer in downsample] == ([(2, 2)] if size == 224 else [])
    image = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    assert np.allclose(np.asarray(pooled(image)).sum(axis=1), 1.0, atol=1e-5)


def test_baseline_artifacts(project):
    root, params = project
    out = params.path("baseline", root)
    for name in (
        "model.keras",
        "dvclive/metrics.json",
        "summary.txt",
        "labels.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.h5"))  # no training checkpoint kept as an output
    logged = sorted(f.relative_to(out).as_posix() for f in out.glob("dvclive/**/*.tsv"))
    assert logged == [
        f"dvclive/plots/metrics/baseline/{split}/{metric}.tsv"
        for split in ("eval", "train")
        for metric in ("accuracy", "loss")
    ]
    with open(out / "dvclive/plots/metrics/baseline/train/loss.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert 1 <= len(rows) <= params.baseline.epochs
    assert [row["step"] for row in rows] == [str(step) for step in range(len(rows))]
    summary = read_json(out / "dvclive/metrics.json")
    assert summary["step"] == len(rows) - 1
    assert summary["baseline"]["train"]["loss"] == pytest.approx(float(rows[-1]["loss"]))
    assert "conv64" in (out / "summary.txt").read_text()


def test_end_to_end_model_matches_backbone_plus_head_on_the_cache(project):
    import keras

    root, params = project
    transfer = keras.saving.load_model(params.path("transfer", root) / "model.keras")
    head = keras.saving.load_model(params.path("transfer", root) / "head.keras")
    features, labels = load_features(params.path("features", root), "test")
    images = np.load(params.path("prepared", root) / "test_images.npy")
    assert len(features) == len(images) == len(labels)
    from_images = np.asarray(transfer(images.astype("float32"), training=False))
    from_cache = np.asarray(head(np.asarray(features), training=False))
    assert np.allclose(from_images, from_cache, atol=1e-5)
    bigger = np.repeat(np.repeat(images[:2], 2, axis=1), 2, axis=2).astype("float32")
    assert transfer(bigger).shape == (2, 3)  # any input size is resized inside


def test_recorded_transfer_probabilities_are_the_saved_models_outputs(project):
    """select and evaluate read the transfer model's val/test probabilities from head's record
    instead of running the backbone again: they must be what the saved model outputs."""
    import keras

    from headstart.artifacts import load_probabilities, load_split

    root, params = project
    transfer = keras.saving.load_model(params.path("transfer", root) / "model.keras")
    for split in ("val", "test"):
        images, labels = load_split(params.path("prepared", root), split)
        recorded = load_probabilities(params.path("transfer", root), split)
        assert recorded.shape == (len(labels), 3)
        assert np.allclose(recorded, np.asarray(transfer(np.asarray(images, "float32"))), atol=1e-5)


def test_feature_cache_is_reused_when_only_head_settings_change(project, tmp_path):
    root, params = project
    copy = tmp_path / "copy"  # the module's project stays as it is for the other tests
    shutil.copytree(root, copy)
    record = params.path("features", copy) / "features.json"
    before = read_json(record)
    changed = small_params(head={"epochs": 1, "units": 16})
    tasks.get("head").run(changed, copy)
    assert read_json(record) == before
    views = small_params(head={"augment": "shift", "views": 3, "epochs": 1})
    tasks.get("head").run(views, copy)
    n = len(np.load(params.path("prepared", copy) / "train_labels.npy"))
    features, labels = load_features(params.path("features", copy), "train")
    assert len(features) == len(labels) == 3 * n
    assert read_json(record)["views"] == ["none", "shift", "shift"]
    for view in (1, 2):
        assert not np.allclose(features[:n], features[view * n : (view + 1) * n], atol=0)


def test_the_feature_cache_is_stale_when_prepare_decodes_differently(project, tmp_path):
    """prepare.resize changes the prepared pixels but not the manifest (the same source files):
    the cache key must change with it, or the head trains on the old images' features."""
    from headstart import features

    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    prepared, backbone = params.path("prepared", copy), params.path("backbone", copy)
    manifest = (prepared / "manifest.csv").read_bytes()
    before = features.cache_key(prepared, backbone, ("none",), params.base.seed)
    tasks.get("prepare").run(small_params(prepare={"resize": "stretch"}), copy)
    assert (prepared / "manifest.csv").read_bytes() == manifest
    assert features.cache_key(prepared, backbone, ("none",), params.base.seed) != before


def test_metrics_files_have_flat_keys_and_the_headline_is_the_release_as_shipped(project):
    root, params = project
    metrics_dir = params.path("metrics", root)
    figures = {}
    for name in ("baseline", "transfer", "ensemble", "release"):
        figures[name] = metrics = read_json(metrics_dir / f"{name}.json")
        assert {"accuracy", "loss", "macro_f1", "test_images", "f1.class_0"} <= set(metrics)
        assert [key for key in metrics if key.startswith("top") and key.endswith("_accuracy")]
        assert all(not isinstance(v, dict) for v in metrics.values())  # flat keys
        confusion = read_json(metrics_dir / f"{name}_confusion.json")
        assert np.sum(confusion["matrix"]) == metrics["test_images"]
        with open(metrics_dir / f"{name}_predictions.csv") as handle:
            assert len(list(csv.DictReader(handle))) == metrics["test_images"]
    headline = read_json(metrics_dir / "headline.json")
    release = figures["release"]
    shown = {
        "loss": "loss_calibrated",
        "ece": "ece_calibrated",
        "accuracy": "accuracy",
        "macro_f1": "macro_f1",
    }
    for key, figure in shown.items():
        assert headline[key] == pytest.approx(release[figure], abs=5e-5), key
    for name in ("baseline", "transfer", "ensemble"):
        assert headline[name] == pytest.approx(figures[name]["accuracy"], abs=5e-5)
    assert headline["test_images"] == release["test_images"] and len(headline) == 8


def test_every_head_configuration_is_scored_and_the_choice_recorded(project):
    root, params = project
    out = params.path("transfer", root)
    selection = read_json(out / "head_selection.json")
    names = [c["name"] for c in selection["candidates"]]
    assert names == ["linear", "small", "dense"]
    assert selection["chosen"] in names and selection["reason"].startswith("3-fold CV")
    assert all(
        0 <= c["cv_accuracy"] <= 1 and 1 <= c["best_epochs"] <= c["epochs_run"]
        for c in selection["candidates"]
    )
    finished = [c for c in selection["candidates"] if c["dropped"] is None]
    assert selection["chosen"] in [c["name"] for c in finished]
    dense = selection["candidates"][2]
    assert (dense["units"], dense["dropout"]) == (params.head.units, params.head.dropout)
    curve = read_json(out / "learning_curve.json")["points"]
    assert list(curve) == ["10%", "25%", "50%", "100%"]
    sizes = [point["images"] for point in curve.values()]
    assert sizes == sorted(sizes) and sizes[-1] == len(
        np.load(params.path("prepared", root) / "train_labels.npy")
    )


def test_the_seed_head_can_be_pinned(project, tmp_path):
    root, params = project
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    pinned = small_params(head={"config": "seed", "units": 24})
    tasks.get("head").run(pinned, copy)
    out = pinned.path("transfer", copy)
    assert read_json(out / "transfer.json")["config"] == "seed"
    assert not (out / "head_selection.json").exists()
    import keras

    head = keras.saving.load_model(out / "head.keras")
    assert head.get_layer("head_dense").units == 24 and head.get_layer("head_dropout").rate == 0.2


def test_the_choice_never_reads_the_test_split(project, tmp_path):
    root, params = project
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    prepared = params.path("prepared", copy)
    labels = np.load(prepared / "test_labels.npy")
    np.save(prepared / "test_labels.npy", np.roll(labels, 1))
    images = np.load(prepared / "test_images.npy")
    np.save(prepared / "test_images.npy", 255 - images)
    tasks.get("select").run(params, copy)
    before = (params.path("release", root) / "selection.json").read_bytes()
    assert (params.path("release", copy) / "selection.json").read_bytes() == before


def test_evaluate_fails_when_the_release_is_not_the_candidate_select_named(project, tmp_path):
    root, params = project
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    record = params.path("release", copy) / "selection.json"
    selection = json.loads(record.read_text())
    other = next(n for n in ("baseline", "transfer", "ensemble") if n != selection["winner"])
    record.write_text(json.dumps({**selection, "winner": other}))
    with pytest.raises(UserError, match=f"the released model differs from {other} by"):
        tasks.get("evaluate").run(params, copy)


def test_an_ensemble_release_is_the_weighted_geometric_mean_of_its_members(project, tmp_path):
    import keras

    from headstart.metrics import ensemble_probabilities
    from tasks.select import release_model

    root, params = project
    baseline = keras.saving.load_model(params.path("baseline", root) / "model.keras")
    transfer = keras.saving.load_model(params.path("transfer", root) / "model.keras")
    release = release_model("ensemble", baseline, transfer, params.base.image_size, 0.3)
    release.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    x = np.random.default_rng(1).uniform(0, 255, (4, 45, 37, 3)).astype("float32")
    resized = keras.layers.Resizing(params.base.image_size, params.base.image_size)(x)
    product = (
        np.asarray(transfer(x, training=False), np.float64) ** 0.3
        * np.asarray(baseline(resized, training=False), np.float64) ** 0.7
    )
    expected = product / product.sum(axis=1, keepdims=True)
    assert np.allclose(np.asarray(loaded(x)), expected, atol=1e-5)
    members = (np.asarray(baseline(resized)), np.asarray(transfer(x)))
    assert np.allclose(ensemble_probabilities(*members, 0.3), expected, atol=1e-5)


def test_selection_is_recorded_and_the_release_is_evaluated(project):
    root, params = project
    selection = read_json(params.path("release", root) / "selection.json")
    assert set(selection["candidates"]) == {"baseline", "transfer", "ensemble"}
    assert selection["winner"] in selection["candidates"] and selection["reason"]
    metrics_dir = params.path("metrics", root)
    release = read_json(metrics_dir / "release.json")
    winner = read_json(metrics_dir / f"{selection['winner']}.json")
    assert release["accuracy"] == pytest.approx(winner["accuracy"])
    assert winner["released"] and winner["val_accuracy"] == pytest.approx(
        selection["candidates"][selection["winner"]]["val_accuracy"]
    )


def test_classification_metrics_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1])
    metrics, confusion = classification_metrics(probabilities, labels, ["a", "b"], top_k=1)
    assert confusion == [[1, 1], [0, 2]]
    assert metrics["accuracy"] == 0.75
    assert metrics["precision.b"] == pytest.approx(2 / 3)
    assert metrics["recall.a"] == 0.5
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])))


def test_plots_are_written(project):
    root, params = project
    out = params.path("plots", root)
    names = sorted(p.name for p in out.iterdir() if p.name != MARKER)
    figures = [
        "baseline_confusion.png",
        "curves.png",
        "learning_curve.png",
        "release_confusion.png",
        "release_reliability.png",
        "release_samples.png",
        "transfer_confusion.png",
    ]
    sheets = {"suspects.png", "off_topic.png", "near_duplicates.png"}  # drawn when not empty
    assert [n for n in names if n not in sheets] == sorted([*figures, "doctor.json"])
    from PIL import Image

    assert Image.open(out / "curves.png").size == (1100, 700)  # two models: 2 x 5.5 in x 7 in


def test_the_curves_show_each_models_training_and_validation_values():
    from headstart import plotting

    histories = {
        "baseline": {
            "accuracy": [0.5, 0.8],
            "val_accuracy": [0.4, 0.7],
            "loss": [1.0, 0.5],
            "val_loss": [1.2, 0.7],
        },
        "transfer": {
            "accuracy": [0.6, 0.9, 0.95],
            "val_accuracy": [0.6, 0.8, 0.85],
            "loss": [0.9, 0.3, 0.2],
            "val_loss": [0.8, 0.5, 0.45],
        },
    }
    axes = plotting.training_curves(histories).axes
    assert len(axes) == 4
    for column, (name, history) in enumerate(histories.items()):
        for row, metric in enumerate(("accuracy", "loss")):
            ax = axes[row * 2 + column]
            assert ax.get_title() == f"{name}: training and validation {metric}"
            training, validation = ax.get_lines()
            assert list(training.get_ydata()) == history[metric]
            assert list(validation.get_ydata()) == history[f"val_{metric}"]
            assert list(training.get_xdata()) == list(range(1, len(history["loss"]) + 1))


def test_finetune_moves_top_convolutions_but_never_batchnorm_statistics(tmp_path):
    import keras

    from headstart import models, training
    from tasks.weights import fetch_weights

    backbone = backbones.get("efficientnet_lite0")
    base = backbone.build(32, include_top=True)  # real weights: random ones give ~0 gradients
    base.load_weights(
        str(fetch_weights(tmp_path, small_params()) / "efficientnet_lite0.weights.h5")
    )
    extractor = backbones.freeze(backbones.feature_extractor(base, backbone.cut_layer))
    backbones.unfreeze_top(extractor, backbone, 1)  # what the head step's fine-tuning calls
    model = models.end_to_end(extractor, models.dense_head(1280, 2, 8), 32)
    training.compile_classifier(model, keras.optimizers.Adam(1e-2))
    norms = [
        layer for layer in extractor.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    stats = [np.array(w) for layer in norms for w in layer.weights]
    top_conv = extractor.get_layer("block15_project_conv")
    low_conv = extractor.get_layer("block10_project_conv")
    top_before, low_before = top_conv.get_weights()[0].copy(), low_conv.get_weights()[0].copy()
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    model.fit(x, np.arange(16) % 2, epochs=2, batch_size=8, verbose=0)
    after = [np.array(w) for layer in norms for w in layer.weights]
    assert all(np.array_equal(a, b) for a, b in zip(stats, after, strict=True))
    assert not np.allclose(top_conv.get_weights()[0], top_before)
    assert np.array_equal(low_conv.get_weights()[0], low_before)


def test_finetune_step_keeps_the_better_model_and_records_it(project, tmp_path):
    root, params = project
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    tuned = small_params(finetune={"enabled": True, "blocks": 1, "epochs": 1, "batch_size": 8})
    tasks.get("head").run(tuned, copy)
    record = read_json(tuned.path("transfer", copy) / "transfer.json")["finetune"]
    assert record["kept"] == (record["val_accuracy_after"] > record["val_accuracy_before"])
    import keras

    saved = keras.saving.load_model(tuned.path("transfer", copy) / "model.keras")
    extractor = saved.get_layer("efficientnet_lite0_features")
    assert not extractor.trainable_weights  # saved frozen again, ready for inference


def test_finetune_auto_runs_when_it_fits_the_budget_and_the_summary_says_so(project):
    root, params = project
    assert params.finetune.enabled == "auto"  # the tiny projects' setting (small_params)
    record = read_json(params.path("transfer", root) / "transfer.json")["finetune"]
    assert record["setting"] == "auto" and record["ran"]
    assert 0 < record["estimate_s"] <= record["budget_left_s"] < 30 * 60
    verdict = "kept" if record["val_accuracy_after"] > record["val_accuracy_before"] else "dropped"
    assert record["kept"] == (verdict == "kept")
    assert record["outcome"].startswith(f"ran and {verdict}: validation accuracy ")
    assert record["reason"].endswith("left of base.budget 30 min")
    summary = run_summary(root, params, tasks.STEP_NAMES, [], [], {})
    assert f"fine-tuning: {record['outcome']} ({record['reason']})" in summary


def test_finetune_auto_is_skipped_and_recorded_when_over_the_budget(project, tmp_path):
    root, _ = project
    copy = Path(shutil.copytree(root, tmp_path / "copy", symlinks=True))
    tight = small_params(base={"budget": 0.01})  # 0.6 s: under fine-tuning's fixed cost alone
    tasks.get("head").run(tight, copy)
    out = tight.path("transfer", copy)
    record = read_json(out / "transfer.json")["finetune"]
    assert not record["ran"] and not record["kept"] and "val_accuracy_after" not in record
    assert record["budget_left_s"] < 0.6 < record["estimate_s"]
    assert record["outcome"] == record["reason"]
    assert re.fullmatch(
        r"skipped: estimated [\d.]+ s > budget left [\d.]+ s \(base.budget 0.01 min\)",
        record["reason"],
    )
    assert not (out / "dvclive/plots/metrics/finetune").exists()
    summary = run_summary(copy, tight, tasks.STEP_NAMES, [], [], {})
    assert f"fine-tuning: {record['reason']}" in summary


def test_the_finetuning_budget_counts_the_feature_cache_views(project, monkeypatch):
    from headstart import sizing
    from tasks.head import finetune_decision

    root, params = project
    monkeypatch.setattr(sizing, "FEATURE_SECONDS", 1.0)  # a slow machine: tenths of s show
    prepared = params.path("prepared", root)
    four_views = finetune_decision(prepared, params)  # head.augment auto: plain + 3 policies
    one_view = finetune_decision(prepared, small_params(head={"augment": "none"}))
    assert one_view.budget_left_s > four_views.budget_left_s
    assert one_view.estimate_s == four_views.estimate_s


def test_predict_cli_reports_bad_files_and_classifies_the_rest(project, tmp_path):
    root, params = project
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    good = sorted((root / "data" / "class_1").iterdir())[:2]
    model = params.path("transfer", root) / "model.keras"
    result = cli_here("predict", str(model), *map(str, good), str(bad), "--top-k", "2", "--json")
    assert result.returncode == 2, result.stderr  # answered, but not every file: not a success
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == [*map(str, good), str(bad)]
    assert all(len(r["top"]) == 2 and r["top"][0][0].startswith("class_") for r in rows[:2])
    assert "not an image" in rows[2]["error"]


def test_predict_verbose_shows_tensorflow_start_up_lines(project):
    """They exist (so the check that a plain predict hides them can fail: test_progress's
    predict on a folder, whose stderr stays empty): --verbose shows them. TensorFlow logging
    everything: whether they appear at the default level depends on the CPU (none on AMD EPYC
    at level 2)."""
    from headstart.quiet import STARTUP_NOISE

    root, params = project
    image = sorted((root / "data" / "class_1").iterdir())[0]
    model = params.path("transfer", root) / "model.keras"
    verbose = run_cli("-v", "predict", str(model), str(image), TF_CPP_MIN_LOG_LEVEL="0")
    assert verbose.returncode == 0, verbose.stderr
    assert STARTUP_NOISE.search(verbose.stderr)
    # the environment switch, as `dvc repro` passes it on to the `headstart step` it runs
    switched = run_cli(
        "predict", str(model), str(image), TF_CPP_MIN_LOG_LEVEL="0", HEADSTART_VERBOSE="1"
    )
    assert switched.returncode == 0 and STARTUP_NOISE.search(switched.stderr), switched.stderr


def test_predict_uses_the_release_by_default(project, tmp_path):
    root, params = project
    image = sorted((root / "data" / "class_2").iterdir())[0]
    result = cli_here("predict", str(image), "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    from headstart import predicting

    explicit = predicting.predict_paths(params.path("release", root) / "model.keras", [image])
    assert json.loads(predicting.render(explicit, as_json=True)) == [row]
    elsewhere = cli_here("predict", "--project", str(root), str(image), "--json", cwd=tmp_path)
    assert json.loads(elsewhere.stdout) == [row]  # the project's release, from another folder


@pytest.mark.slow
def test_transfer_on_real_lite0_weights_beats_chance_on_demo_images(tmp_path_factory):
    root, params = real_lite0_project(tmp_path_factory)
    import keras

    model = keras.saving.load_model(params.path("transfer", root) / "model.keras")
    x = np.load(params.path("prepared", root) / "test_images.npy")
    y = np.load(params.path("prepared", root) / "test_labels.npy")
    accuracy = np.mean(np.argmax(model(x.astype("float32")), axis=1) == y)
    assert accuracy > 0.4, accuracy  # chance is 0.1 with 10 classes


def test_the_same_model_saves_to_the_same_bytes(tmp_path):
    """Keras stamps the save time into a .keras file; saved through files.save_keras, identical
    models give identical files (so DVC does not rerun every step after a rerun one), which
    load in safe mode."""
    import time

    import keras

    from headstart.files import save_keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    first = save_keras(model, tmp_path / "a.keras").read_bytes()
    time.sleep(1.1)  # both stamps count whole seconds
    assert save_keras(model, tmp_path / "b.keras").read_bytes() == first
    loaded = keras.saving.load_model(tmp_path / "b.keras", safe_mode=True)
    x = np.ones((1, 4), "float32")
    assert np.array_equal(loaded(x), model(x))


@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_predict_follows_the_preprocessing_record_beside_the_model(tmp_path, resize):
    """labels.json records how prepare resized the images; predict does the same (it always
    padded: a model trained on stretched images was fed padded ones)."""
    import keras
    from PIL import Image

    from headstart import images
    from headstart.predicting import predict_paths

    inputs = keras.Input((16, 16, 3))
    red = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(red))
    dense.set_weights([np.array([[8.0, 0.0], [0, 0], [0, 0]], "float32"), np.zeros(2, "float32")])
    model.save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text(
        json.dumps(
            {
                "classes": ["red", "dark"],
                "image_size": 16,
                "preprocessing": images.preprocessing(16, resize),
            }
        )
    )
    Image.new("RGB", (40, 10), (255, 0, 0)).save(tmp_path / "wide.png")  # pad: 3/4 black
    [result] = predict_paths(tmp_path / "model.keras", [tmp_path / "wide.png"], top_k=2)
    expected = np.asarray(model(images.load(tmp_path / "wide.png", 16, resize)[None]))[0]
    other = "stretch" if resize == "pad" else "pad"
    elsewise = np.asarray(model(images.load(tmp_path / "wide.png", 16, other)[None]))[0]
    assert dict(result["top"])["red"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert abs(float(elsewise[0]) - float(expected[0])) > 0.1  # the modes do differ here


def test_the_baselines_augmentation_changes_each_image_each_epoch_and_flips_only_when_asked():
    from headstart import augment, training

    x = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3)).astype("uint8")
    y = np.arange(8)

    def epochs(policy: str) -> list[np.ndarray]:
        data = training.dataset(x, y, 8, augment=augment.layers_for(policy, seed=1))
        return [next(iter(data))[0].numpy() for _ in range(2)]

    plain, (first, second) = epochs("none"), epochs("shift")
    assert np.array_equal(plain[0], x) and np.array_equal(plain[1], x)
    assert not np.allclose(first, x) and not np.allclose(first, second)
    flipped = epochs("flip")[0]
    mirrored = [np.array_equal(flipped[i], x[i][:, ::-1]) for i in range(8)]
    kept = [np.array_equal(flipped[i], x[i]) for i in range(8)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)
