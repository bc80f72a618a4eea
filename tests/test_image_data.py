"""Image folders: loading, splitting, formats, bad files, and replayable training batches."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_backbone, write_image, write_image_folder

from tfxfer.data.datasets import make_datasets
from tfxfer.data.examples import Examples, LabelledData
from tfxfer.data.images import (
    Augmentation,
    decode_and_resize,
    image_train_data,
    load_images,
    make_image_dataset,
    scan_image_folder,
)
from tfxfer.data.pipeline import TrainData, epoch_batches, stratified_split
from tfxfer.errors import DataError, TfxferError


def test_load_folder_with_sorted_class_names_and_labels(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"zebra": 2, "ant": 3, "moth": 2})
    data = load_images(root, val_split=0)
    assert data.class_names == ["ant", "moth", "zebra"]
    assert data.val is None
    assert len(data.train) == 7 and data.kind == data.train.kind == "image"
    assert data.train.labels.dtype == np.int32 and data.train.source == root
    for path, label in zip(data.train.inputs, data.train.labels, strict=True):
        assert os.path.basename(os.path.dirname(path)) == data.class_names[label]


def test_stratified_split_is_seeded_and_keeps_every_class_on_both_sides(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"a": 10, "b": 5, "c": 2})
    first = load_images(root, val_split=0.3, seed=1)
    again = load_images(root, val_split=0.3, seed=1)
    other = load_images(root, val_split=0.3, seed=2)

    assert first.train.inputs == again.train.inputs and first.val.inputs == again.val.inputs
    assert first.val.inputs != other.val.inputs
    assert set(first.train.labels.tolist()) == set(first.val.labels.tolist()) == {0, 1, 2}
    assert not set(first.train.inputs) & set(first.val.inputs)
    assert len(first.train) + len(first.val) == 17
    assert first.counts["val"] == {"a": 3, "b": 2, "c": 1}  # 30%, at least one
    assert first.train.inputs == sorted(first.train.inputs), "both parts keep file order"


def test_stratified_split_edge_cases():
    train, val = stratified_split([0, 0, 1], 0.5, seed=0)
    assert sorted(train + val) == [0, 1, 2]
    assert 2 in train, "a class with one example stays on the training side"
    with pytest.raises(DataError, match="fraction"):
        stratified_split([0, 1], 1.0, seed=0)


def test_separate_validation_folder(tmp_path):
    train_root = write_image_folder(str(tmp_path / "train"), {"cat": 3, "dog": 3})
    val_root = write_image_folder(str(tmp_path / "val"), {"dog": 2}, seed=5)
    data = load_images(train_root, val_directory=val_root)
    assert data.class_names == ["cat", "dog"]
    assert len(data.train) == 6 and len(data.val) == 2
    assert data.val.labels.tolist() == [1, 1], "validation labels follow the training class order"
    assert data.val.class_names == data.class_names
    assert data.test is None


@pytest.mark.parametrize("ext", ["jpg", "png", "bmp", "gif"])
def test_image_formats_decode(tmp_path, ext):
    root = str(tmp_path / "data")
    write_image(os.path.join(root, "a", f"x.{ext}"), height=20, width=30)
    write_image(os.path.join(root, "b", f"y.{ext.upper()}"), height=31, width=17, seed=1)
    data = load_images(root, val_split=0)
    assert len(data.train) == 2 and not data.train.skipped
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
        data = load_images(root, val_split=0)
    assert len(data.train) == 6
    assert sorted(os.path.basename(p) for p in data.train.skipped) == ["bad1.jpg", "bad2.png"]
    assert data.summary()["skipped"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Skipped 2 corrupt" in warnings[0].getMessage()


def test_non_image_files_are_ignored(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 2, "dog": 2})
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "dog" / "labels.csv").write_text("a,b")
    (tmp_path / "data" / ".hidden_dir").mkdir()
    data = load_images(root, val_split=0)
    assert data.class_names == ["cat", "dog"]
    assert len(data.train) == 4 and data.train.ignored == 2
    assert not data.train.skipped and data.summary()["ignored"] == 2


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
        load_images(root)
    assert root in str(info.value)


def test_class_folder_with_no_images(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 2, "dog": 2})
    os.makedirs(os.path.join(root, "empty_class"))
    (tmp_path / "data" / "empty_class" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty_class.*has no readable images"):
        load_images(root)


def test_class_folder_with_only_corrupt_images(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 2, "dog": 2})
    os.makedirs(os.path.join(root, "emu"))
    (tmp_path / "data" / "emu" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="emu.*has no readable images"):
        load_images(root)


def test_validation_folder_with_an_unknown_class(tmp_path):
    train_root = write_image_folder(str(tmp_path / "train"), {"cat": 2, "dog": 2})
    val_root = write_image_folder(str(tmp_path / "val"), {"cat": 1, "cow": 1})
    with pytest.raises(DataError, match=r"classes that the training data does not: \['cow'\]"):
        load_images(train_root, val_directory=val_root)


def test_test_folder_is_read_with_the_training_classes_and_split_still_happens(tmp_path):
    train_root = write_image_folder(str(tmp_path / "train"), {"cat": 4, "dog": 4})
    test_root = write_image_folder(str(tmp_path / "test"), {"dog": 2}, seed=7)
    data = load_images(train_root, test_directory=test_root, val_split=0.25, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 2)
    assert data.test.labels.tolist() == [1, 1] and data.test.class_names == ["cat", "dog"]
    assert data.test.source == test_root
    assert data.counts["test"] == {"cat": 0, "dog": 2}
    summary = data.summary()
    assert (summary["train_examples"], summary["val_examples"], summary["test_examples"]) == (
        6,
        2,
        2,
    )
    assert summary["kind"] == "image" and summary["classes"] == ["cat", "dog"]

    bad_test = write_image_folder(str(tmp_path / "bad_test"), {"cat": 1, "cow": 1})
    with pytest.raises(DataError, match=r"bad_test.*training data does not: \['cow'\]"):
        load_images(train_root, test_directory=bad_test)


def test_skipped_and_ignored_totals_survive_the_validation_split(tmp_path):
    root = write_image_folder(str(tmp_path / "train"), {"cat": 4, "dog": 4})
    (tmp_path / "train" / "cat" / "bad.jpg").write_bytes(b"not an image" * 10)
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"not an image" * 10)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    test_root = write_image_folder(str(tmp_path / "test"), {"cat": 1, "dog": 1}, seed=3)
    (tmp_path / "test" / "cat" / "broken.gif").write_bytes(b"GIF89a")
    (tmp_path / "test" / "cat" / "labels.csv").write_text("a,b")

    data = load_images(root, test_directory=test_root, val_split=0.5, seed=0)

    assert (len(data.train), len(data.val)) == (4, 4)
    assert len(data.train.skipped) == 2 and data.train.ignored == 1
    assert data.val.skipped == [] and data.val.ignored == 0
    assert len(data.test.skipped) == 1 and data.test.ignored == 1
    summary = data.summary()
    assert summary["skipped"] == 3 and summary["ignored"] == 2
    json.dumps(summary)  # goes into config.json as is


def test_decode_and_resize_takes_a_side_or_height_and_width(image_files):
    path = tf.constant(image_files.inputs[0])
    assert decode_and_resize(path, 12).shape == (12, 12, 3)
    assert decode_and_resize(path, [12, 30]).shape == (12, 30, 3)
    dataset = make_image_dataset(image_files, image_size=(10, 14), batch_size=4)
    assert next(iter(dataset))[0].shape == (4, 10, 14, 3)
    for bad in (0, [12], "224", [12.0, 30.0], True):
        with pytest.raises(TfxferError, match="image_size"):
            make_image_dataset(image_files, image_size=bad, batch_size=4)


def test_examples_check_their_kind_and_length_and_subsets_drop_load_notes():
    with pytest.raises(DataError, match=r"kind.*Received: kind='video'"):
        Examples(["a.png"], [0], ["a", "b"], "video")
    with pytest.raises(DataError, match="2 inputs but 1 labels from photos"):
        Examples(["a.png", "b.png"], [0], ["a", "b"], "image", source="photos")
    examples = Examples(
        ["a.png", "b.png", "c.png"],
        [0, 1, 1],
        ["a", "b"],
        "image",
        source="photos",
        skipped=["bad.png"],
        ignored=2,
    )
    assert examples.labels.dtype == np.int32 and examples.counts() == {"a": 1, "b": 2}
    part = examples.subset([2, 0])
    assert part.inputs == ["c.png", "a.png"] and part.labels.tolist() == [1, 0]
    assert (part.kind, part.class_names, part.source) == ("image", ["a", "b"], "photos")
    assert part.skipped == [] and part.ignored == 0


# === make_datasets ===


def test_make_datasets_for_images_resizes_to_the_backbone_and_batches_every_split(tmp_path):
    root = write_image_folder(str(tmp_path / "train"), {"a": 6, "b": 6}, size=20)
    test_root = write_image_folder(str(tmp_path / "test"), {"a": 2, "b": 1}, size=30, seed=4)
    data = load_images(root, test_directory=test_root, val_split=0.25, seed=0)
    backbone = tiny_backbone()  # records no info["image_size"]: its input shape (16, 16) says it

    train, val, test = make_datasets(
        data, backbone, batch_size=3, seed=1, augmentation=Augmentation(), cache=str(tmp_path / "c")
    )

    assert (len(data.train), len(data.val)) == (8, 4)
    assert isinstance(train, TrainData) and train.steps_per_epoch == 2
    x, y = next(iter(train.build(0)))
    assert x.shape == (3, 16, 16, 3) and x.dtype == tf.uint8 and y.dtype == tf.int32
    val_batches = _batches(val, 2)
    assert [x.shape for x, _ in val_batches] == [(3, 16, 16, 3), (1, 16, 16, 3)]
    assert np.concatenate([y for _, y in val_batches]).tolist() == data.val.labels.tolist()
    test_batches = _batches(test, 2)
    assert [y.tolist() for _, y in test_batches] == [[0, 0, 1]]
    # A cache path is a prefix: one cache per split, so they cannot overwrite each other.
    assert {p.name.split(".")[1] for p in tmp_path.glob("c.*")} == {"train", "val", "test"}

    no_val = load_images(root, val_split=0)
    hub_like = dataclasses.replace(backbone, info={"image_size": [12, 18]})
    datasets = make_datasets(no_val, hub_like, batch_size=4, cache=False)
    assert datasets.val is None and datasets.test is None
    assert next(iter(datasets.train.build(0)))[0].shape == (4, 12, 18, 3)
    with_int = dataclasses.replace(backbone, info={"image_size": 10})
    assert next(iter(make_datasets(no_val, with_int, batch_size=4).train.build(0)))[0].shape == (
        4,
        10,
        10,
        3,
    )


def test_make_datasets_refuses_images_for_a_text_backbone(image_files):
    data = LabelledData(image_files, None, None, image_files.class_names, "image")
    text_backbone = dataclasses.replace(tiny_backbone(), name="bert-tiny", input_kind="text")
    with pytest.raises(TfxferError, match="data are images but the backbone 'bert-tiny' takes tex"):
        make_datasets(data, text_backbone, batch_size=4)
    with pytest.raises(TfxferError, match="batch_size"):
        make_datasets(data, tiny_backbone(), batch_size=0)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = write_image_folder(
        str(tmp_path_factory.mktemp("pipeline") / "data"), {"a": 5, "b": 5, "c": 5}, size=20
    )
    return scan_image_folder(root)


def _batches(dataset, count):
    return [(np.asarray(x), np.asarray(y)) for x, y in dataset.take(count)]


def test_train_data_starting_at_epoch_k_replays_epoch_k(image_files):
    data = image_train_data(image_files, image_size=16, batch_size=4, seed=3)
    steps = data.steps_per_epoch
    assert steps == 3  # 15 images in full batches of 4
    from_start = _batches(data.build(0), 3 * steps)
    epochs = [from_start[k * steps : (k + 1) * steps] for k in range(3)]
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
    augmented = image_train_data(
        image_files,
        image_size=16,
        batch_size=15,
        seed=0,
        augmentation=Augmentation(flip=True, rotation=0.1, zoom=0.2, contrast=0.2),
    )
    ((x_plain, y_plain),) = _batches(plain.build(0), 1)
    ((x_aug, y_aug),) = _batches(augmented.build(0), 1)
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
    assert np.concatenate([y for _, y in first]).tolist() == image_files.labels.tolist()


def test_eval_images_are_the_resized_files(image_files):
    from PIL import Image

    dataset = make_image_dataset(image_files, image_size=20, batch_size=15, cache=False)
    images, _ = next(iter(dataset))
    # The files are 20 px already: decoding at the same size returns the pixels unchanged.
    for image, path in zip(np.asarray(images), image_files.inputs, strict=True):
        np.testing.assert_array_equal(image, np.asarray(Image.open(path).convert("RGB")))


def test_empty_training_set_is_an_error():
    with pytest.raises(TfxferError, match="empty"):
        epoch_batches(None, num_examples=0, batch_size=4)


def test_class_folders_are_read_recursively_and_hidden_entries_are_skipped(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), {"cat": 1, "dog": 2})
    write_image(str(tmp_path / "data" / "cat" / "sub" / "a.png"), seed=1)
    write_image(str(tmp_path / "data" / "cat" / "sub" / "deeper" / "b.png"), seed=2)
    # Thumbnails of the class's own photos: readable images, but never training data.
    write_image(str(tmp_path / "data" / "cat" / ".thumbnails" / "000.png"), seed=3)
    (tmp_path / "data" / "cat" / "._000.png").write_bytes(b"AppleDouble metadata")
    (tmp_path / "data" / "dog" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "data" / "dog" / "notes.txt").write_text("not an image")
    os.symlink(tmp_path / "data" / "cat" / "sub", tmp_path / "data" / "dog" / "linked")

    examples = scan_image_folder(root)
    relative = [os.path.relpath(p, root) for p in examples.inputs]
    assert relative == [
        "cat/000.png",
        "cat/sub/a.png",
        "cat/sub/deeper/b.png",
        "dog/000.png",
        "dog/001.png",
    ]
    assert examples.labels.tolist() == [0, 0, 0, 1, 1]
    # Nothing hidden was even decoded: ._000.png would otherwise be skipped as corrupt.
    assert examples.skipped == []
    # .thumbnails/, ._000.png, .DS_Store, notes.txt and the link (not followed).
    assert examples.ignored == 5
    assert scan_image_folder(root).inputs == examples.inputs
