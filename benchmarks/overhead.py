"""tfxfer's training overhead against plain Keras: same model, same data, same optimizer.

Two variants train the identical `keras.Model` (built with tfxfer's builders) through the
same two stages, head only on a frozen backbone, then the whole backbone with BatchNorm
frozen:

  tfxfer: `tfxfer.run_schedule` with a run directory (per-epoch resume checkpoint of model +
          optimizer state, best weights, history.csv) on tfxfer's input pipeline
          (`tfxfer.make_datasets`: decode or tokenize once, cache, per-epoch
          seeded shuffle, batch, prefetch).
  plain:  `model.trainable` / `layer.trainable` set by hand, `compile` with the same AdamW and
          warmup + cosine schedule, `model.fit` on a plain tf.data pipeline (decode/resize or
          tokenize, cache, shuffle, batch, prefetch), no callbacks.

Both validate after every epoch. Each (modality, variant) runs in its own process, so peak
RSS is per variant; the pairs are repeated with alternating order.

(i) image: MobileNetV3Small at 64 px, random weights, 480 synthetic shape images (384 train,
    96 val), batch 16, 3 + 3 epochs. `--image-backbone resnet50` (the image recipe's default,
    23.5M parameters) shows what the per-epoch checkpoints of a large model cost.
(ii) text: the pretrained MiniLM-L6 text model at sequence length 64, the demo data (360
    train, 40 val texts), batch 16, 2 + 2 epochs.

Run from the repository root (about 6 minutes on 2 busy CPU cores; resnet50 images ~4):

    .venv/bin/python benchmarks/overhead.py
    .venv/bin/python benchmarks/overhead.py --repeats 1 --only text
    .venv/bin/python benchmarks/overhead.py --image-backbone resnet50   # heavier checkpoints
"""

from __future__ import annotations

import argparse
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
SECTION = "overhead"
SEED = 0
# Sizes: big enough that a steady-state epoch takes seconds (so per-epoch costs show), small
# enough that the 12 processes of a default run finish in minutes on 2 shared cores.
IMAGE = {
    "per_class": 160,
    "image_size": 64,
    "batch_size": 16,
    "head_epochs": 3,
    "finetune_epochs": 3,
    "head_lr": 1e-3,
    "finetune_lr": 1e-4,
    "val_split": 0.2,
}
TEXT = {
    "sequence_length": 64,
    "batch_size": 16,
    "head_epochs": 2,
    "finetune_epochs": 2,
    "head_lr": 3e-3,
    "finetune_lr": 5e-5,
    "val_split": 0.1,
}


# === Children ===


