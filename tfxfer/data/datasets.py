"""From `LabelledData` and a backbone to the `tf.data` pipelines that training reads.

A recipe should not have to know whether its data need decoding or tokenizing: the data say
what they are (`LabelledData.kind`) and the backbone says what it takes (`input_kind`, its
image size, its text preprocessor). `make_datasets` reads both and builds the three pipelines
with the image or text functions, which stay usable on their own. Checking here that the two
kinds agree turns a confusing shape error deep inside the first training step into one
sentence before anything is decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from tfxfer.backbones.base import Backbone
from tfxfer.data.examples import Examples, LabelledData
from tfxfer.data.images import (
    Augmentation,
    ImageSize,
    image_train_data,
    make_image_dataset,
)
from tfxfer.data.pipeline import TrainData
from tfxfer.data.text_pipeline import make_text_dataset, text_train_data
from tfxfer.errors import TfxferError

_KIND_PLURAL = {"image": "images", "text": "text"}


class Datasets(NamedTuple):
    """The pipelines of one dataset: replayable training batches, then val and test batches.

    Args:
        train: TrainData. Shuffled training batches that can start at any epoch (for resume).
        val: tf.data.Dataset or None. Validation batches in file order.
        test: tf.data.Dataset or None. Test batches in file order.
    """

    train: TrainData
    val: tf.data.Dataset | None
    test: tf.data.Dataset | None


def make_datasets(
    data: LabelledData,
    backbone: Backbone | Sequence[Backbone],
    *,
    batch_size: int,
    seed: int = 0,
    augmentation: Augmentation | None = None,
    cache: bool | str = True,
    dynamic_padding: bool = True,
) -> Datasets:
    """Builds the training, validation and test pipelines the backbone's model reads.

    Images are decoded once and resized to the backbone's input size (they stay uint8; the
    backbone's preprocessor inside the model does the rest). Texts are tokenized once with
    `backbone.preprocessor`, or kept as raw strings when it is `None` (TF-Hub text
    backbones take strings). Either way the result is cached, and training batches reshuffle
    per epoch with a seed made from `seed` and the epoch number.

    Args:
        data: LabelledData. What `load_images` or `load_texts` returned.
        backbone: Backbone, or the list of Backbones of a fusion model (images are then
            resized to the largest backbone's size, each backbone resizing on inside the
            model; texts are tokenized once with the shortest sequence length).
        batch_size: int. The global batch size.
        seed: int. Seed of the per-epoch shuffle and of the augmentation. Defaults to `0`.
        augmentation: Augmentation or None. Random changes to training images; images only.
            Defaults to `None`.
        cache: bool or str. Cache decoded images or token ids in memory (`True`), not at all
            (`False`), or in files: a str is a path prefix, and each split caches to
            `<cache>.train`, `<cache>.val`, `<cache>.test`. Defaults to `True`.
        dynamic_padding: bool. Texts only: trim each batch of token ids to the bucket length
            that holds its longest text, and batch training texts of similar length together
            (`tfxfer.data.text_pipeline`). `False` pads every text to the preprocessor's length.
            Defaults to `True`.

    Returns:
        `Datasets(train, val, test)`; `val` and `test` are None where `data` has no such split.

    Raises:
        TfxferError: the data and the backbone are of different kinds, an augmentation is
            given for text, or the backbone's image size is unknown.

    Example:

    ```python
    data = load_images("photos", val_split=0.2)
    backbone = build_backbone("resnet50")
    train, val, test = make_datasets(data, backbone, batch_size=32, augmentation=Augmentation())
    ```
    """
    backbone = data_backbone(backbone)
    _check_request(data, backbone, batch_size=batch_size, augmentation=augmentation)
    if data.kind == "image":
        return _image_datasets(
            data, backbone, batch_size=batch_size, seed=seed, augmentation=augmentation, cache=cache
        )
    return _text_datasets(
        data,
        backbone.preprocessor,  # None keeps raw strings (TF-Hub text)
        batch_size=batch_size,
        seed=seed,
        cache=cache,
        dynamic_padding=dynamic_padding,
    )


def _check_request(
    data: LabelledData,
    backbone: Backbone,
    *,
    batch_size: int,
    augmentation: Augmentation | None,
) -> None:
    """Raises `TfxferError` unless the data are what the backbone takes (images or text), the
    batch size is a positive int, and an augmentation is only asked of images."""
    if data.kind != backbone.input_kind:
        data_kind = _KIND_PLURAL.get(data.kind, data.kind)
        backbone_kind = _KIND_PLURAL.get(backbone.input_kind, backbone.input_kind)
        raise TfxferError(
            f"The data are {data_kind} but the backbone {backbone.name!r} takes {backbone_kind}. "
            f"Pick a backbone for {data_kind}, or load {backbone_kind} for this one."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TfxferError(
            f"Expected `batch_size` to be a positive int. Received: batch_size={batch_size!r}"
        )
    if data.kind != "image" and augmentation is not None:
        raise TfxferError(
            "Augmentation applies to images only, and the data are text. Received: "
            f"augmentation={augmentation!r}; pass `augmentation=None`."
        )


def _split_cache(cache: bool | str, split: str) -> bool | str:
    """A split's cache: the same bool, or its own file `<cache>.<split>`."""
    return f"{cache}.{split}" if isinstance(cache, str) else cache


