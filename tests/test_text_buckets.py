"""Tests for dynamic padding of BERT text batches: bucket lengths, parity, order and resume.

A tiny random BERT (`bert_helpers`, at most 64 positions) is trimmed to buckets 16, 32, 48
and 64; texts are drawn from its vocabulary with mostly short lengths, as real texts are.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
import tensorflow as tf
from bert_helpers import WORDS, write_hf_checkpoint

from tfxfer.backbones import build_backbone
from tfxfer.data.datasets import make_datasets
from tfxfer.data.examples import Examples, LabelledData
from tfxfer.data.text import bucket_lengths, make_text_dataset, text_train_data
from tfxfer.heads import HeadConfig
from tfxfer.model import build_model

MAXIMUM = 64
BUCKETS = (16, 32, 48, 64)


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Texts of 1 to 61 words, most of them short (so most batches fit a short bucket)."""
    rng = np.random.default_rng(seed)
    words = np.minimum(rng.geometric(1 / 12, size=count), MAXIMUM - 3)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in words]


def text_examples(count: int, labels=None) -> Examples:
    """Examples whose label is the example's index unless given, so batches show who is in them."""
    labels = np.arange(count, dtype=np.int32) if labels is None else np.asarray(labels, np.int32)
    names = [str(i) for i in range(int(labels.max()) + 1)]
    return Examples(random_texts(count), labels, names, "text")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "hf_bert"
    write_hf_checkpoint(path)
    return build_backbone(str(path), sequence_length=MAXIMUM)


@pytest.fixture(scope="module")
def train(backbone):
    return text_train_data(text_examples(150), backbone.preprocessor, batch_size=8, seed=3)


def labels_of(batches) -> list[list[int]]:
    return [y.numpy().tolist() for _, y in batches]


def test_bucket_lengths_are_capped_at_and_include_the_maximum():
    assert bucket_lengths(64) == BUCKETS
    assert bucket_lengths(100) == (16, 32, 48, 64, 96, 100)
    assert bucket_lengths(8) == (8,)
    assert bucket_lengths(512)[-1] == 512 and bucket_lengths(1024)[-2:] == (512, 1024)


def test_the_network_takes_any_length_up_to_the_maximum(backbone):
    assert [tuple(i.shape) for i in backbone.network.inputs] == [(None, None)] * 3
    tokens = backbone.preprocessor(tf.constant(["the movie was great"]))
    short = {key: value[:, :16] for key, value in tokens.items()}
    full, trimmed = backbone.network(tokens), backbone.network(short)
    assert tuple(trimmed["sequence_output"].shape) == (1, 16, 16)
    # Padding is masked out of attention: the real tokens' outputs do not change.
    np.testing.assert_allclose(
        trimmed["sequence_output"][:, :6], full["sequence_output"][:, :6], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_predictions_over_trimmed_batches_equal_the_fixed_length_ones(backbone, pooling):
    keras.utils.set_random_seed(0)
    model = build_model(backbone, 3, head=HeadConfig(pooling=pooling))
    texts, labels = random_texts(40, seed=1), np.zeros(40, np.int32)

    def predictions(dynamic_padding):
        ds = make_text_dataset(
            texts, labels, backbone.preprocessor, batch_size=8, dynamic_padding=dynamic_padding
        )
        lengths = [x["token_ids"].shape[1] for x, _ in ds]
        return np.concatenate([model(x, training=False) for x, _ in ds]), lengths

    fixed, fixed_lengths = predictions(False)
    dynamic, dynamic_lengths = predictions(True)

    assert set(fixed_lengths) == {MAXIMUM} and min(dynamic_lengths) < MAXIMUM
    np.testing.assert_allclose(dynamic, fixed, rtol=1e-4, atol=1e-5)


def test_two_builds_give_the_same_batches_and_epochs_differ(backbone, train):
    again = text_train_data(text_examples(150), backbone.preprocessor, batch_size=8, seed=3)
    steps = train.steps_per_epoch
    first, second = list(train.build(0).take(2 * steps)), list(again.build(0).take(2 * steps))

    assert labels_of(first) == labels_of(second)
    for (x, _), (x2, _) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x["token_ids"], x2["token_ids"])
    assert labels_of(first[:steps]) != labels_of(first[steps:])
    other_seed = text_train_data(text_examples(150), backbone.preprocessor, batch_size=8, seed=4)
    assert labels_of(other_seed.build(0).take(steps)) != labels_of(first[:steps])


