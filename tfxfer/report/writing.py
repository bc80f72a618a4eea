"""Writing the reports of a finished run, and the few lines it ends with.

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

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfxfer import fs
from tfxfer.report.metrics import class_ids, summary_line
from tfxfer.report.plots import (
    plot_confusion_matrix,
    plot_top_losses,
    plot_training_curves,
    shorten,
)
from tfxfer.report.tables import TOP_LOSS_COLUMNS, top_losses, write_csv, write_per_class

log = logging.getLogger(__name__)

# How many of the top losses `top_losses.png` shows.
TOP_LOSS_IMAGES = 16


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
    return bool(np.array_equal(class_ids(expected), class_ids(labels)))


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
