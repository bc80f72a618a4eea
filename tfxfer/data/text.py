"""Labelled text from CSV, TSV, JSONL files or class folders, and its `tf.data` pipelines.

Loading is kept apart from tokenizing: the loaders return the shared `tfxfer.data.examples`
model (`Examples` of kind "text" whose inputs are the raw strings, `LabelledData` for the
train / val / test splits), checked row by row so that a bad file fails here with its name
and line, not later inside `tf.data`. The pipelines then tokenize once with the backbone's
preprocessor inside `tf.data`, cache the token ids, and only shuffle and batch per epoch.

Batches are padded only as far as they need (dynamic padding): the preprocessor pads every text
to the maximum `sequence_length`, and each batch is then trimmed to the smallest bucket length
(`tfxfer.data.buckets`, capped at the maximum) that holds its longest text. A short text then
costs what it is long, not what the longest possible text is; and since there are a few
bucket lengths, a step function sees a few shapes and is traced (or XLA-compiled) a few times.
Training batches group texts of similar length: each epoch, a permutation seeded by the seed and
the epoch is cut into pools, each pool is sorted by length and cut into batches, and the
batches are shuffled. The order is a function of the epoch alone, so a resumed run replays it.

Labels are class names or integers. Class names are sorted; integer labels are sorted by
value, so labels 0..k-1 keep their meaning as class ids. Validation and test files are read
with the training set's class names, and a label the training set never saw is an error:
the model would have no output for it.

Empty or whitespace-only texts are skipped, listed in `Examples.skipped` (file and line), and
reported with `logging.warning`:
spreadsheets exported to CSV often carry a few blank rows, and failing a whole run for them
helps nobody. Everything else that is wrong (a missing column, a missing label, a CSV row with
more fields than its header, which an unquoted comma inside a text makes, bytes that are not
UTF-8, a line that is not JSON) raises `DataError` naming the file and line.

In a class folder, each class subfolder is read recursively: its `.txt` files and those of
its subfolders, in sorted order, all with the class's label. Files and folders whose name
starts with "." (`.DS_Store`, `.ipynb_checkpoints/`, `.git/`) are skipped everywhere, as the
image loader skips them; they and files that are not `.txt` are counted in
`Examples.ignored` (a hidden folder counts once, whatever it holds). Links to folders are
not followed (they can loop) and are counted too.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tfxfer import fs
from tfxfer.data.buckets import (
    as_arrays,
    bucket_lengths,
    bucket_of,
    length_grouped_batches,
    longest_in_batch,
    padded_length,
    trimmed,
)
from tfxfer.data.examples import Examples, LabelledData, with_validation_split
from tfxfer.data.pipeline import TrainData, epoch_batches, maybe_cache
from tfxfer.errors import DataError, TfxferError

log = logging.getLogger(__name__)

TEXT_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
_INTEGER = re.compile(r"^[+-]?\d+$")
# Users name columns on the command line or in Python; the hint names both.
_COLUMN_HINT = (
    "Pass --text-column / --label-column (text_column= / label_column= in Python) to name "
    "the right ones."
)
# Texts are tokenized in chunks of this many before the token ids are cached one by one.
_TOKENIZE_CHUNK = 256


def load_texts(
    source: str,
    *,
    val: str | None = None,
    test: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    multi_label: bool = False,
    label_separator: str = "|",
    val_split: float = 0.2,
    seed: int = 0,
) -> LabelledData:
    """Loads labelled text from a file or a class folder, with optional validation and test data.

    Each of `source`, `val` and `test` is a CSV, TSV or JSONL file (`read_text_file`) or a
    folder with one subfolder of UTF-8 `.txt` files per class (`read_text_folder`), whichever
    it is on disk. Class names come from `source`; `val` and `test` are read with them.

    Args:
        source: str. The training file or folder.
        val: str or None. Validation file or folder. Replaces `val_split`. Defaults to `None`.
        test: str or None. Test file or folder. Defaults to `None`.
        text_column: str. Column (JSON key) of a file holding the text. Defaults to `"text"`.
        label_column: str. Column (JSON key) of a file holding the label: a class name or an
            integer; for multi-label, names joined by `label_separator` (or a JSON list).
            Defaults to `"label"`.
        multi_label: bool. Each text has zero or more labels; labels become multi-hot rows.
            Files only: a class folder gives each text one class. Defaults to `False`.
        label_separator: str. Separates the labels of one multi-label row. Defaults to `"|"`.
        val_split: float. Fraction of the training data held out for validation (stratified,
            seeded) when there is no `val`; 0 disables it. Defaults to `0.2`.
        seed: int. Seed of the validation split. Defaults to `0`.

    Returns:
        `LabelledData` of kind "text" whose inputs are the raw texts.

    Raises:
        DataError: a path does not exist, a file or folder cannot be read (the message names
            the file and line), labels are bad, or `label_separator` is empty in multi-label
            mode.

    Example:

    ```python
    data = load_texts("reviews.csv", label_column="sentiment", test="test.csv")
    data.class_names  # ['negative', 'positive']
    ```
    """
    _check_separator(multi_label, label_separator)

    def read(path: str, class_names: list[str] | None) -> Examples:
        if not fs.exists(path):
            raise DataError(
                f"{str(path)!r} does not exist. Expected a CSV, TSV or JSONL file, or a folder "
                "with one subfolder of .txt files per class."
            )
        if not fs.isdir(path):
            return read_text_file(
                path,
                class_names,
                text_column=text_column,
                label_column=label_column,
                multi_label=multi_label,
                label_separator=label_separator,
            )
        if multi_label:
            raise DataError(
                f"{str(path)!r} is a class folder, which gives each text one class; "
                "multi-label data need a CSV, TSV or JSONL file with a label column."
            )
        return read_text_folder(path, class_names)

    train = read(source, None)
    val_examples = read(val, train.class_names) if val else None
    test_examples = read(test, train.class_names) if test else None
    return with_validation_split(train, val_examples, test_examples, val_split=val_split, seed=seed)


def read_text_file(
    path: str,
    class_names: list[str] | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    multi_label: bool = False,
    label_separator: str = "|",
) -> Examples:
    """Reads labelled text from one CSV, TSV or JSONL file as `Examples` of kind "text".

    The format follows the suffix: `.csv` (comma), `.tsv` (tab), `.jsonl` / `.ndjson` (one
    JSON object per line). Files are UTF-8 (a byte-order mark is allowed). Rows whose text is
    empty or whitespace are skipped and counted; see the module docstring for why.

    Args:
        path: str. The file.
        class_names: list[str] or None. The training class names, for a validation or test
            file; a label outside them is an error. Defaults to the file's own labels, sorted.
        text_column: str. Column (JSON key) holding the text. Defaults to `"text"`.
        label_column: str. Column (JSON key) holding the label. Defaults to `"label"`.
        multi_label: bool. Labels become multi-hot rows. Defaults to `False`.
        label_separator: str. Separates the labels of one multi-label row. Defaults to `"|"`.
    """
    _check_separator(multi_label, label_separator)
    rows = _read_table(_normalized(path), text_column, label_column)
    return _to_examples(rows, str(path), class_names, multi_label, label_separator)


def read_text_folder(directory: str, class_names: list[str] | None = None) -> Examples:
    """Reads a folder with one subfolder per class of UTF-8 `.txt` files, one text each.

    Class names are the sorted subfolder names (integers by value). Each class folder is read
    recursively, in sorted order. Hidden files and folders (names starting with ".") and files
    other than `.txt` are ignored and counted in `ignored`; empty or whitespace-only files are
    skipped and listed in `skipped`.

    Args:
        directory: str. The folder.
        class_names: list[str] or None. The training class names, for a validation or test
            folder: subfolders must be among them, and may be missing or empty. Defaults to
            the subfolder names, each of which must then hold `.txt` files.
    """
    rows, ignored = _read_folder(_normalized(directory), must_fill_every_class=class_names is None)
    examples = _to_examples(rows, str(directory), class_names, False, "|")
    examples.ignored = ignored
    return examples


def make_text_dataset(
    texts: Sequence[str],
    labels: np.ndarray | Sequence[Any],
    preprocessor: Any = None,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = True,
    dynamic_padding: bool = True,
) -> tf.data.Dataset:
    """A batched, cached, prefetched dataset of `(token dict, label)`, tokenized inside `tf.data`.

    Texts are tokenized once, in chunks, and the token ids are cached, so later epochs only
    read, shuffle and batch. Batches keep the texts' order (file order unless `shuffle`), so
    predictions line up with the texts. For training that must resume mid-run, use
    `text_train_data`, whose order depends only on the epoch.

    Args:
        texts: sequence of str. Raw texts.
        labels: array-like. `(n,)` class ids or `(n, num_classes)` multi-hot rows.
        preprocessor: keras layer or None. The backbone's preprocessor (`backbone.preprocessor`);
            `None` keeps raw strings. Defaults to `None`.
        batch_size: int. The global batch size. Defaults to `32`.
        shuffle: bool. Reshuffle every epoch (seeded). Defaults to `False` (file order).
        seed: int. Shuffle seed. Defaults to `0`.
        cache: bool or str. Cache token ids in memory (`True`) or in this file path.
            Defaults to `True`.
        dynamic_padding: bool. Trim each batch to the smallest of `bucket_lengths` that holds
            its longest text; `False` keeps the preprocessor's full length. Token dicts
            without a `padding_mask` are never trimmed. Defaults to `True`.
    """
    examples = _tokenized(texts, labels, preprocessor, cache)
    width = padded_length(examples.element_spec[0]) if dynamic_padding else None
    if shuffle:
        examples = examples.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
    batches = examples.batch(batch_size)
    if width:
        buckets = tf.constant(bucket_lengths(width), tf.int32)

        def to_bucket(x, y):
            return trimmed(x, bucket_of(longest_in_batch(x), buckets)), y

        batches = batches.map(to_bucket, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


def text_train_data(
    examples: Examples,
    preprocessor: Any,
    *,
    batch_size: int,
    seed: int = 0,
    cache: bool | str = True,
    dynamic_padding: bool = True,
) -> TrainData:
    """Training batches of `(token dict, label)` that can start at any epoch and step (resume).

    Tokenizes once and caches like `make_text_dataset`. With dynamic padding, the token ids
    are then held in memory and each epoch's batches are planned from `seed` and the epoch
    number: a seeded permutation, cut into pools of 50 batches' worth of examples, each pool
    sorted by length and cut into batches, the batches shuffled. Each batch is trimmed to the
    smallest of `bucket_lengths` that holds its longest text. Without it (or for raw strings),
    each epoch is a seeded shuffle of full-length examples (`tfxfer.data.pipeline.epoch_batches`).
    Either way, full batches only when there are at least `batch_size` examples.

    Args:
        examples: Examples. Text examples (`load_texts`, `read_text_file`).
        preprocessor: keras layer or None. The backbone's preprocessor (`backbone.preprocessor`);
            `None` keeps raw strings.
        batch_size: int. The global batch size.
        seed: int. Seed of the per-epoch order. Defaults to `0`.
        cache: bool or str. Cache token ids in memory (`True`), in this file path, or not at
            all (`False`). Defaults to `True`.
        dynamic_padding: bool. Batch texts of similar length together and trim each batch to
            its bucket. Defaults to `True`.

    Example:

    ```python
    train = text_train_data(data.train, backbone.preprocessor, batch_size=32)
    rest_of_epoch_2 = train.build(2, 5).take(train.steps_per_epoch - 5)
    ```
    """
    if examples.kind != "text":
        raise TfxferError(
            f"Expected text examples. Received: {examples.kind} examples from "
            f"{examples.source!r}; use `tfxfer.data.images` for images."
        )
    tokenized = _tokenized(examples.inputs, examples.labels, preprocessor, cache)
    if dynamic_padding and padded_length(tokenized.element_spec[0]):
        inputs, labels = as_arrays(tokenized)
        lengths = np.sum(inputs["padding_mask"], axis=1, dtype=np.int32)
        return length_grouped_batches(
            tokenized,
            inputs,
            labels,
            lengths,
            batch_size=batch_size,
            seed=seed,
            buckets=bucket_lengths(inputs["padding_mask"].shape[1]),
        )
    return epoch_batches(tokenized, num_examples=len(examples), batch_size=batch_size, seed=seed)


# === Reading files ===


def _tokenized(
    texts: Sequence[str], labels: Any, preprocessor: Any, cache: bool | str
) -> tf.data.Dataset:
    if len(texts) == 0:
        raise DataError("There are no texts to make a dataset from.")
    labels = np.asarray(labels)
    if len(labels) != len(texts):
        raise DataError(f"Got {len(texts)} texts but {len(labels)} labels.")
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(list(texts), tf.string), labels))
    if preprocessor is not None:
        ds = (
            ds.batch(_TOKENIZE_CHUNK)
            .map(preprocessor, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .map(_without_booleans)
            .unbatch()
            # Unbatching hides the size; Keras warns "ran out of data" on datasets of unknown size.
            .apply(tf.data.experimental.assert_cardinality(len(texts)))
        )
    return maybe_cache(ds, cache)


def _without_booleans(x: Any, y: Any) -> tuple[Any, Any]:
    """Boolean token tensors (the padding mask) as int32, which BERT's inputs declare.

    Keras' `fit` under a distribution strategy first averages one batch over the replicas to
    build the model, and booleans cannot be summed: a boolean padding mask fails every
    MirroredStrategy run at its first step.
    """
    x = tf.nest.map_structure(lambda t: tf.cast(t, tf.int32) if t.dtype == tf.bool else t, x)
    return x, y


def _normalized(path: str) -> str:
    """A local path as `pathlib` spells it (the form error messages show); a URL unchanged.

    `Path` would fold a URL's "//" into one "/", so URLs (`gs://...`) stay strings and are read
    through `fs`.
    """
    return str(path) if fs.is_url(path) else str(Path(path))


def _decode_utf8(path: str) -> str:
    """The file's text; non-UTF-8 bytes raise `DataError` naming their offset and line."""
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"Text file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"Expected a file, but {str(path)!r} is a directory.") from None
    except OSError as error:  # no permission, an I/O error
        raise DataError(
            f"Cannot read text file {str(path)!r}: {error.strerror or error}. Check that it "
            "is readable (its permissions, and the disk it is on)."
        ) from None
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8: byte {offset} (line {line}) is 0x{data[offset]:02x}. "
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def _read_bytes(path: str) -> bytes:
    """`fs.read_bytes`, with a URL's gfile errors turned into the `OSError`s a local read raises."""
    if not fs.is_url(path):
        return Path(path).read_bytes()
    if fs.isdir(path):
        raise IsADirectoryError(path)
    try:
        return fs.read_bytes(path)
    except tf.errors.NotFoundError:
        raise FileNotFoundError(path) from None
    except tf.errors.OpError as error:
        raise OSError(error.message) from None


