"""Runs a schedule: per stage set trainable, recompile, fit; checkpoint every epoch; resume.

Keras' own `BackupAndRestore` assumes one `compile` for the whole run, which a staged
schedule breaks: every stage changes the trainable set, and so the optimizer's variables.
So the trainer records the stage itself. After every epoch it writes a complete checkpoint
(`tfxfer.checkpoints`: model weights, this stage's optimizer state, which stage and epoch,
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

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.saving import saving_lib

from tfxfer import fs, lr_find, selection
from tfxfer.backbones.base import Backbone, LayerGroups
from tfxfer.checkpoints import Checkpointer, checkpoint_name
from tfxfer.compiling import (
    acts_on_batches,
    fit_falling_back_from_xla,
    fresh_metrics,
    one_device,
    steps_per_execution,
)
from tfxfer.data.pipeline import TrainData
from tfxfer.distribute import broadcast_from_chief, count_workers_where, describe, is_chief
from tfxfer.errors import Preempted, RunDirError, TfxferError
from tfxfer.features import STORE, HeadSplit, cached_stage, split_at_head, why_not_cached
from tfxfer.head_solver import linear_output_layer, solve_head
from tfxfer.model import loss_and_metrics, task_of
from tfxfer.preemption import StopOnPreemption, answers_preemption, preemption_notice
from tfxfer.regularizers import build_reference, needs_reference
from tfxfer.rundir import RunDir, atomic_write_text
from tfxfer.schedule import (
    Stage,
    apply_stage,
    layerwise_multipliers,
    make_optimizer,
    validate_schedule,
)

log = logging.getLogger(__name__)

# Config keys that may differ between a run and its resumption.
RESUME_IGNORED_KEYS = ("resume", "overwrite", "output_dir", "verbose", "quiet")
# Whether a larger value of a metric is better, for `monitor_mode="auto"`; "val_" is ignored.
MONITOR_MODES = {
    "loss": "min",
    "mae": "min",
    "mse": "min",
    "accuracy": "max",
    "auc": "max",
    "f1": "max",
    "macro_f1": "max",
    "precision": "max",
    "recall": "max",
}


def resolve_monitor_mode(monitor: str, mode: str = "auto") -> str:
    """ "min" or "max" for `monitor`: the declared mode, or the known direction of its metric.

    The metric's name must be known exactly; a guess from a substring would call
    "val_misclassification_rate" something to maximise.
    """
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise TfxferError(
            f"Expected `monitor_mode` to be one of ('auto', 'min', 'max'). Received: {mode!r}"
        )
    metric = monitor[4:] if monitor.startswith("val_") else monitor
    if metric not in MONITOR_MODES:
        raise TfxferError(
            f"Cannot tell whether a larger {monitor!r} is better. Pass monitor_mode='min' or "
            f"'max' (known metrics: {sorted(MONITOR_MODES)})."
        )
    return MONITOR_MODES[metric]


@dataclass
class TrainResult:
    """What `run_schedule` returns."""

    model: keras.Model
    history: list[dict[str, Any]]
    resumed_from_epoch: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    # Steps into the epoch after `resumed_from_epoch`, for a resume from a mid-epoch checkpoint.
    resumed_from_step: int = 0
    # Per stage name, how it trained: on cached features or not, and what that took.
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    # With `keep_better`: whether the run ended on the fine-tuned model or the linear probe.
    selection: dict[str, Any] | None = None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - set(RESUME_IGNORED_KEYS)
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def _current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(np.asarray(lr))


class _StopOnNaN(keras.callbacks.Callback):
    """Keras' `TerminateOnNaN` as an error that says where training diverged and what to do.

    Stopping quietly would go on to save a model of NaNs and write NaN metrics; a loss that
    turns NaN or infinite almost always means the stage's learning rate is too high.
    """

    def __init__(self, stage: Stage):
        super().__init__()
        self.stage = stage
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, "loss", f"epoch {self.epoch + 1}, batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        # The last update can leave NaN weights that only the validation loss shows.
        self._check(logs, "val_loss", f"after epoch {epoch + 1}")

    def _check(self, logs, key: str, when: str) -> None:
        value = (logs or {}).get(key)
        if value is not None and not np.isfinite(float(value)):
            raise TfxferError(
                f"Training diverged: {key} became {float(value)} in stage {self.stage.name!r} "
                f"({when}) at learning rate {self.stage.learning_rate:g}. Lower the learning "
                "rate (--head-learning-rate / --finetune-learning-rate, or the stage's "
                "learning_rate=)."
            )


class _EpochEnd(keras.callbacks.Callback):
    """After each epoch: history row, best weights, a complete resume checkpoint.

    `model` is the whole model, which is what is saved even when `fit` trains only its head
    (on cached features): the head's layers are the whole model's own.
    """

    def __init__(
        self,
        trainer: _Trainer,
        stage_index: int,
        stage: Stage,
        stage_start: int,
        model: keras.Model,
    ):
        super().__init__()
        self.trainer = trainer
        self.stage_index = stage_index
        self.stage = stage
        self.stage_start = stage_start
        self.whole_model = model

    def on_epoch_end(self, epoch, logs=None):
        t = self.trainer
        logs = {k: float(v) for k, v in (logs or {}).items()}
        row = {
            "epoch": epoch + 1,
            "stage": self.stage.name,
            "stage_epoch": epoch + 1 - self.stage_start,
            **logs,
            "learning_rate": _current_lr(self.whole_model.optimizer),
        }
        t.history.append(row)
        if self.stage.patience:
            # Before the checkpoint: a stage that ends here is saved with its best weights.
            self._converge(epoch + 1, logs.get(t.monitor))
        value = logs.get(t.monitor)
        if value is not None and (t.best.get("value") is None or t._better(value, t.best["value"])):
            t.best = {
                "value": value,
                "epoch": epoch + 1,
                "stage": self.stage.name,
                "monitor": t.monitor,
                "mode": t.mode,
            }
            t.save_best(self.whole_model)
        t.checkpoint(self.whole_model, self.stage_index, self.stage, epoch + 1)
        t.write_history()

    def _converge(self, global_epoch: int, value: float | None) -> None:
        """Tracks the stage's best epoch; ends the stage on its weights after `patience`."""
        t, stage = self.trainer, self.stage
        info = t.stages[stage.name]
        if value is not None and ("best_epoch" not in info or t._better(value, info["best_value"])):
            info.update(best_epoch=global_epoch, best_value=value)
            t.stage_best = [np.array(v.numpy()) for v in _changing_variables(self.whole_model)]
        best = info.get("best_epoch", global_epoch)
        stale = global_epoch - best >= stage.patience
        if not (stale or global_epoch == self.stage_start + stage.epochs):
            return
        if best != global_epoch and t.stage_best is not None:
            for variable, value in zip(
                _changing_variables(self.whole_model), t.stage_best, strict=True
            ):
                variable.assign(value)
        info.update(ended_after=global_epoch, stopped_early=bool(stale))
        t.stage_best = None
        if stale:
            self.model.stop_training = True
        log.info(
            "Stage %r ends after epoch %d%s, with the weights of its best epoch %d (%s %.4g).",
            stage.name,
            global_epoch,
            f" ({stage.patience} epoch(s) without improvement)" if stale else "",
            best,
            t.monitor,
            info.get("best_value", float("nan")),
        )


