"""Reading text files: CSV, TSV and JSONL rows, class folders of `.txt` files, UTF-8 checks.

The labelled loader (`tfxfer.data.text`) and the unlabelled one (`tfxfer.data.unlabelled`)
read files the same way, so both fail alike on a bad file: with its name and line, here, not
later inside `tf.data`. A CSV row with more fields than its header (an unquoted comma inside a
text makes one), bytes that are not UTF-8, a line that is not JSON or a missing column raise
`DataError`. Rows come back raw, as `(line or file, text, raw label)`; checking texts and
labels is the loader's job.

In a class folder, each class subfolder is read recursively: its `.txt` files and those of
its subfolders, in sorted order. Files and folders whose name starts with "." are skipped and
counted with the files that are not `.txt`; links to folders are not followed (they can loop)
and are counted too.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import tensorflow as tf

from tfxfer import fs
from tfxfer.errors import DataError

TEXT_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
# Users name columns on the command line or in Python; the hint names both.
_COLUMN_HINT = (
    "Pass --text-column / --label-column (text_column= / label_column= in Python) to name "
    "the right ones."
)


def normalized_path(path: str) -> str:
    """A local path as `pathlib` spells it (the form error messages show); a URL unchanged.

    `Path` would fold a URL's "//" into one "/", so URLs (`gs://...`) stay strings and are read
    through `fs`.
    """
    return str(path) if fs.is_url(path) else str(Path(path))


def decode_utf8(path: str) -> str:
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
        # A UTF-16 file starts with its byte-order mark; anything else is most often Latin-1.
        source = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin1"
        raise DataError(
            f"{path} is not UTF-8: byte {offset} (line {line}) is 0x{data[offset]:02x}. "
            f"Re-save the file as UTF-8 (e.g. `iconv -f {source} -t utf-8`)."
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


def read_table(path: str, text_column: str, label_column: str) -> list[tuple[int, str | None, Any]]:
    """Rows of `(line, text, raw label)` from a CSV, TSV or JSONL file."""
    suffix = os.path.splitext(fs.basename(path))[1].lower()
    if suffix not in TEXT_FILE_SUFFIXES:
        raise DataError(
            f"Expected a text file ending in one of {TEXT_FILE_SUFFIXES}. Received: {str(path)!r}"
        )
    content = decode_utf8(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, content, text_column, label_column)
    reader = csv.DictReader(
        io.StringIO(content, newline=""), delimiter="\t" if suffix == ".tsv" else ","
    )
    try:
        columns = reader.fieldnames or []
        _check_unique_columns(path, columns)
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


def _check_unique_columns(path: str, columns: list[str]) -> None:
    """Raises `DataError` when the header names a column twice: `csv.DictReader` would keep
    the last of the two and drop the other's values without a word."""
    seen: set[str] = set()
    for column in columns:
        if column in seen and column.strip():
            raise DataError(
                f"{path} line 1 names the column {column!r} twice ({', '.join(columns)}): "
                "only one of them could be read. Rename one of the columns."
            )
        seen.add(column)


def _check_field_count(
    path: str, reader: csv.DictReader, row: dict[str | None, Any], needed: tuple[str, str]
) -> None:
    """Raises `DataError` for a row with more fields than the header, or too few for `needed`.

    `csv.DictReader` would otherwise take an unquoted delimiter inside a text or a label
    ("the match went on, and on") as the end of a field: it keeps the row's first fields,
    puts the rest aside under the key None, and the label silently becomes a piece of text.
    Extra fields that are all empty (a trailing delimiter) lose nothing and are allowed, as
    are short rows that hold nothing at all (a blank spreadsheet row), which the loader
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


def read_folder_rows(
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
        rows.extend((p, decode_utf8(p), name) for p in texts)
    if must_fill_every_class and empty_classes:
        raise DataError(f"Class folder(s) {empty_classes} in {directory} hold no .txt files.")
    return rows, ignored
