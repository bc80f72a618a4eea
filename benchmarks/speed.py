"""Training speed: tfxfer against keras-hub's and plain Keras' `fit`, and cached head stages.

Three comparisons, every measurement in a fresh process, each pair repeated with the order of
its two variants alternating:

  text:  fine-tuning throughput (sequences/s over the steady epochs) of the pretrained
         MiniLM-L6 at 128 tokens, batch 16, on 240 of the Debian package descriptions
         (`real_text.py build`) and 240 of the demo texts (balanced; `--texts`). tfxfer:
         `load_texts`, `build_backbone`, `build_model`, `make_datasets` (dynamic padding),
         `run_schedule` with the fine-tuning stage alone,
         `Stage("finetune", E, train="all", learning_rate=5e-5)`. keras-hub:
         `BertTextClassifier.from_preset(<MiniLM dir>, num_classes=K)`, its preprocessor's
         sequence length set to 128, `fit(x=texts, y=labels, batch_size=16, epochs=E)`.
  head:  a head-only stage, `Stage("head", 10, learning_rate=3e-3)`, of the MiniLM model on
         the Debian train set (10% held out for validation), `run_schedule(...,
         cache_features=False)` against `cache_features=True`: the stage's wall time (the
         extraction included) and its final validation accuracy.
  image: fine-tuning throughput (images/s over the steady epochs) of ResNet50 (random
         weights) on synthetic shape images: `run_schedule` on `make_datasets` against the
         identical model, BatchNorm frozen the same way, with plain `model.fit` on a plain
         tf.data pipeline.

tfxfer's side runs in the dtype policy a recipe's `mixed_precision="auto"` picks on the machine
(mixed_bfloat16 on a CPU with AMX units, as here; float32 on other CPUs), the hand-written
side in Keras' default float32: that is the speed a user of each gets without tuning. Both
sides of the text and image comparisons train without validation data and without a
run directory (no checkpoints; `overhead.py` measures what those cost). The first epoch,
which traces the train step, is reported apart and left out of the throughput.

Run from the repository root (about 25 minutes on 2 free CPU cores, 30+ on busy ones):

    .venv/bin/python benchmarks/real_text.py build --seed 0     # the Debian texts, once
    .venv/bin/python benchmarks/speed.py                        # 3 repeats, README section
    .venv/bin/python benchmarks/speed.py --only head --repeats 1 --no-readme
    .venv/bin/python benchmarks/speed.py --image-size 224 --batch-size 64   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
SECTION = "speed"
SEED = 0
PARTS = ("text", "head", "image")
TEXT = {"sequence_length": 128, "learning_rate": 5e-5}
TEXT_SETS = ("debian", "demo")
HEAD = {"epochs": 10, "learning_rate": 3e-3, "val_split": 0.1}
IMAGE = {"backbone": "resnet50", "learning_rate": 1e-4}
TARGETS = {"text": 2.0, "head": 5.0, "image": 1.0, "rss": 1.1}
TEXT_VARIANTS = ("tfxfer", "keras-hub")
HEAD_VARIANTS = ("uncached", "cached")
IMAGE_VARIANTS = ("tfxfer", "plain")


# === Children ===


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def epoch_timer():
    """A callback that records each epoch's wall and CPU time (epoch hooks only, so tfxfer's
    cached stages keep running several steps per call)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[dict[str, float]] = []
            self.fit_begin = self.fit_end = 0.0

        def on_train_begin(self, logs=None):
            self.fit_begin = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append({"begin": time.perf_counter(), "cpu_begin": cpu_seconds()})

        def on_epoch_end(self, epoch, logs=None):
            record = self.epochs[-1]
            record["end"], record["cpu_end"] = time.perf_counter(), cpu_seconds()
            record.update({k: float(v) for k, v in (logs or {}).items()})

        def on_train_end(self, logs=None):
            self.fit_end = time.perf_counter()

    return EpochTimer()


