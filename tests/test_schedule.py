"""Stages, schedules, learning rates, and what `run_schedule` does to a model stage by stage."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
from helpers import (
    TINY_GROUPS,
    TINY_IMAGE_SIZE,
    WeightSnapshots,
    backbone_layers,
    layer_weights,
    tiny_arrays,
    tiny_backbone,
    tiny_model,
    tiny_train_data,
    tiny_val_data,
)

import tfxfer
from tfxfer.backbones.base import LayerGroups
from tfxfer.errors import TfxferError
from tfxfer.schedule import (
    LayerwiseAdamW,
    Stage,
    WarmupCosine,
    apply_stage,
    default_schedule,
    gradual_unfreezing,
    layerwise_multipliers,
    make_optimizer,
    validate_schedule,
)

GROUPS = list(TINY_GROUPS)  # low, mid, top


# === Stage ===


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ("head", []),
        ("all", ["low", "mid", "top"]),
        (0, []),
        (1, ["top"]),
        (2, ["mid", "top"]),
        (3, ["low", "mid", "top"]),
        (["top", "low"], ["low", "top"]),  # model order, whatever order was asked
        (["mid"], ["mid"]),
    ],
)
def test_stage_trainable_groups(train, expected):
    assert Stage("s", 1, train=train).trainable_groups(GROUPS) == expected


@pytest.mark.parametrize(
    ("train", "match"),
    [
        (4, r"train=4 top groups, but the backbone has 3 groups"),
        (-1, r"train=-1"),
        (["top", "conv9"], r"Unknown layer group 'conv9'.*\['low', 'mid', 'top'\]"),
        ("everything", r"Expected `train` to be 'head', 'all', an int or a list.*'everything'"),
        (True, r"Received: train=True"),
    ],
)
def test_stage_trainable_groups_errors(train, match):
    with pytest.raises(TfxferError, match=match):
        Stage("s", 1, train=train).trainable_groups(GROUPS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "epochs must be >= 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"decay": "linear"}, "decay must be one of"),
        ({"warmup_fraction": 1.0}, r"warmup_fraction must be in \[0, 1\)"),
        ({"layerwise_lr_decay": 1.5}, r"layerwise_lr_decay must be in \(0, 1\]"),
        ({"layerwise_lr_decay": 0.5, "optimizer": "sgd"}, "needs optimizer 'adamw' or 'adam'"),
        ({"lora_rank": 0}, "lora_rank must be >= 1"),
        ({"train": ["conv9"]}, "Unknown layer group"),
    ],
)
def test_stage_validate_errors(kwargs, match):
    stage = Stage("bad", **{"epochs": 1, **kwargs})
    with pytest.raises(TfxferError, match=rf"Invalid stage 'bad'.*{match}"):
        stage.validate(GROUPS)


def test_validate_schedule():
    validate_schedule(default_schedule(1, 1), GROUPS)
    with pytest.raises(TfxferError, match="no stages"):
        validate_schedule([], GROUPS)
    with pytest.raises(TfxferError, match="unique"):
        validate_schedule([Stage("a", 1), Stage("a", 1, train="all")], GROUPS)


def test_default_schedule():
    head, finetune = default_schedule(
        2,
        3,
        head_learning_rate=1e-2,
        finetune_learning_rate=1e-5,
        unfreeze=2,
        layerwise_lr_decay=0.7,
    )
    assert (head.name, head.epochs, head.train, head.learning_rate) == ("head", 2, "head", 1e-2)
    assert (finetune.name, finetune.epochs, finetune.learning_rate) == ("finetune", 3, 1e-5)
    assert finetune.trainable_groups(GROUPS) == ["mid", "top"]
    assert finetune.layerwise_lr_decay == 0.7
    assert [s.name for s in default_schedule(2, 0)] == ["head"]
    assert [s.name for s in default_schedule(0, 2)] == ["finetune"]
    with pytest.raises(TfxferError, match="empty"):
        default_schedule(0, 0)


def test_gradual_unfreezing_adds_one_group_per_stage_from_the_top():
    stages = gradual_unfreezing(GROUPS, head_epochs=2, epochs_per_group=1, learning_rate=1e-5)
    assert [s.name for s in stages] == ["head", "unfreeze_top", "unfreeze_mid", "unfreeze_low"]
    assert [s.trainable_groups(GROUPS) for s in stages] == [
        [],
        ["top"],
        ["mid", "top"],
        ["low", "mid", "top"],
    ]
    assert [s.epochs for s in stages] == [2, 1, 1, 1]
    assert all(s.learning_rate == 1e-5 for s in stages[1:])
    assert len(gradual_unfreezing(GROUPS, groups=1)) == 2
    validate_schedule(stages, GROUPS)
    with pytest.raises(TfxferError, match="groups=4"):
        gradual_unfreezing(GROUPS, groups=4)


# === apply_stage ===


def _trainable_names(model):
    return sorted(v.path for v in model.trainable_weights)


def test_apply_stage_sets_trainable_and_keeps_batchnorm_frozen():
    backbone, model = tiny_model()
    groups = LayerGroups.of(backbone)
    bn = keras.layers.BatchNormalization

    assert apply_stage(model, groups, Stage("head", 1)) == []
    assert all(not layer.trainable for layer in backbone_layers(backbone))
    assert model.get_layer("predictions").trainable
    assert _trainable_names(model) == ["predictions/bias", "predictions/kernel"]

    assert apply_stage(model, groups, Stage("top", 1, train=1)) == ["top"]
    assert model.get_layer("tiny_network").get_layer("top_conv").trainable
    assert all(not layer.trainable for layer in backbone_layers(backbone, groups=["low", "mid"]))
    assert all(not layer.trainable for layer in backbone_layers(backbone, bn))
    assert _trainable_names(model) == [
        "predictions/bias",
        "predictions/kernel",
        "top_conv/bias",
        "top_conv/kernel",
    ]

    apply_stage(model, groups, Stage("all_bn", 1, train="all", train_batchnorm=True))
    assert all(layer.trainable for layer in backbone_layers(backbone))
    assert "low_bn/gamma" in _trainable_names(model)

    # A later stage undoes what an earlier one unfroze.
    apply_stage(model, groups, Stage("head_again", 1))
    assert _trainable_names(model) == ["predictions/bias", "predictions/kernel"]
    assert all(not layer.trainable for layer in backbone_layers(backbone, bn))


# === Learning rates ===


def test_warmup_cosine_values():
    schedule = WarmupCosine(peak=1.0, total_steps=10, warmup_steps=4, min_ratio=0.1)
    lr = [float(schedule(step)) for step in range(13)]
    assert lr[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear rise, nonzero at step 0
    assert lr[4] == pytest.approx(1.0)  # the peak, at the end of warmup
    assert lr[7] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert all(a >= b for a, b in zip(lr[4:-1], lr[5:], strict=True))  # never rises again
    assert lr[10] == pytest.approx(0.1) and lr[12] == pytest.approx(0.1)  # ends at min ratio

    constant = WarmupCosine(peak=2.0, total_steps=10, warmup_steps=2, decay="constant")
    assert [float(constant(s)) for s in (0, 2, 9)] == pytest.approx([2 / 3, 2.0, 2.0])
    no_warmup = WarmupCosine(peak=1.0, total_steps=4)
    assert float(no_warmup(0)) == pytest.approx(1.0)
    assert WarmupCosine.from_config(schedule.get_config()).get_config() == schedule.get_config()


def test_make_optimizer_follows_the_stage():
    stage = Stage("s", 2, learning_rate=0.01, warmup_fraction=0.5, optimizer="sgd")
    optimizer = make_optimizer(stage, steps_per_epoch=5, lr_scale=2.0)
    assert isinstance(optimizer, keras.optimizers.SGD)
    schedule = optimizer._learning_rate
    assert (schedule.peak, schedule.total_steps, schedule.warmup_steps) == (0.02, 10, 5)
    assert type(make_optimizer(Stage("s", 1, optimizer="adam"), 3)) is keras.optimizers.Adam
    assert type(make_optimizer(Stage("s", 1), 3)) is LayerwiseAdamW
    assert type(make_optimizer(Stage("s", 1), 3, {"top_conv/kernel": 0.5})) is LayerwiseAdamW
    # Fixed names: a numbered one ("adam_w_3") would change the optimizer variables' paths.
    assert make_optimizer(Stage("s", 1), 3).name == make_optimizer(Stage("t", 1), 3).name


def _one_layerwise_step(decay: float):
    """One training step of every group with layer-wise decay; returns the weights before/after."""
    backbone, model = tiny_model()
    stage = Stage(
        "all",
        1,
        train="all",
        learning_rate=1e-2,
        warmup_fraction=0.0,
        weight_decay=0.0,
        layerwise_lr_decay=decay,
    )
    groups = LayerGroups.of(backbone)
    trainable = apply_stage(model, groups, stage)
    multipliers = layerwise_multipliers(groups, trainable, decay)
    model.compile(make_optimizer(stage, 1, multipliers), "sparse_categorical_crossentropy")
    images, labels = tiny_arrays(n=8)
    before = layer_weights(model.layers)
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    return backbone, model, before, layer_weights(model.layers), (images, labels)


def test_layerwise_adamw_moves_lower_groups_less():
    decay = 0.5
    _, _, before, after, _ = _one_layerwise_step(decay)
    # Adam's first step moves each weight by about the learning rate, so the largest move in
    # a group is its learning rate: 1e-2 for the top group, times `decay` per group below.
    step = {g: np.abs(after[f"{g}_conv/kernel"] - before[f"{g}_conv/kernel"]).max() for g in GROUPS}
    head = np.abs(after["predictions/kernel"] - before["predictions/kernel"]).max()
    assert head == pytest.approx(1e-2, rel=0.05)
    assert step["top"] == pytest.approx(1e-2, rel=0.05)
    assert step["mid"] / step["top"] == pytest.approx(decay, rel=0.05)
    assert step["low"] / step["mid"] == pytest.approx(decay, rel=0.05)


def test_layerwise_multipliers():
    backbone, _ = tiny_model()
    groups = LayerGroups.of(backbone)
    multipliers = layerwise_multipliers(groups, ["mid", "top"], 0.5)
    assert multipliers["top_conv/kernel"] == 1.0 and multipliers["mid_conv/kernel"] == 0.5
    assert "low_conv/kernel" not in multipliers
    assert layerwise_multipliers(groups, GROUPS, None) == {}
    assert layerwise_multipliers(groups, GROUPS, 1.0) == {}


def test_layerwise_optimizer_survives_keras_save_and_load(tmp_path):
    _, model, _, _, (images, labels) = _one_layerwise_step(0.5)
    path = str(tmp_path / "layerwise.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)

    assert isinstance(loaded.optimizer, LayerwiseAdamW)
    assert loaded.optimizer.lr_multipliers == model.optimizer.lr_multipliers
    assert isinstance(loaded.optimizer._learning_rate, WarmupCosine)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 1
    # One more step on each: same optimizer state and multipliers give the same weights.
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    loaded.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# === run_schedule, stage by stage ===


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    """A tiny model trained through four stages that freeze different parts of it."""
    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=24)
    stages = [
        Stage("head", 2, learning_rate=1e-2, warmup_fraction=0.0),
        Stage("top", 1, train=1, learning_rate=1e-2, warmup_fraction=0.0),
        Stage("all", 1, train="all", learning_rate=1e-2, warmup_fraction=0.0),
        Stage(
            "all_bn", 1, train="all", learning_rate=1e-2, warmup_fraction=0.0, train_batchnorm=True
        ),
    ]
    snapshots = WeightSnapshots()
    run_dir = tfxfer.RunDir(str(tmp_path_factory.mktemp("staged") / "run"))
    # No loss or metrics: the softmax head says which (sparse cross-entropy, accuracy).
    result = tfxfer.run_schedule(
        model,
        backbone,
        stages,
        tiny_train_data(images, labels),
        tiny_val_data(images[:9], labels[:9]),
        run_dir=run_dir,
        callbacks=[snapshots],
        verbose=0,
    )
    return {
        "backbone": backbone,
        "model": model,
        "result": result,
        "run_dir": run_dir,
        "stages": dict(zip([s.name for s in stages], snapshots.stages, strict=True)),
    }


def _changed(snapshot, suffix):
    """{path: changed?} for the weights whose path ends with `suffix`."""
    return {
        path: not np.array_equal(value, snapshot["end"][path])
        for path, value in snapshot["begin"].items()
        if path.endswith(suffix)
    }


def test_head_stage_trains_only_the_head(staged_run):
    snapshot = staged_run["stages"]["head"]
    assert _changed(snapshot, "predictions/kernel") == {"predictions/kernel": True}
    for group in GROUPS:
        for suffix in ("conv/kernel", "bn/gamma", "bn/moving_mean", "bn/moving_variance"):
            assert not any(_changed(snapshot, f"{group}_{suffix}").values()), (group, suffix)


def test_partial_stage_trains_its_groups_with_batchnorm_frozen(staged_run):
    snapshot = staged_run["stages"]["top"]
    assert _changed(snapshot, "_conv/kernel") == {
        "low_conv/kernel": False,
        "mid_conv/kernel": False,
        "top_conv/kernel": True,
    }
    for suffix in ("bn/moving_mean", "bn/moving_variance", "bn/gamma", "bn/beta"):
        assert not any(_changed(snapshot, suffix).values()), suffix


def test_finetune_stage_keeps_batchnorm_statistics(staged_run):
    snapshot = staged_run["stages"]["all"]
    assert all(_changed(snapshot, "_conv/kernel").values())
    for suffix in ("bn/moving_mean", "bn/moving_variance", "bn/gamma", "bn/beta"):
        assert not any(_changed(snapshot, suffix).values()), suffix


def test_train_batchnorm_stage_updates_statistics(staged_run):
    # The control for the two tests above: the statistics can move, and here they do.
    snapshot = staged_run["stages"]["all_bn"]
    assert all(_changed(snapshot, "bn/moving_mean").values())
    assert all(_changed(snapshot, "bn/moving_variance").values())
    assert all(_changed(snapshot, "bn/gamma").values())


def test_history_has_one_row_per_epoch_and_matches_history_csv(staged_run):
    history = staged_run["result"].history
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert [row["stage"] for row in history] == ["head", "head", "top", "all", "all_bn"]
    assert [row["stage_epoch"] for row in history] == [1, 2, 1, 1, 1]
    assert all(
        {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(row)
        for row in history
    )

    with open(staged_run["run_dir"].file("history.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4, 5]
    assert [row["stage"] for row in rows] == [row["stage"] for row in history]
    for row, want in zip(rows, history, strict=True):
        assert float(row["loss"]) == pytest.approx(want["loss"])
        assert float(row["val_loss"]) == pytest.approx(want["val_loss"])


def test_best_checkpoint_holds_the_best_epoch(staged_run):
    result, run_dir = staged_run["result"], staged_run["run_dir"]
    val_losses = [row["val_loss"] for row in result.history]
    best_epoch = int(np.argmin(val_losses)) + 1
    assert result.best["monitor"] == "val_loss"
    assert result.best["epoch"] == best_epoch
    assert result.best["value"] == pytest.approx(min(val_losses))

    path = run_dir.file("checkpoints/best.weights.h5")
    _, fresh = tiny_model(seed=1)
    fresh.load_weights(path)
    # The best epoch's val_loss, recomputed from the saved weights.
    images, labels = tiny_arrays(n=24)
    probabilities = np.array(fresh(images[:9], training=False))
    loss = -np.mean(np.log(probabilities[np.arange(9), labels[:9]]))
    assert loss == pytest.approx(result.best["value"], rel=1e-4)


# === Weight decay ===


def test_weight_decay_skips_biases_and_norms_and_follows_the_layerwise_rate():
    """With zero gradients Adam's update is zero, so what moves a weight is the decay alone."""
    backbone, model = tiny_model()
    groups = LayerGroups.of(backbone)
    stage = Stage(
        "all",
        1,
        train="all",
        learning_rate=0.1,
        warmup_fraction=0.0,
        weight_decay=0.5,
        layerwise_lr_decay=0.5,
    )
    trainable = apply_stage(model, groups, stage)
    optimizer = make_optimizer(stage, 1, layerwise_multipliers(groups, trainable, 0.5))
    variables = model.trainable_variables
    optimizer.build(variables)
    before = {v.path: np.array(v.numpy()) for v in variables}
    lr = float(optimizer.learning_rate)
    optimizer.apply([keras.ops.zeros_like(v) for v in variables], variables)
    after = {v.path: np.array(v.numpy()) for v in variables}

    def shrink(path):
        return 1.0 - float(np.mean(after[path] / before[path]))

    # Kernels decay by lr * weight_decay * their group's multiplier: 1, 0.5, 0.25 from the top.
    assert shrink("predictions/kernel") == pytest.approx(lr * 0.5, rel=1e-4)
    assert shrink("top_conv/kernel") == pytest.approx(lr * 0.5, rel=1e-4)
    assert shrink("mid_conv/kernel") == pytest.approx(lr * 0.5 * 0.5, rel=1e-4)
    assert shrink("low_conv/kernel") == pytest.approx(lr * 0.5 * 0.25, rel=1e-4)
    # Biases and normalisation weights (one dimension) never decay.
    one_dimensional = [p for p, value in before.items() if value.ndim < 2]
    assert "predictions/bias" in one_dimensional and "top_conv/bias" in one_dimensional
    for path in one_dimensional:
        np.testing.assert_array_equal(after[path], before[path])