def _read_table(
    path: str, text_column: str, label_column: str
) -> list[tuple[int, str | None, Any]]:
    """Rows of `(line, text, raw label)` from a CSV, TSV or JSONL file."""
    suffix = os.path.splitext(fs.basename(path))[1].lower()
    if suffix not in TEXT_FILE_SUFFIXES:
        raise DataError(
            f"Expected a text file ending in one of {TEXT_FILE_SUFFIXES}. Received: {str(path)!r}"
        )
    content = _decode_utf8(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, content, text_column, label_column)
    reader = csv.DictReader(
        io.StringIO(content, newline=""), delimiter="\t" if suffix == ".tsv" else ","
    )
    try:
        columns = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise DataError(
                f"{path} has no column {missing[0]!r}. Columns found: {columns}. {_COLUMN_HINT}"
            )
        rows = []
        for row in reader:
            _check_field_count(path, reader, row, (text_column, label_column))
            rows.append((reader.line_num, row[text_column], row[label_column]))
        return rows
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num} is not valid CSV: {error}") from None


def _check_field_count(
    path: str, reader: csv.DictReader, row: dict[str | None, Any], needed: tuple[str, str]
) -> None:
    """Raises `DataError` for a row with more fields than the header, or too few for `needed`.

    `csv.DictReader` would otherwise take an unquoted delimiter inside a text or a label
    ("the match went on, and on") as the end of a field: it keeps the row's first fields,
    puts the rest aside under the key None, and the label silently becomes a piece of text.
    Extra fields that are all empty (a trailing delimiter) lose nothing and are allowed, as
    are short rows that hold nothing at all (a blank spreadsheet row), which `_to_examples`
    skips as empty.
    """
    header = reader.fieldnames or []
    delimiter = "tab" if reader.reader.dialect.delimiter == "\t" else "comma"
    extra = row.get(None) or []
    if any(str(value).strip() for value in extra):
        raise DataError(
            f"{path} line {reader.line_num} has {len(header) + len(extra)} fields, but the "
            f"header has {len(header)} ({', '.join(header)}): the extra value(s) {extra[:3]!r} "
            f"would be cut off. Quote every field that contains a {delimiter}, e.g. "
            f'"rates rose, again" (most spreadsheet programs do when they export).'
        )
    missing = [column for column in needed if row.get(column) is None]
    present = [value for key, value in row.items() if key is not None and value is not None]
    if missing and any(value.strip() for value in present):
        raise DataError(
            f"{path} line {reader.line_num} has {len(present)} field(s), but the header has "
            f"{len(header)} ({', '.join(header)}): it has no {missing[0]!r}. Every row needs "
            f"a value for each column, separated by a {delimiter}."
        )


