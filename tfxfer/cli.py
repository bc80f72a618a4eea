"""The `tfxfer` command (backbones, predict, evaluate, export) and the one error boundary.

`error_boundary` is where every command-line entry point (this command, and every recipe
through `tfxfer.recipe.command_line`) meets the user. What the user can fix ends as one line,
`tfxfer: error: <what was wrong and what would fix it>`, and exit status 2: a `TfxferError`,
and the few failures that are always about the user's machine rather than tfxfer's code (a
path that is a file, a folder without write permission, a full disk, running out of memory).
Anything else is a bug in tfxfer: one line naming it and exit status 1, and with `--debug`
its traceback. The Python API never goes through the boundary: library calls raise.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import traceback
import zipfile
from collections.abc import Callable
from typing import Any

from tfxfer.errors import DataError, Preempted, TfxferError

# What `--debug` says in `--help`, for this command and every recipe.
DEBUG_HELP = "on an unexpected error, show the full traceback instead of one line"


def error_boundary(action: Callable[[], Any], *, debug: bool = False) -> int:
    """Runs `action` and returns an exit status: 0, 2 for the user's error, 1 for tfxfer's.

    A run stopped by a preemption notice (`Preempted`) is none of these: one line saying where
    its checkpoint is, and status 143, as a process ended by SIGTERM reports.

    A user with a wrong path reads one sentence, not a traceback. An exception that is not
    the user's is a bug; it is named in one line too, because a page of TensorFlow frames
    helps nobody who did not write tfxfer, and `--debug` brings the traceback back.

    Args:
        action: callable. What the command does.
        debug: bool. Print tracebacks, and let an unexpected exception propagate (Python then
            prints it and exits with status 1). Defaults to `False`.
    """
    try:
        action()
    except Preempted as notice:
        print(f"tfxfer: preempted: {notice}", file=sys.stderr)
        return notice.exit_status
    except Exception as error:  # the boundary: everything a command raises ends here
        message = str(error) if isinstance(error, TfxferError) else user_error_message(error)
        if message is None:
            if debug:
                raise
            detail = _one_line(error)
            print(
                f"tfxfer: internal error: {type(error).__name__}{': ' if detail else ''}{detail} "
                "(run with --debug for the traceback)",
                file=sys.stderr,
            )
            return 1
        if debug:
            traceback.print_exc()
        print(f"tfxfer: error: {_one_line(message)}", file=sys.stderr)
        return 2
    return 0


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for an exception that is the user's to fix, or None for a bug.

    These are failures tfxfer cannot check for in advance everywhere they may happen (the
    disk fills, a folder is not writable, memory runs out at the first large batch), and that
    are never a bug in tfxfer's code.
    """
    if _is_out_of_memory(error):
        return (
            f"Ran out of memory ({type(error).__name__}). Lower --batch-size, or --image-size "
            "/ --sequence-length (batch_size= / image_size= / sequence_length= in Python)."
        )
    if isinstance(error, OSError) and error.filename is not None:
        path = os.fsdecode(error.filename)
        reasons = {
            errno.EACCES: "permission denied. Choose a path you can read and write, or fix "
            "its permissions.",
            errno.EPERM: "operation not permitted. Choose a path you can read and write, or fix "
            "its permissions.",
            errno.EROFS: "it is on a read-only file system. Choose a writable path.",
            errno.ENOTDIR: "a part of the path is a file, not a folder. Choose another path.",
            errno.EEXIST: "it already exists, and is not a folder that can be used here. "
            "Choose another path.",
            errno.EISDIR: "it is a folder where a file was expected.",
            errno.ENOENT: "it, or a folder above it, does not exist (or cannot be created there).",
            errno.ENOSPC: "no space left on the device. Free some space or choose another path.",
            errno.ENAMETOOLONG: "the name is too long. Choose a shorter path.",
        }
        reason = reasons.get(error.errno)
        if reason is not None:
            return f"Cannot use {path!r}: {reason}"
    return None


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    tf = sys.modules.get("tensorflow")  # an error of TensorFlow's means it is imported
    return tf is not None and isinstance(error, tf.errors.ResourceExhaustedError)


def _one_line(message: Any) -> str:
    """The message on one line: a TensorFlow error's first line, or lines joined."""
    text = str(message).strip()
    if isinstance(message, (TfxferError, str)):
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    # Other libraries' messages (TensorFlow's) go on for pages after the first line.
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= 500 else first[:497] + "..."


def _tf_message(error) -> str:
    """A TensorFlow op error's own words, without the op and device names around them."""
    text = re.sub(r"\{\{[^}]*\}\}", "", _one_line(error.message))
    return re.sub(r"\s*\[Op:.*$", "", text).strip()


