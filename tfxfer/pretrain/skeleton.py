"""The pretraining skeleton: the fields every pretraining recipe shares, and the one way it runs.

Pretraining is one more stage for the machinery fine-tuning already has: a `Stage` that trains
every backbone group together with an objective's own head (a masked-LM head, a projection
head), run by `run_schedule` under a `tf.distribute` strategy, with a checkpoint after every
epoch, resume, a run directory and its manifest. What differs between objectives is what the
recipe's `build_task` returns (`PretrainTask`): the model to train, its loss and metrics, the
training and held-out pipelines, and `finish`, which measures the result and writes what the
fine-tuning recipes read (a keras-hub preset directory, a weights file) into the run.

```python
@dataclass
class Config(PretrainConfig):
    corpus: str = ""  # unlabelled texts

def main(config: Config) -> dict:
    return run_pretraining(config, build_data, build_task)
```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import keras
import tensorflow as tf

from tfxfer import report
from tfxfer.backbones.base import Backbone
from tfxfer.configfile import to_document
from tfxfer.data.pipeline import TrainData
from tfxfer.errors import TfxferError
from tfxfer.flags import FlagConfig
from tfxfer.recipe import (
    backbone_info,
    keeping_dtype_policy,
    open_run,
    output_dir_problem,
    start_run,
)
from tfxfer.rundir import RunDir
from tfxfer.schedule import Stage
from tfxfer.train import TrainResult, run_schedule

# What every pretraining recipe's smoke config sets: tiny and fast, for tests.
SMOKE_SETTINGS = {"batch_size": 4, "epochs": 1, "verbose": 0}


@dataclass
class PretrainConfig(FlagConfig):
    """The fields every pretraining recipe shares; a recipe's `Config` adds its own."""

    output_dir: str = "runs/pretrain"  # the run directory; what the recipe writes goes inside it
    backbone: str = ""  # the backbone to pretrain (a name, preset, local directory or earlier run)
    epochs: int = 3  # passes over the unlabelled data
    batch_size: int = 32  # per replica; the global batch is this times the replicas
    learning_rate: float = 1e-4  # peak learning rate (linear warmup, then cosine decay)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    warmup_fraction: float = 0.1  # share of the steps over which the rate warms up from zero
    val_fraction: float = 0.1  # share of the unlabelled data held out to measure the objective
    seed: int = 0  # seeds the split, the heads' initialisation, shuffling and masking
    strategy: str = "auto"  # auto | cpu | one_device | mirrored | multi_worker | tpu
    mixed_precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    scale_learning_rate: bool = False  # multiply the learning rate by the number of replicas
    overwrite: bool = False  # replace the files an earlier run wrote in output_dir
    resume: bool = False  # continue the run in output_dir from its last complete epoch
    verbose: int | None = None  # 0 silent, 1 bar, 2 a line per epoch; none: a bar on a terminal
    quiet: bool = False  # only warnings, errors and the end-of-run summary

    SMOKE_SETTINGS: ClassVar[dict[str, Any]] = SMOKE_SETTINGS
    # Whether BatchNormalization layers update their statistics while pretraining (a
    # backbone pretrained from random weights has none worth keeping).
    TRAIN_BATCHNORM: ClassVar[bool] = False

    def problems(self) -> list[str]:
        """Every invalid value, as "name=value (expected ...)"; a recipe extends the list."""
        from tfxfer.distribute import MIXED_PRECISION_POLICIES, STRATEGY_NAMES

        found: list[str] = []
        check = self.checker(found)

        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        check("epochs", positive_int, "a positive integer")
        check("batch_size", positive_int, "a positive integer")
        check("seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        check(
            "learning_rate",
            lambda v: number(v) and math.isfinite(v) and v > 0,
            "a finite number > 0",
        )
        check("weight_decay", lambda v: number(v) and math.isfinite(v) and v >= 0, "a number >= 0")
        check("warmup_fraction", lambda v: number(v) and 0 <= v < 1, "in [0, 1)")
        check("val_fraction", lambda v: number(v) and 0 <= v < 1, "in [0, 1)")
        if not str(self.backbone).strip():
            found.append("backbone='' (expected the backbone to pretrain)")
        elif "," in str(self.backbone):
            found.append(f"backbone={self.backbone!r} (pretraining takes one backbone)")
        check("strategy", lambda v: v in STRATEGY_NAMES, f"one of {STRATEGY_NAMES}")
        modes = ("auto", *MIXED_PRECISION_POLICIES)
        check("mixed_precision", lambda v: v in modes, f"one of {modes}")
        if self.overwrite and self.resume:
            found.append("overwrite and resume are both set (pick one)")
        if not str(self.output_dir).strip():
            found.append("output_dir='' (expected a directory)")
        else:
            problem = output_dir_problem(str(self.output_dir))
            if problem:
                found.append(problem)
        return found

    def validate(self) -> PretrainConfig:
        """Raises `TfxferError` naming every invalid field at once; returns the config."""
        found = self.problems()
        if found:
            raise TfxferError(f"Invalid {type(self).__name__}: " + "; ".join(found) + ".")
        return self

    def stage(self) -> Stage:
        """The one stage of pretraining: every backbone group and the objective's head train."""
        return Stage(
            "pretrain",
            epochs=self.epochs,
            train="all",
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_fraction=self.warmup_fraction,
            train_batchnorm=self.TRAIN_BATCHNORM,
        )

    def stages(self) -> list[Stage]:
        """The schedule: `stage()`; a recipe may put a stage before it (a new head's warm-up)."""
        return [self.stage()]

    def input_paths(self) -> list[str]:
        """The local paths the run reads; the output directory may not overlap them."""
        return []


