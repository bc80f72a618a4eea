"""Precise BatchNorm: the moving statistics of a model's BatchNorm layers, computed from data.

A BatchNormalization layer normalises with the mean and variance of its batch while it
trains, and with its moving averages of them (`moving_mean`, `moving_variance`) otherwise.
A pretrained backbone brings moving statistics that fit its activations. A randomly
initialised one (`--weights none`) brings the initial values, mean 0 and variance 1, which
fit nothing: a convolution of [0, 255] pixels has a variance in the thousands, and each
block after it shrinks or grows its input by some factor that nothing corrects. In a
random-init MobileNetV3Small at 32 px the pooled features come out around 1e-11 (they
vanish), and a head stage, which freezes the backbone and so runs its BatchNorm layers in
inference mode (Keras 3 does this for `trainable=False`), trains a head by gradient descent
on inputs that are all but zero: it stays at chance. (A head solver that rescales them fits
them well, and for a linear probe they are the better start: `tfxfer.train.random_start`
chooses between them and the statistics recomputed here.)

One fix is to measure the statistics before training: run the model over some training
batches with its BatchNorm layers in training mode, so each layer normalises with the
statistics of its batch (as it would while training) and its moving statistics become the
average of those batch statistics over all batches seen, not an exponential average that
would still remember the initial (0, 1). This is "precise BN" (Wu and Johnson, 2021,
"Rethinking 'Batch' in BatchNorm").

Only the BatchNorm layers' statistics change. Two things to know:
- The model is called with `training=True`, so its other training-mode layers run as in
  training: Dropout drops and random augmentation layers inside the model augment. Their
  random seeds advance; nothing else of theirs changes. Of our backbones only EfficientNetV2
  has Dropout below a BatchNorm layer (stochastic depth: whole residual branches dropped,
  at most 20% of the time); the statistics after it are then those a training step sees,
  a little wider than in inference mode. The ResNets and MobileNetV3 (without their top)
  have none.
- Each batch counts by its number of examples, and the moving variance is the average of
  the batch variances (what training-mode normalisation divides by), not the variance of
  all examples together, which would add the spread of the batch means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

log = logging.getLogger(__name__)

# Examples a recomputation sees by default: enough for per-channel statistics of a few
# thousand numbers each, a few seconds of forward passes on a CPU for a small network.
DEFAULT_MAX_EXAMPLES = 2048


def batchnorm_layers(model: keras.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer in `model`, nested models included, each once."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def has_batchnorm(model: keras.Layer) -> bool:
    """Whether `model` holds a BatchNormalization layer (at any depth)."""
    return bool(batchnorm_layers(model))


def recompute_batchnorm_statistics(
    model: keras.Model,
    batches: Iterable | tf.data.Dataset,
    *,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> dict[str, Any]:
    """Sets every BatchNorm layer's moving statistics to their average over `batches`.

    Use it on a model whose BatchNorm statistics do not fit its data before a stage that
    runs them in inference mode: a randomly initialised backbone before its head stage,
    above all (see the module docstring). It runs the model forward only, in one compiled
    function, on batches until `max_examples` examples have gone through; the batch that
    crosses the limit is cut to it. Each BatchNorm layer is put in training mode for the
    duration, and its `trainable` flag (and those of its weights) and `momentum` are restored
    afterwards, also when a batch fails. No other weight changes.

    Under a `tf.distribute` strategy the model runs in cross-replica context on whole
    batches: the statistics are those of each whole (global) batch, and the assignments
    write the same values to every replica's copy of the variables. Those are one
    process's copies: with several workers, give every worker the same batches (tested
    with MirroredStrategy only).

    Args:
        model: keras.Model. The model to update in place.
        batches: tf.data.Dataset or iterable. Batches of `x`, `(x, y)` or
            `(x, y, sample_weight)`, where `x` is what the model takes (an array or tensor,
            or a dict of them for a text model); labels and weights are not used. An endless
            dataset is fine (e.g. `train.build(0)` of a `TrainData`): reading stops at
            `max_examples`.
        max_examples: int. How many examples to use at most. Defaults to `2048`.

    Returns:
        A dict for the run record: `layers` (BatchNorm layers found), `examples` and
        `batches` (how many were used) and `seconds`. With no BatchNorm layer it reads no data
        and returns zeros.

    Example:

    ```python
    backbone = tfxfer.build_backbone("mobilenetv3small", weights=None, image_size=32)
    model = tfxfer.build_model(backbone, 10)
    train, val, test = tfxfer.make_datasets(data, backbone, batch_size=32)
    recompute_batchnorm_statistics(model, train.build(0), max_examples=1024)
    ```
    """
    if int(max_examples) < 1:
        raise ValueError(f"Expected `max_examples` to be at least 1. Received: {max_examples}")
    start = time.perf_counter()
    layers = batchnorm_layers(model)
    record = {"layers": len(layers), "examples": 0, "batches": 0, "seconds": 0.0}
    if not layers:
        return record
    saved = [_LayerState(layer) for layer in layers]
    try:
        for layer in layers:
            # A frozen BatchNorm layer runs in inference mode even with training=True
            # (Keras 3), and then updates nothing.
            layer.trainable = True
            # With renorm, training-mode outputs are normalised by the renorm statistics
            # (still the initial ones here), not the batch's. Without it the layers after
            # see batch-normalised outputs; its renorm statistics are set afterwards.
            layer.renorm = False
        seen, record["batches"] = _average_over(model, layers, batches, int(max_examples))
    finally:
        for state in saved:
            state.restore()
    for layer in layers:
        if layer.renorm:
            _sync_renorm_statistics(layer)
    record["examples"] = seen
    record["seconds"] = round(time.perf_counter() - start, 3)
    if seen == 0:
        log.warning("No examples to recompute BatchNorm statistics from: they are unchanged.")
    return record


def _average_over(model: keras.Model, layers: list, batches: Any, max_examples: int):
    """Runs `model` in training mode on `batches`; returns (examples, batches) used.

    With momentum 0 a layer's moving statistics after a batch are that batch's statistics
    (moving = m * moving + (1 - m) * batch). The forward pass is one compiled function
    (traced once; a shorter last batch may trace it again) that returns every layer's
    statistics after the batch; their example-weighted average is accumulated here in
    float64 and assigned at the end. Eager layer-by-layer calls took ~0.5 s a batch for two
    small networks: a minute for the default 2048 examples.
    """
    for layer in layers:
        layer.momentum = 0.0

    @tf.function(reduce_retracing=True)
    def forward(x):
        model(x, training=True)
        return [(tf.identity(lay.moving_mean), tf.identity(lay.moving_variance)) for lay in layers]

    sums = None
    seen = count = 0
    for element in batches:
        x = _inputs_of(element)
        size = _batch_size(x)
        if size == 0:
            continue
        if seen + size > max_examples:
            size = max_examples - seen
            x = keras.tree.map_structure(lambda t, n=size: t[:n], x)
        statistics = [
            (size * np.asarray(mean, np.float64), size * np.asarray(variance, np.float64))
            for mean, variance in forward(x)
        ]
        sums = (
            statistics
            if sums is None
            else [(m + dm, v + dv) for (m, v), (dm, dv) in zip(sums, statistics, strict=True)]
        )
        seen += size
        count += 1
        if seen >= max_examples:
            break
    if sums is not None:
        for layer, (mean, variance) in zip(layers, sums, strict=True):
            layer.moving_mean.assign(ops.cast(mean / seen, layer.moving_mean.dtype))
            layer.moving_variance.assign(ops.cast(variance / seen, layer.moving_variance.dtype))
    return seen, count


class _LayerState:
    """What `recompute_batchnorm_statistics` changes on a layer, to put back exactly."""

    def __init__(self, layer: keras.layers.BatchNormalization):
        self.layer = layer
        self.trainable = layer.trainable
        # Setting `layer.trainable` sets its weights' flags too; they may have differed.
        self.weight_trainable = [(v, v.trainable) for v in layer.weights]
        self.momentum = layer.momentum
        self.renorm = layer.renorm

    def restore(self) -> None:
        self.layer.trainable = self.trainable
        for variable, trainable in self.weight_trainable:
            variable.trainable = trainable
        self.layer.momentum = self.momentum
        self.layer.renorm = self.renorm


def _sync_renorm_statistics(layer: keras.layers.BatchNormalization) -> None:
    """Makes a renorm layer's other statistics agree with its new moving mean and variance.

    Keras derives `moving_variance` from `moving_stddev` as `stddev**2 - epsilon`; the renorm
    mean and stddev are the training-time estimates of the same statistics.
    """
    stddev = ops.sqrt(layer.moving_variance + layer.epsilon)
    layer.moving_stddev.assign(stddev)
    layer.renorm_mean.assign(layer.moving_mean)
    layer.renorm_stddev.assign(stddev)


def _inputs_of(element: Any) -> Any:
    """`x` of an `x`, `(x, y)` or `(x, y, sample_weight)` element; a dict is an `x`."""
    if isinstance(element, (tuple, list)):
        if not 1 <= len(element) <= 3:
            raise ValueError(
                "Expected batches of `x`, `(x, y)` or `(x, y, sample_weight)`. "
                f"Received: a {type(element).__name__} of {len(element)} elements"
            )
        return element[0]
    return element


def _batch_size(x: Any) -> int:
    first = keras.tree.flatten(x)[0]
    return int(first.shape[0])


def average_across_replicas(model: keras.Layer, strategy: tf.distribute.Strategy) -> int:
    """Sets every BatchNorm layer's moving statistics to their mean over the replicas.

    Keras 3 makes them with `aggregation="none"`, so under a distribution strategy each
    replica updates its own copy from its own share of the batch and nothing brings the
    copies together (tf.keras made them `ON_READ`/`MEAN`): after a stage that trains BatchNorm
    layers, the workers of a multi-worker run held different models and reported different
    validation losses. Called by every replica at the end of each epoch, before the
    checkpoint. A collective operation: all workers must call it, in the same order. Returns
    how many variables it averaged (0 on one replica).
    """
    if strategy.num_replicas_in_sync < 2:
        return 0
    variables = [
        variable
        for layer in batchnorm_layers(model)
        for variable in (layer.moving_mean, layer.moving_variance)
    ]
    if not variables:
        return 0

    sizes = [int(np.prod(variable.shape)) for variable in variables]

    @tf.function
    def local_copies():
        # Read in a replica's context, a mirrored variable gives that replica's own copy; one
        # flat vector, so one all-reduce.
        return tf.concat(
            [tf.reshape(tf.cast(variable.value, "float32"), [-1]) for variable in variables], 0
        )

    averaged = strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(local_copies), axis=None)
    for variable, value in zip(variables, tf.split(averaged, sizes), strict=True):
        variable.assign(tf.cast(tf.reshape(value, variable.shape), variable.dtype))
    return len(variables)
