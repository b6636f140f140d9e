"""Plot functions: data in, matplotlib Figure out. The caller saves and closes."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def training_curves(histories: dict[str, dict[str, list[float]]]) -> Figure:
    """Training and validation accuracy (top) and loss (bottom), one column per model."""
    names = list(histories)
    figure = Figure(figsize=(5.5 * len(names), 7), layout="constrained")
    axes = figure.subplots(2, len(names), squeeze=False)
    for column, name in enumerate(names):
        history = histories[name]
        epochs = np.arange(1, len(history.get("loss", [])) + 1)
        for row, metric in enumerate(("accuracy", "loss")):
            ax = axes[row, column]
            ax.plot(epochs, history.get(metric, []), "o-", label=f"training {metric}")
            ax.plot(epochs, history.get(f"val_{metric}", []), "s--", label=f"validation {metric}")
            ax.set_title(f"{name}: training and validation {metric}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend()
    return figure


def confusion_matrix(matrix: list[list[int]], classes: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix with class names on both axes."""
    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = max(5.0, 0.55 * len(classes) + 2)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j]:
                color = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(
                    j,
                    i,
                    f"{normalised[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=color,
                )
    figure.colorbar(image, ax=ax, fraction=0.046)
    return figure


def sample_predictions(
    pictures: np.ndarray, true: list[str], predicted: list[str], title: str
) -> Figure:
    """A grid of test images titled predicted/true; wrong predictions in red."""
    n = len(pictures)
    columns = min(n, 4) or 1
    rows = max(1, -(-n // columns))
    figure = Figure(figsize=(2.6 * columns, 2.8 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= n:
            continue
        ax.imshow(pictures[index])
        right = true[index] == predicted[index]
        ax.set_title(
            f"pred: {predicted[index]}\ntrue: {true[index]}",
            fontsize=8,
            color="black" if right else "red",
        )
        if not right:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("red")
                spine.set_linewidth(3)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(title)
    return figure


def learning_curve(points: dict[str, dict], head: str) -> Figure:
    """CV accuracy against the number of training images: is more data worth collecting?"""
    images = [point["images"] for point in points.values()]
    accuracy = [point["cv_accuracy"] for point in points.values()]
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    ax.plot(images, accuracy, "o-")
    for label, x, y in zip(points, images, accuracy, strict=True):
        ax.annotate(
            f"{label}: {y:.3f}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel("cross-validated accuracy")
    ax.set_title(f"learning curve ({head} head on the frozen backbone's features)")
    ax.grid(alpha=0.3)
    return figure


def reliability_diagram(before: dict, after: dict, temperature: float) -> Figure:
    """Accuracy against confidence per bin (`calibration.reliability` tables), before and after
    temperature scaling, with each bin's image count; the diagonal is perfect calibration."""
    figure = Figure(figsize=(11, 4.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    titles = ("uncalibrated", f"temperature scaled (T = {temperature:.2f})")
    for ax, table, title in zip(axes, (before, after), titles, strict=True):
        edges = np.asarray(table["edges"])
        width = edges[1] - edges[0]
        filled = [i for i, n in enumerate(table["counts"]) if n]
        left = edges[filled]
        accuracy = [table["accuracy"][i] for i in filled]
        confidence = [table["confidence"][i] for i in filled]
        ax.bar(
            left,
            accuracy,
            width=width,
            align="edge",
            edgecolor="black",
            color="tab:blue",
            alpha=0.8,
            label="accuracy",
        )
        ax.scatter(
            left + width / 2,
            confidence,
            marker="_",
            s=250,
            linewidths=2.5,
            color="tab:red",
            zorder=3,
            label="mean confidence",
        )
        for i, x in zip(filled, left, strict=True):
            ax.annotate(
                str(table["counts"][i]),
                (x + width / 2, max(table["accuracy"][i], table["confidence"][i])),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=7,
            )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("confidence (top probability); numbers: test images per bin")
        ax.set_title(f"{title}: ECE {table['ece']:.4f}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("accuracy")
    figure.suptitle(f"release: reliability on the test split ({before['bins']} bins)")
    return figure


def contact_sheet(
    pictures: list[np.ndarray], captions: list[str], title: str, columns: int = 6
) -> Figure:
    """A grid of images, each with its caption (the data doctor's suspects, near-duplicates)."""
    n = len(pictures)
    columns = min(n, columns) or 1
    rows = max(1, -(-n // columns))
    figure = Figure(figsize=(2.2 * columns, 2.5 * rows + 0.4), layout="constrained")
    for index, ax in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        ax.axis("off")
        if index < n:
            ax.imshow(pictures[index])
            ax.set_title(captions[index], fontsize=7)
    figure.suptitle(title)
    return figure
