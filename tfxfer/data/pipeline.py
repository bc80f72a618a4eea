"""Batched datasets whose order depends only on the epoch, so training can resume exactly."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfxfer.errors import DataError, TfxferError


@dataclass
class TrainData:
    """Training batches that can start at any step of any epoch, in an uninterrupted run's order.

    A run stopped mid-epoch (a preemption notice) resumes at the batch after the last one it
    trained on, so the dataset must be able to start there and go on exactly as the
    uninterrupted run's did.

    Args:
        build: callable. `build(start_epoch, start_step=0)` returns an endless dataset of
            batches whose first batch is batch `start_step` (from 0) of epoch `start_epoch`;
            the batches after it are the ones an uninterrupted run sees. A callable that takes
            only `start_epoch` is wrapped to skip `start_step` batches of its output (correct,
            but it produces the skipped batches first; `epoch_batches` skips them before
            batching work is done).
        steps_per_epoch: int. Batches per epoch.
        examples: tf.data.Dataset or None. The unbatched `(input, label)` pairs the batches are
            made of, in a fixed order (`epoch_batches` sets it). Cached feature extraction
            runs the frozen backbone over these once. Defaults to `None` (unknown).
        augmented: bool. Whether each batch is changed at random on its way (augmentation),
            so the same example gives other inputs in other epochs. Defaults to `False`.
        regroup: callable or None. `regroup(other_examples)` returns `TrainData` whose
            batches hold `other_examples` (one per example of `examples`, in the same order:
            features in place of inputs) grouped into exactly the batches, in exactly the
            order, this data has, without its augmentation. Defaults to `None` (not possible).

    Example:

    ```python
    data = epoch_batches(examples, num_examples=96, batch_size=16)
    rest_of_epoch_3 = data.build(3, 4).take(data.steps_per_epoch - 4)
    ```
    """

    build: Callable[..., tf.data.Dataset]
    steps_per_epoch: int
    examples: tf.data.Dataset | None = None
    augmented: bool = False
    regroup: Callable[[tf.data.Dataset], TrainData] | None = None

    def __post_init__(self):
        if not _takes_start_step(self.build):
            self.build = _skipping_start_steps(self.build)


def _takes_start_step(build: Callable) -> bool:
    """Whether `build` can be called as `build(start_epoch, start_step)`."""
    try:
        inspect.signature(build).bind(0, 0)
    except (TypeError, ValueError):  # ValueError: a callable without a signature.
        return False
    return True


def _skipping_start_steps(build_epochs: Callable[[int], tf.data.Dataset]) -> Callable:
    """`build(start_epoch, start_step=0)` from a `build(start_epoch)` that knows no steps."""

    def build(start_epoch: int, start_step: int = 0) -> tf.data.Dataset:
        ds = build_epochs(start_epoch)
        return ds.skip(int(start_step)) if start_step else ds

    return build


def epoch_batches(
    examples: tf.data.Dataset,
    *,
    num_examples: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    transform: Callable | None = None,
    random_transform: bool | None = None,
) -> TrainData:
    """Turns unbatched examples into `TrainData` whose shuffle is a function of the epoch.

    A shuffle that depends on how many times a dataset was iterated cannot be replayed after
    a crash; seeding each epoch's shuffle with `seed` and the epoch number can.

    Args:
        examples: tf.data.Dataset. Unbatched `(input, label)` pairs, ideally cached.
        num_examples: int. How many there are (the shuffle buffer holds all of them).
        batch_size: int. The global batch size.
        seed: int. Base seed. Defaults to `0`.
        shuffle: bool. Defaults to `True`.
        transform: callable or None. Applied to each batch (augmentation, one-hot labels).
        random_transform: bool or None. Whether `transform` is random (augmentation).
            Defaults to `None`: random whenever there is a transform.
    """
    if num_examples < 1:
        raise TfxferError("The training set is empty.")

    @tf.autograph.experimental.do_not_convert
    def one_epoch(epoch, skip):
        ds = examples
        if shuffle:
            # The order must depend on `seed` and the epoch alone. This function's graph
            # inherits the global seed, which would mix into the shuffle's seed (and a global
            # seed of 0 makes TensorFlow test the tensor seed as a Python bool, which fails).
            tf.compat.v1.get_default_graph().seed = None
            ds = ds.shuffle(num_examples, seed=tf.cast(epoch, tf.int64) * 1_000_003 + seed)
        # Batches a resumed run already trained on are skipped before they are transformed.
        ds = ds.batch(batch_size, drop_remainder=drop_remainder).skip(skip)
        if transform is not None:
            ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
        return ds

    # Full batches only (when there is at least one): every replica of every worker then gets
    # the same share, and a tiny last batch cannot make one step's gradient noisy.
    drop_remainder = num_examples >= batch_size
    steps = num_examples // batch_size if drop_remainder else 1

    def regroup(other: tf.data.Dataset) -> TrainData:
        # A seeded shuffle's order depends on the seed and the number of elements only, so the
        # same seeds over as many other values give the same batches.
        return epoch_batches(
            other, num_examples=num_examples, batch_size=batch_size, seed=seed, shuffle=shuffle
        )

    augmented = transform is not None if random_transform is None else bool(random_transform)
    build = endless_epochs(one_epoch, steps)
    return TrainData(build, steps, examples=examples, augmented=augmented, regroup=regroup)


def endless_epochs(
    one_epoch: Callable[[tf.Tensor, tf.Tensor], tf.data.Dataset],
    steps: int,
    per_batch: Callable | None = None,
) -> Callable[..., tf.data.Dataset]:
    """`build(start_epoch, start_step=0)` for `TrainData`, from how one epoch is made.

    Args:
        one_epoch: callable. `one_epoch(epoch, skip)` returns epoch `epoch`'s batches (or
            what `per_batch` turns into them) after its first `skip`, as a dataset; both
            arguments are int64 tensors. Only the first epoch built starts part-way.
        steps: int. Batches per epoch.
        per_batch: callable or None. Mapped over the batches (in parallel), e.g. to gather
            the rows a batch of indices names.
    """

    def build(start_epoch: int, start_step: int = 0) -> tf.data.Dataset:
        if not 0 <= int(start_step) < steps:
            raise ValueError(
                f"Expected `start_step` in [0, {steps}) (the batches of one epoch). "
                f"Received: start_step={start_step}"
            )
        epochs = tf.data.Dataset.range(int(start_epoch), 2**62)
        # Only the first epoch starts part-way: `start_step` for it, 0 for every one after.
        skips = tf.data.Dataset.from_tensors(tf.constant(int(start_step), tf.int64)).concatenate(
            tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat()
        )
        ds = tf.data.Dataset.zip((epochs, skips)).flat_map(one_epoch)
        if per_batch is not None:
            ds = ds.map(per_batch, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        # Under MultiWorkerMirroredStrategy each worker takes its share of every global batch;
        # sharding by file would fail (the examples come from tensors, not files).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return ds.with_options(options)

    return build


def stratified_split(labels, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a seeded split that keeps each class's (or stratum's) share in both parts.

    Every class keeps at least one example on the training side; a class with two or more
    examples gets at least one on the validation side.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"Expected a validation fraction in (0, 1). Received: {fraction}")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    train_idx, val_idx = [], []
    for label in np.unique(labels_array):
        idx = np.flatnonzero(labels_array == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return sorted(train_idx), sorted(val_idx)


def maybe_cache(ds: tf.data.Dataset, cache: bool | str) -> tf.data.Dataset:
    """Caches in memory (`True`), in the file `cache` names (a str), or not at all (`False`)."""
    if not cache:
        return ds
    return ds.cache(cache if isinstance(cache, str) else "")
