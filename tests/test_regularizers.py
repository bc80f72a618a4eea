"""The joint objective L_T + λ·L_S as a stage option: L2-SP towards the pretrained weights."""

from __future__ import annotations

import numpy as np
import pytest

import tfxfer
from tests.helpers import (
    InterruptAfterEpoch,
    backbone_layers,
    layer_weights,
    tiny_arrays,
    tiny_model,
    tiny_train_data,
)
from tfxfer.errors import TfxferError


def _finetune(weight: float | None, *, run_dir=None, resume=False, callbacks=None, seed=0):
    backbone, model = tiny_model(seed=0 if not resume else seed)
    pretrained = layer_weights(backbone_layers(backbone))
    images, labels = tiny_arrays(n=18)
    extra = {"regularizer": "l2sp", "regularizer_weight": weight} if weight is not None else {}
    result = tfxfer.run_schedule(
        model,
        backbone,
        [
            tfxfer.Stage("head", 1, learning_rate=1e-2),
            tfxfer.Stage("finetune", 3, train="all", learning_rate=5e-3, **extra),
        ],
        tiny_train_data(images, labels, batch_size=6),
        run_dir=tfxfer.RunDir(str(run_dir), resume=resume) if run_dir else None,
        callbacks=callbacks,
        verbose=0,
    )
    return model, backbone, pretrained, result


def _distance(backbone, pretrained) -> float:
    now = layer_weights(backbone_layers(backbone))
    return float(sum(np.sum((now[p] - pretrained[p]) ** 2) for p in pretrained))


def test_lambda_zero_is_plain_fine_tuning_exactly():
    plain, *_ = _finetune(None)
    zero, *_ = _finetune(0.0)
    for a, b in zip(plain.weights, zero.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_very_large_lambda_holds_the_backbone_at_its_pretrained_weights():
    model, backbone, pretrained, _ = _finetune(1e9)
    assert _distance(backbone, pretrained) == pytest.approx(0.0, abs=1e-10)
    head = model.get_layer("predictions").kernel.numpy()
    assert not np.allclose(head, tiny_model()[1].get_layer("predictions").kernel.numpy())


def test_l2sp_keeps_the_backbone_closer_to_its_pretrained_weights_than_plain_fine_tuning():
    _, plain_backbone, pretrained, _ = _finetune(None)
    distances = [_distance(plain_backbone, pretrained)]
    for weight in (20.0, 60.0):
        _, backbone, _, _ = _finetune(weight)
        distances.append(_distance(backbone, pretrained))
    # The larger λ, the closer to θ₀; never all the way at these λ.
    assert distances[0] > distances[1] > distances[2] > 0.0, distances


def test_a_resume_in_the_middle_of_a_regularised_stage_ends_as_the_whole_run(tmp_path):
    whole, *_ = _finetune(20.0, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _finetune(20.0, run_dir=tmp_path / "cut", callbacks=[InterruptAfterEpoch(3)])
    # A fresh process builds the model from the same pretrained weights (θ₀), then resumes.
    resumed, *_ = _finetune(20.0, run_dir=tmp_path / "cut", resume=True, seed=0)
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"regularizer": "l2sp", "regularizer_weight": -0.1}, "must be a number >= 0"),
        ({"regularizer": "l2sp", "regularizer_weight": float("nan")}, "must be a number >= 0"),
        ({"regularizer": "l2sp", "regularizer_weight": float("inf")}, "must be finite"),
        ({"regularizer": "l1", "regularizer_weight": 0.1}, "regularizer must be one of"),
        (
            {"regularizer": "l2sp", "regularizer_weight": 0.1, "optimizer": "sgd"},
            "needs optimizer 'adamw' or 'adam'",
        ),
    ],
)
def test_bad_regularizer_settings_are_named(fields, message):
    with pytest.raises(TfxferError, match=message):
        tfxfer.Stage("finetune", 1, train="all", **fields).validate()


def test_recipe_flags_put_the_regularizer_on_the_fine_tuning_stage():
    from recipes.bert_text_classifier import Config

    config = Config.from_flags(["--regularizer", "l2sp", "--regularizer-weight", "0.5"])
    head, finetune = config.schedule()
    assert (finetune.regularizer, finetune.regularizer_weight) == ("l2sp", 0.5)
    assert (head.regularizer, head.regularizer_weight) == (None, 0.0)
    bad = Config(regularizer="l3", regularizer_weight=-1.0).problems()
    assert any("regularizer='l3'" in p for p in bad)
    assert any("regularizer_weight=-1.0" in p for p in bad)
