"""prepare: data/<class>/... -> artifacts/prepared/ (validated, decoded once, seeded split)
and artifacts/data-report/ (every file seen: used, quarantined or ignored, and why).

The report is a folder of its own so that what the training steps read changes only when the
images they learn from do: a broken, duplicate or ignored file added to the data re-runs
prepare (and export, whose model card names the data), not every step after it.

Output format: one uint8 `.npy` array per split (N x S x S x 3) plus int32 labels. Reasons: the
images are decoded and resized exactly once here; `np.load(mmap_mode="r")` opens them instantly
with no decoding and no copy, slices of it feed Keras directly, memory stays flat for large sets,
and the format is plain numpy (no TFRecord/protobuf parsing, readable from any tool).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import math
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headstart import images, neardup, review, sizing
from headstart.artifacts import LABELS_FILE, MANIFEST_FILE, REPORT_FILE, SPLIT_RECORD, SPLITS
from headstart.errors import UserError
from headstart.files import atomic_dir, write_json, write_text
from headstart.params import Params, Paths
from headstart.progress import progress

log = logging.getLogger("headstart.prepare")


class PrepareError(UserError):
    """The data folder cannot make a usable data set; the message says why and what to do."""


@dataclass(slots=True)  # one per file: no per-instance dict
class _Seen:
    path: str  # relative to the data folder, POSIX style
    label: str
    status: str  # used | quarantined | ignored | excluded (by the review file)
    reason: str = ""
    sha256: str = ""
    row: int = -1  # row in the temporary decoded-image file
    split: str = ""


def _walk(data_dir: Path):
    """Yield (relative path, class name or None, hidden) for every entry under `data_dir` that
    is not a real folder: files, and links of any kind (a linked folder is one entry, never
    entered: see `_link_problem`). Sorted; symlinks are never followed while walking."""
    for root, dirs, files in os.walk(data_dir):
        rel_root = Path(root).relative_to(data_dir)
        hidden_dir = any(part.startswith(".") for part in rel_root.parts)
        label = rel_root.parts[0] if rel_root.parts else None
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        dirs[:] = sorted(d for d in dirs if d not in links)
        for name in sorted(files + links):
            rel = (rel_root / name).as_posix()
            entry_label = label if label is not None or name in files else None
            yield rel, entry_label, hidden_dir or name.startswith(".")


def count_entries(data_dir: Path) -> int:
    """Entries under `data_dir` that the report must account for (files and links), counted
    independently of `_walk`, so the report's reconciliation can catch a skipped entry."""
    total = 0
    pending = [data_dir]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                else:
                    total += 1
    return total


def _link_problem(path: Path, data_dir: Path) -> tuple[str, str] | None:
    """The symlink policy: a link that resolves to a file inside the data folder is read (once,
    under the link's name); anything else is reported, never silently skipped or followed.
    Returns (status, reason) for a link that is not read, None otherwise."""
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "quarantined", f"symlink loop ({target})"
        return "quarantined", f"dangling symlink (points to {target}, which does not exist)"
    resolved, root = Path(os.path.realpath(path)), Path(os.path.realpath(data_dir))
    inside = resolved == root or root in resolved.parents
    if not inside:
        return "quarantined", f"points outside data/: {resolved}"
    if resolved.is_dir():
        rel = resolved.relative_to(root).as_posix()
        return "ignored", f"symlinked folder; its files are read where it points ({rel})"
    return None


def split_key(sha256: str, seed: int) -> float:
    """A seeded pseudo-random number in [0, 1) from an image's content hash alone: the order in
    which new images of a class are dealt to the splits (identical content, identical key)."""
    key = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(key[:8], "big") / 2**64


def _target(images: int, fraction: float) -> int:
    return int(math.floor(images * fraction + 0.5))


@dataclass(slots=True)
class Placement:
    """What `assign_splits` did besides keeping remembered images where they were."""

    dealt: int = 0  # images new to the split record, dealt in `split_key` order
    joined: list[_Seen] = field(default_factory=list)  # new, placed with their near-duplicates
    moved: list[tuple[_Seen, str]] = field(default_factory=list)  # (image, remembered split)


