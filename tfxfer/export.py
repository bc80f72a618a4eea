"""Saving, loading and exporting trained models, atomically.

A `.keras` file is written under a temporary name and renamed into place, and a SavedModel
export goes to a temporary directory that is renamed when complete, so an interrupted save
never leaves a half-written model where a good one was.

On a `tf.io.gfile` URL (`gs://...`) Keras cannot write or read a `.keras` zip in place, and a
folder cannot be renamed safely (not every gfile filesystem moves what is in it). There the
model is saved to a local temporary file and copied up under a temporary name, then renamed
(a file rename is a copy and a delete on an object store, but the old model stays until the
new one is complete); an export is written to a local temporary directory, the old tfxfer
export at the target (and only one tfxfer wrote) is deleted, and the new tree is copied up.
An interrupted URL export can therefore leave a partial `export/`; exporting again replaces
it, since its marker file is written first.

A TFLite export (`export_tflite`) is one flatbuffer file plus a `.tflite.json` sidecar that
says what the file takes and gives; the sidecar is written first and is what marks the file
as tfxfer's to replace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

# Importing the layer modules registers tfxfer's serializable layers for `load_model`.
import tfxfer.backbones.vision  # noqa: F401
import tfxfer.fusion  # noqa: F401
import tfxfer.heads  # noqa: F401
import tfxfer.schedule  # noqa: F401
from tfxfer import fs
from tfxfer.batchnorm import batchnorm_layers
from tfxfer.data.datasets import data_backbone
from tfxfer.errors import TfxferError
from tfxfer.rundir import TMP_PREFIX, listed_in_run_manifest

# Written into every SavedModel tfxfer exports: an existing directory is replaced only when
# it holds this file. `assets.extra/` is the SavedModel convention for files that loaders
# (tf.saved_model.load, TF Serving) carry along and never interpret.
EXPORT_MARKER = os.path.join("assets.extra", "tfxfer_export.json")


def save_model(model: keras.Model, path: str) -> str:
    """Saves `model` to a `.keras` file atomically."""
    if not path.endswith(".keras"):
        raise TfxferError(f"Expected a path ending in '.keras'. Received: {path!r}")
    if fs.is_url(path):
        return _save_model_to_url(model, path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".tmp-" + os.path.basename(path))
    _ensure_built(model)
    model.save(tmp)
    os.replace(tmp, path)
    return path


def _save_model_to_url(model: keras.Model, path: str) -> str:
    _ensure_built(model)
    fs.makedirs(fs.dirname(path))
    tmp = fs.join(fs.dirname(path), ".tmp-" + fs.basename(path))
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as local:
        local_file = os.path.join(local, "model.keras")
        model.save(local_file)
        tf.io.gfile.copy(local_file, tmp, overwrite=True)
    fs.rename(tmp, path)
    return path


def _without_compile_config(config: dict) -> dict:
    # The wrapped classifier was compiled for training; a reloaded RawTextModel is for
    # inference, and recompiling it from the stored config would only warn about optimizer
    # state that does not fit.
    config = dict(config)
    config.pop("compile_config", None)
    return config


def _export_text(model: RawTextModel, directory: str) -> None:
    # Serving takes a batch of strings. Loading this SavedModel elsewhere needs
    # `import tensorflow_text` first: the BERT tokenizer's ops live there.
    archive = keras.export.ExportArchive()
    archive.track(model.classifier)
    archive.track(model.preprocessor)

    def serve(texts):
        return model.classifier(model.preprocessor(texts), training=False)

    archive.add_endpoint(
        "serve", serve, input_signature=[tf.TensorSpec([None], tf.string, name="text")]
    )
    archive.write_out(directory, verbose=False)


def _ensure_built(model: keras.Model) -> None:
    # A RawTextModel (and, after loading, its preprocessor) is built by a first call.
    if isinstance(model, RawTextModel) and not (model.built and model.preprocessor.built):
        model(tf.constant(["tfxfer"]))


def load_model(path: str, *, safe_mode: bool = True) -> keras.Model:
    """Loads a model saved by tfxfer (or any `.keras` file) for inference or more training.

    Args:
        path: str. A `.keras` file.
        safe_mode: bool. Keras' safe mode. A model with a TF-Hub backbone runs that
            SavedModel's graph when loaded, so it needs `safe_mode=False`: pass it only for
            files you trust. Defaults to `True`.
    """
    if not fs.isfile(path):
        raise TfxferError(f"Model file not found: {path!r}")
    import keras_hub  # noqa: F401  (registers keras-hub's layers, e.g. BERT's preprocessor)

    import tfxfer.backbones.hub  # noqa: F401  (registers HubLayer)

    if not fs.is_url(path):
        return keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    # Keras opens a `.keras` file as a local zip.
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as local:
        local_file = os.path.join(local, "model.keras")
        tf.io.gfile.copy(path, local_file)
        return keras.saving.load_model(local_file, compile=False, safe_mode=safe_mode)


def export_saved_model(model: keras.Model, directory: str) -> str:
    """Exports a TensorFlow SavedModel with a `serve` endpoint that takes raw inputs.

    For image models the endpoint takes a uint8 batch `(batch, height, width, 3)` of any
    height and width; resizing and the backbone's preprocessing happen inside. For a
    `RawTextModel` it takes a batch of strings; the tokenizer is inside.

    The export is written beside `directory` under a temporary name and renamed into place
    when complete. An existing `directory` is replaced only if tfxfer wrote it (it holds
    `assets.extra/tfxfer_export.json`, or it is a run's `export/` listed in the run's
    manifest): anything else there is the user's, and is refused rather than deleted. On a URL
    the export is written locally, tfxfer's old export is deleted and the new one copied up
    (see the module docstring).

    Args:
        model: keras.Model. The model to serve (for text, the `RawTextModel`).
        directory: str. Where the SavedModel goes.

    Returns:
        `directory`.

    Raises:
        TfxferError: `directory` exists and is a file, or a directory tfxfer did not export.
    """
    if fs.is_url(directory):
        return _export_to_url(model, str(directory))
    target = os.path.abspath(os.path.expanduser(str(directory)))
    _refuse_foreign_export_target(str(directory), target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    # A fresh name of our own: nothing the user has is ever cleared to make room for it.
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(target)}-", dir=parent)
    # mkdtemp makes it 0700; the export should have the mode `os.makedirs` would give it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        _export_complete(model, tmp)
        if os.path.exists(target):
            # Moved aside, not deleted first: a crash between the renames loses nothing.
            old = tempfile.mkdtemp(
                prefix=f"{TMP_PREFIX}old-{os.path.basename(target)}-", dir=parent
            )
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _export_complete(model: keras.Model, directory: str) -> None:
    """Writes the SavedModel and tfxfer's marker into local `directory`."""
    _ensure_built(model)
    with _frozen_batchnorm(model):
        if isinstance(model, RawTextModel):
            _export_text(model, directory)
        else:
            model.export(directory, format="tf_saved_model", verbose=False)
    _write_export_marker(directory)


