"""Tests for `tfxfer.batchnorm`: BatchNorm statistics recomputed from data ("precise BN").

The problem they guard against: a randomly initialised backbone, frozen for the head stage,
runs its BatchNorm layers in inference mode with their initial statistics (mean 0, variance
1), and its pooled features vanish. The tests show that on MobileNetV3Small, then check that
the recomputed statistics are exactly the batch statistics (averaged over batches), that
nothing but them changes, and that a model without BatchNorm is left alone.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import keras
import multiworker_helpers as mh
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_arrays, tiny_model

import tfxfer
from tfxfer.batchnorm import (
    batchnorm_layers,
    has_batchnorm,
    recompute_batchnorm_statistics,
)
from tfxfer.train.features import split_at_head

STATISTICS = ("moving_mean", "moving_variance")


def _weights(model: keras.Model) -> list[tuple[str, np.ndarray]]:
    """Every weight of the model, in order, as (path, value copy)."""
    return [(v.path, np.array(v.numpy())) for v in model.weights]


def _assert_only_statistics_changed(before, after) -> None:
    assert [p for p, _ in before] == [p for p, _ in after]
    changed = [
        p for (p, old), (_, new) in zip(before, after, strict=True) if not np.array_equal(old, new)
    ]
    assert changed, "no weight changed"
    others = [p for p in changed if p.rsplit("/", 1)[-1] not in STATISTICS]
    assert not others, f"weights other than BatchNorm statistics changed: {others}"


def _flags(model: keras.Model) -> list:
    """What the recomputation touches and must put back: trainable flags and momentum."""
    return [
        (layer.name, layer.trainable, layer.momentum, [v.trainable for v in layer.weights])
        for layer in batchnorm_layers(model)
    ]


def _frozen_mobilenet() -> tuple[tfxfer.Backbone, keras.Model]:
    """A random-init MobileNetV3Small (no download) with a head, frozen as in a head stage."""
    keras.utils.set_random_seed(0)
    backbone = tfxfer.build_backbone("mobilenetv3small", weights=None, image_size=32)
    model = tfxfer.build_model(backbone, 10)
    backbone.network.trainable = False
    return backbone, model


def _random_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _low_conv_output(backbone: tfxfer.Backbone, images: np.ndarray) -> np.ndarray:
    """What the tiny backbone's first BatchNorm layer sees, computed without the model."""
    pixels = images.astype("float32") / 127.5 - 1.0  # the tiny backbone's "tf" preprocessing
    return np.asarray(backbone.network.get_layer("low_conv")(pixels), dtype="float64")


# === The problem, and the fix, on a real backbone ===


def test_random_init_features_vanish_and_recomputed_statistics_bring_them_back() -> None:
    backbone, model = _frozen_mobilenet()
    features = split_at_head(model).features
    images = _random_images(64, 32, seed=0)
    held_out = _random_images(64, 32, seed=1)

    # With the initial statistics every block rescales its input by some factor nothing
    # corrects: the pooled features come out around 1e-11 (measured 2026-12: mean |f| 3e-11,
    # std across images 2e-11). They still differ between images relative to their size,
    # but a head trained by gradient descent sees zeros.
    before = np.asarray(features.predict(held_out, verbose=0))
    assert np.abs(before).max() < 1e-6

    weights = _weights(model)
    flags = _flags(model)
    data = tf.data.Dataset.from_tensor_slices((images, np.zeros(64, "int32"))).batch(16)
    record = recompute_batchnorm_statistics(model, data)

    assert record["layers"] == len(batchnorm_layers(backbone.network)) == 34
    assert (record["examples"], record["batches"]) == (64, 4)
    assert record["seconds"] >= 0
    _assert_only_statistics_changed(weights, _weights(model))
    assert _flags(model) == flags  # still frozen, momentum 0.999 again
    assert all(not layer.trainable for layer in batchnorm_layers(model))
    for layer in batchnorm_layers(model):
        assert not np.allclose(layer.moving_variance.numpy(), 1.0), layer.name
    # Measured: mean |f| 0.8, std across images 1.7 (per feature, averaged).
    after = np.asarray(features.predict(held_out, verbose=0))
    assert np.isfinite(after).all()
    assert after.std(axis=0).mean() > 0.1
    assert np.abs(after).mean() > 0.1


# === Exactness on the tiny backbone ===


def test_one_batch_gives_exactly_its_statistics() -> None:
    backbone, model = tiny_model()
    backbone.network.trainable = False
    images, labels = tiny_arrays(n=8)
    record = recompute_batchnorm_statistics(model, [(images, labels)])
    assert record["layers"] == 3
    assert (record["examples"], record["batches"]) == (8, 1)

    inputs = _low_conv_output(backbone, images)
    layer = backbone.network.get_layer("low_bn")
    # Keras' batch variance is the biased one (divided by n), as training normalises with.
    np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), inputs.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )


