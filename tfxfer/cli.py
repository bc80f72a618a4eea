"""The `tfxfer` command (backbones, predict, evaluate, export) and the one error boundary.

`error_boundary` turns a `TfxferError` into its message and exit status 2, for this command
and for every recipe run from the command line (`tfxfer.recipe.command_line`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from tfxfer.errors import TfxferError


def error_boundary(action: Callable[[], Any]) -> int:
    """Runs `action`: exit status 0, or 2 with the message alone for a `TfxferError`.

    A user with a wrong path reads one sentence, not a traceback. Any other exception is a
    bug in tfxfer and keeps its traceback.
    """
    try:
        action()
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

    path = args.class_names or os.path.join(
        os.path.dirname(os.path.abspath(args.model)), "class_names.json"
    )
    if not os.path.exists(path):
        raise TfxferError(
            f"Class names not found at {path!r}; pass --class-names run/class_names.json"
        )
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

        examples = scan_image_folder(args.images_dir, class_names)
        size = model.get_layer("image_preprocessing").image_size
        labels, probabilities = report.collect(
            model, make_image_dataset(examples, image_size=size, batch_size=args.batch_size)
        )
    elif args.text_file:
        from tfxfer.data.text import read_text_file
        from tfxfer.errors import DataError

        examples = read_text_file(
            args.text_file, text_column=args.text_column, label_column=args.label_column
        )
        unknown = sorted(set(examples.class_names) - set(class_names))
        if unknown:
            raise DataError(
                f"Labels {unknown} in {args.text_file!r} are not among the model's "
                f"classes {class_names}."
            )
        index = [class_names.index(name) for name in examples.class_names]
        labels = np.asarray(index)[examples.labels]
        probabilities = np.asarray(
            model.predict(list(examples.inputs), batch_size=args.batch_size, verbose=0)
        )
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
    commands.add_parser("backbones", help="list the named backbones").set_defaults(
        run=_cmd_backbones
    )
    predict = commands.add_parser("predict", help="predict with a saved model.keras")
    predict.add_argument("--model", required=True, help="path to a run's model.keras")
    predict.add_argument("--class-names", help="path to a run's class_names.json")
    predict.add_argument("--images", nargs="*", help="image files")
    predict.add_argument("--texts", nargs="*", help="texts")
    predict.set_defaults(run=_cmd_predict)
    evaluate = commands.add_parser(
        "evaluate", help="metrics of a saved model.keras on labelled data"
    )
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
    return error_boundary(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
