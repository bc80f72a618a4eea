"""Does `tfxfer rank` pick the backbone that fine-tunes best? LogME against fine-tuned accuracy.

Issue 21. Per real set (`few_labels.py`'s: Debian sections and fortunes for text, digits and
fashion-mnist for images), label budget and seed: one process ranks every candidate
(`tfxfer.rank_backbones`, LogME by default, nothing written), then one process per candidate
fine-tunes it with the recipe at its defaults (`few_labels.py`'s tfxfer children) and scores
its test split. Reported per set and budget: each candidate's mean score and mean test
accuracy over seeds, the weighted Kendall tau (`scipy.stats.weightedtau`, hyperbolic weights:
agreement at the top counts most) between them, per seed and on the means, the accuracy of
the top-ranked candidate (what `--backbone auto` would fine-tune) against the best one, and
ranking time against fine-tuning time per candidate.

Candidates are what `--backbone` takes, `NAME@WEIGHTS` as in `tfxfer rank` (`--image-candidates`,
`--text-candidates`); a run directory (e.g. a contrastive or MLM pretraining run) works too.
Offline the spread is what can be built here: random initialisations of different image
architectures, MiniLM-L6 pretrained and randomly initialised.

    .venv/bin/python benchmarks/rank.py --datasets digits --budgets 16 --seeds 0 --no-readme
    .venv/bin/python benchmarks/rank.py                                    # the README section
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
from common import machine_facts, markdown_table, publish

SECTION = "rank"
IMAGE_CANDIDATES = "mobilenetv3small@none,efficientnetv2b0@none,resnet50@none"
TEXT_CANDIDATES = "minilm-l6,minilm-l6@none"
IMAGE_SIZE = 32


def _fine_tune_spec(kind: str, candidate: str, base: dict[str, Any]) -> dict[str, Any]:
    """The few_labels tfxfer child's spec that fine-tunes `candidate` at the defaults."""
    name, _, weights = candidate.partition("@")
    if kind == "image":
        image = {"backbone": name, "weights": weights or "imagenet", "image_size": IMAGE_SIZE}
        return {**base, "variant": "tfxfer", "image": image}
    options = {"backbone": name}
    if weights.lower() in ("none", "random"):
        options["pretrained"] = False
    return {**base, "variant": "tfxfer", "image": {}, "options": options}


def run_all(args) -> list[dict[str, Any]]:
    manifests = few_labels.build_all(args)
    infos = few_labels._datasets(args)
    runs: list[dict[str, Any]] = []
    for name, info in infos.items():
        kind = info.kind
        candidates = (args.image_candidates if kind == "image" else args.text_candidates).split(",")
        for i, seed in enumerate(args.seeds):
            manifest = manifests[(name, seed)]
            order = candidates if i % 2 == 0 else candidates[::-1]
            for budget in args.budgets:
                base = {
                    "kind": kind,
                    "seed": seed,
                    "train": manifest["paths"][budget],
                    "test": manifest["paths"]["test"],
                    "image": {"image_size": IMAGE_SIZE},
                }
                label = f"{name}, {budget}/class, seed {seed}"
                ranked = few_labels.run_measured(
                    {**base, "variant": "rank", "candidates": candidates, "metric": args.metric},
                    f"{label}: rank",
                    args.child_timeout,
                )
                runs.append({"dataset": name, "budget": budget, "seed": seed, "what": "rank",
                             **ranked})  # fmt: skip
                for candidate in order:
                    result = few_labels.run_measured(
                        _fine_tune_spec(kind, candidate, base),
                        f"{label}: fine-tune {candidate}",
                        args.child_timeout,
                    )
                    where = {"dataset": name, "budget": budget, "seed": seed}
                    runs.append({**where, "what": "fine-tune", "candidate": candidate, **result})
                if args.save_json:
                    Path(args.save_json).write_text(json.dumps(runs, indent=1), "utf-8")
    return runs


def weighted_tau(scores: list[float], accuracies: list[float]) -> float | None:
    """Weighted Kendall tau of two lists (None with fewer than 2 or a constant list)."""
    from scipy.stats import weightedtau

    if len(scores) < 2 or len(set(scores)) < 2 or len(set(accuracies)) < 2:
        return None
    return float(weightedtau(scores, accuracies).statistic)