# === Groups over several backbones ===


def _two_backbone_model():
    """Two tiny backbones side by side under one head: the shape of a fusion model."""
    first, second = tiny_backbone(seed=0), tiny_backbone(seed=1)
    second.network.name = "tiny_network_b"
    second.namespace = "other"
    first.namespace = "tiny"
    inputs = keras.Input((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))
    pooled = [keras.layers.GlobalAveragePooling2D()(b.network(inputs)) for b in (first, second)]
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(
        keras.layers.Concatenate()(pooled)
    )
    return first, second, keras.Model(inputs, outputs)


def test_groups_of_several_backbones_are_namespaced():
    first, second, model = _two_backbone_model()
    groups = LayerGroups.of([first, second])
    assert groups.names == [
        "tiny/low",
        "tiny/mid",
        "tiny/top",
        "other/low",
        "other/mid",
        "other/top",
    ]
    # An int is the top k groups of every backbone; names may be full or unambiguous.
    assert Stage("s", 1, train=1).trainable_groups(groups) == ["tiny/top", "other/top"]
    assert Stage("s", 1, train=["other/mid"]).trainable_groups(groups) == ["other/mid"]
    with pytest.raises(TfxferError, match=r"'top' is ambiguous.*'tiny/top', 'other/top'"):
        Stage("s", 1, train=["top"]).trainable_groups(groups)
    # Layer-wise rates count depth within each backbone.
    assert groups.depth_from_top(groups.names) == {
        "tiny/top": 0,
        "tiny/mid": 1,
        "tiny/low": 2,
        "other/top": 0,
        "other/mid": 1,
        "other/low": 2,
    }

    trainable = apply_stage(model, groups, Stage("s", 1, train=["other/top", "tiny/mid"]))
    assert trainable == ["tiny/mid", "other/top"]
    paths = _trainable_names(model)
    assert "predictions/kernel" in paths
    assert [p for p in paths if p.endswith("conv/kernel")] == ["mid_conv/kernel", "top_conv/kernel"]
    assert second.network.get_layer("top_conv").trainable
    assert not first.network.get_layer("top_conv").trainable
    with pytest.raises(TfxferError, match="distinct namespaces"):
        second.namespace = "tiny"
        LayerGroups.of([first, second])


