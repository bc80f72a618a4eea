"""Contrastive image pretraining: SimCLR on a folder of unlabelled images, for transfer.

Point it at a folder of images of your own domain (anywhere under it; class subfolders, if
any, are ignored). It pretrains an image backbone without labels (two random views of every
image, a projection head, the NT-Xent loss), and writes `backbone.weights.h5` into the run
directory; with `--probe-dir` (a folder with one subfolder per class) it also reports how
well a linear classifier on the frozen features does with a few labels per class, against
the backbone as pretraining started. The image recipe then fine-tunes from it:

    python -m recipes.contrastive_image_pretrain --data-dir photos_unlabelled/ \
        --output-dir runs/simclr --backbone mobilenetv3small --image-size 64 --epochs 50
    python -m recipes.resnet50_image_classifier --data-dir photos_labelled/ \
        --backbone mobilenetv3small --image-size 64 --weights runs/simclr/

`--weights runs/simclr/backbone.weights.h5` works too. Without `--data-dir` it draws the
small shapes dataset and pretrains (and probes) on it, which shows the pipeline working.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tfxfer.backbones.vision import VISION_BACKBONES, build_vision_backbone
from tfxfer.data.images import scan_image_folder
from tfxfer.data.synthetic import demo_shapes_dir
from tfxfer.data.unlabelled import list_unlabelled_images
from tfxfer.errors import DataError
from tfxfer.pretrain.contrastive import (
    OBJECTIVE,
    ContrastiveAccuracy,
    NTXentLoss,
    ViewAugmentation,
    contrastive_model,
)
from tfxfer.pretrain.contrastive_data import (
    contrastive_train_data,
    contrastive_val_data,
    decoded_images,
)
from tfxfer.pretrain.contrastive_finish import WEIGHTS_FILE, Probe, make_finish
from tfxfer.pretrain.skeleton import PretrainConfig, PretrainTask, run_pretraining
from tfxfer.recipe import command_line


@dataclass
class Config(PretrainConfig):
    """Pretrain an image backbone with SimCLR on unlabelled images."""

    data_dir: str | None = None  # unlabelled images anywhere under it; None draws demo shapes
    output_dir: str = "runs/contrastive_image_pretrain"  # the run directory
    backbone: str = "mobilenetv3small"  # an image backbone of `tfxfer backbones`
    weights: str | None = None  # start from: none (random), imagenet, a .h5 file, a run dir
    image_size: int = 64  # side of the square the backbone sees
    epochs: int = 50  # passes over the unlabelled images
    batch_size: int = 128  # per replica; each image gives two views, all others are negatives
    learning_rate: float = 1e-3  # peak learning rate (linear warmup, then cosine decay)
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay
    temperature: float = 0.1  # NT-Xent temperature: divides the cosine similarities
    projection_dim: int = 128  # width of the projections the loss compares
    projection_hidden: int = 512  # width of the projection head's hidden layer
    min_crop_area: float = 0.2  # smallest random crop, as a share of the image's area
    flip: bool = True  # random horizontal flips in the views
    # Kept on grey images too: brightness and contrast still act there (+10 probe points on
    # Fashion-MNIST, one seed: benchmarks/contrastive_few_labels.py).
    color_jitter: float = 0.5  # colour jitter strength (SimCLR's s); 0 turns it off
    grayscale: float = 0.2  # probability that a view is turned gray
    probe_dir: str | None = None  # labelled images (a subfolder per class) for a linear probe
    probe_labels_per_class: int = 10  # probe trains on this many per class, tests on the rest

    SMOKE: ClassVar[dict] = {"image_size": 32, "projection_dim": 16, "projection_hidden": 32}
    # SimCLR trains BatchNorm: from random weights there are no statistics to keep.
    TRAIN_BATCHNORM: ClassVar[bool] = True

    def views(self) -> ViewAugmentation:
        return ViewAugmentation(self.min_crop_area, self.flip, self.color_jitter, self.grayscale)

    def problems(self) -> list[str]:
        found = super().problems()
        if isinstance(self.batch_size, int) and self.batch_size == 1:
            found.append(
                "batch_size=1 (expected 2 or more: contrastive learning tells each image "
                "from the others in its batch)"
            )
        if not (_finite(self.temperature) and self.temperature > 0):
            found.append(
                f"temperature={self.temperature!r} (expected a finite number > 0, e.g. 0.1)"
            )
        for name in ("projection_dim", "projection_hidden", "probe_labels_per_class"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                found.append(f"{name}={value!r} (expected a positive integer)")
        key = str(self.backbone).lower()
        if str(self.backbone).strip() and key not in VISION_BACKBONES:
            found.append(
                f"backbone={self.backbone!r} (expected an image backbone: "
                f"{sorted(VISION_BACKBONES)})"
            )
        if not (isinstance(self.image_size, int) and not isinstance(self.image_size, bool)):
            found.append(f"image_size={self.image_size!r} (expected a positive integer)")
        elif key in VISION_BACKBONES:
            smallest = VISION_BACKBONES[key]["min_image_size"]
            if not smallest <= self.image_size <= 1024:
                found.append(f"image_size={self.image_size} (expected {smallest} to 1024)")
        return found + self.views().problems()

    def input_paths(self) -> list[str]:
        paths = [p for p in (self.data_dir, self.probe_dir) if p]
        if self.weights and str(self.weights).lower() not in ("imagenet", "none", "random"):
            paths.append(str(self.weights))
        return paths


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class UnlabelledImages:
    """What `build_data` returns: training and held-out image paths, and the probe's images."""

    train: list[str]
    val: list[str]
    probe: Probe | None
    source: str


