"""The pictures of a run's reports: training curves, confusion matrix, top losses.

Drawn on a bare matplotlib `Figure` (no pyplot), and without matplotlib a run still
succeeds, with no pictures.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
import tensorflow as tf

from tfxfer import fs

# Labels in the pictures longer than this are shortened in the middle: the two ends of a
# name ("northern_..._warbler_f") are what tell similar long names apart.
MAX_LABEL_CHARS = 24


def shorten(name: Any, limit: int = MAX_LABEL_CHARS) -> str:
    """`name` cut to `limit` characters in the middle ("a_very_lon…name_17"), for a label."""
    name = str(name)
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    return name[: limit - 1 - tail] + "…" + name[-tail:]


def _figure(**options: Any):
    """A matplotlib `Figure`, or None without matplotlib (a run without plots still succeeds).

    A bare `Figure`, not pyplot: no global backend to switch, which in a notebook would
    break the user's own inline plots, and nothing to close.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(layout="constrained", **options)


def _save_figure(figure: Any, path: str) -> str:
    # Rendered to bytes and written through fs, so a gs:// run directory works too.
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    fs.makedirs(fs.dirname(path) if fs.is_url(path) else os.path.dirname(os.path.abspath(path)))
    fs.write_bytes(path, image.getvalue())
    return path


