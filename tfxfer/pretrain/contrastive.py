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
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer import fs
from tfxfer.backbones.base import Backbone
from tfxfer.data.examples import Examples
from tfxfer.data.images import IMAGE_EXTENSIONS, decode_and_resize
from tfxfer.data.pipeline import TrainData, epoch_batches
from tfxfer.errors import DataError
from tfxfer.layers.contrastive_accuracy import ContrastiveAccuracy as ContrastiveAccuracy
from tfxfer.layers.contrastive_accuracy import contrastive_accuracy as contrastive_accuracy
from tfxfer.layers.nt_xent_loss import NTXentLoss as NTXentLoss
from tfxfer.layers.nt_xent_loss import check_temperature as check_temperature
from tfxfer.layers.nt_xent_loss import nt_xent as nt_xent
from tfxfer.rundir import TMP_PREFIX, RunDir

# The entry of the run directory that holds the pretrained backbone.
WEIGHTS_FILE = "backbone.weights.h5"
# What `config.json["pretraining"]["objective"]` says.
OBJECTIVE = "simclr"
# The smallest batch of the eager passes after training (recalibration, probe features).
MEASURE_BATCH_SIZE = 64


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


# === Data ===


def list_unlabelled_images(directory: str) -> list[str]:
    """Every image file anywhere under `directory`, sorted; class subfolders mean nothing.

    Hidden files and folders are skipped, as the labelled loaders skip them; files that do
    not decode are skipped too (an unlabelled folder is often a dump of mixed files).

    Raises:
        DataError: the folder is missing or holds no readable image.
    """
    from tfxfer.data.images import _decodes

    if not fs.isdir(directory):
        raise DataError(
            f"Image folder not found: {directory!r}. Pass --data-dir, a folder of unlabelled "
            "images (in subfolders or not)."
        )
    files, _ = fs.visible_files(directory)
    paths = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS) and _decodes(p)]
    if not paths:
        raise DataError(
            f"Image folder {directory!r} holds no readable images (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)} anywhere under it). Point --data-dir at the "
            "folder your images are in."
        )
    return paths