def build_data(config: Config) -> UnlabelledImages:
    data_dir, probe_dir = config.data_dir, config.probe_dir
    if data_dir is None:
        data_dir = demo_shapes_dir(config.output_dir, config.seed)
        probe_dir = probe_dir or data_dir
    paths = list_unlabelled_images(data_dir)
    order = np.random.default_rng(config.seed).permutation(len(paths))
    held_out = int(round(len(paths) * config.val_fraction))
    # One held-out image would be its own only candidate: no measure at all.
    held_out = held_out if held_out >= 2 and len(paths) - held_out >= 2 else 0
    probe = None
    if probe_dir:
        probe = Probe(scan_image_folder(probe_dir), config.probe_labels_per_class, config.seed)
    return UnlabelledImages(
        train=[paths[i] for i in sorted(order[held_out:])],
        val=[paths[i] for i in sorted(order[:held_out])],
        probe=probe,
        source=data_dir,
    )


def check_batches(data: UnlabelledImages, distribution) -> None:
    """Every replica's batch needs two images at least: each is told apart from the others."""
    replicas = distribution.global_batch_size // distribution.per_replica_batch_size
    per_replica = min(len(data.train), distribution.global_batch_size) // replicas
    if per_replica < 2:
        raise DataError(
            f"{data.source!r} gives {len(data.train)} training image(s) for {replicas} "
            f"replica(s), {per_replica} per replica batch: contrastive learning needs at least "
            "2 images in every replica's batch (each is told apart from the others). Add "
            "images, lower --val-fraction, or use fewer replicas."
        )


def build_pairs(config: Config, data: UnlabelledImages, batch: int):
    """The decoded training images, and the two-view training (and validation) batches."""
    train_images = decoded_images(data.train, config.image_size)
    train = contrastive_train_data(
        train_images,
        num_examples=len(data.train),
        batch_size=batch,
        seed=config.seed,
        views=config.views(),
    )
    val = None
    if data.val:
        val = contrastive_val_data(
            decoded_images(data.val, config.image_size),
            num_examples=len(data.val),
            batch_size=batch,
            seed=config.seed,
            views=config.views(),
        )
    return train_images, train, val


def build_task(config: Config, data: UnlabelledImages, distribution) -> PretrainTask:
    check_batches(data, distribution)

    def rebuild():
        return build_vision_backbone(config.backbone, weights=None, image_size=config.image_size)

    backbone = build_vision_backbone(
        config.backbone, weights=config.weights, image_size=config.image_size
    )
    model = contrastive_model(
        backbone, projection_dim=config.projection_dim, hidden_units=config.projection_hidden
    )
    batch = distribution.global_batch_size
    train_images, train, val = build_pairs(config, data, batch)
    finish = make_finish(
        backbone,
        model,
        rebuild=rebuild,
        train_images=train_images,
        val=val,
        batch_size=batch,
        probe=data.probe,
    )
    return PretrainTask(
        backbone=backbone,
        model=model,
        loss=NTXentLoss(config.temperature),
        metrics=[ContrastiveAccuracy()],
        train=train,
        val=val,
        finish=finish,
        info={
            "objective": OBJECTIVE,
            "modality": "image",
            "output": WEIGHTS_FILE,
            "temperature": config.temperature,
            "train_images": len(data.train),
            "val_images": len(data.val),
            "data_dir": data.source,
        },
    )


def main(config: Config) -> dict:
    """Pretrains and probes; returns the run's paths, model, backbone, history and metrics."""
    return run_pretraining(config, build_data, build_task)


if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
