"""`finish_run`: the end of every run: evaluate each split, then save, export and report.

What a finished run directory holds: `metrics.json`, `class_names.json`, `best.json` and
`stages.json` (when the run had them), `model.keras`, `export/` (a SavedModel that takes raw
inputs) and the reports (`tfxfer.report.write_reports`): training curves, confusion matrix,
per-class table, top losses.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

from tfxfer import export, report
from tfxfer.data.examples import Examples
from tfxfer.fusion import fusion_summary
from tfxfer.rundir import RunDir
from tfxfer.train import TrainResult

log = logging.getLogger(__name__)


def finish_run(
    run_dir: RunDir,
    model: keras.Model,
    result: TrainResult,
    class_names: list[str],
    eval_sets: dict[str, tf.data.Dataset | None],
    *,
    examples: dict[str, Examples | None] | None = None,
    multi_label: bool = False,
    serving_model: keras.Model | None = None,
    export_saved_model: bool = True,
    write: bool = True,
    notes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluates every split; saves the model, the export, the class names and the reports.

    The reports (`tfxfer.report.write_reports`): training curves, confusion matrix,
    per-class table, top losses; then a few lines of summary in the terminal.

    Args:
        run_dir: RunDir. Where everything goes.
        model: keras.Model. The trained model (as trained: it may take tokenized input).
        result: TrainResult. From `run_schedule`.
        class_names: list[str]. Output order.
        eval_sets: dict. Split name to batched `(x, y)` dataset or None, e.g.
            {"val": ..., "test": ...}.
        examples: dict or None. Split name to the `Examples` its dataset was made from, in
            the same order (`make_datasets` keeps file order), for `top_losses.csv`.
            Defaults to none (no top-losses table).
        multi_label: bool. Threshold outputs instead of argmax.
        serving_model: keras.Model or None. What to save and export if it differs from
            `model` (a text model wrapped with its tokenizer). Defaults to `model`.
        export_saved_model: bool. Write `export/`. Defaults to `True`.
        write: bool. False on non-chief workers of a multi-worker run: evaluate, write nothing.
        notes: list[str] or None. Lines for the summary (a class-imbalance warning).
        extra: dict or None. More top-level entries for `metrics.json` (the ranking of
            `--backbone auto`).

    Returns:
        The metrics per split, as written to `metrics.json`.
    """
    metrics, predictions = _evaluate(model, eval_sets, class_names, multi_label)
    if not metrics:
        log.warning(
            "Nothing was evaluated: the run had no validation or test examples, so "
            "metrics.json holds no scores. Pass test data (--test / --test-dir) or a "
            "--val-split above 0 to score the model."
        )
    if not write:
        for split, values in metrics.items():
            print("[tfxfer] " + report.summary_line(split, values), flush=True)
        return metrics
    written = report.write_reports(
        run_dir,
        result.history,
        metrics,
        predictions,
        class_names,
        examples=examples,
        multi_label=multi_label,
    )
    metrics.update(extra or {})  # after the reports, which read the splits only
    _write_results(run_dir, model, result, metrics, class_names)
    to_save = serving_model or model
    export.save_model(to_save, run_dir.file("model.keras"))
    if export_saved_model:
        export.export_saved_model(to_save, run_dir.file("export"))
    for line in report.run_summary(metrics, result.best, run_dir.path, written, notes or []):
        print(line, flush=True)
    return metrics


def _evaluate(
    model: keras.Model,
    eval_sets: dict[str, tf.data.Dataset | None],
    class_names: list[str],
    multi_label: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The metrics and the `(labels, probabilities)` of every split that has a dataset."""
    metrics, predictions = {}, {}
    for split, dataset in eval_sets.items():
        if dataset is None:
            continue
        labels, probabilities = predictions[split] = report.collect(model, dataset)
        metrics[split] = report.classification_metrics(
            labels, probabilities, class_names, multi_label
        )
    return metrics, predictions


def _write_results(
    run_dir: RunDir,
    model: keras.Model,
    result: TrainResult,
    metrics: dict[str, Any],
    class_names: list[str],
) -> None:
    """`metrics.json` (with the model selection and the fusion's weights), `class_names.json`,
    and `best.json` / `stages.json` when training made them."""
    if result.selection:
        metrics["selection"] = result.selection
    fused = fusion_summary(model)
    if fused:
        metrics["fusion"] = fused
        print(f"[tfxfer] fusion: {fused}", flush=True)
    run_dir.write_json("metrics.json", metrics)
    run_dir.write_json("class_names.json", class_names)
    if result.best:
        run_dir.write_json("best.json", result.best)
    if result.stages:
        run_dir.write_json("stages.json", result.stages)
