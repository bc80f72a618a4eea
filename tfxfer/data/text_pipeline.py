"""Tokenized text pipelines: labelled texts to cached, batched, trimmed `tf.data` datasets.

The pipelines tokenize once with the backbone's preprocessor inside `tf.data`, cache the
token ids, and only shuffle and batch per epoch.

Batches are padded only as far as they need (dynamic padding): the preprocessor pads every text
to the maximum `sequence_length`, and each batch is then trimmed to the smallest bucket length
(`tfxfer.data.buckets`, capped at the maximum) that holds its longest text. A short text then
costs what it is long, not what the longest possible text is; and since there are a few
bucket lengths, a step function sees a few shapes and is traced (or XLA-compiled) a few times.
Training batches group texts of similar length: each epoch, a permutation seeded by the seed and
the epoch is cut into pools, each pool is sorted by length and cut into batches, and the
batches are shuffled. The order is a function of the epoch alone, so a resumed run replays it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfxfer.data.buckets import (
    as_arrays,
    bucket_lengths,
    bucket_of,
    length_grouped_batches,
    longest_in_batch,
    padded_length,
    trimmed,
)
from tfxfer.data.examples import Examples
from tfxfer.data.pipeline import TrainData, epoch_batches, maybe_cache
from tfxfer.errors import DataError, TfxferError

# Texts are tokenized in chunks of this many before the token ids are cached one by one.
_TOKENIZE_CHUNK = 256


def make_text_dataset(
    texts: Sequence[str],
    labels: np.ndarray | Sequence[Any],
    preprocessor: Any = None,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool | str = True,
    dynamic_padding: bool = True,
) -> tf.data.Dataset:
    """A batched, cached, prefetched dataset of `(token dict, label)`, tokenized inside `tf.data`.

    Texts are tokenized once, in chunks, and the token ids are cached, so later epochs only
    read, shuffle and batch. Batches keep the texts' order (file order unless `shuffle`), so
    predictions line up with the texts. For training that must resume mid-run, use
    `text_train_data`, whose order depends only on the epoch.

    Args:
        texts: sequence of str. Raw texts.
        labels: array-like. `(n,)` class ids or `(n, num_classes)` multi-hot rows.
        preprocessor: keras layer or None. The backbone's preprocessor (`backbone.preprocessor`);
            `None` keeps raw strings. Defaults to `None`.
        batch_size: int. The global batch size. Defaults to `32`.
        shuffle: bool. Reshuffle every epoch (seeded). Defaults to `False` (file order).
        seed: int. Shuffle seed. Defaults to `0`.
        cache: bool or str. Cache token ids in memory (`True`) or in this file path.
            Defaults to `True`.
        dynamic_padding: bool. Trim each batch to the smallest of `bucket_lengths` that holds
            its longest text; `False` keeps the preprocessor's full length. Token dicts
            without a `padding_mask` are never trimmed. Defaults to `True`.
    """
    examples = _tokenized(texts, labels, preprocessor, cache)
    width = padded_length(examples.element_spec[0]) if dynamic_padding else None
    if shuffle:
        examples = examples.shuffle(len(texts), seed=seed, reshuffle_each_iteration=True)
    batches = examples.batch(batch_size)
    if width:
        buckets = tf.constant(bucket_lengths(width), tf.int32)

        def to_bucket(x, y):
            return trimmed(x, bucket_of(longest_in_batch(x), buckets)), y

        batches = batches.map(to_bucket, num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


def text_train_data(
    examples: Examples,
    preprocessor: Any,
    *,
    batch_size: int,
    seed: int = 0,
    cache: bool | str = True,
    dynamic_padding: bool = True,
) -> TrainData:
    """Training batches of `(token dict, label)` that can start at any epoch and step (resume).

    Tokenizes once and caches like `make_text_dataset`. With dynamic padding, the token ids
    are then held in memory and each epoch's batches are planned from `seed` and the epoch
    number: a seeded permutation, cut into pools of 50 batches' worth of examples, each pool
    sorted by length and cut into batches, the batches shuffled. Each batch is trimmed to the
    smallest of `bucket_lengths` that holds its longest text. Without it (or for raw strings),
    each epoch is a seeded shuffle of full-length examples (`tfxfer.data.pipeline.epoch_batches`).
    Either way, full batches only when there are at least `batch_size` examples.

    Args:
        examples: Examples. Text examples (`load_texts`, `read_text_file`).
        preprocessor: keras layer or None. The backbone's preprocessor (`backbone.preprocessor`);
            `None` keeps raw strings.
        batch_size: int. The global batch size.
        seed: int. Seed of the per-epoch order. Defaults to `0`.
        cache: bool or str. Cache token ids in memory (`True`), in this file path, or not at
            all (`False`). Defaults to `True`.
        dynamic_padding: bool. Batch texts of similar length together and trim each batch to
            its bucket. Defaults to `True`.

    Example:

    ```python
    train = text_train_data(data.train, backbone.preprocessor, batch_size=32)
    rest_of_epoch_2 = train.build(2, 5).take(train.steps_per_epoch - 5)
    ```
    """
    if examples.kind != "text":
        raise TfxferError(
            f"Expected text examples. Received: {examples.kind} examples from "
            f"{examples.source!r}; use `tfxfer.data.images` for images."
        )
    tokenized = _tokenized(examples.inputs, examples.labels, preprocessor, cache)
    if dynamic_padding and padded_length(tokenized.element_spec[0]):
        inputs, labels = as_arrays(tokenized)
        lengths = np.sum(inputs["padding_mask"], axis=1, dtype=np.int32)
        return length_grouped_batches(
            tokenized,
            inputs,
            labels,
            lengths,
            batch_size=batch_size,
            seed=seed,
            buckets=bucket_lengths(inputs["padding_mask"].shape[1]),
        )
    return epoch_batches(tokenized, num_examples=len(examples), batch_size=batch_size, seed=seed)


def _tokenized(
    texts: Sequence[str], labels: Any, preprocessor: Any, cache: bool | str
) -> tf.data.Dataset:
    if len(texts) == 0:
        raise DataError("There are no texts to make a dataset from.")
    labels = np.asarray(labels)
    if len(labels) != len(texts):
        raise DataError(f"Got {len(texts)} texts but {len(labels)} labels.")
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(list(texts), tf.string), labels))
    if preprocessor is not None:
        ds = (
            ds.batch(_TOKENIZE_CHUNK)
            .map(preprocessor, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .map(_without_booleans)
            .unbatch()
            # Unbatching hides the size; Keras warns "ran out of data" on datasets of unknown size.
            .apply(tf.data.experimental.assert_cardinality(len(texts)))
        )
    return maybe_cache(ds, cache)


def _without_booleans(x: Any, y: Any) -> tuple[Any, Any]:
    """Boolean token tensors (the padding mask) as int32, which BERT's inputs declare.

    Keras' `fit` under a distribution strategy first averages one batch over the replicas to
    build the model, and booleans cannot be summed: a boolean padding mask fails every
    MirroredStrategy run at its first step.
    """
    x = tf.nest.map_structure(lambda t: tf.cast(t, tf.int32) if t.dtype == tf.bool else t, x)
    return x, y
