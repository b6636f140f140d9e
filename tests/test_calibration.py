"""Calibrated confidence (headstart/calibration.py): temperature scaling and the expected
calibration error, on numbers small enough to check by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headstart import calibration
from headstart.errors import UserError


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def calibrated_sample(n: int = 4000, classes: int = 5, seed: int = 0):
    """(logits, labels) with labels drawn from softmax(logits): calibrated at T = 1 by design."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    p = softmax(logits)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


def test_temperature_one_gives_the_probabilities_back():
    p = softmax(np.random.default_rng(1).normal(0, 3, (20, 4)))
    assert np.allclose(calibration.apply_temperature(p, 1.0), p, atol=1e-12)


def test_temperature_scaling_of_probabilities_is_temperature_scaling_of_logits():
    logits = np.random.default_rng(2).normal(0, 3, (20, 4))
    for temperature in (0.5, 2.0, 7.0):
        scaled = calibration.apply_temperature(softmax(logits), temperature)
        assert np.allclose(scaled, softmax(logits / temperature), atol=1e-10)
        assert np.array_equal(scaled.argmax(axis=1), logits.argmax(axis=1))  # same answers


@pytest.mark.parametrize("sharpness", [3.0, 0.4])
def test_the_fit_undoes_over_and_under_confidence_and_lowers_nll(sharpness):
    logits, labels = calibrated_sample()
    distorted = softmax(sharpness * logits)  # over-confident (3) or under-confident (0.4)
    temperature = calibration.fit_temperature(distorted, labels)
    assert temperature == pytest.approx(sharpness, rel=0.1)
    before = calibration.negative_log_likelihood(distorted, labels)
    after = calibration.negative_log_likelihood(
        calibration.apply_temperature(distorted, temperature), labels
    )
    assert after < before - 0.05
    for other in (temperature * 0.9, temperature * 1.1):  # a minimum, not just an improvement
        assert after <= calibration.negative_log_likelihood(
            calibration.apply_temperature(distorted, other), labels
        )


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, labels = calibrated_sample(seed=3)
    assert calibration.fit_temperature(softmax(logits), labels) == pytest.approx(1.0, abs=0.1)


def test_the_fit_record_reports_validation_nll_before_and_after():
    logits, labels = calibrated_sample(n=500, seed=4)
    record = calibration.fit(softmax(4 * logits), labels)
    assert record["val_images"] == 500
    assert record["val_nll_after"] < record["val_nll_before"]
    json.dumps(record, allow_nan=False)  # what select writes as calibration.json


def test_ece_by_hand():
    # 15 bins of width 1/15: 0.95 and 0.97 fall in bin 14 (0.933, 1], 0.55 and 0.6 in bin 8
    # (0.533, 0.6]. Bin 14: two images, one right: |0.5 - 0.96| = 0.46. Bin 8: two right,
    # mean confidence 0.575: |1 - 0.575| = 0.425. Weights 2/4 each.
    p = np.array([[0.95, 0.05], [0.03, 0.97], [0.55, 0.45], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 1])
    table = calibration.reliability(p, labels)
    assert table["counts"][14] == 2 and table["counts"][8] == 2 and sum(table["counts"]) == 4
    assert table["accuracy"][14] == 0.5 and table["confidence"][14] == pytest.approx(0.96)
    assert table["accuracy"][8] == 1.0 and table["confidence"][8] == pytest.approx(0.575)
    assert table["accuracy"][0] is None  # an empty bin
    assert calibration.expected_calibration_error(p, labels) == pytest.approx(
        0.5 * 0.46 + 0.5 * 0.425
    )
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration.expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    p = np.array([[0.6, 0.4]])  # 0.6 = 9/15: the upper edge of bin 8, (0.533, 0.6]
    assert calibration.reliability(p, np.array([0]))["counts"][8] == 1


def test_ece_falls_after_fitting_on_over_confident_probabilities():
    logits, labels = calibrated_sample(seed=5)
    fit, held_out = slice(0, 2000), slice(2000, None)
    distorted = softmax(3 * logits)
    temperature = calibration.fit_temperature(distorted[fit], labels[fit])
    before = calibration.expected_calibration_error(distorted[held_out], labels[held_out])
    after = calibration.expected_calibration_error(
        calibration.apply_temperature(distorted[held_out], temperature), labels[held_out]
    )
    assert after < before / 2


def test_a_bad_calibration_file_is_a_one_line_error(tmp_path):
    assert calibration.read_temperature(tmp_path) is None  # no file: not calibrated
    (tmp_path / calibration.CALIBRATION_FILE).write_text('{"temperature": -1}')
    with pytest.raises(UserError, match="calibration.json: temperature must be a positive"):
        calibration.read_temperature(tmp_path)
    (tmp_path / calibration.CALIBRATION_FILE).write_text("{}")
    with pytest.raises(UserError, match="calibration.json: unreadable"):
        calibration.read_temperature(tmp_path)


def test_a_perfectly_separated_split_keeps_temperature_one_and_says_why():
    """With every validation image right the NLL keeps falling as T -> 0: no temperature is
    fitted (it would make every answer read 1.000)."""
    labels = np.arange(30) % 3
    p = np.full((30, 3), 0.05)
    p[np.arange(30), labels] = 0.9
    record = calibration.fit(p, labels)
    assert record["temperature"] == 1.0 and record["val_errors"] == 0
    assert record["note"].startswith("kept at 1: 0 wrong validation image(s)")
    unbounded = calibration.fit_temperature(p, labels)  # the search alone runs to its bound
    assert unbounded == pytest.approx(calibration.TEMPERATURE_RANGE[0], rel=0.01)


def test_a_small_temperature_keeps_the_runners_up_and_their_order(tmp_path):
    """`predict -k 3` on a calibrated release: the runners-up keep non-zero probabilities in the
    order of the model's scores, never label order."""
    import keras
    from PIL import Image

    from headstart.predicting import predict_paths

    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(4, activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    # float32 softmax: c = e^-50, d = e^-80 (tiny but ordered), a = e^-199 -> 0
    dense.set_weights([np.zeros((3, 4), "float32"), np.array([1, 200, 150, 120], "float32")])
    model.save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text(
        json.dumps({"classes": ["a", "b", "c", "d"], "image_size": 8})
    )
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": 0.2}))
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "x.png")
    [result] = predict_paths(tmp_path / "model.keras", [tmp_path / "x.png"], top_k=3)
    assert [label for label, _ in result["top"]] == ["b", "c", "d"]  # not b, a, c
    assert all(p > 0 for _, p in result["top"]) and result["calibrated"]
