"""Metrics of a classifier from every prediction at once: F1, per-class report, AUC, losses.

Keras' compiled metrics give loss and accuracy per batch; macro F1, the per-class report,
per-class AUC and the examples the model got most wrong need every prediction at once, so
they are computed here from `predict` output with numpy.

Every number comes out JSON-safe: a NaN or infinite value (a diverged model's loss) is
`None`, which `json.dumps` writes as `null`. Python's `json` would otherwise write a bare
`NaN`, which is not JSON, and `metrics.json` would break every strict reader.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

# Clip probabilities this far from 0 and 1 before a log, as Keras' cross-entropy does.
_EPS = 1e-7


def collect(model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` over a batched `(x, y)` dataset; returns (labels, probabilities).

    One compiled forward pass (`reduce_retracing`: text batches of several lengths share a
    trace): called eagerly, op by op, MiniLM took 22 s for 448 texts of a default run's
    evaluation (`benchmarks/run_phases.py`).
    """
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    labels, probabilities = [], []
    for x, y in dataset:
        probabilities.append(np.asarray(forward(x)))
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
        labels = class_ids(labels)
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
    ids = class_ids(labels)
    return -np.log(np.clip(probabilities[np.arange(len(ids)), ids], _EPS, 1))


def class_ids(labels: np.ndarray) -> np.ndarray:
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
