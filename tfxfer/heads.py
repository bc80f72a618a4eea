"""The head: pooling, an optional dense stack with dropout, and the output layer.

The head is written once for every backbone. What changes with the backbone is only the
pooling: a spatial map is pooled over height and width, a token sequence over the tokens
that are not padding, and a vector needs no pooling at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import keras

from tfxfer.backbones.base import DEFAULT_POOLING
from tfxfer.errors import TfxferError
from tfxfer.layers.masked_sequence_pooling import MaskedSequencePooling

Task = Literal["single_label", "multi_label", "regression"]

SPATIAL_POOLINGS = ("avg", "max", "avg+max")
SEQUENCE_POOLINGS = ("cls", "mean", "max")
TASKS = ("single_label", "multi_label", "regression")


@dataclass
class HeadConfig:
    """What sits on top of the backbone.

    Args:
        pooling: str. For spatial maps: "avg", "max" or "avg+max" (both, concatenated).
            For token sequences: "cls" (the backbone's pooled [CLS] output), "mean" or "max"
            (over non-padding tokens). Defaults to `None`: the backbone's `default_pooling`
            (what its checkpoint was trained with), else "avg" for maps and "cls" for sequences.
        hidden_units: list[int]. Widths of dense hidden layers between pooling and output.
            Defaults to `[]` (a linear probe on the pooled features).
        dropout: float. Dropout rate before each dense layer. Defaults to `0.2`.
        activation: str. Activation of the hidden layers. Defaults to `"relu"`.
    """

    pooling: str | None = None
    hidden_units: list[int] = field(default_factory=list)
    dropout: float = 0.2
    activation: str = "relu"

    def validate(self, output_kind: str) -> None:
        allowed = {"spatial": SPATIAL_POOLINGS, "sequence": SEQUENCE_POOLINGS, "vector": (None,)}
        pooling = self.resolved_pooling(output_kind)
        if pooling not in allowed[output_kind]:
            raise TfxferError(
                f"Expected `pooling` to be one of {allowed[output_kind]} for a {output_kind} "
                f"backbone output. Received: pooling={self.pooling!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise TfxferError(f"Expected `dropout` in [0, 1). Received: dropout={self.dropout}")
        if any(int(units) <= 0 for units in self.hidden_units):
            raise TfxferError(
                f"Expected positive `hidden_units`. Received: hidden_units={self.hidden_units}"
            )

    def resolved_pooling(self, output_kind: str) -> str | None:
        if self.pooling is not None or output_kind == "vector":
            return self.pooling
        # `tfxfer.build_model` passes the backbone's own default; bare features get this one.
        return DEFAULT_POOLING[output_kind]


def pool_features(features, output_kind: str, pooling: str | None, prefix: str = ""):
    """Applies the pooling a `HeadConfig` asks for to a backbone's output.

    `prefix` goes before the pooling layers' names, so that several backbones' poolings can
    live in one model (`tfxfer.build_fusion_model`).
    """
    if output_kind == "vector":
        return features
    if output_kind == "spatial":
        if pooling == "avg":
            return keras.layers.GlobalAveragePooling2D(name=f"{prefix}avg_pool")(features)
        if pooling == "max":
            return keras.layers.GlobalMaxPooling2D(name=f"{prefix}max_pool")(features)
        return keras.layers.Concatenate(name=f"{prefix}avg_max_pool")(
            [
                keras.layers.GlobalAveragePooling2D(name=f"{prefix}avg_pool")(features),
                keras.layers.GlobalMaxPooling2D(name=f"{prefix}max_pool")(features),
            ]
        )
    # A token sequence: a dict with sequence_output, padding_mask and maybe pooled_output.
    if pooling == "cls":
        if "pooled_output" in features:
            return features["pooled_output"]
        return features["sequence_output"][:, 0, :]
    return MaskedSequencePooling(pooling, name=f"{prefix}masked_{pooling}_pool")(
        features["sequence_output"], features["padding_mask"]
    )


def build_head(features, output_kind: str, config: HeadConfig, num_outputs: int, task: Task):
    """Puts pooling, the dense stack and the output layer on `features` (symbolic tensors).

    Args:
        features: the backbone's symbolic output (a tensor, or a dict for sequences).
        output_kind: str. The backbone's `output_kind`.
        config: HeadConfig. Pooling, hidden layers, dropout.
        num_outputs: int. Number of classes (single- or multi-label) or regression targets.
        task: str. "single_label" (softmax), "multi_label" (sigmoid) or "regression" (linear).

    Returns:
        The symbolic output tensor, always float32: under mixed precision the last layer still
        computes in float32, because softmax and the loss lose too much in float16.
    """
    if task not in TASKS:
        raise TfxferError(f"Expected `task` to be one of {TASKS}. Received: task={task!r}")
    if num_outputs < 1:
        raise TfxferError(f"Expected at least one output. Received: num_outputs={num_outputs}")
    config.validate(output_kind)
    x = pool_features(features, output_kind, config.resolved_pooling(output_kind))
    return dense_head(mark_head_features(x), config, num_outputs, task)


def mark_head_features(pooled):
    """Marks where the head begins (the layer `tfxfer.train.features` cuts the model at).

    What is below it is a fixed function of the input while the backbone is frozen, so a
    head-only stage can train on cached features.
    """
    return keras.layers.Identity(name="head_features")(pooled)


def dense_head(x, config: HeadConfig, num_outputs: int, task: Task):
    """The dense stack with dropout and the output layer, on pooled features `x`."""
    for i, units in enumerate(config.hidden_units):
        if config.dropout:
            x = keras.layers.Dropout(config.dropout, name=f"head_dropout_{i}")(x)
        x = keras.layers.Dense(int(units), activation=config.activation, name=f"head_dense_{i}")(x)
    if config.dropout:
        x = keras.layers.Dropout(config.dropout, name="head_dropout")(x)
    activation = {"single_label": "softmax", "multi_label": "sigmoid", "regression": None}[task]
    return keras.layers.Dense(
        num_outputs, activation=activation, dtype="float32", name="predictions"
    )(x)
