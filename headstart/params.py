"""params.yaml loaded once into frozen dataclasses and validated up front.

Every user-facing mistake becomes one `ParamsError` whose message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import io
import math
import posixpath
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from headstart.errors import UserError

BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "efficientnetb0", "inceptionv3")
PARAMS_FILE = "params.yaml"  # in the project folder; DVC reads this file, so there is no other


# the baseline CNN: pooled (global average pooling, any size) or the seed's Flatten + Dense 512
BASELINE_ARCHS = ("pooled", "seed")
# auto: k-fold CV picks among linear, small and dense; seed: the seed's recipe, unchanged
HEAD_CONFIGS = ("auto", "linear", "small", "dense", "seed")
# the export step's formats (headstart/exporting.py has a converter for each)
# the head's augmented views (headstart/augment.py); auto: the head's CV compares them
AUGMENT_POLICIES = ("none", "flip", "shift", "flip_shift")
EXPORT_FORMATS = ("saved_model", "litert", "onnx")
# "unknown" answers: distance of the backbone's features to the nearest class centroid
OOD_METHODS = ("mahalanobis", "cosine")
# mcnemar: replace the champion only on a significant improvement (see headstart/promotion.py);
# at_least: the old rule, test accuracy >= the champion's
PROMOTION_RULES = ("mcnemar", "at_least")


class ParamsError(UserError):
    """A bad value in params.yaml (or an override)."""


@dataclass(frozen=True)
class Base:
    seed: int = 42
    image_size: int | str = "auto"  # pixels, or auto (headstart/sizing.py)
    backbone: str = "efficientnet_lite0"
    devices: str = "auto"
    budget: float = 30.0  # minutes on this machine that the automatic choices fit in


@dataclass(frozen=True)
class Prepare:
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    min_per_class: int = 5
    resize: str = "pad"
    max_pixels: int = 89_478_485


@dataclass(frozen=True)
class Baseline:
    arch: str = "pooled"
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 3
    target_accuracy: float = 0.99


@dataclass(frozen=True)
class Weights:
    url: str = ""
    cache_dir: str = "~/.cache/headstart/weights"
    retries: int = 3


@dataclass(frozen=True)
class Freeze:
    cut_layer: str = ""


@dataclass(frozen=True)
class Head:
    config: str = "auto"
    folds: int = 3
    units: int = 1024
    dropout: float = 0.2
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    epochs: int = 40
    batch_size: int = 64
    patience: int = 5
    loss_patience: int = 0
    target_accuracy: float = 0.999
    class_weight: str = "none"
    augment: str = "auto"
    views: int = 2


@dataclass(frozen=True)
class Finetune:
    enabled: bool | str = "auto"  # true, false, or auto (within base.budget: headstart/sizing.py)
    blocks: int = 2
    learning_rate: float = 1e-5
    epochs: int = 3
    batch_size: int = 32


@dataclass(frozen=True)
class Evaluate:
    top_k: int = 3


@dataclass(frozen=True)
class Plots:
    samples: int = 16


@dataclass(frozen=True)
class Ood:
    method: str = "mahalanobis"
    keep: float = 0.95


@dataclass(frozen=True)
class Promotion:
    rule: str = "mcnemar"
    alpha: float = 0.05
    recall_tolerance: float = 0.05


@dataclass(frozen=True)
class Export:
    formats: tuple[str, ...] = EXPORT_FORMATS
    min_agreement: float = 0.995
    latency_runs: int = 20


@dataclass(frozen=True)
class Paths:
    data: str = "data"
    prepared: str = "artifacts/prepared"
    data_report: str = "artifacts/data-report"
    baseline: str = "artifacts/baseline"
    weights: str = "artifacts/weights"
    backbone: str = "artifacts/backbone"
    transfer: str = "artifacts/transfer"
    release: str = "artifacts/release"
    features: str = "artifacts/features"
    metrics: str = "artifacts/metrics"
    plots: str = "artifacts/plots"
    export: str = "artifacts/export"
    champion: str = "models/champion"


@dataclass(frozen=True)
class Params:
    base: Base = Base()
    prepare: Prepare = Prepare()
    baseline: Baseline = Baseline()
    weights: Weights = Weights()
    freeze: Freeze = Freeze()
    head: Head = Head()
    finetune: Finetune = Finetune()
    evaluate: Evaluate = Evaluate()
    plots: Plots = Plots()
    ood: Ood = Ood()
    promotion: Promotion = Promotion()
    export: Export = Export()
    paths: Paths = Paths()

    def path(self, name: str, root: Path | str = ".") -> Path:
        """An artifact path from the `paths` section, relative to the project root."""
        return Path(root) / getattr(self.paths, name)


# (section, key) -> check returning an error text, or None when the value is fine.
_CHECKS: dict[str, typing.Callable[[Any], str | None]] = {
    "base.seed": lambda v: None if 0 <= v < 2**32 else "must be in [0, 2**32)",
    "base.image_size": lambda v: (
        None if v == "auto" or v >= 32 else "must be >= 32 (pixels) or auto"
    ),
    "base.backbone": lambda v: None if v in BACKBONES else f"must be one of {', '.join(BACKBONES)}",
    "base.devices": lambda v: (
        None if v in ("auto", "1") else "must be auto (every GPU when there are several) or 1"
    ),
    "baseline.arch": lambda v: (
        None if v in BASELINE_ARCHS else f"must be one of {', '.join(BASELINE_ARCHS)}"
    ),
    "prepare.resize": lambda v: None if v in ("pad", "stretch") else "must be 'pad' or 'stretch'",
    "head.optimizer": lambda v: (
        None if v in ("adam", "sgd", "rmsprop") else "must be adam, sgd or rmsprop"
    ),
    "head.class_weight": lambda v: (
        None if v in ("none", "balanced") else "must be 'none' or 'balanced'"
    ),
    "head.dropout": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "head.config": lambda v: (
        None if v in HEAD_CONFIGS else f"must be one of {', '.join(HEAD_CONFIGS)}"
    ),
    "head.folds": lambda v: None if v >= 2 else "must be >= 2",
    "head.augment": lambda v: (
        None
        if v in ("auto", *AUGMENT_POLICIES)
        else f"must be auto or one of {', '.join(AUGMENT_POLICIES)}"
    ),
    "export.formats": lambda v: (
        None
        if set(v) <= set(EXPORT_FORMATS) and len(set(v)) == len(v)
        else f"must list each of {', '.join(EXPORT_FORMATS)} at most once"
    ),
    "export.min_agreement": lambda v: (
        None if 0 <= v <= 1 else "must be in [0, 1]: the top-1 agreement each export needs"
    ),
    "export.latency_runs": lambda v: None if v >= 1 else "must be >= 1",
    "ood.method": lambda v: (
        None if v in OOD_METHODS else f"must be one of {', '.join(OOD_METHODS)}"
    ),
    "ood.keep": lambda v: (
        None if 0 < v <= 1 else "must be in (0, 1]: the fraction of validation images kept"
    ),
    "promotion.rule": lambda v: (
        None if v in PROMOTION_RULES else f"must be one of {', '.join(PROMOTION_RULES)}"
    ),
    "promotion.alpha": lambda v: (
        None if 0 < v < 1 else "must be between 0 and 1 (exclusive), e.g. 0.05"
    ),
    "promotion.recall_tolerance": lambda v: (
        None if 0 <= v <= 1 else "must be between 0 and 1 (an absolute recall drop; 1 = no check)"
    ),
    "weights.url": lambda v: (
        None if v == "" or _url_allowed(v) else "must be empty or an https:// URL"
    ),
}


def _url_allowed(url: str) -> bool:
    from headstart.download import DownloadError, check_url

    try:
        check_url(url)
    except DownloadError:
        return False
    return True


_POSITIVE = {
    "epochs",
    "batch_size",
    "learning_rate",
    "units",
    "views",
    "blocks",
    "top_k",
    "samples",
    "max_pixels",
    "min_per_class",
    "retries",
    "patience",
    "budget",
}
_FRACTIONS = {"val_fraction", "test_fraction", "target_accuracy"}


def _coerce(name: str, value: Any, kind: Any) -> Any:
    if kind == int | str:  # a number of pixels, or auto
        if value == "auto":
            return value
        try:
            return _coerce(name, value, int)
        except ParamsError:
            raise ParamsError(
                f"params: {name} must be a number of pixels or auto (got {value!r})"
            ) from None
    if kind == bool | str:  # true or false, or auto
        if value == "auto":
            return value
        try:
            return _coerce(name, value, bool)
        except ParamsError:
            raise ParamsError(
                f"params: {name} must be true, false or auto (got {value!r})"
            ) from None
    if typing.get_origin(kind) is tuple:  # a list of strings
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params: {name} must be a list, e.g. [a, b] (got {value!r})")
        return tuple(_coerce(name, item, str) for item in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ParamsError(f"params: {name} must be true or false (got {value!r})")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ParamsError(f"params: {name} must be an integer (got {value!r})")
        try:
            return int(value)
        except ValueError:
            raise ParamsError(f"params: {name} must be an integer (got {value!r})") from None
    if kind is float:
        if isinstance(value, bool):
            raise ParamsError(f"params: {name} must be a number (got {value!r})")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ParamsError(f"params: {name} must be a number (got {value!r})") from None
        if not math.isfinite(number):
            raise ParamsError(f"params: {name} must be a finite number (got {value!r})")
        return number
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise ParamsError(f"params: {name} must be a string (got {value!r})")
    return str(value)


def _check(name: str, key: str, value: Any) -> None:
    problem = None
    if name in _CHECKS:
        problem = _CHECKS[name](value)
    elif key in _POSITIVE and value <= 0:
        problem = "must be > 0"
    elif key in _FRACTIONS and not 0 < value < 1:
        problem = "must be between 0 and 1 (exclusive)"
    elif key in ("patience", "loss_patience") and value < 0:
        problem = "must be >= 0"
    if problem:
        raise ParamsError(f"params: {name} {problem} (got {value!r})")


def from_dict(raw: dict[str, Any] | None) -> Params:
    """Validate a params mapping (as in params.yaml) and build `Params`."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError("params: the file must be a mapping of sections")
    sections = {f.name: f for f in fields(Params)}
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise ParamsError(f"params: unknown section '{section}' (known: {', '.join(sections)})")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ParamsError(f"params: section '{section}' must be a mapping")
        cls = sections[section].type
        cls = globals()[cls] if isinstance(cls, str) else cls
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            name = f"{section}.{key}"
            if key not in hints:
                raise ParamsError(
                    f"params: unknown key '{name}' (known in {section}: {', '.join(hints)})"
                )
            kwargs[key] = _coerce(name, value, hints[key])
            _check(name, key, kwargs[key])
        built[section] = cls(**kwargs)
    params = Params(**built)
    check_paths(params.paths)
    split = params.prepare.val_fraction + params.prepare.test_fraction
    if split >= 1:
        raise ParamsError(
            "params: prepare.val_fraction + prepare.test_fraction must be < 1 "
            f"(got {split:g}); leave some images for training"
        )
    return params


