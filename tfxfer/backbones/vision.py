"""Image backbones from `keras.applications`, one table row each.

Every row says which constructor to call, how that network wants its pixels
(`preprocessing`), the smallest input it accepts, and where its layer groups begin. Adding a
backbone is adding a row: the builder below is the same for all of them.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import keras

from tfxfer.backbones.base import Backbone, SourceHead, split_into_groups
from tfxfer.backbones.from_run import (
    image_network_from_run,
    is_run_dir,
    load_network_weights,
    pretraining_output,
)
from tfxfer.errors import TfxferError, WeightsError
from tfxfer.layers.image_preprocessing import ImagePreprocessing

# `preprocessing` is the pixel convention the network was trained with:
#   caffe: RGB->BGR, subtract the ImageNet mean (ResNet v1, VGG)
#   tf:    scale to [-1, 1] (ResNet v2, MobileNet v2, Inception)
#   torch: scale to [0, 1], normalise by ImageNet mean/std (DenseNet)
#   none:  the network rescales itself and takes [0, 255] floats (EfficientNetV2, MobileNetV3)
# `groups` are (group name, prefix of the group's first layer), input side first.
VISION_BACKBONES: dict[str, dict[str, Any]] = {
    "resnet50": {
        "source_head": True,  # its ImageNet top is pooling + one dense layer
        "constructor": "ResNet50",
        "preprocessing": "caffe",
        "min_image_size": 32,
        "default_image_size": 224,
        "groups": [
            ("stem", "conv1"),
            ("conv2", "conv2_"),
            ("conv3", "conv3_"),
            ("conv4", "conv4_"),
            ("conv5", "conv5_"),
        ],
    },
    "resnet101": {
        "source_head": True,  # its ImageNet top is pooling + one dense layer
        "constructor": "ResNet101",
        "preprocessing": "caffe",
        "min_image_size": 32,
        "default_image_size": 224,
        "groups": [
            ("stem", "conv1"),
            ("conv2", "conv2_"),
            ("conv3", "conv3_"),
            ("conv4", "conv4_"),
            ("conv5", "conv5_"),
        ],
    },
    "resnet50v2": {
        "source_head": True,  # its ImageNet top is pooling + one dense layer
        "constructor": "ResNet50V2",
        "preprocessing": "tf",
        "min_image_size": 32,
        "default_image_size": 224,
        "groups": [
            ("stem", "conv1"),
            ("conv2", "conv2_"),
            ("conv3", "conv3_"),
            ("conv4", "conv4_"),
            ("conv5", "conv5_"),
        ],
    },
    "efficientnetv2b0": {
        "source_head": True,  # its ImageNet top is pooling + one dense layer
        "constructor": "EfficientNetV2B0",
        "preprocessing": "none",
        "min_image_size": 32,
        "default_image_size": 224,
        "groups": [
            ("stem", "stem_"),
            ("block1", "block1"),
            ("block2", "block2"),
            ("block3", "block3"),
            ("block4", "block4"),
            ("block5", "block5"),
            ("block6", "block6"),
            ("top", "top_"),
        ],
    },
    "mobilenetv3small": {
        "constructor": "MobileNetV3Small",
        "preprocessing": "none",
        "min_image_size": 32,
        "default_image_size": 224,
        # MobileNetV3 names its blocks expanded_conv, expanded_conv_1, ... expanded_conv_10.
        "groups": [
            ("stem", "conv"),
            ("early", "expanded_conv"),
            ("middle", "expanded_conv_3_"),
            ("late", "expanded_conv_8_"),
            ("top", "conv_1"),
        ],
        "kwargs": {"include_preprocessing": True},
    },
}


def _resolve_weights(weights: str | None) -> str | None:
    """Maps the user's `weights` to what keras.applications takes, checking local files."""
    if weights is None or str(weights).lower() in ("none", "random", ""):
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    path = os.path.expanduser(str(weights))
    if os.path.isdir(path) and is_run_dir(path):
        return path  # an earlier tfxfer run: its trained backbone
    if os.path.isdir(path):
        raise WeightsError(
            f"{path!r} is a directory but not a tfxfer run (no config.json with backbone_info), "
            "so it has no backbone in it. Pass a run directory, a weights file, 'imagenet' or "
            "none."
        )
    if not os.path.isfile(path):
        raise WeightsError(
            f"Weights file not found: {path!r}. Pass weights='imagenet' (downloaded by Keras "
            "when online), weights=None for random initialisation, the path of an existing "
            "`.weights.h5` / `.h5` file saved from the same architecture, or the directory of "
            "a finished tfxfer run of it."
        )
    if not path.endswith(".h5"):
        raise WeightsError(
            f"Unsupported weights file {path!r}: keras.applications loads HDF5 weights files "
            "(`.h5` or `.weights.h5`), such as those Keras downloads into ~/.keras/models/."
        )
    return path


