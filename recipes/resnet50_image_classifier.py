"""ResNet50 image classifier: fine-tune a pretrained ResNet50 on a folder of images.

Point it at a folder with one subfolder per class. It trains a pooling + dense head on the
frozen ImageNet ResNet50, then unfreezes the backbone at a lower learning rate, and leaves a
run directory with the model (which takes raw uint8 images of any size), a SavedModel
export, metrics, history and curves.

Run:

    python -m recipes.resnet50_image_classifier --data-dir photos/ --output-dir runs/photos
    python -m recipes.resnet50_image_classifier --data-dir photos/ --test-dir photos_test/ \
        --backbone efficientnetv2b0 --image-size 224

Offline, pass a local weights file (`--weights path/to/..._notop.h5`) or `--weights none`.
Without `--data-dir` it draws a small shapes dataset and trains from scratch (`--weights
none`), which shows the whole pipeline working but not what pretrained weights can do.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import ClassVar

import tfxfer
from tfxfer.data.images import Augmentation
from tfxfer.data.synthetic import write_shapes_dataset
from tfxfer.recipe import RecipeConfig, command_line, run


@dataclass
class Config(RecipeConfig):
    """Fine-tune a pretrained ResNet50 (or another keras.applications backbone) on images."""

    data_dir: str | None = None  # one subfolder per class; None draws the demo shapes
    val_dir: str | None = None  # a validation folder with the same classes; else val_split
    test_dir: str | None = None  # a held-out test folder, scored into metrics.json
    output_dir: str = "runs/resnet50_image_classifier"
    backbone: str = "resnet50"  # any image backbone (`tfxfer backbones`) or hub:<handle>
    weights: str | None = "imagenet"  # "imagenet", "none", or a local .h5 weights file
    image_size: int = 224  # side of the square the backbone sees
    augment: bool = True  # flips, small rotations, zoom, contrast (training only)

    SMOKE: ClassVar[dict] = {"weights": "none", "image_size": 32, "augment": False}

    def augmentation(self) -> Augmentation | None:
        return Augmentation() if self.augment else None

    def input_paths(self) -> list[str]:
        # The demo shapes (no data_dir) go to output_dir + "-data", a sibling: not an input.
        paths = [p for p in (self.data_dir, self.val_dir, self.test_dir) if p]
        if self.weights and str(self.weights).lower() not in ("imagenet", "none", "random"):
            paths.append(self.weights)  # a local weights file
        return paths


def build_data(config: Config) -> tfxfer.LabelledData:
    data_dir = config.data_dir
    if data_dir is None:
        # Beside the run; for a cloud --output-dir, in a local temporary folder instead.
        beside = config.output_dir + "-data" if "://" not in config.output_dir else None
        data_dir = os.path.join(beside or tempfile.mkdtemp(prefix="tfxfer-shapes-"), "shapes")
        if not os.path.isdir(data_dir):
            print(f"[tfxfer] no --data-dir: drawing the demo shapes dataset into {data_dir}")
            write_shapes_dataset(data_dir, per_class=60, image_size=64, seed=config.seed)
    return tfxfer.load_images(
        data_dir,
        val_directory=config.val_dir,
        test_directory=config.test_dir,
        val_split=config.val_split,
        seed=config.seed,
    )


def build_model(config: Config, data: tfxfer.LabelledData):
    backbone = tfxfer.build_backbone(
        config.backbone, weights=config.weights, image_size=config.image_size
    )
    head = tfxfer.HeadConfig(
        pooling=config.pooling, hidden_units=list(config.hidden_units), dropout=config.dropout
    )
    return backbone, tfxfer.build_model(backbone, len(data.class_names), head=head)


def main(config: Config) -> dict:
    """Trains and evaluates; returns the run's paths, model, history and metrics."""
    return run(config, build_data, build_model)


if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
