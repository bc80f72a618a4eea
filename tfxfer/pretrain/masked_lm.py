"""Domain-adaptive masked-LM pretraining: continue BERT's own objective on unlabelled text.

A BERT checkpoint learned language from its pretraining corpus; a user's texts (legal,
clinical, package descriptions) use words and phrasings it saw little of. Continuing the
masked-language-model objective on the user's unlabelled texts before fine-tuning
("domain-adaptive pretraining", Gururangan et al., ACL 2020) adapts it, and needs no labels.

The objective is keras-hub's `BertMaskedLM`: the backbone plus a `MaskedLMHead` whose output
matrix is the token embedding, predicting the original token at each masked position. The
masking follows BERT's rule: 15% of each text's tokens (never padding, [CLS] or [SEP]) are
chosen; of those, 80% become [MASK], 10% a random token and 10% stay. Two things differ from
feeding `BertMaskedLMPreprocessor` into `fit`, both for the machinery fine-tuning has:

- The masks are drawn with stateless random ops seeded by the run's seed and the global step,
  so each epoch masks anew (dynamic masking, as RoBERTa found better than fixed masks) and a
  run resumed at any step sees exactly the masks the uninterrupted run saw. Held-out masks
  are fixed, so the held-out loss of one epoch compares with the next.
- Batches are the text recipe's length-grouped, trimmed batches (`tfxfer.data.text_pipeline`), so
  short texts do not pay for the maximum sequence length; the number of mask slots follows
  each batch's length (15% of it, rounded up).

The result is written as a keras-hub preset directory (config, weights, tokenizer, and the
`BertMaskedLM` task with its head), which the text recipe takes as `--backbone DIR`; its
masked-LM head also makes `--regularizer source_task` possible on the adapted backbone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfxfer.backbones.base import Backbone
from tfxfer.data.examples import Examples
from tfxfer.data.pipeline import TrainData
from tfxfer.data.text_pipeline import make_text_dataset, text_train_data
from tfxfer.errors import TfxferError

# BERT's rule: the share of tokens chosen, and of those the shares replaced by [MASK] and by
# a random token (the rest stay as they are, so the model cannot learn that only [MASK] matters).
MASK_RATE = 0.15
MASK_TOKEN_SHARE = 0.8
RANDOM_TOKEN_SHARE = 0.1
# Label of a mask slot that holds no masked token (a short text has fewer than its batch's).
UNUSED_SLOT = -1
# Offset of the held-out masks' seeds from the training masks', so the two never coincide.
_HELD_OUT_SEED = 1_000_003


def check_mask_rate(rate: Any) -> float:
    """`rate` as a float in (0, 1), or a `TfxferError` that says why it is not one."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
        raise TfxferError(
            f"Expected the mask rate to be a number in (0, 1), the share of tokens masked "
            f"(BERT uses 0.15). Received: mask_rate={rate!r}"
        )
    return float(rate)


