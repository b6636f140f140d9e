"""Calibrated confidence and "unknown" answers through the steps (select fits them, evaluate
scores them on test, plots draws the reliability diagram, predict applies them), on a tiny real
project with a random-weight backbone (plumbing), and on demo images with the real Lite0
weights (slow)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    cli_here,
    real_lite0_project,
    run_cli,
    stepped_project,
    write_random_backbone,
)
from PIL import Image

import tasks
from headstart import calibration, ood
from headstart.artifacts import load_features
from headstart.files import read_json


def write_photos(folder: Path) -> list[Path]:
    """Natural photos bundled with scikit-image, as PNG and JPEG files."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "camera", "chelsea")
    }
    paths = []
    for index, (name, array) in enumerate(arrays.items()):
        paths.append(folder / f"{name}.{'jpg' if index % 2 else 'png'}")
        Image.fromarray(array).save(paths[-1])
    return paths


def write_noise(folder: Path, count: int = 3) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"noise_{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return paths


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, object]:
    return stepped_project(tmp_path_factory)


def test_select_stores_a_temperature_fitted_on_validation(project):
    from headstart.artifacts import load_probabilities, load_split

    root, params = project
    release = params.path("release", root)
    record = read_json(release / calibration.CALIBRATION_FILE)
    selection = read_json(release / "selection.json")
    _, y_val = load_split(params.path("prepared", root), "val")
    assert record["val_images"] == len(y_val) and record["temperature"] > 0
    assert record["val_nll_after"] <= record["val_nll_before"]
    assert record["val_nll_before"] == pytest.approx(
        selection["candidates"][selection["winner"]]["val_loss"], abs=1e-4
    )
    if selection["winner"] == "transfer":  # recorded by head: the fit can be redone here
        p = load_probabilities(params.path("transfer", root), "val")
        assert record["temperature"] == pytest.approx(calibration.fit(p, y_val)["temperature"])


def test_the_release_folder_holds_what_reject_needs(project):
    root, params = project
    release = params.path("release", root)
    assert (release / "backbone.keras").read_bytes() == (
        params.path("backbone", root) / "backbone.keras"
    ).read_bytes()
    detector, record = ood.load(release)
    assert record["method"] == params.ood.method and record["keep"] == params.ood.keep
    f_val, _ = load_features(params.path("features", root), "val")
    # the distance of each L2-normalised feature row to the nearest class centroid in the
    # whitened space, written out plainly (not with the detector's own code): the threshold
    # keeps `keep` of validation
    assert params.ood.method == "mahalanobis"
    rows = np.asarray(f_val, np.float64)
    z = rows / np.linalg.norm(rows, axis=1, keepdims=True) @ detector.whitening
    scores = np.array(
        [min(np.linalg.norm(row - centroid) for centroid in detector.centroids) for row in z]
    )
    kept = np.mean(scores <= detector.threshold + 1e-6)
    assert kept >= params.ood.keep
    assert record["val_kept"] == pytest.approx(kept)
    n_train = len(np.load(params.path("prepared", root) / "train_labels.npy"))
    assert record["train_images"] == n_train


def test_calibration_and_threshold_never_read_the_test_split(project, tmp_path):
    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    features = params.path("features", copy) / "test_features.npy"
    np.save(features, -np.load(features))
    prepared = params.path("prepared", copy)
    np.save(prepared / "test_labels.npy", np.roll(np.load(prepared / "test_labels.npy"), 1))
    tasks.get("select").run(params, copy)
    for name in (calibration.CALIBRATION_FILE, ood.OOD_FILE, ood.OOD_ARRAYS):
        assert (params.path("release", copy) / name).read_bytes() == (
            params.path("release", root) / name
        ).read_bytes(), name


def test_a_stale_feature_cache_is_a_one_line_error(project, tmp_path):
    from headstart.errors import UserError

    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    labels = params.path("features", copy) / "val_labels.npy"
    np.save(labels, np.roll(np.load(labels), 1))
    with pytest.raises(UserError, match="feature cache does not match .*run `headstart step head`"):
        tasks.get("select").run(params, copy)