def steady(timer, examples_per_epoch: int) -> dict[str, Any]:
    """Throughput over every epoch but the first (which traces), and the first epoch's time."""
    epochs = timer.epochs
    if len(epochs) < 2:
        raise SystemExit("Expected at least 2 epochs (the first traces). Pass --epochs 2 or more.")
    rest = epochs[1:]
    wall = sum(e["end"] - e["begin"] for e in rest)
    cpu = sum(e["cpu_end"] - e["cpu_begin"] for e in rest)
    return {
        "examples_per_epoch": examples_per_epoch,
        "steady_epochs": len(rest),
        "steady_wall_s": wall,
        "steady_cpu_s": cpu,
        "examples_per_s": examples_per_epoch * len(rest) / wall,
        "examples_per_cpu_s": examples_per_epoch * len(rest) / cpu,
        "epoch_s": [e["end"] - e["begin"] for e in epochs],
        "first_epoch_s": epochs[0]["end"] - epochs[0]["begin"],
        "fit_s": timer.fit_end - timer.fit_begin,
        "final_loss": epochs[-1].get("loss"),
    }


def _minilm_dir() -> Path:
    from text_quality import _minilm_dir as minilm_dir

    return minilm_dir()


def train_file(spec: dict[str, Any]) -> str:
    """The text set's train file: the Debian one the parent found, or the bundled demo texts."""
    if spec["text_set"] == "demo":
        from tfxfer.demo_data import demo_text_paths

        return str(demo_text_paths()["train"])
    return spec["train"]


def tfxfer_policy() -> str:
    """Sets the dtype policy a recipe's `mixed_precision="auto"` picks here; returns its name.

    On a CPU with AMX units that is mixed_bfloat16: tfxfer's side runs as a recipe would,
    the hand-written side (keras-hub, plain Keras) in Keras' default float32.
    """
    from tfxfer.distribute import apply_mixed_precision, mixed_precision_policy

    policy = mixed_precision_policy("auto")
    apply_mixed_precision(policy)
    return policy


def child_text(spec: dict[str, Any]) -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    import tfxfer

    keras.utils.set_random_seed(SEED)
    batch, epochs = spec["batch_size"], spec["epochs"]
    data = tfxfer.load_texts(train_file(spec), val_split=0.0, seed=SEED)
    file_texts = len(data.train)
    if spec["texts"]:
        # A balanced subset: the first texts of each class in file order.
        per_class = spec["texts"] // len(data.class_names)
        labels = np.asarray(data.train.labels)
        keep = sorted(
            i for c in range(len(data.class_names)) for i in np.flatnonzero(labels == c)[:per_class]
        )
        data = dataclasses.replace(data, train=data.train.subset(keep))
    texts, labels = list(data.train.inputs), np.asarray(data.train.labels)
    timer = epoch_timer()
    before = peak_rss_mb()
    extra: dict[str, Any] = {}
    if spec["variant"] == "tfxfer":
        extra["policy"] = tfxfer_policy()
        backbone = tfxfer.build_backbone("minilm-l6", sequence_length=TEXT["sequence_length"])
        model = tfxfer.build_model(
            backbone, len(data.class_names), head=tfxfer.HeadConfig(dropout=0.1)
        )
        mask = backbone.preprocessor(tf.constant(texts))["padding_mask"]
        lengths = np.sum(np.asarray(mask), axis=1)
        extra = {
            "mean_tokens": float(lengths.mean()),
            "truncated_share": float(np.mean(lengths >= TEXT["sequence_length"])),
        }
        before = peak_rss_mb()
        train, _, _ = tfxfer.make_datasets(data, backbone, batch_size=batch, seed=SEED)
        stage = tfxfer.Stage("finetune", epochs, train="all", learning_rate=TEXT["learning_rate"])
        result = tfxfer.run_schedule(
            model, backbone, [stage], train, None, callbacks=[timer], verbose=0
        )
        extra["stage"] = result.stages.get("finetune", {})
        examples = train.steps_per_epoch * batch
        jit = model.jit_compile
    else:
        import keras_hub

        classifier = keras_hub.models.BertTextClassifier.from_preset(
            str(_minilm_dir()), num_classes=len(data.class_names)
        )
        classifier.preprocessor.sequence_length = TEXT["sequence_length"]
        before = peak_rss_mb()
        classifier.fit(
            x=np.array(texts),
            y=labels,
            batch_size=batch,
            epochs=epochs,
            callbacks=[timer],
            verbose=0,
        )
        examples = len(texts)
        jit = classifier.jit_compile
    return {
        **steady(timer, examples),
        **extra,
        "rss_before_training_mb": before,
        "jit_compile": bool(jit),
        "train_texts": len(texts),
        "file_texts": file_texts,
        "classes": len(data.class_names),
    }