class TokenMasker:
    """Masks a batch of token dicts by BERT's rule, as a function of a seed: replayable.

    Args:
        mask_token_id: int. The tokenizer's [MASK] id.
        vocabulary_size: int. Random replacement tokens are drawn from `[0, vocabulary_size)`:
            as in BERT, any token may be drawn.
        unselectable_ids: list[int]. Tokens never masked (padding, [CLS], [SEP]).
        rate: float. Share of each text's selectable tokens to mask. Defaults to `0.15`.

    Example:

    ```python
    masker = TokenMasker(mask_token_id=103, vocabulary_size=30522, unselectable_ids=[0, 101, 102])
    x, labels = masker(batch, seed=tf.constant([0, 7], tf.int64))
    ```
    """

    def __init__(
        self,
        *,
        mask_token_id: int,
        vocabulary_size: int,
        unselectable_ids: list[int],
        rate: float = MASK_RATE,
    ):
        self.mask_token_id = int(mask_token_id)
        self.vocabulary_size = int(vocabulary_size)
        self.unselectable_ids = [int(i) for i in unselectable_ids]
        self.rate = check_mask_rate(rate)

    def __call__(self, x: dict[str, tf.Tensor], seed: tf.Tensor) -> tuple[dict, tf.Tensor]:
        """`(inputs with masked token ids and mask_positions, labels)` of one batch.

        `labels[i, k]` is the original token at `mask_positions[i, k]`, or -1 for a slot that
        masks nothing (its position is 0 then). There are ceil(rate * length) slots.
        """
        token_ids = tf.cast(x["token_ids"], tf.int32)
        batch, length = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
        slots = tf.maximum(
            1, tf.cast(tf.math.ceil(self.rate * tf.cast(length, tf.float32)), tf.int32)
        )
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
        selectable = tf.cast(x["padding_mask"], tf.bool)
        for token in self.unselectable_ids:
            selectable &= token_ids != token
        count = tf.reduce_sum(tf.cast(selectable, tf.int32), axis=1)
        # At least one masked token in every text that has a selectable one.
        wanted = tf.cast(tf.round(self.rate * tf.cast(count, tf.float32)), tf.int32)
        wanted = tf.minimum(tf.clip_by_value(wanted, 1, slots), count)
        # A random order of the selectable positions: the top scores are the chosen ones.
        scores = tf.random.stateless_uniform([batch, length], seed=seeds[0])
        scores = tf.where(selectable, scores, -1.0)
        top, positions = tf.math.top_k(scores, k=slots)
        chosen = (tf.range(slots)[None, :] < wanted[:, None]) & (top >= 0.0)
        originals = tf.gather(token_ids, positions, batch_dims=1)
        draw = tf.random.stateless_uniform([batch, slots], seed=seeds[1])
        random_tokens = tf.random.stateless_uniform(
            [batch, slots], seed=seeds[2], minval=0, maxval=self.vocabulary_size, dtype=tf.int32
        )
        replaced = tf.where(
            draw < MASK_TOKEN_SHARE,
            self.mask_token_id,
            tf.where(draw < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE, random_tokens, originals),
        )
        replaced = tf.where(chosen, replaced, originals)
        # top_k's positions are distinct within a row, so each index is written once.
        rows = tf.broadcast_to(tf.range(batch)[:, None], [batch, slots])
        indices = tf.stack([rows, positions], axis=-1)
        masked = tf.tensor_scatter_nd_update(token_ids, indices, replaced)
        inputs = {
            **x,
            "token_ids": tf.cast(masked, x["token_ids"].dtype),
            "mask_positions": tf.where(chosen, positions, 0),
        }
        return inputs, tf.where(chosen, originals, UNUSED_SLOT)


def masker_for(backbone: Backbone, rate: float = MASK_RATE) -> TokenMasker:
    """The `TokenMasker` of a BERT backbone's tokenizer."""
    tokenizer = getattr(backbone.preprocessor, "tokenizer", None)
    if tokenizer is None or getattr(tokenizer, "mask_token_id", None) is None:
        raise TfxferError(
            f"Masked-LM pretraining needs a BERT backbone with a WordPiece tokenizer that has a "
            f"[MASK] token; {backbone.name!r} has none (a TF-Hub text model tokenizes inside "
            "itself). Pass a keras-hub BERT preset, a local BERT directory or minilm-l6."
        )
    special = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id]
    return TokenMasker(
        mask_token_id=tokenizer.mask_token_id,
        vocabulary_size=int(backbone.info.get("vocab_size") or tokenizer.vocabulary_size()),
        unselectable_ids=[int(i) for i in special if i is not None],
        rate=rate,
    )


def _unlabelled(texts: list[str], source: str) -> Examples:
    return Examples(list(texts), np.zeros(len(texts), np.int32), ["text"], "text", source=source)


