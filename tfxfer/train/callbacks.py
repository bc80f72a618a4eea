"""The callbacks every stage's `fit` runs with: divergence check, and each epoch's bookkeeping."""

from __future__ import annotations

import logging

import keras
import numpy as np

from tfxfer.batchnorm import average_across_replicas
from tfxfer.errors import TfxferError
from tfxfer.schedule import Stage
from tfxfer.train.context import StageRun

log = logging.getLogger(__name__)


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

    def __init__(self, stage_run: StageRun):
        super().__init__()
        self.trainer = stage_run.trainer
        self.stage_index = stage_run.index
        self.stage = stage_run.stage
        self.stage_start = stage_run.start
        self.whole_model = stage_run.run.model
        self.strategy = stage_run.run.strategy

    def on_epoch_end(self, epoch, logs=None):
        # One model on every replica before it is kept, compared or checkpointed.
        average_across_replicas(self.whole_model, self.strategy)
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
        ended = f"Stage {stage.name!r} ends after epoch {global_epoch}" + (
            f" ({stage.patience} epoch(s) without improvement)" if stale else ""
        )
        log.info(
            "%s, with the weights of its best epoch %d (%s %.4g).",
            ended,
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
