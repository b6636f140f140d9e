"""head: frozen backbone + prepared images -> artifacts/transfer/ (end-to-end model).

The backbone is frozen, so its output per image never changes: features are computed once per
image (and per augmented view) into a cache, and the dense head trains on the cache. The cache
is keyed by backbone, data and views, so a change to head settings alone reuses it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from headstart import sizing
from headstart.artifacts import (
    BACKBONE_FILE,
    HEAD_SELECTION_FILE,
    LABELS_FILE,
    LIVE_DIR,
    MODEL_FILE,
    OUT_OF_FOLD_FILE,
    PROBABILITIES_FILE,
    TRANSFER_RECORD,
    Rows,
    image_size,
    load_features,
    load_split,
)
from headstart.features import (
    Shard,
    assemble,
    cache_features,
    cache_key,
    compute_shard,
    load_backbone,
    params_key,
    params_views,
    shards_dir,
)
from headstart.files import (
    atomic_dir,
    read_json,
    require,
    save_keras,
    write_json,
    write_summary,
    write_timings,
)
from headstart.params import Params

log = logging.getLogger("headstart.head")


HEAD_STEPS_PER_EXECUTION = 32  # the head is tiny: per-batch Python overhead would dominate


def extract_shard(
    params: Params,
    root: Path | str,
    split: str,
    view: int,
    start: int,
    stop: int,
    key: str | None = None,
) -> Path:
    """One shard of the feature cache (rows [start, stop) of `split`, view `view`) into its own
    file: what a Dask worker runs when the flow spreads the cache over workers. `key`: the
    cache's `params_key`, when the caller has it (it hashes the manifest and the backbone: once
    per run, not once per shard)."""
    prepared, backbone = params.path("prepared", root), params.path("backbone", root)
    policies = params_views(params)
    return compute_shard(
        load_backbone(require(backbone, "freeze")),
        prepared,
        Shard(split, view, start, stop, policies[view] if split == "train" else "none"),
        shards_dir(params.path("features", root), key or params_key(params, root)),
        params.base.seed,
    )


def assemble_features(params: Params, root: Path | str, shards: int) -> Path:
    """The cache from the files of `headstart.features.plan(..., shards)` (run it as the head
    step, `pipeline.run_step`, so the cache is stamped as when head computes it alone)."""
    return assemble(
        params_key(params, root),
        params.path("prepared", root),
        params.path("features", root),
        params_views(params),
        shards,
    )


def train_head(
    prepared_dir: Path | str,
    backbone_dir: Path | str,
    features_dir: Path | str,
    out_dir: Path | str,
    params: Params,
) -> Path:
    import keras

    from headstart import models, training

    prepared_dir, backbone_dir = Path(prepared_dir), Path(backbone_dir)
    features_dir = Path(features_dir)
    p, seed = params.head, params.base.seed
    keras.utils.set_random_seed(seed)
    classes = read_json(require(prepared_dir / LABELS_FILE, "prepare"))["classes"]
    extractor = keras.saving.load_model(require(backbone_dir / BACKBONE_FILE, "freeze"))
    timings = {}
    started = time.perf_counter()
    views = params_views(params)
    key = cache_key(prepared_dir, backbone_dir, views, seed)
    cache_features(extractor, key, prepared_dir, features_dir, views, seed)
    timings["features"] = time.perf_counter() - started
    with atomic_dir(out_dir) as tmp, training.live_logger(tmp / LIVE_DIR) as live:
        started = time.perf_counter()
        if p.config == "seed":
            head, record = _seed_head(features_dir, len(classes), params, tmp, live)
        else:
            head, record = _chosen_head(features_dir, len(classes), params, tmp, live)
        timings["head"] = time.perf_counter() - started
        transfer = models.end_to_end(extractor, head, image_size(prepared_dir))
        f_val, y_val = load_features(features_dir, "val")
        record["val_accuracy_head_only"] = _accuracy(head, f_val, y_val)
        live.log_metric("head/val_accuracy", record["val_accuracy_head_only"], plot=False)
        decision = finetune_decision(prepared_dir, params)
        record["finetune"] = {
            "setting": params.finetune.enabled,
            "ran": decision.run,
            "kept": False,
            "estimate_s": decision.estimate_s,
            "budget_left_s": decision.budget_left_s,
            "reason": decision.reason,
            "outcome": decision.reason,  # replaced by what happened when it runs
        }
        log.info("head: fine-tuning %s", decision.reason)
        if decision.run:
            started = time.perf_counter()
            record["finetune"].update(
                finetune(transfer, extractor, prepared_dir, params, tmp, live)
            )
            timings["finetune"] = time.perf_counter() - started
            # a fresh, uncompiled wrapper around the same (tuned) layers: the saved model then
            # carries no optimizer state from fine-tuning
            transfer = models.end_to_end(extractor, head, image_size(prepared_dir))
        _record_probabilities(transfer, head, record, prepared_dir, features_dir, tmp)
        save_keras(transfer, tmp / MODEL_FILE)
        save_keras(head, tmp / "head.keras")
        write_summary(transfer, tmp / "summary.txt")
        shutil.copy(prepared_dir / LABELS_FILE, tmp / LABELS_FILE)
        write_json(tmp / TRANSFER_RECORD, record)
    write_timings(out_dir, timings)
    return Path(out_dir)


def _record_probabilities(
    transfer, head, record: dict, prepared_dir: Path, features_dir: Path, tmp: Path
) -> None:
    """The transfer model's probabilities on val and test, for select and evaluate: the head on
    the cached features (the same numbers as the end-to-end model, without its backbone pass),
    or the whole model when fine-tuning changed the backbone."""
    from headstart import training

    tuned = record.get("finetune", {}).get("kept", False)
    probabilities = {
        split: training.predict(transfer, load_split(prepared_dir, split)[0])
        if tuned
        else training.predict(head, load_features(features_dir, split)[0])
        for split in ("val", "test")
    }
    np.savez(tmp / PROBABILITIES_FILE, **probabilities)


def _seed_head(features_dir: Path, classes: int, params: Params, tmp: Path, live):
    """The seed's head exactly (`head.config: seed`): Dense units + Dropout, Keras `fit` with
    early stopping on the validation split's loss; per-epoch values to DVCLive (`live`)."""
    from headstart import models, training

    p, seed = params.head, params.base.seed
    f_train, y_train = load_features(features_dir, "train")
    if p.augment == "auto":  # the seed's recipe: plain images only, unless a policy is pinned
        images = len(y_train) // len(params_views(params))
        f_train, y_train = f_train[:images], y_train[:images]
    f_val, y_val = load_features(features_dir, "val")
    head = models.dense_head(f_train.shape[1], classes, p.units, p.dropout)
    training.compile_classifier(
        head,
        models.optimizer(p.optimizer, p.learning_rate),
        steps_per_execution=HEAD_STEPS_PER_EXECUTION,
    )
    weights = (
        training.balanced_class_weight(y_train, classes) if p.class_weight == "balanced" else None
    )
    training.fit(
        head,
        training.dataset(f_train, y_train, p.batch_size, shuffle=True, seed=seed),
        training.dataset(f_val, y_val, p.batch_size),
        "head",
        p.epochs,
        p.patience,
        p.target_accuracy,
        class_weight=weights,
        live=live,
    )
    live.log_metric("head/config", "seed", plot=False)
    return head, {"config": "seed", "selection": "pinned by head.config: seed"}


