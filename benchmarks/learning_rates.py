"""Fine-tuning learning rates by measurement: which rate should the text recipe default to?

Issue 19, part 7. A fine-tuning rate of 2e-4 beat the default 5e-5 at 16 labels a class on
the Debian set, while 2e-4 lost 2 points at full data on another set: the right rate may
depend on the label budget and the data. This script measures the text recipe, every other
setting at its default, with `finetune_learning_rate` set to each of `--rates` (numbers, or
`auto`: the range test at the stage's start), on `few_labels.py`'s real sets, budgets and
per-seed test splits, each run in a fresh process (`few_labels.py`'s children, with an
`options` override). The order of the rates alternates between seeds. `--settings` compares
other settings the same way (`--settings default contrastive_pairs=20 --section NAME`).

    .venv/bin/python benchmarks/learning_rates.py --budgets 8 --seeds 0 --no-readme  # smoke
    .venv/bin/python benchmarks/learning_rates.py                                    # README
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import few_labels
from common import facts_markdown, machine_facts, markdown_table, replace_section

SECTION = "learning_rates"
DEFAULT_RATES = ["5e-5", "2e-4", "auto"]


def _rate(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def _value(text: str) -> Any:
    """A config value from the command line: an int, a float, true/false, or the text."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def settings_of(args) -> list[tuple[str, dict[str, Any]]]:
    """(column label, config overrides) per compared setting: `--settings`, else `--rates`."""
    if not args.settings:
        return [(f"rate {r}", {"finetune_learning_rate": _rate(r)}) for r in args.rates]
    found = []
    for setting in args.settings:
        options = {}
        for item in filter(None, setting.split(";")) if setting != "default" else []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SystemExit(f"Expected --settings default or KEY=VALUE[;...]. Got {item!r}")
            options[key.strip()] = _value(value.strip())
        found.append((setting, options))
    return found


def run_all(args) -> list[dict[str, Any]]:
    manifests = few_labels.build_all(args)
    runs: list[dict[str, Any]] = []
    for name in few_labels._datasets(args):
        for i, seed in enumerate(args.seeds):
            manifest = manifests[(name, seed)]
            settings = settings_of(args)
            settings = settings if i % 2 == 0 else settings[::-1]
            for budget in args.budgets:
                for setting, options in settings:
                    spec = {
                        "kind": "text",
                        "variant": "tfxfer",
                        "seed": seed,
                        "train": manifest["paths"][budget],
                        "test": manifest["paths"]["test"],
                        "image": {},
                        "options": options,
                    }
                    label = f"{name}, {budget}/class, seed {seed}: {setting}"
                    result = few_labels.run_measured(spec, label, args.child_timeout)
                    runs.append(
                        {"dataset": name, "budget": budget, "seed": seed, "setting": setting,
                         **result}
                    )  # fmt: skip
                    if args.save_json:
                        Path(args.save_json).write_text(json.dumps(runs, indent=1), "utf-8")
    return runs


def table(runs: list[dict[str, Any]], args) -> str:
    labels = [label for label, _ in settings_of(args)]
    headers = ["set", "labels per class", *labels, "best (mean)"]
    headers += ["auto found (per seed)", "kept finetuned / runs", "wall s (median per setting)"]
    rows = []
    for name in dict.fromkeys(r["dataset"] for r in runs):
        for budget in args.budgets:
            cells = {label: [] for label in labels}
            walls = {label: [] for label in labels}
            found, kept, count = [], 0, 0
            for run in runs:
                if run["dataset"] != name or run["budget"] != budget or "error" in run:
                    continue
                cells[run["setting"]].append(100 * run["test_accuracy"])
                walls[run["setting"]].append(run["wall_s"])
                count += 1
                kept += run.get("kept") in (None, "finetuned")
                rate = (run.get("found_learning_rates") or {}).get("finetune")
                if rate is not None:
                    found.append(f"{rate:.2g}")
            means = {label: statistics.mean(v) for label, v in cells.items() if v}
            best = max(means, key=means.get) if means else "-"
            wall = " / ".join(f"{statistics.median(v):.0f}" if v else "-" for v in walls.values())
            rows.append(
                [name, budget, *[few_labels._cell(cells[label]) for label in labels], best,
                 ", ".join(found) or "-", f"{kept} / {count}", wall]
            )  # fmt: skip
    return markdown_table(headers, rows)


def parent(args) -> int:
    started = time.perf_counter()
    facts = machine_facts()
    runs = run_all(args)
    body = "\n\n".join(
        [
            f"- seeds {args.seeds}; budgets {args.budgets} labels per class; test: "
            f"{args.test_per_class} per class, drawn per seed (`few_labels.py`'s splits); "
            "every other setting at the text recipe's default",
            "- cells: test accuracy, mean (min-max) over seeds; 'kept finetuned': runs whose "
            "LP-FT selection kept the fine-tuned model rather than the probe",
            table(runs, args),
        ]
    )
    print("\n" + body + "\n", flush=True)
    if not args.no_readme:
        facts_text = facts_markdown(facts, time.perf_counter() - started)
        replace_section(args.section, facts_text + "\n\n" + body)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="debian-sections,fortunes")
    parser.add_argument("--budgets", nargs="+", default=["8", "64"], help="labels per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rates", nargs="+", default=DEFAULT_RATES, help="numbers or auto")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="instead of --rates: settings to compare, each 'default' or KEY=VALUE[;KEY=VALUE]",
    )
    parser.add_argument("--section", default=SECTION, help="the benchmarks/README.md section")
    few_labels.add_split_arguments(parser)
    args = parser.parse_args(argv)
    for rate in args.rates:
        if rate != "auto":
            float(rate)
    settings_of(args)
    few_labels._budgets(args.budgets)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
