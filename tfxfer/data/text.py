"""Labelled text from CSV, TSV, JSONL files or class folders, and its `tf.data` pipelines.

Loading is kept apart from tokenizing: the loaders return Python lists of raw strings and
label arrays (`TextExamples`), checked row by row so that a bad file fails here with its name
and line, not later inside `tf.data`. The pipelines then tokenize once with the backbone's
preprocessor inside `tf.data`, cache the token ids, and only shuffle and batch per epoch.

Labels are class names or integers. Class names are sorted; integer labels are sorted by
value, so labels 0..k-1 keep their meaning as class ids. Validation and test files are read
with the training set's class names, and a label the training set never saw is an error:
the model would have no output for it.

Empty or whitespace-only texts are skipped, counted, and reported with `logging.warning`:
spreadsheets exported to CSV often carry a few blank rows, and failing a whole run for them
helps nobody. Everything else that is wrong (a missing column, a missing label, bytes that
are not UTF-8, a line that is not JSON) raises `DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tfxfer.data.pipeline import TrainData, epoch_batches, maybe_cache, stratified_split
from tfxfer.errors import DataError

log = logging.getLogger(__name__)

TEXT_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
_INTEGER = re.compile(r"^[+-]?\d+$")
# Texts are tokenized in chunks of this many before the token ids are cached one by one.
_TOKENIZE_CHUNK = 256


@dataclass
class TextExamples:
    """Raw texts and their labels from one file or folder, plus what loading skipped.

    Args:
        texts: list[str]. The texts, in file order.
        labels: np.ndarray. `(n,)` int32 class ids, or `(n, num_classes)` float32 multi-hot
            rows when `multi_label`.
        class_names: list[str]. Names of the class ids (the training set's).
        multi_label: bool. Whether a text can have several labels.
        source: str. The file or folder the examples came from.
        skipped_empty: int. Rows skipped because their text was empty or only whitespace.
    """

    texts: list[str]
    labels: np.ndarray
    class_names: list[str]
    multi_label: bool = False
    source: str = ""
    skipped_empty: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> dict[str, int]:
        """Examples per class (positives per class when multi-label)."""
        if self.multi_label:
            totals = self.labels.sum(axis=0) if len(self) else np.zeros(len(self.class_names))
        else:
            totals = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(total) for name, total in zip(self.class_names, totals, strict=True)}

    def subset(self, indices: Sequence[int]) -> TextExamples:
        """The examples at `indices`, in that order."""
        index = np.asarray(indices, dtype=np.int64)
        return TextExamples(
            [self.texts[i] for i in index],
            self.labels[index],
            self.class_names,
            self.multi_label,
            self.source,
        )

    def as_dataset(self) -> tf.data.Dataset:
        """An unbatched `tf.data.Dataset` of `(string, label)` pairs, in file order."""
        return tf.data.Dataset.from_tensor_slices((tf.constant(self.texts, tf.string), self.labels))


@dataclass
class TextData:
    """The training, validation and test splits of a text dataset, with their class names.

    A recipe tokenizes them with the backbone's preprocessor, e.g.
    `make_text_dataset(data.val.texts, data.val.labels, backbone.preprocessor, batch_size=32)`.
    """

    train: TextExamples
    val: TextExamples | None
    test: TextExamples | None
    class_names: list[str]
    multi_label: bool

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per class of each split that exists."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {name: split.counts() for name, split in splits.items() if split is not None}

    def summary(self) -> dict[str, Any]:
        """Facts worth recording in a run's config."""
        return {
            "classes": self.class_names,
            "multi_label": self.multi_label,
            **{
                f"{name}_texts": len(split)
                for name, split in (("train", self.train), ("val", self.val), ("test", self.test))
                if split is not None
            },
            "skipped_empty": sum(
                split.skipped_empty
                for split in (self.train, self.val, self.test)
                if split is not None
            ),
        }


def load_text_file(
    path: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    multi_label: bool = False,
    label_separator: str = "|",
    val_path: str | None = None,
    test_path: str | None = None,
    val_split: float = 0.2,
    seed: int = 0,
) -> TextData:
    """Loads labelled text from a CSV, TSV or JSONL file, with optional validation and test files.

    The format follows the suffix: `.csv` (comma), `.tsv` (tab), `.jsonl` / `.ndjson` (one
    JSON object per line). Files are UTF-8 (a byte-order mark is allowed). Rows whose text is
    empty or whitespace are skipped and counted; see the module docstring for why.

    Args:
        path: str. The training file.
        text_column: str. Column (JSON key) holding the text. Defaults to `"text"`.
        label_column: str. Column (JSON key) holding the label: a class name or an integer;
            for multi-label, names joined by `label_separator` (or a JSON list). Defaults to
            `"label"`.
        multi_label: bool. Each text has zero or more labels; labels become multi-hot rows.
            Defaults to `False`.
        label_separator: str. Separates the labels of one multi-label row. Defaults to `"|"`.
        val_path: str or None. A validation file in the same format, read with the training
            class names. Replaces `val_split`. Defaults to `None`.
        test_path: str or None. A test file, read like `val_path`. Defaults to `None`.
        val_split: float. Fraction of the training file held out for validation (stratified,
            seeded) when there is no `val_path`; 0 disables it. Defaults to `0.2`.
        seed: int. Seed of the validation split. Defaults to `0`.

    Example:

    ```python
    data = load_text_file("reviews.csv", label_column="sentiment", test_path="test.csv")
    data.class_names  # ['negative', 'positive']
    ```
    """

    def read(file: str) -> list[tuple[int, str | None, Any]]:
        return _read_table(Path(file), text_column, label_column)

    train = _to_examples(read(path), path, None, multi_label, label_separator)
    val = (
        _to_examples(read(val_path), val_path, train.class_names, multi_label, label_separator)
        if val_path
        else None
    )
    test = (
        _to_examples(read(test_path), test_path, train.class_names, multi_label, label_separator)
        if test_path
        else None
    )
    return _with_split(train, val, test, val_split, seed)


def load_text_folder(
    directory: str,
    *,
    val_directory: str | None = None,
    test_directory: str | None = None,
    val_split: float = 0.2,
    seed: int = 0,
) -> TextData:
    """Loads a folder with one subfolder per class holding UTF-8 `.txt` files, one text each.

    Class names are the sorted subfolder names of `directory`. Files other than `.txt` are
    ignored; empty or whitespace-only files are skipped and counted.

    Args:
        directory: str. The training folder.
        val_directory: str or None. A validation folder whose subfolders are training classes.
            Replaces `val_split`. Defaults to `None`.
        test_directory: str or None. A test folder, read like `val_directory`. Defaults to `None`.
        val_split: float. Stratified, seeded validation fraction when there is no
            `val_directory`; 0 disables it. Defaults to `0.2`.
        seed: int. Seed of the validation split. Defaults to `0`.
    """
    train_rows = _read_folder(Path(directory), must_fill_every_class=True)
    train = _to_examples(train_rows, directory, None, False, "|")
    val = (
        _to_examples(
            _read_folder(Path(val_directory)), val_directory, train.class_names, False, "|"
        )
        if val_directory
        else None
    )
    test = (
        _to_examples(
            _read_folder(Path(test_directory)), test_directory, train.class_names, False, "|"
        )
        if test_directory
        else None
    )
    return _with_split(train, val, test, val_split, seed)


def split_stratified(
    examples: TextExamples, fraction: float, *, seed: int = 0
) -> tuple[TextExamples, TextExamples]:
    """Splits examples into a training and a validation part that keep each class's share.

    Every class keeps at least one example on the training side; a class with two or more
    examples gets at least one on the validation side. Multi-label rows are grouped by their
    rarest label (rows without labels form their own group), which keeps rare labels in both
    parts. Both parts keep file order, and the same seed gives the same split.

    Args:
        examples: TextExamples. What to split.
        fraction: float. Share for validation, in (0, 1).
        seed: int. Seed of the shuffle inside each class. Defaults to `0`.
    """
    if examples.multi_label:
        frequency = examples.labels.sum(axis=0)
        rarity = np.where(examples.labels > 0, frequency[None, :], np.inf)
        strata = np.where(examples.labels.any(axis=1), rarity.argmin(axis=1), -1)
    else:
        strata = np.asarray(examples.labels)
    train_idx, val_idx = stratified_split(strata, fraction, seed)
    return examples.subset(train_idx), examples.subset(val_idx)


def make_text_dataset(
    texts: Sequence[str],
    labels: np.ndarray | Sequence[Any],
    preprocessor: Any = None,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = True,
) -> tf.data.Dataset:
    """A batched, cached, prefetched dataset of `(token dict, label)`, tokenized inside `tf.data`.

    Texts are tokenized once, in chunks, and the token ids are cached, so later epochs only
    read, shuffle and batch. For training that must resume mid-run, use `text_train_data`,
    whose shuffle order depends only on the epoch.

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
    """
    examples = _tokenized(texts, labels, preprocessor, cache)
    if shuffle:
        examples = examples.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
    return examples.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def text_train_data(
    examples: TextExamples,
    preprocessor: Any,
    *,
    batch_size: int,
    seed: int = 0,
    cache: bool | str = True,
) -> TrainData:
    """Training batches of `(token dict, label)` that can start at any epoch (for resume).

    Tokenizes once and caches like `make_text_dataset`; each epoch reshuffles with a seed made
    from `seed` and the epoch number (`tfxfer.data.pipeline.epoch_batches`).
    """
    tokenized = _tokenized(examples.texts, examples.labels, preprocessor, cache)
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
            .unbatch()
            # Unbatching hides the size; Keras warns "ran out of data" on datasets of unknown size.
            .apply(tf.data.experimental.assert_cardinality(len(texts)))
        )
    return maybe_cache(ds, cache)