LEARNING_CURVE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _chosen_head(features_dir: Path, classes: int, params: Params, tmp: Path, live):
    """Compare the candidate heads by k-fold CV on the training features, train the chosen one
    on all of them for its best epoch count; record every score and a learning curve. DVCLive
    (`live`) gets the final head's per-epoch training values, the chosen configuration's pooled
    CV values as its per-epoch validation values, and the choice as summary values."""
    from headstart import heads, training

    p, seed = params.head, params.base.seed
    features, labels = load_features(features_dir, "train")  # memory-mapped: heads reads it
    labels = np.asarray(labels)
    views = params_views(params)
    images = len(labels) // len(views)
    folds = min(p.folds, int(np.bincount(labels[:images], minlength=classes).max()))
    common = {
        "folds": folds,
        "batch_size": p.batch_size,
        "learning_rate": p.learning_rate,
        "seed": seed,
        "classes": classes,
        "epochs": p.epochs,
        "patience": p.patience,
        "loss_patience": p.loss_patience,
    }
    rows, augmentation, linear_cv = choose_augmentation(
        features, labels, images, views, params, common
    )
    if rows is not None:
        features, labels = Rows(features)[rows], labels[rows]
    sample_weight = None
    if p.class_weight == "balanced":
        table = training.balanced_class_weight(labels, classes)
        sample_weight = np.array([table[int(y)] for y in labels], np.float32)
    configs = [c for c in heads.candidates(p.units, p.dropout) if p.config in ("auto", c.name)]
    results = []
    for config in configs:  # cheapest first: a costlier one clearly behind them is dropped early
        if config.name == "linear" and linear_cv is not None and sample_weight is None:
            result = linear_cv  # the augmentation choice already cross-validated it
        else:
            leader = heads.choose(results)[0] if results else None
            result = heads.cross_validate(
                config,
                features,
                labels,
                images,
                sample_weight=sample_weight,
                leader=leader,
                **common,
            )
        log.info(
            "head: %s: %d-fold CV accuracy %.4f at %d epochs%s",
            config.name,
            folds,
            result.score,
            result.best_epochs,
            f" ({result.dropped})" * bool(result.dropped),
        )
        results.append(result)
    chosen, reason = heads.choose(results)
    np.save(tmp / OUT_OF_FOLD_FILE, chosen.best_out_of_fold)
    reason = f"{folds}-fold CV on the training features: {reason}"
    head, history = heads.fit_final(
        chosen.config,
        features,
        labels,
        chosen.best_epochs,
        p.batch_size,
        p.learning_rate,
        seed,
        classes,
        sample_weight,
    )
    history["val_loss"] = [float(v) for v in chosen.pooled_loss[: chosen.best_epochs]]
    history["val_accuracy"] = [float(v) for v in chosen.curve[: chosen.best_epochs]]
    training.log_history(live, "head", history)
    for key, value in {
        "config": chosen.config.name,
        "cv_accuracy": float(chosen.score),
        "folds": folds,
        "epochs": chosen.best_epochs,
    }.items():
        live.log_metric(f"head/{key}", value, plot=False)
    write_json(
        tmp / HEAD_SELECTION_FILE,
        {
            "chosen": chosen.config.name,
            "reason": reason,
            "folds": folds,
            "candidates": [r.record() for r in results],
            "augment": augmentation,
        },
    )
    plain = len(labels) == images  # the learning curve is on plain views only
    linear = next((r for r in results if r.config.name == "linear" and plain), None)
    write_json(
        tmp / "learning_curve.json",
        learning_curve(features[:images], labels[:images], classes, params, linear),
    )
    log.info("head: chose %s", reason)
    return head, {
        "config": chosen.config.name,
        "selection": reason,
        "epochs": chosen.best_epochs,
        "augment": augmentation["chosen"],
        "augment_reason": augmentation["reason"],
    }


