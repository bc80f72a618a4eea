"""Saving, loading and exporting trained models, atomically.

A `.keras` file is written under a temporary name and renamed into place, and a SavedModel
export goes to a temporary directory that is renamed when complete, so an interrupted save
never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import os
import shutil

import keras

# Importing the layer modules registers tfxfer's serializable layers for `load_model`.
import tfxfer.backbones.vision  # noqa: F401
import tfxfer.heads  # noqa: F401
import tfxfer.schedule  # noqa: F401
from tfxfer.errors import TfxferError


def save_model(model: keras.Model, path: str) -> str:
    """Saves `model` to a `.keras` file atomically."""
    if not path.endswith(".keras"):
        raise TfxferError(f"Expected a path ending in '.keras'. Received: {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".tmp-" + os.path.basename(path))
    model.save(tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str) -> keras.Model:
    """Loads a model saved by tfxfer (or any `.keras` file) for inference or more training."""
    if not os.path.exists(path):
        raise TfxferError(f"Model file not found: {path!r}")
    return keras.saving.load_model(path, compile=False)


def export_saved_model(model: keras.Model, directory: str) -> str:
    """Exports a TensorFlow SavedModel with a `serve` endpoint that takes raw inputs.

    For image models the endpoint takes a uint8 batch `(batch, height, width, 3)` of any
    height and width; resizing and the backbone's preprocessing happen inside.
    """
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, ".tmp-" + os.path.basename(os.path.abspath(directory)))
    shutil.rmtree(tmp, ignore_errors=True)
    model.export(tmp, format="tf_saved_model", verbose=False)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
