"""TensorBoard scalars of a run: each epoch's losses, metrics and learning rate."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer import fs

# What marks a summary as a scalar for TensorBoard's scalar dashboard.
_SCALAR = tf.compat.v1.SummaryMetadata(
    plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")
)


class TensorBoardLogger(keras.callbacks.Callback):
    """Writes each epoch's losses, metrics and learning rate as TensorBoard scalars.

    The step of every value is the global epoch (Keras passes `fit`'s epoch, which
    `run_schedule` counts across stages and a resume), so one curve runs through every
    stage, and a resumed run's events continue the killed run's in the same folder.
    Training values go to `train/`, validation values to `validation/` (Keras' own layout:
    TensorBoard draws both in one chart), tagged `epoch_loss`, `epoch_accuracy`, ...,
    `epoch_learning_rate`. It acts on epochs only, so a cached stage still runs several
    steps per call (`tfxfer.train.compiling.acts_on_batches`).

    The values are written with TensorFlow's own `tf.summary.write` and the scalar plugin's
    metadata, which is what `tf.summary.scalar` writes; `tf.summary.scalar` itself comes from
    the `tensorboard` package, which a run does not need (only looking at the logs does).

    Args:
        directory: str. The folder of the event files (local or gs://).
    """

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory
        self._writers: dict[str, Any] = {}

    def on_epoch_end(self, epoch, logs=None):
        scalars: dict[str, dict[str, float]] = {"train": {}, "validation": {}}
        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            scalars[split][name] = float(value)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            scalars["train"]["learning_rate"] = float(np.asarray(optimizer.learning_rate))
        for split, values in scalars.items():
            if not values:
                continue
            if split not in self._writers:
                self._writers[split] = tf.summary.create_file_writer(fs.join(self.directory, split))
            writer = self._writers[split]
            with writer.as_default(step=epoch + 1):
                for name, value in values.items():
                    tf.summary.write(
                        f"epoch_{name}", tf.constant(value, tf.float32), metadata=_SCALAR
                    )
            writer.flush()


def tensorboard_callbacks(run_dir: Any, write: bool = True) -> list[keras.callbacks.Callback]:
    """The callbacks that log a run into `<run_dir>/tensorboard/` (none where `write` is off).

    Args:
        run_dir: RunDir or None. The entry goes through `run_dir.file` (the manifest).
        write: bool. False on the workers of a multi-worker run that write nothing.
    """
    if run_dir is None or not write:
        return []
    return [TensorBoardLogger(run_dir.file("tensorboard"))]
