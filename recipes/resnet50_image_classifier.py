"""ResNet50 image classifier: fine-tune a pretrained ResNet50 on a folder of images.

Point it at a folder with one subfolder per class. It trains a pooling + dense head on the
frozen ImageNet ResNet50, then unfreezes the backbone at a lower learning rate, and leaves a
run directory with the model (which takes raw uint8 images of any size), a SavedModel
export, metrics, history and curves.

Run:

    python -m recipes.resnet50_image_classifier --data-dir photos/ --output-dir runs/photos
    python -m recipes.resnet50_image_classifier --data-dir photos/ --test-dir photos_test/ \
        --backbone efficientnetv2b0 --image-size 224
    python -m recipes.resnet50_image_classifier --data-dir photos/ \
        --backbone resnet50,efficientnetv2b0 --fusion gated   # one model over both

Offline, pass a local weights file (`--weights path/to/..._notop.h5`) or `--weights none`.
Without `--data-dir` it draws a small shapes dataset and trains from scratch (`--weights
none`), which shows the whole pipeline working but not what pretrained weights can do.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import tfxfer
from tfxfer.data.images import Augmentation
from tfxfer.data.synthetic import demo_shapes_dir
from tfxfer.recipe import RecipeConfig, build_task_model, command_line, load_data, run


@dataclass
class Config(RecipeConfig):
    """Fine-tune a pretrained ResNet50 (or another keras.applications backbone) on images."""

    data_dir: str | None = None  # one subfolder per class; None draws the demo shapes
    val_dir: str | None = None  # a validation folder with the same classes; else val_split
    test_dir: str | None = None  # a held-out test folder, scored into metrics.json
    output_dir: str = "runs/resnet50_image_classifier"
    backbone: str = "resnet50"  # an image backbone (`tfxfer backbones`), hub:<handle>, or a,b
    weights: str | None = "imagenet"  # "imagenet", "none", a local .h5 file; a,b per backbone
    image_size: int = 224  # side of the square the backbone sees
    augment: bool = True  # flips, small rotations, zoom, contrast (training only)

    SMOKE: ClassVar[dict] = {"weights": "none", "image_size": 32, "augment": False}
    MODALITY: ClassVar[str] = "image"

    def problems(self) -> list[str]:
        found = super().problems()
        weights, names = self.weights_list(), self.backbone_names()
        if len(weights) not in (1, len(names)):
            found.append(
                f"weights={self.weights!r} (expected one value for every backbone, or one per "
                f"backbone of {self.backbone!r})"
            )
        return found

    def weights_list(self) -> list[str | None]:
        """The weights of each backbone: one value for all, or `a,b` in backbone order."""
        if self.weights is None:
            return [None]
        return [w.strip() for w in str(self.weights).split(",")]

    def augmentation(self) -> Augmentation | None:
        return Augmentation() if self.augment else None

    def input_paths(self) -> list[str]:
        # The demo shapes (no data_dir) go to output_dir + "-data", a sibling: not an input.
        paths = [p for p in (self.data_dir, self.val_dir, self.test_dir) if p]
        for weights in self.weights_list():
            if weights and weights.lower() not in ("imagenet", "none", "random"):
                paths.append(weights)  # a local weights file
        return paths


def build_data(config: Config) -> tfxfer.LabelledData:
    data_dir = config.data_dir
    if data_dir is None:
        data_dir = demo_shapes_dir(config.output_dir, config.seed)
    return load_data(config, data_dir, val=config.val_dir, test=config.test_dir)


def build_model(config: Config, data: tfxfer.LabelledData):
    # One backbone, or several (a,b) fused under one head; with --regularizer source_task
    # each keeps its ImageNet classifier (Learning without Forgetting).
    return build_task_model(config, data)


def main(config: Config) -> dict:
    """Trains and evaluates; returns the run's paths, model, history and metrics."""
    return run(config, build_data, build_model)


if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
