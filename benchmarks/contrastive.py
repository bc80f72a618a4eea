"""Contrastive pretraining on unlabelled images, then fine-tuning on 10 labels per class.

The issue's benchmark: scikit-learn's handwritten digits (1,797 images of 8x8 pixels, ten
classes) written as PNG files, split once into 1,258 training and 539 test images (seed 0).
Per seed:

  1. `recipes.contrastive_image_pretrain` pretrains MobileNetV3Small from random weights on
     the 1,258 training images, without their labels (its linear probe trains on 10 of them
     per class and tests on the other training images: a validation figure, not the test).
  2. `recipes.resnet50_image_classifier` fine-tunes on 10 labelled training images per class
     (drawn by the seed) and is scored on the 539 test images, three ways:
       simclr    --weights <the pretraining run directory>
       random    --weights none (the recipe's own random initialisation)
       random+bn random weights whose BatchNorm statistics are those of the training images:
                 Keras' initial statistics (mean 0, variance 1) make a random network's
                 features vanish in inference mode, so `random` is a weaker baseline than
                 random weights need be; this one is the fair comparison.

The test images are never seen by pretraining, by the probe or by any choice made here.
Scikit-learn (the `bench` extra) only supplies the images.

    .venv/bin/python benchmarks/contrastive.py               # seeds 0 1 2, README section
    .venv/bin/python benchmarks/contrastive.py --seeds 0 --no-readme --epochs 20
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    machine_facts,
    markdown_table,
    quiet_tensorflow,
    replace_section,
    run_child,
)

SECTION = "contrastive"
SCRIPT = str(Path(__file__).resolve())
BACKBONE = "mobilenetv3small"
VARIANTS = ("simclr", "random", "random+bn")
DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "tfxfer-bench-contrastive")


# === Data ===


def write_digits(root: Path, test_fraction: float = 0.3) -> tuple[Path, Path]:
    """Writes the digits as RGB PNG files into root/train/<digit>/ and root/test/<digit>/."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    train, test = root / "train", root / "test"
    if train.is_dir() and test.is_dir():
        return train, test
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    held_out = int(test_fraction * len(order))
    for folder, ids in ((test, order[:held_out]), (train, order[held_out:])):
        for i in ids:
            target = folder / str(digits.target[i])
            target.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(target / f"{i:04d}.png")
    return train, test


def labelled_subset(train: Path, target: Path, per_class: int, seed: int) -> Path:
    """Copies `per_class` training images of each class (drawn by `seed`) into `target`."""
    import numpy as np

    if target.is_dir():
        shutil.rmtree(target)
    rng = np.random.default_rng(1000 + seed)
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        (target / folder.name).mkdir(parents=True)
        for index in rng.choice(len(files), per_class, replace=False):
            shutil.copy(files[index], target / folder.name / files[index].name)
    return target


# === Children (one fresh process each) ===


def _timed(action) -> dict[str, Any]:
    started, cpu = time.perf_counter(), os.times()
    result = action()
    after = os.times()
    used = (after.user - cpu.user) + (after.system - cpu.system)
    used += (after.children_user - cpu.children_user) + (
        after.children_system - cpu.children_system
    )
    return {**result, "wall_s": time.perf_counter() - started, "cpu_s": used}


def child(spec: dict[str, Any]) -> None:
    quiet_tensorflow()
    kind = spec.pop("kind")
    action = {"pretrain": _pretrain, "random_bn": _random_bn, "finetune": _finetune}[kind]
    emit_result(_timed(lambda: action(**spec)))


