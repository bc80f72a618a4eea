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
"""

from __future__ import annotations

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
    if isinstance(model, RawTextModel):
        _export_text(model, directory)
    else:
        model.export(directory, format="tf_saved_model", verbose=False)
    _write_export_marker(directory)


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
