"""A finished run read back: its model, class names and config, and what its model takes.

A run directory holds what a finished run wrote: `model.keras` (written when its last stage
ends), `class_names.json` and `config.json`. The `tfxfer` command's predict, evaluate and
export read one back through these functions, which check each file cheaply before anything
slow and turn every way a file can be wrong (missing, a folder, not JSON, a truncated zip, the
class names of another run) into a `TfxferError` saying what to pass instead.

Reading one back, in order: `resolve_run` (the paths, cheap), `load_model`, then
`check_kind` / `input_kind`, `run_class_names` or `read_class_names`, `image_size` and
`read_config`; `run_entry` records a file an export adds to the run.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from tfxfer import fs
from tfxfer.boundary import one_line
from tfxfer.errors import TfxferError
from tfxfer.layers import RawTextModel
from tfxfer.rundir import MANIFEST, RUN_MARKERS, RunDir
from tfxfer.saving import load_model as load_keras_file

MODEL_FILE = "model.keras"
CLASS_NAMES_FILE = "class_names.json"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"


def check_model_path(path: str) -> None:
    """Cheap checks of a model path (--model), made before anything slow."""
    if not fs.exists(path):
        raise TfxferError(f"Model file not found: {path!r}. Pass the model.keras a run wrote.")
    if fs.isdir(path):
        raise TfxferError(
            f"--model {path!r} is a folder. Pass the model.keras file a run wrote, e.g. "
            "runs/photos/model.keras (a SavedModel export/ folder is for serving, not for "
            "this command)."
        )


def _is_zip(path: str) -> bool:
    if not fs.is_url(path):
        return zipfile.is_zipfile(path)
    with fs.open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def load_model(path: str):
    """The model in `path`, or a `TfxferError` that says what the file is not."""
    check_model_path(path)
    if path.endswith(".keras") and not _is_zip(path):
        raise TfxferError(
            f"--model {path!r} is not a Keras model: a .keras file is a zip archive, and this "
            "one is not (or is truncated). Pass the model.keras a tfxfer run wrote, or copy it "
            "again if the copy was cut short."
        )
    try:
        return load_keras_file(path)
    except TfxferError:
        raise
    except Exception as error:  # a damaged or foreign file fails in many ways
        raise TfxferError(
            f"Cannot load --model {path!r} as a Keras model ({type(error).__name__}: "
            f"{one_line(error)}). Pass the model.keras file a tfxfer run wrote; if it is "
            "one, it may be truncated: copy it again."
        ) from error


def _is_raw_text_model(model) -> bool:
    return isinstance(model, RawTextModel)


def input_kind(model) -> str | None:
    """ "image" or "text": what a loaded tfxfer model takes; None if it cannot be told."""
    if _is_raw_text_model(model):
        return "text"
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        return None
    if inputs[0].dtype == "string":
        return "text"
    if len(inputs[0].shape) == 4:
        return "image"
    return None


def num_outputs(model) -> int | None:
    """The number of outputs (classes) of a loaded model; None if it has not one output."""
    if _is_raw_text_model(model):
        model = model.classifier
    outputs = getattr(model, "outputs", None) or []
    return int(outputs[0].shape[-1]) if len(outputs) == 1 else None


def check_kind(model, model_path: str, given: str, flag: str) -> None:
    """Refuses images for a text model and texts for an image model, before predicting."""
    kind = input_kind(model)
    if kind is not None and kind != given:
        takes = {"image": "images (--images, --images-dir)", "text": "texts (--texts, --text-file)"}
        raise TfxferError(
            f"--model {model_path!r} takes {takes[kind]}, but {flag} gave it {given}s. Pass "
            f"{kind}s, or the model.keras of a run trained on {given}s."
        )


def class_names_path(model_path: str, class_names: str | None = None) -> str:
    """`class_names` (--class-names) if given, else class_names.json beside the model."""
    if class_names:
        return class_names
    if fs.is_url(model_path):
        return fs.join(fs.dirname(model_path), CLASS_NAMES_FILE)
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), CLASS_NAMES_FILE)


def read_class_names(path: str, num_outputs: int | None) -> list[str]:
    """The class names in `path`, checked against the model's number of outputs."""
    expected = 'the class_names.json a run wrote: a JSON list of names, e.g. ["cat", "dog"]'
    if not fs.exists(path):
        raise TfxferError(
            f"Class names not found at {path!r}; pass --class-names run/class_names.json"
        )
    if fs.isdir(path):
        raise TfxferError(f"--class-names {path!r} is a folder. Expected {expected}.")
    try:
        with fs.open(path, "rb") as handle:
            names = json.loads(handle.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TfxferError(
            f"--class-names {path!r} is not JSON ({one_line(error)}). Expected {expected}."
        ) from None
    except OSError as error:
        raise TfxferError(
            f"Cannot read --class-names {path!r}: {error.strerror}. Expected {expected}."
        ) from None
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
        raise TfxferError(
            f"--class-names {path!r} holds a JSON {type(names).__name__}, not a list of names. "
            f"Expected {expected}."
        )
    if num_outputs is not None and len(names) != num_outputs:
        raise TfxferError(
            f"--class-names {path!r} has {len(names)} name(s) but the model has {num_outputs} "
            "outputs. Pass the class_names.json of the run that wrote this model."
        )
    return [str(name) for name in names]


def run_class_names(run_dir: str, model, class_names: str | None = None) -> list[str] | None:
    """`class_names` (--class-names), else the run's class_names.json if any, else None."""
    path = class_names or fs.join(run_dir, CLASS_NAMES_FILE)
    if class_names or fs.exists(path):
        return read_class_names(path, num_outputs(model))
    return None


def image_size_of(model: keras.Model) -> int | list[int] | None:
    """The side (or `[height, width]`) an image model resizes its input to; None if none."""
    for layer in model._flatten_layers(include_self=False):
        size = getattr(layer, "image_size", None)
        if size is not None:
            return size
        if isinstance(layer, keras.layers.Resizing):
            return [int(layer.height), int(layer.width)]
    return None


def image_size(model, model_path: str):
    """The side (or `[height, width]`) a loaded image model resizes its input to."""
    size = image_size_of(model)
    if size is None:
        raise TfxferError(
            f"Cannot tell the image size of --model {model_path!r}: it has no image "
            "preprocessing layer. Pass the model.keras of a tfxfer image run."
        )
    return size


def resolve_run(run: str | None, model: str | None, command: str) -> tuple[str, str]:
    """`(model.keras path, the folder holding the run's files)` from RUN_DIR or --model.

    Only the paths are checked here (cheap); the model is loaded later.

    Args:
        run: str or None. A run directory, or a model.keras given in its place.
        model: str or None. A model.keras (--model); not together with `run`.
        command: str. The `tfxfer` subcommand, for the messages.
    """
    if run is not None and model is not None:
        raise TfxferError(f"Pass a run directory or --model, not both: tfxfer {command} RUN_DIR")
    if model is not None or (run is not None and not fs.isdir(run)):
        path = model if model is not None else run
        if model is None and not fs.exists(path):
            raise TfxferError(
                f"Run directory not found: {path!r}. Pass the folder a run wrote (its "
                "--output-dir), or its model.keras."
            )
        check_model_path(path)
        return path, fs.dirname(path) if fs.is_url(path) else os.path.dirname(os.path.abspath(path))
    if run is None:
        raise TfxferError(
            f"Pass the run directory to {command}: tfxfer {command} RUN_DIR ... (the folder "
            "a run wrote, its --output-dir), or --model runs/NAME/model.keras."
        )
    path = fs.join(run, MODEL_FILE)
    if not fs.isfile(path):
        started = any(fs.exists(fs.join(run, n)) for n in (*RUN_MARKERS, MANIFEST))
        why = (
            "the run may not have finished: a run writes model.keras when its last stage "
            "ends (pass --resume to the recipe to finish it)"
            if started
            else "it is not a tfxfer run directory. Pass the folder a run wrote (its "
            "--output-dir), or --model PATH/model.keras"
        )
        raise TfxferError(f"{run!r} has no model.keras, so there is no model to use: {why}.")
    return path, run.rstrip("/") if fs.is_url(run) else os.path.abspath(run)


def read_config(run_dir: str) -> dict:
    """The run's config.json, or {} where there is none to read (a bare model.keras).

    `run_dir` may be local or a `tf.io.gfile` URL (gs://...).
    """
    try:
        with fs.open(fs.join(run_dir, CONFIG_FILE)) as handle:
            config = json.load(handle)
    except (OSError, ValueError, tf.errors.OpError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass
class FinishedRun:
    """A finished run read back: what `Classifier.load` (and anything else) starts from."""

    run_dir: str
    config: dict
    class_names: list
    model: keras.Model
    kind: str  # "image" or "text"
    metrics: dict = field(default_factory=dict)


def open_finished_run(run_dir: str) -> FinishedRun:
    """The finished run in `run_dir` (local or gs://): config, class names, model, metrics.

    Raises:
        TfxferError: a file a finished run has is missing (the run stopped early, or this is
            not a run directory).
    """
    for name in (CONFIG_FILE, CLASS_NAMES_FILE, MODEL_FILE):
        if not fs.exists(fs.join(run_dir, name)):
            raise TfxferError(
                f"{run_dir!r} is not a finished tfxfer run: it has no {name}. Pass the "
                "output_dir of a run that finished (fine_tune, or a recipe)."
            )
    model = load_keras_file(fs.join(run_dir, MODEL_FILE))
    metrics_path = fs.join(run_dir, METRICS_FILE)
    with fs.open(fs.join(run_dir, CLASS_NAMES_FILE)) as handle:
        class_names = json.load(handle)
    metrics = {}
    if fs.exists(metrics_path):
        with fs.open(metrics_path) as handle:
            metrics = json.load(handle)
    return FinishedRun(
        run_dir=run_dir,
        config=read_config(run_dir),
        class_names=class_names,
        model=model,
        kind="text" if isinstance(model, RawTextModel) else "image",
        metrics=metrics,
    )


def run_entry(run_dir: str, name: str) -> str:
    """`run_dir/name`, recorded in the run's manifest first when `run_dir` is a tfxfer run.

    A finished run has a manifest and checkpoints/; what an export adds to it is then the
    run's like the rest, and the recipe's `--overwrite` deletes it with the run (and never a
    file of the user's: recording refuses a name that is there and not the run's). A folder
    that is not a run (a model.keras copied alone) gets no manifest: the export's own marker
    is what protects it.
    """
    if fs.isfile(fs.join(run_dir, MANIFEST)) and fs.isdir(fs.join(run_dir, "checkpoints")):
        return RunDir(run_dir, resume=True).file(name)
    return fs.join(run_dir, name)
