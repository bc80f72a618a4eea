"""Small builders shared by the foundation tests: a tiny backbone, tiny data, image folders.

Everything here is sized to run in seconds on two CPU cores and never downloads anything.
The tiny backbone has the parts that make transfer learning hard to get right (ordered layer
groups and BatchNormalization), without ResNet50's cost.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

import tfxfer
from tfxfer.backbones import Backbone, split_into_groups
from tfxfer.backbones.vision import ImagePreprocessing
from tfxfer.data.pipeline import TrainData, epoch_batches

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GROUPS = ("low", "mid", "top")
TINY_IMAGE_SIZE = 16
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "bmp": "BMP", "gif": "GIF"}


# === Tiny backbone and model ===


def tiny_backbone(image_size: int = TINY_IMAGE_SIZE, seed: int = 0) -> Backbone:
    """Three groups ("low", "mid", "top") of Conv2D + BatchNormalization + ReLU."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="tiny_input")
    x = inputs
    for group, width in zip(TINY_GROUPS, (4, 6, 8), strict=True):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"{group}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"{group}_bn")(x)
        x = keras.layers.ReLU(name=f"{group}_relu")(x)
    network = keras.Model(inputs, x, name="tiny_network")
    return Backbone(
        name="tiny",
        network=network,
        preprocessor=ImagePreprocessing(image_size, "tf", name="image_preprocessing"),
        output_kind="spatial",
        input_kind="image",
        layer_groups=split_into_groups(network.layers, [(g, f"{g}_") for g in TINY_GROUPS]),
    )


def tiny_model(num_classes: int = 3, seed: int = 0) -> tuple[Backbone, keras.Model]:
    """A seeded tiny backbone with a linear head and no dropout (so training is repeatable)."""
    backbone = tiny_backbone(seed=seed)
    model = tfxfer.build_model(backbone, num_classes, head=tfxfer.HeadConfig(dropout=0.0))
    return backbone, model


def layer_weights(layers) -> dict[str, np.ndarray]:
    """A snapshot {variable path: value} of every weight (trainable or not) of `layers`."""
    return {v.path: np.array(v.numpy()) for layer in layers for v in layer.weights}


def backbone_layers(backbone: Backbone, kind: type | None = None, groups=None) -> list:
    names = groups or backbone.group_names
    return [
        layer
        for g in names
        for layer in backbone.layer_groups[g]
        if kind is None or isinstance(layer, kind)
    ]


class WeightSnapshots(keras.callbacks.Callback):
    """Records every weight of the model at the start and end of each `fit` (= each stage)."""

    def __init__(self):
        super().__init__()
        self.stages: list[dict[str, dict[str, np.ndarray]]] = []

    def on_train_begin(self, logs=None):
        self.stages.append({"begin": layer_weights(self.model.layers)})

    def on_train_end(self, logs=None):
        self.stages[-1]["end"] = layer_weights(self.model.layers)


class InterruptAfterEpoch(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of global epoch `epoch` (1-based).

    tfxfer's own epoch-end callback runs before user callbacks, so the checkpoint of that
    epoch is complete when this fires: it is a kill right after a checkpoint.
    """

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt(f"simulated kill after epoch {self.epoch}")


# === Tiny data ===


def tiny_arrays(
    n: int = 24, num_classes: int = 3, image_size: int = TINY_IMAGE_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images whose class is which colour channel is bright: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    images = rng.integers(0, 100, (n, image_size, image_size, 3))
    images[np.arange(n), :, :, labels % 3] += 150
    return images.astype(np.uint8), labels


def tiny_train_data(
    images: np.ndarray, labels: np.ndarray, batch_size: int = 8, seed: int = 0
) -> TrainData:
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    return epoch_batches(examples, num_examples=len(images), batch_size=batch_size, seed=seed)


def tiny_val_data(images: np.ndarray, labels: np.ndarray, batch_size: int = 8) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


# === Image folders ===


def write_image(path: str, height: int = 24, width: int = 24, seed: int = 0) -> str:
    """Writes a random RGB image; the format follows the extension (jpg, png, bmp, gif)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=PIL_FORMATS[path.rsplit(".", 1)[-1].lower()])
    return path


def write_image_folder(
    root: str,
    classes: dict[str, int] | None = None,
    ext: str = "png",
    size: int = 24,
    seed: int = 0,
) -> str:
    """Writes `root/<class>/<i>.<ext>` with `classes[class]` random images per class."""
    classes = {"cat": 4, "dog": 4} if classes is None else classes
    for c, (name, count) in enumerate(sorted(classes.items())):
        for i in range(count):
            write_image(
                os.path.join(root, name, f"{i:03d}.{ext}"),
                size,
                size,
                seed=seed * 1000 + c * 100 + i,
            )
    return root


