"""Masked-LM pretraining: adapt a BERT backbone to your domain with unlabelled text.

Continues BERT's masked-language-model objective (keras-hub's `BertMaskedLM`: 15% of tokens
masked, 80% [MASK] / 10% random / 10% kept) on texts from your own domain, no labels needed,
and writes a keras-hub preset directory (config, weights, tokenizer and the masked-LM head)
that the text recipe fine-tunes from. The run directory has the usual history, checkpoints
(`--resume` continues a killed run), curves, and `metrics.json` with the masked-token accuracy
and perplexity on a held-out slice of the texts.

Run (with no --corpus it pretrains on the demo dataset's texts, labels ignored):

    python -m recipes.bert_mlm_pretrain --corpus abstracts.txt --output-dir runs/mlm
    python -m recipes.bert_text_classifier --train labelled.csv --backbone runs/mlm

The corpus is a .txt file with one text per line, the text column of a CSV/TSV/JSONL file
(`--text-column`), or a folder of .txt files (one text each). `--exclude test.csv` leaves out
every text of another file (your test split), so that pretraining never sees it.
`--backbone` takes anything the text recipe does: `minilm-l6`, a keras-hub BERT preset, a
local checkpoint directory, or an earlier run (a pretraining run continues from its preset,
its masked-LM head included).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

import tfxfer
from tfxfer.backbones.text import has_masked_lm_head
from tfxfer.data.unlabelled import read_unlabelled_texts
from tfxfer.demo_data import demo_text_paths
from tfxfer.errors import DataError
from tfxfer.pretrain.masked_lm import (
    MASK_RATE,
    MaskedTokenAccuracy,
    build_masked_lm,
    check_mask_rate,
    held_out_scores,
    masked_held_out_data,
    masked_lm_loss,
    masked_train_data,
    masker_for,
    save_masked_lm_preset,
)
from tfxfer.pretrain.skeleton import PretrainConfig, PretrainTask, run_pretraining
from tfxfer.recipe import command_line
from tfxfer.schedule import Stage


@dataclass
class Config(PretrainConfig):
    """Continue a BERT backbone's masked-LM pretraining on unlabelled in-domain texts."""

    corpus: str | None = None  # .txt (one text per line), CSV/JSONL or folder; None: demo texts
    text_column: str = "text"  # the CSV/JSONL column (or key) that holds the text
    exclude: str | None = None  # a file or folder whose texts are left out (e.g. the test split)
    output_dir: str = "runs/bert_mlm_pretrain"
    backbone: str = "minilm-l6"  # a name, keras-hub preset, local directory or earlier run
    pretrained: bool = True  # False: same architecture, randomly initialised
    sequence_length: int = 128  # max tokens per text; each batch is padded only to its longest
    mask_rate: float = MASK_RATE  # share of each text's tokens masked (BERT: 0.15)
    batch_size: int = 16
    head_epochs: int | None = None  # epochs of a new masked-LM head alone first (None: auto)
    head_learning_rate: float = 1e-3  # peak learning rate of that head-only stage

    SMOKE: ClassVar[dict[str, Any]] = {"sequence_length": 16, "head_epochs": 0}

    def problems(self) -> list[str]:
        found = super().problems()
        try:
            check_mask_rate(self.mask_rate)
        except tfxfer.TfxferError:
            found.append(f"mask_rate={self.mask_rate!r} (expected a number in (0, 1), e.g. 0.15)")
        if self.head_epochs is not None and (
            isinstance(self.head_epochs, bool)
            or not isinstance(self.head_epochs, int)
            or self.head_epochs < 0
        ):
            found.append(f"head_epochs={self.head_epochs!r} (expected an integer >= 0, or none)")
        rate = self.head_learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1e3:
            found.append(f"head_learning_rate={rate!r} (expected a number > 0)")
        length = self.sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 3:
            found.append(f"sequence_length={length!r} (expected an integer >= 3)")
        return found

    def stages(self) -> list[Stage]:
        """A new masked-LM head first trains alone, then everything trains together.

        A checkpoint without its masked-LM head (Hugging Face `BertModel`s such as MiniLM) gets
        a fresh one; its first, random gradients would otherwise flow into the pretrained
        layers, the reason fine-tuning trains a new head on a frozen backbone first. By
        default (`head_epochs=None`) that is one epoch when the head is new and none when the
        checkpoint brings its own.
        """
        epochs = self.head_epochs
        if epochs is None:
            epochs = 0 if has_masked_lm_head(self.backbone) else 1
        head = Stage("head", epochs, train="head", learning_rate=self.head_learning_rate)
        return [head, self.stage()] if epochs else [self.stage()]

    def input_paths(self) -> list[str]:
        import os

        paths = [p for p in (self.corpus, self.exclude) if p]
        if os.path.isdir(os.path.expanduser(self.backbone)):
            paths.append(self.backbone)
        return paths


