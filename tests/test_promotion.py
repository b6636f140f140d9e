"""Promotion: a new release replaces the champion only on evidence (exact McNemar, one-sided) and
when no class's recall drops beyond the tolerance; the old ">=" rule stays a setting.

The models are real (tiny) Keras models that answer class 1 when an image's mean red value
reaches a threshold; image i of the test split has red value i, so two thresholds one apart
disagree on exactly one image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_cli

from headstart import params as params_module
from headstart.promotion import binomial_tail, mcnemar, promote, promote_from_params, recall_check

CLASSES = ["cat", "dog"]
IMAGES = 40  # images 0..19 are cats, 20..39 dogs


def write_prepared(prepared: Path) -> None:
    """A tiny prepared test split: image i is 4x4 pixels of red value i."""
    prepared.mkdir(parents=True)
    images = np.zeros((IMAGES, 4, 4, 3), dtype=np.uint8)
    images[..., 0] = np.arange(IMAGES, dtype=np.uint8)[:, None, None]
    np.save(prepared / "test_images.npy", images)
    np.save(prepared / "test_labels.npy", (np.arange(IMAGES) >= 20).astype(np.int32))
    (prepared / "labels.json").write_text(json.dumps({"classes": CLASSES, "image_size": 4}))


def threshold_model(folder: Path, threshold: int) -> Path:
    """A release folder whose model answers 'dog' for images with red value >= `threshold`."""
    import keras

    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    layer = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, layer(pooled))
    weights = np.zeros((3, 2), "float32")
    weights[0, 1] = 10.0  # dog logit - cat logit = 10 * (red - threshold + 0.5)
    layer.set_weights([weights, np.array([0.0, -10.0 * (threshold - 0.5)], "float32")])
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps({"classes": CLASSES, "image_size": 4}))
    return folder


def install(tmp_path: Path, threshold: int) -> tuple[Path, Path]:
    """(prepared, champion dir) with a champion of `threshold` installed by a first promotion."""
    prepared, champion = tmp_path / "prepared", tmp_path / "champion"
    write_prepared(prepared)
    first = promote(threshold_model(tmp_path / "first", threshold), prepared, champion)
    assert first["promoted"] and first["reason"] == "no current model" and first["test"] is None
    return prepared, champion


@pytest.fixture
def project(tmp_path):
    """A champion of threshold 22: it misses dogs 20 and 21 (accuracy 38/40, cat recall 1.0, dog
    recall 0.9)."""
    return install(tmp_path, 22)


@pytest.fixture
def weak_project(tmp_path):
    """A champion of threshold 30: it misses dogs 20..29 (accuracy 30/40, dog recall 0.5)."""
    return install(tmp_path, 30)


def challenge(project, tmp_path, threshold: int, **settings) -> dict:
    prepared, champion = project
    release = threshold_model(tmp_path / f"release-{threshold}", threshold)
    before = (champion / "model.keras").read_bytes()
    decision = promote(release, prepared, champion, **settings)
    installed = (champion / "model.keras").read_bytes()
    assert (installed == (release / "model.keras").read_bytes()) is decision["promoted"]
    assert (installed == before) is not decision["promoted"]
    return decision


def test_one_image_worse_is_never_promoted(project, tmp_path):
    for rule in ("mcnemar", "at_least"):
        worse = challenge(project, tmp_path, 23, rule=rule)  # also misses dog 22
        assert not worse["promoted"], rule
        assert (worse["test"]["b"], worse["test"]["c"]) == (0, 1)
        assert worse["challenger"] < worse["champion"]


def test_one_image_better_is_promoted_only_with_the_at_least_rule(project, tmp_path):
    default = challenge(project, tmp_path, 21)  # gets dog 21 right too
    assert not default["promoted"] and default["rule"] == "mcnemar"
    assert (default["test"]["b"], default["test"]["c"]) == (1, 0)
    assert default["test"]["p_value"] == 0.5 and "not significantly better" in default["reason"]

    at_least = challenge(project, tmp_path, 21, rule="at_least")
    assert at_least["promoted"] and at_least["challenger"] > at_least["champion"]


def test_an_identical_challenger_keeps_the_champion_unless_at_least(project, tmp_path):
    assert not challenge(project, tmp_path, 22)["promoted"]
    assert challenge(project, tmp_path, 22, rule="at_least")["promoted"]


def test_two_images_better_are_not_evidence_either(project, tmp_path):
    decision = challenge(project, tmp_path, 20)  # perfect: b = 2, c = 0
    assert not decision["promoted"] and decision["test"]["p_value"] == 0.25


def test_a_significantly_better_challenger_is_promoted_and_recorded(weak_project, tmp_path):
    champion = weak_project[1]
    better = challenge(weak_project, tmp_path, 20)  # perfect
    assert better["promoted"] and "significantly better" in better["reason"]
    assert better["test"]["b"] == 10 and better["test"]["c"] == 0
    assert better["test"]["p_value"] == 1 / 2**10
    assert json.loads((champion / "promotion.json").read_text()) == better
    assert [entry["ok"] for entry in better["recall"]] == [True, True]


def test_the_p_value_by_hand(weak_project, tmp_path):
    """b = 10, c = 2: P(X >= 10) for X ~ Binomial(12, 1/2) = (66 + 12 + 1) / 4096."""
    decision = challenge(weak_project, tmp_path, 18, recall_tolerance=0.1)  # wrong on cats 18, 19
    test = decision["test"]
    assert (test["b"], test["c"], test["images"]) == (10, 2, IMAGES)
    assert test["p_value"] == pytest.approx(79 / 4096, rel=1e-12)
    assert test["p_value_worse"] == pytest.approx(1 - 13 / 4096, rel=1e-12)  # P(X >= 2)
    assert decision["promoted"]  # 0.0193 < 0.05, and the cat recall drop 0.1 is tolerated
    assert binomial_tail(6, 7) == 8 / 128 and binomial_tail(0, 0) == 1.0
    hits = mcnemar(np.array([1, 1, 0, 1]), np.array([0, 1, 1, 0]))
    assert (hits["b"], hits["c"], hits["p_value"], hits["p_value_worse"]) == (2, 1, 0.5, 0.875)


def test_a_recall_drop_beyond_the_tolerance_blocks_promotion(project, tmp_path):
    # threshold 18: equal accuracy (misses cats 18, 19 instead of dogs 20, 21), cat recall -0.1
    blocked = challenge(project, tmp_path, 18, rule="at_least")
    assert blocked["challenger"] == blocked["champion"] and not blocked["promoted"]
    cat, dog = blocked["recall"]
    assert cat == {
        "class": "cat",
        "images": 20,
        "champion": 1.0,
        "challenger": 0.9,
        "drop": pytest.approx(0.1),
        "ok": False,
    }
    assert dog["ok"] and dog["drop"] == pytest.approx(-0.1)
    assert "recall of class 'cat' drops by 0.1000" in blocked["reason"]
    assert challenge(project, tmp_path, 18, rule="at_least", recall_tolerance=0.1)["promoted"]


def test_a_recall_drop_blocks_even_a_significant_improvement(weak_project, tmp_path):
    blocked = challenge(weak_project, tmp_path, 18)  # p = 0.019 but cat recall 1.0 -> 0.9
    assert blocked["test"]["p_value"] < 0.05 and not blocked["promoted"]
    assert [entry["ok"] for entry in blocked["recall"]] == [False, True]


def test_a_drop_of_exactly_the_tolerance_passes(project, tmp_path):
    # threshold 23: dog recall 0.9 -> 0.85, a drop of 0.05 (not 0.05000000000000004)
    decision = challenge(project, tmp_path, 23, rule="at_least", recall_tolerance=0.05)
    assert decision["recall"][1]["ok"] and not decision["promoted"]  # accuracy decides
    assert not challenge(project, tmp_path, 23, recall_tolerance=0.049)["recall"][1]["ok"]


def test_promote_from_params_passes_the_settings_and_copies_the_model_card(tmp_path):
    params = params_module.from_dict(
        {"promotion": {"rule": "at_least", "alpha": 0.01, "recall_tolerance": 0.2}}
    )
    write_prepared(params.path("prepared", tmp_path))
    release = threshold_model(params.path("release", tmp_path), 22)
    (release / "MODEL_CARD.md").write_text("# Model card\n")
    assert promote_from_params(params, tmp_path)["promoted"]
    champion = params.path("champion", tmp_path)
    assert (champion / "MODEL_CARD.md").read_text() == "# Model card\n"

    threshold_model(release, 18)  # equal accuracy, cat recall -0.1: within 0.2
    (release / "MODEL_CARD.md").unlink()
    decision = promote_from_params(params, tmp_path)
    assert decision["promoted"] and (decision["rule"], decision["alpha"]) == ("at_least", 0.01)
    assert decision["recall_tolerance"] == 0.2
    recorded = json.loads((champion / "promotion.json").read_text())
    assert recorded["test"]["name"].startswith("exact McNemar")
    assert (recorded["test"]["b"], recorded["test"]["c"]) == (2, 2)
    assert not (champion / "MODEL_CARD.md").exists()  # no card this time: none beside it


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rule", "bootstrap", "promotion.rule must be one of mcnemar, at_least (got 'bootstrap')"),
        ("alpha", 0, "promotion.alpha must be between 0 and 1 (exclusive), e.g. 0.05 (got 0.0)"),
        ("alpha", 1.5, "promotion.alpha must be between 0 and 1"),
        ("recall_tolerance", -0.1, "promotion.recall_tolerance must be between 0 and 1"),
        ("alpha", "often", "promotion.alpha must be a number (got 'often')"),
    ],
)
def test_bad_promotion_params_name_the_key(key, value, message):
    with pytest.raises(params_module.ParamsError, match=re.escape(message)):
        params_module.from_dict({"promotion": {key: value}})


def test_a_bad_promotion_rule_is_one_line_from_the_cli(tmp_path):
    raw = params_module.to_dict(params_module.Params())
    raw["promotion"]["rule"] = "coin"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli("status", "--project", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/params.yaml: params: promotion.rule must be one of mcnemar, "
        "at_least (got 'coin')"
    ]
    del raw["promotion"]["alpha"]
    raw["promotion"]["rule"] = "mcnemar"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    missing = run_cli("status", "--project", str(tmp_path))
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .endswith("missing key promotion.alpha; add it (default: 0.05)")
    )


def test_recall_check_counts_images_so_a_drop_equal_to_the_tolerance_passes():
    labels = np.zeros(100, dtype=np.int64)
    champion = np.zeros(100, dtype=np.int64)
    challenger = np.where(np.arange(100) < 29, 1, 0)  # 29 of 100 lost: a drop of 0.29
    (entry,) = recall_check(labels, champion, challenger, ["a"], tolerance=0.29)
    assert entry["ok"] and entry["drop"] == pytest.approx(0.29)  # 0.29 * 100 = 28.999999999999996
    assert not recall_check(labels, champion, challenger, ["a"], tolerance=0.28)[0]["ok"]
    assert recall_check(labels[:0], champion[:0], challenger[:0], ["a"], 0.0)[0]["ok"]


def test_the_export_steps_model_card_goes_beside_the_champion(tmp_path):
    params = params_module.from_dict({})
    write_prepared(params.path("prepared", tmp_path))
    release = threshold_model(params.path("release", tmp_path), 22)
    (release / "MODEL_CARD.md").write_text("# the release's card\n")
    export = params.path("export", tmp_path)
    export.mkdir(parents=True)
    (export / "MODEL_CARD.md").write_text("# the export step's card, with checksums\n")
    assert promote_from_params(params, tmp_path)["promoted"]
    card = params.path("champion", tmp_path) / "MODEL_CARD.md"
    assert card.read_text() == "# the export step's card, with checksums\n"
