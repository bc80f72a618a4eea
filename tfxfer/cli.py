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
import sys
import traceback
import zipfile
from collections.abc import Callable
from typing import Any

from tfxfer.errors import Preempted, TfxferError

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


def _image_size(model, model_path: str):
    """The side (or `[height, width]`) a loaded image model resizes its input to."""
    from tfxfer.export import image_size_of

    size = image_size_of(model)
    if size is None:
        raise TfxferError(
            f"Cannot tell the image size of --model {model_path!r}: it has no image "
            "preprocessing layer. Pass the model.keras of a tfxfer image run."
        )
    return size


def _resolve_run(run: str | None, model: str | None, command: str) -> tuple[str, str]:
    """`(model.keras path, the folder holding the run's files)` from RUN_DIR or --model.

    Only the paths are checked here (cheap); the model is loaded later.
    """
    if run is not None and model is not None:
        raise TfxferError(f"Pass a run directory or --model, not both: tfxfer {command} RUN_DIR")
    if model is not None or (run is not None and not os.path.isdir(run)):
        path = model if model is not None else run
        if model is None and not os.path.exists(path):
            raise TfxferError(
                f"Run directory not found: {path!r}. Pass the folder a run wrote (its "
                "--output-dir), or its model.keras."
            )
        _check_model_path(path)
        return path, os.path.dirname(os.path.abspath(path))
    if run is None:
        raise TfxferError(
            f"Pass the run directory to {command}: tfxfer {command} RUN_DIR ... (the folder "
            "a run wrote, its --output-dir), or --model runs/NAME/model.keras."
        )
    path = os.path.join(run, "model.keras")
    if not os.path.isfile(path):
        from tfxfer.rundir import MANIFEST, RUN_MARKERS

        started = any(os.path.exists(os.path.join(run, n)) for n in (*RUN_MARKERS, MANIFEST))
        why = (
            "the run may not have finished: a run writes model.keras when its last stage "
            "ends (pass --resume to the recipe to finish it)"
            if started
            else "it is not a tfxfer run directory. Pass the folder a run wrote (its "
            "--output-dir), or --model PATH/model.keras"
        )
        raise TfxferError(f"{run!r} has no model.keras, so there is no model to use: {why}.")
    return path, os.path.abspath(run)


def _run_config(run_dir: str) -> dict:
    """The run's config.json, or {} where there is none to read (a bare model.keras)."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _run_class_names(args: argparse.Namespace, run_dir: str, model) -> list[str] | None:
    """--class-names, else the run's class_names.json if it has one, else None (ids)."""
    path = args.class_names or os.path.join(run_dir, "class_names.json")
    if args.class_names or os.path.exists(path):
        return _read_class_names(path, _num_outputs(model))
    return None


def _run_entry(run_dir: str, name: str) -> str:
    """`run_dir/name`, recorded in the run's manifest first when `run_dir` is a tfxfer run.

    A finished run has a manifest and checkpoints/; what an export adds to it is then the
    run's like the rest, and the recipe's `--overwrite` deletes it with the run (and never a
    file of the user's: recording refuses a name that is there and not the run's). A folder
    that is not a run (a model.keras copied alone) gets no manifest: the export's own marker
    is what protects it.
    """
    from tfxfer.rundir import MANIFEST, RunDir

    if os.path.isfile(os.path.join(run_dir, MANIFEST)) and os.path.isdir(
        os.path.join(run_dir, "checkpoints")
    ):
        return RunDir(run_dir, resume=True).file(name)
    return os.path.join(run_dir, name)


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise TfxferError(f"Expected {flag} to be a positive integer. Received: {value}")
    return value