# === Reading what the commands are given ===


def _check_model_path(path: str) -> None:
    """Cheap checks of --model, made before anything slow."""
    if not os.path.exists(path):
        raise TfxferError(f"Model file not found: {path!r}. Pass the model.keras a run wrote.")
    if os.path.isdir(path):
        raise TfxferError(
            f"--model {path!r} is a folder. Pass the model.keras file a run wrote, e.g. "
            "runs/photos/model.keras (a SavedModel export/ folder is for serving, not for "
            "this command)."
        )


def _load_model(path: str):
    """The model in `path`, or a `TfxferError` that says what the file is not."""
    from tfxfer.export import load_model

    _check_model_path(path)
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise TfxferError(
            f"--model {path!r} is not a Keras model: a .keras file is a zip archive, and this "
            "one is not (or is truncated). Pass the model.keras a tfxfer run wrote, or copy it "
            "again if the copy was cut short."
        )
    try:
        return load_model(path)
    except TfxferError:
        raise
    except Exception as error:  # a damaged or foreign file fails in many ways
        raise TfxferError(
            f"Cannot load --model {path!r} as a Keras model ({type(error).__name__}: "
            f"{_one_line(error)}). Pass the model.keras file a tfxfer run wrote; if it is "
            "one, it may be truncated: copy it again."
        ) from error


def _input_kind(model) -> str | None:
    """ "image" or "text": what a loaded tfxfer model takes; None if it cannot be told."""
    from tfxfer.export import RawTextModel

    if isinstance(model, RawTextModel):
        return "text"
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        return None
    if inputs[0].dtype == "string":
        return "text"
    if len(inputs[0].shape) == 4:
        return "image"
    return None


def _num_outputs(model) -> int | None:
    from tfxfer.export import RawTextModel

    if isinstance(model, RawTextModel):
        model = model.classifier
    outputs = getattr(model, "outputs", None) or []
    return int(outputs[0].shape[-1]) if len(outputs) == 1 else None


def _check_kind(model, model_path: str, given: str, flag: str) -> None:
    """Refuses images for a text model and texts for an image model, before predicting."""
    kind = _input_kind(model)
    if kind is not None and kind != given:
        takes = {"image": "images (--images, --images-dir)", "text": "texts (--texts, --text-file)"}
        raise TfxferError(
            f"--model {model_path!r} takes {takes[kind]}, but {flag} gave it {given}s. Pass "
            f"{kind}s, or the model.keras of a run trained on {given}s."
        )


def _class_names_path(args: argparse.Namespace) -> str:
    return args.class_names or os.path.join(
        os.path.dirname(os.path.abspath(args.model)), "class_names.json"
    )


