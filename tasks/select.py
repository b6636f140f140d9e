"""select: baseline + transfer (+ their ensemble) compared on the validation split ->
artifacts/release/ (the model we ship).

Candidates: the baseline CNN, the transfer model (fine-tuned when fine-tuning is on and kept),
and the ensemble, the geometric mean of the two models' probabilities (the mean of their
log-probabilities, normalised: a softmax over the mean of their logits). The ensemble is released unless a
member is clearly better on validation (`choose`). The test split is never read here. The release is one end-to-end Keras
model whatever won: raw RGB image of any size in, class probabilities out (the ensemble holds
both networks).

Beside it: calibration.json (the temperature for the winner's probabilities, fitted on the
validation split), and what `headstart predict --reject` needs to answer "unknown": ood.npz and
ood.json (class centroids of the frozen backbone's training features, and the threshold that
keeps `ood.keep` of the validation images) with a copy of that backbone, backbone.keras, so the
release folder predicts on its own.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from headstart import calibration, ood
from headstart.artifacts import (
    BACKBONE_FILE,
    FEATURES_RECORD,
    LABELS_FILE,
    MODEL_FILE,
    PROBABILITIES_FILE,
    SELECTION_FILE,
    TRANSFER_RECORD,
    image_size,
    load_features,
    load_probabilities,
    load_split,
)
from headstart.errors import UserError
from headstart.files import atomic_dir, read_json, require, save_keras, write_json
from headstart.metrics import (
    classification_metrics,
    ensemble_probabilities,
    paired_standard_error,
    per_image_loss,
)
from headstart.params import Params

log = logging.getLogger("headstart.select")


# the transfer model's share in the ensemble: an equal (geometric) mean. A share tuned on the validation
# split (by accuracy, or by log-loss unless not clearly better) lost 1-2 points to the equal mean
# on held-out data in every seed measured: ~200 validation images mostly fit their noise, and the
# tuned share followed the members' calibration, not their accuracy (bench/RESULTS.md)
ENSEMBLE_SHARE = 0.5
MEMBERS = ("baseline", "transfer")


def choose(probabilities: dict[str, np.ndarray], labels: np.ndarray) -> tuple[str, str, dict]:
    """(winner, reason, per-candidate validation metrics) from validation probabilities.

    The ensemble is released unless a member's validation log-loss is lower than the ensemble's
    by more than one paired standard error (then the lowest-loss such member). On held-out data
    the mean of the two models was the best candidate or within a point of it in every small
    and mid-sized set measured, while the validation split (9-60 images a class there) could not
    tell the candidates apart: "a simpler model wins a tie within noise" released the weaker
    baseline and cost up to 7 points (bench/RESULTS.md). Log-loss, not accuracy: it uses the
    confidence of every prediction, where accuracy moves in steps of one image."""
    metrics, losses = {}, {}
    for name, p in probabilities.items():
        full, _ = classification_metrics(p, labels, [str(i) for i in range(p.shape[1])], 1)
        losses[name] = per_image_loss(p, labels)
        metrics[name] = {
            "val_accuracy": full["accuracy"],
            "val_macro_f1": full["macro_f1"],
            "val_loss": full["loss"],
        }
    ensemble = losses["ensemble"]
    for name in MEMBERS:
        error = paired_standard_error(losses[name], ensemble)
        metrics[name]["val_loss_vs_ensemble"] = float(np.mean(losses[name] - ensemble))
        metrics[name]["paired_standard_error"] = error
    better = [
        name
        for name in MEMBERS
        if -metrics[name]["val_loss_vs_ensemble"] > metrics[name]["paired_standard_error"]
    ]
    evidence = ", ".join(f"{name} {metrics[name]['val_loss']:.4f}" for name in MEMBERS)
    if better:
        winner = min(better, key=lambda name: metrics[name]["val_loss"])
        reason = (
            f"{winner}: validation log-loss {metrics[winner]['val_loss']:.4f}, lower than "
            f"the ensemble's {metrics['ensemble']['val_loss']:.4f} by more than one paired "
            "standard error"
        )
    else:
        winner = "ensemble"
        reason = (
            f"ensemble (the default): no member's validation log-loss is lower than its "
            f"{metrics['ensemble']['val_loss']:.4f} by more than one paired standard "
            f"error ({evidence})"
        )
    return winner, f"validation ({len(labels)} images): {reason}", metrics


def release_model(winner: str, baseline, transfer, image_size: int, weight: float):
    """One end-to-end model for the winner (built from built-in layers only: safe-mode loads)."""
    import keras
    from keras import layers

    if winner == "transfer":
        return transfer
    inputs = keras.Input((None, None, 3), name="image")
    resized = layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(
        inputs
    )
    if winner == "baseline":
        return keras.Model(inputs, baseline(resized, training=False), name="release_baseline")
    # the weighted geometric mean of the two (metrics.ensemble_probabilities): a softmax over
    # the weighted sum of their logits, each member's last Dense layer without its softmax
    head = transfer.get_layer("head")
    backbone = next(
        layer for layer in transfer.layers if isinstance(layer, keras.Model) and layer is not head
    )
    baseline_body = _body(baseline, "baseline")(resized, training=False)
    transfer_body = _body(head, "transfer")(backbone(resized, training=False), training=False)
    baseline_logits = _logits(baseline, "baseline")(baseline_body)
    transfer_logits = _logits(head, "transfer")(transfer_body)
    mixed = layers.Add(name="weighted_logits")(
        [
            layers.Rescaling(weight, name="transfer_share")(transfer_logits),
            layers.Rescaling(1.0 - weight, name="baseline_share")(baseline_logits),
        ]
    )
    outputs = layers.Activation("softmax", name="geometric_mean")(mixed)
    return keras.Model(inputs, outputs, name="release_ensemble")


def _body(model, name: str):
    """`model` up to the input of its last layer (the Dense softmax named "probabilities")."""
    import keras

    return keras.Model(model.inputs, model.get_layer("probabilities").input, name=f"{name}_body")


def _logits(model, name: str):
    """`model`'s last Dense layer without its softmax: the same weights, linear."""
    from keras import layers

    last = model.get_layer("probabilities")
    dense = layers.Dense(last.units, name=f"{name}_logits")
    dense.build(last.input.shape)
    dense.set_weights(last.get_weights())
    return dense


