"""Near-duplicates: lightly changed copies hash close and distinct images far; prepare keeps a
group of near-duplicates in one split, places a late copy with its original, moves a group
split by an older record to its earliest-recorded member and reports every group."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import small_params
from PIL import Image, ImageEnhance

from headstart import images, neardup
from tasks.prepare import prepare


def photo(seed: int, size: int = 32, on_black: bool = False) -> Image.Image:
    """A photo-like image: colour noise with natural images' 1/f amplitude spectrum (broad
    shapes, finer detail); `on_black`: inside an ellipse on black, like the demo's garments."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / size)
    channels = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random(amplitude.shape))
        spectrum = amplitude * phase * rng.standard_normal(amplitude.shape)
        channels.append(np.fft.irfft2(spectrum, s=(size, size)))
    field = np.stack(channels, axis=-1)
    pixels = 128 + 45 * (field - field.mean()) / field.std()
    if on_black:
        y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
        pixels *= ((((y - 0.5) / 0.4) ** 2 + ((x - 0.5) / 0.3) ** 2) <= 1)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def light_copies(image: Image.Image) -> dict[str, bytes]:
    """The changes a copy picks up on its way round: re-saved as JPEG, resized by 10 %,
    brightened or darkened by 10 %."""
    width, height = image.size
    return {
        "jpeg q75": encoded(image, "JPEG", quality=75),
        "jpeg q95": encoded(image, "JPEG", quality=95),
        "resized -10%": encoded(image.resize((round(width * 0.9), round(height * 0.9)))),
        "resized +10%": encoded(image.resize((round(width * 1.1), round(height * 1.1)))),
        "darker 10%": encoded(ImageEnhance.Brightness(image).enhance(0.9)),
        "brighter 10%": encoded(ImageEnhance.Brightness(image).enhance(1.1)),
    }


def hash_of(data: bytes, size: int = 96) -> np.ndarray:
    """The hash of an image file as prepare sees it (decoded at `size`, the default 96 px)."""
    return neardup.phash(images.decode(data, size, "pad"))


def test_light_changes_stay_within_the_threshold_and_distinct_images_do_not():
    originals = [photo(seed) for seed in range(8)]
    hashes = [hash_of(encoded(image)) for image in originals]
    for seed, image in enumerate(originals):
        for change, data in light_copies(image).items():
            assert neardup.distance(hashes[seed], hash_of(data)) <= neardup.MAX_DISTANCE, change
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            assert neardup.distance(hashes[i], hashes[j]) > 2 * neardup.MAX_DISTANCE, (i, j)


def test_a_crop_of_a_few_percent_stays_within_the_threshold():
    """An object on a plain background, cropped by one pixel in 32 (3 %) on one or two sides:
    the hash's window follows the content, so the object does not move in it."""
    for seed in range(6):
        image = photo(seed, on_black=True)
        original = hash_of(encoded(image))
        for box in ((1, 0, 32, 32), (0, 0, 31, 32), (1, 1, 32, 32), (1, 0, 32, 31)):
            cropped = hash_of(encoded(image.crop(box)))
            assert neardup.distance(original, cropped) <= neardup.MAX_DISTANCE, (seed, box)


def test_popcount_counts_bits_with_and_without_numpys_instruction(monkeypatch):
    values = np.random.default_rng(0).integers(0, 2**63, size=(50, 4), dtype=np.uint64) * 3
    expected = [[bin(int(value)).count("1") for value in row] for row in values]
    assert neardup.popcount(values).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2: the lookup table
    assert neardup.popcount(values).tolist() == expected


