"""After SimCLR trains: recalibrate BatchNorm, write the backbone's weights, measure it.

Keras' ImageNet networks keep BatchNorm moving statistics with a momentum of 0.99 or 0.999,
which a short pretraining never lets settle, so before the backbone is written its moving
statistics are recomputed over the un-augmented training images (`recalibrate_batchnorm`):
the fine-tuning recipes run frozen BatchNorm layers in inference mode, on exactly those
statistics. A linear probe on a few labelled images per class then compares the pretrained
backbone with the one pretraining started from.
"""

from __future__ import annotations

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
from tfxfer.errors import DataError
from tfxfer.pretrain.contrastive_data import decoded_images
from tfxfer.rundir import TMP_PREFIX, RunDir

# The entry of the run directory that holds the pretrained backbone.
WEIGHTS_FILE = "backbone.weights.h5"
# The smallest batch of the eager passes after training (recalibration, probe features).
MEASURE_BATCH_SIZE = 64


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
            metrics["linear_probe"] = _probe_metrics(
                probe, copy, initial=initial, batch_size=batch_size, backbone=backbone
            )
        return metrics

    return finish


def _probe_metrics(
    probe: Probe,
    copy: Backbone,
    *,
    initial: list[np.ndarray],
    batch_size: int,
    backbone: Backbone,
) -> dict[str, Any]:
    """The linear probe of `copy` (pretrained), then of `copy` set to the `initial` weights."""
    pretrained = probe.accuracy(copy, batch_size)
    # The start exactly as it was. (Recalibrating a random network's BatchNorm
    # statistics was measured to lower its probe accuracy on the digits: 35% vs 60%.)
    copy.network.set_weights(initial)
    start = probe.accuracy(copy, batch_size)
    print(
        f"[tfxfer] linear probe ({probe.labels_per_class} labels per class): "
        f"{pretrained:.3f} pretrained, {start:.3f} as pretraining started",
        flush=True,
    )
    return {
        "pretrained_accuracy": pretrained,
        "initial_accuracy": start,
        "gain": pretrained - start,
        "labels_per_class": probe.labels_per_class,
        "train_examples": len(probe.train),
        "test_examples": len(probe.test),
        "initial_weights": str(backbone.info.get("weights")),
    }