def timing_callback():
    """Records, per `fit` call (stage) and per epoch, when training, validation and the epoch ended.

    Keras calls a `fit`'s callbacks in list order; tfxfer's own epoch-end callback (checkpoint,
    best weights, history) comes before the extra callbacks it is given, so `on_epoch_end`
    here fires after that work and the epoch time includes it.
    """
    import keras

    class Timing(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.stages: list[dict[str, Any]] = []

        def on_train_begin(self, logs=None):
            self.stages.append(
                {
                    "begin": time.perf_counter(),
                    "epochs": [],
                    "trainable_weights": len(self.model.trainable_weights),
                    "trainable_params": int(
                        sum(int(_size(w.shape)) for w in self.model.trainable_weights)
                    ),
                }
            )

        def on_epoch_begin(self, epoch, logs=None):
            self.stages[-1]["epochs"].append(
                {"begin": time.perf_counter(), "cpu_begin": time.process_time()}
            )

        def on_test_begin(self, logs=None):
            if self.stages and self.stages[-1]["epochs"]:
                self.stages[-1]["epochs"][-1]["val_begin"] = time.perf_counter()

        def on_test_end(self, logs=None):
            if self.stages and self.stages[-1]["epochs"]:
                self.stages[-1]["epochs"][-1]["val_end"] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            record = self.stages[-1]["epochs"][-1]
            record["end"], record["cpu_end"] = time.perf_counter(), time.process_time()
            record["val_accuracy"] = (logs or {}).get("val_accuracy")

        def on_train_end(self, logs=None):
            self.stages[-1]["end"] = time.perf_counter()

    return Timing()


def _size(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def summarize(timing, examples_per_epoch: int, names: list[str]) -> list[dict[str, Any]]:
    """Per stage: fit wall time, first-epoch time, steady-state epoch time and its parts."""
    out = []
    for name, stage in zip(names, timing.stages, strict=True):
        epochs = stage["epochs"]
        durations = [e["end"] - e["begin"] for e in epochs]
        steady = epochs[1:] or epochs  # the first epoch of a stage traces the train step
        train_part = [e["val_begin"] - e["begin"] for e in steady]
        val_part = [e["val_end"] - e["val_begin"] for e in steady]
        end_part = [e["end"] - e["val_end"] for e in steady]
        steady_epoch = statistics.median(e["end"] - e["begin"] for e in steady)
        # CPU seconds of this process (all threads): less sensitive than wall time to other
        # jobs on a shared machine, though not to contention for caches and memory bandwidth.
        steady_cpu = statistics.median(e["cpu_end"] - e["cpu_begin"] for e in steady)
        out.append(
            {
                "stage": name,
                "fit_s": stage["end"] - stage["begin"],
                "first_epoch_s": durations[0],
                "steady_epoch_s": steady_epoch,
                "steady_train_s": statistics.median(train_part),
                "steady_val_s": statistics.median(val_part),
                "steady_epoch_end_s": statistics.median(end_part),
                "steady_epoch_cpu_s": steady_cpu,
                "examples_per_s": examples_per_epoch / steady_epoch,
                "train_examples_per_s": examples_per_epoch / statistics.median(train_part),
                "trainable_weights": stage["trainable_weights"],
                "trainable_params": stage["trainable_params"],
                "final_val_accuracy": epochs[-1].get("val_accuracy"),
            }
        )
    return out


def plain_optimizer(learning_rate: float, steps: int):
    """The optimizer tfxfer makes for a stage, written with Keras' own schedule."""
    import keras

    warmup = int(steps * 0.1)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(steps - warmup, 1), warmup_target=learning_rate, warmup_steps=warmup
    )
    return keras.optimizers.AdamW(schedule, weight_decay=1e-4)


def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_tensorflow()
    from tfxfer.data.synthetic import write_shapes_dataset

    write_shapes_dataset(
        spec["data_dir"], per_class=IMAGE["per_class"], image_size=IMAGE["image_size"], seed=SEED
    )
    return {"data_dir": spec["data_dir"]}


def train_tfxfer(model, backbone, cfg, train, val, timing) -> dict[str, float]:
    """Both stages through `tfxfer.run_schedule`, with a run directory (checkpoints on)."""
    import tfxfer

    stages = tfxfer.default_schedule(
        cfg["head_epochs"],
        cfg["finetune_epochs"],
        head_learning_rate=cfg["head_lr"],
        finetune_learning_rate=cfg["finetune_lr"],
    )
    with tempfile.TemporaryDirectory(prefix="tfxfer-bench-") as tmp:
        before = peak_rss_mb()
        started = time.perf_counter()
        tfxfer.run_schedule(
            model,
            backbone,
            stages,
            train,
            val,
            run_dir=tfxfer.RunDir(os.path.join(tmp, "run")),
            callbacks=[timing],
            verbose=0,
        )
        total = time.perf_counter() - started
        run_dir_mb = _directory_mb(os.path.join(tmp, "run"))
    return {"total_s": total, "rss_before_training_mb": before, "run_dir_mb": run_dir_mb}


def train_plain(
    model, network, cfg, steps, train, val, loss, timing, frozen_in_finetune
) -> dict[str, float]:
    """Both stages by hand: set `trainable`, compile, `fit`; no callbacks but the timer."""
    import keras

    def compile_stage(learning_rate, epochs):
        model.compile(
            optimizer=plain_optimizer(learning_rate, steps * epochs),
            loss=loss,
            metrics=[keras.metrics.SparseCategoricalAccuracy("accuracy")],
        )

    before = peak_rss_mb()
    started = time.perf_counter()
    network.trainable = False  # stage 1: head only
    compile_stage(cfg["head_lr"], cfg["head_epochs"])
    model.fit(train, validation_data=val, epochs=cfg["head_epochs"], callbacks=[timing], verbose=0)
    network.trainable = True  # stage 2: the backbone too, but what must stay frozen
    for layer in frozen_in_finetune:
        layer.trainable = False
    compile_stage(cfg["finetune_lr"], cfg["finetune_epochs"])
    model.fit(
        train,
        validation_data=val,
        initial_epoch=cfg["head_epochs"],
        epochs=cfg["head_epochs"] + cfg["finetune_epochs"],
        callbacks=[timing],
        verbose=0,
    )
    return {
        "total_s": time.perf_counter() - started,
        "rss_before_training_mb": before,
        "run_dir_mb": 0.0,
    }


def _result(timing, model, examples_per_epoch: int, run: dict[str, float]) -> dict[str, Any]:
    return {
        "stages": summarize(timing, examples_per_epoch, ["head", "finetune"]),
        **run,
        "peak_rss_mb": peak_rss_mb(),
        "train_examples": examples_per_epoch,
        "params": model.count_params(),
    }


def child_image(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    import tfxfer

    keras.utils.set_random_seed(SEED)
    cfg, batch = IMAGE, IMAGE["batch_size"]
    data = tfxfer.load_images(spec["data_dir"], val_split=cfg["val_split"], seed=SEED)
    backbone = tfxfer.build_backbone(spec["backbone"], weights=None, image_size=cfg["image_size"])
    model = tfxfer.build_model(
        backbone, len(data.class_names), head=tfxfer.HeadConfig(pooling="avg", dropout=0.2)
    )
    loss = "sparse_categorical_crossentropy"
    steps = len(data.train) // batch
    timing = timing_callback()
    if spec["variant"] == "tfxfer":
        train, val, _ = tfxfer.make_datasets(data, backbone, batch_size=batch, seed=SEED)
        run = train_tfxfer(model, backbone, cfg, train, val, timing)
    else:

        def decode(path, label):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            image.set_shape([None, None, 3])
            image = tf.image.resize(image, (cfg["image_size"],) * 2, antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

        def pipeline(files, training):
            ds = tf.data.Dataset.from_tensor_slices((files.inputs, files.labels))
            ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
            if training:
                ds = ds.shuffle(len(files), seed=SEED, reshuffle_each_iteration=True)
            return ds.batch(batch, drop_remainder=training).prefetch(tf.data.AUTOTUNE)

        # BatchNorm stays in inference mode when fine-tuning, as tfxfer's stages keep it.
        batchnorm = [
            layer
            for layer in backbone.network.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        run = train_plain(
            model,
            backbone.network,
            cfg,
            steps,
            pipeline(data.train, True),
            pipeline(data.val, False),
            loss,
            timing,
            batchnorm,
        )
    return _result(timing, model, steps * batch, run)


def child_text(spec: dict[str, Any]) -> dict[str, Any]:
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    import tfxfer
    from tfxfer.demo_data import demo_text_paths

    keras.utils.set_random_seed(SEED)
    cfg, batch = TEXT, TEXT["batch_size"]
    data = tfxfer.load_texts(str(demo_text_paths()["train"]), val_split=cfg["val_split"], seed=SEED)
    backbone = tfxfer.build_backbone("minilm-l6", sequence_length=cfg["sequence_length"])
    # As the recipe does: the checkpoint's own (mean) pooling; BERT's pooler is then unused,
    # so the backbone keeps it frozen and out of the groups.
    model = tfxfer.build_model(backbone, len(data.class_names), head=tfxfer.HeadConfig(dropout=0.1))
    pooler = backbone.unused_layers()
    loss = "sparse_categorical_crossentropy"
    steps = len(data.train) // batch
    timing = timing_callback()
    if spec["variant"] == "tfxfer":
        train, val, _ = tfxfer.make_datasets(data, backbone, batch_size=batch, seed=SEED)
        run = train_tfxfer(model, backbone, cfg, train, val, timing)
    else:
        preprocessor = backbone.preprocessor

        def pipeline(examples, training):
            ds = tf.data.Dataset.from_tensor_slices((examples.inputs, examples.labels))
            # Tokenize in chunks inside tf.data, once; cache the token ids.
            ds = (
                ds.batch(256)
                .map(lambda x, y: (preprocessor(x), y), num_parallel_calls=tf.data.AUTOTUNE)
                .unbatch()
                .cache()
            )
            if training:
                ds = ds.shuffle(len(examples), seed=SEED, reshuffle_each_iteration=True)
            return ds.batch(batch, drop_remainder=training).prefetch(tf.data.AUTOTUNE)

        run = train_plain(
            model,
            backbone.network,
            cfg,
            steps,
            pipeline(data.train, True),
            pipeline(data.val, False),
            loss,
            timing,
            pooler,
        )
    return _result(timing, model, steps * batch, run)


def _directory_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def child(spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    if kind == "prepare":
        emit_result(child_prepare(spec))
        return
    result = child_image(spec) if kind == "image" else child_text(spec)
    for stage in result["stages"]:
        print(
            f"[{kind}/{spec['variant']}] {stage['stage']}: {stage['examples_per_s']:.1f} "
            f"examples/s steady (epoch {stage['steady_epoch_s']:.2f} s = train "
            f"{stage['steady_train_s']:.2f} + val {stage['steady_val_s']:.2f} + epoch end "
            f"{stage['steady_epoch_end_s']:.2f}), stage {stage['fit_s']:.1f} s",
            flush=True,
        )
    emit_result(result)


# === Parent ===


def _stage_values(results: list[dict[str, Any]], stage: str, key: str) -> list[float]:
    return [s[key] for r in results for s in r["stages"] if s["stage"] == stage]


def modality_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Rows per stage and variant, then the tfxfer/plain ratios (paired by repeat)."""
    tf_runs, plain_runs = results["tfxfer"], results["plain"]
    rows = []
    for stage in ("head", "finetune"):
        for variant, runs in (("tfxfer", tf_runs), ("plain Keras", plain_runs)):
            weights = _stage_values(runs, stage, "trainable_weights")
            rows.append(
                [
                    stage,
                    variant,
                    fmt_spread(_stage_values(runs, stage, "examples_per_s"), 1),
                    fmt_spread(_stage_values(runs, stage, "train_examples_per_s"), 1),
                    fmt_spread(_stage_values(runs, stage, "steady_epoch_s"), 2, " s"),
                    fmt_spread(_stage_values(runs, stage, "steady_epoch_end_s"), 2, " s"),
                    fmt_spread(_stage_values(runs, stage, "steady_epoch_cpu_s"), 2, " s"),
                    fmt_spread(_stage_values(runs, stage, "first_epoch_s"), 1, " s"),
                    fmt_spread(_stage_values(runs, stage, "fit_s"), 1, " s"),
                    f"{weights[0]} ({_stage_values(runs, stage, 'trainable_params')[0]:,})",
                ]
            )
    table = markdown_table(
        [
            "stage",
            "variant",
            "examples/s (steady epoch)",
            "examples/s (train part only)",
            "steady epoch",
            "of which epoch-end work",
            "CPU time per steady epoch",
            "first epoch (traces)",
            "stage wall time",
            "trainable tensors (params)",
        ],
        rows,
    )

    ratio_rows = []
    for stage in ("head", "finetune"):
        for key, label, better in (
            ("examples_per_s", "examples/s, steady epoch", "> 1"),
            ("train_examples_per_s", "examples/s, train part only", "> 1"),
            ("steady_epoch_cpu_s", "CPU time per steady epoch", "< 1"),
            ("fit_s", "stage wall time (incl. tracing)", "< 1"),
        ):
            ratios = [
                t / p
                for t, p in zip(
                    _stage_values(tf_runs, stage, key),
                    _stage_values(plain_runs, stage, key),
                    strict=True,
                )
            ]
            ratio_rows.append([stage, label, fmt_spread(ratios, 2), better])
    totals = [t["total_s"] / p["total_s"] for t, p in zip(tf_runs, plain_runs, strict=True)]
    ratio_rows.append(["both", "total training wall time", fmt_spread(totals, 2), "< 1"])
    rss = [t["peak_rss_mb"] / p["peak_rss_mb"] for t, p in zip(tf_runs, plain_runs, strict=True)]
    ratio_rows.append(["both", "peak RSS", fmt_spread(rss, 2), "< 1"])
    ratios = markdown_table(
        ["stage", "measure", "tfxfer / plain (median, range over repeats)", "tfxfer better when"],
        ratio_rows,
    )

    memory = markdown_table(
        [
            "variant",
            "peak RSS",
            "peak RSS before training",
            "training adds",
            "total training wall time",
            "run dir written",
        ],
        [
            [
                variant,
                fmt_spread([r["peak_rss_mb"] for r in runs], 0, " MiB"),
                fmt_spread([r["rss_before_training_mb"] for r in runs], 0, " MiB"),
                fmt_spread(
                    [r["peak_rss_mb"] - r["rss_before_training_mb"] for r in runs], 0, " MiB"
                ),
                fmt_spread([r["total_s"] for r in runs], 1, " s"),
                fmt_spread([r["run_dir_mb"] for r in runs], 0, " MiB"),
            ]
            for variant, runs in (("tfxfer", tf_runs), ("plain Keras", plain_runs))
        ],
    )
    return "\n\n".join([table, ratios, memory])


def parent(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    facts = machine_facts()
    print(
        f"[overhead] {facts['nproc']} cores, TF {facts['tensorflow']}, Keras {facts['keras']}; "
        f"{args.repeats} repeats of {args.only or 'image and text'}",
        flush=True,
    )
    modalities = [args.only] if args.only else ["image", "text"]
    results: dict[str, dict[str, list]] = {m: {"tfxfer": [], "plain": []} for m in modalities}
    with tempfile.TemporaryDirectory(prefix="tfxfer-bench-shapes-") as tmp:
        data_dir = os.path.join(tmp, "shapes")
        if "image" in modalities:
            run_child(
                SCRIPT,
                {"kind": "prepare", "data_dir": data_dir},
                f"drawing {3 * IMAGE['per_class']} shape images",
            )
        for repeat in range(args.repeats):
            # Alternate the order, so neither variant always runs first on a warming machine.
            order = ["tfxfer", "plain"] if repeat % 2 == 0 else ["plain", "tfxfer"]
            for modality in modalities:
                for variant in order:
                    spec = {
                        "kind": modality,
                        "variant": variant,
                        "data_dir": data_dir,
                        "backbone": args.image_backbone,
                    }
                    results[modality][variant].append(
                        run_child(
                            SCRIPT,
                            spec,
                            f"repeat {repeat + 1}/{args.repeats}: {modality}, {variant}",
                        )
                    )

    sections = []
    if "image" in results:
        sections.append(
            f"### (i) image: {args.image_backbone} at {IMAGE['image_size']} px, random weights, "
            f"{results['image']['tfxfer'][0]['train_examples']} train images per epoch, batch "
            f"{IMAGE['batch_size']}, {IMAGE['head_epochs']} head + {IMAGE['finetune_epochs']} "
            f"finetune epochs\n\n" + modality_table(results["image"])
        )
    if "text" in results:
        sections.append(
            f"### (ii) text: MiniLM-L6 (pretrained), sequence length {TEXT['sequence_length']}, "
            f"{results['text']['tfxfer'][0]['train_examples']} train texts per epoch, batch "
            f"{TEXT['batch_size']}, {TEXT['head_epochs']} head + {TEXT['finetune_epochs']} "
            f"finetune epochs\n\n" + modality_table(results["text"])
        )
    wall = time.perf_counter() - started
    body = (
        facts_markdown(facts, wall) + f"\n- {args.repeats} repeats, order alternating; "
        "cells are median (min-max) over repeats\n\n" + "\n\n".join(sections)
    )
    print("\n" + body + "\n", flush=True)
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not args.no_readme:
        replace_section(
            SECTION
            if args.only is None and args.image_backbone == "mobilenetv3small"
            else f"{SECTION}_{args.only or 'all'}_{args.image_backbone}",
            body,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["image", "text"])
    parser.add_argument(
        "--image-backbone",
        default="mobilenetv3small",
        help="a tfxfer image backbone name; resnet50 shows heavier checkpoints",
    )
    add_common_arguments(parser)
    return dispatch(parser.parse_args(argv), child, parent)


if __name__ == "__main__":
    sys.exit(main())
