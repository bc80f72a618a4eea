"""Image folders in, raw `tf.data` pipelines of uint8 images out.

The layout is the common one: one subfolder per class, its images inside. Loading scans and
checks the files once, up front, so a corrupt file is reported before training starts rather
than crashing it an hour in. Corrupt or undecodable files with an image extension are
**skipped with a counted warning** (one bad photo in ten thousand should not stop a run);
files with other extensions are ignored and counted. A class left with no image is an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from tfxfer.data.pipeline import TrainData, epoch_batches, maybe_cache, stratified_split
from tfxfer.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclass
class ImageFiles:
    """Image paths and integer labels, plus what loading had to skip."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    skipped_corrupt: list[str] = field(default_factory=list)
    ignored_other: int = 0

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ImageData:
    """A training split and a validation split of an image folder, with class names."""

    train: ImageFiles
    val: ImageFiles | None
    class_names: list[str]

    def summary(self) -> dict:
        return {
            "classes": self.class_names,
            "train_images": len(self.train),
            "val_images": len(self.val) if self.val else 0,
            "skipped_corrupt": len(self.train.skipped_corrupt)
            + (len(self.val.skipped_corrupt) if self.val else 0),
        }


def _decodes(path: str) -> bool:
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return image.shape[0] > 0 and image.shape[1] > 0
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError):
        return False


def scan_image_folder(
    directory: str, class_names: list[str] | None = None, *, verify: bool = True
) -> ImageFiles:
    """Lists the images of a one-subfolder-per-class directory.

    Args:
        directory: str. The folder whose subfolders are the classes.
        class_names: list[str] or None. When given (for a validation folder), the subfolders
            must be among these names and labels follow this order. Defaults to the sorted
            subfolder names.
        verify: bool. Decode every image once with the decoder training uses, and skip the
            ones that fail (with a counted warning). Defaults to `True`.

    Raises:
        DataError: the folder is missing or has no class subfolders, a class folder has no
            images, fewer than two classes, or unknown classes in a validation folder.
    """
    if not os.path.isdir(directory):
        raise DataError(
            f"Data directory not found: {directory!r}. Pass a folder with one subfolder per "
            "class, e.g. photos/cat/*.jpg and photos/dog/*.jpg."
        )
    found = sorted(
        entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not found:
        raise DataError(
            f"Data directory {directory!r} has no class subfolders. Put each class's images in "
            "a subfolder named after the class, e.g. photos/cat/*.jpg and photos/dog/*.jpg."
        )
    if class_names is None:
        class_names = found
        if len(class_names) < 2:
            raise DataError(
                f"Data directory {directory!r} has only one class ({class_names[0]!r}). A "
                "classifier needs at least two class subfolders."
            )
    else:
        unknown = [name for name in found if name not in class_names]
        if unknown:
            raise DataError(
                f"Folder {directory!r} has classes that the training data does not: {unknown}. "
                f"Training classes: {class_names}."
            )
    files = ImageFiles([], [], list(class_names))
    for label, name in enumerate(class_names):
        class_dir = os.path.join(directory, name)
        if not os.path.isdir(class_dir):
            continue  # a validation folder may lack a class
        count = 0
        for root, _, filenames in sorted(os.walk(class_dir)):
            for filename in sorted(filenames):
                path = os.path.join(root, filename)
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.ignored_other += 1
                    continue
                if verify and not _decodes(path):
                    files.skipped_corrupt.append(path)
                    continue
                files.paths.append(path)
                files.labels.append(label)
                count += 1
        if count == 0:
            raise DataError(
                f"Class folder {class_dir!r} has no readable images (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder."
            )
    if files.skipped_corrupt:
        log.warning(
            "Skipped %d corrupt or unreadable image file(s) in %s, e.g. %s",
            len(files.skipped_corrupt), directory, files.skipped_corrupt[:3],
        )
    if files.ignored_other:
        log.info("Ignored %d non-image file(s) in %s", files.ignored_other, directory)
    return files


def load_image_folder(
    directory: str,
    *,
    val_directory: str | None = None,
    val_split: float = 0.2,
    seed: int = 0,
    verify: bool = True,
) -> ImageData:
    """Loads an image folder, with a separate validation folder or a seeded stratified split.

    Args:
        directory: str. One subfolder per class.
        val_directory: str or None. A validation folder with the same class subfolders.
        val_split: float. Fraction held out for validation when there is no `val_directory`;
            0 disables validation. Defaults to `0.2`.
        seed: int. Seed of the split. Defaults to `0`.
        verify: bool. Decode-check every image up front. Defaults to `True`.
    """
    train = scan_image_folder(directory, verify=verify)
    if val_directory:
        val = scan_image_folder(val_directory, train.class_names, verify=verify)
        return ImageData(train, val, train.class_names)
    if not val_split:
        return ImageData(train, None, train.class_names)
    train_idx, val_idx = stratified_split(train.labels, val_split, seed)

    def subset(indices: list[int]) -> ImageFiles:
        return ImageFiles([train.paths[i] for i in indices], [train.labels[i] for i in indices],
                          train.class_names)

    train_part, val_part = subset(train_idx), subset(val_idx)
    train_part.skipped_corrupt, train_part.ignored_other = train.skipped_corrupt, train.ignored_other
    return ImageData(train_part, val_part if val_idx else None, train.class_names)


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


def decode_and_resize(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Reads one file into a `(size, size, 3)` uint8 image, whatever its format and size."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decoded_examples(files: ImageFiles, image_size: int, cache: bool | str) -> tf.data.Dataset:
    """Unbatched `(uint8 image, label)` pairs in file order, decoded once and cached."""
    paths = tf.constant(files.paths, tf.string)
    labels = tf.constant(np.asarray(files.labels, np.int32))
    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda p, y: (decode_and_resize(p, image_size), y),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return maybe_cache(ds, cache)


def make_image_dataset(
    files: ImageFiles,
    *,
    image_size: int,
    batch_size: int,
    cache: bool | str = True,
) -> tf.data.Dataset:
    """A batched, cached, prefetched evaluation dataset of `(uint8 images, labels)` in file order.

    For training use `image_train_data`, whose shuffling can be replayed on resume.
    """
    ds = _decoded_examples(files, image_size, cache)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def image_train_data(
    files: ImageFiles,
    *,
    image_size: int,
    batch_size: int,
    seed: int = 0,
    augmentation: Augmentation | None = None,
    cache: bool | str = True,
) -> TrainData:
    """Training batches of `(uint8 images, labels)` that can start at any epoch (for resume).

    Images are decoded and resized once and cached; every epoch reshuffles with a seed made
    from `seed` and the epoch number, then batches and (optionally) augments.
    """
    examples = _decoded_examples(files, image_size, cache)
    transform = None
    layers = augmentation.layers(seed) if augmentation is not None else []
    if layers:
        def transform(images, y):
            x = tf.cast(images, tf.float32)
            for layer in layers:
                x = layer(x, training=True)
            return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8), y
    return epoch_batches(examples, num_examples=len(files), batch_size=batch_size, seed=seed,
                         transform=transform)