def summarize(runs: list[dict[str, Any]], name: str, budget: str) -> dict[str, Any] | None:
    """Per candidate: mean score, mean accuracy, seconds; tau per seed and on the means."""
    mine = [r for r in runs if r["dataset"] == name and r["budget"] == budget]
    per: dict[str, dict[str, list[float]]] = {}
    taus, top_gaps = [], []
    for seed in sorted({r["seed"] for r in mine}):
        ranking = next((r for r in mine if r["seed"] == seed and r["what"] == "rank"), None)
        if ranking is None or "error" in ranking:
            continue
        scored = {
            row["backbone"]: row for row in ranking["ranking"]["candidates"] if "score" in row
        }
        accuracy = {
            r["candidate"]: 100 * r["test_accuracy"]
            for r in mine
            if r["seed"] == seed and r["what"] == "fine-tune" and "error" not in r
        }
        both = [c for c in scored if c in accuracy]
        for c in both:
            entry = per.setdefault(c, {"score": [], "accuracy": [], "rank_s": [], "tune_s": []})
            entry["score"].append(scored[c]["score"])
            entry["accuracy"].append(accuracy[c])
            entry["rank_s"].append(scored[c]["seconds"])
            entry["tune_s"].append(
                next(r["wall_s"] for r in mine if r["seed"] == seed and r.get("candidate") == c)
            )
        tau = weighted_tau([scored[c]["score"] for c in both], [accuracy[c] for c in both])
        if tau is not None:
            taus.append(tau)
        if both:
            top = max(both, key=lambda c: scored[c]["score"])
            top_gaps.append(accuracy[top] - max(accuracy[c] for c in both))
    if not per:
        return None
    means = {c: {k: statistics.mean(v) for k, v in e.items()} for c, e in per.items()}
    return {
        "candidates": means,
        "tau_seeds": taus,
        "tau_means": weighted_tau(
            [m["score"] for m in means.values()], [m["accuracy"] for m in means.values()]
        ),
        "top_gaps": top_gaps,
    }


def body(runs: list[dict[str, Any]], args) -> str:
    parts = []
    targets = []
    for name in dict.fromkeys(r["dataset"] for r in runs):
        for budget in args.budgets:
            summary = summarize(runs, name, budget)
            if summary is None:
                continue
            rows = [
                [c, f"{m['score']:.4f}", f"{m['accuracy']:.1f}%", f"{m['rank_s']:.1f}",
                 f"{m['tune_s']:.0f}", f"{m['rank_s'] / m['tune_s']:.3f}"]
                for c, m in sorted(summary["candidates"].items(), key=lambda kv: -kv[1]["score"])
            ]  # fmt: skip
            headers = [
                "candidate (best score first)",
                f"{args.metric} (mean)",
                "fine-tuned test accuracy (mean)",
                "rank s",
                "fine-tune wall s",
                "rank / fine-tune",
            ]
            tau_means = summary["tau_means"]
            seeds = ", ".join(f"{t:+.2f}" for t in summary["tau_seeds"]) or "-"
            gaps = ", ".join(f"{g:+.1f}" for g in summary["top_gaps"])
            parts.append(
                f"**{name}, {budget} labels per class**: weighted Kendall tau "
                f"{'-' if tau_means is None else f'{tau_means:+.2f}'} on the means (per seed: "
                f"{seeds}); the top-ranked candidate's accuracy against the best, per seed: "
                f"{gaps} points\n\n" + markdown_table(headers, rows)
            )
            targets.append((name, budget, tau_means, summary["top_gaps"]))
    lines = []
    for name, budget, tau, gaps in targets:
        met_tau = tau is not None and tau >= 0.6
        met_auto = bool(gaps) and min(gaps) >= -1.0
        lines.append(
            f"- {name} {budget}/class: tau_w >= 0.6 {'MET' if met_tau else 'NOT MET'}; "
            f"--backbone auto within 1 point of the best on every seed "
            f"{'MET' if met_auto else 'NOT MET'}"
        )
    return "\n\n".join(parts + ["Targets (issue 21):\n\n" + "\n".join(lines)])


def parent(args) -> int:
    started = time.perf_counter()
    facts = machine_facts()
    runs = run_all(args)
    text = "\n\n".join(
        [
            f"- seeds {args.seeds}; budgets {args.budgets} labels per class; test: "
            f"{args.test_per_class} per class, drawn per seed (`few_labels.py`'s splits); "
            f"images at {IMAGE_SIZE} px; every other setting at the recipe's default",
            "- rank s: the candidate's share of the ranking process (build, extraction, score); "
            "fine-tune wall s: the whole fine-tuning process",
            body(runs, args),
        ]
    )
    publish(args.section, text, facts, started, write=not args.no_readme)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,fashion-mnist,debian-sections,fortunes")
    parser.add_argument("--budgets", nargs="+", default=["16"], help="labels per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-candidates", default=IMAGE_CANDIDATES)
    parser.add_argument("--text-candidates", default=TEXT_CANDIDATES)
    parser.add_argument("--metric", default="logme", help="logme or hscore")
    parser.add_argument("--section", default=SECTION, help="the benchmarks/README.md section")
    few_labels.add_split_arguments(parser)
    args = parser.parse_args(argv)
    few_labels._budgets(args.budgets)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