def fit_detector(
    features_dir: Path, prepared_dir: Path, classes: int, params: Params
) -> tuple[ood.Detector, dict]:
    """The OOD detector: centroids from the training features (the unaugmented view: the first
    rows, one per training image), threshold keeping `ood.keep` of the validation features."""
    f_train, y_train = load_features(features_dir, "train")
    f_val, y_val = load_features(features_dir, "val")
    train_labels = np.load(prepared_dir / "train_labels.npy")
    if not (
        np.array_equal(y_train[: len(train_labels)], train_labels)
        and np.array_equal(y_val, np.load(prepared_dir / "val_labels.npy"))
    ):
        raise UserError(
            f"{features_dir}: the feature cache does not match {prepared_dir}; "
            "run `headstart step head` first"
        )
    train_images = len(train_labels)
    detector, record = ood.fit(f_train[:train_images], train_labels, classes, params.ood.method)
    scores = detector.score(f_val)
    threshold = ood.choose_threshold(scores, params.ood.keep)
    record.update(
        keep=params.ood.keep,
        val_images=int(len(scores)),
        val_kept=float(np.mean(scores <= threshold)) if len(scores) else 1.0,
    )
    return ood.Detector(detector.method, detector.centroids, detector.whitening, threshold), record


def select(
    prepared_dir: Path | str,
    baseline_dir: Path | str,
    transfer_dir: Path | str,
    features_dir: Path | str,
    backbone_dir: Path | str,
    out_dir: Path | str,
    params: Params,
) -> Path:
    import keras

    from headstart.training import predict

    prepared_dir, baseline_dir, transfer_dir = map(Path, (prepared_dir, baseline_dir, transfer_dir))
    features_dir, backbone_dir = Path(features_dir), Path(backbone_dir)
    classes = read_json(require(prepared_dir / LABELS_FILE, "prepare"))["classes"]
    require(backbone_dir / BACKBONE_FILE, "freeze")
    require(features_dir / FEATURES_RECORD, "head")
    baseline = keras.saving.load_model(require(baseline_dir / MODEL_FILE, "baseline"))
    transfer = keras.saving.load_model(require(transfer_dir / MODEL_FILE, "head"))
    require(transfer_dir / PROBABILITIES_FILE, "head")
    x_val, y_val = load_split(prepared_dir, "val")
    probabilities = {
        "baseline": predict(baseline, x_val),
        "transfer": load_probabilities(transfer_dir, "val"),
    }
    weight = ENSEMBLE_SHARE
    probabilities["ensemble"] = ensemble_probabilities(
        probabilities["baseline"], probabilities["transfer"], weight
    )
    winner, reason, metrics = choose(probabilities, y_val)
    calibrated = calibration.fit(probabilities[winner], y_val)
    detector, detector_record = fit_detector(features_dir, prepared_dir, len(classes), params)
    finetuned = read_json(transfer_dir / TRANSFER_RECORD).get("finetune", {}).get("kept", False)
    model = release_model(winner, baseline, transfer, image_size(prepared_dir), weight)
    with atomic_dir(out_dir) as tmp:
        save_keras(model, tmp / MODEL_FILE)
        shutil.copy(prepared_dir / LABELS_FILE, tmp / LABELS_FILE)
        write_json(tmp / calibration.CALIBRATION_FILE, calibrated)
        shutil.copy(backbone_dir / BACKBONE_FILE, tmp / BACKBONE_FILE)
        ood.save(detector, tmp, detector_record)
        write_json(
            tmp / SELECTION_FILE,
            {
                "winner": winner,
                "reason": reason,
                "ensemble_transfer_weight": weight,
                "transfer_is_finetuned": finetuned,
                "candidates": metrics,
            },
        )
    log.info("select: released %s (%s)", winner, reason)
    if calibrated["note"] != "fitted":
        log.warning("select: temperature %.3f: %s", calibrated["temperature"], calibrated["note"])
    log.info(
        "select: temperature %.3f (validation NLL %.4f -> %.4f); %s OOD threshold %.4g "
        "keeps %.1f %% of validation",
        calibrated["temperature"],
        calibrated["val_nll_before"],
        calibrated["val_nll_after"],
        detector.method,
        detector.threshold,
        100 * detector_record["val_kept"],
    )
    return Path(out_dir)


def run(params: Params, root: Path) -> Path:
    return select(
        params.path("prepared", root),
        params.path("baseline", root),
        params.path("transfer", root),
        params.path("features", root),
        params.path("backbone", root),
        params.path("release", root),
        params,
    )