def build_data(config: Config) -> dict[str, list[str]]:
    """The training texts and a seeded held-out slice of them (`val_fraction`)."""
    source = config.corpus
    if source is None:
        source = str(demo_text_paths()["train"])
        print(f"[tfxfer] no --corpus: pretraining on the demo dataset's texts ({source})")
    texts = read_unlabelled_texts(source, text_column=config.text_column)
    if config.exclude:
        left_out = set(read_unlabelled_texts(config.exclude, text_column=config.text_column))
        texts = [t for t in texts if t not in left_out]
        if not texts:
            raise DataError(
                f"Every text of the corpus {source!r} is also in --exclude {config.exclude!r}: "
                "nothing is left to pretrain on."
            )
    order = np.random.default_rng(config.seed).permutation(len(texts))
    held = int(round(len(texts) * config.val_fraction)) if len(texts) > 1 else 0
    held_out = [texts[i] for i in sorted(order[:held])]
    train = [texts[i] for i in sorted(order[held:])]
    print(
        f"[tfxfer] corpus: {len(train)} texts to pretrain on, {len(held_out)} held out",
        flush=True,
    )
    return {"train": train, "held_out": held_out}


def build_task(config: Config, data: dict[str, list[str]], distribution) -> PretrainTask:
    head = has_masked_lm_head(config.backbone)
    backbone = tfxfer.build_backbone(
        config.backbone,
        sequence_length=config.sequence_length,
        weights=config.pretrained,
        source_head=head,  # continue from the checkpoint's own masked-LM head where it has one
    )
    task, model = build_masked_lm(backbone, config.sequence_length)
    masker = masker_for(backbone, config.mask_rate)
    batch = distribution.global_batch_size
    train = masked_train_data(data["train"], backbone, masker, batch_size=batch, seed=config.seed)
    held_out = (
        masked_held_out_data(data["held_out"], backbone, masker, batch_size=batch, seed=config.seed)
        if data["held_out"]
        else None
    )

    def finish(run_dir, write: bool) -> dict[str, Any]:
        scores = held_out_scores(model, held_out)
        if scores:
            print(
                f"[tfxfer] held out: masked-token accuracy {scores['masked_accuracy']:.3f}, "
                f"perplexity {scores['perplexity']:.2f} ({scores['masked_tokens']} masked tokens)",
                flush=True,
            )
        if write:
            facts = {"pooling": backbone.info.get("pooling"), "pretrained_from": config.backbone}
            save_masked_lm_preset(task, run_dir.file("preset"), facts)
        return {"held_out": scores, "train_texts": len(data["train"])}

    return PretrainTask(
        backbone=backbone,
        model=model,
        loss=masked_lm_loss(),
        metrics=[MaskedTokenAccuracy()],
        train=train,
        val=held_out,
        finish=finish,
        info={
            "objective": "masked_lm",
            "modality": "text",
            "output": "preset",
            "mask_rate": config.mask_rate,
            "train_texts": len(data["train"]),
            "held_out_texts": len(data["held_out"]),
            "masked_lm_head": "the checkpoint's" if head else "new",
        },
    )


def main(config: Config) -> dict:
    """Pretrains; returns the run's paths, model, history, metrics and the preset's path."""
    return run_pretraining(config, build_data, build_task)


if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