@contextlib.contextmanager
def _frozen_batchnorm(model: keras.Model):
    """BatchNormalization layers frozen while `model` is exported, then as they were.

    A stage that trains BatchNorm (`Stage.train_batchnorm`, which a randomly initialised
    backbone's stages set) leaves its layers trainable, and Keras' `model.export` then
    traced them normalising with each served batch's own statistics (measured: a random
    ResNet50's served probabilities 0.69 away from `predict`'s). Frozen, they serve with
    their moving statistics, as `predict` does.
    """
    layers = [layer for layer in batchnorm_layers(model) if layer.trainable]
    for layer in layers:
        layer.trainable = False
    try:
        yield
    finally:
        for layer in layers:
            layer.trainable = True


def _export_to_url(model: keras.Model, target: str) -> str:
    target = target.rstrip("/")
    if fs.exists(target) and not is_tfxfer_export(target):
        what = "a directory" if fs.isdir(target) else "a file"
        raise TfxferError(
            f"Refusing to export to {target!r}: it already exists as {what} and is not a "
            f"SavedModel tfxfer exported (it has no {EXPORT_MARKER}). Pick another --output "
            f"path, or delete {target!r} yourself if you no longer need it."
        )
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as local:
        _export_complete(model, local)
        if fs.exists(target):
            fs.rmtree(target)
        # The marker goes up first, so a partial copy is still one tfxfer may replace.
        _copy_tree_up(local, target, first=EXPORT_MARKER)
    return target