def test_one_backbone_answers_to_its_namespaced_names():
    backbone, _ = tiny_model()
    groups = LayerGroups.of(backbone)
    assert groups.names == GROUPS
    assert Stage("s", 1, train=["tiny/top"]).trainable_groups(groups) == ["top"]


# === The best epoch ===


def test_best_follows_the_declared_mode(tmp_path):
    from tfxfer.train import resolve_monitor_mode

    assert resolve_monitor_mode("val_loss") == "min"
    assert resolve_monitor_mode("val_accuracy") == "max"
    assert resolve_monitor_mode("val_misclassification_rate", "min") == "min"
    # No guessing from a substring: this name holds "accuracy" but is to be minimised.
    with pytest.raises(TfxferError, match="monitor_mode='min' or 'max'"):
        resolve_monitor_mode("val_inaccuracy")

    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=24)
    result = tfxfer.run_schedule(
        model,
        backbone,
        [Stage("head", 3, learning_rate=1e-2)],
        tiny_train_data(images, labels),
        tiny_val_data(images[:9], labels[:9]),
        monitor="val_loss",
        monitor_mode="max",
        run_dir=tfxfer.RunDir(str(tmp_path / "run")),
        verbose=0,
    )
    losses = [row["val_loss"] for row in result.history]
    assert losses[-1] < losses[0]  # it learned, so "max" must pick another epoch than "min"
    assert result.best["mode"] == "max"
    assert result.best["epoch"] == int(np.argmax(losses)) + 1
