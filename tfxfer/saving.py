"""Saving and loading `.keras` model files, atomically, locally or on a `gs://` URL.

A `.keras` file is written under a temporary name and renamed into place, so an interrupted
save never leaves a half-written model where a good one was. On a `tf.io.gfile` URL Keras
cannot write or read a `.keras` zip in place: the model is saved to a local temporary file and
copied up under a temporary name, then renamed (a file rename is a copy and a delete on an
object store, but the old model stays until the new one is complete).

Loading hands Keras every class tfxfer saves into a model (`tfxfer.layers`) by its registered
name, so a file loads whichever tfxfer modules the caller happened to import.
"""

from __future__ import annotations

import os
import tempfile

import keras
import tensorflow as tf

from tfxfer import fs, layers
from tfxfer.errors import TfxferError

# The prefix of the temporary names tfxfer writes (as `tfxfer.rundir.TMP_PREFIX`, which
# also skips them in a run directory).
_TMP_PREFIX = ".tmp-"

# Every class a tfxfer model file may name, by the name the file carries.
CUSTOM_OBJECTS = {
    f"tfxfer>{name}": getattr(layers, name) for name in layers.__all__ if name != "FusionLayer"
}
# Runs saved before the rename (as `TextClassifier`, which read like keras-hub's own task
# class) still load.
CUSTOM_OBJECTS["tfxfer>TextClassifier"] = layers.RawTextModel


def save_model(model: keras.Model, path: str) -> str:
    """Saves `model` to a `.keras` file atomically."""
    if not path.endswith(".keras"):
        raise TfxferError(f"Expected a path ending in '.keras'. Received: {path!r}")
    if fs.is_url(path):
        return _save_model_to_url(model, path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, _TMP_PREFIX + os.path.basename(path))
    ensure_built(model)
    model.save(tmp)
    os.replace(tmp, path)
    return path


def _save_model_to_url(model: keras.Model, path: str) -> str:
    ensure_built(model)
    fs.makedirs(fs.dirname(path))
    tmp = fs.join(fs.dirname(path), _TMP_PREFIX + fs.basename(path))
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as local:
        local_file = os.path.join(local, "model.keras")
        model.save(local_file)
        tf.io.gfile.copy(local_file, tmp, overwrite=True)
    fs.rename(tmp, path)
    return path


def ensure_built(model: keras.Model) -> None:
    """Builds a `RawTextModel` (and, after loading, its preprocessor) by a first call."""
    if isinstance(model, layers.RawTextModel) and not (model.built and model.preprocessor.built):
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
    # keras-hub's classes (BERT's preprocessor, tokenizer, backbone) need no import here:
    # Keras imports a `keras_hub.*` module named in the file itself.
    if not fs.is_url(path):
        return _load(path, safe_mode)
    # Keras opens a `.keras` file as a local zip.
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX) as local:
        local_file = os.path.join(local, "model.keras")
        tf.io.gfile.copy(path, local_file)
        return _load(local_file, safe_mode)


def _load(path: str, safe_mode: bool) -> keras.Model:
    return keras.saving.load_model(
        path, custom_objects=CUSTOM_OBJECTS, compile=False, safe_mode=safe_mode
    )
