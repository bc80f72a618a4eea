"""Two `few_labels.py` runs of the same splits, side by side: what a change did, run by run.

`few_labels.py --save-json` keeps every child's measurement. Given the file of a run before a
change and one after it (the same sets, budgets and seeds, so the same splits: the script
checks the training data's digest), this prints, per (set, budget), tfxfer's test accuracy
before and after (mean and per seed), the best baseline's from either file, and how often
LP-FT kept the fine-tuned model; then every run with the selection's paired figures where the
run recorded them. It runs nothing; it reads the two files.

    .venv/bin/python benchmarks/compare_runs.py BEFORE.json AFTER.json \\
        --label "LP-FT paired rule" --section lpft_choice
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import facts_markdown, machine_facts, markdown_table, replace_section

BASELINES = ("pixels-lr", "features-lr", "minilm-lr", "tfidf-lr", "keras-hub")


def _key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["dataset"], str(row["budget"]), int(row["seed"])


def _order(key: tuple[str, str, int]) -> tuple:
    """Sets by name, budgets by size ("all" last), seeds by number."""
    dataset, budget, seed = key
    return dataset, int(budget) if budget.isdigit() else float("inf"), seed


def _tfxfer(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {_key(r): r for r in rows if r["variant"] == "tfxfer" and "test_accuracy" in r}


def _best_baseline(rows: list[dict[str, Any]], dataset: str, budget: str, seeds) -> tuple:
    """The baseline with the best mean over `seeds`, and its accuracy per seed."""
    best = None
    for variant in BASELINES:
        found = {
            _key(r)[2]: r["test_accuracy"]
            for r in rows
            if r["variant"] == variant
            and "test_accuracy" in r
            and (r["dataset"], str(r["budget"])) == (dataset, budget)
        }
        if all(seed in found for seed in seeds):
            scores = [found[seed] for seed in seeds]
            if best is None or statistics.mean(scores) > statistics.mean(best[1]):
                best = (variant, scores)
    return best


def _cell(scores: list[float]) -> str:
    return f"{100 * statistics.mean(scores):.1f}% ({', '.join(f'{100 * s:.1f}' for s in scores)})"


def compare(before: list[dict], after: list[dict]) -> tuple[str, list[str]]:
    """The two tables (markdown) and the digests that did not match."""
    old, new = _tfxfer(before), _tfxfer(after)
    mismatched = [
        "/".join(map(str, key))
        for key in sorted(old.keys() & new.keys(), key=_order)
        if old[key].get("train_digest") != new[key].get("train_digest")
    ]
    groups: dict[tuple[str, str], list[int]] = {}
    for key in sorted(old.keys() & new.keys(), key=_order):
        groups.setdefault(key[:2], []).append(key[2])
    summary = []
    for (dataset, budget), seeds in groups.items():
        a = [old[(dataset, budget, s)]["test_accuracy"] for s in seeds]
        b = [new[(dataset, budget, s)]["test_accuracy"] for s in seeds]
        base = _best_baseline(before + after, dataset, budget, seeds)
        summary.append(
            [
                dataset,
                budget,
                ", ".join(map(str, seeds)),
                _cell(a),
                _cell(b),
                ", ".join(f"{100 * (y - x):+.1f}" for x, y in zip(a, b, strict=True)),
                f"{base[0]} {_cell(base[1])}" if base else "-",
                f"{sum(old[(dataset, budget, s)].get('kept') == 'finetuned' for s in seeds)}"
                f" / {sum(new[(dataset, budget, s)].get('kept') == 'finetuned' for s in seeds)}",
            ]
        )
    runs = []
    for key in sorted(old.keys() & new.keys(), key=_order):
        paired = (new[key].get("selection") or {}).get("paired") or {}
        runs.append(
            [
                *map(str, key),
                f"{100 * old[key]['test_accuracy']:.1f}% ({old[key].get('kept')})",
                f"{100 * new[key]['test_accuracy']:.1f}% ({new[key].get('kept')})",
                new[key].get("val_examples", "-"),
                f"{paired['mean_gain']:+.3f}" if paired else "-",
                f"{paired['standard_error']:.3f}" if paired else "-",
            ]
        )
    tables = "\n\n".join(
        [
            markdown_table(
                [
                    "set",
                    "labels per class",
                    "seeds",
                    "before: mean (per seed)",
                    "after: mean (per seed)",
                    "after - before (points, per seed)",
                    "best baseline: mean (per seed)",
                    "kept finetuned before / after",
                ],
                summary,
            ),
            "Per run (after: the selection's per-example validation loss gain of the "
            "fine-tuned model over the probe, and its standard error):",
            markdown_table(
                [
                    "set",
                    "labels per class",
                    "seed",
                    "before (kept)",
                    "after (kept)",
                    "validation examples",
                    "mean gain",
                    "standard error",
                ],
                runs,
            ),
        ]
    )
    return tables, mismatched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="few_labels.py --save-json file of the earlier run")
    parser.add_argument("after", help="the same of the later run")
    parser.add_argument("--label", default="the change", help="what changed, for the record")
    parser.add_argument("--section", help="write the tables to this benchmarks/README.md section")
    args = parser.parse_args(argv)
    before = json.loads(Path(args.before).read_text(encoding="utf-8"))
    after = json.loads(Path(args.after).read_text(encoding="utf-8"))
    tables, mismatched = compare(before, after)
    if mismatched:
        print(f"different training data in: {', '.join(mismatched)}", file=sys.stderr)
        return 1
    body = "\n\n".join(
        [
            facts_markdown(machine_facts(), 0.0),
            f"- compared: `{args.before}` (before) and `{args.after}` (after {args.label}); "
            "same splits (training data digests equal)",
            tables,
        ]
    )
    print(body)
    if args.section:
        replace_section(args.section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
