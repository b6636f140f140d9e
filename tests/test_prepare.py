"""prepare: every file accounted for, bad files quarantined with a reason, a seeded stable split."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, class_pattern, git_clone, run_cli, small_params, write_good_images

from headstart import images
from headstart.artifacts import load_split
from headstart.params import write_overrides
from tasks.prepare import PrepareError, prepare


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv") as handle:
        return list(csv.DictReader(handle))


def all_files(data: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(data))


def test_messy_folder_prepares_and_report_accounts_for_every_file(messy_data, tmp_path):
    data, expected = messy_data
    out = prepare(data, tmp_path / "prepared", small_params())
    report = __import__("json").loads((tmp_path / "data-report" / "report.json").read_text())

    assert report["reconciles"] is True
    assert report["totals"]["seen"] == all_files(data)
    for name, counts in report["per_class"].items():
        assert counts["seen"] == counts["used"] + counts["quarantined"] + counts["ignored"], name
        assert counts["used"] == counts["train"] + counts["val"] + counts["test"], name
    status = {item["file"]: "quarantined" for item in report["quarantined"]}
    status.update({item["file"]: "ignored" for item in report["ignored"]})
    used = {row["file"] for row in manifest(out)}
    status.update(dict.fromkeys(used, "used"))
    for name, want in expected.items():
        assert status.get(name) == want, name
    assert report["empty_class_folders"] == ["empty_class"]
    assert report["classes"] == ["class_0", "class_1"]
    assert [c["labels"] for c in report["label_conflicts"]] == [["class_0", "class_1"]]
    reasons = {item["file"]: item["reason"] for item in report["quarantined"]}
    assert "0 bytes" in reasons["class_0/zero_bytes.jpg"]
    assert "too large" in reasons["class_0/huge.png"]
    assert reasons["class_1/b_copy.png"] == "duplicate of class_1/a_first.png"


def test_prepared_arrays_match_manifest_and_labels(messy_data, tmp_path):
    data, _ = messy_data
    out = prepare(data, tmp_path / "prepared", small_params())
    rows = manifest(out)
    classes = __import__("json").loads((out / "labels.json").read_text())["classes"]
    for split in ("train", "val", "test"):
        x, y = load_split(out, split)
        split_rows = [r for r in rows if r["split"] == split]
        assert x.shape == (len(split_rows), 32, 32, 3) and x.dtype == np.uint8
        assert [classes[i] for i in y] == [r["label"] for r in split_rows]
    shas = Counter(r["sha256"] for r in rows)
    assert max(shas.values()) == 1  # duplicates are used once, so never in two splits


def test_decode_normalises_odd_images():
    from helpers import exif_rotated_jpeg

    portrait = images.decode(exif_rotated_jpeg(), 40, "stretch")
    top, bottom = portrait[5, 20], portrait[35, 20]
    assert top[0] > 200 and top[2] < 60  # red on top once orientation 6 is applied
    assert bottom[2] > 200 and bottom[0] < 60
    transparent = __import__("PIL.Image", fromlist=["Image"]).new("RGBA", (8, 8), (0, 0, 0, 0))
    buffer = __import__("io").BytesIO()
    transparent.save(buffer, format="PNG")
    assert images.decode(buffer.getvalue(), 32).min() == 255  # alpha flattened onto white


def splits_of(out: Path) -> dict[str, str]:
    return {r["file"]: r["split"] for r in manifest(out)}


def test_split_is_seeded_and_stable_when_images_are_added(good_data, tmp_path):
    params, record = small_params(), tmp_path / "splits.csv"
    first = splits_of(prepare(good_data, tmp_path / "a", params, record=record))
    assert splits_of(prepare(good_data, tmp_path / "b", params)) == first  # no record: same draw
    write_good_images(good_data, per_class=20, start=500)
    grown = splits_of(prepare(good_data, tmp_path / "c", params, record=record))
    assert len(grown) == len(first) + 40
    assert {f: grown[f] for f in first} == first  # no image moved
    reseeded = small_params(base={"seed": 8, "image_size": 32})
    assert splits_of(prepare(good_data, tmp_path / "d", reseeded, record=record)) != grown


def class_sizes(data: Path, sizes: dict[str, int], start: int = 0) -> None:
    for label, (name, count) in enumerate(sizes.items()):
        folder = data / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(start, start + count):
            class_pattern(label, seed=1000 * label + n).save(folder / f"img_{n:03d}.png")


def test_every_class_gets_its_share_within_one_image(tmp_path):
    """A class of 55 and one of 12 at 15 % / 15 %: each split within one image of its target,
    also after 20 images are added (which move no earlier image)."""
    params = small_params(prepare={"val_fraction": 0.15, "test_fraction": 0.15})
    data, record = tmp_path / "data", tmp_path / "splits.csv"
    class_sizes(data, {"big": 55, "small": 12})
    before = splits_of(prepare(data, tmp_path / "a", params, record=record))
    class_sizes(data, {"big": 14, "small": 6}, start=100)
    rows = manifest(prepare(data, tmp_path / "b", params, record=record))
    assert {r["file"]: r["split"] for r in rows if r["file"] in before} == before
    for name, total in {"big": 69, "small": 18}.items():
        counts = Counter(r["split"] for r in rows if r["label"] == name)
        assert sum(counts.values()) == total
        for split in ("val", "test"):
            assert abs(counts[split] - 0.15 * total) <= 1, (name, split, counts)


def test_a_copy_with_the_split_record_reproduces_the_split(tmp_path):
    """What a fresh clone has: the same data and the git-tracked split record (whose history
    of additions a fresh draw could not reproduce)."""
    params = small_params(prepare={"val_fraction": 0.15, "test_fraction": 0.15})
    data, record = tmp_path / "data", tmp_path / "splits.csv"
    class_sizes(data, {"big": 30, "small": 12})
    prepare(data, tmp_path / "a", params, record=record)
    class_sizes(data, {"big": 9, "small": 5}, start=100)
    grown = splits_of(prepare(data, tmp_path / "b", params, record=record))
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(data, clone / "data")
    shutil.copy(record, clone / "splits.csv")
    again = splits_of(
        prepare(clone / "data", clone / "prepared", params, record=clone / "splits.csv")
    )
    assert again == grown
    assert (clone / "splits.csv").read_bytes() == record.read_bytes()


def test_a_damaged_split_record_is_one_clear_error(good_data, tmp_path):
    record = tmp_path / "splits.csv"
    prepare(good_data, tmp_path / "a", small_params(), record=record)
    record.write_text(record.read_text().replace(",train,", ",nowhere,", 1))
    with pytest.raises(PrepareError, match="splits.csv: not a split record .* delete it"):
        prepare(good_data, tmp_path / "b", small_params(), record=record)


def test_one_class_is_a_clear_error(tmp_path):
    write_good_images(tmp_path / "data", classes=1)
    with pytest.raises(PrepareError, match="need at least 2"):
        prepare(tmp_path / "data", tmp_path / "out", small_params())
    assert not (tmp_path / "out").exists()


def test_small_class_is_a_clear_error_and_keeps_earlier_output(good_data, tmp_path):
    out = prepare(good_data, tmp_path / "out", small_params())
    before = (out / "manifest.csv").read_text()
    with pytest.raises(PrepareError, match=r"class_0: 12 usable image\(s\).*min_per_class=20"):
        prepare(good_data, out, small_params(prepare={"min_per_class": 20}))
    assert (out / "manifest.csv").read_text() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_missing_data_folder_via_cli_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_overrides(tmp_path / "params.yaml", ["paths.data=nowhere"])
    result = run_cli("step", "prepare", "--project", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/nowhere: data folder not found; put images in "
        f"{tmp_path}/nowhere/<class>/ (for the demo data: dvc pull data.dvc)"
    ]


def test_demo_data_pulls_from_the_in_repo_remote_and_prepares(tmp_path):
    clone = git_clone(tmp_path / "clone")
    dvc = Path(sys.executable).with_name("dvc")
    subprocess.run([str(dvc), "pull", "-q", "data.dvc"], cwd=clone, check=True)
    classes = sorted(p.name for p in (clone / "data").iterdir())
    assert len(classes) == 10
    assert all(len(list((clone / "data" / c).iterdir())) >= 100 for c in classes)
    prepare(clone / "data", tmp_path / "prepared", small_params())
    report = __import__("json").loads((tmp_path / "data-report" / "report.json").read_text())
    assert report["totals"]["used"] == all_files(clone / "data")
    assert report["totals"]["quarantined"] == 0
