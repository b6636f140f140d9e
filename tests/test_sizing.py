"""base.image_size auto: the size follows the images' own resolution, within the budget;
finetune.enabled auto: fine-tuning runs when its estimated cost fits what is left of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import small_params
from PIL import Image

import tasks
from headstart import sizing


def sides(value: int, count: int = 50) -> list[int]:
    return [value] * count


def choose(found: list[int], budget: float = 30.0, native: int = 224) -> sizing.Choice:
    return sizing.choose(found, native, sizing.FLOOR, 1.0, budget)


def test_small_images_get_the_floor_and_are_not_upscaled_further():
    chosen = choose(sides(28))
    assert chosen.size == sizing.FLOOR == 96
    assert "no finer detail" in chosen.reason


def test_large_images_get_the_backbones_native_size():
    assert choose(sides(300)).size == 224
    assert choose(sides(300), native=260).size == 260
    assert choose(sides(250), native=260).size == 256  # steps of 32 below the native size


def test_medium_images_keep_their_own_size_in_steps_of_32():
    assert choose(sides(160)).size == 160
    assert choose(sides(170)).size == 160
    assert choose(sides(190)).size == 192


def test_a_small_budget_lowers_the_size_and_says_why():
    many = sides(300, 20_000)
    roomy, tight = choose(many, budget=600), choose(many, budget=4)
    assert roomy.size == 224
    assert sizing.FLOOR <= tight.size < 224
    assert "base.budget 4 min" in tight.reason
    assert tight.estimate_s <= 4 * 60 / 2 or tight.size == sizing.FLOOR


def test_sides_come_from_headers_the_resized_side_and_broken_files_are_left_out(tmp_path):
    Image.new("RGB", (200, 120)).save(tmp_path / "wide.png")
    Image.new("RGB", (90, 150)).save(tmp_path / "tall.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    files = sorted(tmp_path.iterdir())
    assert sorted(sizing.image_sides(files, "pad")) == [150, 200]
    assert sorted(sizing.image_sides(files, "stretch")) == [90, 120]


def test_prepare_with_auto_decodes_at_the_chosen_size_and_records_why(tmp_path):
    data = tmp_path / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for n in range(8):  # noise: no two alike (flat colours are near-duplicates of each other)
            pixels = np.random.default_rng([n, label == "a"]).integers(0, 256, (150, 200, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(data / label / f"{n}.png")
    params = small_params(base={"image_size": "auto"}, prepare={"min_per_class": 2})
    tasks.get("prepare").run(params, tmp_path)
    labels = json.loads((tmp_path / "artifacts/prepared/labels.json").read_text())
    report = json.loads((tmp_path / "artifacts/data-report/report.json").read_text())
    assert labels["image_size"] == 192  # the long side (pad) of 200 px, in steps of 32
    assert report["image_size"]["size"] == 192 and report["image_size"]["setting"] == "auto"
    assert "median side 200 px" in report["image_size"]["reason"]
    train = tmp_path / "artifacts/prepared/train_images.npy"
    assert __import__("numpy").load(train, mmap_mode="r").shape[1:] == (192, 192, 3)


def finetune_cost(size=96, train=1000, evaluated=0, relative=1.0, epochs=3, blocks=2) -> float:
    return sizing.finetune_seconds(size, train, evaluated, relative, epochs, blocks)


def test_finetuning_cost_grows_with_images_pixels_epochs_blocks_and_backbone():
    fixed = finetune_cost(train=0)
    variable = finetune_cost() - fixed
    assert finetune_cost(train=2000) - fixed == pytest.approx(2 * variable)
    assert finetune_cost(size=192) - fixed == pytest.approx(4 * variable)
    assert finetune_cost(epochs=6) - fixed == pytest.approx(2 * variable)
    assert finetune_cost(relative=2.2) - fixed == pytest.approx(2.2 * variable)
    assert finetune_cost(blocks=1) < finetune_cost() < finetune_cost(blocks=4)
    assert finetune_cost(evaluated=500) > finetune_cost()
    # bench/finetune.py on this machine: 3.6-4.8 ms per image and epoch at 96 px, 2 blocks
    assert 3 * 1000 * 0.0036 <= variable <= 3 * 1000 * 0.0048


def test_finetuning_auto_runs_only_when_its_estimate_fits_what_is_left_of_the_budget():
    fits = sizing.finetune_decision("auto", estimate_s=50, spent_s=60, budget_minutes=2)
    assert fits.run and fits.estimate_s == 50 and fits.budget_left_s == 60
    assert fits.reason == "estimated 50.0 s fits the 1.0 min left of base.budget 2 min"
    over = sizing.finetune_decision("auto", estimate_s=70, spent_s=60, budget_minutes=2)
    assert not over.run
    assert over.reason == "skipped: estimated 1.2 min > budget left 1.0 min (base.budget 2 min)"
    spent = sizing.finetune_decision("auto", estimate_s=10, spent_s=200, budget_minutes=2)
    assert not spent.run and spent.budget_left_s == -80
    assert "> budget left 0.0 s" in spent.reason


def test_finetuning_true_or_false_decides_whatever_the_budget():
    forced = sizing.finetune_decision(True, estimate_s=1e6, spent_s=0, budget_minutes=1)
    assert forced.run and forced.reason == "forced by finetune.enabled: true"
    off = sizing.finetune_decision(False, estimate_s=1, spent_s=0, budget_minutes=1000)
    assert not off.run and off.reason == "off (finetune.enabled: false)"
