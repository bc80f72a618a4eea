"""Command-line plumbing: flags from a recipe's `Config` dataclass, clean errors, `tfxfer`.

A recipe's flags are its `Config` fields (`image_size` becomes `--image-size`), so the two
never drift apart. `run_recipe` runs a recipe's `main` and turns a `TfxferError` into its
message and exit status 2: a user with a wrong path reads one sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any

from tfxfer.errors import TfxferError


def _parse_list_of_ints(text: str) -> list[int]:
    return [int(part) for part in text.replace(",", " ").split()] if text.strip() else []


def cli_config(parser: argparse.ArgumentParser, config_cls: type, argv: list[str] | None = None):
    """Adds one flag per field of `config_cls` to `parser`, parses `argv`, returns a config."""
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls()
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        default = getattr(defaults, field.name)
        kind = typing.get_args(hint) or (hint,)
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(hint) is list:
            parser.add_argument(flag, type=_parse_list_of_ints, default=default,
                                help=f"comma-separated integers (default: {default})")
        elif int in kind and hint is not bool:
            parser.add_argument(flag, type=int, default=default, help=f"(default: {default})")
        elif float in kind:
            parser.add_argument(flag, type=float, default=default, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=str, default=default, help=f"(default: {default})")
    args = parser.parse_args(argv)
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def run_recipe(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> int:
    """Runs a recipe from the command line: exit 0 on success, 2 with a message on bad input."""
    # tfxfer's own INFO lines (skipped files, resume points); other libraries' only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s %(message)s")
    logging.getLogger("tfxfer").setLevel(logging.INFO)
    config = parse_args()
    try:
        main(config)
    except TfxferError as error:
        print(f"tfxfer: error: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from tfxfer.backbones import known_backbones

    print(json.dumps(known_backbones(), indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from tfxfer.export import load_model

    model = load_model(args.model)
    class_names = None
    if args.class_names:
        with open(args.class_names, encoding="utf-8") as handle:
            class_names = json.load(handle)
    if args.images:
        import tensorflow as tf

        for path in args.images:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            probabilities = np.asarray(model.predict(image[None], verbose=0))[0]
            _print_prediction(path, probabilities, class_names)
    for text in args.texts or []:
        probabilities = np.asarray(model.predict(np.array([text]), verbose=0))[0]
        _print_prediction(text, probabilities, class_names)
    return 0


def _read_class_names(args: argparse.Namespace) -> list[str]:
    import os

    path = args.class_names or os.path.join(os.path.dirname(os.path.abspath(args.model)),
                                            "class_names.json")
    if not os.path.exists(path):
        raise TfxferError(f"Class names not found at {path!r}; pass --class-names run/class_names.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from tfxfer import report
    from tfxfer.export import load_model

    model = load_model(args.model)
    class_names = _read_class_names(args)
    if args.images_dir:
        from tfxfer.data.images import make_image_dataset, scan_image_folder

        files = scan_image_folder(args.images_dir, class_names)
        size = model.get_layer("image_preprocessing").image_size
        labels, probabilities = report.collect(
            model, make_image_dataset(files, image_size=size, batch_size=args.batch_size))
    elif args.text_file:
        from tfxfer.data.text import load_text_file
        from tfxfer.errors import DataError

        data = load_text_file(args.text_file, text_column=args.text_column,
                              label_column=args.label_column, val_split=0)
        unknown = sorted(set(data.class_names) - set(class_names))
        if unknown:
            raise DataError(f"Labels {unknown} in {args.text_file!r} are not among the model's "
                            f"classes {class_names}.")
        index = [class_names.index(name) for name in data.class_names]
        labels = np.asarray(index)[data.train.labels]
        probabilities = np.asarray(model.predict(list(data.train.texts),
                                                 batch_size=args.batch_size, verbose=0))
    else:
        raise TfxferError("Pass --images-dir DIR or --text-file FILE to evaluate on.")
    metrics = report.classification_metrics(labels, probabilities, class_names)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tfxfer.export import export_saved_model, load_model

    print(export_saved_model(load_model(args.model), args.output))
    return 0


def _print_prediction(name: str, probabilities, class_names) -> None:
    best = int(probabilities.argmax())
    label = class_names[best] if class_names else best
    print(json.dumps({"input": name, "label": label, "probability": float(probabilities[best])}))


def main(argv: list[str] | None = None) -> int:
    """The `tfxfer` command."""
    parser = argparse.ArgumentParser(prog="tfxfer", description="Transfer learning on Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backbones", help="list the named backbones").set_defaults(run=_cmd_backbones)
    predict = commands.add_parser("predict", help="predict with a saved model.keras")
    predict.add_argument("--model", required=True, help="path to a run's model.keras")
    predict.add_argument("--class-names", help="path to a run's class_names.json")
    predict.add_argument("--images", nargs="*", help="image files")
    predict.add_argument("--texts", nargs="*", help="texts")
    predict.set_defaults(run=_cmd_predict)
    evaluate = commands.add_parser("evaluate", help="metrics of a saved model.keras on labelled data")
    evaluate.add_argument("--model", required=True, help="path to a run's model.keras")
    evaluate.add_argument("--class-names", help="defaults to class_names.json beside the model")
    evaluate.add_argument("--images-dir", help="a folder with one subfolder per class")
    evaluate.add_argument("--text-file", help="a CSV/JSONL file with texts and labels")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.set_defaults(run=_cmd_evaluate)
    export = commands.add_parser("export", help="export a saved model.keras as a SavedModel")
    export.add_argument("--model", required=True, help="path to a run's model.keras")
    export.add_argument("--output", required=True, help="directory for the SavedModel")
    export.set_defaults(run=_cmd_export)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except TfxferError as error:
        print(f"tfxfer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