def plain_ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error written out bin by bin (Guo et al. 2017: 15 equal-width
    bins (k/15, (k+1)/15], images/total x |accuracy - mean confidence|), not the project's code."""
    total = 0.0
    for k in range(bins):
        low, high = k / bins, (k + 1) / bins
        rows = [
            i
            for i, p in enumerate(probabilities)
            if (low < p.max() <= high) or (k == 0 and p.max() <= low)
        ]
        if rows:
            accuracy = np.mean([probabilities[i].argmax() == labels[i] for i in rows])
            confidence = np.mean([probabilities[i].max() for i in rows])
            total += len(rows) / len(labels) * abs(accuracy - confidence)
    return float(total)


def test_evaluate_reports_ece_before_and_after_on_test(project):
    import keras

    from headstart.artifacts import load_split
    from headstart.training import predict

    root, params = project
    metrics = read_json(params.path("metrics", root) / "release.json")
    release = params.path("release", root)
    x, y = load_split(params.path("prepared", root), "test")
    p = predict(keras.saving.load_model(release / "model.keras"), x)
    temperature = read_json(release / calibration.CALIBRATION_FILE)["temperature"]
    calibrated = calibration.apply_temperature(p, temperature)
    assert metrics["temperature"] == temperature
    assert metrics["ece"] == pytest.approx(plain_ece(p, y), abs=1e-5)
    assert metrics["ece_calibrated"] == pytest.approx(plain_ece(calibrated, y), abs=1e-5)
    assert metrics["ece_calibrated"] <= metrics["ece"] + 1e-9
    tables = read_json(params.path("metrics", root) / "release_calibration.json")
    assert sum(tables["before"]["counts"]) == sum(tables["after"]["counts"]) == len(y)
    assert tables["after"]["ece"] == metrics["ece_calibrated"]
    detector = ood.load(release)[0]
    assert metrics["ood_threshold"] == detector.threshold
    # scored on the cached test features: what the release's own backbone gives, as predict does
    scores = detector.score(predict(keras.saving.load_model(release / "backbone.keras"), x))
    assert metrics["ood_kept"] == pytest.approx(np.mean(scores <= detector.threshold))


def test_evaluate_refuses_a_feature_cache_of_another_backbone(project, tmp_path):
    from headstart.errors import UserError

    root, params = project
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    write_random_backbone(params.path("release", copy), seed=1)  # not the cache's backbone
    with pytest.raises(
        UserError,
        match="not computed by the release's backbone from these "
        "prepared images; run `headstart step head`",
    ):
        tasks.get("evaluate").run(params, copy)


def test_the_reliability_diagram_is_drawn(project):
    root, params = project
    figure = params.path("plots", root) / "release_reliability.png"
    assert Image.open(figure).size == (1100, 480)  # both panels: 11 x 4.8 in at 100 dpi


def test_the_reliability_diagram_shows_each_filled_bins_accuracy_and_confidence():
    from headstart import calibration, plotting

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(0, 2, (200, 3)) + 3 * np.eye(3)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    before = calibration.reliability(probabilities, labels)
    after = calibration.reliability(calibration.apply_temperature(probabilities, 1.7), labels)
    figure = plotting.reliability_diagram(before, after, 1.7)
    for ax, table in zip(figure.axes, (before, after), strict=True):
        filled = [i for i, n in enumerate(table["counts"]) if n]
        assert [bar.get_height() for bar in ax.patches] == pytest.approx(
            [table["accuracy"][i] for i in filled]
        )
        marks = ax.collections[0].get_offsets()[:, 1]
        assert list(marks) == pytest.approx([table["confidence"][i] for i in filled])
    assert "T = 1.70" in figure.axes[1].get_title()


def test_predict_reports_the_temperature_scaled_probabilities(project, tmp_path):
    import keras

    from headstart import images, predicting

    root, params = project
    release = Path(shutil.copytree(params.path("release", root), tmp_path / "release"))
    record = read_json(release / calibration.CALIBRATION_FILE)
    (release / calibration.CALIBRATION_FILE).write_text(json.dumps({**record, "temperature": 2.5}))
    files = sorted((root / "data" / "class_1").iterdir())[:3]
    results = predicting.predict_paths(release / "model.keras", files, top_k=3)
    model = keras.saving.load_model(release / "model.keras")
    raw = np.asarray(model(np.stack([images.load(f, 32) for f in files]).astype("float32")))
    expected = calibration.apply_temperature(raw, 2.5)
    classes = read_json(release / "labels.json")["classes"]
    for result, row, plain in zip(results, expected, raw, strict=True):
        assert result["calibrated"] is True and "ood_score" not in result
        got = dict(result["top"])
        assert [got[c] for c in classes] == pytest.approx(row.tolist(), abs=1e-5)
        assert not np.allclose([got[c] for c in classes], plain, atol=1e-3)  # T = 2.5 shows
    (release / calibration.CALIBRATION_FILE).unlink()
    plain_results = predicting.predict_paths(release / "model.keras", files, top_k=3)
    assert all(r["calibrated"] is False for r in plain_results)
    assert [dict(r["top"])[classes[0]] for r in plain_results] == pytest.approx(
        raw[:, 0].tolist(), abs=1e-5
    )


