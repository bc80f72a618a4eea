"""The state of one `run_schedule` call: history, best epoch, per-stage records, checkpoints.

`Trainer` is what every epoch's end, a preemption notice and a resume read and write: the
history rows (`history.csv`), the best value of the monitored metric (`best.weights.h5`), the
per-stage records (`stages.json` via `TrainResult.stages`) and the `Checkpointer` of the run
directory. The names of these files and the keys of the checkpoint's state are what a run
written before today resumes from, so they do not change.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras.src.saving import saving_lib

from tfxfer import fs
from tfxfer.errors import Preempted, TfxferError
from tfxfer.rundir import RunDir, atomic_write_text
from tfxfer.schedule import Stage
from tfxfer.train.checkpoints import Checkpointer, checkpoint_name

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


class Trainer:
    """What the stages of one run share and record; writes checkpoints, best weights, history."""

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
        self.checkpointer = Checkpointer(directory, write=chief) if directory else NoCheckpoints()
        # (global epoch, step) of the newest checkpoint, written or resumed from.
        self.position: tuple[int, int] | None = None
        # The features of the cached stage in progress (`tfxfer.train.features.CachedStage`).
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

    def preempted(self, steps_per_epoch: int, signum: int = 15) -> Preempted:
        """The `Preempted` that names the newest checkpoint (an epoch's end, or mid-epoch);
        `signum` is the signal that stopped the run (SIGTERM 15, SIGINT 2)."""
        global_epoch, step = self.position
        name = checkpoint_name(global_epoch, step)
        path = os.path.join(self.checkpointer.directory, name)
        if step:
            return Preempted(global_epoch + 1, step, path, signum=signum)
        return Preempted(global_epoch, steps_per_epoch, path, signum=signum)

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


class NoCheckpoints:
    """The checkpointer of a run without a run directory: keeps nothing."""

    write = False

    def latest(self):
        return None

    def save(self, model, state, stage_best=None):
        pass
