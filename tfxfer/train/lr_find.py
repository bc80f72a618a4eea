"""The learning-rate range test: a suggested peak learning rate for a stage, and its plot.

Leslie Smith's test (Cyclical Learning Rates, 2017), as fastai's `lr_find` made familiar:
train the stage's layers for a short while with a learning rate that grows exponentially
from `start` to `end`, one step at a time, and record the loss. The loss first barely moves
(the rate is too small to matter), then falls, then blows up. The suggestion is the rate at
the smoothed loss's minimum divided by 10: the largest rate that is still safely on the
falling part. The steepest point of the fall is recorded beside it.

The test trains a throwaway optimizer on the stage's own batches (cached features for a head
stage, as the stage itself would), then puts every weight back, so the stage starts from
exactly where it would have started without it. `Stage(learning_rate="auto")` runs it at the
start of the stage (`run_schedule` records the rate found in `stages.json` and reuses it on a
resume); `tfxfer lr-find RECIPE_OR_CONFIG --stage NAME` runs it alone and writes the plot
(through `find_learning_rate`, the test for one stage of a model, from its weights as they are).

This module is the one home of the test: the measurement (`range_test`, `suggest`), its plot
(`plot_finding`), the test of a schedule's stage (`range_test_of_stage`, `with_found_rate`)
and the public `find_learning_rate`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import types
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer import fs
from tfxfer.backbones.base import Backbone, LayerGroups
from tfxfer.data.pipeline import TrainData
from tfxfer.errors import TfxferError
from tfxfer.model import loss_and_metrics, task_of
from tfxfer.schedule import Stage, apply_stage
from tfxfer.train.checkpoints import Checkpointer
from tfxfer.train.compiling import build_before_tracing
from tfxfer.train.context import ScheduleRun, StageRun, cached_or_whole
from tfxfer.train.features import split_at_head

log = logging.getLogger(__name__)

# The rate at which a stage's learning rate is found by the range test.
AUTO = "auto"

DEFAULT_START = 1e-7
DEFAULT_END = 10.0
DEFAULT_STEPS = 100
# The test stops once the smoothed loss exceeds this multiple of its minimum.
DIVERGENCE = 4.0
# Exponential smoothing of the per-step loss (bias-corrected, as in Smith's and fastai's).
SMOOTHING = 0.9
# Below this relative fall of the smoothed loss the curve is flat: no rate to read off it.
MIN_FALL = 0.02
# The rates used when the curve is flat: tfxfer's defaults for a head and for fine-tuning.
FALLBACK_HEAD = 1e-3
FALLBACK_FINETUNE = 1e-4


@dataclass
class LRFinding:
    """What a range test measured, and what it suggests.

    Attributes:
        learning_rates: the rate of each step.
        losses: the training loss of each step's batch.
        smoothed: the bias-corrected exponential moving average of `losses`.
        suggestion: the rate at the smoothed minimum / 10 (the rate to use).
        steepest: the rate where the smoothed loss fell fastest (per log-rate).
        minimum: the rate at the smoothed loss's minimum.
        stopped_early: whether the loss diverged before `end`.
        fell: whether the smoothed loss fell by at least `MIN_FALL` of its start anywhere: if
            not, the test found nothing, and the suggestion is the caller's fallback.
    """

    learning_rates: list[float]
    losses: list[float]
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = float("nan")
    steepest: float = float("nan")
    minimum: float = float("nan")
    stopped_early: bool = False
    fell: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def suggest(
    learning_rates: list[float], losses: list[float], fallback: float | None = None
) -> LRFinding:
    """Smooths the losses and picks the suggestion (`fallback` when the curve is flat)."""
    smoothed, average = [], 0.0
    for step, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING**step))
    finding = LRFinding(list(learning_rates), list(losses), smoothed)
    finite = [i for i, value in enumerate(smoothed) if math.isfinite(value)]
    if len(finite) < 5:
        raise TfxferError(
            f"The learning-rate range test got only {len(finite)} finite losses. Raise "
            "--steps, or lower the start rate; the data may also hold NaN inputs."
        )
    best = min(finite, key=lambda i: smoothed[i])
    finding.minimum = float(learning_rates[best])
    finding.suggestion = finding.minimum / 10
    start = smoothed[finite[0]]
    finding.fell = start - smoothed[best] >= MIN_FALL * abs(start)
    if not finding.fell and fallback is not None:
        finding.suggestion = float(fallback)
    if best >= 2:
        logs = np.log(np.asarray(learning_rates[: best + 1]))
        slopes = np.gradient(np.asarray(smoothed[: best + 1]), logs)
        finding.steepest = float(learning_rates[int(np.argmin(slopes))])
    else:
        finding.steepest = finding.minimum
    return finding


class _ExponentialRate(keras.callbacks.Callback):
    """Sets the rate of each step and records its loss; stops the fit once the loss diverges."""

    def __init__(self, start: float, end: float, steps: int):
        super().__init__()
        self.start, self.steps = start, steps
        self.factor = (end / start) ** (1 / max(steps - 1, 1))
        self.learning_rates: list[float] = []
        self.losses: list[float] = []
        self.best = float("inf")
        self.stopped_early = False

    def on_epoch_begin(self, epoch, logs=None):
        rate = self.start * self.factor**epoch
        self.model.optimizer.learning_rate = rate
        self.learning_rates.append(rate)

    def on_epoch_end(self, epoch, logs=None):
        # One step per epoch: the epoch's loss is that one batch's.
        loss = float((logs or {}).get("loss", float("nan")))
        self.losses.append(loss)
        if math.isfinite(loss):
            self.best = min(self.best, loss)
        if not math.isfinite(loss) or loss > DIVERGENCE * self.best:
            self.stopped_early = epoch + 1 < self.steps
            self.model.stop_training = True


def range_test(
    model: keras.Model,
    batches: tf.data.Dataset,
    *,
    loss: Any,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    start: float = DEFAULT_START,
    end: float = DEFAULT_END,
    steps: int = DEFAULT_STEPS,
    class_weight: dict[int, float] | None = None,
    fallback: float | None = None,
) -> LRFinding:
    """Runs the range test on `model` (whose trainable layers are the stage's) and restores it.

    Args:
        model: keras.Model. What the stage fits (the whole model, or the head on features).
        batches: an endless (or long enough) dataset of the stage's training batches.
        loss: the stage's loss.
        optimizer: "adamw", "adam" or "sgd", as the stage's.
        weight_decay: float. AdamW's decay, as the stage's.
        start, end: float. The first and the largest rate tried.
        steps: int. Steps from `start` to `end` (fewer if the loss diverges first).
        class_weight: as the stage trains with.
        fallback: float or None. The suggestion when the loss does not fall (a flat curve).

    Returns:
        The `LRFinding`. The model's weights are those it had before the test, and it is left
        uncompiled for the stage to compile.
    """
    if not (0 < start < end) or steps < 5:
        raise TfxferError(
            f"The range test needs 0 < start < end and at least 5 steps; got start={start}, "
            f"end={end}, steps={steps}."
        )
    kinds = {
        "adamw": lambda: keras.optimizers.AdamW(start, weight_decay=weight_decay),
        "adam": lambda: keras.optimizers.Adam(start),
        "sgd": lambda: keras.optimizers.SGD(start, momentum=0.9),
    }
    saved = [np.array(value) for value in model.get_weights()]
    recorder = _ExponentialRate(start, end, steps)
    model.compile(optimizer=kinds[optimizer](), loss=loss)
    try:
        build_before_tracing(model, batches)
        model.fit(
            batches,
            epochs=steps,
            steps_per_epoch=1,
            callbacks=[recorder],
            class_weight=class_weight,
            shuffle=False,
            verbose=0,
        )
    finally:
        model.set_weights(saved)
    finding = suggest(recorder.learning_rates[: len(recorder.losses)], recorder.losses, fallback)
    finding.stopped_early = recorder.stopped_early
    return finding


def plot_finding(finding: LRFinding, path: str, title: str = "") -> str | None:
    """Saves loss against learning rate (log scale), the suggestion and the steepest point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(finding.learning_rates, finding.losses, color="0.75", lw=1, label="loss per step")
    ax.plot(finding.learning_rates, finding.smoothed, color="C0", lw=2, label="smoothed")
    ax.set_xscale("log")
    finite = [v for v in finding.smoothed if math.isfinite(v)]
    if finite:  # the divergence at the end would flatten everything else
        low, first = min(finite), finite[0]
        ax.set_ylim(low - 0.1 * abs(first - low) - 1e-3, max(first, low) * 1.3 + 1e-3)
    ax.axvline(finding.suggestion, color="C2", ls="--", label=f"suggested {finding.suggestion:.2g}")
    if math.isfinite(finding.steepest):
        ax.axvline(finding.steepest, color="C1", ls=":", label=f"steepest {finding.steepest:.2g}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    if not finding.fell:
        title = (title + "\n" if title else "") + "the loss did not fall: no rate to read off"
    ax.set_title(title or "learning-rate range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    fs.makedirs(fs.dirname(path) if fs.is_url(path) else os.path.dirname(os.path.abspath(path)))
    fs.write_bytes(path, image.getvalue())
    return path


def range_test_of_stage(stage_run: StageRun, steps: int | None = None) -> LRFinding:
    """The range test on what the stage fits (its head on cached features where it can)."""
    run, stage = stage_run.run, stage_run.stage
    cached_or_whole(stage_run, with_val=False)
    finding = range_test(
        stage_run.fit_model,
        stage_run.fit_train.build(0),
        loss=run.loss,
        optimizer=stage.optimizer,
        weight_decay=stage.weight_decay,
        steps=steps or DEFAULT_STEPS,
        class_weight=run.class_weight,
        # A flat curve tells nothing: the usual rate of a head, or of fine-tuning.
        fallback=FALLBACK_HEAD if not stage_run.trainable else FALLBACK_FINETUNE,
    )
    if not finding.fell:
        log.warning(
            "Stage %r: the loss did not fall anywhere in the learning-rate range test (a "
            "frozen or randomly initialised network can give a flat curve); using %.3g.",
            stage.name,
            finding.suggestion,
        )
    return finding


def with_found_rate(stage_run: StageRun) -> Stage:
    """The stage with the learning rate the range test finds (`learning_rate="auto"`).

    The rate found is recorded in `stages.json` (with the test's minimum and steepest
    points) and, on a resume, read back rather than measured again. A resume at the stage's
    start tests on the checkpoint's weights. The plot goes to `lr_find_<stage>.png` in the
    run directory.
    """
    run, stage, trainer = stage_run.run, stage_run.stage, stage_run.trainer
    info = stage_run.info
    found = info.get("found_learning_rate")
    if found is None:
        if stage_run.resumes_here:
            Checkpointer.restore(run.model, run.state, with_optimizer=False)
        finding = range_test_of_stage(stage_run)
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
            plot_finding(
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
    return dataclasses.replace(stage, learning_rate=float(found) / run.lr_scale)


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
) -> LRFinding:
    """The learning-rate range test for `stage`, from the model's weights as they are.

    Sets the stage's trainable layers, trains a throwaway optimizer on the stage's batches
    with an exponentially growing rate, and puts every weight back (`range_test`).

    Args:
        model, backbones, train_data, loss, strategy, cache_features, class_weight: as for
            `run_schedule`.
        stage: Stage. Which layers train, and the optimizer kind; its rate is not used.
        steps: int or None. Steps of the test. Defaults to `DEFAULT_STEPS` (100): fewer
            spread the eight decades of rates too thinly to see where the loss falls.

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
        run = ScheduleRun(
            model,
            groups,
            [stage],
            train_data,
            # What `cached_or_whole` records, unused.
            trainer=types.SimpleNamespace(stages={}),
            strategy=strategy,
            loss=loss,
            cache_features=cache_features,
            class_weight=class_weight,
            split=split_at_head(model) if cache_features else None,
        )
        return range_test_of_stage(StageRun(run, 0, stage, trainable=trainable), steps)
