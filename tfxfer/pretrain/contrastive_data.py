"""The images SimCLR trains on: an unlabelled folder, decoded once, batched as pairs of views.

Every random choice of a training batch is a stateless op seeded by `(seed, global step)`, so
a run resumed in the middle of an epoch sees exactly the views the uninterrupted run saw (the
batches themselves replay through `epoch_batches`). Held-out batches use views no training
step uses, the same in every epoch and every run.
"""

from __future__ import annotations

import tensorflow as tf

from tfxfer.data.images import decode_and_resize
from tfxfer.data.pipeline import TrainData, epoch_batches
from tfxfer.pretrain.contrastive import ViewAugmentation


def decoded_images(paths: list[str], image_size: int) -> tf.data.Dataset:
    """Unbatched uint8 images of `image_size`, in `paths` order, decoded once and cached."""
    return (
        tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
        .map(lambda p: decode_and_resize(p, image_size), num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
    )


def contrastive_train_data(
    images: tf.data.Dataset,
    *,
    num_examples: int,
    batch_size: int,
    seed: int,
    views: ViewAugmentation,
) -> TrainData:
    """Training batches of two views each, replayable from any step of any epoch.

    The batches replay through `epoch_batches` (a shuffle seeded by epoch); the views of the
    batch at global step t are drawn from the seed `(seed, t)`, so `build(e, s)` starts with
    exactly the views an uninterrupted run trained on at step `e * steps_per_epoch + s`.

    Args:
        images: tf.data.Dataset. Unbatched uint8 images (`decoded_images`).
        num_examples: int. How many there are.
        batch_size: int. The global batch size.
        seed: int. Seeds the shuffle and the views.
        views: ViewAugmentation. How a view is drawn.
    """
    inner = epoch_batches(images, num_examples=num_examples, batch_size=batch_size, seed=seed)
    steps = inner.steps_per_epoch

    def build(start_epoch: int, start_step: int = 0) -> tf.data.Dataset:
        first = int(start_epoch) * steps + int(start_step)
        batches = tf.data.Dataset.zip(inner.build(start_epoch, start_step), _steps_from(first))
        ds = batches.map(
            lambda batch, step: views.pair(batch, tf.stack([tf.constant(seed, tf.int64), step])),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_shard_by_data())

    return TrainData(build, steps, augmented=True)


def contrastive_val_data(
    images: tf.data.Dataset, *, num_examples: int, batch_size: int, seed: int, views
) -> tf.data.Dataset:
    """Held-out batches of two views each, the same views in every epoch and every run."""
    ds = images.batch(batch_size, drop_remainder=num_examples >= batch_size)
    ds = tf.data.Dataset.zip(ds, _steps_from(0)).map(
        # Views 2 and 3 of the seed: never those of a training step (0 and 1).
        lambda batch, i: views.pair(batch, tf.stack([tf.constant(seed, tf.int64), i]), 2)
    )
    return ds.cache().prefetch(tf.data.AUTOTUNE).with_options(_shard_by_data())


def _steps_from(first: int) -> tf.data.Dataset:
    return tf.data.Dataset.range(first, 2**62)


def _shard_by_data() -> tf.data.Options:
    # As `endless_epochs`: the examples come from tensors, so workers share batches, not files.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options