def choose_augmentation(
    features, labels, images: int, views: tuple[str, ...], params: Params, common: dict
):
    """Which augmented views the head learns from: (rows of the training features, None for
    all; the record; the linear head's CV on those rows when computed). Under `head.augment:
    auto` each policy's rows (the plain views plus that policy's) are cross-validated with the
    linear head and the best pooled CV accuracy wins, a tie going to the simpler policy (order
    of augment.POLICIES). Only plain views are scored, so a policy that changes labels (a flip
    of left/right arrows) teaches the head wrong answers and scores lower."""
    from headstart import augment, heads

    p = params.head
    if p.augment != "auto" or len(views) == 1:
        why = "pinned by head.augment" if p.augment != "auto" else "head.views 1: no augmented view"
        return None, {"chosen": views[-1], "reason": why, "policies": []}, None
    linear = heads.candidates(p.units, p.dropout)[0]
    scored = []
    for policy in augment.POLICIES:
        rows = augment.rows_of(views, policy, images)
        result = heads.cross_validate(linear, Rows(features)[rows], labels[rows], images, **common)
        log.info("head: augment %s: linear CV accuracy %.4f", policy, result.score)
        scored.append((policy, rows, result))
    policy, rows, result = max(scored, key=lambda s: (s[2].score, -augment.POLICIES.index(s[0])))
    others = ", ".join(f"{name} {r.score:.4f}" for name, _, r in scored if name != policy)
    record = {
        "chosen": policy,
        "reason": f"{common['folds']}-fold CV of the linear head, plain views scored: "
        f"{policy} {result.score:.4f} (others: {others})",
        "policies": [
            {"policy": name, "cv_accuracy": round(r.score, 6), "cv_loss": round(r.best_loss, 6)}
            for name, _, r in scored
        ],
    }
    return rows, record, result


def learning_curve(
    features: np.ndarray, labels: np.ndarray, classes: int, params: Params, full=None
) -> dict:
    """CV accuracy of the linear head at 10/25/50/100 % of the training images of each class
    (the linear head: seconds for the whole curve, and within about a point of the others).
    `full`: the linear head's CV result on all images, when already computed."""
    from headstart import heads

    p, seed = params.head, params.base.seed
    linear = heads.candidates(p.units, p.dropout)[0]
    points = {}
    rng = np.random.default_rng(seed)
    images = len(labels)
    order = rng.permutation(images)
    for fraction in LEARNING_CURVE_FRACTIONS:
        rows = np.sort(
            np.concatenate(
                [
                    order[labels[order] == c][
                        : max(2, int(np.ceil(fraction * np.sum(labels[:images] == c))))
                    ]
                    for c in range(classes)
                ]
            )
        )
        if fraction == 1.0 and full is not None:
            points["100%"] = {"images": images, "cv_accuracy": round(full.score, 6)}
            continue
        folds = min(p.folds, int(np.bincount(labels[rows], minlength=classes).max()))
        part = heads.cross_validate(
            linear,
            Rows(features)[rows],
            labels[rows],
            len(rows),
            folds=folds,
            epochs=p.epochs,
            batch_size=p.batch_size,
            learning_rate=p.learning_rate,
            seed=seed,
            classes=classes,
            patience=p.patience,
            loss_patience=p.loss_patience,
        )
        points[f"{round(fraction * 100)}%"] = {
            "images": int(len(rows)),
            "cv_accuracy": round(part.score, 6),
        }
    return {"head": linear.name, "points": points}


