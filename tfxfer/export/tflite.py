"""Exporting a trained model as a TFLite flatbuffer, with a sidecar that describes it.

A TFLite export (`export_tflite`) is one flatbuffer file plus a `.tflite.json` sidecar that
says what the file takes and gives; the sidecar is written first and is what marks the file
as tfxfer's to replace.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import keras
import tensorflow as tf

from tfxfer import fs
from tfxfer.data.images import image_height_width
from tfxfer.errors import TfxferError
from tfxfer.layers.raw_text_model import RawTextModel
from tfxfer.rundir import TMP_PREFIX, listed_in_run_manifest
from tfxfer.runs import image_size_of, num_outputs
from tfxfer.saving import ensure_built
from tfxfer.startup import stderr_without

# `tfxfer export --quantize` and `export_tflite(quantize=)`: what each does to the weights.
QUANTIZATIONS = {
    "dynamic": "weights stored as int8, activations computed in float (about 1/4 the size)",
    "float16": "weights stored as float16 (about 1/2 the size; GPU delegates run it in fp16)",
    "int8": "weights and activations int8, calibrated on representative inputs (about 1/4 "
    "the size; for integer-only accelerators)",
}
# Beside every `.tflite` tfxfer writes (`model.tflite` -> `model.tflite.json`): what the file
# takes and gives, and the proof tfxfer wrote it. A `.tflite` without it is never replaced.
TFLITE_SIDECAR_SUFFIX = ".json"
# How many representative inputs int8 calibration reads at most: the converter's own advice
# is a few hundred; a hundred is enough for a classifier and keeps an export under a minute.
CALIBRATION_EXAMPLES = 100
# What the converter prints from C++ on every quantized conversion, whatever the log level
# ("fully_quantize: 0, inference_type: 6, ..."); a failed conversion shows everything.
CONVERTER_NOISE = re.compile(r"^fully_quantize: \d+, inference_type: ")


def tflite_file_name(quantize: str | None = None) -> str:
    """The file name an export gets inside a run: `model.tflite`, `model-int8.tflite`, ..."""
    return "model.tflite" if quantize is None else f"model-{quantize}.tflite"


def export_tflite(
    model: keras.Model,
    path: str,
    *,
    quantize: str | None = None,
    representative_data=None,
    input_size: int | list[int] | None = None,
    class_names: list[str] | None = None,
) -> str:
    """Converts a trained model to a TFLite flatbuffer, with its preprocessing inside if it can.

    An image model keeps its resize and the backbone's pixel convention inside, so the file
    takes raw uint8 RGB pixels, as the Keras model does. A TFLite interpreter needs a fixed
    input shape, though: the file takes `(batch, height, width, 3)` at `input_size`, which
    defaults to the size the model was trained at (the resize inside then changes nothing);
    pass your camera's frame size to have the file resize for you. The batch stays free
    (`Interpreter.resize_tensor_input`).

    A text model (a `RawTextModel`) cannot keep its tokenizer: keras-hub's WordPiece
    tokenizer runs tensorflow-text ops (`FastWordpieceTokenizeWithOffsets`,
    `RoundRobinTrim`) that are neither TFLite builtins nor TensorFlow ops the Select-TF-ops
    delegate carries, so the converter refuses them. The file takes the token ids, segment
    ids and padding mask instead, `(batch, sequence_length)` int32 each, and the sidecar
    JSON carries the vocabulary and the tokenizer's settings to make them with.

    Beside `path` goes `path + ".json"`: the input and output tensors, the quantization, the
    class names, and the tokenizer for text. An existing `path` is replaced only when tfxfer
    wrote it (that sidecar says so, or the run's manifest lists the file); anything else there
    is refused. Files are written under a temporary name and renamed into place.

    Args:
        model: keras.Model. The model to convert (for text, the `RawTextModel`).
        path: str. Where the `.tflite` file goes.
        quantize: str or None. None (float32), or one of `QUANTIZATIONS`: "dynamic",
            "float16", "int8". Defaults to `None`.
        representative_data: iterable or None. Inputs to calibrate "int8" with: uint8 images
            (arrays of any size, single or batched, or `(images, labels)` pairs; resized to
            the input size) or strings for a text model. At most `CALIBRATION_EXAMPLES` are
            read. Required for "int8" only. Defaults to `None`.
        input_size: int, [height, width] or None. Images only: the pixel size the file
            takes. Defaults to `None`: the model's own image size.
        class_names: list of str or None. Recorded in the sidecar. Defaults to `None`.

    Returns:
        `path`.

    Raises:
        TfxferError: an unknown quantization; "int8" without representative data; a model
            TFLite cannot take (several inputs, raw strings it tokenizes itself, a lexical
            `tfidf` branch); `path` is
            not a `.tflite` name, or exists and is not a file tfxfer wrote.

    Example:

    >>> export_tflite(model, "runs/photos/model-int8.tflite", quantize="int8",
    ...               representative_data=calibration_images)
    """
    path = str(path)
    _check_tflite_arguments(path, quantize, representative_data)
    network, signature, description = _tflite_signature(model, input_size)
    ensure_built(model)
    flatbuffer = _convert(
        network, signature, quantize, _calibration(model, signature, representative_data)
    )
    sidecar = {
        "written_by": "tfxfer",
        "about": "tfxfer wrote the .tflite file named below; a later export to that path "
        "replaces it. A .tflite file without this file beside it is never replaced.",
        "file": fs.basename(path),
        "quantize": quantize or "none",
        **description,
        "outputs": [{"name": "output_0", "dtype": "float32", "shape": [-1, num_outputs(model)]}],
        "class_names": list(class_names) if class_names is not None else None,
        "bytes": len(flatbuffer),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
    }
    # The sidecar first: a crash between the two leaves a file tfxfer may still replace.
    _write_atomically(path + TFLITE_SIDECAR_SUFFIX, (json.dumps(sidecar, indent=2) + "\n").encode())
    _write_atomically(path, flatbuffer)
    return path


def _check_tflite_arguments(path: str, quantize: str | None, representative_data) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise TfxferError(
            f"Expected `quantize` to be None or one of {sorted(QUANTIZATIONS)}. "
            f"Received: quantize={quantize!r}"
        )
    if not path.endswith(".tflite"):
        raise TfxferError(f"Expected a path ending in '.tflite'. Received: {path!r}")
    refuse_foreign_tflite_target(path)
    if quantize == "int8" and representative_data is None:
        raise TfxferError(
            "quantize='int8' needs representative inputs to calibrate the activations' ranges "
            "(`representative_data=`, or --calibration-data on the command line); 'dynamic' "
            "and 'float16' need none."
        )


def _convert(network: keras.Model, signature, quantize: str | None, calibration) -> bytes:
    """The flatbuffer of `network`'s `serve` endpoint, quantized as asked."""
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as local:
        archive = keras.export.ExportArchive()
        archive.track(network)
        archive.add_endpoint(
            "serve", lambda inputs: network(inputs, training=False), input_signature=[signature]
        )
        archive.write_out(local, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(local, signature_keys=["serve"])
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize == "int8":
            converter.representative_dataset = calibration
            # Integer kernels only: a model that needs a float op fails here, not on a device.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            with stderr_without(CONVERTER_NOISE):
                return converter.convert()
        except Exception as error:  # the converter's errors are many and pages long
            what = f"with quantize={quantize!r}" if quantize else "in float32"
            raise TfxferError(
                f"TFLite cannot convert this model {what}: {type(error).__name__}: "
                f"{_first_line(error)}. Try another --quantize (or none), or --format "
                "savedmodel."
            ) from error


def _tflite_signature(model: keras.Model, input_size):
    """What to convert, its input signature, and the sidecar's description of its inputs."""
    if isinstance(model, RawTextModel):
        return _text_signature(model)
    return _image_signature(model, input_size)


def _text_signature(model: RawTextModel):
    length = getattr(model.preprocessor, "sequence_length", None)
    tokenizer = getattr(model.preprocessor, "tokenizer", None)
    inputs = model.classifier.input
    if not isinstance(inputs, dict) or length is None or tokenizer is None:
        raise TfxferError(
            "TFLite export of this text model is not supported: tfxfer exports a BERT "
            "classifier on token ids, and this one's preprocessor has no tokenizer and "
            "sequence length to record. Use --format savedmodel."
        )
    if any(tensor.dtype == "string" for tensor in inputs.values()):
        raise TfxferError(
            "TFLite export of this text model is not supported: its lexical branch (tfidf) "
            "reads the raw strings, and TFLite's interpreter has no string ops to vectorize "
            "them. Use --format savedmodel, or train with a BERT backbone alone for TFLite."
        )
    signature = {
        name: tf.TensorSpec([None, int(length)], "int32", name=name) for name in sorted(inputs)
    }
    return model.classifier, signature, _text_description(model, signature, tokenizer, length)


def _image_signature(model: keras.Model, input_size):
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise TfxferError(
            f"TFLite export takes a model with one input; this one has {len(inputs)} "
            f"({', '.join(str(i.name) for i in inputs)}), as a fusion model over several "
            "inputs does. Use --format savedmodel."
        )
    if inputs[0].dtype == "string" or len(inputs[0].shape) != 4:
        raise TfxferError(
            "TFLite export cannot keep this model's preprocessing: it takes raw strings "
            "and tokenizes them itself (a TF-Hub text backbone's graph), which TFLite's "
            "interpreter cannot run. Use --format savedmodel."
            if inputs[0].dtype == "string"
            else f"TFLite export takes image models (a uint8 (batch, height, width, 3) "
            f"input) and tfxfer text models; this one's input is {inputs[0].dtype} of shape "
            f"{tuple(inputs[0].shape)}. Use --format savedmodel."
        )
    size = input_size if input_size is not None else image_size_of(model)
    if size is None:
        raise TfxferError(
            "TFLite needs a fixed input size, and this image model has no resizing layer to "
            "take it from. Pass input_size= (--input-size on the command line)."
        )
    height, width = image_height_width(size)
    signature = tf.TensorSpec([None, height, width, 3], "uint8", name="image")
    model_size = image_size_of(model)
    return (
        model,
        signature,
        {
            "kind": "image",
            "inputs": [{"name": "image", "dtype": "uint8", "shape": [-1, height, width, 3]}],
            "note": f"RGB pixels 0-255 at exactly {height}x{width} (TFLite needs a fixed "
            f"shape); resizing to the backbone's {model_size} and its pixel preprocessing are "
            "inside the file. The batch size is free (resize_tensor_input).",
        },
    )


def _text_description(model, signature, tokenizer, length) -> dict:
    settings = tokenizer.get_config()
    return {
        "kind": "text",
        "inputs": [
            {"name": name, "dtype": "int32", "shape": [-1, int(length)]} for name in signature
        ],
        "note": "Token ids, not strings: keras-hub's WordPiece tokenizer runs tensorflow-text "
        "ops that TFLite cannot. Tokenize with the vocabulary and settings below: lowercase "
        "(if set), split on whitespace and punctuation, WordPiece with suffix_indicator, then "
        "[CLS] tokens [SEP], truncated and padded with the pad token's id to "
        "sequence_length; segment_ids 0; padding_mask 1 for tokens and 0 for padding. In "
        "Python, keras_hub.models.BertTokenizer(vocabulary=..., lowercase=...) inside "
        "keras_hub.models.BertTextClassifierPreprocessor(..., sequence_length=...) does it.",
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "sequence_length": int(length),
            **{
                key: settings.get(key)
                for key in ("lowercase", "strip_accents", "split", "suffix_indicator", "oov_token")
            },
            **{
                key: getattr(tokenizer, key, None)
                for key in ("cls_token", "sep_token", "pad_token")
            },
            "vocabulary": list(tokenizer.get_vocabulary()),
        },
    }


def _calibration(model: keras.Model, signature, representative_data):
    """The converter's `representative_dataset`: a generator of one-example input lists."""

    def examples():
        yielded = 0
        for item in representative_data:
            if isinstance(model, RawTextModel):
                texts = [item] if isinstance(item, (str, bytes)) else list(item)
                tokens = model.preprocessor(tf.constant(texts))
                for i in range(len(texts)):
                    yield {
                        name: tf.cast(tokens[name][i : i + 1], "int32").numpy()
                        for name in signature
                    }
                    yielded += 1
                    if yielded >= CALIBRATION_EXAMPLES:
                        return
                continue
            images = item[0] if isinstance(item, (tuple, list)) else item
            images = tf.convert_to_tensor(images)
            if images.shape.rank == 3:
                images = images[None]
            height, width = signature.shape[1], signature.shape[2]
            if tuple(images.shape[1:3]) != (height, width):
                images = tf.image.resize(images, (height, width), antialias=True)
            images = tf.cast(
                tf.clip_by_value(tf.round(tf.cast(images, "float32")), 0, 255), "uint8"
            )
            for image in images:
                yield [image[None].numpy()]
                yielded += 1
                if yielded >= CALIBRATION_EXAMPLES:
                    return
        if not yielded:
            raise TfxferError("The representative data for int8 calibration holds no inputs.")

    return examples


def is_tfxfer_tflite(path: str) -> bool:
    """Whether `path` is a `.tflite` file tfxfer wrote (its sidecar says so, or a manifest)."""
    return fs.isfile(path) and (
        _sidecar_names(path + TFLITE_SIDECAR_SUFFIX, fs.basename(path))
        or listed_in_run_manifest(path)
    )


def refuse_foreign_tflite_target(path: str) -> None:
    """Raises `TfxferError` unless `path` and its sidecar are new or files tfxfer wrote."""
    sidecar = path + TFLITE_SIDECAR_SUFFIX
    for target, ours in (
        (path, lambda: is_tfxfer_tflite(path)),
        (sidecar, lambda: _sidecar_names(sidecar, None) or listed_in_run_manifest(sidecar)),
    ):
        if (fs.exists(target) or os.path.lexists(target)) and not (
            fs.isfile(target) and not os.path.islink(target) and ours()
        ):
            what = "a folder" if fs.isdir(target) else "a file"
            raise TfxferError(
                f"Refusing to export to {path!r}: {target!r} already exists as {what} that "
                "tfxfer did not write (tfxfer replaces only the .tflite files it exported, "
                f"each with its {TFLITE_SIDECAR_SUFFIX} beside it). Pick another --output "
                "path, or delete it yourself if you no longer need it."
            )


def _sidecar_names(sidecar: str, name: str | None) -> bool:
    """Whether `sidecar` is tfxfer's (and, given `name`, describes that file)."""
    if not fs.isfile(sidecar):
        return False
    try:
        with fs.open(sidecar) as handle:
            content = json.load(handle)
    except (OSError, ValueError, tf.errors.OpError):
        return False
    return (
        isinstance(content, dict)
        and content.get("written_by") == "tfxfer"
        and (name is None or content.get("file") == name)
    )


def _write_atomically(path: str, data: bytes) -> None:
    directory = fs.dirname(path)
    fs.makedirs(directory)
    tmp = fs.join(directory, f"{TMP_PREFIX}{fs.basename(path)}")
    try:
        fs.write_bytes(tmp, data)
        fs.rename(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.remove(tmp)
        raise


def _first_line(error: BaseException) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return text if len(text) <= 300 else text[:297] + "..."
