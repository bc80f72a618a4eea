"""SimCLR pretraining (`recipes.contrastive_image_pretrain`): the loss against NumPy, views that
replay from any step, a run that writes weights the image recipe reads (as a file or as the
run directory), an exact mid-epoch resume from the command line, and every bad input named.

The end-to-end runs share one uninterrupted pretraining run (12 drawn images, 32 px,
MobileNetV3Small, 2 epochs of 3 steps); each run costs about 20 s, most of it tracing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import register_tiny_backbones

import tfxfer
from recipes.contrastive_image_pretrain import Config, main
from tfxfer.data.synthetic import write_shapes_dataset
from tfxfer.errors import DataError, Preempted, TfxferError, WeightsError
from tfxfer.pretrain.contrastive import (
    NTXentLoss,
    ViewAugmentation,
    contrastive_accuracy,
    nt_xent,
)
from tfxfer.pretrain.contrastive_data import contrastive_train_data
from tfxfer.pretrain.contrastive_finish import WEIGHTS_FILE
from tfxfer.recipe import command_line

# === The objective, on small examples ===


def _numpy_nt_xent(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z) // 2
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        logits = np.array([z[i] @ z[j] for j in others]) / temperature
        top = logits.max()
        log_sum = top + np.log(np.exp(logits - top).sum())
        losses.append(log_sum - z[i] @ z[positive] / temperature)
    return np.array(losses)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_a_numpy_reference(temperature):
    z = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    got = nt_xent(tf.constant(z), temperature).numpy()
    np.testing.assert_allclose(got, _numpy_nt_xent(z.astype(np.float64), temperature), rtol=1e-4)
    # As a Keras loss: the mean over the rows; y_true is ignored.
    loss = NTXentLoss(temperature)(np.zeros(3), z)
    np.testing.assert_allclose(float(loss), got.mean(), rtol=1e-5)


def test_the_loss_is_float32_and_the_accuracy_finds_positives():
    z = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float16)
    assert nt_xent(tf.constant(z)).dtype == tf.float32
    # Identical views: every row's best match is its positive.
    pairs = np.concatenate([z, z]).astype(np.float32)
    assert contrastive_accuracy(None, tf.constant(pairs)).numpy().tolist() == [1.0] * 8


@pytest.mark.parametrize("temperature", [0, -0.1, math.nan, math.inf])
def test_a_temperature_that_is_not_a_positive_number_is_refused(temperature):
    with pytest.raises(TfxferError, match="temperature="):
        Config.smoke(temperature=temperature).validate()
    with pytest.raises(TfxferError, match="finite number > 0"):
        NTXentLoss(temperature)


def test_bad_view_settings_and_a_batch_of_one_are_named_together():
    config = Config.smoke(batch_size=1, min_crop_area=0, grayscale=2.0, backbone="bert-tiny")
    with pytest.raises(TfxferError) as error:
        config.validate()
    for part in ("batch_size=1", "min_crop_area=0", "grayscale=2.0", "backbone='bert-tiny'"):
        assert part in str(error.value)


# === Views ===


def _images(n: int = 6, size: int = 16) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    return tf.data.Dataset.from_tensor_slices(rng.integers(0, 256, (n, size, size, 3), np.uint8))


def test_views_replay_from_any_step_and_differ_between_steps():
    data = contrastive_train_data(
        _images(), num_examples=6, batch_size=2, seed=3, views=ViewAugmentation()
    )
    assert data.steps_per_epoch == 3 and data.augmented
    straight = [x for x, _ in data.build(0, 0).take(5)]
    resumed = [x for x, _ in data.build(1, 1).take(1)]  # step 4: epoch 1, step 1
    for view, want in zip(resumed[0], straight[4], strict=True):
        np.testing.assert_array_equal(view.numpy(), want.numpy())
    first, second = straight[0]
    assert first.dtype == tf.uint8 and first.shape == (2, 16, 16, 3)
    assert not np.array_equal(first.numpy(), second.numpy())  # two different views
    again = [x for x, _ in data.build(0, 0).take(1)][0]
    np.testing.assert_array_equal(again[0].numpy(), first.numpy())  # same seed, same step


def test_the_default_colour_jitter_changes_grey_images():
    # Brightness and contrast jitter act on grey images too, and were worth 10 points of linear
    # probe on Fashion-MNIST (one seed, benchmarks/contrastive_few_labels.py): keep it for grey.
    grey = np.repeat(np.random.default_rng(1).integers(0, 256, (4, 16, 16, 1), np.uint8), 3, -1)
    default = Config()
    assert default.color_jitter > 0
    seed = tf.constant([5, 6], tf.int64)
    plain = dataclasses.replace(default.views(), color_jitter=0.0).view(grey, seed)
    jittered = default.views().view(grey, seed)
    assert not np.array_equal(plain.numpy(), jittered.numpy())
    np.testing.assert_array_equal(jittered[..., 0].numpy(), jittered[..., 2].numpy())


# === Bad input, before anything is written ===


def test_an_image_folder_without_images_is_refused(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "notes.txt").write_text("no images here")
    output = tmp_path / "run"
    with pytest.raises(DataError, match="holds no readable images"):
        main(Config.smoke(data_dir=str(tmp_path / "data"), output_dir=str(output)))
    assert not output.exists()


def test_fewer_than_two_images_per_batch_is_refused(tmp_path):
    data = write_shapes_dataset(str(tmp_path / "data"), per_class=1, image_size=32)
    os.remove(os.path.join(data, "circle", "circle_0000.png"))
    os.remove(os.path.join(data, "square", "square_0000.png"))
    output = tmp_path / "run"
    with pytest.raises(DataError, match="needs at least 2 images in every replica's batch"):
        main(Config.smoke(data_dir=data, output_dir=str(output)))
    assert not output.exists()


# === End to end ===


def _config(root: Path, **fields) -> Config:
    data = str(root / "data")
    fields.setdefault("output_dir", str(root / "run"))
    return Config.smoke(data_dir=data, probe_dir=data, probe_labels_per_class=2, epochs=2, **fields)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("simclr")
    write_shapes_dataset(str(root / "data"), per_class=4, image_size=32, seed=0)
    return root


# The pretraining run's backbone: the tiny row in the default tier, MobileNetV3 (the smoke
# config's own) in the large one.
@pytest.fixture(
    scope="module", params=["tinynet", pytest.param("mobilenetv3small", marks=pytest.mark.large)]
)
def _pretrain_run(request, data_root) -> dict:
    with pytest.MonkeyPatch.context() as monkeypatch:
        register_tiny_backbones(monkeypatch)
        # One run directory per backbone: both share the module's data (test-all runs both).
        output_dir = str(data_root / f"run-{request.param}")
        config = _config(data_root, backbone=request.param, output_dir=output_dir)
        return {**main(config), "name": request.param}


@pytest.fixture
def pretrain_run(_pretrain_run, tiny_backbones) -> dict:
    """A finished SimCLR run (read-only); `name` is its backbone."""
    return _pretrain_run


def _h5_arrays(path: str) -> dict[str, np.ndarray]:
    arrays = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return arrays


def test_a_run_writes_the_backbone_and_measures_it(pretrain_run):
    run = Path(pretrain_run["run_dir"])
    assert pretrain_run["output"] == str(run / WEIGHTS_FILE) and (run / WEIGHTS_FILE).is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["pretraining"]["objective"] == "simclr"
    assert config["pretraining"]["modality"] == "image"
    assert config["pretraining"]["output"] == WEIGHTS_FILE
    assert config["backbone_info"]["name"] == pretrain_run["name"]
    metrics = json.loads((run / "metrics.json").read_text())
    probe = metrics["linear_probe"]
    assert 0 <= probe["pretrained_accuracy"] <= 1 and 0 <= probe["initial_accuracy"] <= 1
    assert probe["train_examples"] == 6 and probe["test_examples"] == 6
    assert {"loss", "accuracy"} <= set(pretrain_run["history"][-1])
    assert len(pretrain_run["history"]) == 2
    assert (run / "training_curves.png").is_file()
    # TensorBoard's event file, with the epochs' losses in it, as a fine-tuning run has.
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and any(event.stat().st_size > 0 for event in events)
    assert not any(name.startswith(".tmp-") for name in os.listdir(run))
    info = tfxfer.backbones.from_run.pretraining_output(run)
    assert info["path"] == str((run / WEIGHTS_FILE).resolve())


def _trained_weights(network: keras.Model) -> dict[str, np.ndarray]:
    # BatchNorm's moving statistics are recalibrated before the weights are written.
    return {
        v.path: v.numpy()
        for v in network.weights
        if "moving_mean" not in v.path and "moving_variance" not in v.path
    }


def test_the_weights_file_and_the_run_directory_give_the_pretrained_backbone(pretrain_run):
    run, name = pretrain_run["run_dir"], pretrain_run["name"]
    from_file = tfxfer.build_backbone(name, weights=os.path.join(run, WEIGHTS_FILE), image_size=48)
    from_run = tfxfer.build_backbone(name, weights=run, image_size=32)
    for mine, theirs in zip(from_file.network.weights, from_run.network.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    trained = _trained_weights(pretrain_run["backbone"].network)
    for path, value in _trained_weights(from_run.network).items():
        np.testing.assert_array_equal(value, trained[path], err_msg=path)


def test_the_image_recipe_fine_tunes_from_the_run_directory(pretrain_run, data_root, tmp_path):
    from recipes import resnet50_image_classifier as image_recipe

    run = pretrain_run["run_dir"]
    result = image_recipe.main(
        image_recipe.Config.smoke(
            data_dir=str(data_root / "data"),
            output_dir=str(tmp_path / "finetune"),
            backbone=pretrain_run["name"],
            weights=run,
            finetune_epochs=0,  # the head only: the backbone keeps the pretrained weights
        )
    )
    network = result["backbone"].network
    written = tfxfer.build_backbone(pretrain_run["name"], weights=run, image_size=32).network
    for mine, theirs in zip(network.weights, written.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
    saved = json.loads((tmp_path / "finetune" / "config.json").read_text())
    assert saved["backbone_info"]["weights"] == run


def test_a_pretraining_run_of_another_architecture_is_named(pretrain_run):
    name = pretrain_run["name"]
    with pytest.raises(WeightsError, match=f"pretrained a '{name}' backbone, not 'resn"):
        tfxfer.build_backbone("resnet50", weights=pretrain_run["run_dir"], image_size=32)


def _copied_config(run: str, target: Path, **pretraining) -> Path:
    target.mkdir()
    config = json.loads((Path(run) / "config.json").read_text())
    config["pretraining"].update(pretraining)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_a_text_pretraining_run_is_not_image_weights(pretrain_run, tmp_path):
    text_run = _copied_config(
        pretrain_run["run_dir"],
        tmp_path / "mlm",
        objective="masked_lm",
        modality="text",
        output="preset",
    )
    (text_run / "preset").mkdir()
    with pytest.raises(WeightsError, match="pretraining run of a text backbone.*takes images"):
        tfxfer.build_backbone(pretrain_run["name"], weights=str(text_run), image_size=32)


def test_an_unfinished_pretraining_run_has_no_backbone(pretrain_run, tmp_path):
    unfinished = _copied_config(pretrain_run["run_dir"], tmp_path / "unfinished")
    with pytest.raises(WeightsError, match="no backbone.weights.h5.*has not finished.*--resume"):
        tfxfer.build_backbone(pretrain_run["name"], weights=str(unfinished), image_size=32)


class _SigtermAt(keras.callbacks.Callback):
    """Sends this process SIGTERM (a preemption notice) at the end of one step of one epoch."""

    def __init__(self, epoch: int, step: int):
        super().__init__()
        self.epoch, self.step, self.current = epoch, step, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.step):
            os.kill(os.getpid(), signal.SIGTERM)


def _flags(config: Config) -> list[str]:
    argv = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


# On the tiny row only: stopping and resuming mid-epoch is the same checkpoint and view
# replay whatever the network (MobileNetV3's case was a third SimCLR run, 26 s alone, that checked
# nothing more). The real network's run is still checked by the tests above and below.
@pytest.mark.parametrize("_pretrain_run", ["tinynet"], indirect=True)
def test_a_run_stopped_mid_epoch_resumes_from_the_command_line_to_the_same_weights(
    pretrain_run, data_root, tmp_path, monkeypatch
):
    import tfxfer.pretrain.skeleton as skeleton

    run_schedule = skeleton.run_schedule

    def with_notice(*args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _SigtermAt(epoch=1, step=0)]
        return run_schedule(*args, **kwargs)

    config = dataclasses.replace(
        _config(data_root, backbone=pretrain_run["name"]), output_dir=str(tmp_path / "run")
    )
    monkeypatch.setattr(skeleton, "run_schedule", with_notice)
    with pytest.raises(Preempted):
        main(config)
    monkeypatch.setattr(skeleton, "run_schedule", run_schedule)
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["checkpoint"] == "epoch-000001-step-000001", latest  # epoch 2, after step 1

    argv = _flags(dataclasses.replace(config, resume=True))
    assert command_line(main, Config, argv=argv) == 0
    resumed = _h5_arrays(str(tmp_path / "run" / WEIGHTS_FILE))
    straight = _h5_arrays(pretrain_run["output"])
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_recipe_reads_its_inputs_and_not_its_output(tmp_path):
    config = Config.smoke(
        data_dir=str(tmp_path / "a"), probe_dir=str(tmp_path / "b"), weights=str(tmp_path / "w")
    )
    assert config.input_paths() == [str(tmp_path / p) for p in ("a", "b", "w")]
    assert Config.smoke().input_paths() == []


@pytest.mark.large
def test_contrastive_pretraining_runs_under_mirrored_strategy_in_bfloat16(tmp_path, tiny_backbones):
    import multiworker_helpers as mh

    # The tiny row (Conv2D + BatchNormalization, whose statistics stay float32 in a bfloat16
    # model): the strategy and the precision are checked here, not the network; MobileNetV3's
    # SimCLR run is `_pretrain_run`'s large case (alone: 34 s on MobileNetV3, 11 s tiny).
    mh.run_pretraining_under_mirrored("contrastive", tmp_path, "--backbone", "tinynet")
    run = tmp_path / "run"
    backbone = tfxfer.build_backbone("tinynet", weights=str(run), image_size=32)
    assert backbone.info["weights"] == str(run)
