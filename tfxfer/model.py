"""Joins a backbone and a head into one `keras.Model`.

For images the model takes raw uint8 images of any size: resizing and the backbone's pixel
convention are its first layer. For text the model takes the tokenized dict the backbone's
preprocessor produces, because tokenizing inside `tf.data` is much faster than inside the
training step; `tfxfer.export.serving_model` wraps it with the preprocessor so that what a
user saves and serves takes raw strings.
"""

from __future__ import annotations

import dataclasses

import keras

from tfxfer.backbones.base import Backbone
from tfxfer.errors import TfxferError
from tfxfer.heads import TASKS, HeadConfig, Task, build_head

# The output layer's activation says the task (`build_head` names that layer "predictions").
_TASK_BY_ACTIVATION = {"softmax": "single_label", "sigmoid": "multi_label", "linear": "regression"}


def build_model(
    backbone: Backbone,
    num_outputs: int,
    *,
    task: Task = "single_label",
    head: HeadConfig | None = None,
    name: str = "tfxfer_model",
) -> keras.Model:
    """The trainable model: (preprocessing for images) -> backbone -> head.

    The head's pooling defaults to the backbone's (`Backbone.default_pooling`), and the
    pooling used is recorded on the backbone (`head_pooling`), so a schedule knows which of
    its groups the head reads.

    Args:
        backbone: Backbone. From `tfxfer.build_backbone`.
        num_outputs: int. Number of classes, or of regression targets.
        task: str. "single_label", "multi_label" or "regression". Defaults to "single_label".
        head: HeadConfig or None. Defaults to `HeadConfig()`.
        name: str. The model's name.

    Returns:
        A functional `keras.Model`. Build it inside a `tf.distribute` strategy's scope to
        place its variables on every replica.

    Example:

    ```python
    backbone = tfxfer.build_backbone("resnet50", weights="imagenet", image_size=224)
    model = tfxfer.build_model(backbone, num_outputs=5)
    ```
    """
    head = head or HeadConfig()
    if head.pooling is None and backbone.output_kind != "vector":
        head = dataclasses.replace(head, pooling=backbone.default_pooling)
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
            inputs = keras.Input(
                shape=network_inputs.shape[1:], dtype=network_inputs.dtype, name="text"
            )
        features = backbone.network(inputs)
    outputs = build_head(features, backbone.output_kind, head, num_outputs, task)
    backbone.head_pooling = head.resolved_pooling(backbone.output_kind)
    return keras.Model(inputs, outputs, name=name)


def task_of(model: keras.Model) -> Task:
    """The task of a model made by `build_model`, read from its output layer's activation."""
    try:
        activation = model.get_layer("predictions").activation.__name__
    except ValueError:
        activation = None
    if activation not in _TASK_BY_ACTIVATION:
        raise TfxferError(
            f"Cannot tell the task of model {model.name!r}: it has no 'predictions' layer with a "
            f"softmax, sigmoid or linear activation (as `tfxfer.build_model` makes). Pass "
            f"`loss=` and `metrics=`, or a task from {TASKS}."
        )
    return _TASK_BY_ACTIVATION[activation]


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
