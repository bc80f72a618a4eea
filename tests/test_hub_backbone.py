"""Tests for `tfxfer.backbones.hub`: TF-Hub SavedModels as Keras 3 backbones.

Every SavedModel here is written by the test itself with `tf.saved_model.save` of a small
`tf.Module`, so nothing is downloaded; the online path is exercised with a fake network.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from hub_helpers import (  # noqa: E402
    ImageFeatures,
    ImageMap,
    SentenceEncoder,
    SignatureOnly,
    WithTrainingArgument,
)

from tfxfer.backbones.base import Backbone
from tfxfer.backbones.hub import (
    NETWORK_TIMEOUT_SECONDS,
    HubLayer,
    build_hub_backbone,
)
from tfxfer.errors import TfxferError, WeightsError

NUM_CLASSES = 3


# === Tiny SavedModels ===


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub_models")
    paths = {name: str(root / name) for name in ("image", "map", "text", "training", "signature")}
    tf.saved_model.save(ImageFeatures(), paths["image"])
    tf.saved_model.save(ImageMap(), paths["map"])
    tf.saved_model.save(SentenceEncoder(), paths["text"])
    with_training = WithTrainingArgument()
    for training in (False, True):
        with_training.__call__.get_concrete_function(
            tf.TensorSpec([None, 8, 8, 3], tf.float32), training=training
        )
    tf.saved_model.save(with_training, paths["training"])
    signature_only = SignatureOnly()
    tf.saved_model.save(
        signature_only, paths["signature"], signatures={"default": signature_only.features}
    )
    return paths


# === Helpers ===


def classifier(backbone: Backbone) -> keras.Model:
    """Raw input -> backbone -> softmax Dense head, as `tfxfer.model` joins them."""
    if backbone.input_kind == "image":
        inputs = keras.Input(shape=(None, None, 3), dtype="uint8")
        features = backbone.network(backbone.preprocessor(inputs))
    else:
        inputs = keras.Input(shape=(), dtype="string")
        features = backbone.network(inputs)
    if backbone.output_kind == "spatial":
        features = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="head")(features)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    return model


def raw_images(count: int = 8, height: int = 20, width: int = 28) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def labels(count: int = 8) -> np.ndarray:
    return np.arange(count) % NUM_CLASSES


def values(variables: list) -> list[np.ndarray]:
    return [np.array(variable.numpy()) for variable in variables]


def assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after) > 0
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


def assert_changed(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after) > 0
    assert any(not np.allclose(old, new) for old, new in zip(before, after, strict=True))


# === Frozen feature extractors ===


def test_image_backbone_trains_head_and_keeps_hub_weights(saved_models):
    backbone = build_hub_backbone(saved_models["image"])
    hub_layer = backbone.layer_groups["hub"][0]
    assert isinstance(hub_layer, HubLayer)
    assert backbone.input_kind == "image"
    assert backbone.output_kind == "vector"
    assert backbone.group_names == ["hub"]
    assert backbone.info["image_size"] == [16, 16]  # read from the SavedModel's signature
    assert backbone.info["hub_parameters"] == 3 * 3 * 3 * 4 + 4 * 6
    assert hub_layer.trainable_weights == []
    assert len(hub_layer.non_trainable_weights) == 2

    model = classifier(backbone)
    head = model.get_layer("head")
    hub_before, head_before = values(hub_layer.weights), values(head.weights)
    model.fit(raw_images(), labels(), batch_size=4, epochs=1, verbose=0)  # 2 steps
    assert_same(hub_before, values(hub_layer.weights))
    assert_changed(head_before, values(head.weights))

    # Raw uint8 images of another size go through the preprocessor's resize.
    probabilities = model.predict(raw_images(count=3, height=40, width=30), verbose=0)
    assert probabilities.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_image_preprocessor_resizes_and_scales_to_unit_range(saved_models):
    backbone = build_hub_backbone(saved_models["image"])
    white = np.full((2, 32, 24, 3), 255, dtype=np.uint8)
    pixels = keras.ops.convert_to_numpy(backbone.preprocessor(white))
    assert pixels.shape == (2, 16, 16, 3)
    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, 1.0, rtol=1e-6)


def test_text_backbone_takes_strings(saved_models):
    backbone = build_hub_backbone(saved_models["text"], input_kind="text")
    assert backbone.preprocessor is None
    assert backbone.output_kind == "vector"
    assert backbone.network.input.dtype == "string"
    hub_layer = backbone.layer_groups["hub"][0]

    model = classifier(backbone)
    head = model.get_layer("head")
    texts = tf.constant(["Goal in the match", "Oven recipe", "Storm and rain", "a new word"] * 2)
    hub_before, head_before = values(hub_layer.weights), values(head.weights)
    model.fit(texts, labels(), batch_size=4, epochs=1, verbose=0)
    assert_same(hub_before, values(hub_layer.weights))
    assert_changed(head_before, values(head.weights))

    probabilities = model.predict(tf.constant(["rain", "goal goal"]), verbose=0)
    assert probabilities.shape == (2, NUM_CLASSES)
    assert not np.allclose(probabilities[0], probabilities[1])  # the words reach the model


def test_map_output_is_spatial_and_image_size_is_required(saved_models):
    with pytest.raises(TfxferError, match="image_size"):
        build_hub_backbone(saved_models["map"])
    backbone = build_hub_backbone(saved_models["map"], image_size=12)
    assert backbone.output_kind == "spatial"
    assert tuple(backbone.network.output.shape) == (None, 6, 6, 4)
    assert classifier(backbone).predict(raw_images(count=2), verbose=0).shape == (2, NUM_CLASSES)


def test_frozen_hub_model_runs_in_inference_mode(saved_models):
    # Keras passes training=True during fit; a frozen hub model must not see it, or its
    # batch-norm statistics would drift while its weights stay frozen.
    backbone = build_hub_backbone(saved_models["training"], image_size=8)
    hub_layer = backbone.layer_groups["hub"][0]
    before = values(hub_layer.weights)
    classifier(backbone).fit(raw_images(), labels(), batch_size=4, epochs=1, verbose=0)
    assert_same(before, values(hub_layer.weights))


# === Fine-tuning ===


def test_trainable_hub_model_fine_tunes(saved_models):
    backbone = build_hub_backbone(saved_models["training"], image_size=8, trainable=True)
    hub_layer = backbone.layer_groups["hub"][0]
    assert [w.name for w in hub_layer.trainable_weights] == ["kernel"]
    assert [w.name for w in hub_layer.non_trainable_weights] == ["moving_mean"]
    kernel, moving_mean = hub_layer.weights
    kernel_before, mean_before = values([kernel]), values([moving_mean])
    classifier(backbone).fit(raw_images(), labels(), batch_size=4, epochs=1, verbose=0)
    assert_changed(kernel_before, values([kernel]))
    assert_changed(mean_before, values([moving_mean]))  # called with training=True


def test_schedule_can_unfreeze_and_refreeze_the_hub_group(saved_models):
    backbone = build_hub_backbone(saved_models["image"])
    model = classifier(backbone)
    (hub_layer,) = backbone.layer_groups["hub"]

    hub_layer.trainable = True
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    before = values(hub_layer.weights)
    model.fit(raw_images(), labels(), batch_size=4, epochs=1, verbose=0)
    assert_changed(before, values(hub_layer.weights))

    hub_layer.trainable = False
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    before = values(hub_layer.weights)
    model.fit(raw_images(), labels(), batch_size=4, epochs=1, verbose=0)
    assert_same(before, values(hub_layer.weights))


# === Signatures and outputs ===


def test_signature_model_with_output_key(saved_models):
    with pytest.raises(TfxferError, match=r"\['doubled', 'pooled'\]"):
        build_hub_backbone(saved_models["signature"], signature="default")
    pooled = build_hub_backbone(saved_models["signature"], signature="default", output_key="pooled")
    doubled = build_hub_backbone(
        saved_models["signature"], signature="default", output_key="doubled"
    )
    assert pooled.info["signature"] == "default"
    images = np.random.default_rng(1).random((2, 8, 8, 3), dtype=np.float32)
    np.testing.assert_allclose(
        2.0 * pooled.network.predict(images, verbose=0),
        doubled.network.predict(images, verbose=0),
        rtol=1e-5,
    )
    with pytest.raises(TfxferError, match="cannot be fine-tuned"):
        build_hub_backbone(
            saved_models["signature"], signature="default", output_key="pooled", trainable=True
        )
    with pytest.raises(WeightsError, match="signature"):
        build_hub_backbone(saved_models["signature"], signature="serving_default")


def test_wrong_input_kind_and_image_size_are_reported(saved_models):
    with pytest.raises(TfxferError, match="input_kind='text'"):
        build_hub_backbone(saved_models["text"], input_kind="image")
    with pytest.raises(TfxferError, match="input_kind='image'"):
        build_hub_backbone(saved_models["image"], input_kind="text")
    with pytest.raises(TfxferError, match="16x16"):
        build_hub_backbone(saved_models["image"], image_size=32)
    with pytest.raises(TfxferError, match="output_key"):
        build_hub_backbone(saved_models["image"], output_key="pooled")


# === Saving ===


def test_keras_file_reloads_from_the_handle(saved_models, tmp_path):
    backbone = build_hub_backbone(saved_models["image"])
    model = classifier(backbone)
    (hub_layer,) = backbone.layer_groups["hub"]
    hub_layer.trainable = True  # fine-tuned weights must survive the round trip
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    model.fit(raw_images(), labels(), batch_size=4, epochs=1, verbose=0)
    expected = model.predict(raw_images(), verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    with pytest.raises(TfxferError, match="safe_mode=False"):
        keras.saving.load_model(path)
    reloaded = keras.saving.load_model(path, safe_mode=False)
    np.testing.assert_allclose(reloaded.predict(raw_images(), verbose=0), expected, rtol=1e-5)


# === Distribution ===

# Logical devices must be configured before TensorFlow starts, so this runs in a fresh process.
MIRRORED_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tfxfer.backbones.hub import build_hub_backbone

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        backbone = build_hub_backbone(sys.argv[1], trainable=True)
        inputs = keras.Input(shape=(None, None, 3), dtype="uint8")
        features = backbone.network(backbone.preprocessor(inputs))
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(features))
        model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    hub_layer = backbone.layer_groups["hub"][0]
    assert all(isinstance(w.value, tf.distribute.DistributedValues) for w in hub_layer.weights)
    before = [w.numpy().copy() for w in hub_layer.weights]
    images = np.random.default_rng(0).integers(0, 256, (8, 20, 20, 3), dtype=np.uint8)
    model.fit(images, np.arange(8) % 3, batch_size=4, epochs=1, verbose=0)
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, hub_layer.weights))
    print("OK")
    """
)


@pytest.mark.large
def test_fine_tunes_under_a_two_replica_mirrored_strategy(saved_models):
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, saved_models["image"]],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


# === Missing and offline handles ===


def test_missing_path_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="no such directory"):
        build_hub_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="without saved_model.pb"):
        build_hub_backbone(str(tmp_path))


def test_offline_handle_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    timeouts_seen: list[float | None] = []

    def offline_urlopen(*args, **kwargs):
        timeouts_seen.append(socket.getdefaulttimeout())
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline_urlopen)
    timeout_before = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(WeightsError, match="offline.*saved_model.pb"):
        build_hub_backbone(
            "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
        )
    assert time.monotonic() - start < 5.0
    assert timeouts_seen == [NETWORK_TIMEOUT_SECONDS]  # one try, with a short socket timeout
    assert socket.getdefaulttimeout() == timeout_before
