"""Image backbones: every table row builds, groups cover the network, preprocessing, weights."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import tfxfer
from tfxfer.backbones.vision import VISION_BACKBONES, ImagePreprocessing, build_vision_backbone
from tfxfer.errors import TfxferError, WeightsError


@pytest.mark.parametrize("name", sorted(VISION_BACKBONES))
def test_every_row_builds_at_32px_with_groups_covering_the_network(name):
    backbone = tfxfer.build_backbone(name, weights=None, image_size=32)

    assert backbone.name == name
    assert backbone.output_kind == "spatial" and backbone.input_kind == "image"
    assert backbone.group_names == [group for group, _ in VISION_BACKBONES[name]["groups"]]
    assert all(backbone.layer_groups.values()), "every group has layers"
    # Groups are in model order and cover every non-input layer exactly once.
    model_layers = [
        layer for layer in backbone.network.layers if not isinstance(layer, keras.layers.InputLayer)
    ]
    grouped = [layer for group in backbone.layer_groups.values() for layer in group]
    assert [id(layer) for layer in grouped] == [id(layer) for layer in model_layers]
    # Raw uint8 images of another size go through the preprocessor into a spatial map.
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3)).astype("uint8")
    features = backbone.network(backbone.preprocessor(images))
    assert features.shape[0] == 2 and len(features.shape) == 4


def test_resnet50_group_boundaries_are_the_stages():
    backbone = build_vision_backbone("resnet50", weights=None, image_size=32)
    assert backbone.group_names == ["stem", "conv2", "conv3", "conv4", "conv5"]
    for group in ("conv2", "conv3", "conv4", "conv5"):
        assert all(layer.name.startswith(group + "_") for layer in backbone.layer_groups[group])


@pytest.mark.parametrize(
    ("name", "module"),
    [("resnet50", keras.applications.resnet50), ("resnet50v2", keras.applications.resnet_v2)],
)
def test_image_preprocessing_matches_keras_preprocess_input(name, module):
    mode = VISION_BACKBONES[name]["preprocessing"]
    layer = ImagePreprocessing(32, mode)
    rng = np.random.default_rng(0)
    for shape in [(2, 32, 32, 3), (2, 45, 37, 3)]:
        raw = rng.integers(0, 256, shape).astype("uint8")
        resized = keras.ops.image.resize(raw.astype("float32"), (32, 32), interpolation="bilinear")
        expected = module.preprocess_input(np.array(resized))
        np.testing.assert_allclose(np.array(layer(raw)), expected, rtol=1e-5, atol=1e-3)


def test_image_preprocessing_modes_are_the_conventions():
    raw = np.full((1, 32, 32, 3), [10, 20, 30], dtype="uint8")
    caffe = np.array(ImagePreprocessing(32, "caffe")(raw))[0, 0, 0]
    np.testing.assert_allclose(caffe, [30 - 103.939, 20 - 116.779, 10 - 123.68], atol=1e-3)
    tf_mode = np.array(ImagePreprocessing(32, "tf")(raw))[0, 0, 0]
    np.testing.assert_allclose(tf_mode, np.array([10, 20, 30]) / 127.5 - 1, atol=1e-6)
    none = np.array(ImagePreprocessing(32, "none")(raw))[0, 0, 0]
    np.testing.assert_allclose(none, [10, 20, 30])
    with pytest.raises(ValueError, match="mode"):
        ImagePreprocessing(32, "bgr")


def test_unknown_backbone_name_lists_the_known_ones():
    with pytest.raises(TfxferError) as info:
        tfxfer.build_backbone("resnet5O", weights=None)
    message = str(info.value)
    assert "resnet5O" in message
    for name in VISION_BACKBONES:
        assert name in message


def test_image_size_too_small():
    with pytest.raises(TfxferError, match=r"image_size=16 is too small for resnet50.*at least 32"):
        tfxfer.build_backbone("resnet50", weights=None, image_size=16)


def test_weights_file_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "nope_notop.h5")
    with pytest.raises(WeightsError, match="Weights file not found") as info:
        tfxfer.build_backbone("resnet50", weights=missing, image_size=32)
    assert missing in str(info.value)


@pytest.fixture(scope="module")
def random_resnet50_weights(tmp_path_factory) -> tuple[str, list[np.ndarray]]:
    """Random ResNet50 notop weights saved to a local file, and their values."""
    network = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path_factory.mktemp("weights") / "resnet50_notop.weights.h5")
    network.save_weights(path)
    return path, network.get_weights()


def test_matching_local_weights_file_loads_those_exact_weights(random_resnet50_weights):
    path, expected = random_resnet50_weights
    # Another image size: ResNet50's weights do not depend on it.
    backbone = tfxfer.build_backbone("resnet50", weights=path, image_size=48)
    loaded = backbone.network.get_weights()
    assert len(loaded) == len(expected)
    for value, want in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(value, want)
    assert backbone.info["weights"] == path


def test_weights_file_of_another_architecture(tmp_path):
    other = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    path = str(tmp_path / "mobilenetv3small_notop.weights.h5")
    other.save_weights(path)

    with pytest.raises(WeightsError) as info:
        tfxfer.build_backbone("resnet50", weights=path, image_size=32)
    message = str(info.value)
    assert path in message and "does not match the resnet50 architecture" in message
    assert "ResNet50(include_top=False)" in message
    assert "\n" not in message and len(message) < 600, "one short sentence, not a Keras dump"


def test_weights_file_with_wrong_extension(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(WeightsError, match=r"\.h5"):
        tfxfer.build_backbone("resnet50", weights=str(path), image_size=32)


def test_imagenet_weights_offline_says_how_to_pass_a_local_file(offline):
    cached = os.path.expanduser(
        "~/.keras/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    if os.path.exists(cached):
        pytest.skip(f"{cached} is cached, so Keras would not try to download it")
    with pytest.raises(WeightsError) as info:
        tfxfer.build_backbone("resnet50", weights="imagenet", image_size=32)
    message = str(info.value)
    assert "offline" in message
    assert "--weights PATH" in message and "--weights none" in message


def test_legacy_hdf5_weights_file_like_the_keras_download(tmp_path):
    """The `..._notop.h5` files Keras downloads use the legacy HDF5 layout; they load too."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format  # writes that layout

    network = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, network)

    backbone = tfxfer.build_backbone("resnet50", weights=path, image_size=32)
    loaded = backbone.network.get_weights()
    for value, want in zip(loaded, network.get_weights(), strict=True):
        np.testing.assert_array_equal(value, want)
    with pytest.raises(WeightsError, match="does not match the resnet50v2 architecture"):
        tfxfer.build_backbone("resnet50v2", weights=path, image_size=32)