def _changing_variables(model: keras.Model) -> list:
    """The variables training can change: trainable ones and updating BatchNorm statistics."""
    variables = list(model.trainable_variables)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            variables += list(layer.non_trainable_variables)
    return variables


class _Trainer:
    def __init__(
        self, run_dir: RunDir | None, monitor: str, mode: str, config: dict[str, Any], chief: bool
    ):
        self.run_dir = run_dir
        self.monitor = monitor
        self.mode = mode
        self.config = config
        self.chief = chief
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.stages: dict[str, dict[str, Any]] = {}
        # The best epoch's values of the variables a stage with `patience` changes, so far.
        self.stage_best: list[np.ndarray] | None = None
        directory = run_dir.checkpoints if run_dir else None
        self.checkpointer = Checkpointer(directory, write=chief) if directory else _NoCheckpoints()
        # (global epoch, step) of the newest checkpoint, written or resumed from.
        self.position: tuple[int, int] | None = None
        # The features of the cached stage in progress (`tfxfer.features.CachedStage`).
        self.cached = None

    def checkpoint(
        self, model: keras.Model, stage_index: int, stage: Stage, global_epoch: int, step: int = 0
    ) -> None:
        """Writes the checkpoint after `global_epoch` epochs and `step` steps of the next."""
        self.checkpointer.save(
            model,
            {
                "stage_index": stage_index,
                "stage": stage.name,
                "global_epoch": global_epoch,
                "step": step,
                "history": self.history,
                "best": self.best,
                "stages": self.stages,
                "config": self.config,
            },
            stage_best=self.stage_best,
        )
        self.position = (global_epoch, step)

    def preempted(self, steps_per_epoch: int) -> Preempted:
        """The `Preempted` that names the newest checkpoint (an epoch's end, or mid-epoch)."""
        global_epoch, step = self.position
        name = checkpoint_name(global_epoch, step)
        path = os.path.join(self.checkpointer.directory, name)
        if step:
            return Preempted(global_epoch + 1, step, path)
        return Preempted(global_epoch, steps_per_epoch, path)

    def _better(self, value: float, best: float) -> bool:
        return value > best if self.mode == "max" else value < best

    def save_best(self, model: keras.Model) -> None:
        if not (self.run_dir and self.chief):
            return
        final = fs.join(self.run_dir.checkpoints, "best.weights.h5")
        tmp = fs.join(self.run_dir.checkpoints, ".tmp-best.weights.h5")
        saving_lib.save_weights_only(model, tmp, objects_to_skip=[model.optimizer])
        fs.rename(tmp, final)

    def write_history(self) -> None:
        if not (self.run_dir and self.chief and self.history):
            return
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run_dir.file("history.csv"), buffer.getvalue())


