"""The data doctor on corrupted data: flipped labels found (against cleanlab on the same
probabilities), accuracy after accepting its suggestions, and near-duplicates kept in one split.

Fashion-MNIST TRAIN images outside the demo (never the official test split), as
bench/heldout.py draws them (100 per class in the training split, --heldout others held out,
the same for every project and seed, so differences are paired). Three
projects (clones of this repository's committed state), each run with `headstart run -S
base.seed=SEED -S export.formats=[]` for every seed:
- clean: the images as they are;
- noisy: `--noise` of the labels flipped uniformly to another class (the files written into
  the wrong class folder). The doctor's flagged train/val images are scored against the flips
  it could see (those prepare put in train or val), and so are cleanlab's
  `find_label_issues` on the same out-of-sample probabilities; then, for each of --policies
  (POLICIES: which suggestions a person accepts, and whether as `relabel` or `exclude`), the
  decisions are written into data-review.yaml and the run repeated: the release's held-out
  accuracy clean / noisy / after each review, and per seed the share of the drop won back;
- copies: 150 images re-encoded as JPEG q70-95, resized by up to ±10 %, cropped by up to 5 %,
  brightened by up to ±10 % (seeded), added beside their originals: how many pairs share a
  split, and the held-out accuracy against the clean run's; then --leak-rounds times
  `headstart review --group-leaks` (the feature check's pairs into data-review.yaml as
  `together`) and the run again: how many pairs straddle two splits after it.

    pip install -e ".[bench]"        # cleanlab (AGPL-3.0) for the comparison only
    python bench/doctor.py           # 3 seeds, about 40 minutes here
    python bench/doctor.py --only clean noisy --policies exclude-strong  # the review loop
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BIN, ROOT, clone_with_data, headstart_run, run_child, table
from heldout import CLASSES, SOURCE, fashion_images, probabilities, write_pngs
from PIL import Image, ImageEnhance

OVERRIDES = ["export.formats=[]"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--heldout", type=int, default=5000, help="held-out images in total")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of labels flipped")
    parser.add_argument("--copies", type=int, default=150, help="near-duplicates injected")
    parser.add_argument(
        "--leak-rounds", type=int, default=1, help="copies: review --group-leaks, rerun (times)"
    )
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("clean", "noisy", "copies"),
        default=["clean", "noisy", "copies"],
        help="projects to run",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=sorted(POLICIES),
        default=["relabel-strong", "exclude-strong"],
        help="review decisions tried on the noisy project, each followed by a rerun",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="review-and-rerun rounds per policy (a user's loop)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the projects (path printed)")
    return parser.parse_args(argv)


def flip_labels(data: Path, fraction: float, seed: int) -> set[str]:
    """Move `fraction` of the images to another class's folder: the files flipped."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in data.rglob("*.png"))
    flipped = set()
    for index in rng.choice(len(files), int(round(fraction * len(files))), replace=False):
        path = files[index]
        others = [c for c in CLASSES if c != path.parent.name]
        target = data / others[rng.integers(len(others))] / path.name
        path.rename(target)
        flipped.add(target.relative_to(data).as_posix())
    return flipped


