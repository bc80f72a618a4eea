"""Cached feature extraction: the head stage trains on features the frozen backbone made once."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    InterruptAfterEpoch,
    layer_weights,
    tiny_arrays,
    tiny_model,
    tiny_train_data,
    tiny_val_data,
)

import tfxfer
from tfxfer.data.examples import Examples
from tfxfer.data.images import Augmentation, image_train_data
from tfxfer.train import features as feature_cache
from tfxfer.train.features import FeatureStore, split_at_head


def _build(seed: int = 0, dropout: float = 0.0):
    return _dropout_model(seed, dropout) if dropout else tiny_model(seed=seed)


def _head_run(cache: bool, *, seed: int = 0, epochs: int = 3, dropout: float = 0.0, **kw):
    backbone, model = _build(seed, dropout)
    images, labels = tiny_arrays(n=20)
    result = tfxfer.run_schedule(
        model,
        backbone,
        [tfxfer.Stage("head", epochs, learning_rate=1e-2)],
        tiny_train_data(images, labels, batch_size=6, seed=3),
        tiny_val_data(images[:9], labels[:9], batch_size=4),
        verbose=0,
        cache_features=cache,
        **kw,
    )
    return model, result


def _dropout_model(seed: int, dropout: float):
    from helpers import tiny_backbone

    backbone = tiny_backbone(seed=seed)
    model = tfxfer.build_model(
        backbone, 3, head=tfxfer.HeadConfig(hidden_units=[5], dropout=dropout)
    )
    return backbone, model


@pytest.fixture(autouse=True)
def _empty_store():
    feature_cache.STORE.clear()
    yield
    feature_cache.STORE.clear()


def _head_weights(model):
    head = split_at_head(model).head
    return layer_weights(head.layers)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_cached_head_stage_ends_where_the_uncached_one_does(dropout):
    uncached, plain = _head_run(False, dropout=dropout)
    cached, result = _head_run(True, dropout=dropout)
    assert result.stages["head"]["cached_features"] is True
    assert plain.stages["head"]["cached_features"] is False
    a, b = _head_weights(uncached), _head_weights(cached)
    assert a.keys() == b.keys() and len(a) >= 2
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-4, atol=1e-5, err_msg=path)
    # The head really trained, and the per-epoch metrics are the same too.
    initial = _head_weights(_build(0, dropout)[1])
    assert not np.allclose(a["predictions/kernel"], initial["predictions/kernel"])
    for row_a, row_b in zip(plain.history, result.history, strict=True):
        for key in ("loss", "val_loss", "val_accuracy"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-5), key


def test_the_backbone_runs_once_for_a_cached_stage_and_not_again_for_the_same_inputs():
    before = feature_cache.STORE.extractions
    _head_run(True, epochs=3)
    # One extraction of the training set, one of the validation set, for three epochs.
    assert feature_cache.STORE.extractions - before == 2
    _, again = _head_run(True, epochs=2)
    assert feature_cache.STORE.extractions - before == 2
    assert again.stages["head"]["found_in_cache"] is True


def test_changed_weights_data_or_sizes_invalidate_the_features():
    store = FeatureStore()
    _, model = tiny_model(seed=0)
    split = split_at_head(model)
    images, labels = tiny_arrays(n=10)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    first, _, found = store.features(split.features, ds)
    assert not found
    assert store.features(split.features, ds)[2] is True
    # One weight of the backbone changes: the features are extracted again, and differ.
    kernel = model.get_layer("tiny_network").get_layer("low_conv").kernel
    kernel.assign(kernel.numpy() * 1.5)
    changed, _, found = store.features(split.features, ds)
    assert not found and not np.allclose(first, changed)
    # Other data (one pixel), other labels, other image sizes.
    other = images.copy()
    other[0, 0, 0, 0] ^= 1
    for variant in (
        tf.data.Dataset.from_tensor_slices((other, labels)),
        tf.data.Dataset.from_tensor_slices((images, (labels + 1) % 3)),
        tf.data.Dataset.from_tensor_slices((images[:, :8, :8], labels)),
    ):
        assert store.features(split.features, variant)[2] is False
    assert store.extractions == 5


def test_stages_that_train_backbone_weights_or_opt_out_are_not_cached():
    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=12)
    result = tfxfer.run_schedule(
        model,
        backbone,
        [
            tfxfer.Stage("head", 1, learning_rate=1e-2),
            tfxfer.Stage("top", 1, train=["top"], learning_rate=1e-3),
        ],
        tiny_train_data(images, labels, batch_size=6),
        verbose=0,
    )
    assert list(result.stages) == ["head", "top"]
    assert result.stages["head"]["cached_features"] is True
    assert result.stages["top"]["cached_features"] is False


def test_a_model_without_the_head_marker_trains_uncached():
    backbone, _ = tiny_model()
    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = keras.layers.GlobalAveragePooling2D()(backbone.network(backbone.preprocessor(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="predictions")(x))
    images, labels = tiny_arrays(n=12)
    result = tfxfer.run_schedule(
        model, backbone, [tfxfer.Stage("head", 1)], tiny_train_data(images, labels), verbose=0
    )
    assert result.stages["head"]["cached_features"] is False


def test_augmented_image_data_is_cached_without_its_augmentation(capsys, tmp_path):
    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=12)
    paths = []
    from PIL import Image

    for i, image in enumerate(images):
        path = tmp_path / f"{i}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    examples = Examples(paths, labels, ["a", "b", "c"], "image")
    train = image_train_data(
        examples, image_size=16, batch_size=4, augmentation=Augmentation(flip=True)
    )
    assert train.augmented
    result = tfxfer.run_schedule(model, backbone, [tfxfer.Stage("head", 1)], train, verbose=2)
    assert result.stages["head"]["skipped_augmentation"] is True
    assert "augmentation does not run" in capsys.readouterr().out


def test_a_cached_stage_resumes_to_the_uninterrupted_result(tmp_path):
    def run(directory, resume=False, callbacks=None, seed=0):
        backbone, model = tiny_model(seed=seed)
        images, labels = tiny_arrays(n=18)
        run_dir = tfxfer.RunDir(str(directory), resume=resume)
        result = tfxfer.run_schedule(
            model,
            backbone,
            [
                tfxfer.Stage("head", 3, learning_rate=1e-2),
                tfxfer.Stage("finetune", 1, train="all", learning_rate=1e-3),
            ],
            tiny_train_data(images, labels, batch_size=6),
            tiny_val_data(images[:6], labels[:6]),
            run_dir=run_dir,
            callbacks=callbacks,
            verbose=0,
        )
        return model, result

    whole, whole_result = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[InterruptAfterEpoch(2)])
    feature_cache.STORE.clear()  # a fresh process extracts again
    resumed, result = run(tmp_path / "cut", resume=True, seed=7)
    assert result.resumed_from_epoch == 2
    assert result.stages["head"]["cached_features"] is True
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())
    assert state["checkpoint"]
    assert [r["val_loss"] for r in whole_result.history] == pytest.approx(
        [r["val_loss"] for r in result.history], rel=1e-5
    )


class _EveryStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def test_a_cached_stage_runs_several_steps_per_call_unless_a_callback_needs_each_step():
    _, result = _head_run(True, epochs=2)
    # 20 examples in batches of 6: 3 steps an epoch, all in one call.
    assert result.stages["head"]["steps_per_execution"] == 3
    every_step = _EveryStep()
    _, result = _head_run(True, epochs=2, callbacks=[every_step])
    assert result.stages["head"]["steps_per_execution"] == 1
    assert every_step.steps == 6


@pytest.mark.parametrize(
    ("steps", "skipped", "expected"),
    [(28, 0, 28), (64, 0, 32), (37, 0, 1), (29, 0, 29), (28, 12, 4), (60, 0, 30)],
)
def test_steps_per_execution_divides_every_fit(steps, skipped, expected):
    from tfxfer.train.compiling import steps_per_execution

    assert steps_per_execution(steps, skipped) == expected


# === Text: token sequences of any length ===


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from bert_helpers import write_hf_checkpoint

    path = tmp_path_factory.mktemp("bert") / "hf_bert"
    write_hf_checkpoint(path)
    return str(path)


def _text_run(bert_path: str, cache: bool):
    from tests.test_text_buckets import random_texts

    keras.utils.set_random_seed(0)
    backbone = tfxfer.build_backbone(bert_path, sequence_length=64)
    # Without dropout in the frozen backbone, the uncached stage computes the same features.
    for layer in backbone.network._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    model = tfxfer.build_model(backbone, 2, head=tfxfer.HeadConfig(pooling="mean", dropout=0.0))
    texts = random_texts(60, seed=4)
    labels = np.asarray([len(t.split()) % 2 for t in texts], np.int32)
    data = tfxfer.LabelledData(
        Examples(texts[:44], labels[:44], ["0", "1"], "text"),
        Examples(texts[44:], labels[44:], ["0", "1"], "text"),
        None,
        ["0", "1"],
        "text",
    )
    datasets = tfxfer.make_datasets(data, backbone, batch_size=8)
    result = tfxfer.run_schedule(
        model,
        backbone,
        [tfxfer.Stage("head", 2, learning_rate=1e-2)],
        datasets.train,
        datasets.val,
        verbose=0,
        cache_features=cache,
    )
    return model, result


def test_cached_text_features_of_trimmed_batches_train_the_head_as_uncached(tiny_bert):
    uncached, plain = _text_run(tiny_bert, cache=False)
    cached, result = _text_run(tiny_bert, cache=True)
    assert result.stages["head"]["cached_features"] is True
    a, b = _head_weights(uncached), _head_weights(cached)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-4, atol=1e-5, err_msg=path)
    for row_a, row_b in zip(plain.history, result.history, strict=True):
        assert row_a["val_loss"] == pytest.approx(row_b["val_loss"], rel=1e-4)


def test_extraction_sorted_by_length_equals_full_length_features(tiny_bert):
    from tests.test_text_buckets import random_texts

    backbone = tfxfer.build_backbone(tiny_bert, sequence_length=64)
    model = tfxfer.build_model(backbone, 2, head=tfxfer.HeadConfig(pooling="mean"))
    extractor = split_at_head(model).features
    tokens = backbone.preprocessor(tf.constant(random_texts(70, seed=1)))
    inputs = {k: np.asarray(v) for k, v in tokens.items()}
    lengths = feature_cache._token_lengths(extractor, inputs)
    np.testing.assert_array_equal(lengths, inputs["padding_mask"].sum(axis=1))
    assert lengths.max() < 64  # so trimming really happens
    full = np.asarray(extractor(inputs, training=False))
    np.testing.assert_allclose(feature_cache.extract(extractor, inputs), full, atol=1e-5)