def _units(items: list[_Seen], groups: Sequence[Sequence[int]]) -> list[list[_Seen]]:
    """The items as units that go to one split whole: each near-duplicate group (indices into
    `items`), members in sha256 order, and each other image alone."""
    grouped = {index for members in groups for index in members}
    units = [sorted((items[i] for i in members), key=_by_content) for members in groups]
    units += [[item] for index, item in enumerate(items) if index not in grouped]
    return units


def _by_content(item: _Seen) -> tuple[str, str]:
    return item.sha256, item.path


def _place_remembered(
    unit: list[_Seen], remembered: dict[str, str], order: dict[str, int], placement: Placement
) -> str:
    """Put a unit with a remembered member where its earliest-recorded member is (`order`: the
    record's row order): its other members join it (new ones) or move to it (remembered
    elsewhere), both noted in `placement`. Returns the split."""
    first = min((item for item in unit if item.sha256 in order), key=lambda i: order[i.sha256])
    split = remembered[first.sha256]
    for item in unit:
        before = remembered.get(item.sha256)
        if before is None:
            placement.joined.append(item)
        elif before != split:
            placement.moved.append((item, before))
        item.split = split
    return split


def _lacking(
    items: list[_Seen], placed: dict[str, Counter], val_fraction: float, test_fraction: float
) -> dict[str, dict[str, int]]:
    """Per class: how many images its test and validation splits lack of their targets
    (round(fraction x the class's images)), given the images `placed` there already."""
    fractions = {"test": test_fraction, "val": val_fraction}
    lacking = {}
    for label, size in Counter(item.label for item in items).items():
        lacking[label] = {
            split: max(0, _target(size, fraction) - placed[label][split])
            for split, fraction in fractions.items()
        }
    return lacking


def _deal(unit: list[_Seen], lacking: dict[str, dict[str, int]]) -> str:
    """The first of test and val that lacks room for the whole unit in every class it spans
    (taken from `lacking`), else train: a group never overfills a split to stay whole."""
    need = Counter(item.label for item in unit)
    for split in ("test", "val"):
        if all(lacking[label][split] >= n for label, n in need.items()):
            for label, n in need.items():
                lacking[label][split] -= n
            return split
    return "train"


