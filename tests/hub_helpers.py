"""Tiny TF-Hub-style SavedModels (as `tf.Module`s), written by tests instead of downloaded."""

from __future__ import annotations

import tensorflow as tf

VOCABULARY = ["goal", "match", "oven", "recipe", "rain", "storm"]


class ImageFeatures(tf.Module):
    """(batch, 16, 16, 3) floats in [0, 1] -> (batch, 6) vector, like an image feature vector."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(
            tf.random.stateless_normal([3, 3, 3, 4], [1, 2]), name="conv/kernel"
        )
        self.dense = tf.Variable(tf.random.stateless_normal([4, 6], [3, 4]), name="dense/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        x = tf.nn.relu(tf.nn.conv2d(images, self.kernel, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(x, axis=[1, 2]), self.dense)


class ImageMap(tf.Module):
    """Images of any size -> (batch, h, w, 4) map, a model that declares no image size."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 4], [5, 6]), name="kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d(images, self.kernel, 2, "SAME")


class SentenceEncoder(tf.Module):
    """A batch of strings -> (batch, 5): a vocabulary lookup table and mean word embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(VOCABULARY), tf.range(len(VOCABULARY), dtype=tf.int64)
            ),
            default_value=len(VOCABULARY),
        )
        self.embeddings = tf.Variable(
            tf.random.stateless_normal([len(VOCABULARY) + 1, 5], [7, 8]), name="embeddings"
        )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, texts: tf.Tensor) -> tf.Tensor:
        words = tf.strings.split(tf.strings.lower(texts))
        ids = tf.ragged.map_flat_values(self.table.lookup, words)
        vectors = tf.ragged.map_flat_values(tf.gather, self.embeddings, ids)
        return tf.reduce_mean(vectors, axis=1)


class WithTrainingArgument(tf.Module):
    """A reusable-SavedModel-style `__call__(x, training)` with a batch-norm-like statistic."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 4], [9, 10]), name="kernel")
        self.moving_mean = tf.Variable(tf.zeros([4]), trainable=False, name="moving_mean")

    @tf.function
    def __call__(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        features = tf.matmul(tf.reduce_mean(images, axis=[1, 2]), self.kernel)
        if training:
            self.moving_mean.assign(tf.reduce_mean(features, axis=0))
        return features - self.moving_mean


class SignatureOnly(tf.Module):
    """No `__call__`, one signature returning a dict: the shape of TF1 Hub format models."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = tf.Variable(tf.ones([3, 4]), name="kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def features(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        pooled = tf.matmul(tf.reduce_mean(images, axis=[1, 2]), self.kernel)
        return {"pooled": pooled, "doubled": 2.0 * pooled}