def _read_jsonl(
    path: str, content: str, text_column: str, label_column: str
) -> list[tuple[int, str | None, Any]]:
    rows = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {line_number} is not valid JSON: {error.msg}.") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {line_number} is a JSON {type(record).__name__}; expected an object."
            )
        missing = [c for c in (text_column, label_column) if c not in record]
        if missing:
            raise DataError(
                f"{path} line {line_number} has no key {missing[0]!r}. "
                f"Keys found: {sorted(record)}. {_COLUMN_HINT}"
            )
        if record[text_column] is not None and not isinstance(record[text_column], str):
            raise DataError(
                f"{path} line {line_number}: expected the text to be a string. "
                f"Received: {record[text_column]!r}"
            )
        rows.append((line_number, record[text_column], record[label_column]))
    return rows


def _read_folder(
    directory: str, *, must_fill_every_class: bool = False
) -> tuple[list[tuple[str, str, str]], int]:
    """Rows of `(file, text, class name)` from a class folder, and the count of ignored files."""
    if not fs.isdir(directory):
        raise DataError(f"Text folder {str(directory)!r} does not exist or is not a directory.")
    class_names = sorted(
        name
        for name in fs.listdir(directory)
        if not name.startswith(".") and fs.isdir(fs.join(directory, name))
    )
    if not class_names:
        raise DataError(
            f"{directory} has no class subfolders. Expected one subfolder of .txt files per class."
        )
    rows, empty_classes, ignored = [], [], 0
    for name in class_names:
        files, hidden = fs.visible_files(fs.join(directory, name))
        texts = [p for p in files if p.lower().endswith(".txt")]
        ignored += hidden + len(files) - len(texts)
        if not texts:
            empty_classes.append(name)
        rows.extend((p, _decode_utf8(p), name) for p in texts)
    if must_fill_every_class and empty_classes:
        raise DataError(f"Class folder(s) {empty_classes} in {directory} hold no .txt files.")
    if ignored:
        log.info("Ignored %d hidden or non-.txt file(s) and folder(s) in %s", ignored, directory)
    return rows, ignored


