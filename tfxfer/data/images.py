"""Image folders in, raw `tf.data` pipelines of uint8 images out.

Loading returns the shared `tfxfer.data.examples` model: `Examples` of kind "image" whose
inputs are file paths, and `LabelledData` for the train / val / test splits.

The layout is the common one: one subfolder per class, its images inside. Loading scans and
checks the files once, up front, so a corrupt file is reported before training starts rather
than crashing it an hour in. Corrupt or undecodable files with an image extension are
**skipped with a counted warning** (one bad photo in ten thousand should not stop a run);
files with other extensions are ignored and counted. A class left with no image is an error.

Each class folder is read recursively: its images and those of its subfolders, in sorted
order, all with the class's label. Files and folders whose name starts with "." are skipped
everywhere (`.thumbnails/` holds small copies of the class's own photos; `.DS_Store`,
`.ipynb_checkpoints/`), as the text loader skips them; they are counted in
`Examples.ignored` with the files of other extensions (a hidden folder counts once, whatever
it holds). Links to folders are not followed (they can loop) and are counted too.
Images are decoded only when a pipeline is built (`make_image_dataset`, `image_train_data`),
and then once: the decoded, resized images are cached and only shuffled per epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfxfer import fs
from tfxfer.data.examples import Examples, LabelledData, with_validation_split
from tfxfer.data.pipeline import TrainData, epoch_batches, maybe_cache
from tfxfer.errors import DataError, TfxferError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def decodes(path: str) -> bool:
    """Whether `path` decodes, with the decoder training uses, to an image of some size."""
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return image.shape[0] > 0 and image.shape[1] > 0
    except tf.errors.OpError:  # corrupt, vanished, unreadable (permissions), not a file
        return False


def scan_image_folder(
    directory: str, class_names: list[str] | None = None, *, verify: bool = True
) -> Examples:
    """Lists the images of a one-subfolder-per-class directory as `Examples` of kind "image".

    Args:
        directory: str. The folder whose subfolders are the classes.
        class_names: list[str] or None. When given (for a validation or test folder), the
            subfolders must be among these names and labels follow this order. Defaults to the
            sorted subfolder names.
        verify: bool. Decode every image once with the decoder training uses, and skip the
            ones that fail (with a counted warning). Defaults to `True`.

    Raises:
        DataError: the folder is missing or has no class subfolders, a class folder has no
            images, fewer than two classes, or unknown classes in a validation or test folder.
    """
    class_names = _checked_class_names(directory, _class_folders(directory), class_names)
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    ignored = 0
    for label, name in enumerate(class_names):
        class_dir = fs.join(directory, name)
        if not fs.isdir(class_dir):
            continue  # a validation or test folder may lack a class
        class_paths, class_skipped, class_ignored = _scan_class(class_dir, verify)
        paths += class_paths
        labels += [label] * len(class_paths)
        skipped += class_skipped
        ignored += class_ignored
    if skipped:
        log.warning(
            "Skipped %d corrupt or unreadable image file(s) in %s, e.g. %s",
            len(skipped),
            directory,
            skipped[:3],
        )
    if ignored:
        log.info("Ignored %d hidden or non-image file(s) and folder(s) in %s", ignored, directory)
    return Examples(
        paths,
        np.asarray(labels, np.int32),
        list(class_names),
        "image",
        source=directory,
        skipped=skipped,
        ignored=ignored,
    )


def _class_folders(directory: str) -> list[str]:
    """The sorted names of the visible subfolders of `directory`; at least one."""
    if directory and not fs.isdir(directory) and fs.exists(directory):
        raise DataError(
            f"Data directory {directory!r} is a file, not a folder. Pass a folder with one "
            "subfolder per class, e.g. photos/cat/*.jpg and photos/dog/*.jpg (unpack an "
            "archive first)."
        )
    if not fs.isdir(directory):
        raise DataError(
            f"Data directory not found: {directory!r}. Pass a folder with one subfolder per "
            "class, e.g. photos/cat/*.jpg and photos/dog/*.jpg."
        )
    try:
        found = sorted(
            name
            for name in fs.listdir(directory)
            if not name.startswith(".") and fs.isdir(fs.join(directory, name))
        )
    except (OSError, tf.errors.OpError) as error:  # no permission to list it, an I/O error
        raise DataError(
            f"Cannot read data directory {directory!r}: "
            f"{getattr(error, 'strerror', None) or error}. Check its permissions."
        ) from None
    if not found:
        raise DataError(
            f"Data directory {directory!r} has no class subfolders. Put each class's images in "
            "a subfolder named after the class, e.g. photos/cat/*.jpg and photos/dog/*.jpg."
        )
    return found


def _checked_class_names(
    directory: str, found: list[str], class_names: list[str] | None
) -> list[str]:
    """The class names: the subfolders found (at least two), or `class_names` covering them."""
    if class_names is None:
        if len(found) < 2:
            raise DataError(
                f"Data directory {directory!r} has only one class ({found[0]!r}). A "
                "classifier needs at least two class subfolders."
            )
        return found
    unknown = [name for name in found if name not in class_names]
    if unknown:
        raise DataError(
            f"Folder {directory!r} has classes that the training data does not: {unknown}. "
            f"Training classes: {class_names}."
        )
    return class_names


def _scan_class(class_dir: str, verify: bool) -> tuple[list[str], list[str], int]:
    """A class folder's images, the corrupt ones skipped, and the count of ignored files."""
    paths: list[str] = []
    skipped: list[str] = []
    files, ignored = fs.visible_files(class_dir)
    for path in files:
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            ignored += 1
            continue
        if verify and not decodes(path):
            skipped.append(path)
            continue
        paths.append(path)
    if not paths:
        raise DataError(
            f"Class folder {class_dir!r} has no readable images (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder."
        )
    return paths, skipped, ignored