def test_several_batches_give_the_example_weighted_average_of_batch_statistics() -> None:
    backbone, model = tiny_model()
    backbone.network.trainable = False
    images, labels = tiny_arrays(n=16)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    recompute_batchnorm_statistics(model, batches)
    layer = backbone.network.get_layer("low_bn")
    first, second = _low_conv_output(backbone, images[:8]), _low_conv_output(backbone, images[8:])
    for name, statistic in (("moving_mean", np.mean), ("moving_variance", np.var)):
        expected = (statistic(first, axis=(0, 1, 2)) + statistic(second, axis=(0, 1, 2))) / 2
        np.testing.assert_allclose(
            getattr(layer, name).numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=name
        )

    # `max_examples` cuts the batch that crosses it; that batch counts by what is left of it.
    backbone, model = tiny_model()
    record = recompute_batchnorm_statistics(model, batches.repeat(), max_examples=12)
    assert (record["examples"], record["batches"]) == (12, 2)
    first, part = _low_conv_output(backbone, images[:8]), _low_conv_output(backbone, images[8:12])
    expected = (8 * first.mean(axis=(0, 1, 2)) + 4 * part.mean(axis=(0, 1, 2))) / 12
    layer = backbone.network.get_layer("low_bn")
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected, atol=1e-5)


def test_inputs_may_come_alone_or_with_labels_and_weights() -> None:
    images, labels = tiny_arrays(n=8)
    results = []
    for element in (images, (images,), (images, labels), (images, labels, np.ones(8))):
        backbone, model = tiny_model()
        recompute_batchnorm_statistics(model, [element])
        results.append(backbone.network.get_layer("top_bn").moving_mean.numpy())
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    with pytest.raises(ValueError, match="Received: a tuple of 4 elements"):
        recompute_batchnorm_statistics(model, [(images, labels, labels, labels)])


def test_flags_and_momentum_come_back_when_a_batch_fails() -> None:
    backbone, model = tiny_model()
    backbone.network.trainable = False
    # A flag that differs from its layer's must come back as it was, not as the layer's.
    backbone.network.get_layer("mid_bn").gamma.trainable = True
    backbone.network.get_layer("top_bn").momentum = 0.5
    flags = _flags(model)
    images, labels = tiny_arrays(n=8)
    wrong_size = np.zeros((8, 16, 16, 4), "uint8")  # 4 channels: the model raises
    with pytest.raises(Exception):  # noqa: B017 - whatever Keras raises for a bad shape
        recompute_batchnorm_statistics(model, [(images, labels), (wrong_size, labels)])
    assert _flags(model) == flags


def test_renorm_layers_pass_on_batch_normalised_outputs_and_keep_their_statistics_agreed() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="first")(inputs)
    x = keras.layers.BatchNormalization(renorm=True, name="first_bn")(x)
    x = keras.layers.Dense(3, name="second")(x)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="second_bn")(x))
    data = np.random.default_rng(0).normal(5.0, 3.0, (32, 4)).astype("float32")
    recompute_batchnorm_statistics(model, [data])

    first = np.asarray(model.get_layer("first")(data), dtype="float64")
    layer = model.get_layer("first_bn")
    assert layer.renorm
    np.testing.assert_allclose(layer.moving_mean.numpy(), first.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), first.var(axis=0), rtol=1e-4)
    stddev = np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    np.testing.assert_allclose(layer.moving_stddev.numpy(), stddev, rtol=1e-6)
    np.testing.assert_allclose(layer.renorm_mean.numpy(), layer.moving_mean.numpy())
    np.testing.assert_allclose(layer.renorm_stddev.numpy(), stddev, rtol=1e-6)
    # The layer after saw the batch-normalised outputs (gamma 1, beta 0), as in training,
    # not outputs "normalised" by the initial renorm statistics (0, 1).
    normalised = (first - first.mean(axis=0)) / np.sqrt(first.var(axis=0) + layer.epsilon)
    second = np.asarray(model.get_layer("second")(normalised.astype("float32")), dtype="float64")
    np.testing.assert_allclose(
        model.get_layer("second_bn").moving_mean.numpy(), second.mean(axis=0), atol=1e-4
    )


# === Nothing to do ===