def _image_datasets(
    data: LabelledData,
    backbone: Backbone,
    *,
    batch_size: int,
    seed: int,
    augmentation: Augmentation | None,
    cache: bool | str,
) -> Datasets:
    image_size = backbone_image_size(backbone)
    train = image_train_data(
        data.train,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        augmentation=augmentation,
        cache=_split_cache(cache, "train"),
    )

    def evaluation(split: Examples, name: str) -> tf.data.Dataset:
        return make_image_dataset(
            split, image_size=image_size, batch_size=batch_size, cache=_split_cache(cache, name)
        )

    return Datasets(train, *_evaluation_splits(data, evaluation))


def _text_datasets(
    data: LabelledData,
    preprocessor: Any,
    *,
    batch_size: int,
    seed: int,
    cache: bool | str,
    dynamic_padding: bool,
) -> Datasets:
    train = text_train_data(
        data.train,
        preprocessor,
        batch_size=batch_size,
        seed=seed,
        cache=_split_cache(cache, "train"),
        dynamic_padding=dynamic_padding,
    )

    def evaluation(split: Examples, name: str) -> tf.data.Dataset:
        return make_text_dataset(
            split.inputs,
            split.labels,
            preprocessor,
            batch_size=batch_size,
            cache=_split_cache(cache, name),
            dynamic_padding=dynamic_padding,
        )

    return Datasets(train, *_evaluation_splits(data, evaluation))


def _evaluation_splits(
    data: LabelledData, evaluation: Callable[[Examples, str], tf.data.Dataset]
) -> tuple[tf.data.Dataset | None, tf.data.Dataset | None]:
    """The val and test pipelines, each None where `data` has no such split."""
    val, test = (
        evaluation(split, name) if split is not None else None
        for split, name in ((data.val, "val"), (data.test, "test"))
    )
    return val, test


def data_backbone(backbones: Backbone | Sequence[Backbone]) -> Backbone:
    """The one of several backbones (a fusion's) whose input the data pipelines prepare.

    Images: the largest image size (the others resize inside the model, so no backbone sees
    an image upscaled from a smaller one). Text: the shortest sequence length (the fused
    backbones share a tokenizer; the model reads one set of token ids).
    """
    if not isinstance(backbones, Sequence):
        return backbones
    if not backbones:
        raise TfxferError("Expected a Backbone or a non-empty list of Backbones. Received: []")
    if backbones[0].input_kind == "image":

        def area(backbone: Backbone) -> int:
            size = backbone_image_size(backbone)
            return size * size if isinstance(size, int) else int(size[0]) * int(size[1])

        return max(backbones, key=area)
    # A fusion with a lexical branch: its preprocessor makes the token ids and keeps the text.
    views = [b for b in backbones if getattr(b.preprocessor, "carries_text", False)]
    if views:
        return views[0]
    return min(
        backbones,
        key=lambda b: getattr(b.preprocessor, "sequence_length", None) or float("inf"),
    )


def backbone_image_size(backbone: Backbone) -> ImageSize:
    """The image size a backbone takes: an int or `[height, width]`.

    Built backbones record it in `info["image_size"]` (an int for keras.applications, a
    `[height, width]` list for TF-Hub); a backbone assembled by hand may not, and then its
    network's fixed input height and width are used.
    """
    size = backbone.info.get("image_size")
    if size is not None:
        return size
    shape = backbone.network.input_shape
    if isinstance(shape, tuple) and len(shape) == 4 and shape[1] and shape[2]:
        return [int(shape[1]), int(shape[2])]
    raise TfxferError(
        f"Cannot tell which image size the backbone {backbone.name!r} takes. Expected "
        "`info['image_size']` (an int or [height, width]) or a network input of fixed height "
        f"and width. Received: info keys {sorted(backbone.info)}, network input shape {shape}."
    )
