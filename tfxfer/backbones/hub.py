"""Backbones from TF-Hub SavedModels, usable inside Keras 3 models.

The SavedModel runs inside `tfxfer.layers.HubLayer` (the Keras 3 counterpart of
`tensorflow_hub.KerasLayer`); this module puts that layer between the right input and
preprocessing and describes the result as a `Backbone`. A model holding a `HubLayer` reloads
the SavedModel from its handle when loaded, so `load_model` needs `safe_mode=False` for it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import keras
import tensorflow as tf

from tfxfer.backbones.base import Backbone, InputKind, OutputKind
from tfxfer.errors import TfxferError
from tfxfer.layers.hub_layer import NETWORK_TIMEOUT_SECONDS as NETWORK_TIMEOUT_SECONDS
from tfxfer.layers.hub_layer import REMOTE_PREFIXES as REMOTE_PREFIXES
from tfxfer.layers.hub_layer import HubLayer
from tfxfer.layers.hub_layer import resolve_hub_handle as resolve_hub_handle


def build_hub_backbone(
    handle: str | os.PathLike[str],
    *,
    input_kind: InputKind = "image",
    image_size: int | None = None,
    trainable: bool = False,
    output_key: str | None = None,
    signature: str | None = None,
) -> Backbone:
    """Builds a backbone from a TF-Hub SavedModel (a local directory, or a URL when online).

    Image models follow the TF-Hub convention: float32 pixels in [0, 1] at a fixed size.
    The preprocessor does that (resize, then divide by 255) so the final model takes raw
    uint8 images of any size. Text models (sentence encoders) take a batch of strings and
    do their own tokenization, so the preprocessor is `None` and the network's input is a
    string tensor.

    Args:
        handle: str or path. A SavedModel directory, or a `https://tfhub.dev/...` or
            `https://www.kaggle.com/models/...` URL (needs network the first time).
        input_kind: "image" or "text". Defaults to `"image"`.
        image_size: int or None. The side the images are resized to. Defaults to `None`:
            the size the SavedModel declares; an error if it declares none.
        trainable: bool. Whether the hub weights are fine-tuned. Defaults to `False`.
        output_key: str or None. The output to use when the model returns a dict (e.g.
            `"pooled_output"`). Defaults to `None`.
        signature: str or None. Call this signature instead of `__call__` (TF1 Hub format
            models: `"default"`). Defaults to `None`.

    Returns:
        A `Backbone` with one layer group, `"hub"`, and output kind `"vector"` or
        `"spatial"` depending on the rank of the model's output.

    Example:

    ```python
    backbone = build_hub_backbone("/models/mobilenet_v2_feature_vector", image_size=224)
    backbone.output_kind  # "vector"
    ```
    """
    handle = os.fspath(handle)
    if input_kind not in ("image", "text"):
        raise TfxferError(
            f"Expected `input_kind` to be one of {{'image', 'text'}}. "
            f"Received: input_kind={input_kind!r}"
        )
    # === Layers ===
    hub_layer = HubLayer(
        handle, signature=signature, output_key=output_key, trainable=trainable, name="hub"
    )
    info: dict[str, Any] = {
        "weights_source": handle,
        "saved_model_path": hub_layer.saved_model_path,
        "signature": hub_layer.signature_name,
        "output_key": output_key,
    }
    # === Preprocessing and input ===
    if input_kind == "image":
        preprocessor, inputs = _image_input(handle, image_size, hub_layer.input_spec_from_model)
        info["image_size"] = [int(inputs.shape[1]), int(inputs.shape[2])]
    else:
        preprocessor, inputs = _text_input(handle, hub_layer.input_spec_from_model)
    # === Functional Model ===
    features = hub_layer(inputs)
    network = keras.Model(inputs, features, name="hub_network")
    info["hub_parameters"] = sum(math.prod(weight.shape) for weight in hub_layer.weights)
    return Backbone(
        name=handle,
        network=network,
        preprocessor=preprocessor,
        output_kind=_output_kind(handle, features),
        input_kind=input_kind,
        layer_groups={"hub": [hub_layer]},
        info=info,
        namespace="hub",
    )


def _image_input(handle: str, image_size: int | None, spec: tf.TensorSpec | None):
    """The preprocessor (resize, then [0, 1]) and the float input of an image hub model."""
    if spec is not None and spec.dtype == tf.string:
        raise TfxferError(
            f"Expected input_kind='text' for {handle!r}, which takes strings. "
            f"Received: input_kind='image'."
        )
    if spec is not None and not spec.dtype.is_floating:
        raise TfxferError(
            f"Expected {handle!r} to take float images in [0, 1], the TF-Hub convention "
            f"for image feature extractors. Received a model that takes "
            f"{spec.dtype.name} tensors of shape {spec.shape}, which tfxfer does not "
            f"support as a backbone."
        )
    height, width = _image_size(handle, image_size, spec)
    preprocessor = keras.Sequential(
        [
            keras.layers.Resizing(height, width, dtype="float32"),
            keras.layers.Rescaling(1.0 / 255.0, dtype="float32"),
        ],
        name="hub_image_preprocessor",
    )
    return preprocessor, keras.Input(shape=(height, width, 3), dtype="float32", name="images")


def _text_input(handle: str, spec: tf.TensorSpec | None):
    """No preprocessor, and a string input: a hub text model tokenizes inside its graph."""
    if spec is not None and spec.dtype != tf.string:
        raise TfxferError(
            f"Expected input_kind='image' for {handle!r}, which takes {spec.dtype.name} "
            f"tensors, not strings. Received: input_kind='text'."
        )
    return None, keras.Input(shape=(), dtype="string", name="text")


def _output_kind(handle: str, features) -> OutputKind:
    if len(features.shape) == 2:
        return "vector"
    if len(features.shape) == 4:
        return "spatial"
    raise TfxferError(
        f"Expected {handle!r} to return a (batch, features) vector or a "
        f"(batch, height, width, channels) map. Received an output of shape "
        f"{tuple(features.shape)}; pick another output with `output_key`."
    )


def _image_size(handle: str, image_size: int | None, spec: tf.TensorSpec | None) -> tuple[int, int]:
    declared: tuple[int, int] | None = None
    if spec is not None and spec.shape.rank == 4:
        height, width = spec.shape[1], spec.shape[2]
        if height is not None and width is not None:
            declared = (int(height), int(width))
    if image_size is None:
        if declared is None:
            raise TfxferError(
                f"Expected an `image_size` for {handle!r}, which accepts any image size. "
                f"Received: image_size=None. Pass the size on its model page (often 224)."
            )
        return declared
    if declared is not None and declared != (image_size, image_size):
        raise TfxferError(
            f"Expected `image_size` to match the {declared[0]}x{declared[1]} input of "
            f"{handle!r}. Received: image_size={image_size}."
        )
    return image_size, image_size