def add_copies(data: Path, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` lightly changed copies beside their originals: (original, copy) pairs."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in data.rglob("*.png"))
    pairs = []
    for index in rng.choice(len(files), count, replace=False):
        path = files[index]
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = 1 + rng.uniform(-0.1, 0.1)
        image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))))
        crop = rng.uniform(0, 0.05)
        w, h = image.size
        dx, dy = round(w * crop * rng.uniform()), round(h * crop * rng.uniform())
        image = image.crop((dx, dy, w - round(w * crop) + dx, h - round(h * crop) + dy))
        image = ImageEnhance.Brightness(image).enhance(1 + rng.uniform(-0.1, 0.1))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
        copy = path.with_name(f"copy-{path.stem}.jpg")
        copy.write_bytes(buffer.getvalue())
        pairs.append((path.relative_to(data).as_posix(), copy.relative_to(data).as_posix()))
    return pairs


def manifest(project: Path) -> dict[str, str]:
    import csv

    with open(project / "artifacts/prepared/manifest.csv", newline="") as handle:
        return {row["file"]: row["split"] for row in csv.DictReader(handle)}


def precision_recall(flagged: set[str], truth: set[str]) -> tuple[float, float]:
    hits = len(flagged & truth)
    return (hits / len(flagged) if flagged else 0.0), (hits / len(truth) if truth else 0.0)


def cleanlab_flags(project: Path) -> tuple[set[str], set[str]]:
    """cleanlab's find_label_issues on the probabilities the doctor read (doctor.doubts), split
    by split: as it is, and only where the doctor sees strong evidence (doctor.strong_evidence)."""
    import csv

    from cleanlab.filter import find_label_issues

    from headstart.doctor import doubts, first_views, strong_evidence

    artifacts = project / "artifacts"
    with open(artifacts / "prepared/manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    flagged, cut = set(), set()
    prepared = artifacts / "prepared"
    views = first_views(prepared, artifacts / "features")
    found = doubts(prepared, artifacts / "transfer", views)
    for split, (probs, labels) in found.items():
        files = [r["file"] for r in rows if r["split"] == split]
        issues = find_label_issues(labels, probs)
        flagged |= {files[i] for i in np.flatnonzero(issues)}
        strong = strong_evidence(probs, labels)
        cut |= {files[i] for i in np.flatnonzero(issues & strong)}
    return flagged, cut


def release_accuracy(project: Path, heldout: Path) -> float:
    """The released model's accuracy on the held-out images (the other models are not scored)."""
    probs, truth = probabilities(project / "artifacts/release/model.keras", heldout)
    y = np.array([CLASSES.index(label) for label in truth])
    return round(float(np.mean(probs.argmax(axis=1) == y)), 4)


def _relabel_strong(issues: list[dict]) -> dict:
    return {"relabel": {s["file"]: s["suggested"] for s in issues if s["strong"]}}


def _exclude_strong(issues: list[dict]) -> dict:
    return {"exclude": [s["file"] for s in issues if s["strong"]]}


def _relabel_strong_exclude_rest(issues: list[dict]) -> dict:
    return {**_relabel_strong(issues), "exclude": [s["file"] for s in issues if not s["strong"]]}


def _exclude_all(issues: list[dict]) -> dict:
    return {"exclude": [s["file"] for s in issues]}


# what a person could accept from the doctor's list: the review file's sections per policy
POLICIES = {
    "relabel-strong": _relabel_strong,
    "exclude-strong": _exclude_strong,
    "relabel-strong-exclude-rest": _relabel_strong_exclude_rest,
    "exclude-all": _exclude_all,
}


def write_review(project: Path, policy: str, issues: list[dict]) -> dict[str, int]:
    """The policy's decisions on the suspects not decided yet, added to the clone's
    data-review.yaml (as `headstart review` does): counts per section, in all."""
    from headstart import review

    decided = review.load(project / review.REVIEW_FILE)
    new = POLICIES[policy]([s for s in issues if s["file"] not in decided.named()])
    decided.relabel.update(new.get("relabel", {}))
    decided.exclude += new.get("exclude", [])
    review.save(decided, project / review.REVIEW_FILE)
    return {"relabel": len(decided.relabel), "exclude": len(decided.exclude)}


def review_of(project: Path):
    from headstart import review

    return review.load(project / review.REVIEW_FILE)


def copies_found(project: Path, pairs: list[tuple[str, str]]) -> dict:
    """How many injected pairs prepare grouped, how many straddle two splits, groups in all."""
    split_of = manifest(project)
    report = json.loads((project / "artifacts/data-report/report.json").read_text())
    grouped = {f for g in report["near_duplicates"]["groups"] for f in g["files"]}
    return {
        "pairs": len(pairs),
        "found": sum(a in grouped and b in grouped for a, b in pairs),
        "straddling": sum(
            split_of.get(a) != split_of.get(b) for a, b in pairs if a in split_of and b in split_of
        ),
        "groups": report["near_duplicates"]["count"],
    }


def doctor_findings(project: Path) -> dict:
    return json.loads((project / "artifacts/plots/doctor.json").read_text())


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(tempfile.mkdtemp(prefix="doctor-"))
    pixels, train, heldout = fashion_images(args.source, args.per_class, args.heldout)
    write_pngs(pixels, heldout, work / "heldout")
    flipped: set[str] = set()
    pairs: list[tuple[str, str]] = []

    def noisy(folder: Path) -> None:
        write_pngs(pixels, train, folder)
        flipped.update(flip_labels(folder, args.noise, seed=0))

    def copied(folder: Path) -> None:
        write_pngs(pixels, train, folder)
        pairs.extend(add_copies(folder, args.copies, seed=0))

    makers = {"clean": lambda f: write_pngs(pixels, train, f), "noisy": noisy, "copies": copied}
    projects = {name: clone_with_data(work / name, makers[name]) for name in args.only}
    sys.path.insert(0, str(ROOT))
    runs: dict[str, dict] = {name: {} for name in projects}
    for seed in args.seeds:
        for name, project in projects.items():
            child = headstart_run(project, seed, OVERRIDES)
            result = {
                "seconds": child["seconds"],
                "heldout": release_accuracy(project, work / "heldout"),
            }
            if name == "noisy":
                split_of = manifest(project)
                seen = {f for f in flipped if split_of.get(f) in ("train", "val")}
                found = doctor_findings(project)
                every = {s["file"] for s in found["label_issues"]}
                ours = {s["file"] for s in found["label_issues"] if s["strong"]}
                theirs, theirs_cut = cleanlab_flags(project)
                result.update(
                    flipped_seen=len(seen),
                    flagged=len(ours),
                    cleanlab_flagged=len(theirs),
                    doctor=precision_recall(ours, seen),
                    doctor_all=precision_recall(every, seen),
                    cleanlab=precision_recall(theirs, seen),
                    cleanlab_cut=precision_recall(theirs_cut, seen),
                    off_topic=len(found["off_topic"]),
                )
                for policy in args.policies:
                    issues = found["label_issues"]
                    for round_ in range(1, args.rounds + 1):  # review, rerun, review again
                        decided = write_review(project, policy, issues)
                        reviewed = headstart_run(project, seed, OVERRIDES)
                        key = policy if round_ == 1 else f"{policy} x{round_}"
                        runs.setdefault(key, {})[seed] = {
                            "seconds": reviewed["seconds"],
                            "heldout": release_accuracy(project, work / "heldout"),
                            **decided,
                        }
                        print(
                            f"[seed {seed}] {key}: {runs[key][seed]}", file=sys.stderr, flush=True
                        )
                        issues = doctor_findings(project)["label_issues"]
                    subprocess.run(
                        ["git", "checkout", "-q", "data-review.yaml"], cwd=project, check=True
                    )
            if name == "copies":
                result.update(copies_found(project, pairs))
                for round_ in range(1, args.leak_rounds + 1):
                    env = {"PYTHONPATH": str(project)}
                    run_child([str(BIN / "headstart"), "review", "--group-leaks"], project, env)
                    child = headstart_run(project, seed, OVERRIDES)
                    result[f"group-leaks x{round_}"] = {
                        "seconds": child["seconds"],
                        "heldout": release_accuracy(project, work / "heldout"),
                        "together": len(review_of(project).together),
                        **copies_found(project, pairs),
                    }
                subprocess.run(
                    ["git", "checkout", "-q", "data-review.yaml"], cwd=project, check=True
                )
            runs[name][seed] = result
            print(f"[seed {seed}] {name}: {result}", file=sys.stderr, flush=True)
    print(report_text(runs))
    from headstart.files import write_json

    out = write_json(ROOT / "bench" / "out" / "doctor.json", {"argv": sys.argv[1:], "runs": runs})
    print(f"wrote {out}", file=sys.stderr)
    if args.keep:
        print(f"kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def reviewed_names(runs: dict) -> list[str]:
    return [name for name in runs if name.split(" ")[0] in POLICIES]


def report_text(runs: dict) -> str:
    rows = [
        (name, _mean_sd([r["heldout"] for r in runs[name].values()]))
        for name in ("clean", "noisy", *reviewed_names(runs), "copies")
        if runs.get(name)
    ]
    lines = [table(rows, ("project", "release held-out accuracy")), ""]
    clean, noisy = runs.get("clean", {}), runs.get("noisy", {})
    paired = [s for s in noisy if s in clean]
    if paired:  # per seed: the drop the noise caused and the part of it each review won back
        drop = [clean[s]["heldout"] - noisy[s]["heldout"] for s in paired]
        rows = [("noise: clean - noisy", _mean_sd(drop), "")]
        for policy in reviewed_names(runs):
            if all(s in runs.get(policy, {}) for s in paired):
                gain = [runs[policy][s]["heldout"] - noisy[s]["heldout"] for s in paired]
                share = statistics.mean(gain) / statistics.mean(drop) if any(drop) else 0.0
                rows.append((f"{policy} - noisy", _mean_sd(gain), f"{share:.2f}"))
        lines += [table(rows, ("paired per seed", "points", "share of the drop won back")), ""]
    noisy = list(runs.get("noisy", {}).values())
    if noisy:
        rows = [
            (who, _mean_sd([r[who][0] for r in noisy]), _mean_sd([r[who][1] for r in noisy]))
            for who in ("doctor", "cleanlab_cut", "doctor_all", "cleanlab")
        ]
        lines += [table(rows, ("flagged by", "precision", "recall")), ""]
    for seed, run in runs.get("copies", {}).items():
        lines.append(
            f"seed {seed} near-duplicates: {run['found']} of {run['pairs']} injected pairs "
            f"grouped, {run['straddling']} straddle two splits, {run['groups']} groups; "
            + "; ".join(
                f"after {key}: {after['straddling']} straddle ({after['together']} together "
                f"pairs), held-out {after['heldout']:.3f}"
                for key, after in run.items()
                if key.startswith("group-leaks")
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