def assign_splits(
    items: list[_Seen],
    remembered: dict[str, str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    groups: Sequence[Sequence[int]] = (),
) -> Placement:
    """Set `split` on every used item, a near-duplicate group (`groups`: indices into `items`)
    always in one split, so a lightly changed copy never sits on the other side of a split.

    An image the split record remembers (by content) stays where it was, and so does its group:
    a group goes where its earliest-recorded member is (new members join it, members recorded
    elsewhere move to it). The other images and groups, in `split_key` order of their first
    member by sha256, first fill what their class's test and then validation split lack (a
    group only where it fits whole), the rest go to training. So every class holds its share
    within one image (or one group), and adding images moves no other image, except into the
    split of a group it joins."""
    order = {digest: n for n, digest in enumerate(remembered)}
    placement = Placement()
    placed: dict[str, Counter] = defaultdict(Counter)
    fresh = []
    for unit in _units(items, groups):
        if any(item.sha256 in order for item in unit):
            split = _place_remembered(unit, remembered, order, placement)
            for item in unit:
                placed[item.label][split] += 1
        else:
            fresh.append(unit)
    lacking = _lacking(items, placed, val_fraction, test_fraction)
    fresh.sort(key=lambda unit: (split_key(unit[0].sha256, seed), unit[0].path))
    for unit in fresh:
        split = _deal(unit, lacking)
        for item in unit:
            item.split = split
        placement.dealt += len(unit)
    return placement


SPLIT_RECORD_COLUMNS = ["sha256", "split", "label", "file"]


def _record_header(seed: int, val_fraction: float, test_fraction: float) -> str:
    return (
        f"# headstart split record: seed={seed} val_fraction={val_fraction:g} "
        f"test_fraction={test_fraction:g} (written by prepare; commit it with data.dvc)"
    )


def read_split_record(
    path: Path | None, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, str]:
    """sha256 -> split from the split record at `path`; empty when there is none, or when it was
    drawn with another seed or other fractions (the split is then drawn afresh)."""
    if path is None or not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines or lines[0] != _record_header(seed, val_fraction, test_fraction):
        log.info(
            "prepare: %s was drawn with other split settings; drawing the split afresh", path.name
        )
        return {}
    rows = list(csv.reader(lines[1:]))
    if (
        not rows
        or rows[0] != SPLIT_RECORD_COLUMNS
        or any(len(row) != 4 or row[1] not in SPLITS for row in rows[1:])
    ):
        raise PrepareError(
            f"{path}: not a split record headstart can read; restore it "
            "(git checkout) or delete it to draw the split afresh"
        )
    return {row[0]: row[1] for row in rows[1:]}


def write_split_record(
    path: Path,
    items: list[_Seen],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    remembered: dict[str, str] | None = None,
) -> None:
    """Write the record: the images `remembered` (the record read before) keep their rows'
    order, new ones follow by file name, so the order of rows is the order images were first
    recorded in (`assign_splits` sends a near-duplicate group to its earliest-recorded member)."""
    order = {digest: n for n, digest in enumerate(remembered or {})}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPLIT_RECORD_COLUMNS)
    for item in sorted(items, key=lambda item: (order.get(item.sha256, len(order)), item.path)):
        writer.writerow([item.sha256, item.split, item.label, item.path])
    text = _record_header(seed, val_fraction, test_fraction) + "\n" + buffer.getvalue()
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def image_size(data_dir: Path, params: Params) -> sizing.Choice:
    """The training size: `base.image_size` when it is a number, else chosen from the images'
    sides within `base.budget` (headstart/sizing.py)."""
    if params.base.image_size != "auto":
        return sizing.Choice(int(params.base.image_size), "pinned by base.image_size", 0, 0.0)
    name = params.base.backbone
    paths = [
        data_dir / rel
        for rel, label, hidden in _walk(data_dir)
        if label is not None and not hidden and not (data_dir / rel).is_symlink()
    ]
    return sizing.choose(
        sizing.image_sides(paths, params.prepare.resize),
        native=sizing.NATIVE_SIZE[name],
        floor=sizing.FLOOR,
        relative_cost=sizing.RELATIVE_COST[name],
        budget_minutes=params.base.budget,
    )