def _parse_input_size(text: str | None):
    """--input-size: "224" (a square) or "240x320" (height x width); None when not given."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        sizes = [int(p) for p in parts]
        return sizes[0] if len(sizes) == 1 else sizes
    raise TfxferError(
        f"Expected --input-size to be SIDE or HEIGHTxWIDTH in pixels, e.g. 224 or 240x320. "
        f"Received: {text!r}"
    )


def _calibration_source(args: argparse.Namespace, run_dir: str) -> str:
    """Where int8 calibration reads inputs: --calibration-data, else the run's training data."""
    if args.calibration_data:
        if not os.path.exists(args.calibration_data):
            raise TfxferError(
                f"--calibration-data {args.calibration_data!r} does not exist. Pass a folder of "
                "images (image runs) or a CSV/JSONL/TXT file of texts (text runs)."
            )
        return args.calibration_data
    config = _run_config(run_dir)
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


def _calibration_inputs(source: str, kind: str, run_dir: str, image_size):
    """Up to `CALIBRATION_EXAMPLES` inputs spread over `source` (images read lazily)."""
    from tfxfer.export import CALIBRATION_EXAMPLES

    if kind == "image":
        from tfxfer.data.images import decode_and_resize
        from tfxfer.pretrain.contrastive_data import list_unlabelled_images

        if not os.path.isdir(source):
            raise TfxferError(
                f"Calibration data {source!r} is a file; an image model calibrates on a folder "
                "of images. Pass --calibration-data DIR."
            )
        inputs = list_unlabelled_images(source)
    else:
        from tfxfer.data.unlabelled import read_unlabelled_texts

        column = _run_config(run_dir).get("text_column") or "text"
        inputs = read_unlabelled_texts(source, text_column=column)
    # Every k-th, so that each class of a sorted class folder takes part.
    spread = inputs[:: max(1, len(inputs) // CALIBRATION_EXAMPLES)][:CALIBRATION_EXAMPLES]
    if kind == "text":
        return spread
    return (decode_and_resize(path, image_size).numpy() for path in spread)


# === Commands ===


def _cmd_backbones(args: argparse.Namespace) -> int:
    from tfxfer.backbones import known_backbones

    print(json.dumps(known_backbones(), indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tfxfer import prediction

    given = list(args.inputs)
    run = None if args.model else (given.pop(0) if given else None)
    model_path, run_dir = _resolve_run(run, args.model, "predict")
    given += (args.images or []) + (args.texts or [])
    if not given:
        raise TfxferError(
            "Nothing to predict: pass image files, folders of images, texts or files of texts "
            "after the run directory (tfxfer predict RUN_DIR photo.jpg ...)."
        )
    _positive(args.batch_size, "--batch-size")
    _positive(args.top_k, "--top-k")
    if args.output:
        prediction.check_output(args.output, overwrite=args.overwrite)
    model = _load_model(model_path)
    if args.images:
        _check_kind(model, model_path, "image", "--images")
    if args.texts:
        _check_kind(model, model_path, "text", "--texts")
    kind = _input_kind(model)
    if kind is None:
        raise TfxferError(
            f"Cannot tell whether {model_path!r} takes images or texts (it has "
            f"{len(getattr(model, 'inputs', None) or [])} inputs). tfxfer predict takes image "
            "and text classifiers a tfxfer run wrote."
        )
    class_names = _run_class_names(args, run_dir, model)
    column = args.text_column or _run_config(run_dir).get("text_column") or "text"
    # Everything is predicted before the first line is printed: a corrupt file halfway
    # through is one error, not half an output that a script would have to discard.
    inputs = prediction.gather_inputs(given, kind, text_column=column)
    probabilities = prediction.predict_all(
        model,
        kind,
        inputs,
        batch_size=args.batch_size,
        image_size=_image_size(model, model_path) if kind == "image" else None,
    )
    rows = prediction.records(inputs, prediction.top_k(probabilities, class_names, args.top_k))
    if args.output:
        prediction.write_predictions(args.output, rows)
        print(f"tfxfer: wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    elif args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        print(prediction.table(rows))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from tfxfer import report

    # The rest reads --model: RUN_DIR stands for its model.keras (class names beside it).
    args.model, _ = _resolve_run(args.run_dir, args.model, "evaluate")
    _positive(args.batch_size, "--batch-size")
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
    from tfxfer import export

    if args.format not in ("savedmodel", "tflite"):
        raise TfxferError(
            f"Expected --format to be 'savedmodel' or 'tflite'. Received: {args.format!r}"
        )
    if args.quantize is not None and args.format != "tflite":
        raise TfxferError(
            "--quantize is for --format tflite: a SavedModel keeps the model's float32 "
            "weights. Pass --format tflite --quantize ..., or drop --quantize."
        )
    if args.quantize is not None and args.quantize not in export.QUANTIZATIONS:
        raise TfxferError(
            f"Expected --quantize to be one of {', '.join(export.QUANTIZATIONS)}. Received: "
            f"{args.quantize!r}"
        )
    model_path, run_dir = _resolve_run(args.run_dir, args.model, "export")
    savedmodel = args.format == "savedmodel"
    name = "export" if savedmodel else export.tflite_file_name(args.quantize)
    output = args.output or os.path.join(run_dir, name)
    # Checked before the model is loaded, so a refusal comes at once.
    if savedmodel and os.path.lexists(output) and not os.path.isdir(output):
        raise TfxferError(
            f"Refusing to export to {output!r}: it is a file. Pass a new folder as "
            "--output (the SavedModel is a folder)."
        )
    if not savedmodel:
        export.refuse_foreign_tflite_target(output)
    input_size = _parse_input_size(args.input_size)
    source = _calibration_source(args, run_dir) if args.quantize == "int8" else None
    model = _load_model(model_path)
    if not args.output:  # the run's own entry: recorded in its manifest before it is written
        output = _run_entry(run_dir, name)
        if not savedmodel:
            _run_entry(run_dir, name + export.TFLITE_SIDECAR_SUFFIX)
    if savedmodel:
        print(export.export_saved_model(model, output))
        return 0
    kind = _input_kind(model)
    representative = None
    if source is not None and kind is not None:
        size = input_size or (_image_size(model, model_path) if kind == "image" else None)
        representative = _calibration_inputs(source, kind, run_dir, size)
    print(
        export.export_tflite(
            model,
            output,
            quantize=args.quantize,
            representative_data=representative,
            input_size=input_size,
            class_names=_run_class_names(args, run_dir, model),
        )
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from tfxfer.configfile import resolve, to_yaml
    from tfxfer.recipe import cli_logging

    module, config = resolve(args.target, args.set)
    if args.recipe_flags:  # the recipe's own flags (--data-dir ...), on top of file and --set
        config, _ = type(config).parse_flags(
            args.recipe_flags, prog=f"tfxfer train {args.target}", defaults=config
        )
    if args.quiet:
        config = dataclasses.replace(config, quiet=True)
    if args.print_config:
        config.validate()
        print(to_yaml(config), end="")
        return 0
    cli_logging()
    module.main(config)
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from tfxfer.configfile import resolve
    from tfxfer.recipe import RecipeConfig, cli_logging, find_learning_rate

    module, config = resolve(args.target, args.set)
    if not isinstance(config, RecipeConfig) or not hasattr(module, "build_model"):
        raise TfxferError(
            f"lr-find is for the fine-tuning recipes (bert_text_classifier, "
            f"resnet50_image_classifier, ...); {args.target!r} is not one. A pretraining "
            "recipe has one learning rate: try a few on a short run."
        )
    if args.recipe_flags:
        config, _ = type(config).parse_flags(
            args.recipe_flags, prog=f"tfxfer lr-find {args.target}", defaults=config
        )
    if args.steps is not None and args.steps < 5:
        raise TfxferError(f"--steps {args.steps}: the range test needs at least 5 steps.")
    cli_logging()
    find_learning_rate(
        config,
        module.build_data,
        module.build_model,
        stage=args.stage,
        steps=args.steps,
        output_dir=args.output,
        overwrite=args.overwrite,
    )
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
    train = command("train", _cmd_train, "train with a recipe or a YAML/JSON config file")
    train.description = (
        "Runs a recipe (a name in recipes/, e.g. bert_text_classifier) or a config file whose "
        "`recipe:` key names one (recipes/configs/ has one per recipe; a run's config.json is "
        "one too). Keys are the recipe's fields; the recipe's own flags (--data-dir ...) may "
        "follow and win over the file. `tfxfer train NAME --print-config` lists a recipe's "
        "keys with their help; `python -m recipes.NAME --help` its flags."
    )
    train.add_argument("target", metavar="RECIPE_OR_CONFIG", help="recipe name or config file")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key (repeatable; nested: --set stages.1.epochs=3; null for none)",
    )
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and stop"
    )
    train.add_argument(
        "--quiet", action="store_true", help="only warnings, errors and the end-of-run summary"
    )
    lr = command("lr-find", _cmd_lr_find, "the learning-rate range test for a stage")
    lr.description = (
        "Trains the stages before --stage, then runs a range test for it (exponentially "
        "growing learning rate, one step each, weights put back) and suggests a rate. Writes "
        "lr_find.png and lr_find.json to --output (default: the config's output_dir + "
        "'-lr-find'). In a recipe, --head-learning-rate auto / --finetune-learning-rate auto "
        "do this at the stage's start."
    )
    lr.add_argument("target", metavar="RECIPE_OR_CONFIG", help="recipe name or config file")
    lr.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    lr.add_argument("--stage", help="the stage's name (default: the last stage, fine-tuning)")
    lr.add_argument("--steps", type=int, help="steps of the test (default: 100)")
    lr.add_argument("--output", help="folder for lr_find.png / lr_find.json")
    lr.add_argument(
        "--overwrite", action="store_true", help="replace an earlier lr-find output folder"
    )
    predict = command("predict", _cmd_predict, "predict with a finished run, in batches")
    predict.description = (
        "Predicts with a run's model.keras: image files and folders of images (recursively) "
        "for an image run; texts and CSV/TSV/JSONL/TXT files of texts for a text run. Prints "
        "a table of the top labels, --json one JSON object per input, or writes --output."
    )
    predict.add_argument(
        "inputs",
        nargs="*",
        metavar="RUN_DIR INPUTS",
        help="the run directory (or its model.keras), then what to predict",
    )
    predict.add_argument("--model", help="a model.keras (then every positional is an input)")
    predict.add_argument("--class-names", help="defaults to the run's class_names.json")
    predict.add_argument("--images", nargs="*", help="image files or folders")
    predict.add_argument("--texts", nargs="*", help="texts")
    predict.add_argument("--top-k", type=int, default=3, help="labels shown per input (3)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--output", help="write predictions to a .csv or .jsonl file")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    predict.add_argument("--batch-size", type=int, default=32, help="inputs per batch (32)")
    predict.add_argument(
        "--text-column", help="the text column of CSV/JSONL inputs (the run's, else 'text')"
    )
    evaluate = command("evaluate", _cmd_evaluate, "metrics of a saved model.keras on labelled data")
    evaluate.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory")
    evaluate.add_argument("--model", help="a model.keras (instead of RUN_DIR)")
    evaluate.add_argument("--class-names", help="defaults to class_names.json beside the model")
    evaluate.add_argument("--images-dir", help="a folder with one subfolder per class")
    evaluate.add_argument("--text-file", help="a CSV/JSONL file with texts and labels")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--batch-size", type=int, default=32)
    export = command("export", _cmd_export, "export a run's model as a SavedModel or TFLite")
    export.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory")
    export.add_argument("--model", help="a model.keras (instead of RUN_DIR)")
    export.add_argument("--format", default="savedmodel", help="savedmodel (default) or tflite")
    export.add_argument("--quantize", help="tflite only: dynamic, float16 or int8")
    export.add_argument(
        "--calibration-data",
        help="int8: a folder of images or a file of texts (default: the run's training data)",
    )
    export.add_argument(
        "--input-size", help="tflite images: SIDE or HxW the file takes (default: the run's)"
    )
    export.add_argument("--class-names", help="defaults to the run's class_names.json")
    export.add_argument(
        "--output",
        help="default: RUN_DIR/export/ (savedmodel), RUN_DIR/model[-QUANTIZE].tflite (tflite)",
    )
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "lr-find"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.recipe_flags = extra
    return error_boundary(lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
