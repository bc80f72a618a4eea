"""SimCLR-style contrastive pretraining of an image backbone (Chen et al., ICML 2020).

Two random views of every image go through the backbone and a small projection head; the
NT-Xent loss pulls each image's two projections together and pushes them away from those of
every other image of the batch. No labels are needed, so a backbone can learn from a folder of
unlabelled images of the user's own domain before it is fine-tuned on the few that are
labelled.

Three things here are easy to get subtly wrong, and are done on purpose:

- The views are **replayable**. Every random choice of a training batch is a stateless op
  seeded by `(seed, global step)`, so a run resumed in the middle of an epoch sees exactly the
  views the uninterrupted run saw (the batches themselves replay through `epoch_batches`).
- The loss is computed in float32, whatever the mixed-precision policy: a temperature of 0.1
  multiplies similarities by ten before an exponential, which float16 does not survive.
- Under `tf.distribute` each replica computes NT-Xent over its own share of the global batch:
  its negatives are the other images on that replica (SimCLR gathers them across replicas,
  which matters for batches of thousands; not for the batches one machine trains with).
  Keras scales each replica's loss by the number of replicas, so the gradient is the mean.

BatchNormalization trains during pretraining. Keras' ImageNet networks keep moving statistics
with a momentum of 0.99 or 0.999, which a short pretraining never lets settle, so before the
backbone is written its moving statistics are recomputed over the un-augmented training
images (`recalibrate_batchnorm`): the fine-tuning recipes run frozen BatchNorm layers in
inference mode, on exactly those statistics.

This module holds the views, the objective and the model. The unlabelled images and their
batches of two views are in `tfxfer.pretrain.contrastive_data`; what runs after training
(recalibration, the weights file, the linear probe) is in `tfxfer.pretrain.contrastive_finish`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from tfxfer.backbones.base import Backbone
from tfxfer.layers.contrastive_accuracy import ContrastiveAccuracy as ContrastiveAccuracy
from tfxfer.layers.contrastive_accuracy import contrastive_accuracy as contrastive_accuracy
from tfxfer.layers.nt_xent_loss import NTXentLoss as NTXentLoss
from tfxfer.layers.nt_xent_loss import check_temperature as check_temperature
from tfxfer.layers.nt_xent_loss import nt_xent as nt_xent

# What `config.json["pretraining"]["objective"]` says.
OBJECTIVE = "simclr"


# === Views ===


@dataclass
class ViewAugmentation:
    """SimCLR's random views, as stateless ops on a batch of uint8 images.

    Each view is a random resized crop (scale and aspect ratio drawn per image), a random
    horizontal flip, colour jitter (brightness, contrast, saturation, with probability 0.8)
    and random grayscale. Hue jitter and Gaussian blur are left out: `tf.image` shifts the hue
    of a whole batch at once, and SimCLR itself drops blur on small (CIFAR-sized) images.

    Args:
        min_crop_area: float. Smallest crop, as a share of the image's area. SimCLR uses
            0.08 on ImageNet; small images keep little at that scale. Defaults to `0.2`.
        flip: bool. Random horizontal flips. Defaults to `True`.
        color_jitter: float. SimCLR's jitter strength s: brightness, contrast and saturation
            factors are drawn from [1 - 0.8s, 1 + 0.8s]; 0 turns jitter off. Defaults to `0.5`.
        grayscale: float. Probability that a view is turned gray. Defaults to `0.2`.
    """

    min_crop_area: float = 0.2
    flip: bool = True
    color_jitter: float = 0.5
    grayscale: float = 0.2

    def problems(self) -> list[str]:
        """Every invalid field, as "name=value (expected ...)"."""
        found = []
        if not (_finite(self.min_crop_area) and 0 < self.min_crop_area <= 1):
            found.append(f"min_crop_area={self.min_crop_area!r} (expected a number in (0, 1])")
        if not (_finite(self.color_jitter) and 0 <= self.color_jitter < 1.25):
            found.append(f"color_jitter={self.color_jitter!r} (expected a number in [0, 1.25))")
        if not (_finite(self.grayscale) and 0 <= self.grayscale <= 1):
            found.append(f"grayscale={self.grayscale!r} (expected a probability in [0, 1])")
        return found

    def view(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """One random view of each image of a `(batch, h, w, 3)` uint8 batch, from `seed`.

        Args:
            images: tf.Tensor. uint8 images of one size.
            seed: tf.Tensor. A stateless seed, shape `(2,)`; the same seed gives the same view.
        """
        # Static where the batches are full (`epoch_batches` drops a partial last batch).
        batch = images.shape[0] or tf.shape(images)[0]
        height, width = images.shape[1], images.shape[2]

        def uniform(k: int, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
            return tf.random.stateless_uniform(
                [batch], tf.random.experimental.stateless_fold_in(seed, k), low, high
            )

        x = tf.cast(images, tf.float32) / 255.0
        # Random resized crop: a box of random area and aspect ratio, resized back.
        area = uniform(0, self.min_crop_area, 1.0)
        ratio = tf.exp(uniform(1, math.log(3 / 4), math.log(4 / 3)))
        box_h = tf.minimum(tf.sqrt(area / ratio), 1.0)
        box_w = tf.minimum(tf.sqrt(area * ratio), 1.0)
        top, left = uniform(2) * (1 - box_h), uniform(3) * (1 - box_w)
        boxes = tf.stack([top, left, top + box_h, left + box_w], axis=1)
        x = tf.image.crop_and_resize(x, boxes, tf.range(batch), [height, width])
        if self.flip:
            x = tf.where(_per_image(uniform(4) < 0.5), tf.reverse(x, axis=[2]), x)
        if self.color_jitter:
            spread = 0.8 * self.color_jitter
            jittered = x * _per_image(uniform(5, 1 - spread, 1 + spread))
            mean = tf.reduce_mean(jittered, axis=[1, 2, 3], keepdims=True)
            jittered = (jittered - mean) * _per_image(uniform(6, 1 - spread, 1 + spread)) + mean
            gray = tf.image.rgb_to_grayscale(jittered)
            jittered = gray + (jittered - gray) * _per_image(uniform(7, 1 - spread, 1 + spread))
            x = tf.where(_per_image(uniform(8) < 0.8), tf.clip_by_value(jittered, 0, 1), x)
        if self.grayscale:
            gray = tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3])
            x = tf.where(_per_image(uniform(9) < self.grayscale), gray, x)
        return tf.cast(tf.round(tf.clip_by_value(x, 0, 1) * 255.0), tf.uint8)

    def pair(self, images: tf.Tensor, seed: tf.Tensor, first_view: int = 0):
        """`((view_1, view_2), dummy labels)`: the two views a training step compares."""
        views = tuple(
            self.view(images, tf.random.experimental.stateless_fold_in(seed, first_view + v))
            for v in (0, 1)
        )
        return views, tf.zeros([tf.shape(images)[0]], tf.int32)


def _per_image(values: tf.Tensor) -> tf.Tensor:
    return tf.reshape(values, [-1, 1, 1, 1])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# === Objective ===
# NT-Xent and its accuracy live in `tfxfer.layers` (saved models name them); importable here.


def contrastive_model(
    backbone: Backbone,
    *,
    projection_dim: int = 128,
    hidden_units: int = 512,
    batchnorm_momentum: float | None = 0.9,
) -> keras.Model:
    """The model SimCLR trains: two uint8 views in, `(2n, projection_dim)` projections out.

    Both views go through the backbone as one batch (so BatchNorm sees both), then average
    pooling and the projection head (Dense-ReLU-Dense). The projections are float32.

    Args:
        backbone: Backbone. An image backbone (`build_vision_backbone`).
        projection_dim: int. Width of the projections the loss compares. Defaults to `128`.
        hidden_units: int. Width of the projection head's hidden layer. Defaults to `512`.
        batchnorm_momentum: float or None. Sets the momentum of the backbone's BatchNorm
            layers, so that their moving statistics follow training within tens of steps
            (Keras' 0.999 takes thousands) and the held-out loss, measured in inference mode,
            means something. None keeps the network's own. Defaults to `0.9`.
    """
    if batchnorm_momentum is not None:
        for layer in backbone.network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = float(batchnorm_momentum)
    size = int(backbone.info["image_size"])
    views = [keras.Input((size, size, 3), dtype="uint8", name=f"view_{i}") for i in (1, 2)]
    x = keras.layers.Concatenate(axis=0, name="both_views")(
        [backbone.preprocessor(v) for v in views]
    )
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.network(x))
    x = keras.layers.Dense(hidden_units, activation="relu", name="projection_hidden")(x)
    x = keras.layers.Dense(projection_dim, dtype="float32", name="projection")(x)
    return keras.Model(views, x, name="simclr")
