"""Stages that train until convergence (`Stage.patience`): stop, end on the best epoch, resume."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    InterruptAfterEpoch,
    tiny_arrays,
    tiny_model,
    tiny_train_data,
    tiny_val_data,
)

import tfxfer
from tfxfer.errors import TfxferError
from tfxfer.train import features as feature_cache

MAX_EPOCHS = 12
PATIENCE = 2


def _overfitting_data():
    """Training labels the head can memorise, validation labels it cannot predict.

    The validation loss then falls for a few epochs at most and rises after: a stage that
    trains until convergence must stop well before its maximum.
    """
    images, labels = tiny_arrays(n=24, seed=1)
    rng = np.random.default_rng(5)
    val_images = images[:12]
    val_labels = rng.permutation(labels[:12]).astype(np.int32)
    return images, labels, val_images, val_labels


def _run(run_dir=None, *, resume=False, callbacks=None, seed=0, finetune_epochs=1, cache=True):
    backbone, model = tiny_model(seed=seed)
    images, labels, val_images, val_labels = _overfitting_data()
    stages = [
        tfxfer.Stage(
            "head",
            MAX_EPOCHS,
            learning_rate=0.3,
            decay="constant",
            warmup_fraction=0.0,
            patience=PATIENCE,
        )
    ]
    if finetune_epochs:
        stages.append(tfxfer.Stage("finetune", finetune_epochs, train="all", learning_rate=1e-3))
    result = tfxfer.run_schedule(
        model,
        backbone,
        stages,
        tiny_train_data(images, labels, batch_size=6),
        tiny_val_data(val_images, val_labels, batch_size=6),
        run_dir=tfxfer.RunDir(str(run_dir), resume=resume) if run_dir else None,
        callbacks=callbacks,
        verbose=0,
        cache_features=cache,
    )
    return model, result, (val_images, val_labels)


@pytest.fixture(autouse=True)
def _empty_store():
    feature_cache.STORE.clear()
    yield
    feature_cache.STORE.clear()


@pytest.mark.parametrize("cache", [True, False])
def test_a_stage_stops_after_patience_epochs_without_improvement_on_its_best_weights(cache):
    model, result, (val_images, val_labels) = _run(finetune_epochs=0, cache=cache)
    rows = result.history
    info = result.stages["head"]
    val_losses = [row["val_loss"] for row in rows]
    best = int(np.argmin(val_losses)) + 1
    assert len(rows) < MAX_EPOCHS, val_losses  # it stopped early
    assert info["stopped_early"] is True
    assert info["best_epoch"] == best
    assert info["ended_after"] == len(rows) == best + PATIENCE
    # The model ends on the best epoch's weights: its validation loss is the best row's.
    loss, _ = model.evaluate(val_images, val_labels, batch_size=6, verbose=0)
    assert loss == pytest.approx(val_losses[best - 1], rel=1e-5)
    assert loss < val_losses[-1]


def test_the_next_stage_starts_right_after_the_early_stop():
    _, result, _ = _run(finetune_epochs=2)
    head_epochs = result.stages["head"]["ended_after"]
    assert [row["epoch"] for row in result.history] == list(range(1, head_epochs + 3))
    assert [row["stage"] for row in result.history][-2:] == ["finetune", "finetune"]
    assert [row["stage_epoch"] for row in result.history][-2:] == [1, 2]


def test_a_stage_without_an_early_stop_still_ends_on_its_best_epoch():
    backbone, model = tiny_model()
    images, labels, val_images, val_labels = _overfitting_data()
    result = tfxfer.run_schedule(
        model,
        backbone,
        [tfxfer.Stage("head", 4, learning_rate=0.3, decay="constant", patience=10)],
        tiny_train_data(images, labels, batch_size=6),
        tiny_val_data(val_images, val_labels, batch_size=6),
        verbose=0,
    )
    info = result.stages["head"]
    assert info["ended_after"] == 4 and info["stopped_early"] is False
    val_losses = [row["val_loss"] for row in result.history]
    assert info["best_epoch"] == int(np.argmin(val_losses)) + 1
    loss, _ = model.evaluate(val_images, val_labels, batch_size=6, verbose=0)
    assert loss == pytest.approx(min(val_losses), rel=1e-5)


def test_a_resume_between_the_best_epoch_and_the_stop_ends_where_the_whole_run_does(tmp_path):
    whole, whole_result, _ = _run(tmp_path / "whole")
    best = whole_result.stages["head"]["best_epoch"]
    # Killed after the best epoch, before the stop: the best weights exist only in the
    # checkpoint's stage_best.npz.
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", callbacks=[InterruptAfterEpoch(best + 1)])
    feature_cache.STORE.clear()
    resumed, result, _ = _run(tmp_path / "cut", resume=True, seed=9)
    assert result.resumed_from_epoch == best + 1
    assert result.stages["head"]["ended_after"] == whole_result.stages["head"]["ended_after"]
    assert [r["epoch"] for r in result.history] == [r["epoch"] for r in whole_result.history]
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_a_resume_after_the_stop_skips_the_rest_of_the_stage(tmp_path):
    whole, whole_result, _ = _run(tmp_path / "whole", finetune_epochs=2)
    ended = whole_result.stages["head"]["ended_after"]
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", callbacks=[InterruptAfterEpoch(ended)], finetune_epochs=2)
    resumed, result, _ = _run(tmp_path / "cut", resume=True, seed=9, finetune_epochs=2)
    assert result.resumed_from_epoch == ended
    assert [r["stage"] for r in result.history] == [r["stage"] for r in whole_result.history]
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_patience_must_be_a_positive_int(patience):
    with pytest.raises(TfxferError, match="patience must be an int >= 1"):
        tfxfer.Stage("head", 3, patience=patience).validate()