def _accuracy(model, x, y) -> float:
    from headstart import training

    return float(np.mean(np.argmax(training.predict(model, x), axis=1) == y)) if len(y) else 0.0


def finetune_decision(prepared_dir: Path, params: Params) -> sizing.FinetuneDecision:
    """Whether the head step fine-tunes (`finetune.enabled`; under auto, whether its estimated
    cost on this machine fits in base.budget less the estimated cost of the feature cache, with
    its views, and of the baseline at the prepared size: headstart/sizing.py)."""
    f, name = params.finetune, params.base.backbone
    counts = {s: len(np.load(prepared_dir / f"{s}_labels.npy")) for s in ("train", "val", "test")}
    size, cost = image_size(prepared_dir), sizing.RELATIVE_COST[name]
    estimate = sizing.finetune_seconds(
        size,
        counts["train"],
        counts["val"] * (f.epochs + 2) + counts["val"] + counts["test"],
        cost,
        f.epochs,
        f.blocks,
    )
    spent = sizing.estimate_seconds(
        size, sum(counts.values()), cost, views=len(params_views(params))
    )
    return sizing.finetune_decision(f.enabled, estimate, spent, params.base.budget)


def finetune(transfer, extractor, prepared_dir: Path, params: Params, tmp: Path, live) -> dict:
    """Unfreeze the top `finetune.blocks` blocks (BatchNormalization stays frozen), train on
    images at a low learning rate, and keep the result only if validation accuracy improves.
    Per-epoch values and the decision go to DVCLive (`live`) under `finetune/`."""
    import keras

    from headstart import backbones, models, training

    f = params.finetune
    x_train, y_train = load_split(prepared_dir, "train")
    x_val, y_val = load_split(prepared_dir, "val")
    before = _accuracy(transfer, x_val, y_val)
    saved = transfer.get_weights()
    finetune_dir = tmp / "finetune"
    finetune_dir.mkdir()
    strategy = training.strategy(params.base.devices)
    model, backbone = transfer, extractor
    if strategy.num_replicas_in_sync > 1:  # variables must be made in the scope: a copy, loaded
        transfer.save(finetune_dir / "before.keras")
        with strategy.scope():
            model = keras.saving.load_model(finetune_dir / "before.keras")
        (finetune_dir / "before.keras").unlink()
        backbone = model.get_layer(extractor.name)
    backbones.unfreeze_top(backbone, backbones.get(params.base.backbone), f.blocks)
    with strategy.scope():
        training.compile_classifier(model, models.optimizer("adam", f.learning_rate))
    training.fit(
        model,
        training.dataset(x_train, y_train, f.batch_size, shuffle=True, seed=params.base.seed),
        training.dataset(x_val, y_val, f.batch_size),
        "finetune",
        f.epochs,
        params.head.patience,
        params.head.target_accuracy,
        live=live,
    )
    after = _accuracy(model, x_val, y_val)
    kept = after > before
    transfer.set_weights(model.get_weights() if kept else saved)
    backbones.freeze(extractor)
    log.info(
        "finetune: val accuracy %.4f -> %.4f, %s",
        before,
        after,
        "kept" if kept else "discarded (head-only model kept)",
    )
    for key, value in {
        "val_accuracy_before": before,
        "val_accuracy_after": after,
        "kept": kept,
    }.items():
        live.log_metric(f"finetune/{key}", value, plot=False)
    return {
        "val_accuracy_before": before,
        "val_accuracy_after": after,
        "kept": kept,
        "blocks": f.blocks,
        "replicas": strategy.num_replicas_in_sync,
        "outcome": f"ran and {'kept' if kept else 'dropped'}: validation accuracy "
        f"{before:.4f} -> {after:.4f}" + ("" if kept else ", no better"),
    }


def run(params: Params, root: Path) -> Path:
    return train_head(
        params.path("prepared", root),
        params.path("backbone", root),
        params.path("features", root),
        params.path("transfer", root),
        params,
    )
