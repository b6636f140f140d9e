"""head.augment: which augmented views the cache holds, and a choice that can reject flips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import small_params
from PIL import Image, ImageDraw

import tasks
from headstart import augment
from tasks.weights import fetch_weights


def test_each_view_is_named_by_its_policy():
    assert augment.view_policies("none", 3) == ("none",)
    assert augment.view_policies("auto", 1) == ("none",)
    assert augment.view_policies("flip", 3) == ("none", "flip", "flip")
    assert augment.view_policies("auto", 2) == ("none", *augment.AUGMENTED)


def test_a_policys_rows_are_the_plain_views_and_its_own():
    views = augment.view_policies("auto", 3)  # none, flip x2, shift x2, flip_shift x2
    rows = augment.rows_of(views, "shift", 4)
    assert rows.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19]
    assert augment.rows_of(views, "none", 4).tolist() == [0, 1, 2, 3]


def arrow(pointing_right: bool, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """An arrow on a random background, at a random place, size and colour."""
    background = tuple(int(v) for v in rng.integers(150, 256, 3))
    image = Image.new("RGB", (size, size), background)
    length, width = rng.integers(60, 80), rng.integers(10, 16)
    x0, y = rng.integers(4, size - length - 4), rng.integers(30, size - 30)
    head = length // 2
    shape = [
        (x0, y - width // 2),
        (x0 + length - head, y - width // 2),
        (x0 + length - head, y - width),
        (x0 + length, y),
        (x0 + length - head, y + width),
        (x0 + length - head, y + width // 2),
        (x0, y + width // 2),
    ]
    ImageDraw.Draw(image).polygon(shape, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
    return image if pointing_right else image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


@pytest.mark.slow
def test_auto_rejects_flips_where_a_flip_changes_the_label(tmp_path):
    """Left and right arrows as two classes, on the real offline weights: the flipped view of
    a left arrow is a right arrow labelled left, so the choice must not keep a flip policy."""
    rng = np.random.default_rng(3)
    for name in ("left", "right"):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for n in range(50):
            arrow(name == "right", rng).save(folder / f"{n}.png")
    params = small_params(
        base={"image_size": 96, "backbone": "efficientnet_lite0"},
        prepare={"val_fraction": 0.15, "test_fraction": 0.15},
        head={"augment": "auto", "views": 2, "epochs": 30, "patience": 5, "batch_size": 32},
    )
    tasks.get("prepare").run(params, tmp_path)
    fetch_weights(params.path("weights", tmp_path), params)
    tasks.get("freeze").run(params, tmp_path)
    tasks.get("head").run(params, tmp_path)
    selection = json.loads((tmp_path / "artifacts/transfer/head_selection.json").read_text())
    scores = {p["policy"]: p["cv_accuracy"] for p in selection["augment"]["policies"]}
    assert set(scores) == set(augment.POLICIES)
    chosen = selection["augment"]["chosen"]
    assert chosen in ("none", "shift")
    assert max(scores["flip"], scores["flip_shift"]) < scores[chosen]
    record = json.loads((tmp_path / "artifacts/transfer/transfer.json").read_text())
    assert record["augment"] == selection["augment"]["chosen"]