def load_images(
    directory: str,
    *,
    val_directory: str | None = None,
    test_directory: str | None = None,
    val_split: float = 0.2,
    seed: int = 0,
    verify: bool = True,
) -> LabelledData:
    """Loads an image folder, with separate validation / test folders or a stratified split.

    Args:
        directory: str. The training folder, one subfolder per class.
        val_directory: str or None. A validation folder whose subfolders are training classes.
            Replaces `val_split`. Defaults to `None`.
        test_directory: str or None. A test folder, read like `val_directory`. Defaults to
            `None`.
        val_split: float. Fraction held out for validation (stratified, seeded) when there is
            no `val_directory`; 0 disables validation. Defaults to `0.2`.
        seed: int. Seed of the split. Defaults to `0`.
        verify: bool. Decode-check every image up front. Defaults to `True`.

    Returns:
        `LabelledData` of kind "image"; class names are the sorted subfolders of `directory`.

    Example:

    ```python
    data = load_images("photos/train", test_directory="photos/test", val_split=0.2)
    data.class_names  # ['cat', 'dog']
    ```
    """
    train = scan_image_folder(directory, verify=verify)
    val, test = (
        scan_image_folder(folder, train.class_names, verify=verify) if folder else None
        for folder in (val_directory, test_directory)
    )
    return with_validation_split(train, val, test, val_split=val_split, seed=seed)


@dataclass
class Augmentation:
    """Random training-time augmentation; every field 0/False turns that part off.

    Args:
        flip: bool. Random horizontal flips. Defaults to `True`.
        rotation: float. Maximum rotation as a fraction of a full turn. Defaults to `0.05`.
        zoom: float. Maximum zoom in or out as a fraction of the size. Defaults to `0.1`.
        contrast: float. Maximum contrast change as a fraction. Defaults to `0.1`.
    """

    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    contrast: float = 0.1

    def layers(self, seed: int):
        import keras

        layers = []
        if self.flip:
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
        if self.rotation:
            layers.append(keras.layers.RandomRotation(self.rotation, seed=seed))
        if self.zoom:
            layers.append(keras.layers.RandomZoom(self.zoom, seed=seed))
        if self.contrast:
            layers.append(keras.layers.RandomContrast(self.contrast, seed=seed))
        return layers


