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


def test_each_stage_traces_its_training_step_once(monkeypatch):
    # Keras 3 without a strategy creates the optimizer's and metrics' variables inside the
    # first trace, and tf.function then traces the step again: twice the compile time.
    backbone = tiny_backbone()
    model = tfxfer.build_model(backbone, 3, head=tfxfer.HeadConfig(dropout=0.0))
    traces = []
    train_step = model.train_step
    monkeypatch.setattr(model, "train_step", lambda data: traces.append(1) or train_step(data))
    result = _train(
        model,
        backbone,
        [tfxfer.Stage("head", 2, learning_rate=1e-2), tfxfer.Stage("all", 1, train="all")],
        cache_features=False,
    )
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert len(traces) == 2  # one trace a stage


def test_the_state_built_before_tracing_is_keras_own():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    data = tf.data.Dataset.from_tensor_slices((np.ones((6, 4)), np.ones((6, 2)))).batch(3)
    tfxfer.train.compiling.build_before_tracing(model, data)
    assert model.optimizer.built and len(model.optimizer.variables) > 1
    model.fit(data, epochs=1, verbose=0)  # builds nothing twice: same variables after
    assert model.optimizer.iterations.numpy() == 2


def test_without_keras_own_build_the_optimizer_is_still_built_first(monkeypatch):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    monkeypatch.setattr(model, "_symbolic_build", lambda: None)  # another Keras' signature
    data = tf.data.Dataset.from_tensor_slices((np.ones((6, 4)), np.ones((6, 2)))).batch(3)
    tfxfer.train.compiling.build_before_tracing(model, data)
    assert model.optimizer.built