def _pretrained_weights_file(run: str, key: str) -> str | None:
    """The weights file a pretraining run at `run` wrote for `key`, or None for another run.

    A pretraining run (`tfxfer.pretrain.contrastive`) leaves a weights file, not a
    `model.keras`; it must be an image run of the same architecture.
    """
    output = pretraining_output(run)
    if output is None:
        return None  # a fine-tuning run: its model.keras holds the backbone
    if output.get("modality") != "image":
        raise WeightsError(
            f"{run!r} is a {output.get('objective', '')} pretraining run of a "
            f"{output.get('modality')} backbone, and {key} takes images. Pass it as a text "
            "recipe's --backbone, or an image pretraining run here."
        )
    with open(os.path.join(run, "config.json"), encoding="utf-8") as handle:
        trained = json.load(handle).get("backbone_info", {}).get("name")
    if trained != key:
        raise WeightsError(
            f"{run!r} pretrained a {trained!r} backbone, not {key!r}: its weights fit that "
            f"architecture only. Pass --backbone {trained}, or a pretraining run of {key}."
        )
    return output["path"]


def _load_local_weights(network: keras.Model, path: str, key: str, constructor: str) -> None:
    """Loads a local weights file, turning a mismatch into one readable sentence."""
    with warnings.catch_warnings():
        # A mismatched file makes Keras warn once per layer before it raises; the error
        # below says it once.
        warnings.simplefilter("ignore")
        try:
            network.load_weights(path)
        except (ValueError, KeyError, OSError) as error:
            first_line = str(error).strip().splitlines()[0].split(" Example error message")[0]
            first_line = first_line[:300].rstrip(". ")
            raise WeightsError(
                f"The weights file {path!r} does not match the {key} architecture without its "
                f"top ({first_line}). Use a weights file saved from "
                f"keras.applications.{constructor}(include_top=False)."
            ) from None


def build_vision_backbone(
    name: str = "resnet50",
    *,
    weights: str | None = "imagenet",
    image_size: int | None = None,
    source_head: bool = False,
) -> Backbone:
    """Builds a `keras.applications` backbone from its table row.

    Args:
        name: str. A key of `VISION_BACKBONES` (case-insensitive). Defaults to "resnet50".
        weights: str or None. "imagenet" (downloaded and cached by Keras when online), None
            for random initialisation, the path of a local weights file for the same
            architecture without its top
            (e.g. `resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`), or the directory
            of a finished tfxfer run of the same backbone (its trained network; the head
            stays behind), or of a finished image pretraining run of it
            (`recipes.contrastive_image_pretrain`: the weights file it wrote).
            Defaults to "imagenet".
        image_size: int. Side of the square the network sees. Defaults to the row's
            `default_image_size`.
        source_head: bool. Also keep the checkpoint's ImageNet classifier (average pooling +
            its 1000-way dense layer) as `source_heads["imagenet"]`, for
            `Stage(regularizer="source_task")`. It needs weights with the top: "imagenet", or
            a local weights file of the whole classifier (`include_top=True`). Defaults to
            `False`.

    Returns:
        A `Backbone` whose network takes preprocessed float images of `image_size` and returns
        a spatial feature map; its preprocessor takes raw uint8 images of any size.

    Example:

    >>> backbone = build_vision_backbone("resnet50", weights=None, image_size=64)
    >>> backbone.group_names
    ['stem', 'conv2', 'conv3', 'conv4', 'conv5']
    """
    key, row, size = _checked_row(name, image_size)
    resolved = _resolve_weights(weights)
    # A pretraining run is checked before minutes go into building the network.
    pretrained = (
        _pretrained_weights_file(resolved, key)
        if resolved is not None and os.path.isdir(resolved)
        else None
    )
    # === Layers ===
    constructor = getattr(keras.applications, row["constructor"])
    network = _build_network(key, row, constructor, resolved=resolved, size=size)
    heads = {}
    if source_head:
        heads["imagenet"] = _imagenet_head(key, row, constructor, resolved, network)
    elif pretrained is not None:
        _load_local_weights(network, pretrained, key, row["constructor"])
    elif resolved is not None and os.path.isdir(resolved):
        load_network_weights(network, image_network_from_run(resolved, key), resolved)
    elif resolved not in (None, "imagenet"):
        _load_local_weights(network, resolved, key, row["constructor"])
    return Backbone(
        name=key,
        network=network,
        preprocessor=ImagePreprocessing(size, row["preprocessing"], name="image_preprocessing"),
        output_kind="spatial",
        input_kind="image",
        layer_groups=split_into_groups(network.layers, row["groups"]),
        info={
            "backbone": key,
            "weights": weights if resolved != "imagenet" else "imagenet",
            "image_size": size,
            "preprocessing": row["preprocessing"],
            **({"source_heads": ["imagenet"]} if heads else {}),
        },
        namespace=key,
        source_heads=heads,
    )