def test_resume_replays_the_same_batches_across_the_epoch_boundary(train):
    steps = train.steps_per_epoch
    from_start = list(train.build(0).take(3 * steps))

    for epoch, step in ((0, 1), (0, steps - 1), (1, 5)):
        start = epoch * steps + step
        resumed = list(train.build(epoch, step).take(steps + 1))
        assert labels_of(resumed) == labels_of(from_start[start : start + steps + 1])
        for (x, _), (x2, _) in zip(resumed, from_start[start:], strict=False):
            np.testing.assert_array_equal(x["token_ids"], x2["token_ids"])
    with pytest.raises(ValueError, match=r"start_step` in \[0, 18\)"):
        train.build(0, steps)


def test_each_epoch_holds_every_example_once_in_bucket_length_batches(train):
    steps = train.steps_per_epoch
    assert steps == 150 // 8

    for epoch in (0, 1):
        batches = list(train.build(epoch).take(steps))
        ids = np.concatenate(labels_of(batches))
        assert len(ids) == len(set(ids.tolist())) == steps * 8
        lengths = []
        for x, y in batches:
            length = x["token_ids"].shape[1]
            longest = int(np.max(np.sum(x["padding_mask"], axis=1)))
            # The smallest bucket that holds the batch's longest text.
            assert length == min(b for b in BUCKETS if b >= longest)
            assert y.shape == (8,) and all(v.shape == (8, length) for v in x.values())
            lengths.append(length)
        assert sum(length < MAXIMUM for length in lengths) > steps / 2


def test_fewer_examples_than_a_batch_make_one_batch_of_all(backbone):
    few = text_train_data(text_examples(5), backbone.preprocessor, batch_size=8)
    assert few.steps_per_epoch == 1
    assert sorted(labels_of(few.build(2).take(1))[0]) == [0, 1, 2, 3, 4]


def test_regroup_puts_other_rows_in_the_same_batches(train):
    # Stand-ins for features: each training example's row holds its own index.
    ids = np.arange(150, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    other = tf.data.Dataset.from_tensor_slices((ids, np.arange(150, dtype=np.int32)))
    regrouped = train.regroup(other)

    steps = train.steps_per_epoch
    assert regrouped.steps_per_epoch == steps and not regrouped.augmented
    original = labels_of(train.build(1, 3).take(steps))
    for (features, labels), expected in zip(
        regrouped.build(1, 3).take(steps), original, strict=True
    ):
        assert features.shape == (8, 4)
        assert labels.numpy().tolist() == expected
        assert features.numpy()[:, 0].tolist() == expected
    assert train.examples.cardinality().numpy() == 150
    x, _ = next(iter(train.examples))
    assert x["token_ids"].shape == (MAXIMUM,)  # examples stay full length, in file order


def test_batch_shapes_and_train_step_traces_are_bounded_by_the_buckets(backbone):
    data = text_train_data(
        text_examples(64, labels=np.arange(64) % 3), backbone.preprocessor, batch_size=8
    )
    steps = data.steps_per_epoch
    shapes = {x["token_ids"].shape[1] for x, _ in data.build(0).take(2 * steps)}
    assert 2 <= len(shapes) <= len(BUCKETS)

    traces = []

    class CountingTraces(keras.Model):
        """Counts how often Keras traces the train step (Python runs only while tracing)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, inputs, training=False):
            return self.inner(inputs, training=training)

        def train_step(self, batch):
            traces.append(1)
            return super().train_step(batch)

    keras.utils.set_random_seed(0)
    model = CountingTraces(build_model(backbone, 3))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=False)
    model.fit(data.build(0), steps_per_epoch=steps, epochs=2, verbose=0)
    assert 1 <= len(traces) <= len(shapes)


def test_make_datasets_pads_dynamically_by_default(backbone):
    texts = random_texts(60, seed=2)
    labels = np.arange(60, dtype=np.int32) % 2

    def split(part):
        return Examples([texts[i] for i in part], labels[part], ["0", "1"], "text")

    parts = (np.arange(40), np.arange(40, 52), np.arange(52, 60))
    data = LabelledData(*(split(part) for part in parts), ["0", "1"], "text")
    dynamic = make_datasets(data, backbone, batch_size=4)
    train_only = LabelledData(data.train, None, None, ["0", "1"], "text")
    fixed = make_datasets(train_only, backbone, batch_size=4, dynamic_padding=False)

    assert {x["token_ids"].shape[1] for x, _ in fixed.train.build(0).take(10)} == {MAXIMUM}
    dynamic_train = {x["token_ids"].shape[1] for x, _ in dynamic.train.build(0).take(10)}
    assert dynamic_train <= set(BUCKETS) and min(dynamic_train) < MAXIMUM
    assert labels_of(dynamic.test) == [labels[52:56].tolist(), labels[56:].tolist()]
    for x, _ in dynamic.val.concatenate(dynamic.test):  # each to its own bucket, in order
        longest = int(np.max(np.sum(x["padding_mask"], axis=1)))
        assert x["token_ids"].shape[1] == min(b for b in BUCKETS if b >= longest)
