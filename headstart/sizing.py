"""`base.image_size: auto` and `finetune.enabled: auto`: the training size from the images
themselves, and whether to fine-tune, within a time budget (`base.budget`).

A size above the images' own resolution only upscales (20 px digits gained nothing at 128 px),
while 300 px photos lose detail at 96 px (0.763 -> 0.796 at 224 px on an inspection set): so
the size follows the images' median side, in steps of 32 px (the backbones' stride), between a
floor the backbone still works well at and the backbone's native size. The cost of a size
grows with its square; the largest size whose estimated cost fits `base.budget` is taken, and
the reason is recorded (prepare's labels.json and report, the run summary, the model card).
Fine-tuning then runs only if its estimated cost fits in what is left of the budget after the
size-dependent work (`finetune_decision`, recorded by the head step in transfer.json).

The side that counts is the one that `prepare.resize` maps onto the square: the long side when
padding (it becomes image_size), the short side when stretching.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Each backbone's native input size (its ImageNet training size: headstart/backbones.py builds
# them from here) and its inference cost per pixel relative to EfficientNet-Lite0 (FACTS.md:
# speeds on 2 CPU cores). Kept here, free of Keras, because prepare chooses the size.
NATIVE_SIZE = {
    "efficientnet_lite0": 224,
    "efficientnet_lite2": 260,
    "efficientnetb0": 224,
    "inceptionv3": 299,
}
RELATIVE_COST = {
    "efficientnet_lite0": 1.0,
    "efficientnet_lite2": 2.2,
    "efficientnetb0": 1.8,
    "inceptionv3": 2.5,
}
SIZE_STEP = 32
FLOOR = 96  # below this the backbones' 32x downsampling leaves under 3x3 cells
# Seconds per image per pass on this kind of machine (2 CPU cores) at 96 px, for the cost
# estimate (bench/RESULTS.md, issue 27): one backbone pass of EfficientNet-Lite0, and one
# epoch of the pooled baseline CNN. Both grow with the number of pixels.
FEATURE_SECONDS = 0.0024
BASELINE_EPOCH_SECONDS = 0.0010
# Seconds per training image per epoch of fine-tuning EfficientNet-Lite0 at 96 px with its top
# 2 blocks unfrozen (bench/finetune.py, bench/RESULTS.md), each further block's share, and the
# fixed cost of a fine-tuning run (tracing, the end-to-end model's build and scoring).
FINETUNE_EPOCH_SECONDS = 0.0045
FINETUNE_BLOCK_SECONDS = 0.0008
FINETUNE_FIXED_SECONDS = 5.0
# The work budgeted for: the baseline's default epochs, one view of each training image (the
# settings that shape it are the later steps' own: prepare does not depend on them)
BASELINE_EPOCHS = 15


@dataclass(frozen=True)
class Choice:
    size: int
    reason: str
    median_side: int
    estimate_s: float  # estimated seconds of the size-dependent work at `size`


def image_sides(paths: list[Path], resize: str) -> list[int]:
    """The side of each readable image that the resize maps onto the square (header only: no
    decoding). Unreadable files are left out; prepare quarantines them on its own pass."""
    sides = []
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            continue
        sides.append(max(width, height) if resize == "pad" else min(width, height))
    return sides


def estimate_seconds(
    size: int,
    images: int,
    relative_cost: float,
    baseline_epochs: int = BASELINE_EPOCHS,
    views: int = 1,
) -> float:
    """Seconds of the size-dependent work: the feature cache (every image once, the training
    ~70 % `views` times) and the baseline's epochs."""
    scale = (size / FLOOR) ** 2
    passes = images * (0.3 + 0.7 * views)
    return scale * (
        FEATURE_SECONDS * relative_cost * passes + BASELINE_EPOCH_SECONDS * baseline_epochs * images
    )


def choose(
    sides: list[int],
    native: int,
    floor: int,
    relative_cost: float,
    budget_minutes: float,
) -> Choice:
    """The size for these images: their median side rounded to SIZE_STEP, clamped to
    [floor, native], lowered in SIZE_STEP steps while its estimated cost exceeds half the
    budget (the other half is left to everything else)."""
    if not sides:
        return Choice(floor, "no readable image to measure: the floor", 0, 0.0)
    median = int(statistics.median(sides))
    wanted = max(floor, min(native, SIZE_STEP * round(median / SIZE_STEP)))
    size = wanted

    def cost(s: int) -> float:
        return estimate_seconds(s, len(sides), relative_cost)

    allowance = budget_minutes * 60 / 2
    while size > floor and cost(size) > allowance:
        size -= SIZE_STEP
    if median <= floor:
        why = f"median side {median} px: no finer detail to keep, the floor {floor}"
    elif median >= native and size == wanted:
        why = f"median side {median} px: the backbone's native {native}"
    else:
        why = f"median side {median} px"
    if size < wanted:
        why += (
            f"; {wanted} px would take ~{cost(wanted) / 60:.1f} min, over half of "
            f"base.budget {budget_minutes:g} min"
        )
    return Choice(size, why, median, round(cost(size), 1))


@dataclass(frozen=True)
class FinetuneDecision:
    run: bool
    reason: str
    estimate_s: float  # estimated seconds of fine-tuning (0 when finetune.enabled: false)
    budget_left_s: float  # base.budget less the estimated size-dependent work


def finetune_seconds(
    size: int,
    train: int,
    evaluated: int,
    relative_cost: float,
    epochs: int,
    blocks: int,
) -> float:
    """Seconds fine-tuning takes: `epochs` passes over the `train` images (forward through the
    backbone, backward through its top `blocks`) and `evaluated` forward passes of one image
    (validation after each epoch, before and after, the kept model's probabilities)."""
    scale = (size / FLOOR) ** 2 * relative_cost
    per_image_epoch = FINETUNE_EPOCH_SECONDS + FINETUNE_BLOCK_SECONDS * (blocks - 2)
    return FINETUNE_FIXED_SECONDS + scale * (
        per_image_epoch * epochs * train + FEATURE_SECONDS * evaluated
    )


def finetune_decision(
    setting: bool | str, estimate_s: float, spent_s: float, budget_minutes: float
) -> FinetuneDecision:
    """Whether to fine-tune: `finetune.enabled` true or false decides; under auto, fine-tuning
    runs when its estimate (`finetune_seconds`) fits in base.budget less `spent_s`, the estimated
    size-dependent work already chosen (feature cache with its views, baseline)."""
    left = budget_minutes * 60 - spent_s
    estimate, left = round(estimate_s, 1), round(left, 1)
    if setting is False:
        return FinetuneDecision(False, "off (finetune.enabled: false)", 0.0, left)
    if setting is True:
        return FinetuneDecision(True, "forced by finetune.enabled: true", estimate, left)
    if estimate <= left:
        why = (
            f"estimated {_minutes(estimate)} fits the {_minutes(left)} left of "
            f"base.budget {budget_minutes:g} min"
        )
        return FinetuneDecision(True, why, estimate, left)
    why = (
        f"skipped: estimated {_minutes(estimate)} > budget left {_minutes(max(left, 0))} "
        f"(base.budget {budget_minutes:g} min)"
    )
    return FinetuneDecision(False, why, estimate, left)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