def _checked_row(name: str, image_size: int | None) -> tuple[str, dict[str, Any], int]:
    """The backbone's key, its table row, and the image size it gets (checked)."""
    key = name.lower()
    if key not in VISION_BACKBONES:
        raise TfxferError(
            f"Unknown image backbone {name!r}. Known image backbones: {sorted(VISION_BACKBONES)}."
        )
    row = VISION_BACKBONES[key]
    size = int(image_size or row["default_image_size"])
    if size < row["min_image_size"]:
        raise TfxferError(
            f"image_size={size} is too small for {key}: it needs at least "
            f"{row['min_image_size']} pixels per side (its five stride-2 stages would shrink "
            f"the image to nothing). Pass --image-size {row['min_image_size']} or more."
        )
    return key, row, size


def _build_network(key: str, row: dict, constructor, *, resolved: str | None, size: int):
    """The headless network, with ImageNet weights when asked (an offline error explained)."""
    try:
        return constructor(
            include_top=False,
            weights="imagenet" if resolved == "imagenet" else None,
            input_shape=(size, size, 3),
            **row.get("kwargs", {}),
        )
    except Exception as error:  # Keras raises a bare Exception for a failed download.
        if resolved == "imagenet" and "URL fetch failure" in str(error):
            raise WeightsError(
                f"Could not download the ImageNet weights for {key}: this machine seems to be "
                "offline. Download the `..._notop.h5` weights file on a machine that is online "
                "(Keras caches it in ~/.keras/models/) and pass its path (--weights PATH, or "
                "weights='path/to/file.h5'), or train from scratch with --weights none."
            ) from None
        raise


def _imagenet_head(key: str, row: dict, constructor, resolved: str | None, network) -> SourceHead:
    """The pretrained ImageNet classifier of `key`, as a source head on avg-pooled features.

    With a local file of the whole classifier, `network` (built without its top) takes that
    file's weights too, layer by layer.
    """
    supported = sorted(k for k, r in VISION_BACKBONES.items() if r.get("source_head"))
    if not row.get("source_head"):
        raise TfxferError(
            f"{key} keeps no source head: its ImageNet top is not pooling + one dense layer. "
            f"Backbones with one: {supported}. Use regularizer 'l2sp' or 'features' instead."
        )
    if resolved is not None and os.path.isdir(resolved):
        raise WeightsError(
            f"source_head=True keeps {key}'s ImageNet classifier, and a tfxfer run's backbone "
            f"({resolved!r}) carries none: its head was trained for that run's own classes."
        )
    if resolved is None:
        raise WeightsError(
            f"source_head=True keeps {key}'s pretrained ImageNet classifier, and randomly "
            "initialised weights (--weights none) have none. Use weights='imagenet' or a "
            "weights file of the whole classifier (include_top=True)."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns per layer before it raises
        try:
            full = constructor(include_top=True, weights=resolved, **row.get("kwargs", {}))
        except ValueError as error:
            raise WeightsError(
                f"source_head=True needs the whole {key} classifier, and {resolved!r} does not "
                f"hold it ({str(error).strip().splitlines()[0][:200]}). Pass a weights file "
                f"saved from keras.applications.{row['constructor']}(include_top=True), or "
                "leave source_head off."
            ) from None
        except Exception as error:  # Keras raises a bare Exception for a failed download.
            if "URL fetch failure" in str(error):
                raise WeightsError(
                    f"Could not download {key}'s ImageNet classifier (source_head=True): this "
                    "machine seems to be offline. Pass a local weights file of the whole "
                    "classifier (include_top=True) as weights."
                ) from None
            raise
    if resolved != "imagenet":
        for layer in network.layers:
            if layer.weights:
                layer.set_weights(full.get_layer(layer.name).get_weights())
    top = full.get_layer("predictions")
    dense = keras.layers.Dense(top.units, activation="softmax", name=f"{key}_imagenet_top")
    dense.build((None, int(top.kernel.shape[0])))
    dense.set_weights(top.get_weights())
    return SourceHead(dense, "avg", int(top.units))
