"""Length buckets for token batches: pad each batch only to its longest text, rounded up.

A batch of token ids is cut to the smallest of a few bucket lengths that holds its longest
text, so short texts do not pay for the maximum sequence length, while the train step sees
few shapes. Training batches are planned from the texts' lengths (`length_grouped_batches`):
texts of similar length go together, in an order that depends only on the seed and the
epoch, so a resumed run replays it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tfxfer.data.pipeline import TrainData, endless_epochs
from tfxfer.errors import TfxferError

# The lengths a batch of token ids is trimmed to: the smallest that holds its longest text.
# Each is one more shape the train step is traced for, so there are few of them, closer
# together where texts are common and padding is a large share of a batch.
BUCKET_LENGTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Training examples are sorted by length within pools of this many batches: batches then hold
# texts of similar length (little padding), while a pool is large enough that a batch still
# mixes examples drawn from across the data.
_POOL_BATCHES = 50


def bucket_lengths(maximum: int) -> tuple[int, ...]:
    """The lengths batches are trimmed to when no text is longer than `maximum` tokens.

    `BUCKET_LENGTHS` below `maximum`, then `maximum` itself, so that every text fits one.

    Example:

    ```python
    bucket_lengths(100)  # (16, 32, 48, 64, 96, 100)
    ```
    """
    return (*(b for b in BUCKET_LENGTHS if b < maximum), int(maximum))


def length_grouped_batches(
    examples: tf.data.Dataset,
    inputs: Any,
    labels: np.ndarray,
    lengths: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    buckets: tuple[int, ...] | None,
) -> TrainData:
    """`TrainData` over in-memory arrays in batches planned from the text lengths.

    `inputs` (a dict of `(n, length)` token arrays, or features when regrouping) and `labels`
    are rows in the order of `examples`; `lengths` are the texts' token counts, which decide
    the batches. `buckets=None` keeps each row whole (features have no length to trim).
    """
    num_examples = len(lengths)
    per_batch = min(batch_size, num_examples)
    # Full batches only (as `epoch_batches`): every replica gets the same share; fewer
    # examples than a batch make one batch of all.
    steps = num_examples // per_batch
    # The arrays stay in memory, captured by the batch function. Where the dataset's graph is
    # serialized (tf.distribute does) they become constants, which a graph caps at 2 GB:
    # about 1.8 million texts of 128 tokens.
    rows = tf.nest.map_structure(tf.constant, inputs)
    row_labels = tf.constant(labels)
    row_lengths = tf.constant(lengths, tf.int32)
    bucket_tensor = None if buckets is None else tf.constant(buckets, tf.int32)

    def one_epoch(epoch, skip):
        plan = _epoch_plan(row_lengths, per_batch=per_batch, steps=steps, seed=seed, epoch=epoch)
        # Batches a resumed run already trained on are skipped as index rows, never gathered.
        return tf.data.Dataset.from_tensor_slices(plan).skip(skip)

    def gathered(indices):
        x = tf.nest.map_structure(lambda rows: tf.gather(rows, indices), rows)
        if bucket_tensor is not None:
            longest = tf.reduce_max(tf.gather(row_lengths, indices))
            x = trimmed(x, bucket_of(longest, bucket_tensor))
        return x, tf.gather(row_labels, indices)

    build = endless_epochs(one_epoch, steps, per_batch=gathered)

    regroup = _regrouper(lengths, batch_size=batch_size, seed=seed)
    return TrainData(build, steps, examples=examples, augmented=False, regroup=regroup)


def _regrouper(
    lengths: np.ndarray, *, batch_size: int, seed: int
) -> Callable[[tf.data.Dataset], TrainData]:
    """`TrainData.regroup`: other rows (features), one per text, in the texts' batches."""
    num_examples = len(lengths)

    def regroup(other: tf.data.Dataset) -> TrainData:
        # The plan depends on the seed, the epoch and the text lengths only, so the same
        # lengths over other rows give the same batches.
        other_inputs, other_labels = as_arrays(other)
        if len(other_labels) != num_examples:
            raise TfxferError(
                f"Expected {num_examples} examples to regroup, one per training example. "
                f"Received: {len(other_labels)}"
            )
        return length_grouped_batches(
            other,
            other_inputs,
            other_labels,
            lengths,
            batch_size=batch_size,
            seed=seed,
            buckets=None,
        )

    return regroup


def _epoch_plan(
    lengths: tf.Tensor, *, per_batch: int, steps: int, seed: int, epoch: tf.Tensor
) -> tf.Tensor:
    """Example indices of one epoch's batches, `(steps, per_batch)`: a function of the epoch.

    Stateless random ops seeded with `(seed, epoch)` make the order the same in every run and
    independent of how many epochs came before, which is what lets a run resume.
    """
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]), num=2
    )
    used = steps * per_batch
    # Examples left over (fewer than a batch) are dropped before sorting, so they are drawn
    # at random rather than always being a pool's longest.
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(lengths)), seed=seeds[0])
    order = order[:used]
    # One stable sort by (pool, length) sorts each pool by length and keeps pools in place.
    pool = tf.range(used, dtype=tf.int64) // (per_batch * _POOL_BATCHES)
    longest = tf.cast(tf.reduce_max(lengths), tf.int64) + 1
    key = pool * longest + tf.cast(tf.gather(lengths, order), tf.int64)
    order = tf.gather(order, tf.argsort(key, stable=True))
    batches = tf.reshape(order, [steps, per_batch])
    return tf.random.experimental.stateless_shuffle(batches, seed=seeds[1])


def padded_length(spec: Any) -> int | None:
    """The length of an unbatched token dict spec with a padding mask; None: not trimmable."""
    if not isinstance(spec, dict) or "padding_mask" not in spec:
        return None
    width = spec["padding_mask"].shape[-1]
    tokens = [s for s in spec.values() if s.dtype != tf.string]  # a raw text rides along
    same = all(s.shape.rank == 1 and s.shape[-1] == width for s in tokens)
    return int(width) if width is not None and same else None


def longest_in_batch(x: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.reduce_max(tf.reduce_sum(tf.cast(x["padding_mask"], tf.int32), axis=1))


def bucket_of(length: tf.Tensor, buckets: tf.Tensor) -> tf.Tensor:
    """The smallest of `buckets` (sorted) that is at least `length`."""
    index = tf.searchsorted(buckets, tf.reshape(tf.cast(length, tf.int32), [1]), side="left")
    return buckets[index[0]]


def trimmed(x: dict[str, tf.Tensor], length: tf.Tensor) -> dict[str, tf.Tensor]:
    # Only padding is cut: `length` is at least the longest text's token count. A raw
    # string beside the token ids (a fusion with a lexical branch) is kept whole.
    return {
        key: value if value.dtype == tf.string else value[:, :length] for key, value in x.items()
    }


def as_arrays(examples: tf.data.Dataset) -> tuple[Any, np.ndarray]:
    """All `(input, label)` pairs of an unbatched dataset as numpy arrays, in order."""
    chunks = list(examples.batch(4096).as_numpy_iterator())
    inputs = tf.nest.map_structure(lambda *parts: np.concatenate(parts), *[x for x, _ in chunks])
    return inputs, np.concatenate([y for _, y in chunks])
