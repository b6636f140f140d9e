"""params.yaml loaded once into frozen dataclasses, every value checked up front.

The dataclasses are the schema and the defaults: a field's type says how a value is read and
`Literal` lists the choices; an `Annotated` `Rule` bounds it. A mistake is one `ParamsError`
naming the key and the fix. params.yaml is the user's copy and must hold every key (DVC refuses
a stage whose parameter is missing): a missing key is an error line that gives the default.
"""

# no `from __future__ import annotations`: the Rules' lambdas must be built here, with this
# module's globals, not evaluated later from strings
import dataclasses
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from headstart import paramfile
from headstart.download import url_allowed
from headstart.errors import ParamsError
from headstart.pathpolicy import Paths, check_paths

PARAMS_FILE = "params.yaml"  # in the project folder; DVC reads this file, so there is no other


class Rule(typing.NamedTuple):
    """`test(value)` must hold (None: be one of the Literal's choices), or the error says `text`."""

    test: Callable[[Any], bool] | None
    text: str


@typing.dataclass_transform(frozen_default=True)
class Section:
    """A params.yaml section: every subclass is a frozen dataclass."""

    def __init_subclass__(cls) -> None:
        dataclasses.dataclass(frozen=True)(cls)


PosInt = Annotated[int, Rule(lambda v: v > 0, "must be > 0")]
PosFloat = Annotated[float, Rule(lambda v: v > 0, "must be > 0")]
Fraction = Annotated[float, Rule(lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)")]
Backbone = Literal["efficientnet_lite0", "efficientnet_lite2", "efficientnetb0", "inceptionv3"]
BaselineArch = Literal["pooled", "seed"]  # pooled: any size; seed: Flatten + Dense 512
HeadConfig = Literal["auto", "linear", "small", "dense", "seed"]  # auto: CV picks; seed: as-is
AugmentPolicy = Literal["none", "flip", "shift", "flip_shift"]  # simplest first (augment.py)
ExportFormat = Literal["saved_model", "litert", "onnx"]  # exporting.py converts to each
OodMethod = Literal["mahalanobis", "cosine"]  # distance to the nearest class centroid
PromotionRule = Literal["mcnemar", "at_least"]  # significant improvement | test accuracy >=
BACKBONES, BASELINE_ARCHS, AUGMENT_POLICIES, EXPORT_FORMATS, OOD_METHODS, PROMOTION_RULES = (
    typing.get_args(kind)
    for kind in (Backbone, BaselineArch, AugmentPolicy, ExportFormat, OodMethod, PromotionRule)
)


class Base(Section):
    seed: Annotated[int, Rule(lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")] = 42
    image_size: Annotated[  # pixels, or auto (headstart/sizing.py)
        int | Literal["auto"],
        Rule(lambda v: v == "auto" or v >= 32, "must be >= 32 (pixels) or auto"),
    ] = "auto"
    backbone: Backbone = "efficientnet_lite0"
    devices: Annotated[
        Literal["auto", "1"], Rule(None, "must be auto (every GPU when there are several) or 1")
    ] = "auto"
    budget: PosFloat = 30.0  # minutes on this machine that the automatic choices fit in


class Prepare(Section):
    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.15
    min_per_class: PosInt = 5
    resize: Literal["pad", "stretch"] = "pad"
    max_pixels: PosInt = 89_478_485


class Baseline(Section):
    arch: BaselineArch = "pooled"
    augment: AugmentPolicy = "none"  # inside its training input pipeline (headstart/augment.py)
    epochs: PosInt = 15
    batch_size: PosInt = 32
    learning_rate: PosFloat = 1e-3
    patience: PosInt = 3
    target_accuracy: Fraction = 0.99


class Weights(Section):
    url: Annotated[
        str, Rule(lambda v: not v or url_allowed(v), "must be empty or an https:// URL")
    ] = ""
    cache_dir: str = "~/.cache/headstart/weights"
    retries: PosInt = 3


class Freeze(Section):
    cut_layer: str = ""


class Head(Section):
    config: HeadConfig = "auto"
    folds: Annotated[int, Rule(lambda v: v >= 2, "must be >= 2")] = 3
    units: PosInt = 1024
    dropout: Annotated[float, Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")] = 0.2
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: PosFloat = 1e-3
    epochs: PosInt = 40
    batch_size: PosInt = 64
    patience: PosInt = 5
    loss_patience: Annotated[int, Rule(lambda v: v >= 0, "must be >= 0")] = 0
    target_accuracy: Fraction = 0.999
    class_weight: Literal["none", "balanced"] = "none"
    augment: Annotated[
        Literal["auto", AugmentPolicy],
        Rule(None, f"must be auto or one of {', '.join(AUGMENT_POLICIES)}"),
    ] = "auto"
    views: PosInt = 2


class Finetune(Section):
    enabled: bool | Literal["auto"] = False  # auto: within base.budget (headstart/sizing.py)
    blocks: PosInt = 2
    learning_rate: PosFloat = 1e-5
    epochs: PosInt = 3
    batch_size: PosInt = 32


class Evaluate(Section):
    top_k: PosInt = 3


class Plots(Section):
    samples: PosInt = 16


class Ood(Section):
    method: OodMethod = "mahalanobis"
    keep: Annotated[
        float,
        Rule(lambda v: 0 < v <= 1, "must be in (0, 1]: the fraction of validation images kept"),
    ] = 0.95


class Promotion(Section):
    rule: PromotionRule = "mcnemar"
    alpha: Annotated[
        float, Rule(lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive), e.g. 0.05")
    ] = 0.05
    recall_tolerance: Annotated[
        float,
        Rule(
            lambda v: 0 <= v <= 1, "must be between 0 and 1 (an absolute recall drop; 1 = no check)"
        ),
    ] = 0.05


class Export(Section):
    formats: Annotated[
        tuple[ExportFormat, ...],
        Rule(
            lambda v: set(v) <= set(EXPORT_FORMATS) and len(set(v)) == len(v),
            f"must list each of {', '.join(EXPORT_FORMATS)} at most once",
        ),
    ] = EXPORT_FORMATS
    min_agreement: Annotated[
        float,
        Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]: the top-1 agreement each export needs"),
    ] = 0.995
    latency_runs: Annotated[int, Rule(lambda v: v >= 1, "must be >= 1")] = 20


class Params(Section):
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


def _scalar(value: Any, kind: type) -> Any:
    """`value` read as `kind` (bool, int, float or str); TypeError/ValueError when it is not."""
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind is str:
        if not isinstance(value, (str, int, float, type(None))):
            raise TypeError
        return "" if value is None else str(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    if kind is int and isinstance(value, float):
        raise TypeError
    return kind(value)


_WANTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_OR_AUTO = {int: "a number of pixels or auto", bool: "true, false or auto"}  # `X | Literal["auto"]`


def _read(name: str, value: Any, kind: Any) -> Any:
    """The value as the field's type holds it, or an error naming what was wanted."""
    choices = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:  # a list of choices
        if value is not None and not isinstance(value, (list, tuple)):
            raise ParamsError(f"params: {name} must be a list, e.g. [a, b] (got {value!r})")
        return tuple(_read(name, item, choices[0]) for item in value or ())
    auto = Literal["auto"] in choices  # a value, or auto
    if auto and value == "auto":
        return value
    scalar = choices[0] if auto else str if typing.get_origin(kind) is Literal else kind
    try:
        read = _scalar(value, scalar)
    except (TypeError, ValueError):
        wanted = _OR_AUTO[scalar] if auto else _WANTED[scalar]
        raise ParamsError(f"params: {name} must be {wanted} (got {value!r})") from None
    if scalar is float and not math.isfinite(read):
        raise ParamsError(f"params: {name} must be a finite number (got {value!r})")
    return read


def from_dict(raw: dict[str, Any] | None) -> Params:
    """Validate a params mapping (as in params.yaml) and build `Params`."""
    if not isinstance(raw or {}, dict):
        raise ParamsError("params: the file must be a mapping of sections")
    sections, built = typing.get_type_hints(Params), {}
    for section, values in (raw or {}).items():
        if section not in sections:
            raise ParamsError(f"params: unknown section '{section}' (known: {', '.join(sections)})")
        if not isinstance(values or {}, dict):
            raise ParamsError(f"params: section '{section}' must be a mapping")
        hints, kwargs = typing.get_type_hints(sections[section], include_extras=True), {}
        for key, value in (values or {}).items():
            name, kind = f"{section}.{key}", hints.get(key)
            if kind is None:
                known = ", ".join(hints)
                raise ParamsError(f"params: unknown key '{name}' (known in {section}: {known})")
            rules = kind.__metadata__ if typing.get_origin(kind) is Annotated else ()
            kind = typing.get_args(kind)[0] if rules else kind
            kwargs[key] = read = _read(name, value, kind)
            choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else ()
            if choices and not rules:
                rules = (Rule(None, f"must be one of {', '.join(choices)}"),)
            for test, text in rules:
                if not (test(read) if test else read in choices):
                    raise ParamsError(f"params: {name} {text} (got {read!r})")
        built[section] = sections[section](**kwargs)
    params = Params(**built)
    check_paths(params.paths)
    split = params.prepare.val_fraction + params.prepare.test_fraction
    if split >= 1:
        raise ParamsError(
            "params: prepare.val_fraction + prepare.test_fraction must be < 1 "
            f"(got {split:g}); leave some images for training"
        )
    return params


def load(path: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Load and validate the parameter file (with `section.key=value` overrides applied)."""
    raw = paramfile.apply_overrides(paramfile.read_raw(path), overrides or [])
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


def write_overrides(path: Path | str, overrides: list[str]) -> None:
    """Validate overrides against the file, then write them into it, comments kept (like
    `dvc exp run -S`), so DVC and the flow see the same parameters."""
    load(path, overrides)
    paramfile.write_overrides(path, overrides)


# Settings that say how work is done, not what it produces: no stage depends on them, so changing
# one reruns nothing (dvc.yaml leaves them out; the model card does not list them).
OPERATIONAL = ("weights.cache_dir", "weights.retries", "export.latency_runs")


def to_dict(params: Params, operational: bool = True) -> dict[str, Any]:
    """Sections -> keys -> values, lists as lists (as params.yaml, JSON and DVC hold them);
    with operational=False, only the settings a result depends on."""
    return {
        section: {
            key: list(v) if isinstance(v, tuple) else v
            for key, v in values.items()
            if operational or f"{section}.{key}" not in OPERATIONAL
        }
        for section, values in dataclasses.asdict(params).items()
    }