# === Labels ===


def _check_separator(multi_label: bool, separator: str) -> None:
    if multi_label and (not isinstance(separator, str) or not separator):
        raise DataError(
            "Expected `label_separator` to be a non-empty string in multi-label mode, e.g. "
            f"'|' for labels like 'news|sports'. Received: label_separator={separator!r}"
        )


def _label_names(raw: Any, multi_label: bool, separator: str, where: str) -> tuple[str, ...]:
    """The label names of one row, as strings with integers in canonical form."""
    if raw is None:
        parts = []
    elif multi_label and isinstance(raw, list):
        parts = raw
    elif isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise DataError(
            f"{where}: expected the label to be a class name or an integer. Received: {raw!r}"
        )
    elif multi_label and isinstance(raw, str):
        parts = raw.split(separator)
    else:
        parts = [raw]
    names = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise DataError(
                f"{where}: expected labels to be class names or integers. Received: {part!r}"
            )
        name = str(part).strip()
        if name:
            names.append(str(int(name)) if _INTEGER.match(name) else name)
    if not names and not multi_label:
        raise DataError(f"{where} has an empty label. Every row needs a class name or an integer.")
    return tuple(dict.fromkeys(names))


def _to_examples(
    rows: list[tuple[Any, str | None, Any]],
    source: str,
    class_names: list[str] | None,
    multi_label: bool,
    separator: str,
) -> Examples:
    """Checks rows, skips empty texts and encodes labels (with `class_names` if given)."""
    texts: list[str] = []
    names_per_row: list[tuple[str, ...]] = []
    skipped: list[str] = []
    for where, text, raw_label in rows:
        place = f"{source} line {where}" if isinstance(where, int) else str(where)
        if text is None or not text.strip():
            skipped.append(place)
            continue
        texts.append(text)
        names_per_row.append(_label_names(raw_label, multi_label, separator, place))
    if skipped:
        log.warning(
            "Skipped %d example(s) with empty or whitespace-only text in %s, e.g. %s",
            len(skipped),
            source,
            skipped[:3],
        )
    if not texts:
        raise DataError(
            f"{source} has no examples with text ({len(skipped)} empty row(s) skipped)."
        )
    if class_names is None:
        class_names = _sorted_class_names({n for names in names_per_row for n in names})
        if not multi_label and len(class_names) < 2:
            raise DataError(
                f"{source} has only one class, {class_names}; a classifier needs at least two."
            )
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({n for names in names_per_row for n in names if n not in index})
    if unknown:
        raise DataError(
            f"{source} has label(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} that the "
            f"training data does not have. Training classes: {class_names}."
        )
    if multi_label:
        labels = np.zeros((len(texts), len(class_names)), np.float32)
        for row, names in enumerate(names_per_row):
            labels[row, [index[n] for n in names]] = 1.0
    else:
        labels = np.asarray([index[names[0]] for names in names_per_row], np.int32)
    return Examples(texts, labels, list(class_names), "text", multi_label, source, skipped=skipped)


def _sorted_class_names(names: set[str]) -> list[str]:
    """Integer labels sorted by value (so 0..k-1 stay class ids 0..k-1), names alphabetically."""
    if names and all(_INTEGER.match(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)