def _decode_utf8(path: Path) -> str:
    """The file's text; non-UTF-8 bytes raise `DataError` naming their offset and line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"Text file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"Expected a file, but {str(path)!r} is a directory.") from None
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


def _read_table(
    path: Path, text_column: str, label_column: str
) -> list[tuple[int, str | None, Any]]:
    """Rows of `(line, text, raw label)` from a CSV, TSV or JSONL file."""
    suffix = path.suffix.lower()
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
                f"{path} has no column {missing[0]!r}. Columns found: {columns}. Pass "
                "`text_column=` / `label_column=` to name the right ones."
            )
        return [(reader.line_num, row[text_column], row[label_column]) for row in reader]
    except csv.Error as error:
        raise DataError(f"{path} line {reader.line_num} is not valid CSV: {error}") from None


def _read_jsonl(
    path: Path, content: str, text_column: str, label_column: str
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
                f"{path} line {line_number} has no key {missing[0]!r}. Keys found: {sorted(record)}. "
                "Pass `text_column=` / `label_column=` to name the right ones."
            )
        if record[text_column] is not None and not isinstance(record[text_column], str):
            raise DataError(
                f"{path} line {line_number}: expected the text to be a string. "
                f"Received: {record[text_column]!r}"
            )
        rows.append((line_number, record[text_column], record[label_column]))
    return rows


def _read_folder(
    directory: Path, *, must_fill_every_class: bool = False
) -> list[tuple[str, str, str]]:
    """Rows of `(file, text, class name)` from a one-subfolder-per-class folder."""
    if not directory.is_dir():
        raise DataError(f"Text folder {str(directory)!r} does not exist or is not a directory.")
    class_dirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{directory} has no class subfolders. Expected one subfolder of .txt files per class."
        )
    rows, empty_classes, ignored = [], [], 0
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        texts = [p for p in files if p.suffix.lower() == ".txt"]
        ignored += len(files) - len(texts)
        if not texts:
            empty_classes.append(class_dir.name)
        rows.extend((str(p), _decode_utf8(p), class_dir.name) for p in texts)
    if must_fill_every_class and empty_classes:
        raise DataError(f"Class folder(s) {empty_classes} in {directory} hold no .txt files.")
    if ignored:
        log.info("Ignored %d file(s) that are not .txt in %s", ignored, directory)
    return rows


# === Labels ===


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
) -> TextExamples:
    """Checks rows, skips empty texts and encodes labels (with `class_names` if given)."""
    texts, names_per_row, skipped = [], [], 0
    for where, text, raw_label in rows:
        if text is None or not text.strip():
            skipped += 1
            continue
        place = f"{source} line {where}" if isinstance(where, int) else str(where)
        texts.append(text)
        names_per_row.append(_label_names(raw_label, multi_label, separator, place))
    if skipped:
        log.warning(
            "Skipped %d example(s) with empty or whitespace-only text in %s", skipped, source
        )
    if not texts:
        raise DataError(f"{source} has no examples with text ({skipped} empty row(s) skipped).")
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
    return TextExamples(texts, labels, list(class_names), multi_label, source, skipped)


def _sorted_class_names(names: set[str]) -> list[str]:
    """Integer labels sorted by value (so 0..k-1 stay class ids 0..k-1), names alphabetically."""
    if names and all(_INTEGER.match(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _with_split(
    train: TextExamples,
    val: TextExamples | None,
    test: TextExamples | None,
    val_split: float,
    seed: int,
) -> TextData:
    if val is None and val_split:
        skipped = train.skipped_empty
        train, val = split_stratified(train, val_split, seed=seed)
        train.skipped_empty = skipped
        val = val if len(val) else None
    return TextData(train, val, test, train.class_names, train.multi_label)
