"""Image folders: loading, splitting, formats, bad files, and replayable training batches."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from helpers import write_image, write_image_folder

import tfxfer
from tfxfer.data.images import (
    Augmentation,
    image_train_data,
    load_image_folder,
    make_image_dataset,
    scan_image_folder,
    stratified_split,
)
from tfxfer.errors import DataError


def test_load_folder_with_sorted_class_names_and_labels(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"zebra": 2, "ant": 3, "moth": 2})
    data = load_image_folder(root, val_split=0)
    assert data.class_names == ["ant", "moth", "zebra"]
    assert data.val is None
    assert len(data.train) == 7
    for path, label in zip(data.train.paths, data.train.labels, strict=True):
        assert os.path.basename(os.path.dirname(path)) == data.class_names[label]


def test_stratified_split_is_seeded_and_keeps_every_class_on_both_sides(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"a": 10, "b": 5, "c": 2})
    first = load_image_folder(root, val_split=0.3, seed=1)
    again = load_image_folder(root, val_split=0.3, seed=1)
    other = load_image_folder(root, val_split=0.3, seed=2)

    assert first.train.paths == again.train.paths and first.val.paths == again.val.paths
    assert first.val.paths != other.val.paths
    assert set(first.train.labels) == set(first.val.labels) == {0, 1, 2}
    assert not set(first.train.paths) & set(first.val.paths)
    assert len(first.train) + len(first.val) == 17
    assert [first.val.labels.count(k) for k in range(3)] == [3, 2, 1]  # 30%, at least one


def test_stratified_split_edge_cases():
    train, val = stratified_split([0, 0, 1], 0.5, seed=0)
    assert sorted(train + val) == [0, 1, 2]
    assert 2 in train, "a class with one example stays on the training side"
    with pytest.raises(DataError, match="fraction"):
        stratified_split([0, 1], 1.0, seed=0)


def test_separate_validation_folder(tmp_path):
    train_root = write_image_folder(str(tmp_path / "train"), {"cat": 3, "dog": 3})
    val_root = write_image_folder(str(tmp_path / "val"), {"dog": 2}, seed=5)
    data = load_image_folder(train_root, val_directory=val_root)
    assert data.class_names == ["cat", "dog"]
    assert len(data.train) == 6 and len(data.val) == 2
    assert data.val.labels == [1, 1], "validation labels follow the training class order"
    assert data.val.class_names == data.class_names


@pytest.mark.parametrize("ext", ["jpg", "png", "bmp", "gif"])
def test_image_formats_decode(tmp_path, ext):
    root = str(tmp_path / "data")
    write_image(os.path.join(root, "a", f"x.{ext}"), height=20, width=30)
    write_image(os.path.join(root, "b", f"y.{ext.upper()}"), height=31, width=17, seed=1)
    data = load_image_folder(root, val_split=0)
    assert len(data.train) == 2 and not data.train.skipped_corrupt
    dataset = make_image_dataset(data.train, image_size=16, batch_size=2)
    images, labels = next(iter(dataset))
    assert images.shape == (2, 16, 16, 3) and images.dtype == "uint8"
    assert labels.numpy().tolist() == [0, 1]
    assert int(np.asarray(images).max()) > 0


def test_corrupt_files_are_skipped_with_a_counted_warning(tmp_path, caplog):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 3, "dog": 3})
    for name in ("bad1.jpg", "bad2.png"):
        (tmp_path / "data" / "cat" / name).write_bytes(b"this is not an image" * 10)
    with caplog.at_level(logging.WARNING, logger="tfxfer"):
        data = load_image_folder(root, val_split=0)
    assert len(data.train) == 6
    assert sorted(os.path.basename(p) for p in data.train.skipped_corrupt) == ["bad1.jpg",
                                                                               "bad2.png"]
    assert data.summary()["skipped_corrupt"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Skipped 2 corrupt" in warnings[0].getMessage()


def test_non_image_files_are_ignored(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 2, "dog": 2})
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "dog" / "labels.csv").write_text("a,b")
    (tmp_path / "data" / ".hidden_dir").mkdir()
    data = load_image_folder(root, val_split=0)
    assert data.class_names == ["cat", "dog"]
    assert len(data.train) == 4 and data.train.ignored_other == 2
    assert not data.train.skipped_corrupt


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (None, "Data directory not found"),
        ({}, "has no class subfolders"),
        ({"cat": 2}, r"has only one class \('cat'\).*at least two"),
    ],
    ids=["missing", "empty", "one_class"],
)
def test_folder_errors(tmp_path, layout, match):
    root = str(tmp_path / "data")
    if layout is not None:
        os.makedirs(root)
        write_image_folder(root, layout)
    with pytest.raises(DataError, match=match) as info:
        load_image_folder(root)
    assert root in str(info.value)


def test_class_folder_with_no_images(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 2, "dog": 2})
    os.makedirs(os.path.join(root, "empty_class"))
    (tmp_path / "data" / "empty_class" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty_class.*has no readable images"):
        load_image_folder(root)


def test_class_folder_with_only_corrupt_images(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 2, "dog": 2})
    os.makedirs(os.path.join(root, "emu"))
    (tmp_path / "data" / "emu" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="emu.*has no readable images"):
        load_image_folder(root)


def test_validation_folder_with_an_unknown_class(tmp_path):
    train_root = write_image_folder(str(tmp_path / "train"), {"cat": 2, "dog": 2})
    val_root = write_image_folder(str(tmp_path / "val"), {"cat": 1, "cow": 1})
    with pytest.raises(DataError, match=r"classes that the training data does not: \['cow'\]"):
        load_image_folder(train_root, val_directory=val_root)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = write_image_folder(str(tmp_path_factory.mktemp("pipeline") / "data"),
                              {"a": 5, "b": 5, "c": 5}, size=20)
    return scan_image_folder(root)


def _batches(dataset, count):
    return [(np.asarray(x), np.asarray(y)) for x, y in dataset.take(count)]


def test_train_data_starting_at_epoch_k_replays_epoch_k(image_files):
    data = image_train_data(image_files, image_size=16, batch_size=4, seed=3)
    steps = data.steps_per_epoch
    assert steps == 3  # 15 images in full batches of 4
    from_start = _batches(data.build(0), 3 * steps)
    epochs = [from_start[k * steps:(k + 1) * steps] for k in range(3)]
    for k in (1, 2):
        resumed = _batches(data.build(k), steps)
        for (x, y), (want_x, want_y) in zip(resumed, epochs[k], strict=True):
            np.testing.assert_array_equal(x, want_x)
            np.testing.assert_array_equal(y, want_y)
    # Epochs are shuffled differently.
    order = [np.concatenate([y for _, y in epoch]).tolist() for epoch in epochs]
    assert order[0] != order[1] or order[1] != order[2]


def test_train_order_does_not_depend_on_the_global_seed(image_files):
    import keras

    data = image_train_data(image_files, image_size=16, batch_size=15, seed=0)
    keras.utils.set_random_seed(0)  # a global seed of 0 used to break the epoch shuffle
    first = _batches(data.build(0), 2)
    keras.utils.set_random_seed(123)
    second = _batches(data.build(0), 2)
    for (x, y), (want_x, want_y) in zip(first, second, strict=True):
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(x, want_x)


def test_augmentation_changes_training_images_only(image_files):
    plain = image_train_data(image_files, image_size=16, batch_size=15, seed=0)
    augmented = image_train_data(image_files, image_size=16, batch_size=15, seed=0,
                                 augmentation=Augmentation(flip=True, rotation=0.1, zoom=0.2,
                                                           contrast=0.2))
    (x_plain, y_plain), = _batches(plain.build(0), 1)
    (x_aug, y_aug), = _batches(augmented.build(0), 1)
    np.testing.assert_array_equal(y_plain, y_aug)  # same order, same labels
    assert x_aug.dtype == np.uint8 and x_aug.shape == x_plain.shape
    assert not np.array_equal(x_aug, x_plain)
    assert Augmentation(flip=False, rotation=0, zoom=0, contrast=0).layers(0) == []

    # Evaluation data is never augmented and comes in file order, the same every time.
    dataset = make_image_dataset(image_files, image_size=16, batch_size=4)
    first, second = _batches(dataset, 4), _batches(dataset, 4)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert np.concatenate([y for _, y in first]).tolist() == image_files.labels


def test_eval_images_are_the_resized_files(image_files):
    from PIL import Image

    dataset = make_image_dataset(image_files, image_size=20, batch_size=15, cache=False)
    images, _ = next(iter(dataset))
    # The files are 20 px already: decoding at the same size returns the pixels unchanged.
    for image, path in zip(np.asarray(images), image_files.paths, strict=True):
        np.testing.assert_array_equal(image, np.asarray(Image.open(path).convert("RGB")))


def test_empty_training_set_is_an_error():
    with pytest.raises(tfxfer.TfxferError, match="empty"):
        tfxfer.epoch_batches(None, num_examples=0, batch_size=4)
