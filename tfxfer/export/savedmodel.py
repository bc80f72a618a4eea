"""Exporting a trained model as a TensorFlow SavedModel that takes raw inputs, atomically.

An export goes to a temporary directory that is renamed when complete, so an interrupted
export never leaves a half-written model where a good one was. On a `tf.io.gfile` URL
(`gs://...`) a folder cannot be renamed safely (not every gfile filesystem moves what is in
it): the export is written to a local temporary directory, the old tfxfer export at the
target (and only one tfxfer wrote) is deleted, and the new tree is copied up. An interrupted
URL export can therefore leave a partial `export/`; exporting again replaces it, since its
marker file is written first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile

import keras
import tensorflow as tf

from tfxfer import fs
from tfxfer.batchnorm import batchnorm_layers
from tfxfer.data.datasets import data_backbone
from tfxfer.errors import TfxferError
from tfxfer.layers.raw_text_model import RawTextModel
from tfxfer.rundir import TMP_PREFIX, listed_in_run_manifest
from tfxfer.saving import ensure_built

# Written into every SavedModel tfxfer exports: an existing directory is replaced only when
# it holds this file. `assets.extra/` is the SavedModel convention for files that loaders
# (tf.saved_model.load, TF Serving) carry along and never interpret.
EXPORT_MARKER = os.path.join("assets.extra", "tfxfer_export.json")
# In an export's temporary directory while it is written: the process writing it. A later
# export into the same place removes temporary directories whose writer is gone (killed).
OWNER_FILE = ".tfxfer-export-owner.json"

log = logging.getLogger(__name__)


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
    _remove_stale_temporaries(parent, os.path.basename(target))
    # A fresh name of our own: nothing the user has is ever cleared to make room for it.
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(target)}-", dir=parent)
    # mkdtemp makes it 0700; the export should have the mode `os.makedirs` would give it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        with open(os.path.join(tmp, OWNER_FILE), "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        _export_complete(model, tmp)
        os.remove(os.path.join(tmp, OWNER_FILE))
        if os.path.exists(target):
            # Moved aside, not deleted first: a crash between the renames loses nothing.
            old = tempfile.mkdtemp(
                prefix=f"{TMP_PREFIX}old-{os.path.basename(target)}-", dir=parent
            )
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)  # done; what is left goes next time
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _remove_stale_temporaries(parent: str, name: str) -> None:
    """Removes what an export into `parent/name` killed mid-way (SIGKILL, power loss) left.

    Only tfxfer's own temporary directories go: `.tmp-NAME-*` whose owner file names a
    process of this host that no longer runs, and `.tmp-old-NAME-*` (an earlier export moved
    aside) holding tfxfer's export marker, once `NAME` itself exists again. Anything else is
    left alone, including a temporary directory another live export is writing.
    """
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    # mkdtemp's names: the prefix, then 8 characters of its alphabet. Exactly this name's:
    # `.tmp-old-export-v2-...` is another export's, not `export`'s.
    ours = re.compile(rf"{re.escape(TMP_PREFIX)}(old-)?{re.escape(name)}-[a-z0-9_]{{8}}")
    for entry in entries:
        path = os.path.join(parent, entry)
        match = ours.fullmatch(entry)
        if match is None:
            continue
        if match.group(1):
            stale = os.path.isdir(os.path.join(parent, name)) and _holds_tfxfer_export(path)
        else:
            stale = _writer_is_gone(os.path.join(path, OWNER_FILE))
        if stale and os.path.isdir(path):
            log.info("Removing %r, which an interrupted export left.", path)
            shutil.rmtree(path, ignore_errors=True)


def _holds_tfxfer_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_MARKER))


def _writer_is_gone(owner_file: str) -> bool:
    """Whether the export that wrote `owner_file` ran on this host and has ended."""
    try:
        with open(owner_file, encoding="utf-8") as handle:
            owner = json.load(handle)
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours to judge: no readable owner
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _export_complete(model: keras.Model, directory: str) -> None:
    """Writes the SavedModel and tfxfer's marker into local `directory`."""
    ensure_built(model)
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
