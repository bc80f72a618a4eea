"""The `tfxfer` command: train, lr-find, rank, backbones, predict, evaluate and export.

Each subcommand is a `_cmd_*` function and a `_add_*` function that declares its arguments.
What a finished run holds is read back through `tfxfer.runs`; every subcommand runs inside
`tfxfer.boundary.error_boundary`, so what the user can fix ends as one line and exit status 2.
`error_boundary`, `user_error_message`, `DEBUG_HELP` and `cli_logging` are importable from here
too, as before they moved to `tfxfer.boundary`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable

import numpy as np

from tfxfer import export, prediction, report, runs
from tfxfer.backbones import known_backbones
from tfxfer.boundary import (
    DEBUG_HELP,
    OneLineParser,
    cli_logging,
    error_boundary,
    user_error_message,
)
from tfxfer.configfile import resolve, to_yaml
from tfxfer.data.images import make_image_dataset, scan_image_folder
from tfxfer.data.text import read_text_file
from tfxfer.errors import TfxferError
from tfxfer.recipe import RecipeConfig, find_learning_rate
from tfxfer.recipe.rank import rank_candidates, ranking_lines, ranking_table, winner

# The names this module had before `tfxfer.boundary` held them; kept for importers.
__all__ = ["DEBUG_HELP", "cli_logging", "error_boundary", "main", "user_error_message"]


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


def _cmd_backbones(args: argparse.Namespace) -> int:
    print(json.dumps(known_backbones(), indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    given = list(args.inputs)
    run = None if args.model else (given.pop(0) if given else None)
    model_path, run_dir = runs.resolve_run(run, args.model, "predict")
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
    model = runs.load_model(model_path)
    if args.images:
        runs.check_kind(model, model_path, "image", "--images")
    if args.texts:
        runs.check_kind(model, model_path, "text", "--texts")
    kind = runs.input_kind(model)
    if kind is None:
        raise TfxferError(
            f"Cannot tell whether {model_path!r} takes images or texts (it has "
            f"{len(getattr(model, 'inputs', None) or [])} inputs). tfxfer predict takes image "
            "and text classifiers a tfxfer run wrote."
        )
    class_names = runs.run_class_names(run_dir, model, args.class_names)
    column = args.text_column or runs.read_config(run_dir).get("text_column") or "text"
    # Everything is predicted before the first line is printed: a corrupt file halfway
    # through is one error, not half an output that a script would have to discard.
    inputs = prediction.gather_inputs(given, kind, text_column=column)
    probabilities = prediction.predict_all(
        model,
        kind,
        inputs,
        batch_size=args.batch_size,
        image_size=runs.image_size(model, model_path) if kind == "image" else None,
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
    # The rest reads --model: RUN_DIR stands for its model.keras (class names beside it).
    args.model, _ = runs.resolve_run(args.run_dir, args.model, "evaluate")
    _positive(args.batch_size, "--batch-size")
    if bool(args.images_dir) == bool(args.text_file):
        raise TfxferError(
            "Pass exactly one of --images-dir DIR or --text-file FILE to evaluate on."
        )
    model = runs.load_model(args.model)
    runs.check_kind(
        model,
        args.model,
        "image" if args.images_dir else "text",
        "--images-dir" if args.images_dir else "--text-file",
    )
    class_names = runs.read_class_names(
        runs.class_names_path(args.model, args.class_names), runs.num_outputs(model)
    )
    if args.images_dir:
        examples = scan_image_folder(args.images_dir, class_names)
        size = runs.image_size(model, args.model)
        labels, probabilities = report.collect(
            model, make_image_dataset(examples, image_size=size, batch_size=args.batch_size)
        )
    else:
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
            model.predict(
                prediction.text_tensor(examples.inputs), batch_size=args.batch_size, verbose=0
            )
        )
    metrics = report.classification_metrics(labels, probabilities, class_names)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
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
    model_path, run_dir = runs.resolve_run(args.run_dir, args.model, "export")
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
    source = (
        prediction.calibration_source(args.calibration_data, run_dir)
        if args.quantize == "int8"
        else None
    )
    model = runs.load_model(model_path)
    if not args.output:  # the run's own entry: recorded in its manifest before it is written
        output = runs.run_entry(run_dir, name)
        if not savedmodel:
            runs.run_entry(run_dir, name + export.TFLITE_SIDECAR_SUFFIX)
    if savedmodel:
        print(export.export_saved_model(model, output))
        return 0
    kind = runs.input_kind(model)
    representative = None
    if source is not None and kind is not None:
        size = input_size or (runs.image_size(model, model_path) if kind == "image" else None)
        representative = prediction.calibration_inputs(source, kind, run_dir, size)
    print(
        export.export_tflite(
            model,
            output,
            quantize=args.quantize,
            representative_data=representative,
            input_size=input_size,
            class_names=runs.run_class_names(run_dir, model, args.class_names),
        )
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
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


def _fine_tuning_recipe(args: argparse.Namespace, command: str, why: str = ""):
    """(module, config) of a fine-tuning recipe from TARGET, --set and the recipe's flags."""
    module, config = resolve(args.target, args.set)
    if not isinstance(config, RecipeConfig) or not hasattr(module, "build_model"):
        raise TfxferError(
            f"{command} is for the fine-tuning recipes (bert_text_classifier, "
            f"resnet50_image_classifier, ...); {args.target!r} is not one.{why}"
        )
    if args.recipe_flags:
        config, _ = type(config).parse_flags(
            args.recipe_flags, prog=f"tfxfer {command} {args.target}", defaults=config
        )
    return module, config


