"""LP-FT that never makes things worse: keep the linear probe when fine-tuning hurt.

Fine-tuning starts from the head fit on the frozen backbone (the linear probe, LP), and
usually improves on it. With few labels, a high learning rate or a backbone that does not
suit the data, it can also make things worse, and then the run should end on the probe.

The rule, made for validation sets of a handful of examples: both models, the probe (its
snapshot, put back for the purpose) and the fine-tuned one, score every validation example,
and the fine-tuned model is kept only when it lowers the mean loss, and by more than the
noise of those examples: the mean of the per-example differences (probe's loss minus
fine-tuned's) exceeds `SELECTION_Z` standard errors of that mean, or the examples it
improves outnumber those it worsens by more than `SELECTION_Z` standard deviations of a
fair coin's count (a sign test: per-example losses are heavy-tailed, and a gain 41 of 48
examples share can hide under the standard error a few confidently wrong ones make). A gain
that a few examples carry, on a split of 10, does not count; a steady one does. Ties go
to the probe, because a kept solved probe is then fit again on the training and validation
examples together (`selection["refit"]`): the validation split has done its job, and its
labels are worth more in the head (the run's validation metrics are then no longer held out;
the test split's are). The rule came from the image recipe from random weights at 4-16
labels a class, where the earlier rule (fine-tuned kept unless its last epoch's validation
loss and accuracy were both worse) kept a fine-tuned model in 12 of 18 runs, and in 7 of
the 9 that the mean's test alone turned to the probe the probe scored higher on the test
images; the sign test came from a text run at 64 a class that the mean's test alone sent
back to the probe, 2.7 points below the fine-tuned model (benchmarks/README.md, "LP-FT's
choice").

Where the per-example comparison cannot be made (no snapshot, fewer than 2 validation
examples), the last epochs of the probe's stage and of the run are compared instead, and the
fine-tuned model is kept unless it is worse by both validation loss and accuracy. Without
validation data the fine-tuned model is kept: there is nothing to choose by. What was kept,
and why, is `TrainResult.selection` and `metrics.json`'s `selection`.

The probe's weights are kept in memory when fine-tuning starts, and in
`checkpoints/linear_probe.npz` so that a resumed run can still go back to them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer import fs
from tfxfer.errors import TfxferError
from tfxfer.schedule import Stage

SNAPSHOT_FILE = "linear_probe.npz"
# The fine-tuned model must lower the mean per-example validation loss by this many standard
# errors of the mean difference (one-sided, about 84% confidence for a normal mean).
SELECTION_Z = 1.0


def probe_stage_index(stages: Sequence[Stage], trains_backbone: Sequence[bool]) -> int | None:
    """The last head-only stage that a backbone-training stage follows, or None."""
    probe = None
    for index, (stage, backbone) in enumerate(zip(stages, trains_backbone, strict=True)):
        if stage.epochs == 0:
            continue
        if not backbone:
            probe = index
        elif probe is not None:
            return probe
    return None


class ProbeSnapshot:
    """The model's variables at the end of the probe stage, in memory and on disk."""

    def __init__(self, directory: str | None, write: bool):
        self.path = fs.join(directory, SNAPSHOT_FILE) if directory else None
        self.write = write
        # In `model.variables` order, with each variable's path beside it. Paths alone are not
        # keys: two fused backbones may both have a `conv1_conv/kernel`.
        self.paths: list[str] | None = None
        self.values: list[np.ndarray] | None = None

    def take(self, model: keras.Model) -> None:
        self.paths = [v.path for v in model.variables]
        self.values = [np.array(v.numpy()) for v in model.variables]
        if self.path and self.write:
            buffer = io.BytesIO()
            np.savez(
                buffer,
                **{_key(i): value for i, value in enumerate(self.values)},
                paths=np.array(self.paths),
            )
            tmp = self.path + ".tmp"
            fs.write_bytes(tmp, buffer.getvalue())
            fs.rename(tmp, self.path)

    def load(self) -> bool:
        """Reads the snapshot a run wrote before it was interrupted; False if there is none."""
        if self.values is not None:
            return True
        if not self.path or not fs.exists(self.path):
            return False
        with np.load(io.BytesIO(fs.read_bytes(self.path))) as arrays:
            self.paths = [str(p) for p in arrays["paths"]]
            self.values = [arrays[_key(i)] for i in range(len(self.paths))]
        return True

    def restore(self, model: keras.Model) -> None:
        """Puts the snapshot back. Variables are matched by path, and where several share a
        path (two fused backbones may both have a `conv1_conv/kernel`), in the order they come
        in `model.variables`, which is the order they were taken in."""
        by_path: dict[str, list[np.ndarray]] = {}
        for path, value in zip(self.paths, self.values, strict=True):
            by_path.setdefault(path, []).append(value)
        for variable in model.variables:
            waiting = by_path.get(variable.path)
            if waiting:
                value = waiting.pop(0)
                if tuple(variable.shape) != value.shape:
                    raise TfxferError(
                        f"The linear-probe snapshot {self.path or '(in memory)'} was taken of "
                        f"another model: {variable.path} has shape {tuple(variable.shape)} "
                        f"here and {value.shape} there. Start the run again without --resume."
                    )
                variable.assign(value)


def _key(index: int) -> str:
    return f"v{index:05d}"