class _NoCheckpoints:
    write = False

    def latest(self):
        return None

    def save(self, model, state, stage_best=None):
        pass


# What the chief broadcasts in place of a checkpoint's epoch (see `_agreed_resume_state`).
_NO_CHECKPOINT = -1
_CHIEF_FAILED = -2


def _agreed_resume_state(
    checkpointer: Checkpointer | _NoCheckpoints,
    run_dir: RunDir | None,
    strategy: tf.distribute.Strategy,
) -> dict[str, Any] | None:
    """The state of the checkpoint to resume from, the chief's choice on every worker.

    Only the chief looks for it (`Checkpointer.latest`, with its fallbacks). It broadcasts
    which one (its epoch and step) and a fingerprint of its files, and every other worker
    reads exactly that checkpoint. A worker that chose for itself would start fresh where it
    cannot see the chief's directory, or resume from another checkpoint where it sees a
    damaged pointer the chief fell back from, and its gradients would be averaged with the
    chief's as if they were one run. When any worker cannot read the chief's checkpoint, all
    of them stop with an error (agreed through a collective, so none waits for the others
    until a timeout).

    Returns:
        The checkpoint's state, or None when the run starts from the beginning.

    Raises:
        RunDirError: resuming was asked but there is no checkpoint, or a worker cannot read
            the chief's checkpoint.
    """
    chief = is_chief(strategy)
    state, choice = None, (_NO_CHECKPOINT, 0, 0)
    if chief:
        try:
            if run_dir is not None and run_dir.resumed:
                state = checkpointer.latest()
                if state is None:
                    raise RunDirError(
                        f"Cannot resume {run_dir.path!r}: it has no complete checkpoint yet. "
                        "Start again with --overwrite, or choose another --output-dir."
                    )
        except Exception:
            broadcast_from_chief(strategy, (_CHIEF_FAILED, 0, 0))  # The workers stop too.
            raise
        if state is not None:
            choice = (int(state["global_epoch"]), int(state.get("step", 0)), _fingerprint(state))
    epoch, step, fingerprint = broadcast_from_chief(strategy, choice)
    worker = f"Worker {describe(strategy)['worker_index']}" if not chief else "The chief"
    if epoch == _CHIEF_FAILED:
        raise RunDirError(f"{worker} stops: the chief cannot resume the run (its log says why).")
    if epoch == _NO_CHECKPOINT:
        return None
    name, problem = checkpoint_name(epoch, step), None
    if not chief:
        state, problem = _read_chiefs_checkpoint(checkpointer, name, fingerprint)
    failed = count_workers_where(strategy, problem is not None)
    shared = (
        "Every worker must see the chief's run directory, e.g. on a shared filesystem or a "
        "bucket mounted at the same path on every machine."
    )
    if problem is not None:
        raise RunDirError(
            f"{worker} cannot read the checkpoint {name} that the chief resumes from: {problem}. "
            f"{shared}"
        )
    if failed:
        raise RunDirError(
            f"{failed} worker(s) cannot read the checkpoint {name} that the chief resumes from "
            f"in {checkpointer.directory!r}; their logs say why. {shared}"
        )
    return state


def _fingerprint(state: dict[str, Any]) -> int:
    """60 bits of the digest of a checkpoint's recorded file sizes and SHA-256s (an int64)."""
    files = json.dumps(state["files"], sort_keys=True).encode("utf-8")
    return int(hashlib.sha256(files).hexdigest()[:15], 16)


def _read_chiefs_checkpoint(
    checkpointer: Checkpointer | _NoCheckpoints, name: str, fingerprint: int
) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) for the chief's checkpoint `name`, or (None, why it cannot be read)."""
    directory = getattr(checkpointer, "directory", None)
    if directory is None:
        return None, "this worker was given no run directory"
    state, problem = checkpointer._read_intact(name)
    if problem is not None:
        return None, f"{problem} in {directory!r}"
    if _fingerprint(state) != fingerprint:
        return None, (
            f"{os.path.join(directory, name)!r} holds other files than the chief's (this worker "
            "sees another run directory)"
        )
    return state, None