def _read_class_names(path: str, num_outputs: int | None) -> list[str]:
    """The class names in `path`, checked against the model's number of outputs."""
    expected = 'the class_names.json a run wrote: a JSON list of names, e.g. ["cat", "dog"]'
    if not os.path.exists(path):
        raise TfxferError(
            f"Class names not found at {path!r}; pass --class-names run/class_names.json"
        )
    if os.path.isdir(path):
        raise TfxferError(f"--class-names {path!r} is a folder. Expected {expected}.")
    try:
        with open(path, encoding="utf-8") as handle:
            names = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TfxferError(
            f"--class-names {path!r} is not JSON ({_one_line(error)}). Expected {expected}."
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


def _read_image(path: str):
    """One image as a `(height, width, 3)` uint8 tensor, or a `DataError` naming the file."""
    import tensorflow as tf

    if not os.path.exists(path):
        raise DataError(f"Image not found: {path!r}.")
    if os.path.isdir(path):
        raise DataError(f"--images {path!r} is a folder. Pass image files, e.g. photos/*.jpg.")
    try:
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as error:
        raise DataError(
            f"Cannot read {path!r} as an image ({_tf_message(error)}). Pass a JPEG, PNG, BMP "
            "or GIF file."
        ) from None


def _image_size(model, model_path: str):
    """The side (or `[height, width]`) a loaded image model resizes its input to."""
    import keras

    for layer in model._flatten_layers(include_self=False):
        size = getattr(layer, "image_size", None)
        if size is not None:
            return size
        if isinstance(layer, keras.layers.Resizing):
            return [int(layer.height), int(layer.width)]
    raise TfxferError(
        f"Cannot tell the image size of --model {model_path!r}: it has no image "
        "preprocessing layer. Pass the model.keras of a tfxfer image run."
    )


def _print_prediction(name: str, probabilities, class_names) -> None:
    best = int(probabilities.argmax())
    label = class_names[best] if class_names else best
    print(json.dumps({"input": name, "label": label, "probability": float(probabilities[best])}))


# === Commands ===


def _cmd_backbones(args: argparse.Namespace) -> int:
    from tfxfer.backbones import known_backbones

    print(json.dumps(known_backbones(), indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    _check_model_path(args.model)
    if not args.images and not args.texts:
        raise TfxferError("Nothing to predict: pass --images FILE ... or --texts TEXT ...")
    model = _load_model(args.model)
    if args.images:
        _check_kind(model, args.model, "image", "--images")
    if args.texts:
        _check_kind(model, args.model, "text", "--texts")
    class_names = None
    if args.class_names:
        class_names = _read_class_names(args.class_names, _num_outputs(model))
    # Every image is read before the first prediction: a typo in the tenth path is reported
    # before nine lines of output that a script would have to discard.
    images = [(path, _read_image(path)) for path in args.images or []]
    for path, image in images:
        probabilities = np.asarray(model.predict(image[None], verbose=0))[0]
        _print_prediction(path, probabilities, class_names)
    for text in args.texts or []:
        probabilities = np.asarray(model.predict(np.array([text]), verbose=0))[0]
        _print_prediction(text, probabilities, class_names)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from tfxfer import report

    _check_model_path(args.model)
    if args.batch_size < 1:
        raise TfxferError(
            f"Expected --batch-size to be a positive integer. Received: {args.batch_size}"
        )
    if bool(args.images_dir) == bool(args.text_file):
        raise TfxferError(
            "Pass exactly one of --images-dir DIR or --text-file FILE to evaluate on."
        )
    model = _load_model(args.model)
    _check_kind(
        model,
        args.model,
        "image" if args.images_dir else "text",
        "--images-dir" if args.images_dir else "--text-file",
    )
    class_names = _read_class_names(_class_names_path(args), _num_outputs(model))
    if args.images_dir:
        from tfxfer.data.images import make_image_dataset, scan_image_folder

        examples = scan_image_folder(args.images_dir, class_names)
        size = _image_size(model, args.model)
        labels, probabilities = report.collect(
            model, make_image_dataset(examples, image_size=size, batch_size=args.batch_size)
        )
    else:
        from tfxfer.data.text import read_text_file

        # Read with the model's classes: an evaluation file may hold only some of them, and
        # a label the model has no output for is refused with the file's name.
        examples = read_text_file(
            args.text_file,
            class_names,
            text_column=args.text_column,
            label_column=args.label_column,
        )
        labels = examples.labels
        probabilities = np.asarray(
            model.predict(list(examples.inputs), batch_size=args.batch_size, verbose=0)
        )
    metrics = report.classification_metrics(labels, probabilities, class_names)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tfxfer.export import export_saved_model

    _check_model_path(args.model)
    # Checked here too, before the model is loaded, so the refusal comes at once.
    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise TfxferError(
            f"Refusing to export to {args.output!r}: it is a file. Pass a new folder as "
            "--output (the SavedModel is a folder)."
        )
    print(export_saved_model(_load_model(args.model), args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `tfxfer` command; returns its exit status (0, 2 for bad input, 1 for a bug)."""
    parser = argparse.ArgumentParser(prog="tfxfer", description="Transfer learning on Keras 3.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str):
        sub = commands.add_parser(name, help=help)
        # Accepted after the command too; SUPPRESS keeps `tfxfer --debug predict` working.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sub.set_defaults(run=run)
        return sub

    command("backbones", _cmd_backbones, "list the named backbones")
    predict = command("predict", _cmd_predict, "predict with a saved model.keras")
    predict.add_argument("--model", required=True, help="path to a run's model.keras")
    predict.add_argument("--class-names", help="path to a run's class_names.json")
    predict.add_argument("--images", nargs="*", help="image files")
    predict.add_argument("--texts", nargs="*", help="texts")
    evaluate = command("evaluate", _cmd_evaluate, "metrics of a saved model.keras on labelled data")
    evaluate.add_argument("--model", required=True, help="path to a run's model.keras")
    evaluate.add_argument("--class-names", help="defaults to class_names.json beside the model")
    evaluate.add_argument("--images-dir", help="a folder with one subfolder per class")
    evaluate.add_argument("--text-file", help="a CSV/JSONL file with texts and labels")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--batch-size", type=int, default=32)
    export = command("export", _cmd_export, "export a saved model.keras as a SavedModel")
    export.add_argument("--model", required=True, help="path to a run's model.keras")
    export.add_argument("--output", required=True, help="directory for the SavedModel")
    args = parser.parse_args(argv)
    return error_boundary(lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
