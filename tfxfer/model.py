"""Joins a backbone and a head into one `keras.Model`.

For images the model takes raw uint8 images of any size: resizing and the backbone's pixel
convention are its first layer. For text the model takes the tokenized dict the backbone's
preprocessor produces, because tokenizing inside `tf.data` is much faster than inside the
training step; `tfxfer.export` wraps it with the preprocessor so that what a user saves and
serves takes raw strings.
"""

from __future__ import annotations

import keras

from tfxfer.backbones.base import Backbone
from tfxfer.heads import HeadConfig, Task, build_head


def build_model(
    backbone: Backbone,
    num_outputs: int,
    *,
    task: Task = "single_label",
    head: HeadConfig | None = None,
    name: str = "tfxfer_model",
) -> keras.Model:
    """The trainable model: (preprocessing for images) -> backbone -> head.

    Args:
        backbone: Backbone. From `tfxfer.backbones.build_backbone`.
        num_outputs: int. Number of classes, or of regression targets.
        task: str. "single_label", "multi_label" or "regression". Defaults to "single_label".
        head: HeadConfig or None. Defaults to `HeadConfig()`.
        name: str. The model's name.

    Returns:
        A functional `keras.Model`. Build it inside a `tf.distribute` strategy's scope to
        place its variables on every replica.
    """
    head = head or HeadConfig()
    if backbone.input_kind == "image":
        inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
        features = backbone.network(backbone.preprocessor(inputs))
    else:
        network_inputs = backbone.network.input
        if isinstance(network_inputs, dict):
            inputs = {
                key: keras.Input(shape=tensor.shape[1:], dtype=tensor.dtype, name=key)
                for key, tensor in network_inputs.items()
            }
        else:
            inputs = keras.Input(shape=network_inputs.shape[1:], dtype=network_inputs.dtype,
                                 name="text")
        features = backbone.network(inputs)
    outputs = build_head(features, backbone.output_kind, head, num_outputs, task)
    return keras.Model(inputs, outputs, name=name)


def loss_and_metrics(task: Task, num_outputs: int, label_smoothing: float = 0.0):
    """The loss and metrics that fit a task; labels are integer ids for single-label."""
    if task == "single_label":
        if label_smoothing:
            loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
            return loss, [keras.metrics.CategoricalAccuracy(name="accuracy")]
        return keras.losses.SparseCategoricalCrossentropy(), [
            keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        ]
    if task == "multi_label":
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing), [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc", multi_label=True, num_labels=num_outputs),
        ]
    return keras.losses.MeanSquaredError(), [keras.metrics.MeanAbsoluteError(name="mae")]