def _cached_or_whole(
    model: keras.Model,
    split: HeadSplit | None,
    stage: Stage,
    trainable: list[str],
    train_data: TrainData,
    val_data: tf.data.Dataset | None,
    cache_features: bool,
    trainer: _Trainer,
) -> tuple[keras.Model, TrainData, tf.data.Dataset | None]:
    """What a stage fits: its head on cached features where it can, else the whole model.

    Records on `trainer.stages` which it is. The head shares the whole model's layers and is
    compiled with the same optimizer, so a checkpoint of the whole model holds its state.
    """
    if stage.lora_rank or not cache_features:
        reason = "LoRA adapters train" if stage.lora_rank else "cache_features=False"
    else:
        reason = why_not_cached(model, split, train_data)
    if reason is not None:
        trainer.stages.setdefault(stage.name, {}).update(cached_features=False)
        if not trainable and cache_features:
            log.info("Stage %r runs the frozen backbone every epoch: %s.", stage.name, reason)
        return model, train_data, val_data
    cached = cached_stage(split, train_data, val_data)
    trainer.stages.setdefault(stage.name, {}).update(cached.info)
    trainer.cached = cached  # the arrays, for a solved stage
    return split.head, cached.train, cached.val


def _range_test(
    model: keras.Model,
    split: HeadSplit | None,
    stage: Stage,
    trainable: list[str],
    train_data: TrainData,
    cache_features: bool,
    trainer: Any,
    loss: Any,
    class_weight: dict[int, float] | None,
    steps: int | None = None,
) -> lr_find.LRFinding:
    """The range test on what the stage fits (its head on cached features where it can)."""
    fit_model, fit_train, _ = _cached_or_whole(
        model, split, stage, trainable, train_data, None, cache_features, trainer
    )
    finding = lr_find.range_test(
        fit_model,
        fit_train.build(0),
        loss=loss,
        optimizer=stage.optimizer,
        weight_decay=stage.weight_decay,
        steps=steps or lr_find.DEFAULT_STEPS,
        class_weight=class_weight,
        # A flat curve tells nothing: the usual rate of a head, or of fine-tuning.
        fallback=lr_find.FALLBACK_HEAD if not trainable else lr_find.FALLBACK_FINETUNE,
    )
    if not finding.fell:
        log.warning(
            "Stage %r: the loss did not fall anywhere in the learning-rate range test (a "
            "frozen or randomly initialised network can give a flat curve); using %.3g.",
            stage.name,
            finding.suggestion,
        )
    return finding


def _with_found_rate(
    model: keras.Model,
    split: HeadSplit | None,
    stage: Stage,
    trainable: list[str],
    train_data: TrainData,
    cache_features: bool,
    trainer: _Trainer,
    loss: Any,
    lr_scale: float,
    class_weight: dict[int, float] | None,
    restore_from: dict[str, Any] | None,
) -> Stage:
    """`stage` with the learning rate the range test finds (`learning_rate="auto"`).

    The rate found is recorded in `stages.json` (with the test's minimum and steepest
    points) and, on a resume, read back rather than measured again. The plot goes to
    `lr_find_<stage>.png` in the run directory.
    """
    info = trainer.stages.setdefault(stage.name, {})
    found = info.get("found_learning_rate")
    if found is None:
        if restore_from is not None:
            Checkpointer.restore(model, restore_from, with_optimizer=False)
        finding = _range_test(
            model, split, stage, trainable, train_data, cache_features, trainer, loss, class_weight
        )
        found = finding.suggestion
        info.update(
            found_learning_rate=found,
            lr_find={
                "minimum": finding.minimum,
                "steepest": finding.steepest,
                "steps": len(finding.losses),
            },
        )
        if trainer.run_dir is not None and trainer.checkpointer.write:
            lr_find.plot_finding(
                finding,
                trainer.run_dir.file(f"lr_find_{stage.name}.png"),
                f"stage {stage.name!r}: range test, suggested {found:.2g}",
            )
        log.info(
            "Stage %r: the learning-rate range test suggests %.3g (loss lowest at %.3g).",
            stage.name,
            found,
            finding.minimum,
        )
    # `make_optimizer` multiplies by lr_scale; the rate found is already the one to train at.
    return dataclasses.replace(stage, learning_rate=float(found) / lr_scale)


