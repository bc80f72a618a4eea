"""Masked-LM pretraining: throughput against plain keras-hub, and domain adaptation's effect.

Two measurements on the Debian package descriptions of `real_text.py` (real texts nobody here
wrote), each run in a fresh process:

  throughput  `recipes.bert_mlm_pretrain` (MiniLM-L6, 128 tokens, batch 16, one epoch, no
              held-out slice) against what a user writes by hand with keras-hub:
              `BertMaskedLM.from_preset(<MiniLM dir>)`, its preprocessor's sequence length set
              to 128, default compile, `fit(texts, batch_size=16, epochs=1)`. The same texts
              (the first `--throughput-texts` of the corpus). Wall and CPU time of the
              training call alone, repeated `--repeats` times in alternating order.
  adaptation  pretrain MiniLM-L6 with the recipe on the unlabelled corpus (every text of the
              benchmark's 8 sections, minus the test texts of every seed measured), then the
              default text recipe on 16 labels per class from the adapted preset, against the
              same recipe from MiniLM itself, for each seed (the labelled draws of
              `regularizers.py`; the adapted backbone is pretrained once, with seed 0).

    .venv/bin/python benchmarks/mlm.py                         # both, README section
    .venv/bin/python benchmarks/mlm.py --part throughput --no-readme
    .venv/bin/python benchmarks/mlm.py --part adaptation --pretrain-epochs 2 --no-readme
"""

from __future__ import annotations

import argparse
import os
import resource
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
    publish,
    quiet_tensorflow,
    run_child,
)
from real_text import DEFAULT_DATA_ROOT, SECTIONS, build, candidate_pool, read_packages
from real_text import SCRIPT as REAL_TEXT
from regularizers import POOL_PER_CLASS, subsample

SCRIPT = str(Path(__file__).resolve())
SECTION = "mlm_pretraining"
SEQUENCE_LENGTH, BATCH_SIZE = 128, 16


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_corpus(data_root: Path, seeds: list[int]) -> tuple[Path, int]:
    """The unlabelled corpus: the 8 sections' texts minus every measured seed's test texts."""
    import csv

    held_out = set()
    for seed in seeds:
        folder = data_root / f"seed-{seed}-train{POOL_PER_CLASS}"
        if not (folder / "test.csv").exists():
            build(seed, data_root, train_per_class=POOL_PER_CLASS)
        with open(folder / "test.csv", encoding="utf-8", newline="") as handle:
            held_out |= {row["text"] for row in csv.DictReader(handle)}
    records, _ = read_packages(data_root / "apt")
    pool = candidate_pool(records)
    texts = [r["text"] for s in SECTIONS for r in pool[s] if r["text"] not in held_out]
    out = data_root / f"mlm-corpus-excluding-tests-of-seeds-{'-'.join(map(str, seeds))}.txt"
    out.write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"[mlm] corpus: {len(texts)} texts ({len(held_out)} test texts left out) -> {out}")
    return out, len(held_out)


# === Children ===


def child_recipe(spec: dict[str, Any]) -> dict[str, Any]:
    """Pretrains with `recipes.bert_mlm_pretrain`; times the training call alone."""
    from recipes.bert_mlm_pretrain import Config, main
    from tfxfer.pretrain import skeleton

    timing: dict[str, float] = {}
    run_schedule = skeleton.run_schedule

    def timed(*args, **kwargs):
        started, cpu = time.perf_counter(), _cpu_seconds()
        try:
            return run_schedule(*args, **kwargs)
        finally:
            timing.update(train_s=time.perf_counter() - started, train_cpu_s=_cpu_seconds() - cpu)

    skeleton.run_schedule = timed
    with tempfile.TemporaryDirectory(prefix="tfxfer-bench-") as tmp:
        output = spec.get("output_dir") or os.path.join(tmp, "run")
        config = Config(
            corpus=spec["corpus"],
            output_dir=output,
            overwrite=bool(spec.get("output_dir")),
            sequence_length=SEQUENCE_LENGTH,
            batch_size=BATCH_SIZE,
            verbose=0,
            **spec["set"],
        )
        result = main(config)
    return {
        **timing,
        "texts": result["metrics"]["train_texts"],
        "held_out": result["metrics"]["held_out"],
        "history": result["history"],
        "settings": spec["set"],
    }


