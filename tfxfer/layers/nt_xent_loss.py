"""`NTXentLoss`: SimCLR's contrastive loss (Chen et al., ICML 2020) as a Keras loss.

It is computed in float32 whatever the mixed-precision policy: a temperature of 0.1
multiplies similarities by ten before an exponential, which float16 does not survive.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from tfxfer.errors import TfxferError

# Stands in for -inf on the similarity matrix's diagonal (an image is not its own negative).
EXCLUDED = -1e9


def similarity_logits(projections: tf.Tensor, temperature: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Cosine similarities / temperature (self-pairs excluded), and each row's positive."""
    z = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=1)
    rows = tf.shape(z)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits = tf.where(tf.eye(rows, dtype=tf.bool), tf.constant(EXCLUDED, tf.float32), logits)
    # Rows [0, n) are the first views, [n, 2n) the second: i's positive is i + n (mod 2n).
    half = rows // 2
    positives = tf.concat([tf.range(half, rows), tf.range(0, half)], axis=0)
    return logits, positives


def nt_xent(projections: tf.Tensor, temperature: float = 0.1) -> tf.Tensor:
    """SimCLR's NT-Xent loss of every row of `(2n, d)` projections (first views, then second).

    Row i's loss is the cross-entropy of picking its positive (the other view of its image)
    among all 2n - 1 other rows, by cosine similarity divided by `temperature`.

    Args:
        projections: tf.Tensor. `(2n, d)`: the n first views' projections, then the n
            second views' in the same image order. Cast to float32.
        temperature: float. Divides the cosine similarities; lower is sharper.

    Returns:
        float32 tensor `(2n,)`, one loss per row.
    """
    logits, positives = similarity_logits(projections, temperature)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)


def check_temperature(temperature: Any) -> float:
    """`temperature` as a float; a TfxferError unless it is a finite number > 0."""
    finite = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (finite and math.isfinite(temperature) and temperature > 0):
        raise TfxferError(
            f"Expected `temperature` to be a finite number > 0 (it divides the similarities; "
            f"SimCLR uses 0.1 to 0.5). Received: temperature={temperature!r}"
        )
    return float(temperature)


@keras.saving.register_keras_serializable(package="tfxfer")
class NTXentLoss(keras.losses.Loss):
    """NT-Xent as a Keras loss: `y_pred` is the model's `(2n, d)` projections, `y_true` unused.

    Args:
        temperature: float. > 0. SimCLR's best CIFAR-10 temperatures were 0.1 to 0.5; 0.1
            suits the small batches a CPU or one GPU trains with. Defaults to `0.1`.
    """

    def __init__(self, temperature: float = 0.1, name: str = "nt_xent", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = check_temperature(temperature)

    def call(self, y_true, y_pred):
        return nt_xent(y_pred, self.temperature)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
