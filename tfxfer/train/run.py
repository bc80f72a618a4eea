"""Runs a schedule: per stage set trainable, recompile, fit; checkpoint every epoch; resume.

Keras' own `BackupAndRestore` assumes one `compile` for the whole run, which a staged
schedule breaks: every stage changes the trainable set, and so the optimizer's variables.
So the trainer records the stage itself. After every epoch it writes a complete checkpoint
(`tfxfer.train.checkpoints`: model weights, this stage's optimizer state, which stage and epoch,
the history so far, verified before the one before it is given up). A run killed at any
moment resumes from the last intact checkpoint: same stage, same trainable layers, same
optimizer moments and learning-rate position, and (because each epoch's shuffle is seeded by
its epoch number) the same batches.

A preemption notice (SIGTERM, from a spot VM or Slurm) is answered in a single-process run:
the step in flight finishes, a mid-epoch checkpoint `epoch-000003-step-000005` (5 steps into
epoch 4) is written, and `run_schedule` raises `Preempted`. A resume trains the rest of that
epoch's batches as a `fit` of its own, then the whole epochs after it. Weights, optimizer state
and validation metrics come out as an uninterrupted run's; the cut epoch's training metrics
cover only the batches after the resume, since a metric's partial state is not saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer.backbones.base import Backbone, LayerGroups
from tfxfer.data.pipeline import TrainData
from tfxfer.distribute import is_chief
from tfxfer.regularizers import build_reference, needs_reference
from tfxfer.rundir import RunDir
from tfxfer.schedule import (
    Stage,
    apply_stage,
    layerwise_multipliers,
    make_optimizer,
    validate_schedule,
)
from tfxfer.train.callbacks import _EpochEnd, _StopOnNaN
from tfxfer.train.checkpoints import Checkpointer
from tfxfer.train.compiling import (
    acts_on_batches,
    fit_falling_back_from_xla,
    fresh_metrics,
    one_device,
    steps_per_execution,
)
from tfxfer.train.context import ScheduleRun, StageRun, cached_or_whole
from tfxfer.train.features import split_at_head
from tfxfer.train.lr_find import AUTO, with_found_rate
from tfxfer.train.preemption import StopOnPreemption, answers_preemption, preemption_notice
from tfxfer.train.resume import resume
from tfxfer.train.selection import (
    ProbeSnapshot,
    choose,
    example_losses,
    paired_comparison,
    probe_stage_index,
)
from tfxfer.train.solving import refit_probe_on_all_labels, solve_stage, solver_layer
from tfxfer.train.trainer import Trainer, TrainResult, resolve_monitor_mode

log = logging.getLogger(__name__)


def run_schedule(
    model: keras.Model,
    backbones: Backbone | list[Backbone] | LayerGroups,
    stages: list[Stage],
    train_data: TrainData,
    val_data: tf.data.Dataset | None = None,
    *,
    loss: Any = None,
    metrics: list | None = None,
    run_dir: RunDir | None = None,
    strategy: tf.distribute.Strategy | None = None,
    lr_scale: float = 1.0,
    monitor: str | None = None,
    monitor_mode: str = "auto",
    config: dict[str, Any] | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    cache_features: bool = True,
    jit_compile: bool | str = "auto",
    class_weight: dict[int, float] | None = None,
    keep_better: bool = False,
) -> TrainResult:
    """Trains `model` through `stages`, resuming from `run_dir` when it was opened to resume.

    Args:
        model: keras.Model. From `tfxfer.build_model`, built in `strategy`'s scope.
        backbones: Backbone, list of Backbones, or LayerGroups. What the model was built from:
            the backbone says which of its groups the head reads, which layers never train and
            where LoRA adapters go; several backbones' groups are namespaced.
        stages: list[Stage]. The schedule.
        train_data: TrainData. From `tfxfer.make_datasets` (or `epoch_batches`).
        val_data: tf.data.Dataset or None. Batched validation data.
        loss: a Keras loss, or None for the one that fits the model's head (softmax: sparse
            categorical cross-entropy; sigmoid: binary; linear: mean squared error).
        metrics: Keras metrics, or None for the head's defaults (a fresh copy per stage).
        run_dir: RunDir or None. Where checkpoints and history go; None keeps nothing.
        strategy: tf.distribute.Strategy or None. Compiles inside its scope.
        lr_scale: float. Multiplies every stage's learning rate (linear scaling with the global
            batch). Defaults to `1.0`.
        monitor: str or None. Metric that picks the best checkpoint. Defaults to "val_loss"
            with validation data, else "loss".
        monitor_mode: str. "min", "max", or "auto" (known metrics only: losses and errors are
            minimised; accuracy, AUC, F1, precision, recall maximised). Defaults to "auto".
        config: dict or None. The resolved config; a resumed run must match it.
        callbacks: extra Keras callbacks for every stage. In a stage that trains on cached
            features their `self.model` is the head alone.
        verbose: passed to `fit`.
        cache_features: bool. Train a stage that trains only the head on features extracted
            once (`tfxfer.train.features`) where the model allows it, not once per epoch. Its
            random augmentation then does not run, nor dropout inside the frozen backbone.
            `TrainResult.stages` says which stages were cached. Defaults to `True`.
        jit_compile: bool or "auto". Compile training steps with XLA. "auto" is Keras' rule:
            on a GPU or TPU when every layer supports it, never on a CPU (measured: no faster,
            slower to trace). A step XLA cannot compile (an op it does not know) falls back to
            plain TensorFlow with a warning, recorded in `TrainResult.stages`. Defaults to "auto".
        class_weight: dict or None. `{class id: weight}` for the training loss of every stage
            (Keras' `class_weight`; `tfxfer.data.balance.class_weights` makes one from label
            frequencies). Validation metrics stay unweighted. Defaults to `None`.
        keep_better: bool. LP-FT that never makes things worse: end on the linear probe's
            weights (the last head-only stage's) unless fine-tuning lowered the validation
            loss, example by example, by more than its noise (`tfxfer.train.selection`);
            `TrainResult.selection` says which was kept and why. Defaults to `False`.

    Returns:
        TrainResult with the trained model and the history of every stage.

    Raises:
        Preempted: SIGTERM arrived during training; a checkpoint was written after the step in
            flight (or the epoch that was ending), and `resume=True` continues from it. Only in
            the main thread of a single-process run with a `run_dir`; elsewhere SIGTERM keeps
            its action. The previous handler is restored when this returns or raises.

    Example: `tfxfer.run_schedule(model, backbone, tfxfer.default_schedule(), data.train, data.val)`
    """
    groups = LayerGroups.of(backbones)
    validate_schedule(stages, groups)
    run = ScheduleRun(
        model,
        groups,
        stages,
        train_data,
        val_data,
        strategy=strategy or tf.distribute.get_strategy(),
        loss=loss,
        metrics=metrics,
        lr_scale=lr_scale,
        callbacks=list(callbacks or []),
        verbose=verbose,
        cache_features=cache_features,
        jit_compile=jit_compile,
        class_weight=class_weight,
    )
    monitor = monitor or ("val_loss" if val_data is not None else "loss")
    config = json.loads(json.dumps(config or {}, default=str))
    mode = resolve_monitor_mode(monitor, monitor_mode)
    run.trainer = Trainer(run_dir, monitor, mode, config, is_chief(run.strategy))
    _start(run, backbones, keep_better)
    _train_stages(run)
    return _result(run)


def _start(run: ScheduleRun, backbones: Any, keep_better: bool) -> None:
    """What the stages need before the first: the resume state, the cut at the head, θ₀."""
    model, stages = run.model, run.stages
    run.state = resume(run.trainer, run.trainer.run_dir, run.strategy)
    if run.state is not None:
        run.done_epochs, run.done_step = run.trainer.position
    # In the strategy's scope: the head model's `fit` builds the optimizer in the scope the
    # model was made in.
    with run.scope():
        run.split = split_at_head(model) if run.cache_features else None
    # θ₀ of an L2-SP stage: the backbone as it is now, before a resume restores anything (a
    # resumed run is built from the same pretrained weights).
    if any(s.regularizer == "l2sp" and s.regularizer_weight for s in stages):
        run.anchors = {
            variable.path: variable.numpy()
            for layers in run.groups.groups.values()
            for layer in layers
            for variable in layer.weights
        }
    # The frozen copy a "features" or "source_task" stage compares with, also at θ₀.
    kinds = needs_reference(stages)
    with run.scope():
        run.reference = build_reference(model, backbones, kinds) if kinds else None
    # The linear probe, which `keep_better` may go back to: the model when fine-tuning starts.
    if keep_better:
        trains = [bool(s.trainable_groups(run.groups)) for s in stages]
        run.probe_index = probe_stage_index(stages, trains)
        trained = [i for i, s in enumerate(stages) if s.epochs != 0]
        if trained and not any(trains[i] for i in trained):
            run.head_only_index = trained[-1]
    run_dir = run.trainer.run_dir
    run.snapshot = ProbeSnapshot(
        run_dir.checkpoints if run_dir else None, run.trainer.checkpointer.write
    )


def _train_stages(run: ScheduleRun) -> None:
    """Every stage not finished before an interruption, listening for a preemption notice."""
    trainer = run.trainer
    # A run with a directory stops on a notice: a single process by itself; the workers of a
    # multi-worker run all together, after the same step (`PreemptionNotice.stop`).
    multi_worker = not answers_preemption(run.strategy)
    listen = trainer.run_dir is not None and (trainer.checkpointer.write or multi_worker)
    with preemption_notice(listen, run.strategy) as notice:
        run.notice = notice
        start = 0
        for index, stage in enumerate(run.stages):
            stage_run = _resolved(StageRun(run, index, stage, start=start))
            if stage_run.stage.epochs == 0 or stage_run.end <= run.done_epochs:
                start = stage_run.end  # finished before the interruption
                continue
            start = _train_stage(stage_run)
        if notice.stop() and trainer.position is not None:
            # The notice came after the last epoch's end was handled: its checkpoint is the
            # final one; stop before evaluation and export all the same.
            raise trainer.preempted(run.steps_per_epoch, notice.signum)
    if run.state is not None and not run.loaded:
        # Every stage had finished: the checkpoint holds the final weights.
        with run.scope():
            Checkpointer.restore(run.model, run.state, with_optimizer=False)


def _resolved(stage_run: StageRun) -> StageRun:
    """`stage_run` with its trainable layers set, its epochs counted and its end known."""
    run, stage = stage_run.run, stage_run.stage
    with run.scope():
        stage_run.trainable = apply_stage(run.model, run.groups, stage)
    stage_run.solver_layer = solver_layer(stage_run)
    # A solved stage is one epoch of the run; else epochs (or sized by steps).
    epochs = 1 if stage_run.solver_layer is not None else stage.epochs_for(run.steps_per_epoch)
    stage_run.stage = dataclasses.replace(stage, epochs=epochs)
    # A stage with `patience` may have ended early, before an interruption.
    stage_run.end = run.trainer.stages.get(stage.name, {}).get(
        "ended_after", stage_run.start + int(epochs)
    )
    return stage_run


def _train_stage(stage_run: StageRun) -> int:
    """Trains one stage (by `fit`, or by the solver); returns the epoch it ended after."""
    run = stage_run.run
    if stage_run.stage.learning_rate == AUTO and stage_run.solver_layer is None:
        with run.scope():
            stage_run.stage = with_found_rate(stage_run)
    with run.scope():
        _compile(stage_run)
    if stage_run.solver_layer is not None:
        with run.scope():
            solve_stage(stage_run)
        return stage_run.end
    _fit(stage_run)
    return stage_run.info.get("ended_after", stage_run.end)


def _compile(stage_run: StageRun) -> None:
    """A fresh optimizer for the stage; on a resume, the checkpoint's weights and state."""
    run, stage = stage_run.run, stage_run.stage
    multipliers = layerwise_multipliers(run.groups, stage_run.trainable, stage.layerwise_lr_decay)
    optimizer = make_optimizer(stage, run.steps_per_epoch, multipliers, run.lr_scale, run.anchors)
    compiled = {"optimizer": optimizer, "loss": run.loss, "jit_compile": run.jit_compile}
    stage_run.compiled = compiled
    run.model.compile(metrics=fresh_metrics(run.metrics), **compiled)
    if stage_run.resumes_here:
        run.loaded = True
        # Mid-stage, the optimizer's moments and step count come back too (and with the step
        # count, the learning rate's place in its schedule).
        mid_stage = run.done_epochs > stage_run.start or run.done_step > 0
        Checkpointer.restore(run.model, run.state, with_optimizer=mid_stage)
        if run.state["stage"] == stage.name:
            run.trainer.stage_best = Checkpointer.stage_best(run.state)
    # After the restore: the features are those of the checkpoint's weights.
    cached_or_whole(stage_run)
    if stage_run.fit_model is not run.model:
        # A head on features takes microseconds a step: the per-step overhead of the training
        # loop dominates, so several steps run per call.
        compiled["steps_per_execution"] = (
            steps_per_execution(run.steps_per_epoch, run.done_step)
            if one_device(run.strategy) and not acts_on_batches(run.callbacks)
            else 1
        )
        stage_run.fit_model.compile(metrics=fresh_metrics(run.metrics), **compiled)
    elif run.reference is not None and stage.regularizer_weight:
        if stage.regularizer in run.reference.kinds:
            # λ·L_S joins the loss: the same layers, with the frozen copy beside.
            stage_run.fit_model = run.reference.objective(
                run.model, stage.regularizer, stage.regularizer_weight
            )
            stage_run.fit_model.compile(metrics=fresh_metrics(run.metrics), **compiled)
            stage_run.info.update(
                regularizer=stage.regularizer,
                regularizer_weight=stage.regularizer_weight,
                reference_bytes=run.reference.bytes,
            )
    stage_run.info.update(
        steps_per_execution=compiled.get("steps_per_execution", 1),
        jit_compile=bool(stage_run.fit_model.jit_compile),
    )


def _fit(stage_run: StageRun) -> None:
    """The stage's epochs by `fit`, from where a resume left off."""
    run, stage = stage_run.run, stage_run.stage
    initial_epoch = max(stage_run.start, run.done_epochs)
    first_step = run.done_step if initial_epoch == run.done_epochs else 0
    if run.probe_index is not None and stage_run.index == run.probe_index + 1:
        if initial_epoch == stage_run.start and not first_step:
            run.snapshot.take(run.model)  # the probe's weights (restored, on a resume)
    if run.verbose:
        _announce(stage_run, initial_epoch, first_step)
    # `fit` runs every epoch of one call for the same number of steps, so the rest of a
    # mid-epoch checkpoint's epoch is a call of its own, before the whole epochs.
    fits = [(initial_epoch, initial_epoch + 1, first_step)] if first_step else []
    if initial_epoch + bool(first_step) < stage_run.end:
        fits.append((initial_epoch + bool(first_step), stage_run.end, 0))
    for first_epoch, end_epoch, skip_steps in fits:
        if "ended_after" in stage_run.info:
            break  # stopped at convergence in the rest of a resumed epoch
        fit_falling_back_from_xla(
            stage_run.fit_model,
            stage_run.compiled,
            run.metrics,
            stage_run.info,
            stage_run.fit_train.build(first_epoch, skip_steps),
            steps_per_epoch=run.steps_per_epoch - skip_steps,
            validation_data=stage_run.fit_val,
            initial_epoch=first_epoch,
            epochs=end_epoch,
            callbacks=[
                _StopOnNaN(stage),
                _EpochEnd(stage_run),
                *run.callbacks,
                # Last, so a notice that arrives during any callback of a step is answered
                # at the end of that step.
                StopOnPreemption(stage_run, run.notice, first_epoch, skip_steps),
            ],
            shuffle=False,  # the data shuffles itself, per epoch, replayably
            class_weight=run.class_weight,
            verbose=run.verbose,
        )


def _announce(stage_run: StageRun, initial_epoch: int, first_step: int) -> None:
    """The stage's line in the output: epochs, what trains, at what rate, on what data."""
    run, stage, info = stage_run.run, stage_run.stage, stage_run.info
    part = f" (epoch {initial_epoch + 1} from step {first_step + 1})"
    print(
        f"[tfxfer] stage {stage_run.index + 1}/{len(run.stages)} {stage.name!r}: epochs "
        f"{initial_epoch + 1}-{stage_run.end}{part if first_step else ''}"
        f", training {stage_run.trainable or 'head only'} at peak learning rate "
        f"{stage.learning_rate * run.lr_scale:.3g}"
        f"{f', LoRA rank {stage.lora_rank}' if stage.lora_rank else ''}",
        flush=True,
    )
    if info["cached_features"]:
        print(
            f"[tfxfer] stage {stage.name!r} trains the head on cached features "
            f"{info['feature_shape']} of {info['train_examples']} examples "
            + (
                "(found from an earlier extraction)"
                if info["found_in_cache"]
                else f"(extracted in {info['extract_seconds']:.1f} s)"
            )
            + (
                "; the training data's augmentation does not run in this stage"
                if info["skipped_augmentation"]
                else ""
            ),
            flush=True,
        )


def _result(run: ScheduleRun) -> TrainResult:
    """The `TrainResult`, with `keep_better`'s choice between the probe and the fine-tuned."""
    trainer = run.trainer
    chosen = None
    if run.probe_index is not None:
        chosen = _keep_better(run)
    elif run.head_only_index is not None:
        chosen = _head_only(run)
    if chosen and chosen.get("refit"):
        # The validation examples are in the head now: its scores on them are not held out.
        chosen["val_held_out"] = False
    return TrainResult(
        run.model,
        trainer.history,
        resumed_from_epoch=run.done_epochs,
        best=trainer.best,
        resumed_from_step=run.done_step,
        stages=dict(trainer.stages),
        selection=chosen,
    )


def _head_only(run: ScheduleRun) -> dict[str, Any] | None:
    """A schedule that never trained the backbone ends on its solved head, refit on the
    training and validation examples together (as `_keep_better` refits a kept probe): no
    choice is left for the validation labels to make. None where the head was not solved or
    there is no validation data."""
    stage = run.stages[run.head_only_index]
    if "solver" not in run.trainer.stages.get(stage.name, {}) or run.val_data is None:
        return None
    with run.scope():
        refit = _refit_on_all_labels(run, stage)
    if refit is None:
        return None
    reason = "no stage trained the backbone: the solved head refit on train and validation"
    log.info("Kept the probe model: %s.", reason)
    return {"kept": "probe", "rule": "head_only", "reason": reason, "refit": refit}


def _refit_on_all_labels(run: ScheduleRun, stage: Stage) -> dict[str, Any] | None:
    """`refit_probe_on_all_labels` for the run's model, data and seed."""
    return refit_probe_on_all_labels(
        run.model,
        run.groups,
        run.split,
        stage,
        train_data=run.train_data,
        val_data=run.val_data,
        class_weight=run.class_weight,
        seed=int(run.trainer.config.get("seed", 0) or 0),
    )


def _keep_better(run: ScheduleRun) -> dict[str, Any]:
    """Which model the run ends on: the linear probe's, or the fine-tuned one (`selection`)."""
    probe = run.stages[run.probe_index]
    has_probe = run.snapshot.load()
    with run.scope():
        paired = _paired_losses(run) if has_probe else None
    chosen = choose(run.trainer.history, probe.name, paired)
    if chosen["kept"] == "probe":
        if has_probe:
            with run.scope():
                run.snapshot.restore(run.model)
                if "solver" in run.trainer.stages.get(probe.name, {}):
                    chosen["refit"] = _refit_on_all_labels(run, probe)
        else:
            chosen = {
                **chosen,
                "kept": "finetuned",
                "reason": chosen["reason"]
                + ", but the probe's weights were not kept (no run directory)",
            }
    log.info("Kept the %s model: %s.", chosen["kept"], chosen["reason"])
    return chosen


def _paired_losses(run: ScheduleRun) -> dict[str, Any] | None:
    """Both models' validation losses, example by example (`selection.paired_comparison`).

    The fine-tuned weights are held in memory while the probe's are put back to score it,
    then restored, whatever happens: the model leaves as it came. None (the last epochs
    then decide) without validation data, when the loss is not one value per example, or
    when the validation data does not come in the same order twice (a shuffled dataset of
    the user's), since the pairs would not be pairs."""
    if run.val_data is None:
        return None
    finetuned = ProbeSnapshot(None, write=False)
    finetuned.take(run.model)
    try:
        scored = example_losses(run.model, run.val_data, run.loss)
        run.snapshot.restore(run.model)
        probe = example_losses(run.model, run.val_data, run.loss)
    finally:
        finetuned.restore(run.model)
    if scored is None or probe is None or not np.array_equal(scored[1], probe[1]):
        return None
    return paired_comparison(probe[0], scored[0])