def child_plain(spec: dict[str, Any]) -> dict[str, Any]:
    """The hand-written keras-hub way: `BertMaskedLM.from_preset` and `fit`."""
    import keras
    import keras_hub
    import numpy as np
    from text_quality import _minilm_dir

    from tfxfer.data.unlabelled import read_unlabelled_texts

    texts = read_unlabelled_texts(spec["corpus"])[: spec["set"].get("limit_texts")]
    keras.utils.set_random_seed(0)
    masked_lm = keras_hub.models.BertMaskedLM.from_preset(str(_minilm_dir()))
    masked_lm.preprocessor.sequence_length = SEQUENCE_LENGTH
    started, cpu = time.perf_counter(), _cpu_seconds()
    history = masked_lm.fit(x=np.array(texts), batch_size=BATCH_SIZE, epochs=1, verbose=0)
    return {
        "train_s": time.perf_counter() - started,
        "train_cpu_s": _cpu_seconds() - cpu,
        "texts": len(texts),
        "loss": float(history.history["loss"][-1]),
    }


def child(spec: dict[str, Any]) -> None:
    quiet_tensorflow()
    sys.path.insert(0, str(Path(SCRIPT).parent))
    run = {"recipe": child_recipe, "plain": child_plain}[spec["kind"]]
    emit_result(run(spec))


# === Parent ===