# Top-level names a path may never be or enter: the project's code, tooling and VCS folders.
PROTECTED = ("headstart", "tasks", "flows", "tests", "bench", "scripts", "demo-remote")
INPUT_PATHS = ("data",)  # read, never written


def check_paths(paths: Paths) -> None:
    """Every path: relative, inside the project, no hidden part, not the code. Output paths: not
    the data, and no output inside another (a step replaces its output folder whole)."""
    normal = {}
    for name, value in dataclasses.asdict(paths).items():
        key = f"paths.{name}"
        clean = posixpath.normpath(value.replace("\\", "/")) if value else ""
        parts = clean.split("/")
        if not clean or clean == ".":
            problem = "must name a folder inside the project, not the project itself"
        elif posixpath.isabs(clean) or parts[0] == "..":
            problem = "must be a relative path inside the project (no absolute path, no '..')"
        elif any(part.startswith(".") for part in parts):
            problem = "must not contain hidden parts (.git, .dvc, .name ...)"
        elif parts[0] in PROTECTED or (len(parts) == 1 and "." in parts[0]):
            problem = f"must not be or enter the project's code or files ({', '.join(PROTECTED)})"
        else:
            normal[name] = clean
            continue
        raise ParamsError(f"params: {key} {problem} (got {value!r})")
    for name, clean in normal.items():
        for other, other_clean in normal.items():
            if other == name or (name in INPUT_PATHS and other in INPUT_PATHS):
                continue
            if clean == other_clean or clean.startswith(other_clean + "/"):
                first, second = sorted((name, other), key=lambda n: n in INPUT_PATHS)
                raise ParamsError(
                    f"params: paths.{first} and paths.{second} overlap ({normal[first]!r}, "
                    f"{normal[second]!r}); give every step its own folder, apart from the data"
                )