def _copy_tree_up(local: str, target: str, first: str) -> None:
    fs.makedirs(target)
    files = []
    for root, folders, names in os.walk(local):
        for folder in folders:  # empty ones too (a SavedModel's `assets/`)
            relative = os.path.relpath(os.path.join(root, folder), local)
            fs.makedirs(fs.join(target, *relative.split(os.sep)))
        files += [os.path.relpath(os.path.join(root, name), local) for name in names]
    files.sort(key=lambda name: name != first)
    for name in files:
        destination = fs.join(target, *name.split(os.sep))
        fs.makedirs(fs.dirname(destination))
        tf.io.gfile.copy(os.path.join(local, name), destination, overwrite=True)


def is_tfxfer_export(directory: str) -> bool:
    """Whether `directory` is a SavedModel that tfxfer exported (and may replace)."""
    if fs.is_url(directory):
        path = str(directory).rstrip("/")
        if not fs.isdir(path):
            return False
        marker = fs.join(path, *EXPORT_MARKER.split(os.sep))
        return fs.isfile(marker) or listed_in_run_manifest(path)
    path = os.path.abspath(os.path.expanduser(str(directory)))
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, EXPORT_MARKER)) or listed_in_run_manifest(path)


def _refuse_foreign_export_target(given: str, target: str) -> None:
    if not os.path.lexists(target) or is_tfxfer_export(target):
        return
    what = "a directory" if os.path.isdir(target) else "a file"
    if os.path.isdir(target) and not os.path.islink(target):
        why = f"and is not a SavedModel tfxfer exported (it has no {EXPORT_MARKER})"
    else:
        why = "and tfxfer replaces only the export directories it wrote"
    raise TfxferError(
        f"Refusing to export to {given!r}: it already exists as {what} {why}. Pick another "
        f"--output path, or delete {given!r} yourself if you no longer need it."
    )


def _write_export_marker(directory: str) -> None:
    os.makedirs(os.path.join(directory, os.path.dirname(EXPORT_MARKER)), exist_ok=True)
    with open(os.path.join(directory, EXPORT_MARKER), "w", encoding="utf-8") as handle:
        json.dump(
            {
                "written_by": "tfxfer",
                "about": "tfxfer wrote this SavedModel; a later export to this path replaces "
                "it. A directory without this file is never replaced.",
                "keras": keras.__version__,
                "tensorflow": tf.__version__,
            },
            handle,
            indent=2,
        )
        handle.write("\n")


def serving_model(model: keras.Model, backbone) -> keras.Model:
    """What to save and serve: `model` itself, or for text the model behind its tokenizer.

    Args:
        model: keras.Model. As trained (a text model takes token dicts).
        backbone: Backbone, or the list of a fusion model's Backbones (they share one
            tokenizer; the one the data pipelines used is the one the model serves with).
    """
    backbone = data_backbone(backbone)
    if backbone.input_kind == "text" and backbone.preprocessor is not None:
        return RawTextModel(backbone.preprocessor, model, name="tfxfer_text_classifier")
    return model


