"""Predictions for many inputs at once: what `tfxfer predict` reads, runs and writes.

Inputs are what a user has at hand: image files, folders of images (read recursively, in
sorted order), texts typed on the command line, or CSV/TSV/JSONL/TXT files of texts. They are
checked against what the model takes before anything runs (a text for an image model, a
photo for a text model), and predicted in batches: images are decoded and resized one batch
at a time, so a folder of thousands never sits in memory whole. Every prediction is made
before the first line is printed or written, so a corrupt file halfway through ends in one
error, not in half an output a script would have to throw away.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any

import numpy as np
import tensorflow as tf

from tfxfer import fs, runs
from tfxfer.data.images import IMAGE_EXTENSIONS, decode_and_resize
from tfxfer.data.unlabelled import list_unlabelled_images, read_unlabelled_texts
from tfxfer.errors import DataError, TfxferError
from tfxfer.export import CALIBRATION_EXAMPLES
from tfxfer.fs import atomic_write_text

# Files of texts: a table's text column, or a .txt file's lines.
TEXT_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".txt")
OUTPUT_SUFFIXES = (".csv", ".jsonl")
# The widest an input is shown in the table; a long text is cut with "...".
_TABLE_INPUT_WIDTH = 48


def gather_inputs(given: list[str], kind: str, *, text_column: str = "text") -> list[str]:
    """The image paths or texts to predict, from what the user gave, in order.

    Args:
        given: list of str. Image files and folders (for an image model), or texts and files
            of texts (for a text model).
        kind: str. "image" or "text": what the model takes.
        text_column: str. The column (JSON key) that holds the text in a CSV/TSV/JSONL file.
            Defaults to `"text"`.

    Raises:
        DataError: an input of the other modality, a missing file, a folder without images,
            a file of texts that cannot be read or lacks the column.
    """
    found: list[str] = []
    for item in given:
        found += _image_inputs(item) if kind == "image" else _text_inputs(item, text_column)
    return found


def _image_inputs(item: str) -> list[str]:
    if fs.isdir(item):
        files, _ = fs.visible_files(item)
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise DataError(
                f"{item!r} is a folder with no images in it (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)} anywhere under it). Pass a folder of images, "
                "or image files."
            )
        return images
    if fs.isfile(item):
        if item.lower().endswith(TEXT_FILE_SUFFIXES):
            raise DataError(
                f"{item!r} is a file of texts, but this model takes images. Pass image files "
                "or folders, or predict texts with a text run."
            )
        return [item]
    if item.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f"Image not found: {item!r}.")
    raise DataError(
        f"{_shown(item)!r} is neither an image file nor a folder, and this model takes images. "
        "Pass image files or folders of images (texts need a text run)."
    )


def _text_inputs(item: str, text_column: str) -> list[str]:
    lowered = item.lower()
    if fs.isdir(item) or (fs.isfile(item) and lowered.endswith(IMAGE_EXTENSIONS)):
        what = "a folder" if fs.isdir(item) else "an image"
        raise DataError(
            f"{item!r} is {what}, but this model takes texts. Pass texts, or CSV/JSONL/TXT "
            "files of texts (images need an image run)."
        )
    if lowered.endswith(TEXT_FILE_SUFFIXES):
        if not fs.exists(item):
            raise DataError(f"Text file not found: {item!r}.")
        return read_unlabelled_texts(item, text_column=text_column, warn_blank=True)
    if lowered.endswith(IMAGE_EXTENSIONS):
        raise DataError(f"{item!r} names an image (which does not exist); this model takes texts.")
    if fs.isfile(item):
        # An existing file is not a text to classify: its path would be, silently.
        raise DataError(
            f"{item!r} is a file, but not one tfxfer reads texts from (it reads "
            f"{', '.join(TEXT_FILE_SUFFIXES)}; a .txt holds one text a line). Convert it, or "
            "pass the texts themselves."
        )
    return [item]


def text_tensor(texts) -> tf.Tensor:
    """Texts as one string tensor: what every text model takes, the ones that take raw
    strings in their first layer (`tfidf`, TF-IDF Hub models) as well as those wrapped with
    their tokenizer (Keras' `predict` refuses Python lists and numpy unicode arrays there)."""
    return tf.constant([str(text) for text in texts], tf.string)


def predict_all(
    model, kind: str, inputs: list[str], *, batch_size: int, image_size=None
) -> np.ndarray:
    """The model's outputs for every input, `(len(inputs), num_outputs)`, batch by batch.

    Images are decoded and resized to `image_size` as training read them
    (`tfxfer.data.images.decode_and_resize`), `batch_size` at a time; a file that does not
    decode raises `DataError` naming it. Texts go to `model.predict` in one batched call.
    """
    if batch_size < 1:
        raise TfxferError(f"Expected --batch-size to be a positive integer. Received: {batch_size}")
    if kind == "text":
        return np.asarray(model.predict(text_tensor(inputs), batch_size=batch_size, verbose=0))
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = np.stack(
            [_read_image(path, image_size) for path in inputs[start : start + batch_size]]
        )
        outputs.append(np.asarray(model.predict_on_batch(batch)))
    return np.concatenate(outputs)


def _read_image(path: str, image_size) -> np.ndarray:
    try:
        return decode_and_resize(path, image_size).numpy()
    except tf.errors.OpError as error:
        # TensorFlow's own words, without the op and device names around them.
        reason = re.sub(r"\{\{[^}]*\}\}", "", " ".join(str(error.message).split()))
        reason = re.sub(r"\s*\[Op:.*$", "", reason).strip()[:300]
        raise DataError(
            f"Cannot read {path!r} as an image ({reason}). Pass a JPEG, PNG, BMP or GIF file."
        ) from None


def top_k(probabilities: np.ndarray, class_names: list[str] | None, k: int) -> list[list[tuple]]:
    """The `k` most probable `(label, probability)` pairs of each row, best first."""
    if k < 1:
        raise TfxferError(f"Expected --top-k to be a positive integer. Received: {k}")
    k = min(k, probabilities.shape[-1])
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [
        [(class_names[i] if class_names else int(i), float(row[i])) for i in best]
        for row, best in zip(probabilities, order, strict=True)
    ]


def records(inputs: list[str], tops: list[list[tuple]]) -> list[dict[str, Any]]:
    """One JSON-able record per input: its best label and probability, and the top k."""
    return [
        {
            "input": name,
            "label": best[0][0],
            "probability": best[0][1],
            "top_k": [{"label": label, "probability": p} for label, p in best],
        }
        for name, best in zip(inputs, tops, strict=True)
    ]


def table(rows: list[dict[str, Any]]) -> str:
    """A table for a person: one line per input, its top labels with probabilities."""
    shown = [_shown(row["input"]) for row in rows]
    width = max([len("input"), *map(len, shown)])
    lines = [f"{'input':<{width}}  top labels (probability)"]
    for name, row in zip(shown, rows, strict=True):
        labels = "  ".join(f"{c['label']} ({c['probability']:.3f})" for c in row["top_k"])
        lines.append(f"{name:<{width}}  {labels}")
    return "\n".join(lines)


def _shown(text: str) -> str:
    """`text` on one line, cut to the table's width: a path keeps its end (the file name),
    a text its beginning."""
    text = " ".join(str(text).split())
    if len(text) <= _TABLE_INPUT_WIDTH:
        return text
    if os.sep in text and " " not in text:
        return "..." + text[-(_TABLE_INPUT_WIDTH - 3) :]
    return text[: _TABLE_INPUT_WIDTH - 3] + "..."


def check_output(path: str, *, overwrite: bool) -> None:
    """Raises `TfxferError` for an output of another kind, or one that exists without leave."""
    if not path.lower().endswith(OUTPUT_SUFFIXES):
        raise TfxferError(
            f"Expected --output to end in .csv or .jsonl (the format follows the extension). "
            f"Received: {path!r}"
        )
    if fs.isdir(path):
        raise TfxferError(f"--output {path!r} is a folder. Pass a file name, e.g. preds.csv.")
    if fs.exists(path) and not overwrite:
        raise TfxferError(
            f"Refusing to replace {path!r}: it already exists. Pass --overwrite to replace it, "
            "or choose another --output."
        )


def write_predictions(path: str, rows: list[dict[str, Any]]) -> None:
    """Writes `rows` as CSV (input, label, probability, label_2, probability_2, ...) or JSONL."""
    if path.lower().endswith(".jsonl"):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        k = max((len(row["top_k"]) for row in rows), default=1)
        header = ["input", "label", "probability"]
        for rank in range(2, k + 1):
            header += [f"label_{rank}", f"probability_{rank}"]
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(header)
        for row in rows:
            cells = [row["input"]]
            for choice in row["top_k"]:
                cells += [choice["label"], f"{choice['probability']:.6f}"]
            writer.writerow(cells)
        text = buffer.getvalue()
    atomic_write_text(os.fspath(path), text)


# === Inputs for int8 calibration (tfxfer export --quantize int8) ===


def calibration_source(calibration_data: str | None, run_dir: str) -> str:
    """Where int8 calibration reads inputs: `calibration_data`, else the run's training data.

    Args:
        calibration_data: str or None. --calibration-data: a folder of images or a file
            of texts.
        run_dir: str. The run's folder, whose config.json names its training data.
    """
    if calibration_data:
        if not os.path.exists(calibration_data):
            raise TfxferError(
                f"--calibration-data {calibration_data!r} does not exist. Pass a folder of "
                "images (image runs) or a CSV/JSONL/TXT file of texts (text runs)."
            )
        return calibration_data
    config = runs.read_config(run_dir)
    source = config.get("data_dir") or config.get("train")
    fix = (
        "Pass --calibration-data DIR (images) or FILE (texts) with typical inputs, or use "
        "--quantize dynamic, which needs none."
    )
    if not source:
        raise TfxferError(
            "--quantize int8 calibrates on representative inputs, and there are none: "
            f"{os.path.join(run_dir, 'config.json')!r} names no training data (data_dir or "
            f"train). {fix}"
        )
    if not os.path.exists(source):
        raise TfxferError(
            "--quantize int8 calibrates on the run's training data, and it cannot be read: "
            f"config.json names {source!r}, which does not exist here. {fix}"
        )
    return source


def calibration_inputs(source: str, kind: str, run_dir: str, image_size):
    """Up to `CALIBRATION_EXAMPLES` inputs spread over `source` (images read lazily)."""
    if kind == "image":
        if not os.path.isdir(source):
            raise TfxferError(
                f"Calibration data {source!r} is a file; an image model calibrates on a folder "
                "of images. Pass --calibration-data DIR."
            )
        inputs = list_unlabelled_images(source, flag="--calibration-data")
    else:
        column = runs.read_config(run_dir).get("text_column") or "text"
        inputs = read_unlabelled_texts(source, text_column=column)
    # Every k-th, so that each class of a sorted class folder takes part.
    spread = inputs[:: max(1, len(inputs) // CALIBRATION_EXAMPLES)][:CALIBRATION_EXAMPLES]
    if kind == "text":
        return spread
    return (decode_and_resize(path, image_size).numpy() for path in spread)
