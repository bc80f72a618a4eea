"""The tables of a run's reports: per_class.csv and top_losses.csv (the most confidently wrong).

Top losses come from the validation split on purpose: the mistakes a person studies to
change the data or the settings should not be the test set's, or the test score stops being
a fair estimate.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfxfer.fs import atomic_write_text
from tfxfer.report.metrics import class_ids, example_losses

# How many of the most confidently wrong examples `top_losses.csv` lists.
TOP_LOSSES = 50
TOP_LOSS_COLUMNS = (
    "rank",
    "input",
    "true_label",
    "predicted_label",
    "predicted_probability",
    "true_probability",
    "loss",
)


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
        ids = class_ids(labels)
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
