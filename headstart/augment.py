"""Augmentation policies for the head's cached views, and which views the cache holds.

A flip is not always label-preserving (an arrow pointing left is another class once flipped;
so are digits and text), and how much shifting helps depends on the data. So `head.augment:
auto` computes one augmented view per policy into the feature cache and lets the head's
cross-validation compare them (headstart/heads.py, tasks/head.py); a policy name pins it.

View 0 of every image is the image as it is; `view_policies` names the policy of each view.
"""

from __future__ import annotations

from headstart.params import AUGMENT_POLICIES as POLICIES  # simplest first: ties go to it

AUGMENTED = POLICIES[1:]
SHIFT = 0.1  # fraction of the image: translation, zoom
ROTATION = 0.05  # fraction of a full turn (18 degrees)


def view_policies(augment: str, views: int) -> tuple[str, ...]:
    """The policy of each cached view of a training image: view 0 plain, then `views - 1`
    augmented views of the pinned policy, or of each policy in turn under `auto`."""
    if augment == "none" or views < 2:
        return ("none",)
    chosen = AUGMENTED if augment == "auto" else (augment,)
    return ("none", *(policy for policy in chosen for _ in range(views - 1)))


def layers_for(policy: str, seed: int | None = None) -> list:
    """Keras preprocessing layers applying `policy` (none: no layer)."""
    from keras import layers

    flip = [layers.RandomFlip("horizontal", seed=seed)]
    shift = [
        layers.RandomTranslation(SHIFT, SHIFT, fill_mode="constant", seed=seed),
        layers.RandomRotation(ROTATION, fill_mode="constant", seed=seed),
        layers.RandomZoom(SHIFT, fill_mode="constant", seed=seed),
    ]
    return {"none": [], "flip": flip, "shift": shift, "flip_shift": flip + shift}[policy]


def rows_of(policies: tuple[str, ...], policy: str, images: int):
    """Row indices of the cache's training features that show view 0 and every view of
    `policy` (row r of view v is v * images + r)."""
    import numpy as np

    views = [v for v, name in enumerate(policies) if v == 0 or name == policy]
    return np.concatenate([np.arange(images) + v * images for v in views])