def test_a_model_without_batchnorm_is_left_alone_and_its_data_unread() -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(3)(inputs)))
    weights = _weights(model)

    def unread():
        raise AssertionError("the data was read")
        yield

    assert not has_batchnorm(model)
    record = recompute_batchnorm_statistics(model, unread())
    assert record == {"layers": 0, "examples": 0, "batches": 0, "seconds": 0.0}
    for (_, old), (_, new) in zip(weights, _weights(model), strict=True):
        np.testing.assert_array_equal(old, new)
    assert has_batchnorm(tiny_model()[1])


def test_max_examples_must_be_positive() -> None:
    with pytest.raises(ValueError, match="Received: 0"):
        recompute_batchnorm_statistics(tiny_model()[1], [], max_examples=0)


# === Under MirroredStrategy (2 logical CPUs, in a child process) ===

_MIRRORED = """
import json, sys
sys.path.insert(0, {tests!r})
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from helpers import tiny_arrays, tiny_model
from tfxfer.batchnorm import batchnorm_layers, recompute_batchnorm_statistics

images, labels = tiny_arrays(n=24)
batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


def statistics(strategy, in_scope):
    with strategy.scope():
        backbone, model = tiny_model(seed=0)
        backbone.network.trainable = False
        if in_scope:
            record = recompute_batchnorm_statistics(model, batches)
    if not in_scope:
        record = recompute_batchnorm_statistics(model, batches)
    values = {{}}
    for layer in batchnorm_layers(model):
        for variable in (layer.moving_mean, layer.moving_variance):
            copies = getattr(variable.value, "values", [variable.value])
            values[variable.path] = [np.asarray(c.numpy()).tolist() for c in copies]
    return {{"record": record, "values": values}}


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = {{
    "replicas": mirrored.num_replicas_in_sync,
    "default": statistics(tf.distribute.get_strategy(), False),
    "in_scope": statistics(mirrored, True),
    "outside_scope": statistics(mirrored, False),
}}
with open({out!r}, "w") as handle:
    json.dump(out, handle)
"""


@pytest.mark.large
def test_mirrored_over_two_logical_cpus_gives_the_same_statistics_on_every_replica(
    tmp_path: Path,
) -> None:
    out = tmp_path / "statistics.json"
    script = tmp_path / "mirrored_batchnorm.py"
    tests = str(Path(__file__).resolve().parent)
    script.write_text(textwrap.dedent(_MIRRORED.format(tests=tests, out=str(out))))
    result = mh.run_single(script, log_dir=tmp_path / "logs", timeout=120)
    assert result.ok, mh.describe_results([result])
    found = json.loads(out.read_text())
    assert found["replicas"] == 2
    reference = found["default"]["values"]
    for run in ("in_scope", "outside_scope"):
        assert found[run]["record"]["examples"] == 24
        assert sorted(found[run]["values"]) == sorted(reference)
        for path, copies in found[run]["values"].items():
            assert len(copies) == 2, path  # one per replica, and both the same
            for copy in copies:
                np.testing.assert_allclose(copy, reference[path][0], rtol=1e-5, atol=1e-6)


_TWO_REPLICAS = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from tfxfer.batchnorm import average_across_replicas
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(momentum=0.0)])
        model.compile(optimizer="sgd", loss="mse")
    # One batch of 8 split in order: replica 0 sees zeros, replica 1 sees twos.
    x = np.concatenate([np.zeros((4, 3)), np.full((4, 3), 2.0)]).astype("float32")
    model.fit(tf.data.Dataset.from_tensor_slices((x, x)).batch(8), verbose=0, shuffle=False)
    copies = lambda: [c.numpy().tolist() for c in model.layers[0].moving_mean.value.values]
    before = copies()
    averaged = average_across_replicas(model, strategy)
    print(json.dumps({"before": before, "after": copies(), "averaged": averaged}))
    """
)


@pytest.mark.large  # a child process with two logical CPUs, ~8 s
def test_moving_statistics_of_two_replicas_are_averaged_into_one(tmp_path):
    # Keras 3 makes them aggregation="none": each replica kept the statistics of its own share.
    script = tmp_path / "two_replicas.py"
    script.write_text(_TWO_REPLICAS)
    result = mh.run_single(script, log_dir=tmp_path / "logs", timeout=120)
    assert result.ok, mh.describe_results([result])
    found = json.loads(result.output.strip().splitlines()[-1])
    assert found["before"] == [[0.0] * 3, [2.0] * 3]
    assert found["after"] == [[1.0] * 3, [1.0] * 3]
    assert found["averaged"] == 2  # the moving mean and variance


def test_one_replica_has_nothing_to_average():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    assert tfxfer.batchnorm.average_across_replicas(model, tf.distribute.get_strategy()) == 0