def child_head(spec: dict[str, Any]) -> dict[str, Any]:
    import keras

    import tfxfer

    keras.utils.set_random_seed(SEED)
    policy = tfxfer_policy()
    data = tfxfer.load_texts(train_file(spec), val_split=HEAD["val_split"], seed=SEED)
    backbone = tfxfer.build_backbone("minilm-l6", sequence_length=TEXT["sequence_length"])
    model = tfxfer.build_model(backbone, len(data.class_names), head=tfxfer.HeadConfig(dropout=0.1))
    train, val, _ = tfxfer.make_datasets(data, backbone, batch_size=spec["batch_size"], seed=SEED)
    stage = tfxfer.Stage("head", HEAD["epochs"], learning_rate=HEAD["learning_rate"])
    timer = epoch_timer()
    cached = spec["variant"] == "cached"
    before = peak_rss_mb()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = tfxfer.run_schedule(
        model,
        backbone,
        [stage],
        train,
        val,
        callbacks=[timer],
        verbose=0,
        cache_features=cached,
    )
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    info = result.stages.get("head", {})
    if bool(info.get("cached_features")) != cached:
        raise SystemExit(f"Expected cached_features={cached}. The stage recorded: {info}")
    last = result.history[-1]
    return {
        "stage_s": wall,
        "stage_cpu_s": cpu,
        "fit_s": timer.fit_end - timer.fit_begin,
        "extract_s": info.get("extract_seconds", 0.0),
        "steps_per_execution": info.get("steps_per_execution", 1),
        "epoch_s": [e["end"] - e["begin"] for e in timer.epochs],
        "val_accuracy": last.get("val_accuracy"),
        "val_loss": last.get("val_loss"),
        "best_val_accuracy": max(row.get("val_accuracy", 0.0) for row in result.history),
        "train_texts": len(data.train),
        "val_texts": len(data.val),
        "rss_before_training_mb": before,
        "stage": info,
        "policy": policy,
    }


def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    from tfxfer.data.synthetic import write_shapes_dataset

    write_shapes_dataset(
        spec["data_dir"],
        per_class=spec["per_class"],
        image_size=spec["image_size"],
        seed=SEED,
    )
    return {"data_dir": spec["data_dir"]}


