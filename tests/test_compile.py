"""Compiled training steps: XLA where asked, and a clean fallback where a step cannot compile."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_arrays, tiny_backbone, tiny_train_data, tiny_val_data

import tfxfer


class PythonIdentity(keras.layers.Layer):
    """Identity through `tf.py_function`, an op XLA has no kernel for."""

    def call(self, x):
        y = tf.py_function(lambda t: t, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def _model_with_an_uncompilable_head():
    backbone = tiny_backbone()
    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = backbone.network(backbone.preprocessor(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = PythonIdentity()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return backbone, keras.Model(inputs, outputs)


def _train(model, backbone, stages, **kwargs):
    images, labels = tiny_arrays(n=12)
    return tfxfer.run_schedule(
        model,
        backbone,
        stages,
        tiny_train_data(images, labels, batch_size=6),
        tiny_val_data(images, labels),
        verbose=0,
        **kwargs,
    )


def test_a_step_xla_cannot_compile_falls_back_to_plain_tensorflow(caplog):
    backbone, model = _model_with_an_uncompilable_head()
    before = model.get_layer("predictions").kernel.numpy().copy()
    result = _train(
        model,
        backbone,
        [tfxfer.Stage("head", 2, learning_rate=1e-2), tfxfer.Stage("all", 1, train="all")],
        jit_compile=True,
    )
    for name in ("head", "all"):
        info = result.stages[name]
        assert info["jit_compile"] is False
        assert "PyFunc" in info["jit_fallback"] or "EagerPyFunc" in info["jit_fallback"]
    assert "training without XLA" in caplog.text
    assert [row["epoch"] for row in result.history] == [1, 2, 3]  # no epoch trained twice
    assert not np.allclose(model.get_layer("predictions").kernel.numpy(), before)


@pytest.mark.large  # over ~10 s on two cores
def test_a_model_xla_can_compile_trains_with_it_when_asked():
    backbone = tiny_backbone()
    model = tfxfer.build_model(backbone, 3, head=tfxfer.HeadConfig(dropout=0.0))
    result = _train(
        model,
        backbone,
        [tfxfer.Stage("head", 1, learning_rate=1e-2), tfxfer.Stage("all", 1, train="all")],
        jit_compile=True,
    )
    assert result.stages["head"]["jit_compile"] is True
    assert result.stages["all"]["jit_compile"] is True
    assert "jit_fallback" not in result.stages["all"]


def test_auto_leaves_xla_off_on_a_cpu():
    backbone = tiny_backbone()
    model = tfxfer.build_model(backbone, 3)
    result = _train(model, backbone, [tfxfer.Stage("head", 1)])
    assert result.stages["head"]["jit_compile"] is False
