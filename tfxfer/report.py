"""What a user reads after a run: metrics, the pictures and tables, TensorBoard, a summary.

Keras' compiled metrics give loss and accuracy per batch; macro F1, the per-class report,
per-class AUC and the examples the model got most wrong need every prediction at once, so
they are computed here from `predict` output with numpy.

Every number comes out JSON-safe: a NaN or infinite value (a diverged model's loss) is
`None`, which `json.dumps` writes as `null`. Python's `json` would otherwise write a bare
`NaN`, which is not JSON, and `metrics.json` would break every strict reader.

`write_reports` writes, into a run directory (through `RunDir.file`, so the manifest lists
each entry and `--overwrite` deletes exactly these):

    training_curves.png   loss, accuracy and learning rate per global epoch, stages marked
    confusion_matrix.png  single-label: the test split's matrix (val's without a test split)
    per_class.csv         precision, recall, F1, support (and AUC, multi-label) per split
    top_losses.csv        the val split's most confidently wrong examples (test's without val)
    top_losses.png        images: the worst of them with their labels

Top losses come from the validation split on purpose: the mistakes a person studies to
change the data or the settings should not be the test set's, or the test score stops being
a fair estimate. The confusion matrix, a final judgement, is the test split's.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer import fs
from tfxfer.rundir import atomic_write_text

log = logging.getLogger(__name__)

# How many of the most confidently wrong examples `top_losses.csv` lists, and how many of
# them `top_losses.png` shows.
TOP_LOSSES = 50
TOP_LOSS_IMAGES = 16
# Labels in the pictures longer than this are shortened in the middle: the two ends of a
# name ("northern_..._warbler_f") are what tell similar long names apart.
MAX_LABEL_CHARS = 24
TOP_LOSS_COLUMNS = (
    "rank",
    "input",
    "true_label",
    "predicted_label",
    "predicted_probability",
    "true_probability",
    "loss",
)
# Clip probabilities this far from 0 and 1 before a log, as Keras' cross-entropy does.
_EPS = 1e-7


def collect(model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` over a batched `(x, y)` dataset; returns (labels, probabilities)."""
    labels, probabilities = [], []
    for x, y in dataset:
        probabilities.append(np.asarray(model(x, training=False)))
        labels.append(np.asarray(y))
    return np.concatenate(labels), np.concatenate(probabilities)


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], multi_label: bool = False
) -> dict[str, Any]:
    """Accuracy, loss, macro F1, a per-class report and the confusion matrix.

    Macro F1 averages over the classes that occur in the labels or the predictions (as
    scikit-learn's `f1_score(average="macro")` does): a class absent from both says nothing
    about the model, and counting it as F1 0 would score a perfect prediction of a test set
    without that class below 1. Its per-class row is still there, with support 0.

    Args:
        labels: array. Integer class ids, or (for multi-label) a multi-hot matrix; one-hot
            rows are accepted for single-label too.
        probabilities: array. `(n, num_classes)` model outputs.
        class_names: list[str]. Names in output order.
        multi_label: bool. Threshold each output at 0.5 instead of taking the argmax.

    Returns:
        A JSON-safe dict: NaN and infinite values (from a model that outputs NaN) are None.
    """
    eps = _EPS
    n_classes = probabilities.shape[-1]
    # NaN for an empty split (np.mean of nothing); json_safe makes it None.
    losses = example_losses(labels, probabilities, multi_label)
    loss = float(np.mean(losses)) if len(losses) else float("nan")
    auc = None
    if multi_label:
        truth = labels.astype(bool)
        predicted = probabilities >= 0.5
        accuracy = float(np.mean(truth == predicted))
        tp = (truth & predicted).sum(0)
        fp = (~truth & predicted).sum(0)
        fn = (truth & ~predicted).sum(0)
        confusion = None
        auc = [roc_auc(truth[:, i], probabilities[:, i]) for i in range(n_classes)]
    else:
        labels = _class_ids(labels)
        predicted_ids = probabilities.argmax(-1)
        accuracy = float(np.mean(predicted_ids == labels))
        confusion = np.zeros((n_classes, n_classes), dtype=int)
        np.add.at(confusion, (labels, predicted_ids), 1)
        tp = np.diag(confusion)
        fp = confusion.sum(0) - tp
        fn = confusion.sum(1) - tp
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / np.maximum(tp + fn, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, eps)
    support = (tp + fn).astype(int)
    present = (tp + fn + fp) > 0  # in the labels or the predictions
    result: dict[str, Any] = {
        "loss": loss,
        "accuracy": accuracy,
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "num_examples": int(len(labels)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
    }
    if confusion is not None:
        result["confusion_matrix"] = confusion.tolist()
    if auc is not None:
        for name, value in zip(class_names, auc, strict=True):
            result["per_class"][name]["auc"] = value
        defined = [value for value in auc if value is not None]
        # Over the classes whose AUC is defined (both positives and negatives in the split).
        result["macro_auc"] = float(np.mean(defined)) if defined else None
    return json_safe(result)


def example_losses(
    labels: np.ndarray, probabilities: np.ndarray, multi_label: bool = False
) -> np.ndarray:
    """Each example's cross-entropy: the loss the model trained on, one value per example.

    Single-label: `-log p(true class)`; multi-label: the binary cross-entropy averaged over
    the outputs, as Keras' `BinaryCrossentropy` averages it.
    """
    if multi_label:
        truth = np.asarray(labels).astype(bool)
        p = np.clip(probabilities, _EPS, 1 - _EPS)
        return -np.mean(truth * np.log(p) + (~truth) * np.log(1 - p), axis=-1)
    ids = _class_ids(labels)
    return -np.log(np.clip(probabilities[np.arange(len(ids)), ids], _EPS, 1))


def _class_ids(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    return (labels.argmax(-1) if labels.ndim == 2 else labels).astype(int)


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of one output, or None when `truth` has only one kind of label.

    The Mann-Whitney form: the chance that a random positive scores above a random negative,
    ties counting half (tied scores share their average rank).
    """
    truth = np.asarray(truth).astype(bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # The average 1-based rank of each distinct score, then of each example.
    average_rank = np.cumsum(counts) - (counts - 1) / 2
    ranks = average_rank[inverse]
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts, lists, tuples) replaced by None."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def summary_line(split: str, metrics: dict[str, Any]) -> str:
    def number(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    return (
        f"{split}: accuracy={number('accuracy')} macro_f1={number('macro_f1')} "
        f"loss={number('loss')} (n={metrics['num_examples']})"
    )


# === The reports of a finished run ===


def write_reports(
    run_dir: Any,
    history: list[dict[str, Any]],
    metrics: dict[str, dict[str, Any]],
    predictions: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    examples: dict[str, Any] | None = None,
    *,
    multi_label: bool = False,
) -> list[str]:
    """Writes the run's pictures and tables (see the module docstring); returns their paths.

    Args:
        run_dir: RunDir. Every file goes through `run_dir.file`, so its manifest lists it.
        history: list of dict. `TrainResult.history`: one row per global epoch.
        metrics: dict. Per split, what `classification_metrics` returned.
        predictions: dict. Per split, the `(labels, probabilities)` `collect` returned.
        class_names: list[str]. Output order.
        examples: dict or None. Per split, the `Examples` the predictions were made on, in
            the same order (`make_datasets` batches evaluation splits in file order). The
            labels must match the predictions' row for row, or there is no top-losses table.
        multi_label: bool. Per-class AUC in `per_class.csv` and no confusion matrix.
    """
    written = []
    if history:
        written.append(plot_training_curves(history, run_dir.file("training_curves.png")))
    if predictions:
        written.append(write_per_class(metrics, run_dir.file("per_class.csv")))
    split = _first(predictions, ("test", "val"))
    if split is not None and not multi_label:
        written.append(
            plot_confusion_matrix(
                metrics[split]["confusion_matrix"],
                class_names,
                run_dir.file("confusion_matrix.png"),
                title=f"Confusion matrix, {split} split "
                f"({metrics[split]['num_examples']} examples)",
            )
        )
    examples = {s: e for s, e in (examples or {}).items() if e is not None and s in predictions}
    split = _first(examples, ("val", "test"))
    if split is not None:
        labels, probabilities = predictions[split]
        if _same_labels(examples[split].labels, labels, multi_label):
            rows = top_losses(
                examples[split].inputs, labels, probabilities, class_names, multi_label
            )
            written.append(write_csv(run_dir.file("top_losses.csv"), TOP_LOSS_COLUMNS, rows))
            if examples[split].kind == "image" and rows:
                written.append(
                    plot_top_losses(
                        rows[:TOP_LOSS_IMAGES],
                        run_dir.file("top_losses.png"),
                        title=f"Most confidently wrong, {split} split",
                    )
                )
        else:
            log.warning(
                "No top_losses.csv: the %s examples do not line up with the %s predictions.",
                split,
                split,
            )
    return [path for path in written if path]


def _first(available: Any, order: Sequence[str]) -> str | None:
    return next((split for split in order if split in available), None)


def _same_labels(expected: np.ndarray, labels: np.ndarray, multi_label: bool) -> bool:
    """Whether the examples' labels are the predictions' labels, row for row.

    A pipeline that reordered or dropped examples would pair each input with another's
    prediction; the labels are what shows it.
    """
    if len(expected) != len(labels):
        return False
    if multi_label:
        return bool(np.array_equal(np.asarray(expected) > 0.5, np.asarray(labels) > 0.5))
    return bool(np.array_equal(_class_ids(expected), _class_ids(labels)))


def top_losses(
    inputs: Sequence[str],
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: list[str],
    multi_label: bool = False,
    k: int = TOP_LOSSES,
) -> list[dict[str, Any]]:
    """The `k` wrongly predicted examples with the highest loss, worst first, as table rows.

    Wrong is an argmax that is not the true class (multi-label: a thresholded set of labels
    that is not the true set). Among them a higher loss is a lower probability of the truth,
    so the first row is the example the model was most sure was something else.

    Multi-label rows join label names with "|"; `predicted_probability` is the highest
    output and `true_probability` the lowest output of a true label (empty without one).

    Args:
        inputs: sequence of str. Image paths or texts, in the predictions' order.
        labels: array. Class ids (or multi-hot rows), as `collect` returns them.
        probabilities: array. `(n, num_classes)` model outputs.
        class_names: list[str]. Output order.
        multi_label: bool. Threshold outputs at 0.5. Defaults to `False`.
        k: int. At most this many rows. Defaults to `TOP_LOSSES`.

    Returns:
        Dicts with the keys of `TOP_LOSS_COLUMNS`.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    losses = example_losses(labels, probabilities, multi_label)
    if multi_label:
        truth = np.asarray(labels) > 0.5
        predicted = probabilities >= 0.5
        wrong = (truth != predicted).any(axis=-1)
    else:
        ids = _class_ids(labels)
        predicted_ids = probabilities.argmax(-1)
        wrong = predicted_ids != ids
    order = [i for i in np.argsort(-losses, kind="stable") if wrong[i]][:k]
    rows = []
    for rank, i in enumerate(order, start=1):
        if multi_label:
            true_label = "|".join(n for n, t in zip(class_names, truth[i], strict=True) if t)
            predicted_label = "|".join(
                n for n, p in zip(class_names, predicted[i], strict=True) if p
            )
            predicted_probability = probabilities[i].max()
            true_probability = probabilities[i][truth[i]].min() if truth[i].any() else None
        else:
            true_label, predicted_label = class_names[ids[i]], class_names[predicted_ids[i]]
            predicted_probability = probabilities[i, predicted_ids[i]]
            true_probability = probabilities[i, ids[i]]
        rows.append(
            {
                "rank": rank,
                "input": inputs[i],
                "true_label": true_label,
                "predicted_label": predicted_label,
                "predicted_probability": _rounded(predicted_probability),
                "true_probability": _rounded(true_probability),
                "loss": _rounded(losses[i]),
            }
        )
    return rows


def _rounded(value: Any, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def write_per_class(metrics: dict[str, dict[str, Any]], path: str) -> str:
    """Writes each split's per-class precision, recall, F1 and support (and AUC) as a CSV."""
    rows = [
        {"split": split, "class": name, **{k: _csv_value(v) for k, v in row.items()}}
        for split, values in metrics.items()
        if isinstance(values, dict)
        for name, row in (values.get("per_class") or {}).items()
    ]
    columns = ["split", "class", "precision", "recall", "f1", "support"]
    if any("auc" in row for row in rows):
        columns.append("auc")
    return write_csv(path, columns, rows)


def _csv_value(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def write_csv(path: str, columns: Sequence[str], rows: list[dict[str, Any]]) -> str:
    """Writes `rows` under a header of `columns`, atomically; a gs:// path works too."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


# === Pictures ===


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


# === TensorBoard ===

# What marks a summary as a scalar for TensorBoard's scalar dashboard.
_SCALAR = tf.compat.v1.SummaryMetadata(
    plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")
)


class TensorBoardLogger(keras.callbacks.Callback):
    """Writes each epoch's losses, metrics and learning rate as TensorBoard scalars.

    The step of every value is the global epoch (Keras passes `fit`'s epoch, which
    `run_schedule` counts across stages and a resume), so one curve runs through every
    stage, and a resumed run's events continue the killed run's in the same folder.
    Training values go to `train/`, validation values to `validation/` (Keras' own layout:
    TensorBoard draws both in one chart), tagged `epoch_loss`, `epoch_accuracy`, ...,
    `epoch_learning_rate`. It acts on epochs only, so a cached stage still runs several
    steps per call (`tfxfer.train.compiling.acts_on_batches`).

    The values are written with TensorFlow's own `tf.summary.write` and the scalar plugin's
    metadata, which is what `tf.summary.scalar` writes; `tf.summary.scalar` itself comes from
    the `tensorboard` package, which a run does not need (only looking at the logs does).

    Args:
        directory: str. The folder of the event files (local or gs://).
    """

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory
        self._writers: dict[str, Any] = {}

    def on_epoch_end(self, epoch, logs=None):
        scalars: dict[str, dict[str, float]] = {"train": {}, "validation": {}}
        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            scalars[split][name] = float(value)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            scalars["train"]["learning_rate"] = float(np.asarray(optimizer.learning_rate))
        for split, values in scalars.items():
            if not values:
                continue
            if split not in self._writers:
                self._writers[split] = tf.summary.create_file_writer(fs.join(self.directory, split))
            writer = self._writers[split]
            with writer.as_default(step=epoch + 1):
                for name, value in values.items():
                    tf.summary.write(
                        f"epoch_{name}", tf.constant(value, tf.float32), metadata=_SCALAR
                    )
            writer.flush()


def tensorboard_callbacks(run_dir: Any, write: bool = True) -> list[keras.callbacks.Callback]:
    """The callbacks that log a run into `<run_dir>/tensorboard/` (none where `write` is off).

    Args:
        run_dir: RunDir or None. The entry goes through `run_dir.file` (the manifest).
        write: bool. False on the workers of a multi-worker run that write nothing.
    """
    if run_dir is None or not write:
        return []
    return [TensorBoardLogger(run_dir.file("tensorboard"))]


# === The end-of-run summary ===


def weakest_classes(split_metrics: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """The `n` classes of lowest F1 among those with examples, lowest first."""
    scored = [
        (name, row["f1"])
        for name, row in (split_metrics.get("per_class") or {}).items()
        if row.get("support") and row.get("f1") is not None
    ]
    return sorted(scored, key=lambda item: item[1])[:n]


def run_summary(
    metrics: dict[str, dict[str, Any]],
    best: dict[str, Any] | None,
    run_path: str,
    written: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> list[str]:
    """The few lines a run ends with: best epoch, scores, weakest classes, notes, where to look.

    Args:
        metrics: dict. Per split, `classification_metrics` output.
        best: dict or None. `TrainResult.best`.
        run_path: str. The run directory.
        written: sequence of str. The reports' paths (`write_reports`).
        notes: sequence of str. Warnings worth a line of their own (class imbalance).
    """
    lines = []
    if best:
        value = best.get("value")
        shown = "n/a" if value is None else f"{value:.4f}"
        lines.append(
            f"best epoch {best.get('epoch')} (stage {best.get('stage')!r}, "
            f"{best.get('monitor')}={shown})"
        )
    lines += [summary_line(split, metrics[split]) for split in ("val", "test") if split in metrics]
    split = _first(metrics, ("test", "val"))
    weakest = weakest_classes(metrics[split]) if split else []
    if weakest:
        lines.append(
            f"weakest classes by F1 ({split}): "
            + ", ".join(f"{shorten(name)} {f1:.2f}" for name, f1 in weakest)
        )
    lines += [f"note: {note}" for note in notes]
    if written:
        lines.append("reports: " + ", ".join(fs.basename(path) for path in written))
    tensorboard = fs.join(run_path, "tensorboard")
    if fs.isdir(tensorboard):
        lines.append(f"TensorBoard: tensorboard --logdir {tensorboard}")
    lines.append(f"run saved to {run_path}/")
    return ["[tfxfer] " + line for line in lines]