def find_learning_rate(
    model: keras.Model,
    backbones: Backbone | list[Backbone] | LayerGroups,
    stage: Stage,
    train_data: TrainData,
    *,
    loss: Any = None,
    strategy: tf.distribute.Strategy | None = None,
    cache_features: bool = True,
    class_weight: dict[int, float] | None = None,
    steps: int | None = None,
) -> lr_find.LRFinding:
    """The learning-rate range test for `stage`, from the model's weights as they are.

    Sets the stage's trainable layers, trains a throwaway optimizer on the stage's batches
    with an exponentially growing rate, and puts every weight back (`tfxfer.lr_find`).

    Args:
        model, backbones, train_data, loss, strategy, cache_features, class_weight: as for
            `run_schedule`.
        stage: Stage. Which layers train, and the optimizer kind; its rate is not used.
        steps: int or None. Steps of the test. Defaults to `lr_find.DEFAULT_STEPS` (100):
            fewer spread the eight decades of rates too thinly to see where the loss falls.

    Returns:
        The `LRFinding`: `suggestion` is the rate to train the stage at.
    """
    groups = LayerGroups.of(backbones)
    stage.validate(groups)
    if loss is None:
        loss, _ = loss_and_metrics(task_of(model), int(model.outputs[0].shape[-1]))
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        trainable = apply_stage(model, groups, stage)
        split = split_at_head(model) if cache_features else None
        shim = types.SimpleNamespace(stages={})  # what _cached_or_whole records, unused
        return _range_test(
            model,
            split,
            stage,
            trainable,
            train_data,
            cache_features,
            shim,
            loss,
            class_weight,
            steps,
        )


def _solver_layer(
    model: keras.Model,
    split: HeadSplit | None,
    stage: Stage,
    trainable: list[str],
    train_data: TrainData,
    cache_features: bool,
) -> keras.layers.Dense | None:
    """The output layer a `solver` stage fits, or None when the stage trains by epochs.

    The solver fits a stage that trains only a linear head, on cached features; anything
    else (a hidden layer, LoRA, no cache, weights below the head) trains by epochs.
    """
    if stage.solver is None or trainable or stage.lora_rank or not cache_features:
        return None
    if why_not_cached(model, split, train_data) is not None:
        return None
    return linear_output_layer(split)


def _solve_stage(
    trainer: _Trainer,
    stage_index: int,
    stage_count: int,
    stage: Stage,
    stage_start: int,
    model: keras.Model,
    head: keras.Model,
    layer: keras.layers.Dense,
    cached_train: TrainData,
    cached_val: tf.data.Dataset | None,
    class_weight: dict[int, float] | None,
    callbacks: list[keras.callbacks.Callback],
    verbose: int | str,
) -> None:
    """Fits a head-only stage by the solver; records it as one epoch, checkpointed once.

    A resume after it finds its checkpoint; an interruption during it (seconds) refits.
    """
    cached = trainer.cached
    info = trainer.stages[stage.name]
    if verbose:
        print(
            f"[tfxfer] stage {stage_index + 1}/{stage_count} {stage.name!r}: fits the linear "
            f"head to convergence (L-BFGS, C by cross-validation) on cached features "
            f"{info['feature_shape']} of {info['train_examples']} examples "
            + (
                "(found from an earlier extraction)"
                if info["found_in_cache"]
                else f"(extracted in {info['extract_seconds']:.1f} s)"
            ),
            flush=True,
        )
    task = task_of(model)
    fitted = solve_head(
        layer,
        cached.features,
        cached.labels,
        task,
        class_weight=class_weight,
        seed=int(trainer.config.get("seed", 0) or 0),
        solver=stage.solver,
    )
    info.update(solver=fitted)
    logs = head.evaluate(
        cached_train.build(stage_start),
        steps=cached_train.steps_per_epoch,
        return_dict=True,
        verbose=0,
    )
    if cached_val is not None:
        val_logs = head.evaluate(cached_val, return_dict=True, verbose=0)
        logs.update({f"val_{key}": value for key, value in val_logs.items()})
    if verbose:
        shown = ", ".join(f"{key} {float(value):.4g}" for key, value in logs.items())
        print(
            f"[tfxfer] stage {stage.name!r}: C={fitted['C']:.3g} ({fitted['folds']}-fold), "
            f"{fitted['iterations']} iterations in {fitted['seconds']:.2f} s; {shown}",
            flush=True,
        )
    for callback in [_EpochEnd(trainer, stage_index, stage, stage_start, model), *callbacks]:
        callback.set_model(head)
        callback.on_epoch_end(stage_start, logs)