def test_predict_reject_answers_unknown_for_photos_and_noise(project, tmp_path):
    root, params = project
    model = params.path("release", root) / "model.keras"
    strangers = write_photos(tmp_path / "photos") + write_noise(tmp_path / "noise")
    own = sorted((root / "data" / "class_0").iterdir())[:4]
    result = cli_here("predict", str(model), *map(str, strangers + own), "--reject", "--json")
    assert result.returncode == 0, result.stderr
    rows = {Path(row["file"]).name: row for row in json.loads(result.stdout)}
    threshold = read_json(model.parent / ood.OOD_FILE)["threshold"]
    for path in strangers:
        row = rows[path.name]
        assert row["unknown"] is True and "top" not in row, row
        assert row["ood_score"] > row["ood_threshold"] == threshold
    assert sum(not rows[path.name]["unknown"] for path in own) >= 3  # training images: known
    for path in own:
        row = rows[path.name]
        assert row["unknown"] == (row["ood_score"] > threshold)
        assert ("top" in row) == (not row["unknown"])
    from headstart import predicting

    text = predicting.render([rows[strangers[0].name], rows[own[0].name]], as_json=False)
    assert (
        f"{strangers[0]}  unknown (OOD score {rows[strangers[0].name]['ood_score']:.3f} > "
        f"threshold {threshold:.3f})" in text
    )
    (plain,) = predicting.predict_paths(model, strangers[:1])
    assert "unknown" not in plain and plain["top"][0][0].startswith("class_")  # without --reject


def test_predict_reject_without_a_detector_is_one_line(project, tmp_path):
    root, params = project
    model = params.path("transfer", root) / "model.keras"  # no ood.json beside it
    image = sorted((root / "data" / "class_0").iterdir())[0]
    result = run_cli("predict", str(model), str(image), "--reject")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {model.parent}/ood.json: missing; --reject needs a release made by "
        "`headstart step select` (rerun it)"
    )


@pytest.mark.slow
def test_real_lite0_on_demo_images_rejects_photos_and_keeps_its_own(tmp_path_factory, tmp_path):
    """The issue's check, scaled down: 40 demo images per class at 64 px, the real weights."""
    root, params = real_lite0_project(tmp_path_factory)
    from headstart import predicting

    model = params.path("release", root) / "model.keras"
    photos = predicting.predict_paths(model, write_photos(tmp_path / "photos"), reject=True)
    with open(params.path("prepared", root) / "manifest.csv") as handle:
        test_files = [
            root / "data" / row["file"] for row in csv.DictReader(handle) if row["split"] == "test"
        ]
    own = predicting.predict_paths(model, test_files, reject=True)
    rejected = np.mean([r["unknown"] for r in photos])
    kept = np.mean([not r["unknown"] for r in own])
    assert len(own) >= 90
    assert rejected >= 0.8, [(r["file"], r["ood_score"]) for r in photos]
    assert kept >= 0.88, kept  # 95 % of validation by construction; ~100 test images swing ±2.5


def test_the_run_summary_reports_calibration_and_the_threshold(project):
    from headstart.runsummary import candidates_table

    root, params = project
    metrics = read_json(params.path("metrics", root) / "release.json")
    record = read_json(params.path("release", root) / ood.OOD_FILE)
    text = "\n".join(candidates_table(root, params))
    assert f"test ECE {metrics['ece']:.4f} before, {metrics['ece_calibrated']:.4f} after" in text
    assert (
        f"keeps {100 * record['val_kept']:.1f} % of the validation images (chosen there) and "
        f"{100 * metrics['ood_kept']:.1f} % of the test images" in text
    )
