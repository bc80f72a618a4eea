"""Unlabelled texts for pretraining: a .txt of one text per line, a table column, or a folder.

Pretraining reads text without labels, in the forms people keep it in: a plain `.txt` file
with one text per line (a corpus dump), the text column of the same CSV/TSV/JSONL files the
text recipe reads (labels, if any, are ignored), or a folder of `.txt` files (one text per
file, read recursively, so a labelled class folder works too). Blank texts are skipped; a
corpus with no text left is an error, since pretraining on nothing would "succeed" silently.
"""

from __future__ import annotations

import logging
import os

from tfxfer import fs
from tfxfer.data.images import IMAGE_EXTENSIONS, decodes
from tfxfer.data.text_files import TEXT_FILE_SUFFIXES, decode_utf8, normalized_path, read_table
from tfxfer.errors import DataError

log = logging.getLogger(__name__)


def read_unlabelled_texts(
    source: str, *, text_column: str = "text", warn_blank: bool = False
) -> list[str]:
    """The non-blank texts of a corpus, in file order.

    Args:
        source: str. A `.txt` file (one text per line), a `.csv` / `.tsv` / `.jsonl` file (its
            `text_column`), or a folder (every visible `.txt` file under it, one text each).
        text_column: str. The column (JSON key) that holds the text in a table. Defaults to
            `"text"`.
        warn_blank: bool. Log a warning naming how many blank lines or rows were left out
            (where the texts' positions matter, as predictions'). Defaults to `False`.

    Returns:
        The texts, stripped of surrounding whitespace, blank ones left out.

    Raises:
        DataError: the source does not exist, is of another kind, lacks the column, or holds
            no text that is not blank.

    Example:

    ```python
    texts = read_unlabelled_texts("abstracts.txt")
    ```
    """
    path = normalized_path(str(source))
    if fs.isdir(path):
        files, _ = fs.visible_files(path)
        files = [f for f in files if f.lower().endswith(".txt")]
        if not files:
            raise DataError(
                f"The folder {str(source)!r} holds no .txt files. Expected a folder of .txt "
                "files (one text each), a .txt file with one text per line, or a CSV/JSONL file."
            )
        texts = [decode_utf8(f) for f in files]
    elif not fs.exists(path):
        raise DataError(f"The unlabelled corpus {str(source)!r} does not exist. Check the path.")
    elif os.path.splitext(path)[1].lower() == ".txt":
        texts = decode_utf8(path).splitlines()
    elif os.path.splitext(path)[1].lower() in TEXT_FILE_SUFFIXES:
        # The text column alone: any label column is irrelevant to pretraining.
        texts = [text or "" for _, text, _ in read_table(path, text_column, text_column)]
    else:
        raise DataError(
            f"Expected a .txt file, one of {TEXT_FILE_SUFFIXES} or a folder of .txt files. "
            f"Received: {str(source)!r}"
        )
    kept = [text.strip() for text in texts if text and text.strip()]
    if warn_blank and kept and len(kept) < len(texts):
        log.warning(
            "Skipped %d blank line(s) or row(s) of %s: the %d results are for the texts that "
            "are not blank, in their order.",
            len(texts) - len(kept),
            source,
            len(kept),
        )
    if not kept:
        raise DataError(
            f"{str(source)!r} holds no texts: every line or row in it is blank. Check the "
            "file (and --text-column)."
        )
    return kept


def list_unlabelled_images(directory: str, flag: str = "--data-dir") -> list[str]:
    """Every image file anywhere under `directory`, sorted; class subfolders mean nothing.

    Hidden files and folders are skipped, as the labelled loaders skip them; files that do
    not decode are skipped too (an unlabelled folder is often a dump of mixed files).

    Raises:
        DataError: the folder is missing or holds no readable image.
    """
    if not fs.isdir(directory):
        raise DataError(
            f"Image folder not found: {directory!r}. Pass {flag}, a folder of unlabelled "
            "images (in subfolders or not)."
        )
    files, _ = fs.visible_files(directory)
    paths = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS) and decodes(p)]
    if not paths:
        raise DataError(
            f"Image folder {directory!r} holds no readable images (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)} anywhere under it). Point {flag} at the "
            "folder your images are in."
        )
    return paths
