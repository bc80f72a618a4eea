"""Few labels: the solved head stage, schedules sized by steps, LP-FT that keeps the better.

Every run here uses the tiny backbone (`helpers`), so each test takes seconds.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from helpers import (
    InterruptAfterEpoch,
    tiny_arrays,
    tiny_backbone,
    tiny_model,
    tiny_train_data,
    tiny_val_data,
)

import tfxfer
from tfxfer.schedule import FINETUNE_STEPS, Stage
from tfxfer.solver import fit_linear_head
from tfxfer.train import features as feature_cache
from tfxfer.train.features import split_at_head
from tfxfer.train.head_solver import linear_output_layer


@pytest.fixture(autouse=True)
def _empty_store():
    feature_cache.STORE.clear()
    yield
    feature_cache.STORE.clear()


def _data(n: int = 24, batch_size: int = 6):
    images, labels = tiny_arrays(n=n)
    return (
        tiny_train_data(images, labels, batch_size=batch_size, seed=3),
        tiny_val_data(images[: n // 2], labels[: n // 2], batch_size=4),
        images,
        labels,
    )


# === Stages sized by steps ===


@pytest.mark.parametrize(
    ("steps_per_epoch", "expected"),
    [(3, 10), (6, 9), (34, 3), (1000, 3)],  # capped at 10; 50 steps; at least 3 epochs
)
def test_a_finetune_stage_without_epochs_is_sized_by_optimizer_steps(steps_per_epoch, expected):
    stage = Stage("finetune", None, train="all", **FINETUNE_STEPS)
    assert stage.epochs_for(steps_per_epoch) == expected
    assert Stage("finetune", 7, train="all").epochs_for(steps_per_epoch) == 7  # explicit wins


def test_stage_length_fields_are_checked():
    with pytest.raises(tfxfer.TfxferError, match="min_epochs .* above max_epochs"):
        Stage("s", None, min_epochs=5, max_epochs=2).validate()
    with pytest.raises(tfxfer.TfxferError, match=r"epochs must be >= 0 \(an int, or None"):
        Stage("s", 1.5).validate()
    with pytest.raises(tfxfer.TfxferError, match="solver must be one of"):
        Stage("s", None, solver="newton").validate()


def test_the_default_schedule_solves_the_head_and_sizes_finetuning_by_steps():
    head, finetune = tfxfer.default_schedule()
    assert (head.epochs, head.solver) == (None, "lbfgs")
    assert finetune.epochs is None and finetune.epochs_for(3) == 10
    head, finetune = tfxfer.default_schedule(4, 2)
    assert (head.epochs, head.solver, finetune.epochs) == (4, None, 2)


def test_an_auto_sized_stage_trains_that_many_epochs_and_its_schedule_spans_them():
    backbone, model = tiny_model()
    train, val, _, _ = _data(n=12, batch_size=6)  # 2 steps an epoch
    stage = Stage("head", None, learning_rate=1e-2, min_steps=7, min_epochs=1, max_epochs=9)
    result = tfxfer.run_schedule(model, backbone, [stage], train, val, verbose=0)
    assert len(result.history) == 4  # ceil(7 / 2)
    # Cosine decay reaches its end at the stage's last step, not before or after it.
    assert result.history[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-3 * 1e-2)


# === The solved head ===


def test_a_solver_stage_sets_the_head_to_the_solution_in_one_epoch():
    backbone, model = tiny_model()
    train, val, images, labels = _data()
    split = split_at_head(model)
    features = split.features.predict(images, verbose=0)
    expected = fit_linear_head(features, labels, "single_label", num_outputs=3, standardize=False)
    result = tfxfer.run_schedule(
        model, backbone, [Stage("head", None, solver="lbfgs")], train, val, verbose=0
    )
    layer = linear_output_layer(split)
    # The training split's order differs from `images` (it is shuffled): same problem.
    np.testing.assert_allclose(layer.kernel.numpy(), expected.kernel, atol=2e-3)
    np.testing.assert_allclose(layer.bias.numpy(), expected.bias, atol=2e-3)
    assert len(result.history) == 1 and result.history[0]["stage"] == "head"
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(result.history[0])
    info = result.stages["head"]
    assert info["cached_features"] is True and info["solver"]["C"] == expected.C
    assert info["solver"]["folds"] == 5
    assert result.history[0]["accuracy"] > 0.9  # the colour-channel task is separable


def test_a_head_with_a_hidden_layer_trains_by_epochs_instead():
    backbone = tiny_backbone()
    model = tfxfer.build_model(backbone, 3, head=tfxfer.HeadConfig(hidden_units=[4]))
    assert linear_output_layer(split_at_head(model)) is None
    train, val, _, _ = _data()
    stage = Stage("head", None, solver="lbfgs", min_steps=8, min_epochs=1, max_epochs=3)
    result = tfxfer.run_schedule(model, backbone, [stage], train, val, verbose=0)
    assert len(result.history) == 2  # 4 steps an epoch, 8 steps
    assert "solver" not in result.stages["head"]


def test_a_resumed_run_after_a_solved_head_ends_as_the_uninterrupted_one(tmp_path):
    def run(directory, resume=False, callbacks=None, seed=0):
        backbone, model = tiny_model(seed=seed)
        train, val, _, _ = _data()
        result = tfxfer.run_schedule(
            model,
            backbone,
            [Stage("head", None, solver="lbfgs"), Stage("finetune", 2, train="all")],
            train,
            val,
            run_dir=tfxfer.RunDir(str(directory), resume=resume),
            callbacks=callbacks,
            verbose=0,
        )
        return model, result

    whole, whole_result = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[InterruptAfterEpoch(1)])  # right after the solve
    feature_cache.STORE.clear()
    resumed, result = run(tmp_path / "cut", resume=True, seed=7)
    assert result.resumed_from_epoch == 1
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert [r["val_loss"] for r in whole_result.history] == pytest.approx(
        [r["val_loss"] for r in result.history], rel=1e-5
    )
    stages = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())
    assert stages["checkpoint"]


# === LP-FT: keep the better ===


def _lpft(finetune: Stage, tmp_path=None):
    backbone, model = tiny_model()
    train, val, _, _ = _data()
    result = tfxfer.run_schedule(
        model,
        backbone,
        [Stage("head", None, solver="lbfgs"), finetune],
        train,
        val,
        run_dir=tfxfer.RunDir(str(tmp_path)) if tmp_path else None,
        keep_better=True,
        verbose=0,
    )
    return model, result


def test_fine_tuning_that_hurts_is_undone_and_the_probe_kept(tmp_path):
    # Adam at a rate of 0.3 wrecks the backbone: validation loss and accuracy both get worse.
    wreck = Stage("finetune", 2, train="all", optimizer="adam", learning_rate=0.3, decay="constant")
    model, result = _lpft(wreck, tmp_path)
    probe_row = [r for r in result.history if r["stage"] == "head"][-1]
    assert result.history[-1]["val_loss"] > probe_row["val_loss"]
    assert result.selection["kept"] == "probe", result.selection
    assert result.selection["rule"] == "paired"
    assert "did not lower the validation loss" in result.selection["reason"]
    paired = result.selection["paired"]
    assert paired["examples"] == 12
    assert paired["finetuned_loss"] > paired["probe_loss"]
    assert paired["probe_loss"] == pytest.approx(probe_row["val_loss"], rel=1e-4)
    # The backbone is the probe's again (the snapshot's values, not the wrecked ones)...
    with np.load(tmp_path / "checkpoints" / "linear_probe.npz") as saved:
        probe = dict(
            zip(
                [str(p) for p in saved["paths"]],
                [saved[f"v{i:05d}"] for i in range(len(saved["paths"]))],
                strict=True,
            )
        )
    for variable in model.variables:
        if "predictions" not in variable.path:
            np.testing.assert_array_equal(
                variable.numpy(), probe[variable.path], err_msg=variable.path
            )
    # ...and its head was solved again on the training and validation examples together.
    assert result.selection["refit"]["examples"] == 24 + 12
    _, val, _, _ = _data()
    model.compile(loss="sparse_categorical_crossentropy")
    loss = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert loss <= probe_row["val_loss"] + 1e-6


def test_fine_tuning_that_helps_steadily_is_kept_with_its_own_weights():
    # The validation images are half of the training ones: fitting them lowers the loss of
    # nearly every one, far beyond the noise.
    helps = Stage("finetune", 8, train="all", optimizer="adam", learning_rate=3e-3)
    model, result = _lpft(helps)
    assert result.selection["kept"] == "finetuned", result.selection
    paired = result.selection["paired"]
    assert paired["mean_gain"] > paired["z"] * paired["standard_error"] > 0
    # The model is the fine-tuned one, not the probe put back to score it: its validation
    # loss is the last epoch's.
    _, val, _, _ = _data()
    model.compile(loss="sparse_categorical_crossentropy")
    loss = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(result.history[-1]["val_loss"], rel=1e-4)
    assert loss == pytest.approx(paired["finetuned_loss"], rel=1e-4)


def test_a_gain_that_a_few_examples_carry_is_noise_and_a_steady_one_is_not():
    from tfxfer.train.selection import choose, paired_comparison

    probe = np.full(10, 1.0)
    # Two of ten examples much better, the rest a little worse: the mean gains, the noise wins.
    lucky = probe - np.array([3.0, 3.0] + [-0.5] * 8)
    chosen = choose([], "head", paired_comparison(probe, lucky))
    assert chosen["paired"]["mean_gain"] > 0
    assert chosen["kept"] == "probe", chosen
    assert "2 of 10 validation examples scored better, 8 worse" in chosen["reason"]
    # Heavy tails: 41 of 48 examples a little better, 7 much worse, the mean barely ahead
    # and far under its standard error: the count shows the gain is real.
    heavy = np.full(48, 1.0) - np.array([0.1] * 41 + [-0.5] * 7)
    chosen = choose([], "head", paired_comparison(np.full(48, 1.0), heavy))
    assert chosen["paired"]["mean_gain"] < chosen["paired"]["standard_error"]
    assert chosen["kept"] == "finetuned" and "41 against 7" in chosen["reason"], chosen
    # The same counts with the mean behind: the loss rises on the whole, the probe stays.
    behind = np.full(48, 1.0) - np.array([0.05] * 41 + [-0.5] * 7)
    assert choose([], "head", paired_comparison(np.full(48, 1.0), behind))["kept"] == "probe"
    # A smaller mean gain, on every one of 200 examples, is real.
    steady = np.full(200, 1.0) - np.random.default_rng(0).uniform(0.05, 0.15, 200)
    chosen = choose([], "head", paired_comparison(np.full(200, 1.0), steady))
    assert chosen["kept"] == "finetuned", chosen
    # Identical models tie, and a tie keeps the probe (it is refit on every label).
    assert choose([], "head", paired_comparison(probe, probe))["kept"] == "probe"
    # A fine-tuned model that outputs NaN on an example loses on it; a probe that does, too.
    broken = probe - 0.5
    broken[3] = np.nan
    assert choose([], "head", paired_comparison(probe, broken))["kept"] == "probe"
    broken_probe = np.full(10, 1.0)
    broken_probe[2:] = np.nan
    chosen = choose([], "head", paired_comparison(broken_probe, np.full(10, 1.0)))
    assert chosen["kept"] == "finetuned", chosen


def test_the_paired_rule_needs_the_same_examples_in_the_same_order_twice():
    import tensorflow as tf

    from tfxfer.train.selection import example_losses

    backbone, model = tiny_model()
    _, val, images, labels = _data()
    losses, seen = example_losses(model, val, "sparse_categorical_crossentropy")
    assert losses.shape == (12,) and np.array_equal(seen[:, 0], labels[:12])
    # Sample weights scale each example's loss, as Keras' validation loss weighs them.
    weighted = val.map(lambda x, y: (x, y, tf.fill(tf.shape(y), 2.0)))
    doubled, _ = example_losses(model, weighted, "sparse_categorical_crossentropy")
    np.testing.assert_allclose(doubled, 2 * losses, rtol=1e-6)
    # A loss that returns its mean gives no pairs: the last epochs decide instead.
    mean_only = lambda y, p: tf.reduce_mean(  # noqa: E731
        keras.losses.sparse_categorical_crossentropy(y, p)
    )
    assert example_losses(model, val, mean_only) is None


def test_under_two_validation_examples_the_last_epochs_decide():
    from tfxfer.train.selection import choose, paired_comparison

    assert paired_comparison(np.array([1.0]), np.array([0.5])) is None
    history = [
        {"stage": "head", "val_loss": 0.5, "val_accuracy": 0.8},
        {"stage": "finetune", "val_loss": 0.7, "val_accuracy": 0.8},
    ]
    chosen = choose(history, "head", None)
    assert (chosen["kept"], chosen["rule"]) == ("probe", "last_epochs")


def test_the_last_epochs_rule_needs_both_measures_worse():
    from tfxfer.train.selection import choose

    def history(probe, final):
        return [{"stage": "head", **probe}, {"stage": "finetune", **final}]

    worse_loss_better_acc = history(
        {"val_loss": 0.5, "val_accuracy": 0.6}, {"val_loss": 0.7, "val_accuracy": 0.8}
    )
    assert choose(worse_loss_better_acc, "head")["kept"] == "finetuned"
    both_worse = history(
        {"val_loss": 0.5, "val_accuracy": 0.8}, {"val_loss": 0.7, "val_accuracy": 0.8}
    )
    assert choose(both_worse, "head")["kept"] == "probe"
    no_val = history({"loss": 0.5}, {"loss": 0.7})
    assert choose(no_val, "head") == {
        "kept": "finetuned",
        "reason": "no validation data to choose by",
    }


@pytest.mark.parametrize("widths", [(4, 4), (4, 6)], ids=["same-shapes", "other-shapes"])
def test_the_probe_snapshot_restores_branches_whose_layers_share_names(widths):
    # Two fused backbones may both have a layer named `conv1_conv`: their variables then share
    # a path, and a snapshot keyed by path alone gave both branches one branch's weights (or
    # failed on a shape mismatch).
    import keras

    from tfxfer.train.selection import ProbeSnapshot

    def branch(width: int, name: str) -> keras.Model:
        inputs = keras.Input((width,))
        return keras.Model(inputs, keras.layers.Dense(3, name="shared")(inputs), name=name)

    first, second = branch(widths[0], "a"), branch(widths[1], "b")
    x1, x2 = keras.Input((widths[0],)), keras.Input((widths[1],))
    model = keras.Model([x1, x2], keras.layers.Concatenate()([first(x1), second(x2)]))
    paths = [v.path for v in model.variables]
    assert len(set(paths)) < len(paths)  # the case this test is about
    before = [np.array(v.numpy()) for v in model.variables]

    snapshot = ProbeSnapshot(None, write=False)
    snapshot.take(model)
    for variable in model.variables:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    snapshot.restore(model)
    for variable, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
