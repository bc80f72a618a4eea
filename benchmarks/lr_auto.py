"""The learning-rate range test's rates against the text recipe's hand-set default.

Does `tfxfer lr-find` (the range test `--finetune-learning-rate auto` runs at the stage's
start) pick a fine-tuning rate at least as good as the text recipe's default of 5e-5? On
the Debian package descriptions of `real_text.py` (8 archive sections, 50 test texts per
class), pretrained MiniLM-L6, 16 training texts per class (the first 16 per class of the
64-per-class draw `regularizers.py` uses), seeds 0 1 2. Per seed, in fresh processes:

  1. `tfxfer.recipe.find_learning_rate` for the fine-tuning stage (the head stage trains
     first, as in the run; 100 steps): its suggestion (the smoothed loss's minimum / 10, what
     `auto` trains at) and its steepest point;
  2. the recipe three times: at the default rate, at the suggestion (what `auto` does: the
     same seed and data give the same head and the same test), and at the steepest point.

    .venv/bin/python benchmarks/lr_auto.py                  # seeds 0 1 2, README
    .venv/bin/python benchmarks/lr_auto.py --seeds 0 --no-readme
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import (
    add_common_arguments,
    dispatch,
    emit_result,
    facts_markdown,
    machine_facts,
    markdown_table,
    quiet_tensorflow,
    replace_section,
    run_child,
)
from real_text import DEFAULT_DATA_ROOT, build
from real_text import SCRIPT as REAL_TEXT
from regularizers import POOL_PER_CLASS, _mean_range, subsample

SCRIPT = str(Path(__file__).resolve())
SECTION = "lr_auto"
PER_CLASS = 16
VARIANTS = ("default 5e-5", "auto (suggestion)", "steepest")


def child(spec: dict[str, Any]) -> None:
    """The range test for the fine-tuning stage of the text recipe on `spec`'s data."""
    quiet_tensorflow()
    import tempfile
    import time as clock

    from recipes.bert_text_classifier import Config, build_data, build_model
    from tfxfer.recipe import find_learning_rate

    with tempfile.TemporaryDirectory(prefix="tfxfer-bench-") as tmp:
        config = Config(train=spec["train"], output_dir=f"{tmp}/run", seed=spec["seed"], verbose=0)
        started = clock.process_time()
        found = find_learning_rate(config, build_data, build_model, stage="finetune")
        cpu = clock.process_time() - started
    finding = found["finding"]
    emit_result(
        {
            "suggestion": finding.suggestion,
            "steepest": finding.steepest,
            "minimum": finding.minimum,
            "fell": finding.fell,
            "steps": len(finding.losses),
            "cpu_s": cpu,
        }
    )


def parent(args: argparse.Namespace) -> int:
    started, facts = time.perf_counter(), machine_facts()
    data_root = Path(args.data_root).expanduser()
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    tests, orders = [], []
    for i, seed in enumerate(args.seeds):
        folder = data_root / f"seed-{seed}-train{POOL_PER_CLASS}"
        if not (folder / "train.csv").exists():
            build(seed, data_root, train_per_class=POOL_PER_CLASS)
        train = subsample(folder, PER_CLASS)
        test = run_child(SCRIPT, {"seed": seed, "train": str(train)}, f"range test, seed {seed}")
        print(f"     {test}", flush=True)
        tests.append(test | {"seed": seed})
        rates = {
            "default 5e-5": 5e-5,
            "auto (suggestion)": test["suggestion"],
            "steepest": test["steepest"],
        }
        order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
        orders.append((seed, order))
        for variant in order:
            spec = {
                "variant": "a",
                "seed": seed,
                "train": str(train),
                "test": str(folder / "test.csv"),
                "recipe_set": {"finetune_learning_rate": rates[variant]},
            }
            result = run_child(REAL_TEXT, spec, f"{variant} ({rates[variant]:.2g}), seed {seed}")
            print(
                f"     test accuracy {100 * result['test_accuracy']:.1f}%, wall "
                f"{result['wall_s']:.0f} s, cpu {result['cpu_s']:.0f} s",
                flush=True,
            )
            runs[variant].append(result | {"seed": seed, "rate": rates[variant]})
    body = results(runs, tests, args, orders)
    print("\n" + body + "\n", flush=True)
    if not args.no_readme:
        wall = time.perf_counter() - started
        replace_section(SECTION, facts_markdown(facts, wall) + "\n\n" + body)
    return 0


def results(runs, tests, args, orders) -> str:
    headers = ["fine-tuning rate", "rates per seed", "test accuracy", "- default, points per seed"]
    headers += ["recipe CPU time / default"]
    base = runs["default 5e-5"]
    rows = []
    for variant in VARIANTS:
        done = runs[variant]
        deltas = [
            100 * (r["test_accuracy"] - b["test_accuracy"]) for r, b in zip(done, base, strict=True)
        ]
        ratios = [r["cpu_s"] / b["cpu_s"] for r, b in zip(done, base, strict=True)]
        rows.append(
            [
                variant,
                " / ".join(f"{r['rate']:.2g}" for r in done),
                _mean_range([100 * r["test_accuracy"] for r in done]),
                ""
                if variant == VARIANTS[0]
                else "/".join(f"{d:+.1f}" for d in deltas)
                + f" (mean {statistics.mean(deltas):+.1f})",
                "" if variant == VARIANTS[0] else f"{min(ratios):.2f}-{max(ratios):.2f}",
            ]
        )
    test_cpu = [t["cpu_s"] / b["cpu_s"] for t, b in zip(tests, base, strict=True)]
    flat = [t["seed"] for t in tests if not t["fell"]]
    order_note = "; ".join(f"seed {s}: {', '.join(o)}" for s, o in orders)
    return "\n\n".join(
        [
            f"- seeds {args.seeds}; {PER_CLASS} training texts per class (8 classes), 400 test "
            "texts per seed; text recipe defaults otherwise (MiniLM-L6, 4 head epochs at 3e-3, "
            "3 fine-tuning epochs)",
            markdown_table(headers, rows),
            f"The range test itself (head stage + {tests[0]['steps']} steps, a process of its "
            f"own) took {min(test_cpu):.2f}-{max(test_cpu):.2f}x the CPU time of a whole "
            "default run; it is what `auto` adds to a run. "
            + (f"Seeds with a flat curve (fallback rate): {flat}. " if flat else "")
            + f"Order of the runs (alternating): {order_note}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