def parse_override(item: str) -> tuple[str, str, Any]:
    """DVC-style `section.key=value` -> (section, key, YAML-typed value)."""
    name, sep, value = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ParamsError(f"override '{item}' must look like section.key=value")
    try:
        return section, key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError as err:
        where = getattr(err, "problem", None) or "not valid YAML"
        raise ParamsError(
            f"override '{item}': the value is not valid YAML ({where}); quote "
            "it, e.g. -S 'section.key=\"text\"'"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw params mapping (a copy)."""
    merged = {section: dict(values or {}) for section, values in raw.items()}
    for section, key, value in map(parse_override, overrides):
        merged.setdefault(section, {})[key] = value
    return merged


def read_raw(path: Path | str = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the project folder or pass --project DIR")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)  # _StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {err.problem}; fix the file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err}); fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read it ({err})") from None
    return raw or {}


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last
    one silently, while DVC and ruamel refuse the file)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load and validate the parameter file. Every key must be present (dvc.yaml tracks them by
    name, and DVC refuses a stage whose parameter is missing)."""
    raw = read_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        params = from_dict(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    for section, values in to_dict(params).items():
        for key, default in values.items():
            if key not in (raw.get(section) or {}):
                raise ParamsError(
                    f"{path}: missing key {section}.{key}; add it (default: {default!r})"
                )
    return params


# Settings that say how work is done, not what it produces: no stage depends on them, so changing
# one reruns nothing (dvc.yaml leaves them out; the model card does not list them).
OPERATIONAL = ("weights.cache_dir", "weights.retries", "export.latency_runs")


def result_settings(params: Params) -> dict[str, Any]:
    """`to_dict` without the OPERATIONAL settings: every setting a result depends on."""
    settings = to_dict(params)
    for name in OPERATIONAL:
        section, key = name.split(".")
        del settings[section][key]
    return settings


def to_dict(params: Params) -> dict[str, Any]:
    """Sections -> keys -> values, lists as lists (as params.yaml, JSON and DVC hold them)."""
    return {
        section: {
            key: list(value) if isinstance(value, tuple) else value for key, value in values.items()
        }
        for section, values in dataclasses.asdict(params).items()
    }


def write_overrides(path: Path | str, overrides: list[str]) -> None:
    """Validate `section.key=value` overrides and write them into params.yaml, keeping comments
    (like `dvc exp run -S`), so DVC and the flow see the same parameters."""
    from ruamel.yaml import YAML

    from headstart.files import write_text

    path = Path(path)
    load(path, overrides)  # validate the merged result before touching the file
    parser = YAML()
    parser.preserve_quotes = True  # every other line stays as the user wrote it
    document = parser.load(path.read_text())
    for section, key, value in map(parse_override, overrides):
        document.setdefault(section, {})[key] = value
    buffer = io.StringIO()
    parser.dump(document, buffer)
    write_text(path, buffer.getvalue())