def _range(values: list[float], digits: int = 2, suffix: str = "") -> str:
    return (
        f"{statistics.mean(values):.{digits}f}{suffix} "
        f"({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def throughput(args, corpus: Path) -> tuple[str, dict]:
    limit = args.throughput_texts
    tfxfer_set = {"epochs": 1, "val_fraction": 0.0, "limit_texts": limit}
    runs: dict[str, list[dict[str, Any]]] = {"recipe": [], "plain": []}
    orders = []
    for repeat in range(args.repeats):
        order = ["recipe", "plain"] if repeat % 2 == 0 else ["plain", "recipe"]
        orders.append(order)
        for kind in order:
            spec = {"kind": kind, "corpus": str(corpus), "set": dict(tfxfer_set)}
            if kind == "recipe":
                spec["set"].pop("limit_texts")
                spec["corpus"] = str(_first_texts(corpus, limit))
            result = run_child(SCRIPT, spec, f"{kind}, repeat {repeat + 1}")
            result["seq_per_s"] = result["texts"] / result["train_s"]
            print(
                f"     {result['texts']} texts in {result['train_s']:.1f} s wall, "
                f"{result['train_cpu_s']:.1f} s CPU",
                flush=True,
            )
            runs[kind].append(result)
    wall = [p["train_s"] / r["train_s"] for r, p in zip(runs["recipe"], runs["plain"], strict=True)]
    cpu = [
        p["train_cpu_s"] / r["train_cpu_s"]
        for r, p in zip(runs["recipe"], runs["plain"], strict=True)
    ]
    rows = [
        [
            name,
            _range([r["seq_per_s"] for r in runs[kind]], 1),
            _range([r["train_s"] for r in runs[kind]], 0, " s"),
            _range([r["train_cpu_s"] for r in runs[kind]], 0, " s"),
        ]
        for kind, name in (("recipe", "tfxfer `bert_mlm_pretrain`"), ("plain", "plain keras-hub"))
    ]
    body = (
        f"**Throughput**: {limit} texts, one epoch, MiniLM-L6, {SEQUENCE_LENGTH} tokens, batch "
        f"{BATCH_SIZE}, {args.repeats} repeats in alternating order ({orders}); the training "
        "call alone (tracing included), mean (range).\n\n"
        + markdown_table(["", "sequences/s", "wall", "CPU"], rows)
        + f"\n\ntfxfer / plain speed: wall {_range(wall)}x, CPU time {_range(cpu)}x "
        "(per repeat: plain's time over tfxfer's)."
    )
    return body, runs


def _first_texts(corpus: Path, limit: int) -> Path:
    lines = corpus.read_text(encoding="utf-8").splitlines()[:limit]
    out = corpus.with_name(f"{corpus.stem}-first{limit}.txt")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def adaptation(args, corpus: Path, data_root: Path) -> tuple[str, dict]:
    run_dir = data_root / "mlm-adapted-run"
    pretrain_set = {
        "epochs": args.pretrain_epochs,
        "learning_rate": args.pretrain_learning_rate,
        "seed": 0,
    }
    spec = {"kind": "recipe", "corpus": str(corpus), "set": pretrain_set}
    spec["output_dir"] = str(run_dir)
    pretrained = run_child(SCRIPT, spec, "masked-LM pretraining on the corpus")
    print(f"     held out: {pretrained['held_out']}, {pretrained['train_s']:.0f} s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"minilm": [], "adapted": []}
    for i, seed in enumerate(args.seeds):
        folder = data_root / f"seed-{seed}-train{POOL_PER_CLASS}"
        train = subsample(folder, args.per_class)
        order = ["minilm", "adapted"] if i % 2 == 0 else ["adapted", "minilm"]
        for variant in order:
            recipe_set = {"backbone": str(run_dir)} if variant == "adapted" else {}
            spec = {
                "variant": "a",
                "seed": seed,
                "train": str(train),
                "test": str(folder / "test.csv"),
                "recipe_set": recipe_set,
            }
            result = run_child(REAL_TEXT, spec, f"{variant}, {args.per_class}/class, seed {seed}")
            print(f"     test accuracy {100 * result['test_accuracy']:.1f}%", flush=True)
            runs[variant].append(result | {"seed": seed})
    base = [100 * r["test_accuracy"] for r in runs["minilm"]]
    adapted = [100 * r["test_accuracy"] for r in runs["adapted"]]
    gains = [a - b for a, b in zip(adapted, base, strict=True)]
    history = pretrained["history"]
    body = (
        f"**Domain adaptation**: masked-LM pretraining of MiniLM-L6 on {pretrained['texts']} "
        f"unlabelled texts (held-out slice: masked-token accuracy "
        f"{100 * pretrained['held_out']['masked_accuracy']:.1f}%, perplexity "
        f"{pretrained['held_out']['perplexity']:.1f}; per epoch val_loss "
        f"{[round(r.get('val_loss', float('nan')), 3) for r in history]}), "
        f"{pretrained['train_s'] / 60:.1f} min wall, settings {pretrain_set}; then the default "
        f"text recipe on {args.per_class} labels per class, seeds {args.seeds}.\n\n"
        + markdown_table(
            ["backbone", "test accuracy, mean (range)", "per seed"],
            [
                [
                    "MiniLM-L6 (no adaptation)",
                    _range(base, 1, "%"),
                    ", ".join(f"{v:.1f}" for v in base),
                ],
                [
                    "MiniLM-L6 adapted",
                    _range(adapted, 1, "%"),
                    ", ".join(f"{v:.1f}" for v in adapted),
                ],
            ],
        )
        + f"\n\nGain per seed: {', '.join(f'{g:+.1f}' for g in gains)} points "
        f"(mean {statistics.mean(gains):+.1f})."
    )
    return body, {"pretrained": pretrained, **runs}


def parent(args) -> int:
    started, facts = time.perf_counter(), machine_facts()
    data_root = Path(args.data_root).expanduser()
    corpus, _ = write_corpus(data_root, args.seeds)
    parts = []
    if args.part in ("both", "throughput"):
        parts.append(throughput(args, corpus)[0])
    if args.part in ("both", "adaptation"):
        parts.append(adaptation(args, corpus, data_root)[0])
    body = "\n\n".join(parts)
    section = SECTION if args.part == "both" else f"{SECTION}_{args.part}"
    publish(section, body, facts, started, write=not args.no_readme)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("both", "throughput", "adaptation"), default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput-texts", type=int, default=480)
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--pretrain-learning-rate", type=float, default=1e-4)
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    add_common_arguments(parser)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