def child_image(spec: dict[str, Any]) -> dict[str, Any]:
    import keras
    import tensorflow as tf
    from overhead import plain_optimizer

    import tfxfer

    keras.utils.set_random_seed(SEED)
    batch, epochs, size = spec["batch_size"], spec["epochs"], spec["image_size"]
    data = tfxfer.load_images(spec["data_dir"], val_split=0.0, seed=SEED)
    policy = tfxfer_policy() if spec["variant"] == "tfxfer" else "float32"
    backbone = tfxfer.build_backbone(IMAGE["backbone"], weights=None, image_size=size)
    model = tfxfer.build_model(
        backbone, len(data.class_names), head=tfxfer.HeadConfig(pooling="avg", dropout=0.2)
    )
    timer = epoch_timer()
    steps = len(data.train) // batch
    before = peak_rss_mb()
    if spec["variant"] == "tfxfer":
        train, _, _ = tfxfer.make_datasets(data, backbone, batch_size=batch, seed=SEED)
        stage = tfxfer.Stage("finetune", epochs, train="all", learning_rate=IMAGE["learning_rate"])
        tfxfer.run_schedule(model, backbone, [stage], train, None, callbacks=[timer], verbose=0)
    else:

        def decode(path, label):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            image = tf.image.resize(image, (size, size), antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

        train = (
            tf.data.Dataset.from_tensor_slices((data.train.inputs, data.train.labels))
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            .cache()
            .shuffle(len(data.train), seed=SEED, reshuffle_each_iteration=True)
            .batch(batch, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        # As tfxfer's stages: the whole backbone trains, BatchNorm stays in inference mode.
        model.trainable = True
        for layer in backbone.network.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        model.compile(
            optimizer=plain_optimizer(IMAGE["learning_rate"], steps * epochs),
            loss="sparse_categorical_crossentropy",
            metrics=[keras.metrics.SparseCategoricalAccuracy("accuracy")],
        )
        model.fit(train, epochs=epochs, callbacks=[timer], verbose=0)
    return {
        "jit_compile": bool(model.jit_compile),
        **steady(timer, steps * batch),
        "rss_before_training_mb": before,
        "trainable_params": int(sum(int(w.numpy().size) for w in model.trainable_weights)),
        "train_images": len(data.train),
        "policy": policy,
    }


def child(spec: dict[str, Any]) -> None:
    quiet_tensorflow()
    measure = {
        "prepare": child_prepare,
        "text": child_text,
        "head": child_head,
        "image": child_image,
    }[spec["part"]]
    result = measure(spec)
    result.update(peak_rss_mb=peak_rss_mb(), load_average=os.getloadavg()[0])
    if "examples_per_s" in result:
        print(
            f"[{spec['part']}/{spec['variant']}] {result['examples_per_s']:.1f} examples/s over "
            f"{result['steady_epochs']} steady epochs ({result['steady_wall_s']:.1f} s wall, "
            f"{result['steady_cpu_s']:.1f} s CPU); first epoch {result['first_epoch_s']:.1f} s",
            flush=True,
        )
    elif "stage_s" in result:
        print(
            f"[head/{spec['variant']}] stage {result['stage_s']:.1f} s (extraction "
            f"{result['extract_s']:.1f} s), val accuracy {result['val_accuracy']:.3f}",
            flush=True,
        )
    emit_result(result)


# === Parent ===


def _ratios(numerators: list[dict], denominators: list[dict], key: str) -> list[float]:
    return [n[key] / d[key] for n, d in zip(numerators, denominators, strict=True)]


def _verdict(values: list[float], target: float, higher_is_better: bool = True) -> str:
    def meets(x: float) -> bool:
        return x >= target if higher_is_better else x <= target

    if not values:
        return "-"
    if all(meets(x) for x in values):
        return "met, every repeat"
    if meets(statistics.median(values)):
        return f"met by the median, not by {sum(not meets(x) for x in values)} repeat(s)"
    return "not met"


def _xla(runs: dict[str, list[dict]]) -> str:
    states = {v: {r["jit_compile"] for r in rs} for v, rs in runs.items()}
    described = ", ".join(
        f"{v} {'on' if s == {True} else 'off' if s == {False} else 'mixed'}"
        for v, s in states.items()
    )
    return f"XLA (`jit_compile`): {described}"


def _order(repeat: int, variants: tuple[str, str]) -> list[str]:
    # Alternate, so neither variant always runs first on a warming (or newly busy) machine.
    return list(variants) if repeat % 2 == 0 else list(variants[::-1])


def throughput_tables(
    runs: dict[str, list[dict]], variants: tuple[str, str], unit: str
) -> tuple[str, str]:
    """Per-variant rows, and per-repeat rows with the ratios."""
    ours, theirs = (runs[v] for v in variants)
    rows = [
        [
            variant,
            fmt_spread([r["examples_per_s"] for r in runs[variant]], 1),
            fmt_spread([r["examples_per_cpu_s"] for r in runs[variant]], 2),
            fmt_spread([r["steady_wall_s"] / r["steady_epochs"] for r in runs[variant]], 1, " s"),
            fmt_spread([r["steady_cpu_s"] / r["steady_epochs"] for r in runs[variant]], 1, " s"),
            fmt_spread([r["first_epoch_s"] for r in runs[variant]], 1, " s"),
            fmt_spread([r["peak_rss_mb"] for r in runs[variant]], 0, " MiB"),
        ]
        for variant in variants
    ]
    table = markdown_table(
        [
            "variant",
            f"{unit}/s (steady epochs, wall)",
            f"{unit} per CPU-second",
            "steady epoch",
            "CPU time per steady epoch",
            "first epoch (traces)",
            "peak RSS",
        ],
        rows,
    )
    per_repeat = markdown_table(
        [
            "repeat",
            "order",
            f"{unit}/s ratio, wall",
            f"{unit} per CPU-s ratio",
            "first epoch ratio",
            "peak RSS ratio",
            f"load average at the end ({variants[0]}, {variants[1]})",
        ],
        [
            [
                i + 1,
                ", ".join(_order(i, variants)),
                f"{a['examples_per_s'] / b['examples_per_s']:.2f}",
                f"{a['examples_per_cpu_s'] / b['examples_per_cpu_s']:.2f}",
                f"{a['first_epoch_s'] / b['first_epoch_s']:.2f}",
                f"{a['peak_rss_mb'] / b['peak_rss_mb']:.3f}",
                f"{a['load_average']:.1f}, {b['load_average']:.1f}",
            ]
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
        ],
    )
    return table, per_repeat


def head_tables(runs: dict[str, list[dict]]) -> tuple[str, str]:
    rows = [
        [
            variant,
            fmt_spread([r["stage_s"] for r in runs[variant]], 1, " s"),
            fmt_spread([r["extract_s"] for r in runs[variant]], 1, " s"),
            fmt_spread([r["stage_cpu_s"] for r in runs[variant]], 1, " s"),
            fmt_spread([100 * r["val_accuracy"] for r in runs[variant]], 1, "%"),
            fmt_spread([100 * r["best_val_accuracy"] for r in runs[variant]], 1, "%"),
            fmt_spread([r["val_loss"] for r in runs[variant]], 3),
            runs[variant][0]["steps_per_execution"],
            fmt_spread([r["peak_rss_mb"] for r in runs[variant]], 0, " MiB"),
        ]
        for variant in HEAD_VARIANTS
    ]
    table = markdown_table(
        [
            "variant",
            "stage wall time",
            "of which extraction",
            "stage CPU time",
            "val accuracy, last epoch",
            "best epoch's",
            "val loss, last epoch",
            "steps per call",
            "peak RSS",
        ],
        rows,
    )
    uncached, cached = runs["uncached"], runs["cached"]
    per_repeat = markdown_table(
        [
            "repeat",
            "order",
            "uncached / cached, wall",
            "uncached / cached, CPU",
            "val accuracy (uncached, cached)",
            "peak RSS cached / uncached",
            "load average at the end (uncached, cached)",
        ],
        [
            [
                i + 1,
                ", ".join(_order(i, HEAD_VARIANTS)),
                f"{u['stage_s'] / c['stage_s']:.1f}",
                f"{u['stage_cpu_s'] / c['stage_cpu_s']:.1f}",
                f"{100 * u['val_accuracy']:.1f}%, {100 * c['val_accuracy']:.1f}%",
                f"{c['peak_rss_mb'] / u['peak_rss_mb']:.3f}",
                f"{u['load_average']:.1f}, {c['load_average']:.1f}",
            ]
            for i, (u, c) in enumerate(zip(uncached, cached, strict=True))
        ],
    )
    return table, per_repeat


def summary_table(results: dict[str, Any]) -> str:
    """The issue's benchmark table: one row per target."""
    rows = []

    def target_row(label, target, aim, faster, slower, keys, digits):
        wall = _ratios(faster, slower, keys[0])
        cpu = _ratios(faster, slower, keys[1])
        rows.append(
            [
                label,
                f">= {target:.1f}{aim}",
                fmt_spread(wall, digits),
                fmt_spread(cpu, digits),
                _verdict(wall, target),
            ]
        )

    throughput = ("examples_per_s", "examples_per_cpu_s")
    for name, runs in results.get("text", {}).items():
        target_row(
            f"text fine-tuning sequences/s, tfxfer / keras-hub fit ({name})",
            TARGETS["text"],
            "",
            runs["tfxfer"],
            runs["keras-hub"],
            throughput,
            2,
        )
    if "head" in results:
        # Times, not rates: the uncached stage's over the cached one's.
        target_row(
            "head stage wall time, uncached / cached (Debian)",
            TARGETS["head"],
            "",
            results["head"]["uncached"],
            results["head"]["cached"],
            ("stage_s", "stage_cpu_s"),
            1,
        )
    if "image" in results:
        target_row(
            "image fine-tuning images/s, tfxfer / plain Keras fit (ResNet50)",
            TARGETS["image"],
            " (aim 1.2)",
            results["image"]["tfxfer"],
            results["image"]["plain"],
            throughput,
            2,
        )
    rss_pairs = [
        (f"tfxfer / keras-hub (text, {name})", runs["tfxfer"], runs["keras-hub"])
        for name, runs in results.get("text", {}).items()
    ]
    if "head" in results:
        rss_pairs.append(
            ("cached / uncached (head)", results["head"]["cached"], results["head"]["uncached"])
        )
    if "image" in results:
        rss_pairs.append(
            ("tfxfer / plain (image)", results["image"]["tfxfer"], results["image"]["plain"])
        )
    for label, ours, theirs in rss_pairs:
        ratios = _ratios(ours, theirs, "peak_rss_mb")
        rows.append(
            [
                f"peak RSS, {label}",
                f"<= {TARGETS['rss']:.1f}",
                fmt_spread(ratios, 3),
                "-",
                _verdict(ratios, TARGETS["rss"], higher_is_better=False),
            ]
        )
    return markdown_table(
        ["measure", "target", "wall-time ratio", "CPU-time ratio", "verdict (wall)"], rows
    )


def debian_train_file(args: argparse.Namespace) -> str:
    """The Debian texts' train file; built (`real_text.build`, needs the network) if missing."""
    from real_text import build

    root = Path(args.data_root).expanduser()
    folder = root / f"seed-{args.data_seed}"
    if not (folder / "train.csv").exists():
        print(f"[speed] {folder / 'train.csv'} is missing: building it", flush=True)
        build(args.data_seed, root)
    return str(folder / "train.csv")


def run_pairs(
    part: str, variants: tuple[str, str], base: dict[str, Any], repeats: int, label: str
) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in _order(repeat, variants):
            spec = {**base, "part": part, "variant": variant}
            runs[variant].append(
                run_child(SCRIPT, spec, f"repeat {repeat + 1}/{repeats}: {label}, {variant}")
            )
    return runs


def parent(args: argparse.Namespace) -> int:
    if args.epochs < 2:
        raise SystemExit(
            f"Expected --epochs >= 2 (the first traces). Received: --epochs {args.epochs}"
        )
    started = time.perf_counter()
    facts = machine_facts()
    parts = [args.only] if args.only else list(PARTS)
    print(
        f"[speed] {facts['nproc']} cores, {facts['gpu']}, TF {facts['tensorflow']}; "
        f"{args.repeats} repeats of {', '.join(parts)}",
        flush=True,
    )
    debian = debian_train_file(args) if {"text", "head"} & set(parts) else None
    results: dict[str, Any] = {}
    sections = []
    if "text" in parts:
        results["text"] = {}
        for name in TEXT_SETS:
            base = {
                "text_set": name,
                "train": debian if name == "debian" else None,
                "batch_size": args.text_batch_size,
                "epochs": args.epochs,
                "texts": args.texts,
            }
            results["text"][name] = run_pairs(
                "text", TEXT_VARIANTS, base, args.repeats, f"text ({name})"
            )
        for name, runs in results["text"].items():
            first = runs["tfxfer"][0]
            table, per_repeat = throughput_tables(runs, TEXT_VARIANTS, "sequences")
            sections.append(
                f"### Text fine-tuning, {name} texts: {first['train_texts']} train texts "
                f"(of the file's {first['file_texts']}), {first['classes']} classes, "
                f"{first['mean_tokens']:.0f} tokens on average ([CLS]/[SEP] included), "
                f"{100 * first['truncated_share']:.0f}% cut at {TEXT['sequence_length']}; batch "
                f"{args.text_batch_size}, {args.epochs} epochs ({args.epochs - 1} steady); "
                f"{_xla(runs)}\n\n{table}\n\nPer repeat, tfxfer / keras-hub:\n\n"
                f"{per_repeat}"
            )
    if "head" in parts:
        base = {"text_set": "debian", "train": debian, "batch_size": args.text_batch_size}
        results["head"] = run_pairs("head", HEAD_VARIANTS, base, args.repeats, "head stage")
        first = results["head"]["uncached"][0]
        table, per_repeat = head_tables(results["head"])
        sections.append(
            f"### Head stage, Debian texts: {first['train_texts']} train / {first['val_texts']} "
            f"val texts, {HEAD['epochs']} epochs at {HEAD['learning_rate']:g}, batch "
            f"{args.text_batch_size}, {TEXT['sequence_length']} tokens\n\n{table}\n\n"
            f"Per repeat:\n\n{per_repeat}"
        )
    if "image" in parts:
        with tempfile.TemporaryDirectory(prefix="tfxfer-bench-speed-") as tmp:
            data_dir = os.path.join(tmp, "shapes")
            run_child(
                SCRIPT,
                {
                    "part": "prepare",
                    "data_dir": data_dir,
                    "per_class": args.images_per_class,
                    "image_size": args.image_size,
                },
                f"drawing {3 * args.images_per_class} shape images",
            )
            base = {
                "data_dir": data_dir,
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "image_size": args.image_size,
            }
            results["image"] = run_pairs(
                "image", IMAGE_VARIANTS, base, args.repeats, "image fine-tuning"
            )
        first = results["image"]["tfxfer"][0]
        table, per_repeat = throughput_tables(results["image"], IMAGE_VARIANTS, "images")
        sections.append(
            f"### Image fine-tuning: {IMAGE['backbone']} (random weights, "
            f"{first['trainable_params']:,} trainable parameters) at {args.image_size} px, "
            f"{first['examples_per_epoch']} train images per epoch, batch {args.batch_size}, "
            f"{args.epochs} epochs ({args.epochs - 1} steady); {_xla(results['image'])}\n\n"
            f"{table}\n\nPer repeat, tfxfer / plain:\n\n{per_repeat}"
        )
    wall = time.perf_counter() - started
    body = "\n\n".join(
        [
            facts_markdown(facts, wall)
            + f"\n- {args.repeats} repeats, the two variants of each pair in alternating order; "
            "cells are median (min-max) over repeats; ratios are paired by repeat",
            summary_table(results),
            *sections,
        ]
    )
    print("\n" + body + "\n", flush=True)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not args.no_readme:
        replace_section(SECTION if args.only is None else f"{SECTION}_{args.only}", body)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=PARTS, help="run one of the three comparisons")
    parser.add_argument("--repeats", type=int, default=3, help="pairs per comparison")
    parser.add_argument(
        "--epochs", type=int, default=3, help="fine-tuning epochs (text, image); the first traces"
    )
    parser.add_argument(
        "--texts",
        type=int,
        default=240,
        help="train texts per text set for the fine-tuning comparison, balanced; 0: all",
    )
    parser.add_argument("--text-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="image batch size")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument(
        "--images-per-class", type=int, default=128, help="synthetic images of each of 3 classes"
    )
    parser.add_argument("--data-root", default="~/.cache/tfxfer-benchmarks/debian-sections")
    parser.add_argument("--data-seed", type=int, default=0, help="which Debian sample")
    add_common_arguments(parser)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
