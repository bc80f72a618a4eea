"""ResNet50 image classifier: fine-tune a pretrained ResNet50 on a folder of images.

Point it at a folder with one subfolder per class. It trains a pooling + dense head on the
frozen ImageNet ResNet50, then unfreezes the backbone at a lower learning rate, and leaves a
run directory with the model (which takes raw uint8 images of any size), a SavedModel
export, metrics, history and curves.

Run:

    python -m recipes.resnet50_image_classifier --data-dir photos/ --output-dir runs/photos

Offline, pass a local weights file (`--weights path/to/..._notop.h5`) or `--weights none`.
Without `--data-dir` it draws a small shapes dataset and trains from scratch (`--weights
none`), which shows the whole pipeline working but not what pretrained weights can do.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

import keras

import tfxfer
from tfxfer.data.images import Augmentation, ImageData, load_image_folder, make_image_dataset


@dataclass
class Config:
    data_dir: str | None = None  # one subfolder per class; None draws the demo shapes
    val_dir: str | None = None  # optional separate validation folder
    val_split: float = 0.2  # held out for validation when there is no val_dir
    output_dir: str = "runs/resnet50_image_classifier"
    backbone: str = "resnet50"  # any image backbone: tfxfer.known_backbones()["image"]
    weights: str | None = "imagenet"  # "imagenet", "none", or a local .h5 weights file
    image_size: int = 224
    batch_size: int = 32  # per replica; the global batch is this times the replicas
    head_epochs: int = 3  # stage 1: head only, backbone frozen
    finetune_epochs: int = 3  # stage 2: unfreeze and fine-tune
    head_learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-4
    unfreeze: str = "all"  # "all", or how many top layer groups to unfreeze ("2")
    pooling: str = "avg"  # avg | max | avg+max
    hidden_units: list[int] = field(default_factory=list)
    dropout: float = 0.2
    augment: bool = True  # flips, small rotations, zoom, contrast (training only)
    seed: int = 0
    strategy: str = "auto"  # auto | cpu | one_device | mirrored | multi_worker | tpu
    mixed_precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    export: bool = True  # write a SavedModel that takes raw images
    overwrite: bool = False  # replace an earlier run in output_dir
    resume: bool = False  # continue the run in output_dir
    scale_learning_rate: bool = False  # multiply learning rates by the number of replicas
    verbose: int = 2

    def validate(self) -> Config:
        tfxfer.validate_config(self)
        return self

    @classmethod
    def smoke(cls, data_dir: str | None, output_dir: str) -> Config:
        """Tiny settings for tests: 32 px, one epoch per stage, no export."""
        return cls(data_dir=data_dir, output_dir=output_dir, weights="none", image_size=32,
                   batch_size=8, head_epochs=1, finetune_epochs=1, augment=False,
                   export=False, verbose=0)


def build_data(config: Config) -> ImageData:
    data_dir = config.data_dir
    if data_dir is None:
        data_dir = os.path.join(config.output_dir + "-data", "shapes")
        if not os.path.isdir(data_dir):
            print(f"[tfxfer] no --data-dir: drawing the demo shapes dataset into {data_dir}")
            tfxfer.write_shapes_dataset(data_dir, per_class=60, image_size=64, seed=config.seed)
    return load_image_folder(data_dir, val_directory=config.val_dir,
                             val_split=config.val_split, seed=config.seed)


def build_model(config: Config, num_classes: int):
    backbone = tfxfer.build_backbone(config.backbone, weights=config.weights,
                                     image_size=config.image_size)
    head = tfxfer.HeadConfig(pooling=config.pooling, hidden_units=list(config.hidden_units),
                             dropout=config.dropout)
    return backbone, tfxfer.build_model(backbone, num_classes, head=head)


def main(config: Config) -> dict:
    """Trains and evaluates; returns the run's paths, model, history and metrics."""
    config.validate()
    tfxfer.RunDir.check(config.output_dir, overwrite=config.overwrite, resume=config.resume)
    # Head initialisation and dropout follow config.seed, so a run can be repeated exactly.
    keras.utils.set_random_seed(config.seed)
    if config.weights is None or str(config.weights).lower() == "none":
        print("[tfxfer] weights=None: the backbone is randomly initialised, not pretrained.")
    run = tfxfer.Session(config.strategy, config.mixed_precision, config.batch_size,
                         config.scale_learning_rate)
    data = build_data(config)
    print(f"[tfxfer] data: {data.summary()}")
    with run.scope():
        backbone, model = build_model(config, len(data.class_names))
    stages = tfxfer.default_schedule(
        config.head_epochs, config.finetune_epochs,
        head_learning_rate=config.head_learning_rate,
        finetune_learning_rate=config.finetune_learning_rate,
        unfreeze=int(config.unfreeze) if str(config.unfreeze).isdigit() else config.unfreeze,
    )
    tfxfer.validate_schedule(stages, backbone.group_names)
    # Only now, with every setting checked, does the run directory get written: a typo in a
    # flag must not leave a half-started run that the next attempt refuses to overwrite.
    run_dir = tfxfer.open_run(config.output_dir, dataclasses.asdict(config),
                              overwrite=config.overwrite, resume=config.resume,
                              extra={"data": data.summary(), **run.describe()},
                              write=run.is_chief)
    size, batch = config.image_size, run.global_batch_size
    train = tfxfer.image_train_data(
        data.train, image_size=size, batch_size=batch, seed=config.seed,
        augmentation=Augmentation() if config.augment else None,
    )
    val = (make_image_dataset(data.val, image_size=size, batch_size=batch)
           if data.val else None)
    loss, metrics = tfxfer.loss_and_metrics("single_label", len(data.class_names))
    result = tfxfer.run_schedule(
        model, backbone.layer_groups, stages, train, val, loss=loss, metrics=metrics,
        run_dir=run_dir, strategy=run.strategy, config={**dataclasses.asdict(config),
                # Resuming on another number of replicas would change every batch.
                "global_batch_size": run.global_batch_size},
        lr_scale=run.lr_scale, verbose=config.verbose,
    )
    scores = tfxfer.finish_run(run_dir, model, result, data.class_names, {"val": val},
                               export_saved_model=config.export, write=run.is_chief)
    return {"run_dir": run_dir.path, "model": model, "backbone": backbone,
            "history": result.history, "metrics": scores, "class_names": data.class_names}


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.resnet50_image_classifier",
        description="Fine-tune a pretrained ResNet50 (or another keras.applications backbone) "
                    "on a folder of images, one subfolder per class.")
    return tfxfer.cli_config(parser, Config, argv)


if __name__ == "__main__":
    sys.exit(tfxfer.run_recipe(main, parse_args))
