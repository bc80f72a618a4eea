"""`ContrastiveAccuracy`: how often an image's other view is its best match in the batch."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfxfer.layers.nt_xent_loss import similarity_logits


def contrastive_accuracy(y_true, y_pred) -> tf.Tensor:
    """Per row, 1.0 when its positive is its most similar other row (else 0.0)."""
    logits, positives = similarity_logits(y_pred, 1.0)
    return tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), positives), "float32")


@keras.saving.register_keras_serializable(package="tfxfer")
class ContrastiveAccuracy(keras.metrics.MeanMetricWrapper):
    """How often an image's other view is its best match in the batch; named "accuracy"."""

    def __init__(self, name: str = "accuracy", dtype=None):
        super().__init__(fn=contrastive_accuracy, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}
