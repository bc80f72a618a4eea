"""The one object a stage's training is carried by: `StageRun`, and the `ScheduleRun` it is part of.

`run_schedule` used to pass the model, the split at the head, the stage, its trainable
layers, the datasets, the trainer and half a dozen settings from function to function as
long argument lists. Now the settings of the whole call are one `ScheduleRun`, built once, and
each stage's work (which layers train, what `fit` runs on, how it was compiled) is one
`StageRun` that points at it. The range test (`tfxfer.train.lr_find`), the solver
(`tfxfer.train.solving`) and the callbacks read what they need from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from tfxfer.backbones.base import LayerGroups
from tfxfer.data.pipeline import TrainData
from tfxfer.model import loss_and_metrics, task_of
from tfxfer.schedule import Stage
from tfxfer.train.features import HeadSplit, cached_stage, why_not_cached

log = logging.getLogger(__name__)


@dataclass
class ScheduleRun:
    """What every stage of one `run_schedule` call shares.

    Attributes:
        model: the whole model; what is checkpointed.
        groups: the backbones' layer groups.
        stages: the schedule.
        train_data, val_data: the data (`val_data` batched, or None).
        trainer: `tfxfer.train.trainer.Trainer` (or anything with a `stages` dict, for a
            range test on its own).
        split: the model cut at its head, or None when features are not cached.
        state: the checkpoint's state a resume starts from, or None.
        done_epochs, done_step: where that checkpoint is (steps into the next epoch).
        anchors: θ₀ of the backbone's variables, for an L2-SP stage.
        reference: the frozen copy a "features" or "source_task" regularizer compares with.
        notice: the preemption notice being listened for (`tfxfer.train.preemption`).
        loaded: whether the checkpoint's weights were restored by a stage.
    """

    model: keras.Model
    groups: LayerGroups
    stages: list[Stage]
    train_data: TrainData
    val_data: tf.data.Dataset | None = None
    trainer: Any = None
    strategy: tf.distribute.Strategy | None = None
    loss: Any = None
    metrics: list | None = None
    lr_scale: float = 1.0
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)
    verbose: int | str = "auto"
    cache_features: bool = True
    jit_compile: bool | str = "auto"
    class_weight: dict[int, float] | None = None
    split: HeadSplit | None = None
    state: dict[str, Any] | None = None
    done_epochs: int = 0
    done_step: int = 0
    anchors: dict[str, Any] | None = None
    reference: Any = None
    notice: Any = None
    loaded: bool = False
    # `keep_better`: the index of the linear probe's stage, and its weights' snapshot.
    probe_index: int | None = None
    snapshot: Any = None
    # `keep_better` on a schedule that never trains the backbone: its last head stage.
    head_only_index: int | None = None

    def __post_init__(self):
        self.strategy = self.strategy or tf.distribute.get_strategy()
        if self.loss is None:
            # The loss that fits the model's head, and its default metrics.
            self.loss, defaults = loss_and_metrics(
                task_of(self.model), int(self.model.outputs[0].shape[-1])
            )
            self.metrics = defaults if self.metrics is None else self.metrics

    @property
    def steps_per_epoch(self) -> int:
        return self.train_data.steps_per_epoch

    def scope(self):
        """The strategy's scope: where variables and optimizers are made."""
        return self.strategy.scope()


@dataclass
class StageRun:
    """One stage of a `ScheduleRun`: where it starts and ends, and what `fit` trains.

    Attributes:
        run: the `ScheduleRun` it belongs to.
        index: the stage's place in the schedule (from 0).
        stage: the Stage, with its epochs (and a found learning rate) resolved.
        start, end: the run's epochs before it, and after it.
        trainable: the layer groups it trains.
        solver_layer: the output layer a `solver` stage fits, or None.
        fit_model, fit_train, fit_val: what `fit` runs: the head on cached features, or the
            whole model (or its regularized objective) on the data.
        compiled: the arguments `compile` was given (optimizer, loss, XLA, steps per call).
    """

    run: ScheduleRun
    index: int
    stage: Stage
    start: int = 0
    end: int = 0
    trainable: list[str] = field(default_factory=list)
    solver_layer: keras.layers.Dense | None = None
    fit_model: keras.Model | None = None
    fit_train: TrainData | None = None
    fit_val: tf.data.Dataset | None = None
    compiled: dict[str, Any] = field(default_factory=dict)

    @property
    def trainer(self) -> Any:
        return self.run.trainer

    @property
    def info(self) -> dict[str, Any]:
        """What the run records about this stage (`TrainResult.stages[name]`)."""
        return self.run.trainer.stages.setdefault(self.stage.name, {})

    @property
    def resumes_here(self) -> bool:
        """Whether the checkpoint resumed from lies in (or at the start of) this stage."""
        return self.run.state is not None and self.start <= self.run.done_epochs


def cached_or_whole(stage_run: StageRun, with_val: bool = True) -> None:
    """What a stage fits: its head on cached features where it can, else the whole model.

    Sets `fit_model`, `fit_train` and `fit_val` on `stage_run`, and records on the trainer's
    `stages` which it is. The head shares the whole model's layers and is compiled with the
    same optimizer, so a checkpoint of the whole model holds its state.
    """
    run, stage = stage_run.run, stage_run.stage
    val_data = run.val_data if with_val else None
    if stage.lora_rank or not run.cache_features:
        reason = "LoRA adapters train" if stage.lora_rank else "cache_features=False"
    else:
        reason = why_not_cached(run.model, run.split, run.train_data)
    if reason is not None:
        stage_run.info.update(cached_features=False)
        if not stage_run.trainable and run.cache_features:
            log.info("Stage %r runs the frozen backbone every epoch: %s.", stage.name, reason)
        stage_run.fit_model, stage_run.fit_train, stage_run.fit_val = (
            run.model,
            run.train_data,
            val_data,
        )
        return
    cached = cached_stage(run.split, run.train_data, val_data)
    stage_run.info.update(cached.info)
    run.trainer.cached = cached  # the arrays, for a solved stage
    stage_run.fit_model, stage_run.fit_train, stage_run.fit_val = (
        run.split.head,
        cached.train,
        cached.val,
    )