@dataclass
class PretrainTask:
    """What a pretraining recipe's `build_task` returns: the objective, ready to train.

    Args:
        backbone: Backbone. The backbone being pretrained (its groups all train).
        model: keras.Model. What `fit` trains: the backbone's layers plus the objective's
            head, taking a batch of `train` and returning what `loss` compares.
        loss: a Keras loss.
        metrics: list. Keras metrics (compiled fresh for the stage).
        train: TrainData. Replayable training batches (resume starts at any step).
        val: tf.data.Dataset or None. Held-out batches of the same form, in a fixed order.
        finish: callable. `finish(run_dir, write)` measures the pretrained backbone and (when
            `write`) writes what the fine-tuning recipes read into `run_dir`; returns the
            metrics for `metrics.json`.
        info: dict. Facts for `config.json["pretraining"]`: at least "objective", "modality"
            and "output" (the entry in the run directory that holds the result).
    """

    backbone: Backbone
    model: keras.Model
    loss: Any
    metrics: list
    train: TrainData
    val: tf.data.Dataset | None
    finish: Callable[[RunDir | None, bool], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


BuildData = Callable[[Any], Any]
BuildTask = Callable[[Any, Any, Any], PretrainTask]


def run_pretraining(
    config: PretrainConfig, build_data: BuildData, build_task: BuildTask
) -> dict[str, Any]:
    """Runs a pretraining recipe: check, seed, distribute, load, build, train, measure, write.

    Args:
        config: PretrainConfig. The recipe's config; validated here.
        build_data: callable. `build_data(config)` returns the unlabelled data.
        build_task: callable. `build_task(config, data, distribution)` returns the
            `PretrainTask`; it runs in the strategy's scope.

    Returns:
        A dict with "run_dir", "model" (what trained), "backbone", "history", "metrics",
        "output" (the path of what was written for the fine-tuning recipes) and "result".
    """
    with keeping_dtype_policy():
        return _run(config, build_data, build_task)


def _run(config: PretrainConfig, build_data: BuildData, build_task: BuildTask) -> dict[str, Any]:
    distribution = start_run(config)
    data = build_data(config)
    with distribution.scope():
        task = build_task(config, data, distribution)
    if str(task.backbone.info.get("weights")) in ("None", "none", "random"):
        print("[tfxfer] pretraining starts from random weights.", flush=True)
    run_dir = open_run(
        config.output_dir,
        to_document(config),
        overwrite=config.overwrite,
        resume=config.resume,
        write=distribution.is_chief,
        lock=True,  # released by `run_dir.close()` when the run ends
        extra={
            "backbone_info": backbone_info(task.backbone),
            "pretraining": task.info,
            **distribution.describe(),
        },
    )
    try:
        result: TrainResult = run_schedule(
            task.model,
            task.backbone,
            config.stages(),
            task.train,
            task.val,
            loss=task.loss,
            metrics=task.metrics,
            run_dir=run_dir,
            strategy=distribution.strategy,
            lr_scale=distribution.lr_scale,
            verbose=config.fit_verbosity(),
            cache_features=False,  # every layer trains: there is nothing frozen to cache
            callbacks=report.tensorboard_callbacks(run_dir, write=distribution.is_chief),
            config={
                **dataclasses.asdict(config),
                "global_batch_size": distribution.global_batch_size,
            },
        )
        metrics = task.finish(run_dir, distribution.is_chief)
        output = run_dir.file(task.info["output"]) if distribution.is_chief else None
        if distribution.is_chief:
            run_dir.write_json("metrics.json", metrics)
            if result.best:
                run_dir.write_json("best.json", result.best)
            if result.stages:
                run_dir.write_json("stages.json", result.stages)
            if result.history:
                # Both objectives name their metric "accuracy"; the plot says which it is.
                measured = {"masked_lm": "masked-token accuracy", "simclr": "contrastive accuracy"}
                report.plot_training_curves(
                    result.history,
                    run_dir.file("training_curves.png"),
                    accuracy_label=measured.get(task.info.get("objective"), "accuracy"),
                )
            print(f"[tfxfer] pretrained backbone written to {output}", flush=True)
        return {
            "run_dir": run_dir.path,
            "model": task.model,
            "backbone": task.backbone,
            "history": result.history,
            "metrics": metrics,
            "output": output,
            "result": result,
        }
    finally:
        run_dir.close()  # its lock: another run may write the directory from now on