def example_losses(
    model: keras.Model, dataset: tf.data.Dataset, loss: Any
) -> tuple[np.ndarray, np.ndarray] | None:
    """`(losses, labels)` of every example of a batched `(x, y[, weight])` dataset, in
    order: one compiled forward pass in inference mode, each loss times its sample weight
    where the data has one. None when the loss does not give one value per example (a
    user's loss function that returns its mean)."""
    function = keras.losses.get(loss) if isinstance(loss, str) else loss
    per_example = function.call if isinstance(function, keras.losses.Loss) else function
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    values, labels = [], []
    for batch in dataset:
        x, y = batch[0], batch[1]
        output = tf.cast(forward(x), "float32")
        value = np.atleast_1d(np.asarray(per_example(tf.cast(y, output.dtype), output), "float64"))
        if value.shape[0] != int(tf.shape(output)[0]):
            return None
        if len(batch) > 2 and batch[2] is not None:
            value = value * np.asarray(batch[2], "float64").reshape(value.shape[0], -1)[:, 0]
        values.append(value.reshape(value.shape[0], -1).mean(axis=1))
        labels.append(np.asarray(y).reshape(value.shape[0], -1))
    if not values:
        return np.zeros(0), np.zeros((0, 1))
    return np.concatenate(values), np.concatenate(labels)


def paired_comparison(probe: np.ndarray, finetuned: np.ndarray) -> dict[str, Any] | None:
    """The per-example loss differences' mean and standard error, or None under 2 examples."""
    if len(probe) != len(finetuned) or len(probe) < 2:
        return None
    probe, finetuned = np.asarray(probe, "float64"), np.asarray(finetuned, "float64")
    probe_ok, finetuned_ok = np.isfinite(probe), np.isfinite(finetuned)
    # A model that outputs NaN or infinity on an example is worse on it; both: a tie.
    both = probe_ok & finetuned_ok
    gains = np.where(
        both,
        np.nan_to_num(probe - finetuned),  # only read where both are finite
        np.where(finetuned_ok, 1e9, np.where(probe_ok, -1e9, 0.0)),
    )
    return {
        "examples": int(len(gains)),
        "probe_loss": float(np.mean(probe)) if np.all(probe_ok) else None,
        "finetuned_loss": float(np.mean(finetuned)) if np.all(finetuned_ok) else None,
        "mean_gain": float(np.mean(gains)),
        "standard_error": float(np.std(gains, ddof=1) / math.sqrt(len(gains))),
        "examples_better": int(np.sum(gains > 0)),
        "examples_worse": int(np.sum(gains < 0)),
    }


def choose(
    history: list[dict[str, Any]], probe_stage: str, paired: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Whether to keep the fine-tuned model or go back to the probe, and why.

    `paired` is `paired_comparison` of the two models' validation losses; without it, the
    history's last epochs decide (see the module's docstring)."""
    if paired is not None:
        return _by_examples(paired, probe_stage)
    probe_rows = [row for row in history if row.get("stage") == probe_stage]
    if not probe_rows or not history:
        return {"kept": "finetuned", "reason": "the probe stage left no history"}
    probe, final = probe_rows[-1], history[-1]
    compared = {
        key: {"probe": _number(probe.get(key)), "finetuned": _number(final.get(key))}
        for key in ("val_loss", "val_accuracy")
        if _number(probe.get(key)) is not None and _number(final.get(key)) is not None
    }
    if "val_loss" not in compared:
        return {"kept": "finetuned", "reason": "no validation data to choose by"}
    loss, accuracy = compared["val_loss"], compared.get("val_accuracy")
    worse_loss = loss["finetuned"] > loss["probe"]
    no_better_accuracy = accuracy is None or accuracy["finetuned"] <= accuracy["probe"]
    if worse_loss and no_better_accuracy:
        kept, reason = (
            "probe",
            (
                "fine-tuning raised the validation loss"
                + (" and did not raise the validation accuracy" if accuracy else "")
            ),
        )
    else:
        kept = "finetuned"
        reason = (
            "fine-tuning lowered the validation loss"
            if not worse_loss
            else "fine-tuning raised the validation accuracy"
        )
    return {
        "kept": kept,
        "reason": reason,
        "probe_stage": probe_stage,
        "rule": "last_epochs",
        "compared": compared,
    }


def _by_examples(paired: dict[str, Any], probe_stage: str) -> dict[str, Any]:
    gain, error = paired["mean_gain"], paired["standard_error"]
    better, worse = paired["examples_better"], paired["examples_worse"]
    counts = f"{better} of {paired['examples']} validation examples scored better, {worse} worse"
    # The mean's test, and a sign test beside it: per-example losses are heavy-tailed (a
    # fine-tuned model is surer of itself, and the few examples it gets wrong cost it much),
    # so a gain most examples share can hide under the standard error of a handful.
    by_mean = gain > SELECTION_Z * error
    by_count = better - worse > SELECTION_Z * math.sqrt(better + worse)
    if gain > 0 and (by_mean or by_count):
        kept = "finetuned"
        reason = f"fine-tuning lowered the validation loss by {gain:.4g} an example, " + (
            f"more than {SELECTION_Z:g} standard error ({error:.3g})"
            if by_mean
            else f"on clearly more examples than it raised it ({better} against {worse})"
        )
        reason += f"; {counts}"
    else:
        kept = "probe"
        reason = (
            f"fine-tuning did not lower the validation loss; {counts}"
            if gain <= 0
            else f"fine-tuning lowered the validation loss by {gain:.4g} an example, not more "
            f"than {SELECTION_Z:g} standard error ({error:.3g}) nor on clearly more examples "
            f"than it raised it; {counts}"
        )
    return {
        "kept": kept,
        "reason": reason,
        "probe_stage": probe_stage,
        "rule": "paired",
        "paired": {**paired, "z": SELECTION_Z},
    }


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
