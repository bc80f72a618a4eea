"""The steps every recipe shares before and after training.

Before: open the run directory (refusing to overwrite an earlier run), record the resolved
config. After: evaluate each split into `metrics.json`, save `model.keras`, export a
SavedModel, plot the curves. Recipes stay short stories because these live here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from typing import Any

import keras
import tensorflow as tf

from tfxfer import export, report
from tfxfer.rundir import RunDir
from tfxfer.train import TrainResult

log = logging.getLogger(__name__)


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def open_run(output_dir: str, config: dict[str, Any], *, overwrite: bool, resume: bool,
             extra: dict[str, Any] | None = None, write: bool = True) -> RunDir:
    """Opens the run directory and writes `config.json` (the resolved config plus facts)."""
    run_dir = RunDir(output_dir, overwrite=overwrite, resume=resume, write=write)
    if write and not run_dir.resumed:
        run_dir.write_json("config.json", {
            **config, **(extra or {}),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                         "python": platform.python_version()},
        })
    return run_dir


def finish_run(
    run_dir: RunDir,
    model: keras.Model,
    result: TrainResult,
    class_names: list[str],
    eval_sets: dict[str, tf.data.Dataset],
    *,
    multi_label: bool = False,
    serving_model: keras.Model | None = None,
    export_saved_model: bool = True,
    write: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluates every split, then saves the model, the export, the class names and the plots.

    Args:
        run_dir: RunDir. Where everything goes.
        model: keras.Model. The trained model (as trained: it may take tokenized input).
        result: TrainResult. From `run_schedule`.
        class_names: list[str]. Output order.
        eval_sets: dict. Split name to batched `(x, y)` dataset, e.g. {"val": ..., "test": ...}.
        multi_label: bool. Threshold outputs instead of argmax.
        serving_model: keras.Model or None. What to save and export if it differs from
            `model` (a text model wrapped with its tokenizer). Defaults to `model`.
        export_saved_model: bool. Write `export/`. Defaults to `True`.
        write: bool. False on non-chief workers of a multi-worker run: evaluate, write nothing.

    Returns:
        The metrics per split, as written to `metrics.json`.
    """
    metrics = {}
    for split, dataset in eval_sets.items():
        if dataset is None:
            continue
        labels, probabilities = report.collect(model, dataset)
        metrics[split] = report.classification_metrics(labels, probabilities, class_names, multi_label)
        print("[tfxfer] " + report.summary_line(split, metrics[split]), flush=True)
    if not write:
        return metrics
    run_dir.write_json("metrics.json", metrics)
    run_dir.write_json("class_names.json", class_names)
    if result.best:
        run_dir.write_json("best.json", result.best)
    to_save = serving_model or model
    export.save_model(to_save, run_dir.file("model.keras"))
    if export_saved_model:
        export.export_saved_model(to_save, run_dir.file("export"))
    if result.history:
        report.plot_history(result.history, run_dir.file("curves.png"))
    print(f"[tfxfer] run saved to {run_dir.path}{os.sep}", flush=True)
    return metrics


class Session:
    """One run's distribution context: strategy, precision policy and batch sizes.

    Args:
        strategy: str. A strategy name for `tfxfer.distribute.get_strategy`. Defaults to "auto".
        mixed_precision: str. "auto", "float32", "mixed_float16" or "mixed_bfloat16".
        per_replica_batch_size: int. Batch size per replica, as in configs.
        scale_learning_rate: bool. Multiply learning rates by global batch / per-replica batch
            (linear scaling). Defaults to `False`.
    """

    def __init__(self, strategy: str = "auto", mixed_precision: str = "auto",
                 per_replica_batch_size: int = 32, scale_learning_rate: bool = False):
        from tfxfer import distribute, keras_compat

        self.strategy = distribute.get_strategy(strategy)
        # Keras 3.15's fit fails under MultiWorkerMirroredStrategy; a no-op elsewhere.
        keras_compat.patch_keras_for_multi_worker()
        self.policy = distribute.mixed_precision_policy(mixed_precision, self.strategy)
        distribute.apply_mixed_precision(self.policy)
        self.per_replica_batch_size = int(per_replica_batch_size)
        self.global_batch_size = distribute.global_batch_size(self.per_replica_batch_size,
                                                              self.strategy)
        self.lr_scale = (self.global_batch_size / self.per_replica_batch_size
                         if scale_learning_rate else 1.0)
        self._description = distribute.describe(self.strategy)

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run's files (only one worker of a cluster does)."""
        return bool(self._description["is_chief"])

    def scope(self):
        return self.strategy.scope()

    def describe(self) -> dict[str, Any]:
        return {"distribution": {**self._description, "mixed_precision": self.policy,
                                 "per_replica_batch_size": self.per_replica_batch_size,
                                 "global_batch_size": self.global_batch_size,
                                 "learning_rate_scale": self.lr_scale}}


def validate_config(config: Any) -> None:
    """Checks the fields recipes' `Config`s share, and names every bad one at once.

    Catching a negative epoch count or a misspelt strategy before any model is built saves
    a user the minutes a backbone takes to load; a recipe's `Config.validate` calls this.
    """
    from tfxfer.distribute import MIXED_PRECISION_POLICIES, STRATEGY_NAMES

    values = config_dict(config)
    problems = []

    def check(name: str, ok, expected: str) -> None:
        if name in values and values[name] is not None and not ok(values[name]):
            problems.append(f"{name}={values[name]!r} (expected {expected})")

    positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    for name in ("batch_size", "image_size", "sequence_length", "lora_rank"):
        check(name, positive_int, "a positive integer")
    for name in ("head_epochs", "finetune_epochs"):
        check(name, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    for name in ("head_learning_rate", "finetune_learning_rate"):
        check(name, lambda v: v > 0, "> 0")
    check("val_split", lambda v: 0 <= v < 1, "in [0, 1)")
    check("dropout", lambda v: 0 <= v < 1, "in [0, 1)")
    check("layerwise_lr_decay", lambda v: 0 < v <= 1, "in (0, 1]")
    check("unfreeze", lambda v: str(v) == "all" or str(v).isdigit(), "'all' or a number of groups")
    check("strategy", lambda v: v in STRATEGY_NAMES, f"one of {STRATEGY_NAMES}")
    check("mixed_precision", lambda v: v in ("auto", *MIXED_PRECISION_POLICIES),
          f"one of {('auto', *MIXED_PRECISION_POLICIES)}")
    if values.get("head_epochs") == 0 and values.get("finetune_epochs") == 0:
        problems.append("head_epochs and finetune_epochs are both 0 (nothing would train)")
    if values.get("overwrite") and values.get("resume"):
        problems.append("overwrite and resume are both set (pick one)")
    if problems:
        from tfxfer.errors import TfxferError

        raise TfxferError(f"Invalid {type(config).__name__}: " + "; ".join(problems) + ".")