def plot_confusion_matrix(
    confusion: Any, class_names: list[str], path: str, title: str = "Confusion matrix"
) -> str | None:
    """Saves a confusion matrix: counts in the cells, colour by share of the true class.

    The colour is row-normalised, so a small class's recall is as visible as a large one's;
    the counts say how many examples that is. The figure grows with the number of classes
    (0.4 inch each) and long names are shortened in the middle, so 20 classes with long
    names stay legible.

    Args:
        confusion: array. `(n, n)` counts, true class by row, predicted class by column.
        class_names: list[str]. The n names.
        path: str. Where the PNG goes (local or gs://).
        title: str. Say which split it is. Defaults to `"Confusion matrix"`.

    Returns:
        `path`, or None without matplotlib.
    """
    counts = np.asarray(confusion, dtype=int)
    n = len(class_names)
    side = max(4.0, 0.4 * n + 2.5)
    figure = _figure(figsize=(side + 1.5, side))
    if figure is None:
        return None
    ax = figure.subplots()
    totals = counts.sum(axis=1)
    share = counts / np.maximum(totals[:, None], 1)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    names = [shorten(name) for name in class_names]
    fontsize = 10 if n <= 10 else 8 if n <= 25 else 6
    rotate = n > 4 or max(map(len, names), default=0) > 8
    ax.set_xticks(
        range(n),
        names,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
        fontsize=fontsize,
    )
    ax.set_yticks(
        range(n),
        [f"{name} ({int(t)})" for name, t in zip(names, totals, strict=True)],
        fontsize=fontsize,
    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (examples)")
    if n <= 40:  # beyond that the cells are too small for numbers
        for i in range(n):
            for j in range(n):
                if counts[i, j] or i == j:
                    ax.text(
                        j,
                        i,
                        str(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ax.set_title(title)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's examples")
    return _save_figure(figure, path)


def plot_training_curves(
    history: list[dict[str, Any]], path: str, accuracy_label: str = "accuracy"
) -> str | None:
    """Saves loss, accuracy and learning rate over global epochs, each stage marked and named.

    Args:
        history: list of dict. One row per epoch, as `TrainResult.history` holds them:
            "epoch" (global), "stage", the metrics ("loss", "val_loss", ...) and
            "learning_rate" (its value after the epoch's last step).
        path: str. Where the PNG goes (local or gs://).
        accuracy_label: str. What the accuracy panel measures (pretraining: the masked-token
            or contrastive accuracy). Defaults to `"accuracy"`.

    Returns:
        `path`, or None without matplotlib.
    """
    epochs = [int(row["epoch"]) for row in history]
    panels: list[tuple[str, list[str]]] = [("loss", ["loss"])]
    scores = [k for k in ("accuracy", "auc") if _column(history, k) or _column(history, f"val_{k}")]
    if scores:
        panels.append((accuracy_label if scores == ["accuracy"] else "accuracy, AUC", scores))
    rates = _column(history, "learning_rate") or _column(history, "lr")
    figure = _figure(figsize=(4.6 * (len(panels) + bool(rates)), 3.8))
    if figure is None:
        return None
    axes = list(figure.subplots(1, len(panels) + bool(rates), squeeze=False)[0])
    for ax, (label, keys) in zip(axes, panels, strict=False):
        for key in keys:
            for prefix, split in (("", "train"), ("val_", "val")):
                values = _column(history, prefix + key)
                if values:
                    name = split if len(keys) == 1 else f"{split} {key}"
                    ax.plot(epochs, values, marker="o", label=name)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    if rates:
        ax = axes[-1]
        ax.plot(epochs, rates, marker="o", color="tab:green")
        positive = [rate for rate in rates if rate is not None and rate > 0]
        if positive and len(positive) == len([r for r in rates if r is not None]):
            ax.set_yscale("log")
        elif positive:
            # A cosine decay ends a stage at exactly 0, which a log axis cannot show:
            # logarithmic down to the smallest rate, linear from there to 0.
            ax.set_yscale("symlog", linthresh=min(positive))
        ax.set_ylabel("learning rate (end of epoch)")
    spans = _stage_spans(history)
    for ax in axes:
        _mark_stages(ax, spans)
    figure.suptitle("Training curves", fontsize=11)
    return _save_figure(figure, path)


def _column(history: list[dict[str, Any]], key: str) -> list[float | None]:
    """`key` of every row as a float (None where missing), or [] when no row has it."""
    values = [row.get(key) for row in history]
    values = [None if v is None or v == "" else float(v) for v in values]
    return values if any(v is not None for v in values) else []


def _stage_spans(history: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(stage name, first epoch, last epoch) of each run of rows of one stage."""
    spans: list[tuple[str, int, int]] = []
    for row in history:
        epoch, name = int(row["epoch"]), str(row.get("stage", ""))
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], epoch)
        else:
            spans.append((name, epoch, epoch))
    return spans


def _mark_stages(ax: Any, spans: list[tuple[str, int, int]]) -> None:
    """Dashed lines between stages, every other stage shaded, names above the panel."""
    from matplotlib.ticker import MaxNLocator

    for index, (name, first, last) in enumerate(spans):
        if index:
            ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=1)
        if index % 2:
            ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.08, linewidth=0)
        ax.text(
            (first + last) / 2,
            1.01,
            shorten(name, 16),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="dimgrey",
        )
    if spans:
        ax.set_xlim(spans[0][1] - 0.5, spans[-1][2] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def plot_top_losses(rows: list[dict[str, Any]], path: str, title: str) -> str | None:
    """Saves a grid of the images in `rows` (from `top_losses`), captioned true / predicted (p).

    Returns:
        `path`, or None without matplotlib.
    """
    columns = min(4, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure = _figure(figsize=(2.5 * columns, 2.8 * lines + 0.4))
    if figure is None:
        return None
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, rows, strict=False):
        image = _thumbnail(row["input"])
        if image is None:
            ax.text(0.5, 0.5, "(unreadable)", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(image)
        ax.set_title(
            # 18 characters a name: the longest caption still fits its 2.5-inch tile.
            f"{row['rank']}. true: {shorten(row['true_label'], 18)}\n"
            f"predicted: {shorten(row['predicted_label'] or '(none)', 18)} "
            f"({row['predicted_probability']:.2f})",
            fontsize=8,
        )
    figure.suptitle(f"{title}: true / predicted (probability)", fontsize=10)
    return _save_figure(figure, path)


def _thumbnail(path: str, size: int = 128) -> np.ndarray | None:
    """The image at `path`, at most `size` pixels a side, or None if it cannot be read."""
    try:
        image = tf.io.decode_image(fs.read_bytes(path), channels=3, expand_animations=False)
    except (OSError, ValueError, tf.errors.OpError):
        return None
    image = tf.image.resize(image, (size, size), preserve_aspect_ratio=True, antialias=True)
    return np.clip(np.asarray(image), 0, 255).astype(np.uint8)


def plot_ranking(ranking: dict[str, Any], path: str) -> str | None:
    """`tfxfer rank`'s bar chart: each scored candidate's score, best at the top."""
    rows = [r for r in ranking["candidates"] if r.get("score") is not None]
    figure = _figure(figsize=(7, 1.2 + 0.45 * max(len(rows), 1)))
    if figure is None or not rows:
        return None
    axes = figure.add_subplot()
    names = [shorten(r["backbone"], 40) for r in rows][::-1]
    scores = [r["score"] for r in rows][::-1]
    # Bars start a little below the lowest score, not at 0: scores may all be negative
    # (LogME often is), and the best must have the longest bar.
    low, high = min(scores), max(scores)
    span = (high - low) or abs(high) or 1.0
    base = low - 0.15 * span
    bars = axes.barh(names, [score - base for score in scores], left=base, color="#4c72b0")
    bars[-1].set_color("#dd8452")  # the winner
    for bar, score in zip(bars, scores, strict=True):
        axes.text(score, bar.get_y() + bar.get_height() / 2, f" {score:.4g}", va="center")
    axes.set_xlim(base, high + 0.25 * span)
    axes.set_xlabel(f"{ranking['metric']} (higher is better)")
    axes.set_title(f"Transferability of {len(rows)} candidate backbones (best in orange)")
    return _save_figure(figure, path)