@keras.saving.register_keras_serializable(package="tfxfer")
class RawTextModel(keras.Model):
    """A trained text model together with its tokenizer, so it takes raw strings.

    Training feeds token dicts tokenized inside `tf.data` (fast); this wrapper puts the same
    preprocessor in front of the same classifier, so the saved model gives the training-time
    predictions from raw text. Token dicts pass straight through.

    Args:
        preprocessor: keras.layers.Layer. The backbone's preprocessor (strings to token dict).
        classifier: keras.Model. The trained model that takes token dicts.

    Example:

    >>> serving = RawTextModel(backbone.preprocessor, model)  # or serving_model(model, backbone)
    >>> serving.predict(["the match went to extra time"])
    """

    def __init__(self, preprocessor, classifier, **kwargs):
        super().__init__(**kwargs)
        self.preprocessor = preprocessor
        self.classifier = classifier

    def build(self, input_shape=None):
        # Nothing to create: the classifier is built. (Keras' default would trace `call` on
        # float zeros, which the tokenizer rejects.)
        self.built = True

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict):
            inputs = self.preprocessor(inputs)
        return self.classifier(inputs, training=training)

    def predict(self, x, *args, **kwargs):
        # Python lists and numpy unicode arrays are what users pass; tf.data wants tf.string.
        if isinstance(x, str):
            x = [x]
        if isinstance(x, (list, tuple)) or (
            hasattr(x, "dtype") and getattr(x.dtype, "kind", "") == "U"
        ):
            x = tf.constant([str(t) for t in x], tf.string)
        return super().predict(x, *args, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "preprocessor": keras.layers.serialize(self.preprocessor),
            "classifier": _without_compile_config(keras.layers.serialize(self.classifier)),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["preprocessor"] = keras.layers.deserialize(config["preprocessor"])
        config["classifier"] = keras.layers.deserialize(config["classifier"])
        return cls(**config)


# Runs saved before the rename (as `TextClassifier`, which read like keras-hub's own task
# class) still load.
keras.saving.get_custom_objects()["tfxfer>TextClassifier"] = RawTextModel


# === TFLite ===

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


def tflite_file_name(quantize: str | None = None) -> str:
    """The file name an export gets inside a run: `model.tflite`, `model-int8.tflite`, ..."""
    return "model.tflite" if quantize is None else f"model-{quantize}.tflite"


def image_size_of(model: keras.Model) -> int | list[int] | None:
    """The side (or `[height, width]`) an image model resizes its input to; None if none."""
    for layer in model._flatten_layers(include_self=False):
        size = getattr(layer, "image_size", None)
        if size is not None:
            return size
        if isinstance(layer, keras.layers.Resizing):
            return [int(layer.height), int(layer.width)]
    return None


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
            TFLite cannot take (several inputs, raw strings it tokenizes itself); `path` is
            not a `.tflite` name, or exists and is not a file tfxfer wrote.

    Example:

    >>> export_tflite(model, "runs/photos/model-int8.tflite", quantize="int8",
    ...               representative_data=calibration_images)
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise TfxferError(
            f"Expected `quantize` to be None or one of {sorted(QUANTIZATIONS)}. "
            f"Received: quantize={quantize!r}"
        )
    path = str(path)
    if not path.endswith(".tflite"):
        raise TfxferError(f"Expected a path ending in '.tflite'. Received: {path!r}")
    refuse_foreign_tflite_target(path)
    if quantize == "int8" and representative_data is None:
        raise TfxferError(
            "quantize='int8' needs representative inputs to calibrate the activations' ranges "
            "(`representative_data=`, or --calibration-data on the command line); 'dynamic' "
            "and 'float16' need none."
        )
    network, signature, description = _tflite_signature(model, input_size)
    _ensure_built(model)
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
            converter.representative_dataset = _calibration(model, signature, representative_data)
            # Integer kernels only: a model that needs a float op fails here, not on a device.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            flatbuffer = converter.convert()
        except Exception as error:  # the converter's errors are many and pages long
            what = f"with quantize={quantize!r}" if quantize else "in float32"
            raise TfxferError(
                f"TFLite cannot convert this model {what}: {type(error).__name__}: "
                f"{_first_line(error)}. Try another --quantize (or none), or --format "
                "savedmodel."
            ) from error
    sidecar = {
        "written_by": "tfxfer",
        "about": "tfxfer wrote the .tflite file named below; a later export to that path "
        "replaces it. A .tflite file without this file beside it is never replaced.",
        "file": fs.basename(path),
        "quantize": quantize or "none",
        **description,
        "outputs": [{"name": "output_0", "dtype": "float32", "shape": [-1, _num_outputs(model)]}],
        "class_names": list(class_names) if class_names is not None else None,
        "bytes": len(flatbuffer),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
    }
    # The sidecar first: a crash between the two leaves a file tfxfer may still replace.
    _write_atomically(path + TFLITE_SIDECAR_SUFFIX, (json.dumps(sidecar, indent=2) + "\n").encode())
    _write_atomically(path, flatbuffer)
    return path


def _tflite_signature(model: keras.Model, input_size):
    """What to convert, its input signature, and the sidecar's description of its inputs."""
    if isinstance(model, RawTextModel):
        length = getattr(model.preprocessor, "sequence_length", None)
        tokenizer = getattr(model.preprocessor, "tokenizer", None)
        inputs = model.classifier.input
        if not isinstance(inputs, dict) or length is None or tokenizer is None:
            raise TfxferError(
                "TFLite export of this text model is not supported: tfxfer exports a BERT "
                "classifier on token ids, and this one's preprocessor has no tokenizer and "
                "sequence length to record. Use --format savedmodel."
            )
        signature = {
            name: tf.TensorSpec([None, int(length)], "int32", name=name) for name in sorted(inputs)
        }
        return model.classifier, signature, _text_description(model, signature, tokenizer, length)
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
    from tfxfer.data.images import image_height_width

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


def _num_outputs(model: keras.Model) -> int:
    model = model.classifier if isinstance(model, RawTextModel) else model
    return int(model.outputs[0].shape[-1])


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
