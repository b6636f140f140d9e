"""The data review file: prepare applies a person's relabel / exclude / keep decisions, the
report reconciles, and a mistake in the file is one line naming the entry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_cli, small_params, write_good_images

from headstart import review
from tasks.prepare import prepare


def manifest(prepared) -> dict[str, tuple[str, str]]:
    with open(prepared / "manifest.csv") as handle:
        return {row["file"]: (row["label"], row["split"]) for row in csv.DictReader(handle)}


def test_prepare_relabels_and_excludes_as_the_review_says_and_the_report_reconciles(tmp_path):
    data = tmp_path / "data"
    write_good_images(data, classes=3, per_class=10)
    before = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file())
    review_file = tmp_path / review.REVIEW_FILE
    review.save(
        review.Review(
            relabel={"class_0/img_001.png": "class_2"},
            exclude=["class_1/img_002.png", "class_1/img_004.png"],
            keep=["class_2/img_005.png"],
        ),
        review_file,
    )
    out = prepare(
        data, tmp_path / "prepared", small_params(), tmp_path / "report", review_file=review_file
    )
    used = manifest(out)
    assert used["class_0/img_001.png"][0] == "class_2"  # the file stays in class_0/
    assert "class_1/img_002.png" not in used and "class_1/img_004.png" not in used
    assert used["class_2/img_005.png"][0] == "class_2"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["reconciles"] and report["totals"]["excluded"] == 2
    assert report["totals"]["used"] == 28 == report["totals"]["seen"] - 2
    assert (
        report["per_class"]["class_2"]["used"] == 11
        and report["per_class"]["class_1"]["excluded"] == 2
    )
    assert report["review"]["relabelled"] == [
        {"file": "class_0/img_001.png", "from": "class_0", "to": "class_2"}
    ]
    assert (
        "data-review.yaml: 2 excluded, 1 relabelled"
        in (tmp_path / "report" / "report.txt").read_text()
    )
    assert sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file()) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "exclude: [class_0/img_999.png]\n",
            "class_0/img_999.png: no such file under the data folder",
        ),
        ("relabel: {class_0/img_001.png: dgo}\n", "relabel to 'dgo', which is not a class"),
        ("exlude: [class_0/img_001.png]\n", "unknown section exlude"),
        ("exclude: [class_0/img_001.png\n", "not valid YAML"),
        ("exclude: [class_0/img_001.png]\nkeep: [class_0/img_001.png]\n", "named in two sections"),
        (
            "together: [[class_0/img_001.png, class_1/img_99.png]]\n",
            "class_1/img_99.png: no such file under the data folder",
        ),
        ("together: [class_0/img_001.png]\n", "together must be a list of lists of two or more"),
    ],
)
def test_a_mistake_in_the_review_file_is_one_line_naming_it(tmp_path, text, message):
    data = tmp_path / "data"
    write_good_images(data, classes=2, per_class=10)
    review_file = tmp_path / review.REVIEW_FILE
    review_file.write_text(text)
    with pytest.raises(review.ReviewError) as caught:
        prepare(
            data,
            tmp_path / "prepared",
            small_params(),
            tmp_path / "report",
            review_file=review_file,
        )
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(review_file))
    assert not (tmp_path / "prepared").exists()  # nothing half-written


def test_files_the_review_file_lists_together_go_to_one_split_and_the_report_names_them(
    tmp_path,
):
    data = tmp_path / "data"
    write_good_images(data, classes=3, per_class=12)
    plain = manifest(prepare(data, tmp_path / "plain", small_params(), tmp_path / "r0"))
    by_split = {}
    for name, (label, split) in sorted(plain.items()):
        by_split.setdefault((label, split), name)
    pair = [by_split["class_1", "train"], by_split["class_1", "test"]]  # apart without review
    review_file = tmp_path / review.REVIEW_FILE
    gone = [by_split["class_0", "train"], by_split["class_2", "train"]]  # one excluded: no link
    review.save(review.Review(exclude=gone[:1], together=[pair, gone]), review_file)
    out = prepare(
        data, tmp_path / "prepared", small_params(), tmp_path / "report", review_file=review_file
    )
    used = manifest(out)
    assert used[pair[0]][1] == used[pair[1]][1]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    listed = [g for g in report["near_duplicates"]["groups"] if set(pair) <= set(g["files"])]
    assert len(listed) == 1 and listed[0]["reviewed_pairs"] == [sorted(pair)]
    assert report["review"]["together"] == sorted([sorted(pair), sorted(gone)])


def test_review_group_leaks_writes_each_possible_leak_as_together_once(tmp_path):
    doctor_findings(tmp_path)
    found_file = tmp_path / "artifacts/plots/doctor.json"
    found = json.loads(found_file.read_text())
    found["possible_leaks"] = [
        {
            "file": "a/t1.png",
            "split": "test",
            "match": "a/x1.png",
            "match_split": "train",
            "similarity": 0.99,
        },
        {
            "file": "b/v2.png",
            "split": "test",
            "match": "b/x2.png",
            "match_split": "val",
            "similarity": 0.98,
        },
    ]
    found_file.write_text(json.dumps(found))
    result = run_cli("review", "--group-leaks", "--project", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "wrote 2 together pair(s)" in result.stdout
    written = yaml.safe_load((tmp_path / review.REVIEW_FILE).read_text())
    assert written == {"together": [["a/t1.png", "a/x1.png"], ["b/v2.png", "b/x2.png"]]}
    again = run_cli("review", "--group-leaks", "--project", str(tmp_path))
    assert "(features): 0" in again.stdout and "wrote" not in again.stdout
    assert yaml.safe_load((tmp_path / review.REVIEW_FILE).read_text()) == written


def test_the_review_file_round_trips_and_an_empty_one_changes_nothing(tmp_path):
    path = tmp_path / review.REVIEW_FILE
    decided = review.Review({"a/1.png": "b"}, ["a/2.png"], ["b/3.png"], [["a/4.png", "b/5.png"]])
    review.save(decided, path)
    assert review.load(path) == decided
    review.save(review.Review(), path)
    assert review.load(path) == review.Review() and path.read_text().startswith("# headstart")
    assert review.load(tmp_path / "absent.yaml") == review.Review()


def doctor_findings(project: Path) -> None:
    """A project folder with the findings of a plots step: two strong suspects, one weak."""
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    suspects = [
        ("a/one.png", "a", "b", True, 0.001),
        ("b/two.png", "b", "c", True, 0.002),
        ("c/three.png", "c", "a", False, 0.2),
    ]
    found = {
        "label_issues": [
            {
                "file": f,
                "split": "train",
                "given": g,
                "suggested": s,
                "strong": st,
                "self_confidence": p,
            }
            for f, g, s, st, p in suspects
        ],
        "off_topic": [],
        "label_conflicts": [],
        "possible_leaks": [],
    }
    (project / "artifacts/plots").mkdir(parents=True)
    (project / "artifacts/plots/doctor.json").write_text(json.dumps(found))


@pytest.mark.parametrize(
    ("option", "section", "decided"),
    [
        ("--accept-strong", "relabel", {"a/one.png": "b", "b/two.png": "c"}),
        ("--exclude-strong", "exclude", ["a/one.png", "b/two.png"]),
    ],
)
def test_review_writes_the_strong_suspects_as_relabel_or_exclude(
    tmp_path, option, section, decided
):
    doctor_findings(tmp_path)
    result = run_cli("review", option, "--project", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / review.REVIEW_FILE).read_text()) == {section: decided}
    assert f"wrote 2 {section} decision(s)" in result.stdout


def test_review_takes_one_way_of_accepting(tmp_path):
    doctor_findings(tmp_path)
    result = run_cli("review", "--accept-strong", "--exclude-strong", "--project", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: review: choose one of --accept N, --accept-strong, --exclude-strong"
    )
    assert not (tmp_path / review.REVIEW_FILE).exists()
