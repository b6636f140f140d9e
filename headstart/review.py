"""The data review file (`data-review.yaml` at the project root, tracked by git, a dependency of
the prepare stage): a person's decisions about single images, which the next prepare applies
without moving or deleting any file.

    relabel:                    # file (as under the data folder) -> the class it really is
      sneaker/img_0042.png: sandal
    exclude:                    # files left out of every split (reported as excluded)
      - bag/img_0007.png
    keep:                       # checked and right as they are: no longer flagged
      - shirt/img_0100.png
    together:                   # copies of one picture the near-duplicate tests missed:
      - [bag/img_0003.png, bag/img_0950.png]   # each list goes to one split

`headstart review` lists the images the data doctor (headstart/doctor.py) doubts and can write
accepted suggestions here; the file can equally be edited by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from headstart.errors import UserError
from headstart.files import write_text

REVIEW_FILE = "data-review.yaml"
SECTIONS = ("relabel", "exclude", "keep", "together")
HEADER = """\
# headstart data review: decisions about single images that the next `headstart run` (or
# `dvc repro`) applies in prepare. Files are named as under the data folder (class/file.png).
#   relabel: {file: class}   the class the image really is
#   exclude: [file, ...]     left out of every split (reported as excluded)
#   keep:    [file, ...]     checked and right: the data doctor no longer flags it
#   together: [[file, file, ...], ...]   copies of one picture: each list goes to one split
# `headstart review` lists the doubtful images and writes accepted suggestions here.
"""


class ReviewError(UserError):
    """The review file cannot be applied; the message names the file and the entry."""


@dataclass
class Review:
    relabel: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    together: list[list[str]] = field(default_factory=list)

    def named(self) -> set[str]:
        """The files with a decision about their label or use (one each)."""
        return {*self.relabel, *self.exclude, *self.keep}

    def files(self) -> set[str]:
        """Every file the review names."""
        return self.named() | {name for group in self.together for name in group}


def load(path: Path | str) -> Review:
    """The review at `path` (an empty Review when the file does not exist or is empty)."""
    path = Path(path)
    if not path.is_file():
        return Review()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ReviewError(f"{path}:{where} not valid YAML; fix it or empty the file") from None
    if not isinstance(raw, dict) or set(raw) - set(SECTIONS):
        unknown = sorted(set(raw) - set(SECTIONS)) if isinstance(raw, dict) else [str(raw)]
        raise ReviewError(
            f"{path}: unknown section {', '.join(map(str, unknown))}; the "
            f"sections are {', '.join(SECTIONS)}"
        )
    relabel, exclude, keep = (
        raw.get("relabel") or {},
        raw.get("exclude") or [],
        raw.get("keep") or [],
    )
    if not isinstance(relabel, dict) or not all(isinstance(v, str) for v in relabel.values()):
        raise ReviewError(f"{path}: relabel must map files to class names (file: class)")
    for name, files in (("exclude", exclude), ("keep", keep)):
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ReviewError(f"{path}: {name} must be a list of files")
    together = raw.get("together") or []
    if not isinstance(together, list) or not all(
        isinstance(g, list) and len(g) >= 2 and all(isinstance(f, str) for f in g) for g in together
    ):
        raise ReviewError(f"{path}: together must be a list of lists of two or more files")
    review = Review(
        {str(k): v for k, v in relabel.items()}, list(exclude), list(keep), list(together)
    )
    twice = [f for f in review.named() if sum(f in s for s in (relabel, exclude, keep)) > 1]
    if twice:
        raise ReviewError(f"{path}: {sorted(twice)[0]} is named in two sections; keep one")
    return review


def check(review: Review, path: Path | str, files: set[str], classes: set[str]) -> None:
    """A review naming a file that is not in the data folder, or relabelling to a class that
    has no folder, is one error line naming the entry."""
    for name in sorted(review.files()):
        if name not in files:
            raise ReviewError(
                f"{path}: {name}: no such file under the data folder; fix the "
                "name or remove the entry"
            )
    for name, label in sorted(review.relabel.items()):
        if label not in classes:
            raise ReviewError(
                f"{path}: {name}: relabel to {label!r}, which is not a class "
                f"(classes: {', '.join(sorted(classes))})"
            )


def save(review: Review, path: Path | str) -> None:
    """Write the review (sections sorted), with the explaining header; each `together` list
    on one line."""
    body = {
        name: value
        for name, value in (
            ("relabel", dict(sorted(review.relabel.items()))),
            ("exclude", sorted(review.exclude)),
            ("keep", sorted(review.keep)),
        )
        if value
    }
    text = HEADER + (yaml.safe_dump(body, sort_keys=False) if body else "")
    if review.together:
        groups = sorted(sorted(group) for group in review.together)
        text += "together:\n" + "".join(
            f"- {yaml.safe_dump(group, default_flow_style=True, width=1 << 16)}" for group in groups
        )
    write_text(path, text)  # atomically: a person's decisions are never left half-written
