"""base.image_size auto: the size follows the images' own resolution, within the budget."""

from __future__ import annotations

import json

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
        for n in range(8):
            Image.new("RGB", (200, 150), (40 * n, 100, 0 if label == "a" else 255)).save(
                data / label / f"{n}.png"
            )
    params = small_params(base={"image_size": "auto"}, prepare={"min_per_class": 2})
    tasks.get("prepare").run(params, tmp_path)
    labels = json.loads((tmp_path / "artifacts/prepared/labels.json").read_text())
    report = json.loads((tmp_path / "artifacts/data-report/report.json").read_text())
    assert labels["image_size"] == 192  # the long side (pad) of 200 px, in steps of 32
    assert report["image_size"]["size"] == 192 and report["image_size"]["setting"] == "auto"
    assert "median side 200 px" in report["image_size"]["reason"]
    train = tmp_path / "artifacts/prepared/train_images.npy"
    assert __import__("numpy").load(train, mmap_mode="r").shape[1:] == (192, 192, 3)
