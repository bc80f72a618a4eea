"""Imbalanced classes: class weights, oversampling, the warning, and weights reaching `fit`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT, tiny_model, tiny_train_data

import tfxfer
from tfxfer.data.balance import (
    balance_data,
    class_weights,
    imbalance_warning,
    oversampled,
)
from tfxfer.data.examples import Examples, LabelledData
from tfxfer.errors import TfxferError


def examples(counts: list[int], multi_label: bool = False) -> Examples:
    labels = np.repeat(np.arange(len(counts)), counts)
    names = [f"c{i}" for i in range(len(counts))]
    if multi_label:
        labels = np.eye(len(counts))[labels]
    return Examples([f"x{i}" for i in range(len(labels))], labels, names, "text", multi_label)


def data_of(train: Examples) -> LabelledData:
    return LabelledData(train, None, None, list(train.class_names), "text", train.multi_label)


def test_class_weights_equalise_each_class_total_and_keep_the_mean_at_one():
    train = examples([6, 2, 0])
    weights = class_weights(train)
    assert weights == pytest.approx({0: 8 / (2 * 6), 1: 8 / (2 * 2), 2: 1.0})
    per_example = np.array([weights[label] for label in train.labels])
    assert per_example.mean() == pytest.approx(1.0)
    assert per_example[train.labels == 0].sum() == pytest.approx(
        per_example[train.labels == 1].sum()
    )


def test_oversampling_gives_every_class_the_largest_count_and_keeps_every_example():
    train = examples([7, 3, 2])
    balanced = oversampled(train, seed=0)
    assert balanced.counts() == {"c0": 7, "c1": 7, "c2": 7}
    assert set(balanced.inputs) == set(train.inputs)
    # The remainder is drawn without replacement: c1 (3 examples, 7 wanted) has each example
    # twice and one of them a third time.
    c1 = [x for x, y in zip(balanced.inputs, balanced.labels, strict=True) if y == 1]
    assert sorted(c1.count(x) for x in set(c1)) == [2, 2, 3]
    assert oversampled(train, seed=0).inputs == balanced.inputs
    assert oversampled(train, seed=1).inputs != balanced.inputs


def test_balance_data_changes_only_the_training_split():
    train = examples([5, 1])
    val = examples([2, 2])
    data = dataclasses.replace(data_of(train), val=val)
    sampled, weights = balance_data(data, "sampling", seed=0)
    assert weights is None and sampled.train.counts() == {"c0": 5, "c1": 5}
    assert sampled.val is val
    same, weights = balance_data(data, "weights", seed=0)
    assert same is data and weights[1] == pytest.approx(3.0)
    assert balance_data(data, None, seed=0) == (data, None)


def test_balance_refuses_multi_label_data_and_unknown_modes():
    with pytest.raises(TfxferError, match="single-label"):
        balance_data(data_of(examples([3, 1], multi_label=True)), "weights", seed=0)
    with pytest.raises(TfxferError, match="expected one of"):
        balance_data(data_of(examples([3, 1])), "smote", seed=0)


def test_the_warning_names_the_classes_from_a_ratio_of_three():
    assert imbalance_warning(examples([5, 2])) is None
    warning = imbalance_warning(examples([2, 9, 3]))
    assert "'c1' has 9 examples, 'c0' 2 (4.5x)" in warning
    assert "--balance weights" in warning and "--balance sampling" in warning
    assert imbalance_warning(examples([9, 1], multi_label=True)) is None


def test_recipe_config_checks_balance():
    from recipes.bert_text_classifier import Config

    assert any("balance='smote'" in p for p in Config(balance="smote").problems())
    assert not any("balance" in p for p in Config(balance="weights").problems())


def test_class_weights_reach_the_training_loss():
    """On inputs that say nothing about the label, a head learns the class prior; weighted
    by `class_weights`, every class is worth the same, so the rare class's predicted
    probability moves from its frequency towards one half."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 16, 16, 3)).astype(np.uint8)
    labels = (np.arange(40) % 10 == 0).astype(np.int32)  # 4 of class 1, 36 of class 0
    train = examples([36, 4])
    rare = {}
    runs = {
        "plain": (None, True),
        "weighted": (class_weights(train), True),  # the head on cached features
        "weighted, whole model": (class_weights(train), False),
    }
    for name, (weight, cache) in runs.items():
        backbone, model = tiny_model(num_classes=2)
        stages = [tfxfer.Stage("head", 8, learning_rate=3e-2, decay="constant")]
        tfxfer.run_schedule(
            model,
            backbone,
            stages,
            tiny_train_data(images, labels, batch_size=8),
            verbose=0,
            class_weight=weight,
            cache_features=cache,
        )
        rare[name] = float(np.asarray(model(images, training=False))[:, 1].mean())
    assert rare["plain"] < 0.25
    assert rare["weighted"] > 0.35 and rare["weighted, whole model"] > 0.35


@pytest.mark.large  # over ~10 s on two cores
def test_tensorflow_start_up_noise_is_silenced_and_debug_brings_it_back():
    program = (
        "import os, tfxfer, tensorflow as tf; print(int(tf.constant(2))); "
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TFXFER_DEBUG")}

    def stderr(extra_env: dict) -> str:
        done = subprocess.run(
            [sys.executable, "-c", program],
            env={**env, **extra_env},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == "2", done.stdout
        if not extra_env:  # C++ log lines off, "error"-level notices too
            assert done.stdout.split()[1] == "3", done.stdout
        return done.stderr

    quiet = stderr({})
    assert "cuInit" not in quiet and "cudart_stub" not in quiet and "absl::" not in quiet
    raw = stderr({"TFXFER_DEBUG": "1"})
    # Where this TensorFlow prints start-up lines (a CPU machine with the CUDA build), --debug
    # shows them; where it prints none, both runs are silent.
    from tfxfer.startup import STARTUP_NOISE

    noisy = [line for line in raw.splitlines() if STARTUP_NOISE.search(line)]
    if not noisy:
        pytest.skip("this TensorFlow prints no start-up lines here, so there is nothing to hide")
    assert quiet.strip() == "\n".join(
        line for line in raw.splitlines() if line.strip() and not STARTUP_NOISE.search(line)
    )
