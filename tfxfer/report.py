"""Metrics a user reads after a run: accuracy, macro F1, per-class report, confusion matrix.

Keras' compiled metrics give loss and accuracy per batch; macro F1 and the per-class report
need every prediction at once, so they are computed here from `predict` output with numpy.

Every number comes out JSON-safe: a NaN or infinite value (a diverged model's loss) is
`None`, which `json.dumps` writes as `null`. Python's `json` would otherwise write a bare
`NaN`, which is not JSON, and `metrics.json` would break every strict reader.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
import tensorflow as tf

from tfxfer import fs


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
    eps = 1e-7
    n_classes = probabilities.shape[-1]
    if multi_label:
        truth = labels.astype(bool)
        predicted = probabilities >= 0.5
        p = np.clip(probabilities, eps, 1 - eps)
        loss = float(-np.mean(truth * np.log(p) + (~truth) * np.log(1 - p)))
        accuracy = float(np.mean(truth == predicted))
        tp = (truth & predicted).sum(0)
        fp = (~truth & predicted).sum(0)
        fn = (truth & ~predicted).sum(0)
        confusion = None
    else:
        if labels.ndim == 2:
            labels = labels.argmax(-1)
        labels = labels.astype(int)
        predicted_ids = probabilities.argmax(-1)
        loss = float(
            -np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], eps, 1)))
        )
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
    return json_safe(result)


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


def plot_history(history: list[dict[str, Any]], path: str) -> str | None:
    """Saves loss and accuracy curves over global epochs, with stage boundaries marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are a nicety; a run without matplotlib still succeeds
        return None
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key in (metric, f"val_{metric}"):
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=key)
        stages = [row["stage"] for row in history]
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(epochs[i] - 0.5, color="grey", linestyle="--")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    # Rendered to bytes and written through fs, so a gs:// run directory works too.
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    fs.makedirs(fs.dirname(path) if fs.is_url(path) else os.path.dirname(os.path.abspath(path)))
    fs.write_bytes(path, image.getvalue())
    return path