def _cmd_lr_find(args: argparse.Namespace) -> int:
    module, config = _fine_tuning_recipe(
        args,
        "lr-find",
        " A pretraining recipe has one learning rate: try a few on a short run.",
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


def _cmd_rank(args: argparse.Namespace) -> int:
    module, config = _fine_tuning_recipe(args, "rank")
    cli_logging()
    # With --json, stdout carries the JSON lines alone: what building prints goes to stderr.
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet_stdout:
        ranking = rank_candidates(
            config,
            module.build_data,
            module.build_model,
            args.candidates,
            metric=args.metric or config.rank_metric,
            output_dir=args.output,
            overwrite=args.overwrite,
        )
    if args.json:
        print("\n".join(ranking_lines(ranking)))
    else:
        print(ranking_table(ranking))
    best = winner(ranking)  # none: one line naming every candidate's reason, status 2
    if not args.json:
        print(
            f"[tfxfer] best: {best} ({ranking['seconds']:.0f} s); rank.json and rank.png in "
            f"{ranking['output_dir']}"
        )
    return 0


def _command(commands, name: str, run: Callable[[argparse.Namespace], int], help: str):
    """A subcommand's parser, which runs `run` and takes --debug after the command too."""
    sub = commands.add_parser(name, help=help)
    # SUPPRESS keeps `tfxfer --debug predict` working.
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub.set_defaults(run=run)
    return sub


def _add_recipe_arguments(sub: argparse.ArgumentParser, set_help: str) -> None:
    """The arguments `train` and `lr-find` share: the recipe or config file, and --set."""
    sub.add_argument("target", metavar="RECIPE_OR_CONFIG", help="recipe name or config file")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _add_train(commands) -> None:
    train = _command(
        commands, "train", _cmd_train, "train with a recipe or a YAML/JSON config file"
    )
    train.description = (
        "Runs a recipe (a name in recipes/, e.g. bert_text_classifier) or a config file whose "
        "`recipe:` key names one (recipes/configs/ has one per recipe; a run's config.json is "
        "one too). Keys are the recipe's fields; the recipe's own flags (--data-dir ...) may "
        "follow and win over the file. `tfxfer train NAME --print-config` lists a recipe's "
        "keys with their help; `python -m recipes.NAME --help` its flags."
    )
    _add_recipe_arguments(
        train, "override a key (repeatable; nested: --set stages.1.epochs=3; null for none)"
    )
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and stop"
    )
    train.add_argument(
        "--quiet", action="store_true", help="only warnings, errors and the end-of-run summary"
    )