def _pretrain(output_dir: str, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    from recipes.contrastive_image_pretrain import Config, main

    result = main(Config(output_dir=output_dir, seed=seed, overwrite=True, **config))
    last = result["history"][-1]
    return {"metrics": result["metrics"], "last_epoch": last}


def _random_bn(path: str, train_dir: str, seed: int, image_size: int) -> dict[str, Any]:
    """Random weights of the pretraining run's seed, BatchNorm statistics of the images."""
    import keras

    from tfxfer.backbones.vision import build_vision_backbone
    from tfxfer.data.unlabelled import list_unlabelled_images
    from tfxfer.pretrain.contrastive_data import decoded_images
    from tfxfer.pretrain.contrastive_finish import recalibrate_batchnorm, save_network_weights

    keras.utils.set_random_seed(seed)
    backbone = build_vision_backbone(BACKBONE, weights=None, image_size=image_size)
    images = decoded_images(list_unlabelled_images(train_dir), image_size)
    recalibrate_batchnorm(backbone.network, backbone.preprocessor, images, 128)
    save_network_weights(backbone.network, path)
    return {}


def _finetune(output_dir: str, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    from recipes.resnet50_image_classifier import Config, main

    result = main(Config(output_dir=output_dir, seed=seed, overwrite=True, **config))
    return {
        "test_accuracy": result["metrics"]["test"]["accuracy"],
        "val_accuracy": result["metrics"].get("val", {}).get("accuracy"),
    }


# === The comparison ===


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=40, help="pretraining epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="pretraining batch")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="pretraining rate")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--min-crop-area", type=float, default=0.3)
    parser.add_argument("--head-epochs", type=int, default=20, help="fine-tuning stage 1")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning stage 2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where images and runs go")
    parser.add_argument("--section", default=SECTION, help="README section to write")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    return dispatch(args, child, lambda a: _compare(a))


def _compare(args) -> int:
    started, facts = time.perf_counter(), machine_facts()
    root = Path(args.root).expanduser()
    train, test = write_digits(root)
    variants = [v for v in args.variants.split(",") if v]
    pretraining = {
        "data_dir": str(train),
        "probe_dir": str(train),  # the probe tests on training images, never on the test set
        "probe_labels_per_class": args.labels_per_class,
        "backbone": BACKBONE,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "temperature": args.temperature,
        "min_crop_area": args.min_crop_area,
        "flip": False,  # digits are not mirror-symmetric (a 2 flipped is no 2)
        "verbose": 2,
    }
    finetuning = {
        "backbone": BACKBONE,
        "image_size": args.image_size,
        "head_epochs": args.head_epochs,
        "finetune_epochs": args.finetune_epochs,
        "augment": False,  # the recipe's flips would mirror digits too
        "export": False,
        "verbose": 0,
    }
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        folder = root / f"seed-{seed}"
        labelled = labelled_subset(train, folder / "labelled", args.labels_per_class, seed)
        row: dict[str, Any] = {"seed": seed}
        spec = {"output_dir": str(folder / "simclr"), "seed": seed, "config": pretraining}
        row["pretrain"] = run_child(SCRIPT, {"kind": "pretrain", **spec}, f"pretrain, seed {seed}")
        weights = {"simclr": str(folder / "simclr"), "random": None}
        if "random+bn" in variants:
            path = str(folder / "random_bn.weights.h5")
            spec = {"path": path, "train_dir": str(train), "seed": seed}
            run_child(SCRIPT, {"kind": "random_bn", **spec, "image_size": args.image_size}, "bn")
            weights["random+bn"] = path
        for variant in variants:
            config = {
                **finetuning,
                "data_dir": str(labelled),
                "test_dir": str(test),
                "weights": weights[variant],
            }
            spec = {
                "output_dir": str(folder / f"finetune-{variant}"),
                "seed": seed,
                "config": config,
            }
            result = run_child(SCRIPT, {"kind": "finetune", **spec}, f"{variant}, seed {seed}")
            print(f"     test accuracy {100 * result['test_accuracy']:.1f}%", flush=True)
            row[variant] = result
        runs.append(row)
    body = results(runs, variants, args)
    print("\n" + body + "\n", flush=True)
    if not args.no_readme:
        wall = time.perf_counter() - started
        replace_section(args.section, facts_markdown(facts, wall) + "\n\n" + body)
    return 0


def _mean_range(values: list[float], scale: float = 100.0, unit: str = "%") -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}{unit}"
    return f"{statistics.mean(values):.1f}{unit} ({min(values):.1f}-{max(values):.1f})"


def results(runs: list[dict[str, Any]], variants: list[str], args) -> str:
    lines = [
        f"MobileNetV3Small at {args.image_size} px, scikit-learn digits (1,258 unlabelled "
        f"training images for pretraining, 539 test images), fine-tuned on "
        f"{args.labels_per_class} labels per class; pretraining {args.epochs} epochs, batch "
        f"{args.batch_size}, rate {args.learning_rate:g}, temperature {args.temperature:g}, "
        f"min crop area {args.min_crop_area:g}, no flips; fine-tuning {args.head_epochs} head + "
        f"{args.finetune_epochs} fine-tuning epochs, no augmentation. Test accuracy: mean "
        f"(min-max) over seeds {', '.join(str(r['seed']) for r in runs)}.",
        "",
    ]
    table = [[v, _mean_range([r[v]["test_accuracy"] for r in runs])] for v in variants]
    lines.append(markdown_table(["initial weights", "test accuracy"], table))
    lines.append("")
    baselines = [v for v in variants if v != "simclr"]
    if "simclr" in variants:
        headers = ["seed", *[f"simclr - {b} (points)" for b in baselines]]
        headers += ["probe: pretrained", "probe: start", "pretraining wall / CPU"]
        headers += [f"{v} fine-tuning wall / CPU" for v in variants]
        rows = []
        for r in runs:
            probe = r["pretrain"]["metrics"].get("linear_probe", {})
            rows.append(
                [
                    r["seed"],
                    *[
                        f"{100 * (r['simclr']['test_accuracy'] - r[b]['test_accuracy']):+.1f}"
                        for b in baselines
                    ],
                    f"{100 * probe.get('pretrained_accuracy', float('nan')):.1f}%",
                    f"{100 * probe.get('initial_accuracy', float('nan')):.1f}%",
                    f"{r['pretrain']['wall_s']:.0f} s / {r['pretrain']['cpu_s']:.0f} s",
                    *[f"{r[v]['wall_s']:.0f} s / {r[v]['cpu_s']:.0f} s" for v in variants],
                ]
            )
        lines.append(markdown_table(headers, rows))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