def flipped(value: np.ndarray, bits: list[int]) -> np.ndarray:
    """`value` (a hash) with the given bit positions inverted."""
    out = value.copy()
    for bit in bits:
        out[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return out


def test_grouping_20000_hashes_finds_exactly_the_planted_pairs_and_chains():
    """Random hashes are ~128 bits apart, so only the planted ones are near; they straddle the
    blocks the comparison runs in. A chain joins images farther apart than the threshold."""
    rng = np.random.default_rng(26)
    hashes = rng.integers(0, 2**64, size=(20_000, neardup.HASH_WORDS), dtype=np.uint64)
    limit = neardup.MAX_DISTANCE
    hashes[19_999] = flipped(hashes[0], list(range(5)))
    hashes[7_000] = flipped(hashes[6_999], list(range(0, 2 * limit, 2)))  # exactly the limit
    hashes[12_000] = flipped(hashes[11_000], list(range(limit + 1)))  # one bit too far
    hashes[15_001] = flipped(hashes[15_000], list(range(20)))
    hashes[15_002] = flipped(hashes[15_001], list(range(100, 120)))  # 40 from 15,000
    found = neardup.group(hashes)
    assert found.groups == [[0, 19_999], [6_999, 7_000], [15_000, 15_001, 15_002]]
    assert sorted(found.pairs) == [
        (0, 19_999, 5),
        (6_999, 7_000, limit),
        (15_000, 15_001, 20),
        (15_001, 15_002, 20),
    ]


def write_photos(folder: Path, seeds: range) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (folder / f"photo_{seed:03d}.png").write_bytes(encoded(photo(seed)))
    return [f"{folder.name}/photo_{seed:03d}.png" for seed in seeds]


def manifest(out: Path) -> dict[str, str]:
    with open(out / "manifest.csv") as handle:
        return {row["file"]: row["split"] for row in csv.DictReader(handle)}


def near_report(tmp_path: Path, run: str) -> dict:
    report = json.loads((tmp_path / run / "report" / "report.json").read_text())
    return report["near_duplicates"]


def run_prepare(data: Path, tmp_path: Path, run: str, record: Path | None = None):
    """prepare at the default image size (96 px, where the threshold was measured): (file ->
    split, the report's near_duplicates section)."""
    params = small_params(base={"image_size": 96, "seed": 7})
    out = prepare(data, tmp_path / run / "prepared", params, tmp_path / run / "report", record)
    return manifest(out), near_report(tmp_path, run)


def test_a_group_of_near_identical_images_lands_in_one_split(tmp_path):
    """Seven versions of one photo among 18 images of a class (targets: 5 test, 5 val): spread
    one by one they would straddle splits; as a group they cannot fit test or val whole, so
    they all train, and the class's other images still fill test and val to their targets."""
    data = tmp_path / "data"
    write_photos(data / "a", range(1, 12))
    write_photos(data / "b", range(100, 118))
    (data / "a" / "photo_000.png").write_bytes(encoded(photo(0)))
    copies = []
    for n, (change, content) in enumerate(light_copies(photo(0)).items()):
        copies.append(f"a/copy_{n}.{'jpg' if change.startswith('jpeg') else 'png'}")
        (data / copies[-1]).write_bytes(content)
    splits, near = run_prepare(data, tmp_path, "run")
    group = sorted(["a/photo_000.png", *copies])
    assert [sorted(g["files"]) for g in near["groups"]] == [group]
    assert {splits[name] for name in group} == {"train"}
    assert near["count"] == 1 and near["images"] == 7 and near["label_conflicts"] == []
    counts = Counter(split for name, split in splits.items() if name.startswith("a/"))
    assert counts["test"] == 5 and counts["val"] == 5


def test_a_near_copy_of_a_test_image_added_later_goes_to_test_and_is_reported(tmp_path):
    data, record = tmp_path / "data", tmp_path / "splits.csv"
    write_photos(data / "a", range(12))
    write_photos(data / "b", range(100, 112))
    before, near = run_prepare(data, tmp_path, "first", record)
    assert near["count"] == 0
    in_test = sorted(name for name, split in before.items() if split == "test")
    original = in_test[0]
    copy = encoded(Image.open(data / original).convert("RGB"), "JPEG", quality=85)
    (data / original).with_name("copy.jpg").write_bytes(copy)
    copy_name = str(Path(original).with_name("copy.jpg"))
    after, near = run_prepare(data, tmp_path, "second", record)
    assert after[copy_name] == "test"
    assert {name: after[name] for name in before} == before  # nothing else moved
    assert near["joined"] == [{"file": copy_name, "label": original[0], "split": "test"}]
    assert near["moved"] == []
    assert [sorted(g["files"]) for g in near["groups"]] == [sorted([original, copy_name])]
    text = (tmp_path / "second" / "report" / "report.txt").read_text()
    assert "1 new image(s) joined their group's split" in text


def test_a_group_split_by_an_older_record_moves_to_its_earliest_recorded_member(tmp_path):
    """A split record written before near-duplicates were grouped may hold a photo and its copy
    in different splits: the copy, recorded later, moves to the photo's split, and the report
    names it. The record keeps the order images were first recorded in."""
    data, record = tmp_path / "data", tmp_path / "splits.csv"
    write_photos(data / "a", range(12))
    write_photos(data / "b", range(100, 112))
    before, _ = run_prepare(data, tmp_path, "first", record)
    original = "a/photo_005.png"
    copy = encoded(ImageEnhance.Brightness(photo(5)).enhance(1.1))
    (data / "a" / "brighter.png").write_bytes(copy)
    elsewhere = "val" if before[original] == "test" else "test"
    with open(record, "a") as handle:  # as an older prepare would have recorded it
        digest = hashlib.sha256(copy).hexdigest()
        handle.write(f"{digest},{elsewhere},a,a/brighter.png\n")
    after, near = run_prepare(data, tmp_path, "second", record)
    assert after["a/brighter.png"] == after[original] == before[original]
    assert near["moved"] == [
        {"file": "a/brighter.png", "label": "a", "from": elsewhere, "to": before[original]}
    ]
    assert near["joined"] == []
    rows = [row[3] for row in csv.reader(record.read_text().splitlines()[2:])]
    assert rows[-1] == "a/brighter.png" and rows[:-1] == sorted(rows[:-1])


def test_a_group_across_classes_is_kept_whole_and_reported_as_a_label_conflict(tmp_path):
    data = tmp_path / "data"
    write_photos(data / "a", range(12))
    write_photos(data / "b", range(100, 112))
    darker = ImageEnhance.Brightness(photo(3)).enhance(0.9)
    (data / "b" / "darker_copy.png").write_bytes(encoded(darker))
    splits, near = run_prepare(data, tmp_path, "run")
    pair = ["a/photo_003.png", "b/darker_copy.png"]
    assert near["label_conflicts"] == [{"files": pair, "classes": ["a", "b"]}]
    assert splits[pair[0]] == splits[pair[1]]  # both used, in one split
    group = near["groups"][0]
    assert group["files"] == pair and 0 <= group["max_distance"] <= neardup.MAX_DISTANCE
    text = (tmp_path / "run" / "report" / "report.txt").read_text()
    assert "1 group(s) span classes" in text


def test_hashing_refuses_arrays_that_are_not_square_rgb_images():
    with pytest.raises(ValueError, match="N x S x S x 3"):
        neardup.phashes(np.zeros((2, 32, 30, 3), dtype=np.uint8))


def lfw_images() -> list[Image.Image]:
    """scikit-image's 200 grey 25 x 25 photos (100 faces, then 100 other): real, small and
    alike, like the demo's garments."""
    skimage_data = pytest.importorskip("skimage.data")
    return [
        Image.fromarray((face * 255).round().astype(np.uint8)) for face in skimage_data.lfw_subset()
    ]


def write_lfw_classes(data: Path) -> None:
    """The 200 LFW photos as two classes in `data`: face/lfw_000..099, other/lfw_100..199."""
    for index, image in enumerate(lfw_images()):
        folder = data / ("face" if index < 100 else "other")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"lfw_{index:03d}.png").write_bytes(encoded(image))