def decoded_images(paths: list[str], image_size: int) -> tf.data.Dataset:
    """Unbatched uint8 images of `image_size`, in `paths` order, decoded once and cached."""
    return (
        tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
        .map(lambda p: decode_and_resize(p, image_size), num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
    )


def contrastive_train_data(
    images: tf.data.Dataset,
    *,
    num_examples: int,
    batch_size: int,
    seed: int,
    views: ViewAugmentation,
) -> TrainData:
    """Training batches of two views each, replayable from any step of any epoch.

    The batches replay through `epoch_batches` (a shuffle seeded by epoch); the views of the
    batch at global step t are drawn from the seed `(seed, t)`, so `build(e, s)` starts with
    exactly the views an uninterrupted run trained on at step `e * steps_per_epoch + s`.

    Args:
        images: tf.data.Dataset. Unbatched uint8 images (`decoded_images`).
        num_examples: int. How many there are.
        batch_size: int. The global batch size.
        seed: int. Seeds the shuffle and the views.
        views: ViewAugmentation. How a view is drawn.
    """
    inner = epoch_batches(images, num_examples=num_examples, batch_size=batch_size, seed=seed)
    steps = inner.steps_per_epoch

    def build(start_epoch: int, start_step: int = 0) -> tf.data.Dataset:
        first = int(start_epoch) * steps + int(start_step)
        batches = tf.data.Dataset.zip(inner.build(start_epoch, start_step), _steps_from(first))
        ds = batches.map(
            lambda batch, step: views.pair(batch, tf.stack([tf.constant(seed, tf.int64), step])),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_shard_by_data())

    return TrainData(build, steps, augmented=True)


def contrastive_val_data(
    images: tf.data.Dataset, *, num_examples: int, batch_size: int, seed: int, views
) -> tf.data.Dataset:
    """Held-out batches of two views each, the same views in every epoch and every run."""
    ds = images.batch(batch_size, drop_remainder=num_examples >= batch_size)
    ds = tf.data.Dataset.zip(ds, _steps_from(0)).map(
        # Views 2 and 3 of the seed: never those of a training step (0 and 1).
        lambda batch, i: views.pair(batch, tf.stack([tf.constant(seed, tf.int64), i]), 2)
    )
    return ds.cache().prefetch(tf.data.AUTOTUNE).with_options(_shard_by_data())


def _steps_from(first: int) -> tf.data.Dataset:
    return tf.data.Dataset.range(first, 2**62)


def _shard_by_data() -> tf.data.Options:
    # As `endless_epochs`: the examples come from tensors, so workers share batches, not files.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


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


# === Measuring and writing the result ===


def pooled_features(backbone: Backbone, images: tf.data.Dataset, batch_size: int) -> np.ndarray:
    """Average-pooled float32 features of unbatched uint8 `images`, in order."""
    size = int(backbone.info["image_size"])
    inputs = keras.Input((size, size, 3), dtype="uint8")
    pooled = keras.layers.GlobalAveragePooling2D()(backbone.network(backbone.preprocessor(inputs)))
    extractor = keras.Model(inputs, pooled)
    batches = [extractor(batch, training=False) for batch in images.batch(batch_size)]
    return np.concatenate([np.asarray(b, np.float32) for b in batches])


def recalibrate_batchnorm(
    network: keras.Model, preprocessor, images: tf.data.Dataset, batch_size: int
) -> int:
    """Sets every BatchNorm layer's moving statistics to their average over `images`.

    Runs `network` in training mode over the batches with each layer's momentum at
    k / (k + 1) for batch k, which makes the moving statistics the running mean of the
    batches' statistics; the momentum and `trainable` come back afterwards.

    Returns:
        How many batches it averaged over.
    """
    norms = [
        layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    saved = [(layer.momentum, layer.trainable) for layer in norms]
    count = 0
    try:
        for layer in norms:
            layer.trainable = True  # a frozen BatchNorm runs in inference mode
        for count, batch in enumerate(images.batch(batch_size), start=1):
            for layer in norms:
                layer.momentum = (count - 1) / count
            network(preprocessor(batch), training=True)
    finally:
        for layer, (momentum, trainable) in zip(norms, saved, strict=True):
            layer.momentum, layer.trainable = momentum, trainable
    return count


def save_network_weights(network: keras.Model, path: str) -> str:
    """Writes `network`'s weights to `path` (`*.weights.h5`) through a temporary name."""
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as local:
        local_file = os.path.join(local, "backbone.weights.h5")
        network.save_weights(local_file)
        tmp = fs.join(fs.dirname(path), TMP_PREFIX + fs.basename(path))
        tf.io.gfile.copy(local_file, tmp, overwrite=True)
    fs.rename(tmp, path)
    return path


def linear_probe_accuracy(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    *,
    steps: int = 300,
    seed: int = 0,
) -> float:
    """Accuracy on `test` of a logistic regression trained on `train` (features, labels).

    Features are standardised with the training part's statistics; the regression is a
    Dense softmax layer trained full-batch with Adam for `steps` steps, in float32.
    """
    x_train, y_train = train
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    keras.utils.set_random_seed(seed)
    probe = keras.Sequential(
        [
            keras.Input((x_train.shape[1],)),
            keras.layers.Dense(
                num_classes, kernel_regularizer=keras.regularizers.L2(1e-3), dtype="float32"
            ),
        ]
    )
    probe.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    full_batch = tf.data.Dataset.from_tensors(((x_train - mean) / std, y_train)).repeat(steps)
    probe.fit(full_batch, epochs=1, verbose=0, shuffle=False)
    logits = probe.predict((test[0] - mean) / std, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == test[1]))


@dataclass
class Probe:
    """A labelled image set for the linear probe, split into a few per class and the rest.

    Args:
        examples: Examples. Labelled images (`scan_image_folder`).
        labels_per_class: int. Images per class the probe trains on; the rest test it.
        seed: int. Picks which images train. Defaults to `0`.
    """

    examples: Examples
    labels_per_class: int
    seed: int = 0
    train: list[int] = field(init=False)
    test: list[int] = field(init=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        labels = np.asarray(self.examples.labels)
        self.train, self.test = [], []
        for label, name in enumerate(self.examples.class_names):
            idx = rng.permutation(np.flatnonzero(labels == label)).tolist()
            if len(idx) <= self.labels_per_class:
                raise DataError(
                    f"Probe class {name!r} in {self.examples.source!r} has {len(idx)} images; "
                    f"the linear probe trains on probe_labels_per_class={self.labels_per_class} "
                    "per class and tests on the rest. Lower --probe-labels-per-class or add "
                    "images."
                )
            self.train += idx[: self.labels_per_class]
            self.test += idx[self.labels_per_class :]

    def accuracy(self, backbone: Backbone, batch_size: int, steps: int = 300) -> float:
        """Linear-probe accuracy of `backbone`'s frozen, average-pooled features."""
        size = int(backbone.info["image_size"])
        features = pooled_features(
            backbone, decoded_images(list(self.examples.inputs), size), batch_size
        )
        labels = np.asarray(self.examples.labels)
        return linear_probe_accuracy(
            (features[self.train], labels[self.train]),
            (features[self.test], labels[self.test]),
            len(self.examples.class_names),
            steps=steps,
            seed=self.seed,
        )


def make_finish(
    backbone: Backbone,
    model: keras.Model,
    *,
    rebuild: Callable[[], Backbone],
    train_images: tf.data.Dataset,
    val: tf.data.Dataset | None,
    batch_size: int,
    probe: Probe | None = None,
) -> Callable[[RunDir | None, bool], dict[str, Any]]:
    """`PretrainTask.finish` for SimCLR: recalibrate, write the weights, measure.

    The trained network is copied into `rebuild()` (a fresh backbone of the same
    architecture, outside any strategy) before anything changes, so the trained model is left
    as it trained; the copy's BatchNorm statistics are recalibrated on `train_images`
    (un-augmented) and its weights written to `WEIGHTS_FILE`. The probe compares the copy with
    the backbone exactly as pretraining started.

    Args:
        backbone: Backbone. The backbone being pretrained; its weights now are the start.
        model: keras.Model. The compiled training model (for the held-out loss).
        rebuild: callable. Returns a new `Backbone` of the same architecture and size.
        train_images: tf.data.Dataset. Unbatched uint8 training images.
        val: tf.data.Dataset or None. The held-out two-view batches.
        batch_size: int. Batch size for recalibration and feature extraction (at least
            `MEASURE_BATCH_SIZE`).
        probe: Probe or None. Labelled images for the linear probe.
    """
    initial = [np.array(w) for w in backbone.network.get_weights()]
    # Eager passes (recalibration, features) cost per call more than per image.
    batch_size = max(int(batch_size), MEASURE_BATCH_SIZE)

    def finish(run_dir: RunDir | None, write: bool) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if val is not None:
            metrics["val"] = {
                k: float(v) for k, v in model.evaluate(val, verbose=0, return_dict=True).items()
            }
        copy = rebuild()
        copy.network.set_weights(backbone.network.get_weights())
        batches = recalibrate_batchnorm(copy.network, copy.preprocessor, train_images, batch_size)
        metrics["batchnorm_recalibration_batches"] = batches
        if write and run_dir is not None:
            save_network_weights(copy.network, run_dir.file(WEIGHTS_FILE))
        if probe is not None and write:
            pretrained = probe.accuracy(copy, batch_size)
            # The start exactly as it was. (Recalibrating a random network's BatchNorm
            # statistics was measured to lower its probe accuracy on the digits: 35% vs 60%.)
            copy.network.set_weights(initial)
            start = probe.accuracy(copy, batch_size)
            metrics["linear_probe"] = {
                "pretrained_accuracy": pretrained,
                "initial_accuracy": start,
                "gain": pretrained - start,
                "labels_per_class": probe.labels_per_class,
                "train_examples": len(probe.train),
                "test_examples": len(probe.test),
                "initial_weights": str(backbone.info.get("weights")),
            }
            print(
                f"[tfxfer] linear probe ({probe.labels_per_class} labels per class): "
                f"{pretrained:.3f} pretrained, {start:.3f} as pretraining started",
                flush=True,
            )
        return metrics

    return finish