def _add_lr_find(commands) -> None:
    lr = _command(commands, "lr-find", _cmd_lr_find, "the learning-rate range test for a stage")
    lr.description = (
        "Trains the stages before --stage, then runs a range test for it (exponentially "
        "growing learning rate, one step each, weights put back) and suggests a rate. Writes "
        "lr_find.png and lr_find.json to --output (default: the config's output_dir + "
        "'-lr-find'). In a recipe, --head-learning-rate auto / --finetune-learning-rate auto "
        "do this at the stage's start."
    )
    _add_recipe_arguments(lr, "override a key")
    lr.add_argument("--stage", help="the stage's name (default: the last stage, fine-tuning)")
    lr.add_argument("--steps", type=int, help="steps of the test (default: 100)")
    lr.add_argument("--output", help="folder for lr_find.png / lr_find.json")
    lr.add_argument(
        "--overwrite", action="store_true", help="replace an earlier lr-find output folder"
    )


def _add_rank(commands) -> None:
    rank = _command(
        commands, "rank", _cmd_rank, "score candidate backbones on your data before training"
    )
    rank.description = (
        "Builds the recipe's model with each candidate backbone, extracts the frozen pooled "
        "features of the training split once, and scores how well they suit the labels "
        "(LogME, or the H-score), without training. Prints a table and writes rank.json and "
        "rank.png to --output (default: the config's output_dir + '-rank'). Fine-tune the "
        "winner, or let a run do both: --backbone auto --candidates a,b,c."
    )
    _add_recipe_arguments(rank, "override a key")
    rank.add_argument(
        "--candidates",
        required=True,
        help="backbones as --backbone takes them, comma-separated; NAME@WEIGHTS sets weights "
        "(resnet50@none, efficientnetv2b0@imagenet, minilm-l6@none)",
    )
    rank.add_argument(
        "--metric",
        default=None,
        help="logme (any task) or hscore (classification); default: the config's rank_metric, "
        "logme",
    )
    rank.add_argument("--json", action="store_true", help="one JSON object per candidate")
    rank.add_argument("--output", help="folder for rank.json / rank.png")
    rank.add_argument("--overwrite", action="store_true", help="replace an earlier ranking there")


def _add_predict(commands) -> None:
    predict = _command(commands, "predict", _cmd_predict, "predict with a finished run, in batches")
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


def _add_evaluate(commands) -> None:
    evaluate = _command(
        commands, "evaluate", _cmd_evaluate, "metrics of a saved model.keras on labelled data"
    )
    evaluate.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory")
    evaluate.add_argument("--model", help="a model.keras (instead of RUN_DIR)")
    evaluate.add_argument("--class-names", help="defaults to class_names.json beside the model")
    evaluate.add_argument("--images-dir", help="a folder with one subfolder per class")
    evaluate.add_argument("--text-file", help="a CSV/JSONL file with texts and labels")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--batch-size", type=int, default=32)


def _add_export(commands) -> None:
    sub = _command(
        commands, "export", _cmd_export, "export a run's model as a SavedModel or TFLite"
    )
    sub.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory")
    sub.add_argument("--model", help="a model.keras (instead of RUN_DIR)")
    sub.add_argument("--format", default="savedmodel", help="savedmodel (default) or tflite")
    sub.add_argument("--quantize", help="tflite only: dynamic, float16 or int8")
    sub.add_argument(
        "--calibration-data",
        help="int8: a folder of images or a file of texts (default: the run's training data)",
    )
    sub.add_argument(
        "--input-size", help="tflite images: SIDE or HxW the file takes (default: the run's)"
    )
    sub.add_argument("--class-names", help="defaults to the run's class_names.json")
    sub.add_argument(
        "--output",
        help="default: RUN_DIR/export/ (savedmodel), RUN_DIR/model[-QUANTIZE].tflite (tflite)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `tfxfer` command's argument parser, one subcommand per `_add_*` function."""
    parser = OneLineParser(prog="tfxfer", description="Transfer learning on Keras 3.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    _command(commands, "backbones", _cmd_backbones, "list the named backbones")
    for add in (_add_train, _add_lr_find, _add_rank, _add_predict, _add_evaluate, _add_export):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `tfxfer` command; returns its exit status (0, 2 for bad input, 1 for a bug)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "lr-find", "rank"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.recipe_flags = extra
    return error_boundary(lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