def crop_and_resize(image: Image.Image) -> bytes:
    """One pixel in 25 (4 %) cropped off the top and the left, scaled back up to 27 px."""
    return encoded(image.crop((1, 1, 25, 25)).resize((27, 27)))


def test_coefficient_ranks_correlate_as_pearson_on_the_ranks_says():
    rng = np.random.default_rng(3)
    arrays = rng.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    hashes, ranks = neardup.signatures(arrays)
    assert (hashes == neardup.phashes(arrays)).all()
    assert sorted(ranks[0].tolist()) == list(range(-127, 128))  # a permutation of the ranks
    expected = np.corrcoef(ranks[0].astype(float), ranks[1].astype(float))[0, 1]
    assert neardup.correlation(ranks[0], ranks[1]) == pytest.approx(expected)
    assert neardup.correlation(ranks[2], ranks[2]) == pytest.approx(1.0)


def planted_ranks(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.arange(neardup.RANK_LENGTH) - neardup.RANK_LENGTH // 2
    return np.stack([rng.permutation(base) for _ in range(count)]).astype(np.int8)


def shuffled(ranks: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """`ranks` with a share of its entries permuted among themselves: less correlated."""
    out = ranks.copy()
    moved = rng.choice(len(out), round(share * len(out)), replace=False)
    out[moved] = out[rng.permutation(moved)]
    return out


def test_correlated_pairs_finds_exactly_the_planted_pairs_across_blocks():
    """Random rank orders barely correlate; a copy with a few ranks swapped correlates
    almost 1 and is found wherever it lies; a reversed order is not near."""
    ranks = planted_ranks(3000, 26)
    ranks[2999] = ranks[0]
    ranks[2999, [0, 1]] = ranks[2999, [1, 0]]
    ranks[1500] = -ranks[1499]
    found = neardup.correlated_pairs(ranks)
    assert [(i, j) for i, j, _ in found] == [(0, 2999)]
    assert found[0][2] == pytest.approx(neardup.correlation(ranks[0], ranks[2999]), abs=1e-5)


def test_a_crop_and_resize_the_hash_misses_is_linked_by_its_coefficient_ranks():
    """A real photo cropped by 4 % and scaled up: its hash is over the threshold from the
    original's, the ranks of its coefficients still correlate; no two of the 200 distinct
    photos are linked either way."""
    photos = lfw_images()
    arrays = [images.decode(encoded(image), 96, "pad") for image in photos]
    arrays.append(images.decode(crop_and_resize(photos[74]), 96, "pad"))
    hashes, ranks = neardup.signatures(np.stack(arrays))
    assert neardup.distance(hashes[74], hashes[200]) > neardup.MAX_DISTANCE
    assert neardup.group(hashes).groups == []
    found = neardup.group(hashes, ranks=ranks)
    assert [74, 200] in found.groups
    assert list(found.correlated) == [(74, 200)]
    assert found.correlated[74, 200] >= neardup.MIN_CORRELATION
    # the distinct-nearest-neighbour test may link look-alikes, at most 1 % of the photos
    assert len({i for pair in found.nearest for i in pair}) <= 2


def test_rank_scan_keeps_each_images_two_nearest_across_blocks():
    ranks = planted_ranks(1200, 5)  # several blocks of rows
    rng = np.random.default_rng(6)
    ranks[1100] = shuffled(ranks[3], 0.2, rng)
    above, values, index = neardup.rank_scan(ranks, 0.5)
    scaled = ranks.astype(np.float64) / np.sqrt(neardup._RANK_NORM)
    every = scaled @ scaled.T
    np.fill_diagonal(every, -np.inf)
    expected = np.argsort(-every, axis=1, kind="stable")[:, :2]
    assert (index == expected).all()
    assert values == pytest.approx(np.take_along_axis(every, expected, axis=1), abs=1e-5)
    assert [(i, j) for i, j, _ in above] == [(3, 1100)]


def test_nearest_pairs_links_a_pair_that_stands_out_not_a_crowd_of_look_alikes():
    """Among random rank orders (they barely correlate): a pair at rho ~0.85 stands out and
    is linked; three images at ~0.85 to each other are each other's runner-ups, and a pair
    at ~0.65 is under the floor: neither is linked."""
    rng = np.random.default_rng(7)
    ranks = planted_ranks(600, 8)
    ranks[500] = shuffled(ranks[10], 0.12, rng)  # the pair
    ranks[501], ranks[502] = shuffled(ranks[20], 0.13, rng), shuffled(ranks[20], 0.13, rng)
    ranks[503] = shuffled(ranks[30], 0.4, rng)  # too far
    _, values, index = neardup.rank_scan(ranks, neardup.MIN_CORRELATION)
    rho = lambda i, j: neardup.correlation(ranks[i], ranks[j])  # noqa: E731
    assert neardup.NEAREST_MIN_CORRELATION <= rho(10, 500) < neardup.MIN_CORRELATION
    crowd = [rho(20, 501), rho(20, 502), rho(501, 502)]
    assert (
        min(crowd[:2]) >= neardup.NEAREST_MIN_CORRELATION and max(crowd) < neardup.MIN_CORRELATION
    )
    assert rho(30, 503) < neardup.NEAREST_MIN_CORRELATION
    found = neardup.nearest_pairs(values, index)
    assert [(i, j) for i, j, *_ in found] == [(10, 500)]
    (_, _, linked, runner_up) = found[0]
    assert linked == pytest.approx(rho(10, 500), abs=1e-5) and runner_up < 0.5


def test_a_crop_both_tests_miss_is_linked_as_a_distinct_nearest_neighbour():
    """A real photo cropped by 4 % and scaled up, whose hash and coefficient ranks are both
    past their thresholds from the original's: it is still its original's nearest neighbour
    by far among 200 photos, and group links the two."""
    photos = lfw_images()
    arrays = [images.decode(encoded(image), 96, "pad") for image in photos]
    arrays.append(images.decode(crop_and_resize(photos[9]), 96, "pad"))
    hashes, ranks = neardup.signatures(np.stack(arrays))
    assert neardup.distance(hashes[9], hashes[200]) > neardup.MAX_DISTANCE
    assert neardup.correlation(ranks[9], ranks[200]) < neardup.MIN_CORRELATION
    found = neardup.group(hashes, ranks=ranks)
    assert [9, 200] in found.groups and (9, 200) not in found.correlated
    rho, runner_up = found.nearest[9, 200]
    assert rho >= neardup.NEAREST_MIN_CORRELATION
    assert 1 - rho <= neardup.NEAREST_MAX_RATIO * (1 - runner_up)


def test_prepare_keeps_a_crop_and_resize_copy_with_its_original_and_reports_the_link(tmp_path):
    data = tmp_path / "data"
    write_lfw_classes(data)
    (data / "face" / "copy.png").write_bytes(crop_and_resize(lfw_images()[74]))
    (data / "face" / "copy9.png").write_bytes(crop_and_resize(lfw_images()[9]))
    splits, near = run_prepare(data, tmp_path, "run")
    pair = ["face/copy.png", "face/lfw_074.png"]
    (group,) = [g for g in near["groups"] if "face/copy.png" in g["files"]]
    assert group["files"] == pair
    assert splits[pair[0]] == splits[pair[1]]
    (correlated,) = group["correlated_pairs"]
    assert sorted(correlated[:2]) == pair and correlated[2] >= near["min_correlation"]
    nearer = ["face/copy9.png", "face/lfw_009.png"]
    (group,) = [g for g in near["groups"] if "face/copy9.png" in g["files"]]
    assert group["files"] == nearer and splits[nearer[0]] == splits[nearer[1]]
    ((*files, rho, runner_up),) = group["nearest_pairs"]
    assert sorted(files) == nearer and rho >= near["nearest_min_correlation"] > runner_up


def test_a_look_alike_pair_is_kept_in_one_split_but_not_reported_as_near_duplicates():
    """Among random rank orders: a mutual nearest pair at rho ~0.65 passes Lowe's own cut but
    not the near-duplicate tests (a look-alike); one at ~0.9 is a near-duplicate; three at
    ~0.65 to each other are each other's runner-ups: nothing. Look-alikes join the units that
    go to one split whole, never the reported groups."""
    rng = np.random.default_rng(11)
    ranks = planted_ranks(600, 12)
    ranks[500] = shuffled(ranks[10], 0.3, rng)  # the look-alike pair
    ranks[501] = shuffled(ranks[40], 0.1, rng)  # a near-duplicate
    common = planted_ranks(1, 13)[0]  # three shuffles of one order: a crowd
    ranks[20], ranks[502], ranks[503] = (shuffled(common, 0.2, rng) for _ in range(3))
    hashes = rng.integers(0, 2**63, size=(600, neardup.HASH_WORDS), dtype=np.uint64)
    rho = lambda i, j: neardup.correlation(ranks[i], ranks[j])  # noqa: E731
    assert neardup.LOOK_ALIKE_MIN_CORRELATION <= rho(10, 500) < neardup.NEAREST_MIN_CORRELATION
    crowd = [rho(20, 502), rho(20, 503), rho(502, 503)]
    assert neardup.LOOK_ALIKE_MIN_CORRELATION <= min(crowd) <= max(crowd) < neardup.MIN_CORRELATION
    found = neardup.group(hashes, ranks=ranks)
    assert found.groups == [[40, 501]]
    assert list(found.look_alikes) == [(10, 500)]
    (look_rho, runner_up) = found.look_alikes[10, 500]
    assert 1 - look_rho <= neardup.LOOK_ALIKE_MAX_RATIO * (1 - runner_up)
    assert found.units == [[10, 500], [40, 501]]


def test_prepare_keeps_a_look_alike_crop_in_its_originals_split_and_lists_it_apart(tmp_path):
    """A real photo cropped by 4 % that no near-duplicate test links, but that is its
    original's distinct nearest neighbour under Lowe's cut: same split, listed under
    look_alikes, not as a group; the text report says so."""
    data = tmp_path / "data"
    write_lfw_classes(data)
    (data / "face" / "copy.png").write_bytes(crop_and_resize(lfw_images()[0]))
    splits, near = run_prepare(data, tmp_path, "run")
    pair = ["face/copy.png", "face/lfw_000.png"]
    assert not any("face/copy.png" in g["files"] for g in near["groups"])
    (look_alike,) = [p for p in near["look_alikes"] if "face/copy.png" in p["files"]]
    assert sorted(look_alike["files"]) == pair
    assert near["nearest_min_correlation"] > look_alike["rho"] > look_alike["runner_up"]
    assert splits[pair[0]] == splits[pair[1]]
    text = (tmp_path / "run" / "report" / "report.txt").read_text()
    assert f"{len(near['look_alikes'])} look-alike pair(s) kept together" in text