def _refit_probe_on_all_labels(
    model: keras.Model,
    groups: LayerGroups,
    split: HeadSplit | None,
    stage: Stage,
    train_data: TrainData,
    val_data: tf.data.Dataset | None,
    class_weight: dict[int, float] | None,
    seed: int,
) -> dict[str, Any] | None:
    """When the run ends on a solved probe, its head fit again on train and val together.

    The validation split was needed to choose between the probe and the fine-tuned model;
    once the probe is chosen, the labels it held back (a tenth of 8 a class is most of one)
    are worth more in the head than in a validation score. The head's strength is chosen by
    cross-validation on all of them, as the stage chose it on the training split.
    """
    layer = linear_output_layer(split)
    if layer is None or val_data is None:
        return None
    apply_stage(model, groups, stage)
    train_x, train_y, _ = STORE.features(split.features, train_data.examples)
    val_x, val_y, _ = STORE.features(split.features, val_data.unbatch())
    info = solve_head(
        layer,
        np.concatenate([train_x, val_x]),
        np.concatenate([train_y, val_y]),
        task_of(model),
        class_weight=class_weight,
        seed=seed,
        solver=stage.solver,
    )
    return {"examples": int(len(train_x) + len(val_x)), "C": info["C"], "folds": info["folds"]}


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
        backbones: Backbone, list of Backbones, or LayerGroups. What the model was built
            from: the backbone says which of its groups the head reads, which layers never
            train and where LoRA adapters go; several backbones' groups are namespaced.
        stages: list[Stage]. The schedule.
        train_data: TrainData. From `tfxfer.make_datasets` (or `epoch_batches`).
        val_data: tf.data.Dataset or None. Batched validation data.
        loss: a Keras loss, or None for the one that fits the model's head (softmax: sparse
            categorical cross-entropy; sigmoid: binary; linear: mean squared error).
        metrics: Keras metrics, or None for the head's defaults (a fresh copy is compiled
            per stage either way).
        run_dir: RunDir or None. Where checkpoints and history go; None keeps nothing.
        strategy: tf.distribute.Strategy or None. Compiles inside its scope.
        lr_scale: float. Multiplies every stage's learning rate (linear scaling with the
            global batch). Defaults to `1.0`.
        monitor: str or None. Metric that picks the best checkpoint. Defaults to "val_loss"
            with validation data, else "loss".
        monitor_mode: str. "min", "max", or "auto" (known metrics only: losses and errors are
            minimised; accuracy, AUC, F1, precision, recall maximised). Defaults to "auto".
        config: dict or None. The resolved config; a resumed run must match it.
        callbacks: extra Keras callbacks for every stage. In a stage that trains on cached
            features their `self.model` is the head alone.
        verbose: passed to `fit`.
        cache_features: bool. Train a stage that trains only the head on features extracted
            once (`tfxfer.features`) where the model allows it: the backbone runs once, not
            once per epoch. Its random augmentation then does not run, and dropout inside the
            frozen backbone neither. `TrainResult.stages` says which stages were cached.
            Defaults to `True`.
        jit_compile: bool or "auto". Compile training steps with XLA. "auto" is Keras' rule:
            on a GPU or TPU when every layer supports it, never on a CPU (measured there: no
            faster, and slower to trace). A step XLA cannot compile (an op it does not know)
            falls back to plain TensorFlow with a warning, and `TrainResult.stages` records it.
            Defaults to `"auto"`.
        class_weight: dict or None. `{class id: weight}` for the training loss of every
            stage (Keras' `class_weight`; `tfxfer.data.balance.class_weights` makes one from
            label frequencies). Validation metrics stay unweighted. Defaults to `None`.
        keep_better: bool. LP-FT that never makes things worse: end on the weights of the
            last head-only stage (the linear probe) instead of the fine-tuned ones when
            fine-tuning raised the validation loss and did not raise the validation accuracy
            (`tfxfer.selection`); `TrainResult.selection` says which was kept and why.
            Defaults to `False`.

    Returns:
        TrainResult with the trained model and the history of every stage.

    Raises:
        Preempted: SIGTERM arrived during training; a checkpoint was written after the step in
            flight (or the epoch that was ending), and `resume=True` continues from it. Only
            in the main thread of a single-process run with a `run_dir`; elsewhere SIGTERM
            keeps its action. The previous handler is restored when this returns or raises.

    Example:

    ```python
    result = tfxfer.run_schedule(model, backbone, tfxfer.default_schedule(), data.train,
                                 data.val)
    ```
    """
    groups = LayerGroups.of(backbones)
    validate_schedule(stages, groups)
    if loss is None:
        task = task_of(model)
        loss, default_metrics = loss_and_metrics(task, int(model.outputs[0].shape[-1]))
        metrics = default_metrics if metrics is None else metrics
    strategy = strategy or tf.distribute.get_strategy()
    monitor = monitor or ("val_loss" if val_data is not None else "loss")
    mode = resolve_monitor_mode(monitor, monitor_mode)
    config = json.loads(json.dumps(config or {}, default=str))
    trainer = _Trainer(run_dir, monitor, mode, config, is_chief(strategy))

    state = _agreed_resume_state(trainer.checkpointer, run_dir, strategy)
    done_epochs = done_step = 0
    if state is not None:
        differences = config_differences(state.get("config", {}), config)
        if differences:
            raise RunDirError(
                f"Cannot resume {run_dir.path!r}: its checkpoint was made with a different "
                f"config. Keys that differ: {differences}. Resume with the original settings, or "
                "start a new run with --overwrite or another --output-dir."
            )
        done_epochs = int(state["global_epoch"])
        # Steps into the next epoch: a checkpoint written on a preemption notice.
        done_step = int(state.get("step", 0))
        trainer.position = (done_epochs, done_step)
        trainer.history = list(state["history"])
        trainer.best = dict(state.get("best") or {})
        trainer.stages = dict(state.get("stages") or {})
        # The checkpoint's history is the truth: a kill between a checkpoint and the
        # history.csv write after it left the file an epoch short.
        trainer.write_history()
        log.info(
            "Resuming after epoch %d%s (stage %r).",
            done_epochs,
            f" and {done_step} steps of the next" if done_step else "",
            state["stage"],
        )

    # Only the process that writes checkpoints, and only when it is the whole run, stops on
    # a notice; elsewhere SIGTERM ends the process, and the run resumes as after a SIGKILL.
    listen = run_dir is not None and trainer.checkpointer.write and answers_preemption(strategy)
    # In the strategy's scope: the head model's `fit` builds the optimizer in the scope the
    # model was made in.
    with strategy.scope():
        split = split_at_head(model) if cache_features else None
    # θ₀ of an L2-SP stage: the backbone as it is now, before a resume restores anything (a
    # resumed run is built from the same pretrained weights).
    anchors = (
        {
            variable.path: variable.numpy()
            for layers in groups.groups.values()
            for layer in layers
            for variable in layer.weights
        }
        if any(s.regularizer == "l2sp" and s.regularizer_weight for s in stages)
        else None
    )
    # The frozen copy a "features" or "source_task" stage compares with, also at θ₀.
    kinds = needs_reference(stages)
    with strategy.scope():
        reference = build_reference(model, backbones, kinds) if kinds else None
    loaded = False
    stage_start = 0
    # The linear probe, which `keep_better` may go back to: the model when fine-tuning starts.
    probe_index = (
        selection.probe_stage_index(stages, [bool(s.trainable_groups(groups)) for s in stages])
        if keep_better
        else None
    )
    snapshot = selection.ProbeSnapshot(
        run_dir.checkpoints if run_dir else None, trainer.checkpointer.write
    )
    with preemption_notice(listen) as notice:
        for stage_index, stage in enumerate(stages):
            with strategy.scope():
                trainable = apply_stage(model, groups, stage)
            solver_layer = _solver_layer(model, split, stage, trainable, train_data, cache_features)
            # A solved stage is one epoch of the run; else epochs (or sized by steps).
            stage = dataclasses.replace(
                stage,
                epochs=1
                if solver_layer is not None
                else stage.epochs_for(train_data.steps_per_epoch),
            )
            # A stage with `patience` may have ended early, before an interruption.
            stage_end = trainer.stages.get(stage.name, {}).get(
                "ended_after", stage_start + int(stage.epochs)
            )
            if stage.epochs == 0 or stage_end <= done_epochs:
                stage_start = stage_end  # finished before the interruption
                continue
            if stage.learning_rate == lr_find.AUTO and solver_layer is None:
                with strategy.scope():
                    stage = _with_found_rate(
                        model,
                        split,
                        stage,
                        trainable,
                        train_data,
                        cache_features,
                        trainer,
                        loss,
                        lr_scale,
                        class_weight,
                        # A resume at this stage's start: the test runs on the restored weights.
                        state if state is not None and stage_start <= done_epochs else None,
                    )
            with strategy.scope():
                multipliers = layerwise_multipliers(groups, trainable, stage.layerwise_lr_decay)
                optimizer = make_optimizer(
                    stage, train_data.steps_per_epoch, multipliers, lr_scale, anchors
                )
                compiled = {"optimizer": optimizer, "loss": loss, "jit_compile": jit_compile}
                model.compile(metrics=fresh_metrics(metrics), **compiled)
                if state is not None and stage_start <= done_epochs:
                    loaded = True
                    # Mid-stage, the optimizer's moments and step count come back too (and with
                    # the step count, the learning rate's place in its schedule).
                    Checkpointer.restore(
                        model, state, with_optimizer=done_epochs > stage_start or done_step > 0
                    )
                    if state["stage"] == stage.name:
                        trainer.stage_best = Checkpointer.stage_best(state)
                # After the restore: the features are those of the checkpoint's weights.
                fit_model, fit_train, fit_val = _cached_or_whole(
                    model, split, stage, trainable, train_data, val_data, cache_features, trainer
                )
                if fit_model is not model:
                    # A head on features takes microseconds a step: the per-step overhead of
                    # the training loop dominates, so several steps run per call.
                    compiled["steps_per_execution"] = (
                        steps_per_execution(train_data.steps_per_epoch, done_step)
                        if one_device(strategy) and not acts_on_batches(callbacks)
                        else 1
                    )
                    fit_model.compile(metrics=fresh_metrics(metrics), **compiled)
                elif reference is not None and stage.regularizer_weight:
                    if stage.regularizer in reference.kinds:
                        # λ·L_S joins the loss: the same layers, with the frozen copy beside.
                        fit_model = reference.objective(
                            model, stage.regularizer, stage.regularizer_weight
                        )
                        fit_model.compile(metrics=fresh_metrics(metrics), **compiled)
                        trainer.stages[stage.name].update(
                            regularizer=stage.regularizer,
                            regularizer_weight=stage.regularizer_weight,
                            reference_bytes=reference.bytes,
                        )
                trainer.stages[stage.name].update(
                    steps_per_execution=compiled.get("steps_per_execution", 1),
                    jit_compile=bool(fit_model.jit_compile),
                )
            if solver_layer is not None:
                with strategy.scope():
                    _solve_stage(
                        trainer,
                        stage_index,
                        len(stages),
                        stage,
                        stage_start,
                        model,
                        fit_model,
                        solver_layer,
                        fit_train,
                        fit_val,
                        class_weight,
                        [*(callbacks or [])],
                        verbose,
                    )
                stage_start = stage_end
                continue
            initial_epoch = max(stage_start, done_epochs)
            first_step = done_step if initial_epoch == done_epochs else 0
            if probe_index is not None and stage_index == probe_index + 1:
                if initial_epoch == stage_start and not first_step:
                    snapshot.take(model)  # the probe's weights (restored, on a resume)
            if verbose:
                part = f" (epoch {initial_epoch + 1} from step {first_step + 1})"
                print(
                    f"[tfxfer] stage {stage_index + 1}/{len(stages)} {stage.name!r}: epochs "
                    f"{initial_epoch + 1}-{stage_end}{part if first_step else ''}"
                    f", training {trainable or 'head only'} at peak learning rate "
                    f"{stage.learning_rate * lr_scale:.3g}"
                    f"{f', LoRA rank {stage.lora_rank}' if stage.lora_rank else ''}",
                    flush=True,
                )
                info = trainer.stages[stage.name]
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
            # `fit` runs every epoch of one call for the same number of steps, so the rest of
            # a mid-epoch checkpoint's epoch is a call of its own, before the whole epochs.
            fits = [(initial_epoch, initial_epoch + 1, first_step)] if first_step else []
            if initial_epoch + bool(first_step) < stage_end:
                fits.append((initial_epoch + bool(first_step), stage_end, 0))
            for first_epoch, end_epoch, skip_steps in fits:
                if "ended_after" in trainer.stages[stage.name]:
                    break  # stopped at convergence in the rest of a resumed epoch
                fit_falling_back_from_xla(
                    fit_model,
                    compiled,
                    metrics,
                    trainer.stages[stage.name],
                    fit_train.build(first_epoch, skip_steps),
                    steps_per_epoch=train_data.steps_per_epoch - skip_steps,
                    validation_data=fit_val,
                    initial_epoch=first_epoch,
                    epochs=end_epoch,
                    callbacks=[
                        _StopOnNaN(stage),
                        _EpochEnd(trainer, stage_index, stage, stage_start, model),
                        *(callbacks or []),
                        # Last, so a notice that arrives during any callback of a step is
                        # answered at the end of that step.
                        StopOnPreemption(
                            trainer,
                            stage_index,
                            stage,
                            train_data.steps_per_epoch,
                            notice,
                            first_epoch,
                            skip_steps,
                            model,
                        ),
                    ],
                    shuffle=False,  # the data shuffles itself, per epoch, replayably
                    class_weight=class_weight,
                    verbose=verbose,
                )
            stage_start = trainer.stages[stage.name].get("ended_after", stage_end)
        if notice.received and trainer.position is not None:
            # The notice came after the last epoch's end was handled: its checkpoint is the
            # final one; stop before evaluation and export all the same.
            raise trainer.preempted(train_data.steps_per_epoch)
    if state is not None and not loaded:
        # Every stage had finished: the checkpoint holds the final weights.
        with strategy.scope():
            Checkpointer.restore(model, state, with_optimizer=False)
    chosen = None
    if probe_index is not None:
        chosen = selection.choose(trainer.history, stages[probe_index].name)
        if chosen["kept"] == "probe":
            if snapshot.load():
                with strategy.scope():
                    snapshot.restore(model)
                    if "solver" in trainer.stages.get(stages[probe_index].name, {}):
                        chosen["refit"] = _refit_probe_on_all_labels(
                            model,
                            groups,
                            split,
                            stages[probe_index],
                            train_data,
                            val_data,
                            class_weight,
                            int(config.get("seed", 0) or 0),
                        )
            else:
                chosen = {
                    **chosen,
                    "kept": "finetuned",
                    "reason": chosen["reason"]
                    + ", but the probe's weights were not kept (no run directory)",
                }
        log.info("Kept the %s model: %s.", chosen["kept"], chosen["reason"])
    return TrainResult(
        model,
        trainer.history,
        done_epochs,
        trainer.best,
        done_step,
        dict(trainer.stages),
        chosen,
    )