def snapshot_files(directory: str) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory`, to prove nothing changed."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, directory)] = handle.read()
    return files


# === A tiny two-stage run ===


def tiny_two_stage_run(
    run_dir,
    *,
    seed: int = 0,
    examples: int = 18,
    head_epochs: int = 1,
    finetune_epochs: int = 3,
    layerwise_lr_decay: float | None = 0.5,
    validate: bool = False,
    config=None,
    callbacks=None,
):
    """The tiny model through a head stage and a full fine-tuning stage, into `run_dir`.

    A resumed run passes another `seed`, as a fresh process would build a fresh model: only
    the checkpoint can then make it end where the uninterrupted run ended.
    """
    backbone, model = tiny_model(seed=seed)
    images, labels = tiny_arrays(n=examples)
    stages = [
        tfxfer.Stage("head", head_epochs, learning_rate=1e-2),
        tfxfer.Stage(
            "finetune",
            finetune_epochs,
            train="all",
            learning_rate=5e-3,
            layerwise_lr_decay=layerwise_lr_decay,
        ),
    ]
    result = tfxfer.run_schedule(
        model,
        backbone,
        stages,
        tiny_train_data(images, labels, batch_size=6),
        tiny_val_data(images[:8], labels[:8]) if validate else None,
        run_dir=run_dir,
        config=config,
        callbacks=list(callbacks or []),
        verbose=0,
    )
    return model, result


# === Tiny rows beside resnet50 in the image backbone table ===

# Two tiny `keras.applications`-style networks, registered by `register_tiny_backbones` as
# table rows, so recipes and `Classifier` run end to end by name in seconds. Two, because a
# fused config refuses the same backbone twice.
TINY_ROWS = {
    "tinynet": {
        "constructor": "TinyNet",
        "preprocessing": "tf",
        "min_image_size": 16,
        "default_image_size": 32,
        "groups": [("low", "low_"), ("mid", "mid_"), ("top", "top_")],
    },
    "tinynetb": {
        "constructor": "TinyNetB",
        "preprocessing": "none",
        "min_image_size": 16,
        "default_image_size": 32,
        "groups": [("low", "b_low_"), ("mid", "b_mid_"), ("top", "b_top_")],
    },
}


def _tiny_constructor(model_name: str, widths: tuple[int, ...], prefix: str = ""):
    """A constructor with `keras.applications`' signature (no weights exist for it).

    `prefix` starts every layer name: two networks fused in one model must not share layer
    names, as no two real rows' networks used together here do.
    """

    def build(include_top=False, weights=None, input_shape=None, **kwargs):
        if include_top or weights not in (None, "none"):
            raise ValueError(f"{model_name} has no pretrained weights and no top.")
        inputs = keras.Input(input_shape or (32, 32, 3), name=f"{model_name.lower()}_input")
        x = inputs
        for group, width in zip(TINY_GROUPS, widths, strict=True):
            name = f"{prefix}{group}"
            x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name=f"{name}_conv")(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
        return keras.Model(inputs, x, name=model_name.lower())

    build.__name__ = model_name
    return build


TINY_CONSTRUCTORS = {
    "TinyNet": _tiny_constructor("TinyNet", (4, 6, 8)),
    "TinyNetB": _tiny_constructor("TinyNetB", (3, 5, 7), prefix="b_"),
}


def register_tiny_backbones(monkeypatch) -> list[str]:
    """Adds the tiny rows to `VISION_BACKBONES` (and their constructors to
    `keras.applications`) for as long as `monkeypatch` lives; returns their names."""
    from tfxfer.backbones import vision

    for name, constructor in TINY_CONSTRUCTORS.items():
        monkeypatch.setattr(keras.applications, name, constructor, raising=False)
    for key, row in TINY_ROWS.items():
        monkeypatch.setitem(vision.VISION_BACKBONES, key, row)
    return sorted(TINY_ROWS)


# === Save, reload, predict alike ===


def assert_reloads_alike(
    path, model: keras.Model, inputs, *, rtol: float = 1e-7, atol: float = 0.0, **load_options
) -> keras.Model:
    """Loads `path` (a `.keras` file, or a run directory holding `model.keras`) with
    `tfxfer.load_model` and checks that it predicts `inputs` as `model` does.

    Returns the reloaded model, for the checks a test adds. `rtol` and `atol` are
    `np.testing.assert_allclose`'s (its defaults); `load_options` go to `load_model`.
    """
    path = str(path)
    if not path.endswith(".keras"):  # a run directory
        path = path.rstrip("/") + "/model.keras"
    reloaded = tfxfer.load_model(path, **load_options)
    np.testing.assert_allclose(
        reloaded.predict(inputs, verbose=0),
        model.predict(inputs, verbose=0),
        rtol=rtol,
        atol=atol,
    )
    return reloaded


def save_and_reload_alike(model: keras.Model, path, inputs, **tolerances) -> keras.Model:
    """Saves `model` to `path` (`.keras`) and checks the reloaded model predicts alike."""
    model.save(str(path))
    return assert_reloads_alike(path, model, inputs, **tolerances)
