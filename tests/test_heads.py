"""The head: pooling per backbone output kind, dense stack, output activation and dtype."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tfxfer.errors import TfxferError
from tfxfer.heads import HeadConfig, MaskedSequencePooling, build_head, pool_features


def _spatial_model(pooling):
    features = keras.Input((3, 4, 5))
    return keras.Model(features, pool_features(features, "spatial", pooling))


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        ("avg", lambda x: x.mean(axis=(1, 2))),
        ("max", lambda x: x.max(axis=(1, 2))),
        ("avg+max", lambda x: np.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], -1)),
    ],
)
def test_spatial_pooling_shapes_and_values(pooling, expected):
    model = _spatial_model(pooling)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype("float32")
    pooled = np.array(model(x))
    assert pooled.shape == (2, 10 if pooling == "avg+max" else 5)
    np.testing.assert_allclose(pooled, expected(x), rtol=1e-5, atol=1e-6)


def test_default_pooling_per_output_kind():
    assert HeadConfig().resolved_pooling("spatial") == "avg"
    assert HeadConfig().resolved_pooling("sequence") == "cls"
    assert HeadConfig().resolved_pooling("vector") is None


def _sequence_and_mask():
    sequence = np.array(
        [[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]], [[-5.0, -6.0], [-50.0, 50.0], [-50.0, 50.0]]],
        dtype="float32",
    )
    # The padding positions hold the largest values: a pooling that looks at them is wrong.
    mask = np.array([[True, True, False], [True, False, False]])
    return sequence, mask


def test_masked_mean_and_max_ignore_padding():
    sequence, mask = _sequence_and_mask()
    mean = np.array(MaskedSequencePooling("mean")(sequence, mask))
    np.testing.assert_allclose(mean, [[2.0, 1.0], [-5.0, -6.0]])
    maximum = np.array(MaskedSequencePooling("max")(sequence, mask))
    np.testing.assert_allclose(maximum, [[3.0, 4.0], [-5.0, -6.0]])


def test_masked_pooling_through_pool_features():
    sequence, mask = _sequence_and_mask()
    inputs = {
        "sequence_output": keras.Input((3, 2), name="sequence_output"),
        "padding_mask": keras.Input((3,), dtype="bool", name="padding_mask"),
    }
    model = keras.Model(inputs, pool_features(inputs, "sequence", "mean"))
    pooled = np.array(model({"sequence_output": sequence, "padding_mask": mask}))
    np.testing.assert_allclose(pooled, [[2.0, 1.0], [-5.0, -6.0]])


def test_cls_pooling_uses_pooled_output_when_present():
    sequence, mask = _sequence_and_mask()
    pooled_output = np.array([[7.0, 8.0], [9.0, 10.0]], dtype="float32")
    with_pooled = {
        "sequence_output": keras.Input((3, 2), name="sequence_output"),
        "padding_mask": keras.Input((3,), dtype="bool", name="padding_mask"),
        "pooled_output": keras.Input((2,), name="pooled_output"),
    }
    model = keras.Model(with_pooled, pool_features(with_pooled, "sequence", "cls"))
    out = model({"sequence_output": sequence, "padding_mask": mask, "pooled_output": pooled_output})
    np.testing.assert_allclose(np.array(out), pooled_output)

    # Without a pooled output, "cls" is the first token's vector.
    without = {
        "sequence_output": keras.Input((3, 2), name="sequence_output"),
        "padding_mask": keras.Input((3,), dtype="bool", name="padding_mask"),
    }
    model = keras.Model(without, pool_features(without, "sequence", "cls"))
    out = model({"sequence_output": sequence, "padding_mask": mask})
    np.testing.assert_allclose(np.array(out), sequence[:, 0, :])


@pytest.mark.parametrize("output_kind", ["spatial", "sequence"])
def test_output_is_float32_under_mixed_float16(output_kind):
    keras.mixed_precision.set_global_policy("mixed_float16")  # the autouse fixture restores it
    if output_kind == "spatial":
        inputs = keras.Input((4, 4, 3))
        features = keras.layers.Conv2D(8, 1)(inputs)
        assert features.dtype == "float16"
        head = HeadConfig(pooling="avg+max", hidden_units=[6])
    else:
        inputs = {
            "tokens": keras.Input((5, 3), name="tokens"),
            "padding_mask": keras.Input((5,), dtype="bool", name="padding_mask"),
        }
        features = {
            "sequence_output": keras.layers.Dense(8)(inputs["tokens"]),
            "padding_mask": inputs["padding_mask"],
        }
        head = HeadConfig(pooling="max", hidden_units=[6])
    model = keras.Model(inputs, build_head(features, output_kind, head, 3, "single_label"))
    assert model.output.dtype == "float32"
    assert model.get_layer("predictions").compute_dtype == "float32"


def _head_model(task, num_outputs=3):
    features = keras.Input((6,))
    model = keras.Model(
        features, build_head(features, "vector", HeadConfig(dropout=0.0), num_outputs, task)
    )
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32") * 5
    return model, np.array(model(x))


def test_single_label_is_softmax():
    model, out = _head_model("single_label")
    assert model.get_layer("predictions").activation is keras.activations.softmax
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


def test_multi_label_is_sigmoid():
    model, out = _head_model("multi_label")
    assert model.get_layer("predictions").activation is keras.activations.sigmoid
    assert ((out > 0) & (out < 1)).all()
    assert not np.allclose(out.sum(-1), 1.0)


def test_regression_is_linear():
    model, out = _head_model("regression", num_outputs=2)
    assert model.get_layer("predictions").activation is keras.activations.linear
    assert out.shape == (8, 2) and (out < 0).any()


def test_hidden_layers_and_dropout_are_built():
    features = keras.Input((6,))
    head = HeadConfig(hidden_units=[5, 4], dropout=0.3, activation="gelu")
    model = keras.Model(features, build_head(features, "vector", head, 2, "single_label"))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [5, 4, 2]
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert len(dropouts) == 3 and all(layer.rate == 0.3 for layer in dropouts)


@pytest.mark.parametrize(
    ("output_kind", "config", "match"),
    [
        (
            "spatial",
            HeadConfig(pooling="mean"),
            r"Expected `pooling` to be one of \('avg', 'max', 'avg\+max'\).*pooling='mean'",
        ),
        ("spatial", HeadConfig(pooling="cls"), "pooling='cls'"),
        ("sequence", HeadConfig(pooling="avg"), r"one of \('cls', 'mean', 'max'\)"),
        ("vector", HeadConfig(pooling="avg"), "pooling='avg'"),
        ("spatial", HeadConfig(dropout=1.0), r"Expected `dropout` in \[0, 1\).*dropout=1.0"),
        ("spatial", HeadConfig(dropout=-0.1), "dropout=-0.1"),
        ("spatial", HeadConfig(hidden_units=[8, 0]), r"hidden_units=\[8, 0\]"),
    ],
)
def test_invalid_head_config(output_kind, config, match):
    with pytest.raises(TfxferError, match=match):
        config.validate(output_kind)


def test_invalid_task_and_output_count():
    features = keras.Input((6,))
    with pytest.raises(TfxferError, match="task='multiclass'"):
        build_head(features, "vector", HeadConfig(), 3, "multiclass")
    with pytest.raises(TfxferError, match="num_outputs=0"):
        build_head(features, "vector", HeadConfig(), 0, "single_label")


def test_masked_pooling_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode='sum'"):
        MaskedSequencePooling("sum")
