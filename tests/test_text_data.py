"""Tests for `tfxfer.data.text`: loaders, labels, refusals, the stratified split and the pipelines.

Files are written to `tmp_path`; the tokenizer is a keras-hub BERT WordPiece tokenizer over a
twenty-word vocabulary, so nothing is downloaded and the suite stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from tfxfer.data.datasets import make_datasets
from tfxfer.data.examples import Examples, with_validation_split
from tfxfer.data.text import (
    load_texts,
    make_text_dataset,
    read_text_file,
    read_text_folder,
    text_train_data,
)
from tfxfer.errors import DataError, TfxferError

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"the a movie film was great good bad awful plot acting boring fun loved hated it i".split(),
]


def write(path, content: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    return write(path, "\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture(scope="module")
def preprocessor():
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    return keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)


# === Reading files and labels ===


def test_csv_with_class_names_keeps_quoted_commas_and_newlines(tmp_path):
    path = write(
        tmp_path / "train.csv",
        'id,text,label\n1,"great, fun film",pos\n2,"awful\nplot",neg\n3,loved it,pos\n',
    )

    data = load_texts(path, val_split=0)

    assert data.class_names == ["neg", "pos"]
    assert data.train.inputs == ["great, fun film", "awful\nplot", "loved it"]
    assert data.kind == data.train.kind == "text" and data.train.source == path
    assert data.train.labels.tolist() == [1, 0, 1] and data.train.labels.dtype == np.int32
    assert data.counts == {"train": {"neg": 1, "pos": 2}}
    assert data.val is None and data.test is None and not data.multi_label


def test_integer_labels_keep_their_values_as_class_ids(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,2\nb,0\nc, 1\nd,02\n")
    data = load_texts(path, val_split=0)
    assert data.class_names == ["0", "1", "2"]
    assert data.train.labels.tolist() == [2, 0, 1, 2]

    path = write(tmp_path / "sparse.csv", "text,label\na,10\nb,2\n")
    assert load_texts(path, val_split=0).class_names == ["2", "10"]


def test_jsonl_and_tsv_and_custom_columns(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"review": "good", "stars": 1},
            {"review": "bad", "stars": 0},
            {"review": "fun", "stars": "1"},
        ],
    )
    data = load_texts(jsonl, text_column="review", label_column="stars", val_split=0)
    assert data.class_names == ["0", "1"] and data.train.labels.tolist() == [1, 0, 1]

    tsv = write(tmp_path / "train.tsv", "text\tlabel\ngood, really\tpos\nbad\tneg\n")
    data = load_texts(tsv, val_split=0)
    assert data.train.inputs == ["good, really", "bad"] and data.class_names == ["neg", "pos"]


def test_multi_label_rows_become_multi_hot(tmp_path):
    csv_path = write(
        tmp_path / "train.csv", "text,label\na,sports|news\nb,news\nc,\nd, tech | news \n"
    )
    data = load_texts(csv_path, multi_label=True, val_split=0)
    assert data.class_names == ["news", "sports", "tech"] and data.multi_label
    np.testing.assert_array_equal(data.train.labels, [[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1]])
    assert data.train.labels.dtype == np.float32
    assert data.counts["train"] == {"news": 3, "sports": 1, "tech": 1}

    jsonl = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": []}]
    )
    np.testing.assert_array_equal(
        load_texts(jsonl, multi_label=True, val_split=0).train.labels, [[1, 1], [0, 0]]
    )


def test_empty_texts_are_skipped_and_counted(tmp_path, caplog):
    path = write(tmp_path / "train.csv", "text,label\ngood,pos\n,neg\n   ,pos\nbad,neg\n")
    with caplog.at_level(logging.WARNING, logger="tfxfer.data.text"):
        data = load_texts(path, val_split=0)
    assert data.train.inputs == ["good", "bad"]
    assert data.train.skipped == [f"{path} line 3", f"{path} line 4"]
    assert data.summary()["skipped"] == 2
    assert "Skipped 2 example(s)" in caplog.text and "train.csv" in caplog.text


def test_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path / "train.csv", b"\xef\xbb\xbftext,label\nok,a\nfine,b\n")
    assert load_texts(path, val_split=0).train.inputs == ["ok", "fine"]


def test_val_and_test_files_use_the_training_class_names(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,cat\nb,dog\nc,emu\n")
    val = write(tmp_path / "val.csv", "text,label\nd,emu\ne,cat\n")
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "f", "label": "dog"}])

    data = load_texts(train, val=val, test=test)

    assert len(data.train) == 3  # a val file replaces the split
    assert data.val.labels.tolist() == [2, 0] and data.test.labels.tolist() == [1]
    assert data.val.class_names == data.class_names == ["cat", "dog", "emu"]
    assert data.counts["val"] == {"cat": 1, "dog": 0, "emu": 1}


# === Refusals ===


def test_label_unseen_in_training_is_named(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,cat\nb,dog\n")
    val = write(tmp_path / "val.csv", "text,label\nc,cat\nd,yak\n")
    with pytest.raises(DataError, match=r"\['yak'\]") as error:
        load_texts(train, val=val)
    assert "val.csv" in str(error.value) and "['cat', 'dog']" in str(error.value)


def test_non_utf8_bytes_name_the_file_offset_and_line(tmp_path):
    path = write(tmp_path / "latin1.csv", b"text,label\nok,a\ncaf\xe9 au lait,b\n")
    with pytest.raises(DataError, match=r"byte 19 \(line 3\) is 0xe9") as error:
        load_texts(path)
    assert "latin1.csv" in str(error.value)


def test_a_utf16_file_is_told_to_convert_from_utf16_not_latin1(tmp_path):
    path = write(tmp_path / "utf16.csv", "text,label\nok,a\nfine,b\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"byte 0 \(line 1\) is 0xff") as error:
        load_texts(path)
    assert "iconv -f utf-16 -t utf-8" in str(error.value)


def test_missing_columns_name_the_columns_found(tmp_path):
    path = write(tmp_path / "train.csv", "review,sentiment\ngood,pos\n")
    with pytest.raises(DataError, match=r"no column 'text'.*\['review', 'sentiment'\]"):
        load_texts(path)
    with pytest.raises(DataError, match=r"no column 'label'.*\['review', 'sentiment'\]"):
        load_texts(path, text_column="review")
    jsonl = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "tag": "y"}]
    )
    with pytest.raises(DataError, match=r"line 2 has no key 'label'.*\['tag', 'text'\]"):
        load_texts(jsonl)


def test_missing_label_names_the_line(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,x\nb,\nc,y\n")
    with pytest.raises(DataError, match=r"train.csv line 3 has an empty label"):
        load_texts(path)
    short_row = write(tmp_path / "short.csv", "text,label\na,x\nb\n")
    with pytest.raises(DataError, match="line 3"):
        load_texts(short_row)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2 is not valid JSON"),
        ("[1, 2]", "line 2 is a JSON list"),
        ('{"text": 5, "label": "x"}', "line 2: expected the text to be a string"),
        ('{"text": "b", "label": 1.5}', "line 2: expected the label"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_texts(path)


def test_bad_paths_and_suffixes_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match=r"\.jsonl"):
        load_texts(write(tmp_path / "train.xlsx", "x"))
    with pytest.raises(DataError, match="no examples"):
        load_texts(write(tmp_path / "blank.csv", "text,label\n ,a\n"))
    with pytest.raises(DataError, match="no column"):
        load_texts(write(tmp_path / "empty.csv", ""))


def test_a_single_class_is_refused(tmp_path):
    with pytest.raises(DataError, match="only one class"):
        load_texts(write(tmp_path / "train.csv", "text,label\na,x\nb,x\n"))


def test_empty_label_separator_is_refused_in_multi_label_mode(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,x|y\nb,y\n")
    with pytest.raises(DataError, match=r"`label_separator`.*non-empty.*label_separator=''"):
        load_texts(path, multi_label=True, label_separator="")
    with pytest.raises(DataError, match="label_separator"):
        read_text_file(path, multi_label=True, label_separator="")
    # Single-label rows never split, so the separator does not matter there.
    assert load_texts(path, label_separator="", val_split=0).class_names == ["x|y", "y"]


def test_missing_val_or_test_paths_are_named(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"nope.csv' does not exist.*CSV, TSV or JSONL"):
        load_texts(train, test=str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match=r"val_dir' does not exist"):
        load_texts(train, val=str(tmp_path / "val_dir"))


def test_read_text_file_with_the_training_class_names(tmp_path):
    path = write(tmp_path / "test.csv", "text,label\na,dog\nb,dog\n")
    examples = read_text_file(path, ["cat", "dog"])
    assert examples.labels.tolist() == [1, 1] and examples.counts() == {"cat": 0, "dog": 2}
    with pytest.raises(DataError, match="only one class"):
        read_text_file(path)  # a training file needs two classes


# === Class folders ===


def test_folder_classes_are_sorted_subfolders_of_txt_files(tmp_path, caplog):
    write(tmp_path / "train/pos/1.txt", "loved it")
    write(tmp_path / "train/pos/2.txt", "great\nfilm")
    write(tmp_path / "train/pos/notes.md", "ignored")
    write(tmp_path / "train/neg/1.txt", "boring")
    write(tmp_path / "train/neg/2.txt", "  \n")
    write(tmp_path / "test/neg/9.txt", "awful")

    with caplog.at_level(logging.WARNING, logger="tfxfer.data.text"):
        data = load_texts(str(tmp_path / "train"), test=str(tmp_path / "test"), val_split=0)

    assert data.class_names == ["neg", "pos"]
    assert data.train.inputs == ["boring", "loved it", "great\nfilm"]
    assert data.train.labels.tolist() == [0, 1, 1]
    assert data.train.skipped == [str(tmp_path / "train/neg/2.txt")] and "Skipped 1" in caplog.text
    assert data.train.ignored == 1 and data.summary()["ignored"] == 1
    assert data.test.labels.tolist() == [0]


def test_folder_refusals(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "nope"))
    write(tmp_path / "flat/a.txt", "x")
    with pytest.raises(DataError, match="no class subfolders"):
        load_texts(str(tmp_path / "flat"))
    write(tmp_path / "train/pos/1.txt", "good")
    (tmp_path / "train/neg").mkdir()
    with pytest.raises(DataError, match=r"\['neg'\].*no .txt"):
        load_texts(str(tmp_path / "train"))
    write(tmp_path / "train/neg/1.txt", b"caf\xe9")
    with pytest.raises(DataError, match=r"1.txt is not UTF-8: byte 3"):
        load_texts(str(tmp_path / "train"))
    write(tmp_path / "train/neg/1.txt", "bad")
    write(tmp_path / "val/meh/1.txt", "so so")
    with pytest.raises(DataError, match=r"\['meh'\]"):
        load_texts(str(tmp_path / "train"), val=str(tmp_path / "val"))
    with pytest.raises(DataError, match="does not exist or is not a directory"):
        read_text_folder(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="class folder.*multi-label data need a CSV"):
        load_texts(str(tmp_path / "train"), multi_label=True)


def test_files_and_folders_mix_and_load_notes_survive_the_split(tmp_path, caplog):
    for i in range(4):
        write(tmp_path / f"train/pos/{i}.txt", f"good {i}")
        write(tmp_path / f"train/neg/{i}.txt", f"bad {i}")
    write(tmp_path / "train/neg/empty.txt", "\n")
    write(tmp_path / "train/neg/README.md", "ignored")
    test = write_jsonl(
        tmp_path / "test.jsonl", [{"text": "fine", "label": "pos"}, {"text": "", "label": "neg"}]
    )

    data = load_texts(str(tmp_path / "train"), test=test, val_split=0.5, seed=0)

    assert (len(data.train), len(data.val), len(data.test)) == (4, 4, 1)
    assert data.test.labels.tolist() == [1] and data.test.skipped == [f"{test} line 2"]
    assert len(data.train.skipped) == 1 and data.train.ignored == 1
    assert data.val.skipped == [] and data.val.ignored == 0
    summary = data.summary()
    assert summary["skipped"] == 2 and summary["ignored"] == 1
    assert (summary["train_examples"], summary["val_examples"], summary["test_examples"]) == (
        4,
        4,
        1,
    )
    assert summary["kind"] == "text" and summary["classes"] == ["neg", "pos"]
    json.dumps(summary)


def test_splits_must_share_the_training_class_names_and_kind():
    train = examples([0, 1, 0, 1], class_names=["a", "b"])
    other = examples([0, 1], class_names=["a", "c"])
    with pytest.raises(DataError, match=r"test examples to use the training class.*\['a', 'b'\]"):
        with_validation_split(train, None, other, val_split=0, seed=0)
    images = Examples(["x.png", "y.png"], [0, 1], ["a", "b"], "image")
    with pytest.raises(DataError, match="val examples of the training kind"):
        with_validation_split(train, images, None, val_split=0, seed=0)


# === Stratified split ===


def examples(labels, multi_label=False, class_names=None):
    labels = np.asarray(labels, np.float32 if multi_label else np.int32)
    names = class_names or [
        str(i) for i in range(labels.shape[1] if multi_label else labels.max() + 1)
    ]
    texts = [f"text {i}" for i in range(len(labels))]
    return Examples(texts, labels, names, "text", multi_label)


def split_stratified(data, fraction, *, seed=0):
    split = with_validation_split(data, None, None, val_split=fraction, seed=seed)
    return split.train, split.val


def test_split_is_stratified_seeded_and_keeps_file_order():
    data = examples([0] * 50 + [1] * 30 + [2] * 2 + [3])

    train, val = split_stratified(data, 0.2, seed=7)

    assert val.counts() == {"0": 10, "1": 6, "2": 1, "3": 0}
    assert train.counts() == {"0": 40, "1": 24, "2": 1, "3": 1}
    assert sorted(train.inputs + val.inputs, key=lambda t: int(t.split()[1])) == data.inputs
    assert train.inputs == sorted(train.inputs, key=lambda t: int(t.split()[1]))
    again_train, again_val = split_stratified(data, 0.2, seed=7)
    assert again_val.inputs == val.inputs
    assert split_stratified(data, 0.2, seed=8)[1].inputs != val.inputs


def test_multi_label_split_keeps_rare_labels_on_both_sides():
    rows = [[1, 0, 0]] * 40 + [[1, 0, 1]] * 4 + [[0, 1, 0]] * 10 + [[0, 0, 0]] * 6
    train, val = split_stratified(examples(rows, multi_label=True), 0.25, seed=0)
    assert val.counts()["2"] == 1 and train.counts()["2"] == 3
    assert len(train) + len(val) == len(rows)


@pytest.mark.parametrize("fraction", [1, -0.1, 1.5, True])
def test_split_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(DataError, match="fraction"):
        split_stratified(examples([0, 1, 0, 1]), fraction)


def test_no_split_when_the_fraction_is_zero_or_a_val_set_is_given():
    data = examples([0, 1] * 5)
    train, val = split_stratified(data, 0)
    assert train is data and val is None
    val = examples([1, 0])
    split = with_validation_split(data, val, None, val_split=0.5, seed=0)
    assert split.train is data and split.val is val


def test_load_texts_splits_the_training_file(tmp_path):
    rows = "".join(f"text {i},{'pos' if i % 3 else 'neg'}\n" for i in range(30))
    data = load_texts(write(tmp_path / "train.csv", "text,label\n" + rows), val_split=0.2, seed=1)
    assert (len(data.train), len(data.val)) == (24, 6)
    assert data.counts["val"] == {"neg": 2, "pos": 4}
    assert not set(data.train.inputs) & set(data.val.inputs)


# === Pipelines ===


def test_make_text_dataset_tokenizes_in_tf_data_in_file_order(preprocessor):
    texts = ["the movie was great", "awful plot", "i loved it", "boring"] * 3
    labels = np.arange(12, dtype=np.int32)

    ds = make_text_dataset(texts, labels, preprocessor, batch_size=5)
    batches = list(ds)

    assert [b[1].numpy().tolist() for b in batches] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    x = batches[0][0]
    assert x["token_ids"].shape == (5, 8) and x["token_ids"].dtype == tf.int32
    np.testing.assert_array_equal(x["token_ids"], preprocessor(tf.constant(texts[:5]))["token_ids"])
    assert isinstance(ds.element_spec[0], dict)


def test_token_batches_hold_no_booleans_for_a_distribution_strategy(preprocessor):
    # MirroredStrategy's first step averages a batch over the replicas; booleans fail it.
    ds = make_text_dataset(["the movie", "a film"], [0, 1], preprocessor, batch_size=2)
    x, _ = next(iter(ds))
    assert {name: t.dtype for name, t in x.items()} == dict.fromkeys(x, tf.int32)
    np.testing.assert_array_equal(x["padding_mask"][0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_make_text_dataset_shuffles_reproducibly_and_reshuffles_each_epoch(preprocessor, tmp_path):
    texts = [f"the film {'great' if i % 2 else 'bad'}" for i in range(40)]
    labels = np.arange(40, dtype=np.int32)

    def order(ds):
        return np.concatenate([y.numpy() for _, y in ds]).tolist()

    ds = make_text_dataset(
        texts,
        labels,
        preprocessor,
        batch_size=8,
        shuffle=True,
        seed=3,
        cache=str(tmp_path / "tokens"),
    )
    first, second = order(ds), order(ds)
    assert sorted(first) == list(range(40)) and first != list(range(40))
    assert second != first
    same_seed = make_text_dataset(texts, labels, preprocessor, batch_size=8, shuffle=True, seed=3)
    assert order(same_seed) == first


def test_make_text_dataset_without_preprocessor_keeps_raw_strings_and_multi_hot():
    labels = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    ds = make_text_dataset(["a", "b", "c"], labels, batch_size=3)
    x, y = next(iter(ds))
    assert x.numpy().tolist() == [b"a", b"b", b"c"]
    np.testing.assert_array_equal(y, labels)


def test_make_text_dataset_refuses_mismatched_or_empty_inputs(preprocessor):
    with pytest.raises(DataError, match="3 texts but 2 labels"):
        make_text_dataset(["a", "b", "c"], [0, 1], preprocessor)
    with pytest.raises(DataError, match="no texts"):
        make_text_dataset([], [], preprocessor)


def test_text_train_data_replays_any_epoch(preprocessor):
    data = examples(list(range(20)))

    train = text_train_data(data, preprocessor, batch_size=6, seed=5)

    # Full batches only: 3 of 6 per epoch; the 2 left over differ from epoch to epoch.
    assert train.steps_per_epoch == 3
    stream = [y.numpy() for _, y in train.build(0).take(6)]
    epoch_0, epoch_1 = np.concatenate(stream[:3]), np.concatenate(stream[3:])
    for epoch in (epoch_0, epoch_1):
        assert len(set(epoch.tolist())) == 18 and set(epoch.tolist()) <= set(range(20))
    assert epoch_0.tolist() != epoch_1.tolist()
    resumed = np.concatenate([y.numpy() for _, y in train.build(1).take(3)])
    np.testing.assert_array_equal(resumed, epoch_1)
    x, _ = next(iter(train.build(0)))
    assert x["token_ids"].shape == (6, 8)


# === make_datasets ===


@pytest.fixture(scope="module")
def bert_backbone(tmp_path_factory):
    from bert_helpers import write_hf_checkpoint

    from tfxfer.backbones import build_backbone

    path = tmp_path_factory.mktemp("bert") / "hf_bert"
    write_hf_checkpoint(path)
    return build_backbone(str(path), sequence_length=8)


@pytest.fixture
def review_data(tmp_path):
    rows = "".join(f"the film was {'great' if i % 2 else 'awful'},{i % 2}\n" for i in range(12))
    train = write(tmp_path / "train.csv", "text,label\n" + rows)
    test = write(tmp_path / "test.csv", "text,label\ngood plot,1\nbad acting,0\nfun,1\n")
    return load_texts(train, test=test, val_split=0.25, seed=0)


def test_make_datasets_for_text_tokenizes_with_the_backbone(bert_backbone, review_data):
    train, val, test = make_datasets(review_data, bert_backbone, batch_size=4, seed=2)

    assert (len(review_data.train), len(review_data.val)) == (8, 4)
    assert train.steps_per_epoch == 2
    x, y = next(iter(train.build(0)))
    assert x["token_ids"].shape == (4, 8) and y.dtype == tf.int32
    ((val_x, val_y),) = list(val)
    expected = bert_backbone.preprocessor(tf.constant(review_data.val.inputs))
    np.testing.assert_array_equal(val_x["token_ids"], expected["token_ids"])
    assert val_y.numpy().tolist() == review_data.val.labels.tolist()
    assert [y.numpy().tolist() for _, y in test] == [[1, 0, 1]]
    resumed = [y.numpy().tolist() for _, y in train.build(1).take(2)]
    from_start = [y.numpy().tolist() for _, y in train.build(0).take(4)]
    assert resumed == from_start[2:]


def test_make_datasets_keeps_raw_strings_without_a_preprocessor(bert_backbone, review_data):
    hub_like = dataclasses.replace(bert_backbone, preprocessor=None)
    datasets = make_datasets(review_data, hub_like, batch_size=3, cache=False)
    x, _ = next(iter(datasets.test))
    assert x.numpy().tolist() == [b"good plot", b"bad acting", b"fun"]
    assert datasets.train.build(0).element_spec[0].dtype == tf.string


def test_make_datasets_refuses_text_for_an_image_backbone_and_text_augmentation(
    bert_backbone, review_data
):
    from helpers import tiny_backbone

    from tfxfer.data.images import Augmentation

    with pytest.raises(TfxferError, match="data are text but the backbone 'tiny' takes images"):
        make_datasets(review_data, tiny_backbone(), batch_size=4)
    with pytest.raises(TfxferError, match="Augmentation applies to images only"):
        make_datasets(review_data, bert_backbone, batch_size=4, augmentation=Augmentation())


# === Field counts in CSV rows ===


def test_an_unquoted_comma_in_a_row_is_an_error_naming_the_line_and_the_extra_values(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\nloved it,pos\nthe plot, the acting,neg\n")
    with pytest.raises(DataError) as info:
        load_texts(path)
    message = str(info.value)
    assert "train.csv line 3 has 3 fields, but the header has 2 (text, label)" in message
    assert "['neg']" in message and "Quote every field that contains a comma" in message
    tsv = write(tmp_path / "train.tsv", "text\tlabel\nloved it\tpos\nawful\tneg\tbad\n")
    with pytest.raises(DataError, match=r"train.tsv line 3 .*\['bad'\].*contains a tab"):
        load_texts(tsv)
    # Quoted, the comma is part of the text; a trailing empty field loses nothing.
    quoted = write(
        tmp_path / "quoted.csv", 'text,label\n"the plot, the acting",neg\nloved it,pos,\n'
    )
    data = read_text_file(quoted)
    assert data.inputs == ["the plot, the acting", "loved it"]
    assert data.class_names == ["neg", "pos"]


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_row_with_too_few_fields_names_the_missing_column(tmp_path, multi_label):
    path = write(tmp_path / "train.csv", "text,label\na,x\nb\nc,y\n")
    with pytest.raises(DataError, match=r"train.csv line 3 has 1 field\(s\).*no 'label'"):
        load_texts(path, multi_label=multi_label)
    # With the label first, a short row would have lost its text.
    swapped = write(tmp_path / "swapped.csv", "label,text\nx,a\ny\nx,c\n")
    with pytest.raises(DataError, match=r"swapped.csv line 3 .*no 'text'"):
        load_texts(swapped, multi_label=multi_label)


def test_a_blank_short_row_is_skipped_as_an_empty_text(tmp_path):
    path = write(tmp_path / "train.csv", "label,text\nx,a\n   \ny,b\n")
    data = read_text_file(path)
    assert data.inputs == ["a", "b"] and data.skipped == [f"{path} line 3"]


# === Nested and hidden entries of class folders ===


def test_class_folders_are_read_recursively_and_hidden_entries_are_skipped(tmp_path):
    root = tmp_path / "train"
    write(root / "pos/1.txt", "loved it")
    write(root / "pos/more/2.txt", "great film")
    write(root / "pos/more/deeper/3.txt", "fun plot")
    write(root / "pos/.hidden.txt", "not read")
    write(root / "pos/.ipynb_checkpoints/1-checkpoint.txt", "an old copy")
    write(root / "neg/1.txt", "boring")
    write(root / "neg/notes.md", "not a text")
    write(root / "neg/.git/HEAD.txt", "ref")
    os.symlink(root / "pos" / "more", root / "neg" / "linked")  # not followed

    data = read_text_folder(str(root))
    assert data.inputs == ["boring", "loved it", "great film", "fun plot"]
    assert data.labels.tolist() == [0, 1, 1, 1]
    # .hidden.txt, .ipynb_checkpoints/, notes.md, .git/ and the link.
    assert data.ignored == 5
    again = read_text_folder(str(root))
    assert again.inputs == data.inputs and again.ignored == data.ignored
