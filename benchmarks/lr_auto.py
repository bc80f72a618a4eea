"""Learning rates by range test (`--*-learning-rate auto`) against the recipe's defaults.

Does the range test (`tfxfer.lr_find`, run at a stage's start when its rate is "auto") pick
rates at least as good as the text recipe's hand-set defaults (head 3e-3, fine-tuning 5e-5)?
On the Debian package descriptions of `real_text.py` (8 archive sections, 50 test texts per
class), pretrained MiniLM-L6, 16 and 64 training texts per class (the first K per class of one
64-per-class draw, as `regularizers.py` does), seeds 0 1 2, three ways:

  defaults       the recipe's defaults
  finetune auto  --finetune-learning-rate auto (the head keeps 3e-3)
  both auto      --head-learning-rate auto --finetune-learning-rate auto

    .venv/bin/python benchmarks/lr_auto.py                  # seeds 0 1 2, sizes 16 64, README
    .venv/bin/python benchmarks/lr_auto.py --seeds 0 --sizes 16 --no-readme
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import facts_markdown, machine_facts, markdown_table, replace_section, run_child
from real_text import DEFAULT_DATA_ROOT, build
from real_text import SCRIPT as REAL_TEXT
from regularizers import POOL_PER_CLASS, subsample

SECTION = "lr_auto"
VARIANTS = {
    "defaults": {},
    "finetune auto": {"finetune_learning_rate": "auto"},
    "both auto": {"head_learning_rate": "auto", "finetune_learning_rate": "auto"},
}


def _mean_range(values: list[float], digits: int = 1, unit: str = "%") -> str:
    spread = f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{unit}{spread}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--no-readme", action="store_true", help="print, do not write README")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    started, facts = time.perf_counter(), machine_facts()
    data_root = Path(args.data_root).expanduser()
    runs: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    orders = []
    for i, seed in enumerate(args.seeds):
        folder = data_root / f"seed-{seed}-train{POOL_PER_CLASS}"
        if not (folder / "train.csv").exists():
            build(seed, data_root, train_per_class=POOL_PER_CLASS)
        for j, size in enumerate(args.sizes):
            train = subsample(folder, size)
            order = variants if (i + j) % 2 == 0 else variants[::-1]
            orders.append((seed, size, order))
            for variant in order:
                spec = {
                    "variant": "a",
                    "seed": seed,
                    "train": str(train),
                    "test": str(folder / "test.csv"),
                    "recipe_set": VARIANTS[variant],
                }
                result = run_child(REAL_TEXT, spec, f"{variant}, {size}/class, seed {seed}")
                print(
                    f"     test accuracy {100 * result['test_accuracy']:.1f}%, rates found "
                    f"{result['found_learning_rates']}, wall {result['wall_s']:.0f} s, cpu "
                    f"{result['cpu_s']:.0f} s",
                    flush=True,
                )
                runs[(size, variant)].append(result | {"seed": seed})
    body = results(runs, args, variants, orders)
    print("\n" + body + "\n", flush=True)
    if not args.no_readme:
        replace_section(
            SECTION, facts_markdown(facts, time.perf_counter() - started) + "\n\n" + body
        )
    return 0


def results(runs, args, variants, orders) -> str:
    headers = ["labels per class", "variant", "test accuracy", "- defaults, points per seed"]
    headers += ["rates found (head; fine-tuning)", "CPU time / defaults"]
    rows = []
    for size in args.sizes:
        base = runs.get((size, "defaults"))
        for variant in variants:
            done = runs[(size, variant)]
            accuracy = _mean_range([100 * r["test_accuracy"] for r in done])
            if base and variant != "defaults":
                deltas = [
                    100 * (r["test_accuracy"] - b["test_accuracy"])
                    for r, b in zip(done, base, strict=True)
                ]
                delta = (
                    "/".join(f"{d:+.1f}" for d in deltas)
                    + f" (mean {statistics.mean(deltas):+.1f})"
                )
                ratios = [r["cpu_s"] / b["cpu_s"] for r, b in zip(done, base, strict=True)]
                cpu = f"{min(ratios):.2f}-{max(ratios):.2f}"
            else:
                delta, cpu = "", ""
            found = "; ".join(
                ", ".join(
                    f"{r['found_learning_rates'][s]:.2g}" if s in r["found_learning_rates"] else "-"
                    for s in ("head", "finetune")
                )
                for r in done
            )
            rows.append(
                [size, variant, accuracy, delta, found if variant != "defaults" else "", cpu]
            )
    order_note = "; ".join(f"seed {s} {k}/class: {', '.join(o)}" for s, k, o in orders)
    return "\n\n".join(
        [
            f"- seeds {args.seeds}; text recipe defaults otherwise (MiniLM-L6, 4 head epochs at "
            "3e-3, 3 fine-tuning epochs at 5e-5); test: 400 texts (50 per class) per seed",
            markdown_table(headers, rows),
            f"Order of the runs (alternating): {order_note}.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