ImageSize = int | Sequence[int]


def image_height_width(image_size: ImageSize) -> tuple[int, int]:
    """`(height, width)` from an int (a square) or a `[height, width]` pair."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        height = width = int(image_size)
    elif (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
    ):
        height, width = (int(v) for v in image_size)
    else:
        raise TfxferError(
            "Expected `image_size` to be an int or a [height, width] pair of ints. "
            f"Received: image_size={image_size!r}"
        )
    if height < 1 or width < 1:
        raise TfxferError(f"Expected a positive image size. Received: image_size={image_size!r}")
    return height, width


def decode_and_resize(path: tf.Tensor, image_size: ImageSize) -> tf.Tensor:
    """Reads one file into a `(height, width, 3)` uint8 image, whatever its format and size.

    `image_size` is an int (a square, as keras.applications backbones record it) or a
    `[height, width]` pair (as TF-Hub image backbones record it).
    """
    height, width = image_height_width(image_size)
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, (height, width), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decoded_examples(
    examples: Examples, image_size: ImageSize, cache: bool | str
) -> tf.data.Dataset:
    """Unbatched `(uint8 image, label)` pairs in file order, decoded once and cached."""
    if examples.kind != "image":
        raise TfxferError(
            f"Expected image examples. Received: {examples.kind} examples from "
            f"{examples.source!r}; use `tfxfer.data.text` for texts."
        )
    if len(examples) == 0:
        raise DataError("There are no images to make a dataset from.")
    image_height_width(image_size)  # a bad size fails here, not inside `tf.data`
    paths = tf.constant(examples.inputs, tf.string)
    ds = tf.data.Dataset.from_tensor_slices((paths, examples.labels)).map(
        lambda p, y: (decode_and_resize(p, image_size), y),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return maybe_cache(ds, cache)


def make_image_dataset(
    examples: Examples,
    *,
    image_size: ImageSize,
    batch_size: int,
    cache: bool | str = True,
) -> tf.data.Dataset:
    """A batched, cached, prefetched evaluation dataset of `(uint8 images, labels)` in file order.

    For training use `image_train_data`, whose shuffling can be replayed on resume.

    Args:
        examples: Examples. Image examples (`scan_image_folder`, `load_images`).
        image_size: int or [height, width]. The size images are resized to.
        batch_size: int. The global batch size.
        cache: bool or str. Cache decoded images in memory (`True`), in this file path, or
            not at all (`False`). Defaults to `True`.
    """
    ds = _decoded_examples(examples, image_size, cache)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def image_train_data(
    examples: Examples,
    *,
    image_size: ImageSize,
    batch_size: int,
    seed: int = 0,
    augmentation: Augmentation | None = None,
    cache: bool | str = True,
) -> TrainData:
    """Training batches of `(uint8 images, labels)` that can start at any epoch (for resume).

    Images are decoded and resized once and cached; every epoch reshuffles with a seed made
    from `seed` and the epoch number, then batches and (optionally) augments.

    Args:
        examples: Examples. Image examples (`scan_image_folder`, `load_images`).
        image_size: int or [height, width]. The size images are resized to.
        batch_size: int. The global batch size.
        seed: int. Seed of the per-epoch shuffle and of the augmentation. Defaults to `0`.
        augmentation: Augmentation or None. Random changes applied to training batches.
            Defaults to `None`.
        cache: bool or str. Cache decoded images in memory (`True`), in this file path, or
            not at all (`False`). Defaults to `True`.
    """
    decoded = _decoded_examples(examples, image_size, cache)
    transform = None
    layers = augmentation.layers(seed) if augmentation is not None else []
    if layers:

        def transform(images, y):
            x = tf.cast(images, tf.float32)
            for layer in layers:
                x = layer(x, training=True)
            return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8), y

    return epoch_batches(
        decoded, num_examples=len(examples), batch_size=batch_size, seed=seed, transform=transform
    )
