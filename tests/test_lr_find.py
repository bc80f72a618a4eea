"""The learning-rate range test: the suggestion rule, weights put back, `learning_rate="auto"`
inside a schedule (and on a resume), and `tfxfer lr-find`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import layer_weights, tiny_arrays, tiny_model, tiny_train_data

import tfxfer
from tfxfer import cli
from tfxfer.errors import TfxferError
from tfxfer.train import find_learning_rate, lr_find


def test_suggestion_is_a_tenth_of_the_minimum_and_steepest_lies_on_the_fall():
    rates = list(np.logspace(-6, 0, 61))
    # Flat, then falling fastest around 1e-4, lowest at 1e-2, then blowing up.
    losses = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(r) + 4))) for r in rates]
    losses = [
        loss + (50 * (math.log10(r) + 2) ** 2 if r > 1e-2 else 0)
        for loss, r in zip(losses, rates, strict=True)
    ]
    finding = lr_find.suggest(rates, losses)
    assert finding.minimum == pytest.approx(1e-2, rel=0.3)
    assert finding.suggestion == pytest.approx(finding.minimum / 10)
    assert 1e-5 < finding.steepest < 1e-3
    assert finding.fell


def test_a_flat_curve_says_so_and_falls_back():
    rates = list(np.logspace(-7, 1, 40))
    finding = lr_find.suggest(rates, [1.1] * 40, fallback=1e-4)
    assert not finding.fell and finding.suggestion == 1e-4
    with pytest.raises(TfxferError, match="only 2 finite losses"):
        lr_find.suggest(rates[:4], [1.0, 1.0, float("nan"), float("nan")])


def test_range_test_on_a_learnable_stage_puts_every_weight_back(tmp_path):
    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=24)
    before = layer_weights(model.layers)
    head = find_learning_rate(
        model, backbone, tfxfer.Stage("head", 1), tiny_train_data(images, labels), steps=60
    )
    # The whole network with SGD: at the large rates the loss blows up and the test stops.
    whole = find_learning_rate(
        model,
        backbone,
        tfxfer.Stage("all", 1, train="all", optimizer="sgd"),
        tiny_train_data(images, labels),
        steps=60,
        cache_features=False,
    )
    after = layer_weights(model.layers)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # The loss fell on the way (the colour is the class).
    assert head.fell and whole.fell
    assert head.suggestion == pytest.approx(head.minimum / 10)
    assert len(whole.learning_rates) == len(whole.losses) == 60
    assert 1e-6 < whole.suggestion < 1.0
    assert lr_find.plot_finding(whole, str(tmp_path / "lr.png"))
    assert (tmp_path / "lr.png").stat().st_size > 10_000


def test_range_test_stops_once_the_loss_diverges():
    import keras
    import tensorflow as tf

    x = np.random.default_rng(0).normal(0, 30, (64, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    finding = lr_find.range_test(model, batches, loss="mse", optimizer="sgd", steps=80)
    # SGD on inputs of scale 30 diverges long before a rate of 10.
    assert finding.stopped_early and 5 <= len(finding.losses) < 80
    assert finding.learning_rates[-1] < 1.0 and finding.suggestion < finding.minimum


def test_auto_stage_trains_at_the_rate_found_and_a_resume_reuses_it(tmp_path):
    images, labels = tiny_arrays(n=24)
    stages = [
        tfxfer.Stage("head", 1, learning_rate=1e-2),
        tfxfer.Stage(
            "finetune", 2, train="all", learning_rate="auto", decay="constant", warmup_fraction=0
        ),
    ]
    backbone, model = tiny_model()
    run_dir = tfxfer.RunDir(str(tmp_path / "run"))
    result = tfxfer.run_schedule(
        model, backbone, stages, tiny_train_data(images, labels), run_dir=run_dir, verbose=0
    )
    found = result.stages["finetune"]["found_learning_rate"]
    assert 0 < found < 1
    assert result.stages["finetune"]["lr_find"]["steps"] >= 5
    # A constant-rate stage: its history rows carry the rate found.
    assert [
        row["learning_rate"] for row in result.history if row["stage"] == "finetune"
    ] == pytest.approx([found, found], rel=1e-5)
    assert (tmp_path / "run" / "lr_find_finetune.png").exists()
    manifest = json.loads((tmp_path / "run" / ".tfxfer-run.json").read_text())
    assert "lr_find_finetune.png" in json.dumps(manifest)

    # Killed after epoch 2 (the first fine-tuning epoch): the resume does not measure again.
    backbone, model = tiny_model(seed=1)
    resumed_dir = tfxfer.RunDir(str(tmp_path / "run"), resume=True)
    calls = []
    original = lr_find.range_test
    lr_find.range_test = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = tfxfer.run_schedule(
            model, backbone, stages, tiny_train_data(images, labels), run_dir=resumed_dir, verbose=0
        )
    finally:
        lr_find.range_test = original
    assert calls == [] and again.stages["finetune"]["found_learning_rate"] == found


def test_recipe_configs_take_auto_learning_rates():
    from recipes.resnet50_image_classifier import Config

    config = Config(head_learning_rate="auto", finetune_learning_rate="auto", lora_rank=None)
    assert not [p for p in config.problems() if "learning_rate" in p]
    assert [s.learning_rate for s in config.schedule()] == ["auto", "auto"]
    flagged = Config.from_flags(
        ["--finetune-learning-rate", "auto", "--head-learning-rate", "3e-3"]
    )
    assert (flagged.head_learning_rate, flagged.finetune_learning_rate) == (3e-3, "auto")
    assert any(
        "finetune_learning_rate='fast'" in p
        for p in Config(finetune_learning_rate="fast").problems()
    )


@pytest.mark.large
def test_lr_find_command_trains_the_head_first_and_writes_its_plot(tmp_path, capsys):
    from bert_helpers import write_hf_checkpoint
    from test_configfile import write

    write_hf_checkpoint(tmp_path / "bert")
    rows = "\n".join(
        [
            "text,label",
            *[f"good fun {i},pos" for i in range(12)],
            *[f"bad dull {i},neg" for i in range(12)],
        ]
    )
    train = write(tmp_path / "train.csv", rows + "\n")
    argv = [
        "lr-find",
        "bert_text_classifier",
        "--set",
        f"train={train}",
        "--set",
        f"backbone={tmp_path / 'bert'}",
        "--set",
        f"output_dir={tmp_path / 'run'}",
        "--sequence-length",
        "16",
        "--head-epochs",
        "1",
        "--verbose",
        "0",
        "--steps",
        "30",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "training ['head'] first" in out and "--finetune-learning-rate" in out
    saved = json.loads((tmp_path / "run-lr-find" / "lr_find.json").read_text())
    assert saved["stage"] == "finetune" and len(saved["losses"]) <= 30
    assert (tmp_path / "run-lr-find" / "lr_find.png").exists()
    assert not (tmp_path / "run").exists()  # the run's own directory stays free
    # Its own earlier output is replaced (nothing in it resumes); a folder holding a file of
    # the user's is refused, deleting nothing; a wrong stage is named.
    (tmp_path / "run-lr-find" / "notes.txt").write_text("mine")
    assert cli.main([*argv, "--overwrite"]) == 2
    assert (tmp_path / "run-lr-find" / "notes.txt").read_text() == "mine"
    assert cli.main([*argv, "--stage", "middle", "--output", str(tmp_path / "other")]) == 2
    assert "is not a stage of this schedule; its stages are ['head', 'finetune']" in (
        capsys.readouterr().err
    )