def _scan(data_dir: Path, params: Params, raw_file, entries: int, size: int) -> list[_Seen]:
    p = params.prepare
    seen: list[_Seen] = []
    rows = 0
    with progress(entries, "prepare", log, unit="files") as shown:
        for rel, label, hidden in _walk(data_dir):
            shown.advance()
            path = data_dir / rel
            if path.is_symlink():
                problem = _link_problem(path, data_dir)
                if problem:
                    seen.append(_Seen(rel, label or "", *problem))
                    continue
            if label is None:
                seen.append(_Seen(rel, "", "ignored", "outside a class folder"))
                continue
            if hidden:
                seen.append(_Seen(rel, label, "ignored", "hidden file"))
                continue
            try:
                data = path.read_bytes()
            except OSError as err:
                seen.append(_Seen(rel, label, "quarantined", f"unreadable ({err.strerror or err})"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            try:
                array = images.decode(data, size, p.resize, p.max_pixels)
            except images.NotAnImage as err:
                if path.suffix.lower() in images.IMAGE_EXTENSIONS:
                    seen.append(_Seen(rel, label, "quarantined", str(err), digest))
                else:
                    seen.append(_Seen(rel, label, "ignored", "not an image file", digest))
                continue
            except images.BadImage as err:
                seen.append(_Seen(rel, label, "quarantined", str(err), digest))
                continue
            raw_file.write(array.tobytes())
            seen.append(_Seen(rel, label, "used", "", digest, rows))
            rows += 1
    return seen


def _apply_review(
    seen: list[_Seen], decisions: review.Review, path, folders: list[str]
) -> list[dict]:
    """Apply the review file: excluded files leave every split (status "excluded"), relabelled
    ones take their new class. No file is moved or deleted. Returns the relabellings made."""
    if not decisions.files():
        return []
    review.check(decisions, path, {i.path for i in seen}, set(folders))
    excluded, relabelled = set(decisions.exclude), []
    for item in seen:
        if item.path in excluded:
            item.status, item.reason = "excluded", f"{review.REVIEW_FILE}: exclude"
        elif item.path in decisions.relabel and item.label != decisions.relabel[item.path]:
            relabelled.append(
                {"file": item.path, "from": item.label, "to": decisions.relabel[item.path]}
            )
            item.label = decisions.relabel[item.path]
    return relabelled


def _resolve_duplicates(seen: list[_Seen]) -> list[dict]:
    """Quarantine extra copies of identical content; copies under different labels all go."""
    by_hash: dict[str, list[_Seen]] = defaultdict(list)
    for item in seen:
        if item.status == "used":
            by_hash[item.sha256].append(item)
    conflicts = []
    for digest, group in by_hash.items():
        if len(group) < 2:
            continue
        labels = sorted({item.label for item in group})
        if len(labels) > 1:
            conflicts.append({"sha256": digest, "labels": labels, "files": [i.path for i in group]})
            for item in group:
                item.status = "quarantined"
                item.reason = f"conflicting labels: same content in classes {', '.join(labels)}"
        else:
            for item in group[1:]:
                item.status = "quarantined"
                item.reason = f"duplicate of {group[0].path}"
    return conflicts


HASH_PIXELS = 1 << 16  # pixels hashed at a time: neardup.phashes peaks near 32 bytes a pixel


def _near_duplicates(
    items: list[_Seen], decoded: int, size: int, together: Sequence[Sequence[str]] = ()
) -> neardup.NearDuplicates:
    """The near-duplicate groups among the used images (indices into `items`), hashed from the
    decoded-image file (descriptor `decoded`) a block of rows at a time: memory stays flat.
    `together`: the review file's groups of files to link whatever their distance (a member
    that is not used, e.g. excluded, is left out)."""
    if not items:
        return neardup.NearDuplicates([], [])
    pixels = size * size * 3
    rows = np.array([item.row for item in items])
    hashes = np.empty((len(items), neardup.HASH_WORDS), np.uint64)
    ranks = np.empty((len(items), neardup.RANK_LENGTH), np.int8)
    step = max(1, HASH_PIXELS // (size * size))
    for start in range(0, len(items), step):
        block = rows[start : start + step]
        data = b"".join(os.pread(decoded, pixels, int(row) * pixels) for row in block)
        arrays = np.frombuffer(data, np.uint8).reshape(len(block), size, size, 3)
        stop = start + len(block)
        hashes[start:stop], ranks[start:stop] = neardup.signatures(arrays)
    named = {name for files in together for name in files}
    index = {item.path: n for n, item in enumerate(items) if item.path in named}
    linked = []
    for files in together:
        members = [index[name] for name in files if name in index]
        linked += [(members[0], other) for other in members[1:]]  # none when < 2 are used
    return neardup.group(
        hashes, neardup.MAX_DISTANCE, ranks, neardup.MIN_CORRELATION, together=linked
    )


REPORTED_PAIRS = 20  # per near-duplicate group, its closest linked pairs in the report


def near_duplicate_report(
    items: list[_Seen], found: neardup.NearDuplicates, placement: Placement
) -> dict:
    """The report's `near_duplicates` section: every group with its files, classes, split and
    distances, the images that joined or moved to their group's split, and the groups that
    span classes (label-conflict candidates: kept, for a person to look at)."""
    pairs_of: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    first_of = {index: members[0] for members in found.groups for index in members}
    for pair in found.pairs:
        pairs_of[first_of[pair[0]]].append(pair)
    groups = []
    for members in found.groups:
        pairs = sorted(pairs_of[members[0]], key=lambda pair: (pair[2], pair[0], pair[1]))
        closest = [[items[i].path, items[j].path, d] for i, j, d in pairs[:REPORTED_PAIRS]]
        groups.append(
            {
                "files": [items[i].path for i in members],
                "classes": sorted({items[i].label for i in members}),
                "split": items[members[0]].split,
                "max_distance": max(distance for *_, distance in pairs),
                "linked_pairs": len(pairs),
                "closest_pairs": closest,
                "correlated_pairs": [
                    [items[i].path, items[j].path, found.correlated[i, j]]
                    for i, j, _ in pairs
                    if (i, j) in found.correlated
                ],
                "nearest_pairs": [
                    [items[i].path, items[j].path, *found.nearest[i, j]]
                    for i, j, _ in pairs
                    if (i, j) in found.nearest
                ],
                "reviewed_pairs": [
                    [items[i].path, items[j].path] for i, j, _ in pairs if (i, j) in found.reviewed
                ],
            }
        )
    return {
        "method": f"perceptual hash ({neardup.HASH_BITS}-bit DCT of the content-centred grey "
        f"image); images whose hashes differ in at most {neardup.MAX_DISTANCE} bits, or whose "
        f"DCT coefficients' ranks correlate at least {neardup.MIN_CORRELATION} "
        "(correlated_pairs), or that are each other's nearest neighbour by that correlation, "
        f"at least {neardup.NEAREST_MIN_CORRELATION}, with 1 - rho at most "
        f"{neardup.NEAREST_MAX_RATIO} of 1 - the runner-up's rho (nearest_pairs: rho, "
        "runner-up), are linked, and so are the files the review file's together lists "
        "(reviewed_pairs); a group is every image linked through a chain; a group always "
        "goes to one split. Look-alikes: mutual nearest neighbours, at least "
        f"{neardup.LOOK_ALIKE_MIN_CORRELATION}, with 1 - rho at most "
        f"{neardup.LOOK_ALIKE_MAX_RATIO:.2f} of the runner-up's (Lowe's cut), not linked "
        "otherwise: not near-duplicates, but kept in one split with each other (and their "
        "groups), in case one is a copy the tests missed",
        "max_distance": neardup.MAX_DISTANCE,
        "min_correlation": neardup.MIN_CORRELATION,
        "nearest_min_correlation": neardup.NEAREST_MIN_CORRELATION,
        "nearest_max_ratio": neardup.NEAREST_MAX_RATIO,
        "count": len(groups),
        "images": sum(len(group["files"]) for group in groups),
        "groups": groups,
        "look_alikes": [
            {"files": [items[i].path, items[j].path], "rho": rho, "runner_up": runner_up}
            for (i, j), (rho, runner_up) in sorted(found.look_alikes.items())
        ],
        "joined": [{"file": i.path, "label": i.label, "split": i.split} for i in placement.joined],
        "moved": [
            {"file": i.path, "label": i.label, "from": before, "to": i.split}
            for i, before in placement.moved
        ],
        "label_conflicts": [
            {"files": group["files"], "classes": group["classes"]}
            for group in groups
            if len(group["classes"]) > 1
        ],
    }


STATUSES = ("used", "quarantined", "ignored", "excluded")  # every file seen has one


def _report(
    seen: list[_Seen],
    classes: list[str],
    empty: list[str],
    conflicts,
    params,
    entries: int,
    near_duplicates: dict,
) -> dict:
    per_class: dict[str, Counter] = defaultdict(Counter)
    for item in seen:
        key = item.label or "(no class)"
        per_class[key]["seen"] += 1
        per_class[key][item.status] += 1
        if item.status == "used":
            per_class[key][item.split] += 1
    counts = {}
    for key in sorted(per_class):
        c = per_class[key]
        counts[key] = {k: c[k] for k in ("seen", *STATUSES, *SPLITS)}
    total = Counter()
    for c in counts.values():
        total.update(c)
    return {
        "data_files_seen": total["seen"],
        "reconciles": all(c["seen"] == sum(c[k] for k in STATUSES) for c in counts.values())
        and total["seen"] == len(seen) == entries,
        "entries_under_data": entries,
        "totals": {k: total[k] for k in ("seen", *STATUSES, *SPLITS)},
        "classes": classes,
        "empty_class_folders": empty,
        "per_class": counts,
        "quarantined": [
            {"file": i.path, "label": i.label, "reason": i.reason}
            for i in seen
            if i.status == "quarantined"
        ],
        "ignored": [{"file": i.path, "reason": i.reason} for i in seen if i.status == "ignored"],
        "label_conflicts": conflicts,
        "near_duplicates": near_duplicates,
        "split": {
            "seed": params.base.seed,
            "val_fraction": params.prepare.val_fraction,
            "test_fraction": params.prepare.test_fraction,
            "method": "stratified per class: round(fraction x images) each; images in the split "
            "record keep their split, new ones are dealt in sha256(seed:content) order; "
            "near-duplicates go to one split together (see near_duplicates)",
        },
    }


def prepare(
    data_dir: Path | str,
    out_dir: Path | str,
    params: Params,
    report_dir: Path | str | None = None,
    record: Path | str | None = None,
    review_file: Path | str | None = None,
) -> Path:
    """Validate, decode, split and store the images under `data_dir` into `out_dir`; the report
    into `report_dir` (default: `data-report` beside `out_dir`). `record`: the split record
    (read, then rewritten): the split of every image it names is kept; None: no memory.
    `review_file`: a person's decisions (headstart/review.py), applied before the split."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    record = Path(record) if record is not None else None
    decisions = review.load(review_file) if review_file is not None else review.Review()
    if not data_dir.is_dir():
        raise PrepareError(
            f"{data_dir}: data folder not found; put images in {data_dir}/<class>/ "
            "(for the demo data: dvc pull data.dvc)"
        )
    folders = sorted(
        d.name
        for d in data_dir.iterdir()
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
    )
    chosen = image_size(data_dir, params)
    size = chosen.size
    with tempfile.TemporaryFile(dir=out_dir.parent if out_dir.parent.exists() else None) as raw:
        buffered = io.BufferedWriter(raw, buffer_size=1 << 22)  # type: ignore[arg-type]
        entries = count_entries(data_dir)
        seen = _scan(data_dir, params, buffered, entries, size)
        buffered.flush()
        conflicts = _resolve_duplicates(seen)
        relabelled = _apply_review(seen, decisions, review_file, folders)
        used = Counter(i.label for i in seen if i.status == "used")
        files = Counter(i.label for i in seen if i.label)
        empty = [f for f in folders if files[f] == 0]
        classes = [f for f in folders if files[f] > 0]
        _check_classes(data_dir, classes, used, params.prepare.min_per_class)
        p, seed = params.prepare, params.base.seed
        used_items = [item for item in seen if item.status == "used"]
        remembered = read_split_record(record, seed, p.val_fraction, p.test_fraction)
        found = _near_duplicates(used_items, raw.fileno(), size, decisions.together)
        placement = assign_splits(
            used_items, remembered, seed, p.val_fraction, p.test_fraction, found.units
        )
        for split in SPLITS:
            if not any(i.split == split for i in seen):
                raise PrepareError(
                    f"{data_dir}: the {split} split is empty ({sum(used.values())} usable images);"
                    f" add images or raise prepare.{split}_fraction"
                )
        near = near_duplicate_report(used_items, found, placement)
        report = _report(seen, classes, empty, conflicts, params, entries, near)
        report["image_size"] = {
            "size": size,
            "setting": params.base.image_size,
            "reason": chosen.reason,
            "estimate_s": chosen.estimate_s,
        }
        report["review"] = {
            "file": review.REVIEW_FILE,
            "relabelled": relabelled,
            "excluded": [i.path for i in seen if i.status == "excluded"],
            "kept": sorted(decisions.keep),
            "together": sorted(sorted(files) for files in decisions.together),
        }
        with atomic_dir(out_dir) as tmp:
            _write(tmp, seen, classes, raw.fileno(), size)
            write_json(
                tmp / LABELS_FILE,
                {
                    "classes": classes,
                    "image_size": size,
                    "preprocessing": images.preprocessing(size, p.resize),
                },
            )
        with atomic_dir(Path(report_dir or out_dir.parent / Path(Paths.data_report).name)) as tmp:
            write_json(tmp / REPORT_FILE, report)
            write_text(tmp / "report.txt", summary(report))
        if record is not None:
            write_split_record(
                record, used_items, seed, p.val_fraction, p.test_fraction, remembered
            )
            _log_placement(placement, len(used_items), record.name)
    log.info("prepare: %s", summary(report).splitlines()[0])
    return out_dir


def _log_placement(placement: Placement, used: int, record_name: str) -> None:
    kept = used - placement.dealt - len(placement.joined) - len(placement.moved)
    log.info(
        "prepare: split: %d image(s) kept where %s had them, %d new dealt, %d new joined their "
        "near-duplicates' (or look-alike's) split, %d moved to their group's split",
        kept,
        record_name,
        placement.dealt,
        len(placement.joined),
        len(placement.moved),
    )


def _check_classes(data_dir: Path, classes: list[str], used: Counter, minimum: int) -> None:
    if len([c for c in classes if used[c] > 0]) < 2:
        raise PrepareError(
            f"{data_dir}: found {len(classes)} class folder(s) with usable images; "
            "need at least 2 (one folder per class: data/<class>/<images>)"
        )
    for name in classes:
        if used[name] < minimum:
            raise PrepareError(
                f"{data_dir / name}: {used[name]} usable image(s), fewer than "
                f"prepare.min_per_class={minimum}; add images or lower the setting"
            )


def _write(out: Path, seen: list[_Seen], classes: list[str], decoded: int, size: int) -> None:
    """Each split's images as one .npy, copied row by row from the decoded-image file
    (descriptor `decoded`) with plain reads and writes: memory stays flat however many images
    there are (a memory-mapped copy would map every page of both files into the process)."""
    index = {name: i for i, name in enumerate(classes)}
    pixels = size * size * 3
    with open(out / MANIFEST_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "sha256", "label", "split", "index"])
        for split in SPLITS:
            items = [i for i in seen if i.split == split]
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False,
                "shape": (len(items), size, size, 3),
            }
            with open(out / f"{split}_images.npy", "wb", buffering=1 << 22) as array:
                np.lib.format.write_array_header_1_0(array, header)
                for n, item in enumerate(items):
                    row = os.pread(decoded, pixels, item.row * pixels)
                    if len(row) != pixels:  # never expected: the file holds every decoded row
                        raise RuntimeError(f"prepare: decoded image {item.row} is incomplete")
                    array.write(row)
                    writer.writerow([item.path, item.sha256, item.label, split, n])
            labels = np.array([index[i.label] for i in items], dtype=np.int32)
            np.save(out / f"{split}_labels.npy", labels)


def summary(report: dict) -> str:
    t = report["totals"]
    lines = [
        f"{t['seen']} files: {t['used']} used ({t['train']} train / {t['val']} val / "
        f"{t['test']} test), {t['quarantined']} quarantined, {t['ignored']} ignored; "
        f"{len(report['classes'])} classes",
    ]
    decided = report.get("review", {})
    if t.get("excluded") or decided.get("relabelled"):
        lines.append(
            f"  {review.REVIEW_FILE}: {t.get('excluded', 0)} excluded, "
            f"{len(decided.get('relabelled', []))} relabelled"
        )
    for item in report["quarantined"]:
        lines.append(f"  quarantined {printable(item['file'])}: {printable(item['reason'])}")
    if report["empty_class_folders"]:
        lines.append(f"  empty class folders (skipped): {', '.join(report['empty_class_folders'])}")
    for item in report["ignored"]:
        if item["reason"].startswith("symlinked folder"):
            lines.append(f"  ignored {printable(item['file'])}: {printable(item['reason'])}")
    for conflict in report["label_conflicts"]:
        lines.append(f"  label conflict {', '.join(map(printable, conflict['files']))}")
    near = report["near_duplicates"]
    if near["count"] or near["look_alikes"]:
        lines.append(
            f"  near-duplicates: {near['count']} group(s) of {near['images']} images, each kept "
            f"in one split, and {len(near['look_alikes'])} look-alike pair(s) kept together; "
            f"{len(near['joined'])} new image(s) joined their group's split, "
            f"{len(near['moved'])} moved to it; {len(near['label_conflicts'])} group(s) span "
            "classes (label-conflict candidates); see report.json near_duplicates"
        )
    if not report["reconciles"]:
        lines.append("  WARNING: the counts do not add up to the entries under the data folder")
    return "\n".join(lines) + "\n"


def printable(text: str) -> str:
    """A file name as one safe line: control characters (newlines...) escaped like Python does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run(params: Params, root: Path) -> Path:
    """The step as dvc.yaml and the flow call it: paths from params."""
    return prepare(
        params.path("data", root),
        params.path("prepared", root),
        params,
        params.path("data_report", root),
        Path(root) / SPLIT_RECORD,
        Path(root) / review.REVIEW_FILE,
    )
