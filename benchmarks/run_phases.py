"""Where a whole default run spends its time, phase by phase (issue 22, part 3).

One fresh process per recipe runs it at its defaults (export and reports included) under
`cProfile`, and reads off the inclusive time of the functions that mark each phase: imports
(timed before the run), data, model, dataset pipeline, SetFit / BatchNorm start, each kind
of stage work (feature extraction, the head solver, Keras `fit`, compiling), checkpoints
(and their hashing), evaluation, reports, saving `model.keras`, the SavedModel export. The
profiler adds its own cost to Python-heavy code, so the whole run is also timed once
without it, in another process, and both totals are shown. Phases nest (checkpoints are
written inside `fit`): read each row as "time spent inside this", not as a share of a sum.

Text: the text recipe on `few_labels.py`'s Debian sections, 64 texts a class, seed 0 (the
default schedule: solved head, then fine-tuning); `--text-set fortunes --text-budget 8` (and
`--section`) profiles a few-label run instead (SetFit, then the solved head alone). Images:
the image recipe on its digits, 64 a class, MobileNetV3Small from random weights at 32 px
(no pretrained weights offline).

    .venv/bin/python benchmarks/run_phases.py            # both, ~6 min; writes the README
    .venv/bin/python benchmarks/run_phases.py --kinds text --no-readme
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    add_common_arguments,
    dispatch,
    emit_result,
    machine_facts,
    markdown_table,
    publish,
    quiet_tensorflow,
    run_child,
)
from few_labels_data import DEFAULT_DATA_ROOT

SECTION = "run_phases"
DATA = Path(DEFAULT_DATA_ROOT).expanduser()  # few_labels.py's splits (`few_labels.py build`)

# (label, file suffix, function name): the functions whose inclusive time marks a phase.
PHASES = [
    ("the recipe's run (after imports)", "tfxfer/recipe/runner.py", "_run"),
    ("  data: read and split", "tfxfer/recipe/task.py", "load_data"),
    ("  model: backbone and head built", "tfxfer/recipe/task.py", "build_task_model"),
    ("  dataset pipelines (tokenization)", "tfxfer/recipe/start.py", "datasets"),
    ("  random backbone's BatchNorm start", "tfxfer/recipe/runner.py", "_from_scratch"),
    ("  SetFit (few labels only)", "tfxfer/recipe/runner.py", "_contrastive_first"),
    ("  the schedule (run_schedule)", "tfxfer/train/run.py", "run_schedule"),
    ("    feature extraction (cached head)", "tfxfer/train/features.py", "extract"),
    ("    head solver", "tfxfer/train/solving.py", "solve_stage"),
    ("    compiling each stage", "tfxfer/train/run.py", "_compile"),
    ("    Keras fit (all epochs)", "keras/src/backend/tensorflow/trainer.py", "fit"),
    ("      checkpoints written", "tfxfer/train/checkpoints.py", "save"),
    ("        of which SHA-256 hashing", "tfxfer/train/checkpoints.py", "_file_record"),
    ("    LP-FT refit / selection", "tfxfer/train/run.py", "_keep_better"),
    ("    head-only refit (no stage trained the backbone)", "tfxfer/train/run.py", "_head_only"),
    ("  finishing (finish_run)", "tfxfer/recipe/finish.py", "finish_run"),
    ("    evaluation (val, test)", "tfxfer/recipe/finish.py", "_evaluate"),
    ("    reports (plots, tables)", "tfxfer/report/writing.py", "write_reports"),
    ("    model.keras", "tfxfer/saving.py", "save_model"),
    ("    SavedModel export", "tfxfer/export/savedmodel.py", "export_saved_model"),
]


def _config(kind: str, output_dir: str, text_set: str, budget: str):
    if kind == "text":
        from recipes.bert_text_classifier import Config

        split = DATA / text_set / "seed-0"
        return Config(
            train=str(split / f"train-{budget}.csv"),
            test=str(split / "test.csv"),
            output_dir=output_dir,
            verbose=0,
            quiet=True,
        )
    from recipes.resnet50_image_classifier import Config

    split = DATA / "digits" / "seed-0"
    return Config(
        data_dir=str(split / "train-64"),
        test_dir=str(split / "test"),
        output_dir=output_dir,
        backbone="mobilenetv3small",
        weights="none",
        image_size=32,
        verbose=0,
        quiet=True,
    )


def child(spec: dict[str, Any]) -> None:
    started = time.perf_counter()
    quiet_tensorflow()
    if spec["kind"] == "text":
        from recipes.bert_text_classifier import main
    else:
        from recipes.resnet50_image_classifier import main
    imports = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="tfxfer-phases-") as tmp:
        config = _config(
            spec["kind"], os.path.join(tmp, "run"), spec["text_set"], spec["text_budget"]
        )
        profiler = cProfile.Profile() if spec["profile"] else None
        run_started = time.perf_counter()
        if profiler:
            profiler.enable()
        result = main(config)
        if profiler:
            profiler.disable()
        run_seconds = time.perf_counter() - run_started
    phases = {}
    if profiler:
        stats = pstats.Stats(profiler).stats
        for label, suffix, name in PHASES:
            phases[label] = sum(
                cumulative
                for (filename, _, function), (_, _, _, cumulative, _) in stats.items()
                if function == name and filename.replace(os.sep, "/").endswith(suffix)
            )
    emit_result(
        {
            "imports_s": imports,
            "run_s": run_seconds,
            "phases": phases,
            "test_accuracy": result["metrics"]["test"]["accuracy"],
        }
    )


def parent(args) -> int:
    started = time.perf_counter()
    facts = machine_facts()
    parts = []
    for kind in args.kinds:
        spec = {"kind": kind, "text_set": args.text_set, "text_budget": args.text_budget}
        plain = run_child(__file__, {**spec, "profile": False}, f"{kind}, unprofiled")
        profiled = run_child(__file__, {**spec, "profile": True}, f"{kind}, profiled")
        rows = [["imports (tfxfer, TensorFlow, Keras, the recipe)", f"{profiled['imports_s']:.1f}"]]
        rows += [[label, f"{seconds:.1f}"] for label, seconds in profiled["phases"].items()]
        title = {
            "text": f"text recipe, {args.text_set}, {args.text_budget} texts a class, seed 0",
            "image": "image recipe, digits, 640 images (64 a class), MobileNetV3Small from "
            "random weights at 32 px, seed 0",
        }[kind]
        parts.append(
            f"**{title}**: the run took {plain['run_s']:.1f} s without the profiler "
            f"({plain['imports_s']:.1f} s of imports before it) and {profiled['run_s']:.1f} s "
            f"under it; test accuracy {100 * plain['test_accuracy']:.1f}%.\n\n"
            + markdown_table(
                ["phase (inclusive; indented rows run inside the one above)", "seconds (profiled)"],
                rows,
            )  # fmt: skip
        )
    body = "\n\n".join(parts)
    publish(args.section, body, facts, started, write=not args.no_readme)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["text", "image"], choices=["text", "image"])
    parser.add_argument("--text-set", default="debian-sections", help="few_labels.py's text set")
    parser.add_argument("--text-budget", default="64", help="texts a class: 4, 8, 16, 64, all")
    parser.add_argument("--section", default=SECTION, help="the benchmarks/README.md section")
    add_common_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return dispatch(args, child, parent)


if __name__ == "__main__":
    sys.exit(main())
