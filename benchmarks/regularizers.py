"""Regularised fine-tuning with few labels: plain vs L2-SP vs feature distance, real texts.

The joint objective L_T + λ·L_S (`Stage(regularizer=...)`, recipe `--regularizer`) should
matter most when labels are few. This runs the default text recipe (pretrained MiniLM-L6)
on the Debian package descriptions of `real_text.py` (8 archive sections, 50 test texts per
class) with 8, 16 and 64 training texts per class, three ways:

  plain     the recipe's defaults (fine-tuning with AdamW's decay towards zero)
  l2sp      --regularizer l2sp --regularizer-weight L2SP_WEIGHT
  features  --regularizer features --regularizer-weight FEATURES_WEIGHT

The training texts of each size are the first K per class of one 64-per-class draw (nested:
the 8 are among the 16), the test texts are the same for all sizes of a seed. λ was chosen on
seed 3 (`--seeds 3 --lambdas ...`), which the table's seeds 0, 1, 2 do not include.

    .venv/bin/python benchmarks/regularizers.py                  # seeds 0 1 2, README
    .venv/bin/python benchmarks/regularizers.py --seeds 3 --sizes 16 --no-readme \\
        --l2sp-weight 100 --features-weight 10                    # choosing λ
    .venv/bin/python benchmarks/regularizers.py --sizes 16 --finetune-learning-rate 2e-4 \\
        --section regularizers_high_lr                            # a 4x higher rate
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import (
    add_common_arguments,
    facts_markdown,
    machine_facts,
    markdown_table,
    replace_section,
    run_child,
)
from real_text import DEFAULT_DATA_ROOT, build
from real_text import SCRIPT as REAL_TEXT

SECTION = "regularizers"
POOL_PER_CLASS = 64
VARIANTS = ("plain", "l2sp", "features")


def subsample(folder: Path, per_class: int) -> Path:
    """The first `per_class` training texts of each class (the file is shuffled)."""
    out = folder / f"train-first{per_class}.csv"
    with open(folder / "train.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept, seen = [], defaultdict(int)
    for row in rows:
        if seen[row["label"]] < per_class:
            kept.append(row)
            seen[row["label"]] += 1
    with open(out, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    return out


def recipe_set(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.finetune_learning_rate is not None:
        fields["finetune_learning_rate"] = args.finetune_learning_rate
    if variant == "plain":
        return fields
    weight = args.l2sp_weight if variant == "l2sp" else args.features_weight
    return {**fields, "regularizer": variant, "regularizer_weight": weight}


def _mean_range(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}%"
    return f"{statistics.mean(values):.1f}% ({min(values):.1f}-{max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--l2sp-weight", type=float, default=100.0)
    parser.add_argument("--features-weight", type=float, default=1.0)
    parser.add_argument(
        "--finetune-learning-rate", type=float, default=None, help="default: the recipe's"
    )
    parser.add_argument("--section", default=SECTION, help="README section to write")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    started, facts = time.perf_counter(), machine_facts()
    data_root = Path(args.data_root).expanduser()
    runs: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    orders = []
    for i, seed in enumerate(args.seeds):
        folder = data_root / f"seed-{seed}-train{POOL_PER_CLASS}"
        if not (folder / "train.csv").exists():
            build(seed, data_root, train_per_class=POOL_PER_CLASS)
        for size in args.sizes:
            train = subsample(folder, size)
            order = variants if (i + args.sizes.index(size)) % 2 == 0 else variants[::-1]
            orders.append((seed, size, order))
            for variant in order:
                spec = {
                    "variant": "a",
                    "seed": seed,
                    "train": str(train),
                    "test": str(folder / "test.csv"),
                    "recipe_set": recipe_set(variant, args),
                }
                result = run_child(REAL_TEXT, spec, f"{variant}, {size}/class, seed {seed}")
                print(
                    f"     test accuracy {100 * result['test_accuracy']:.1f}%, wall "
                    f"{result['wall_s']:.0f} s",
                    flush=True,
                )
                runs[(size, variant)].append(result | {"seed": seed})
    body = results(runs, args, variants, orders)
    print("\n" + body + "\n", flush=True)
    if not args.no_readme:
        wall = time.perf_counter() - started
        replace_section(args.section, facts_markdown(facts, wall) + "\n\n" + body)
    return 0


def results(runs, args, variants, orders) -> str:
    weights = f"λ: l2sp {args.l2sp_weight:g}, features {args.features_weight:g}"
    if args.finetune_learning_rate is not None:
        weights += f"; fine-tuning learning rate {args.finetune_learning_rate:g}"
    headers = ["labels per class", *[f"{v} test accuracy" for v in variants]]
    others = [v for v in variants if v != "plain"]
    if "plain" in variants:
        headers += [f"{v} - plain, points per seed" for v in others]
        headers += [f"{v} / plain wall" for v in others]
    rows = []
    for size in args.sizes:
        row = [
            size,
            *[_mean_range([100 * r["test_accuracy"] for r in runs[(size, v)]]) for v in variants],
        ]
        if "plain" in variants:
            plain = runs[(size, "plain")]
            for v in others:
                deltas = [
                    100 * (r["test_accuracy"] - p["test_accuracy"])
                    for r, p in zip(runs[(size, v)], plain, strict=True)
                ]
                row.append(
                    ", ".join(f"{d:+.1f}" for d in deltas)
                    + f" (mean {statistics.mean(deltas):+.1f})"
                )
            for v in others:
                ratios = [
                    r["wall_s"] / p["wall_s"] for r, p in zip(runs[(size, v)], plain, strict=True)
                ]
                row.append(f"{min(ratios):.2f}-{max(ratios):.2f}")
        rows.append(row)
    order_note = "; ".join(f"seed {s} {k}/class: {','.join(o)}" for s, k, o in orders)
    return "\n\n".join(
        [
            f"- seeds {args.seeds}; {weights}; recipe defaults otherwise; test: 400 texts "
            f"(50 per class) per seed",
            markdown_table(headers, rows),
            f"Order of the runs (alternating): {order_note}.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