def masked_train_data(
    texts: list[str],
    backbone: Backbone,
    masker: TokenMasker,
    *,
    batch_size: int,
    seed: int = 0,
) -> TrainData:
    """Masked training batches that can start at any epoch and step, with replayable masks.

    The batches are the text recipe's (`text_train_data`: length-grouped, each trimmed to its
    bucket); batch `s` of the whole run (epoch times steps per epoch plus the step) is masked
    with the seed `(seed, s)`.
    """
    inner = text_train_data(
        _unlabelled(texts, "unlabelled"), backbone.preprocessor, batch_size=batch_size, seed=seed
    )
    steps = inner.steps_per_epoch

    def build(start_epoch: int, start_step: int = 0) -> tf.data.Dataset:
        first = int(start_epoch) * steps + int(start_step)
        batches = inner.build(start_epoch, start_step)
        counter = tf.data.Dataset.range(first, 2**62)

        def mask(batch, step):
            return masker(batch[0], tf.stack([tf.constant(seed, tf.int64), step]))

        ds = tf.data.Dataset.zip((batches, counter))
        return ds.map(mask, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return TrainData(build, steps)


def masked_held_out_data(
    texts: list[str], backbone: Backbone, masker: TokenMasker, *, batch_size: int, seed: int = 0
) -> tf.data.Dataset:
    """Held-out batches in file order with fixed masks: the same every epoch and every run."""
    batches = make_text_dataset(
        texts, np.zeros(len(texts), np.int32), backbone.preprocessor, batch_size=batch_size
    )

    def mask(index, batch):
        return masker(batch[0], tf.stack([tf.constant(seed + _HELD_OUT_SEED, tf.int64), index]))

    return batches.enumerate().map(mask).cache().prefetch(tf.data.AUTOTUNE)


class MaskedTokenAccuracy(keras.metrics.Mean):
    """The share of masked tokens predicted right; slots that mask nothing do not count."""

    def __init__(self, name: str = "accuracy", dtype: Any = None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        correct = ops.cast(ops.equal(predicted, y_true), "float32")
        used = ops.cast(ops.not_equal(y_true, UNUSED_SLOT), "float32")
        return super().update_state(correct, sample_weight=used)


class MaskedLMLoss(keras.losses.Loss):
    """Cross-entropy over masked tokens only, averaged over them (unused slots count nothing).

    Keras' `ignore_class` does the same through a boolean mask that the distributed train
    step cannot sum across replicas (an `AddN` of booleans under MirroredStrategy), so this
    loss weights each slot itself: a used slot by (slots / used slots), an unused one by 0,
    so that Keras' mean over the batch's slots is the mean over its masked tokens. Under a
    strategy with several replicas each replica averages over its own masked tokens and the
    replicas' losses are averaged: a replica whose texts hold fewer masked tokens weighs the
    same as the others.
    """

    def __init__(self, name: str = "masked_lm_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        used = ops.cast(ops.not_equal(y_true, UNUSED_SLOT), "float32")
        losses = keras.losses.sparse_categorical_crossentropy(
            ops.maximum(y_true, 0), ops.cast(y_pred, "float32"), from_logits=True
        )
        share = ops.cast(ops.size(used), "float32") / ops.maximum(ops.sum(used), 1.0)
        return losses * used * share


def masked_lm_loss() -> keras.losses.Loss:
    """The masked-LM loss the pretraining stage compiles with."""
    return MaskedLMLoss()


def build_masked_lm(backbone: Backbone, sequence_length: int):
    """The keras-hub `BertMaskedLM` over a tfxfer BERT backbone, and the model `fit` trains.

    The task's head starts from the checkpoint's own masked-LM head when the backbone was
    built with it (`source_head=True` on a preset saved from a `BertMaskedLM`), else fresh
    (Hugging Face `BertModel` checkpoints such as MiniLM carry no head: its output matrix is
    the token embedding all the same, so only a small transform and a bias start from zero).

    Returns:
        `(task, model)`: the `BertMaskedLM` (with a `BertMaskedLMPreprocessor` of the
        backbone's tokenizer, so its preset carries the tokenizer), and a plain functional
        model over the same layers, taking `{token_ids, segment_ids, padding_mask,
        mask_positions}` and returning logits `(batch, slots, vocabulary)`.
    """
    import keras_hub

    bert = backbone.network.get_layer("bert_backbone")
    preprocessor = keras_hub.models.BertMaskedLMPreprocessor(
        tokenizer=backbone.preprocessor.tokenizer, sequence_length=sequence_length
    )
    task = keras_hub.models.BertMaskedLM(backbone=bert, preprocessor=preprocessor)
    if task.masked_lm_head.compute_dtype != "float32" and _replicas() > 1:
        # Under a multi-replica strategy Keras first runs the model outside its mixed-precision
        # autocast, where the head's last step (bfloat16 logits + a float32 bias) fails: the
        # head's own arithmetic runs in float32 there (its dense layers keep the policy).
        task.masked_lm_head.dtype_policy = "float32"
    source = backbone.source_heads.get("masked_lm")
    if source is not None:
        task.masked_lm_head.set_weights(source.layer.get_weights())
    # The MLM head reads tokens, never BERT's pooler, which would get no gradient: frozen, as
    # under a mean-pooling head.
    backbone.head_pooling = "mean"
    # A functional model of the same layers: a keras-hub Task's own `compile` would add
    # metrics of its own that read sample weights this pipeline does not make.
    model = keras.Model(task.inputs, task.outputs, name="masked_lm")
    return task, model


def _replicas() -> int:
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def held_out_scores(model: keras.Model, held_out: tf.data.Dataset | None) -> dict[str, Any]:
    """Masked-token accuracy, mean cross-entropy and perplexity over every held-out mask."""
    if held_out is None:
        return {}
    total, correct, count = 0.0, 0, 0
    for x, labels in held_out:
        logits = ops.convert_to_numpy(ops.cast(model(x, training=False), "float32"))
        labels = labels.numpy()
        used = labels != UNUSED_SLOT
        if not used.any():
            continue
        chosen = logits[used]
        shifted = chosen - chosen.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        total += float(np.sum(log_norm - shifted[np.arange(len(chosen)), labels[used]]))
        correct += int(np.sum(chosen.argmax(axis=-1) == labels[used]))
        count += int(used.sum())
    if count == 0:
        return {}
    loss = total / count
    return {
        "masked_tokens": count,
        "masked_accuracy": correct / count,
        "loss": loss,
        "perplexity": float(math.exp(min(loss, 700.0))),
    }


# What a preset tfxfer wrote says about itself beyond keras-hub's files (the pooling the
# checkpoint was trained for, which keras-hub's config does not record).
PRESET_FACTS = "tfxfer.json"


def save_masked_lm_preset(task, path: str, facts: dict[str, Any] | None = None) -> str:
    """Writes the task as a keras-hub preset directory at `path`, whole or not at all.

    `facts` (e.g. the checkpoint's pooling) go into the preset's `tfxfer.json`, which
    `build_backbone` reads back.

    The preset is saved in float32 whatever the run's mixed precision (its config would
    otherwise make every later run that loads it compute in bfloat16), into a temporary
    sibling that is renamed into place once complete.
    """
    import keras_hub

    bert = task.backbone
    plain = keras_hub.models.BertBackbone.from_config({**bert.get_config(), "dtype": "float32"})
    plain.set_weights(bert.get_weights())
    copy = keras_hub.models.BertMaskedLM(backbone=plain, preprocessor=task.preprocessor)
    copy.masked_lm_head.set_weights(task.masked_lm_head.get_weights())
    parent, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(temporary, ignore_errors=True)  # tfxfer's own leftover of a killed save
    copy.save_to_preset(temporary)
    with open(os.path.join(temporary, PRESET_FACTS), "w", encoding="utf-8") as file:
        json.dump(facts or {}, file, indent=2)
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, PRESET_FACTS)):
            shutil.rmtree(temporary)
            raise TfxferError(
                f"{path!r} exists and is not a preset tfxfer wrote (it has no {PRESET_FACTS}); "
                "tfxfer never replaces what it did not write. Save the preset elsewhere."
            )
        shutil.rmtree(path)  # an earlier save of this run's own preset (a resumed run)
    os.replace(temporary, path)
    return path
