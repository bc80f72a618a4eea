"""`MaskedSequencePooling`: mean or max over a sequence's tokens, padding left out."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfxfer")
class MaskedSequencePooling(keras.layers.Layer):
    """Mean or max over the tokens of a sequence that are not padding.

    Padding tokens carry arbitrary activations; averaging them in would make a sentence's
    features depend on how long the batch's longest sentence was.

    Args:
        mode: str. "mean" or "max".
    """

    def __init__(self, mode: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("mean", "max"):
            raise ValueError(f"Expected `mode` to be 'mean' or 'max'. Received: mode={mode!r}")
        self.mode = mode

    def call(self, sequence, padding_mask):
        mask = ops.expand_dims(ops.cast(padding_mask, sequence.dtype), -1)
        if self.mode == "mean":
            total = ops.sum(sequence * mask, axis=1)
            count = ops.maximum(ops.sum(mask, axis=1), 1.0)
            return total / count
        # A large negative value where there is padding, so max ignores it.
        very_negative = ops.cast(-1e4 if sequence.dtype == "float16" else -1e9, sequence.dtype)
        return ops.max(ops.where(mask > 0, sequence, very_negative), axis=1)

    def compute_output_shape(self, sequence_shape, padding_mask_shape=None):
        return (sequence_shape[0], sequence_shape[-1])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
