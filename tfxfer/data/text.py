"""Labelled text from CSV, TSV, JSONL files or class folders.

Loading is kept apart from tokenizing: the loaders return the shared `tfxfer.data.examples`
model (`Examples` of kind "text" whose inputs are the raw strings, `LabelledData` for the
train / val / test splits), checked row by row so that a bad file fails here with its name
and line, not later inside `tf.data`. Files are read by `tfxfer.data.text_files`; the
pipelines that tokenize and batch the texts are in `tfxfer.data.text_pipeline`, and their
functions (`make_text_dataset`, `text_train_data`) can still be imported from here.

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

import logging
import re
from typing import Any

import numpy as np

from tfxfer import fs
from tfxfer.data.buckets import bucket_lengths
from tfxfer.data.examples import Examples, LabelledData, with_validation_split
from tfxfer.data.text_files import (
    TEXT_FILE_SUFFIXES,
    normalized_path,
    read_folder_rows,
    read_table,
)
from tfxfer.data.text_pipeline import make_text_dataset, text_train_data
from tfxfer.errors import DataError

# Names other modules (and users) import from here; they live in the modules above.
__all__ = [
    "TEXT_FILE_SUFFIXES",
    "bucket_lengths",
    "load_texts",
    "make_text_dataset",
    "read_text_file",
    "read_text_folder",
    "text_train_data",
]

log = logging.getLogger(__name__)

_INTEGER = re.compile(r"^[+-]?\d+$")


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

    columns = {
        "text_column": text_column,
        "label_column": label_column,
        "multi_label": multi_label,
        "label_separator": label_separator,
    }
    train = _read_split(source, None, **columns)
    val_examples = _read_split(val, train.class_names, **columns) if val else None
    test_examples = _read_split(test, train.class_names, **columns) if test else None
    return with_validation_split(train, val_examples, test_examples, val_split=val_split, seed=seed)


def _read_split(
    path: str,
    class_names: list[str] | None,
    *,
    text_column: str,
    label_column: str,
    multi_label: bool,
    label_separator: str,
) -> Examples:
    """One split from a file or a class folder, whichever `path` is on disk."""
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
    rows = read_table(normalized_path(path), text_column, label_column)
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
    path = normalized_path(directory)
    rows, ignored = read_folder_rows(path, must_fill_every_class=class_names is None)
    if ignored:
        log.info("Ignored %d hidden or non-.txt file(s) and folder(s) in %s", ignored, path)
    examples = _to_examples(rows, str(directory), class_names, False, "|")
    examples.ignored = ignored
    return examples


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
    return Examples(
        texts,
        labels,
        list(class_names),
        "text",
        multi_label=multi_label,
        source=source,
        skipped=skipped,
    )


def _sorted_class_names(names: set[str]) -> list[str]:
    """Integer labels sorted by value (so 0..k-1 stay class ids 0..k-1), names alphabetically."""
    if names and all(_INTEGER.match(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)
