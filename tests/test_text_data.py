"""Tests for `tfxfer.data.text`: loaders, labels, refusals, the stratified split and the pipelines.

Files are written to `tmp_path`; the tokenizer is a keras-hub BERT WordPiece tokenizer over a
twenty-word vocabulary, so nothing is downloaded and the suite stays fast.
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from tfxfer.data.text import (
    TextExamples,
    load_text_file,
    load_text_folder,
    make_text_dataset,
    split_stratified,
    text_train_data,
)
from tfxfer.errors import DataError

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

    data = load_text_file(path, val_split=0)

    assert data.class_names == ["neg", "pos"]
    assert data.train.texts == ["great, fun film", "awful\nplot", "loved it"]
    assert data.train.labels.tolist() == [1, 0, 1] and data.train.labels.dtype == np.int32
    assert data.counts == {"train": {"neg": 1, "pos": 2}}
    assert data.val is None and data.test is None and not data.multi_label


def test_integer_labels_keep_their_values_as_class_ids(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,2\nb,0\nc, 1\nd,02\n")
    data = load_text_file(path, val_split=0)
    assert data.class_names == ["0", "1", "2"]
    assert data.train.labels.tolist() == [2, 0, 1, 2]

    path = write(tmp_path / "sparse.csv", "text,label\na,10\nb,2\n")
    assert load_text_file(path, val_split=0).class_names == ["2", "10"]


def test_jsonl_and_tsv_and_custom_columns(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"review": "good", "stars": 1},
            {"review": "bad", "stars": 0},
            {"review": "fun", "stars": "1"},
        ],
    )
    data = load_text_file(jsonl, text_column="review", label_column="stars", val_split=0)
    assert data.class_names == ["0", "1"] and data.train.labels.tolist() == [1, 0, 1]

    tsv = write(tmp_path / "train.tsv", "text\tlabel\ngood, really\tpos\nbad\tneg\n")
    data = load_text_file(tsv, val_split=0)
    assert data.train.texts == ["good, really", "bad"] and data.class_names == ["neg", "pos"]


def test_multi_label_rows_become_multi_hot(tmp_path):
    csv_path = write(
        tmp_path / "train.csv", "text,label\na,sports|news\nb,news\nc,\nd, tech | news \n"
    )
    data = load_text_file(csv_path, multi_label=True, val_split=0)
    assert data.class_names == ["news", "sports", "tech"] and data.multi_label
    np.testing.assert_array_equal(data.train.labels, [[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1]])
    assert data.train.labels.dtype == np.float32
    assert data.counts["train"] == {"news": 3, "sports": 1, "tech": 1}

    jsonl = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": []}]
    )
    np.testing.assert_array_equal(
        load_text_file(jsonl, multi_label=True, val_split=0).train.labels, [[1, 1], [0, 0]]
    )


def test_empty_texts_are_skipped_and_counted(tmp_path, caplog):
    path = write(tmp_path / "train.csv", "text,label\ngood,pos\n,neg\n   ,pos\nbad,neg\n")
    with caplog.at_level(logging.WARNING, logger="tfxfer.data.text"):
        data = load_text_file(path, val_split=0)
    assert data.train.texts == ["good", "bad"]
    assert data.train.skipped_empty == 2 and data.summary()["skipped_empty"] == 2
    assert "Skipped 2 example(s)" in caplog.text and "train.csv" in caplog.text


def test_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path / "train.csv", b"\xef\xbb\xbftext,label\nok,a\nfine,b\n")
    assert load_text_file(path, val_split=0).train.texts == ["ok", "fine"]


def test_val_and_test_files_use_the_training_class_names(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,cat\nb,dog\nc,emu\n")
    val = write(tmp_path / "val.csv", "text,label\nd,emu\ne,cat\n")
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "f", "label": "dog"}])

    data = load_text_file(train, val_path=val, test_path=test)

    assert len(data.train) == 3  # a val file replaces the split
    assert data.val.labels.tolist() == [2, 0] and data.test.labels.tolist() == [1]
    assert data.val.class_names == data.class_names == ["cat", "dog", "emu"]
    assert data.counts["val"] == {"cat": 1, "dog": 0, "emu": 1}


# === Refusals ===


def test_label_unseen_in_training_is_named(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,cat\nb,dog\n")
    val = write(tmp_path / "val.csv", "text,label\nc,cat\nd,yak\n")
    with pytest.raises(DataError, match=r"\['yak'\]") as error:
        load_text_file(train, val_path=val)
    assert "val.csv" in str(error.value) and "['cat', 'dog']" in str(error.value)


def test_non_utf8_bytes_name_the_file_offset_and_line(tmp_path):
    path = write(tmp_path / "latin1.csv", b"text,label\nok,a\ncaf\xe9 au lait,b\n")
    with pytest.raises(DataError, match=r"byte 19 \(line 3\) is 0xe9") as error:
        load_text_file(path)
    assert "latin1.csv" in str(error.value)


def test_missing_columns_name_the_columns_found(tmp_path):
    path = write(tmp_path / "train.csv", "review,sentiment\ngood,pos\n")
    with pytest.raises(DataError, match=r"no column 'text'.*\['review', 'sentiment'\]"):
        load_text_file(path)
    with pytest.raises(DataError, match=r"no column 'label'.*\['review', 'sentiment'\]"):
        load_text_file(path, text_column="review")
    jsonl = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "tag": "y"}]
    )
    with pytest.raises(DataError, match=r"line 2 has no key 'label'.*\['tag', 'text'\]"):
        load_text_file(jsonl)


def test_missing_label_names_the_line(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,x\nb,\nc,y\n")
    with pytest.raises(DataError, match=r"train.csv line 3 has an empty label"):
        load_text_file(path)
    short_row = write(tmp_path / "short.csv", "text,label\na,x\nb\n")
    with pytest.raises(DataError, match="line 3"):
        load_text_file(short_row)


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
        load_text_file(path)


def test_bad_paths_and_suffixes_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_file(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match=r"\.jsonl"):
        load_text_file(write(tmp_path / "train.xlsx", "x"))
    with pytest.raises(DataError, match="no examples"):
        load_text_file(write(tmp_path / "blank.csv", "text,label\n ,a\n"))
    with pytest.raises(DataError, match="no column"):
        load_text_file(write(tmp_path / "empty.csv", ""))


def test_a_single_class_is_refused(tmp_path):
    with pytest.raises(DataError, match="only one class"):
        load_text_file(write(tmp_path / "train.csv", "text,label\na,x\nb,x\n"))


# === Class folders ===


def test_folder_classes_are_sorted_subfolders_of_txt_files(tmp_path, caplog):
    write(tmp_path / "train/pos/1.txt", "loved it")
    write(tmp_path / "train/pos/2.txt", "great\nfilm")
    write(tmp_path / "train/pos/notes.md", "ignored")
    write(tmp_path / "train/neg/1.txt", "boring")
    write(tmp_path / "train/neg/2.txt", "  \n")
    write(tmp_path / "test/neg/9.txt", "awful")

    with caplog.at_level(logging.WARNING, logger="tfxfer.data.text"):
        data = load_text_folder(
            str(tmp_path / "train"), test_directory=str(tmp_path / "test"), val_split=0
        )

    assert data.class_names == ["neg", "pos"]
    assert data.train.texts == ["boring", "loved it", "great\nfilm"]
    assert data.train.labels.tolist() == [0, 1, 1]
    assert data.train.skipped_empty == 1 and "Skipped 1" in caplog.text
    assert data.test.labels.tolist() == [0]


def test_folder_refusals(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_folder(str(tmp_path / "nope"))
    write(tmp_path / "flat/a.txt", "x")
    with pytest.raises(DataError, match="no class subfolders"):
        load_text_folder(str(tmp_path / "flat"))
    write(tmp_path / "train/pos/1.txt", "good")
    (tmp_path / "train/neg").mkdir()
    with pytest.raises(DataError, match=r"\['neg'\].*no .txt"):
        load_text_folder(str(tmp_path / "train"))
    write(tmp_path / "train/neg/1.txt", b"caf\xe9")
    with pytest.raises(DataError, match=r"1.txt is not UTF-8: byte 3"):
        load_text_folder(str(tmp_path / "train"))
    write(tmp_path / "train/neg/1.txt", "bad")
    write(tmp_path / "val/meh/1.txt", "so so")
    with pytest.raises(DataError, match=r"\['meh'\]"):
        load_text_folder(str(tmp_path / "train"), val_directory=str(tmp_path / "val"))


# === Stratified split ===


def examples(labels, multi_label=False, class_names=None):
    labels = np.asarray(labels, np.float32 if multi_label else np.int32)
    names = class_names or [
        str(i) for i in range(labels.shape[1] if multi_label else labels.max() + 1)
    ]
    return TextExamples([f"text {i}" for i in range(len(labels))], labels, names, multi_label)


def test_split_is_stratified_seeded_and_keeps_file_order():
    data = examples([0] * 50 + [1] * 30 + [2] * 2 + [3])

    train, val = split_stratified(data, 0.2, seed=7)

    assert val.counts() == {"0": 10, "1": 6, "2": 1, "3": 0}
    assert train.counts() == {"0": 40, "1": 24, "2": 1, "3": 1}
    assert sorted(train.texts + val.texts, key=lambda t: int(t.split()[1])) == data.texts
    assert train.texts == sorted(train.texts, key=lambda t: int(t.split()[1]))
    again_train, again_val = split_stratified(data, 0.2, seed=7)
    assert again_val.texts == val.texts
    assert split_stratified(data, 0.2, seed=8)[1].texts != val.texts


def test_multi_label_split_keeps_rare_labels_on_both_sides():
    rows = [[1, 0, 0]] * 40 + [[1, 0, 1]] * 4 + [[0, 1, 0]] * 10 + [[0, 0, 0]] * 6
    train, val = split_stratified(examples(rows, multi_label=True), 0.25, seed=0)
    assert val.counts()["2"] == 1 and train.counts()["2"] == 3
    assert len(train) + len(val) == len(rows)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(DataError, match="fraction"):
        split_stratified(examples([0, 1, 0, 1]), fraction)


def test_load_text_file_splits_the_training_file(tmp_path):
    rows = "".join(f"text {i},{'pos' if i % 3 else 'neg'}\n" for i in range(30))
    data = load_text_file(
        write(tmp_path / "train.csv", "text,label\n" + rows), val_split=0.2, seed=1
    )
    assert (len(data.train), len(data.val)) == (24, 6)
    assert data.counts["val"] == {"neg": 2, "pos": 4}
    assert not set(data.train.texts) & set(data.val.texts)


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
