"""The ResNet50 recipe end to end on a tiny shapes folder, and what it does with bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import REPO_ROOT, snapshot_files, write_image, write_image_folder

import tfxfer
from recipes import resnet50_image_classifier as recipe
from tfxfer.cli import main as tfxfer_command
from tfxfer.errors import DataError, RunDirError, TfxferError
from tfxfer.rundir import RUN_MARKERS

# The image recipe end to end at 32 px: `image_recipe_run` (conftest.py) is the tiny row's
# run in the default tier and ResNet50's in the large one.


def _raw_images(height=45, width=37, n=4, seed=0):
    """Raw uint8 images of a size other than the model's image_size (32)."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3)).astype("uint8")


# === A smoke run ===


def test_run_directory_holds_everything(image_recipe_run):
    run_dir = image_recipe_run["run_dir"]
    for name in (
        "config.json",
        "history.csv",
        "metrics.json",
        "class_names.json",
        "model.keras",
        "checkpoints/best.weights.h5",
        "checkpoints/latest.json",
        "export/saved_model.pb",
    ):
        assert os.path.exists(os.path.join(run_dir, name)), name

    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    expected = image_recipe_run["expected"]
    assert config["backbone"] == image_recipe_run["config"].backbone and config["image_size"] == 32
    assert config["data"]["classes"] == ["circle", "square", "triangle"]
    assert config["data"]["train_examples"] + config["data"]["val_examples"] == 18
    assert config["data"]["test_examples"] == 18  # --test-dir: the shapes folder again
    assert config["backbone_info"]["groups"] == expected["groups"]

    with open(os.path.join(run_dir, "class_names.json"), encoding="utf-8") as handle:
        assert json.load(handle) == ["circle", "square", "triangle"]

    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert metrics.pop("selection")["kept"] in ("probe", "finetuned")  # keep_better
    assert set(metrics) == {"val", "test"}
    assert metrics["test"]["num_examples"] == 18
    val = metrics["val"]
    assert {"accuracy", "loss", "macro_f1", "per_class", "num_examples"} <= set(val)
    assert 0.0 <= val["accuracy"] <= 1.0 and 0.0 <= val["macro_f1"] <= 1.0
    assert val["num_examples"] == config["data"]["val_examples"]
    assert val == image_recipe_run["metrics"]["val"]

    with open(os.path.join(run_dir, "history.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["epoch"]), r["stage"]) for r in rows] == [(1, "head"), (2, "finetune")]
    assert [r["stage"] for r in image_recipe_run["history"]] == ["head", "finetune"]


def test_saved_model_reloads_and_predicts_identically_on_raw_images(image_recipe_run):
    model = image_recipe_run["model"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = tfxfer.load_model(os.path.join(image_recipe_run["run_dir"], "model.keras"))
    assert not [w for w in caught if "build()" in str(w.message)], "a layer reloads unbuilt"
    images = _raw_images()
    expected = model.predict(images, verbose=0)
    assert expected.shape == (4, 3)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-6)
    # Another size again, through a plain call: any size goes in.
    other = _raw_images(64, 50, n=2, seed=1)
    np.testing.assert_allclose(
        np.asarray(loaded(other, training=False)),
        np.asarray(model(other, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_export_serves_raw_uint8_images(image_recipe_run):
    exported = tf.saved_model.load(os.path.join(image_recipe_run["run_dir"], "export"))
    images = _raw_images(50, 41)
    served = np.asarray(exported.serve(tf.constant(images)))
    np.testing.assert_allclose(
        served, image_recipe_run["model"].predict(images, verbose=0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(served.sum(-1), 1.0, rtol=1e-5)


def test_random_backbone_batchnorm_statistics_come_from_the_data(image_recipe_run):
    # Random weights start every moving mean at 0 and variance at 1, whatever the data. The
    # smoke run trains its head by gradient steps (head_epochs=1), which the initial
    # statistics' tiny features would stall, so the run recomputes them from the training
    # images and its stages that train the backbone update them (batchnorm.json says so;
    # tests/test_random_start.py has the solved head's choice).
    with open(os.path.join(image_recipe_run["run_dir"], "batchnorm.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert record["mode"] == "auto" and record["start"] == "recomputed", record
    assert "gradient steps" in record["reason"]
    backbone = image_recipe_run["backbone"]
    batchnorms = [
        layer
        for group in backbone.layer_groups.values()
        for layer in group
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(batchnorms) == image_recipe_run["expected"]["batchnorms"]
    for layer in batchnorms:
        mean, variance = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
        assert np.all(np.isfinite(mean)) and np.all(variance > 0), layer.name
        assert not np.allclose(variance, 1.0), layer.name


def test_best_checkpoint_loads_into_the_recipe_model(image_recipe_run, tmp_path):
    config = image_recipe_run["config"]
    _, model = recipe.build_model(config, recipe.build_data(config))
    model.load_weights(os.path.join(image_recipe_run["run_dir"], "checkpoints", "best.weights.h5"))
    assert model.predict(_raw_images(n=1), verbose=0).shape == (1, 3)


def test_the_recipe_builds_a_tf_hub_backbone(shapes_dir, tmp_path):
    from hub_helpers import ImageFeatures

    handle = str(tmp_path / "hub_image")
    tf.saved_model.save(ImageFeatures(), handle)
    config = _smoke(
        shapes_dir,
        str(tmp_path / "run"),
        backbone=f"hub:{handle}",
        weights="imagenet",
        image_size=16,
    )
    backbone, model = recipe.build_model(config, recipe.build_data(config))
    assert backbone.group_names == ["hub"]
    assert model.predict(_raw_images(n=2), verbose=0).shape == (2, 3)


# === Bad input ===


def _smoke(data_dir, output_dir, **changes):
    return recipe.Config.smoke(data_dir=data_dir, output_dir=output_dir, **changes)


def test_missing_data_dir(tmp_path):
    missing = str(tmp_path / "no_such_photos")
    with pytest.raises(DataError, match="Data directory not found") as info:
        recipe.main(_smoke(missing, str(tmp_path / "run")))
    assert missing in str(info.value)
    assert not os.path.exists(tmp_path / "run")


def test_one_class(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), {"only": 3})
    with pytest.raises(DataError, match="only one class"):
        recipe.main(_smoke(data, str(tmp_path / "run")))
    assert not os.path.exists(tmp_path / "run")


def test_output_dir_holding_a_run_is_left_unchanged(tmp_path, shapes_dir):
    output = tmp_path / "run"
    (output / "checkpoints").mkdir(parents=True)
    (output / "config.json").write_text('{"earlier": true}')
    (output / "model.keras").write_bytes(b"an earlier model")
    before = snapshot_files(str(output))
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--overwrite"):
        recipe.main(_smoke(shapes_dir, str(output)))
    assert snapshot_files(str(output)) == before


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"backbone": "resnet5O"}, r"Unknown backbone 'resnet5O'.*resnet50"),
        ({"image_size": 16}, r"image_size=16 is too small for resnet50"),
        ({"weights": "/no/such/weights_notop.h5"}, "Weights file not found"),
        ({"pooling": "mean"}, r"Expected `pooling` to be one of"),
        ({"unfreeze": "9"}, r"Invalid stage 'finetune'.*train=9 top groups"),
    ],
    ids=["unknown_backbone", "image_too_small", "missing_weights", "bad_pooling", "bad_unfreeze"],
)
def test_bad_settings_are_clear_errors_and_leave_no_run_behind(
    tmp_path, shapes_dir, changes, match
):
    output = tmp_path / "run"
    with pytest.raises(TfxferError, match=match):
        recipe.main(_smoke(shapes_dir, str(output), **changes))
    # Fixing the typo and running again must not need --overwrite.
    left = [name for name in RUN_MARKERS if os.path.exists(output / name)]
    assert not left, f"a failed start left {left} behind"


@pytest.mark.large  # a child interpreter pays TensorFlow's import, ~6 s
def test_command_line_bad_input_exits_2_with_one_message(tmp_path):
    missing = str(tmp_path / "missing_photos")
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": REPO_ROOT,
    }
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.resnet50_image_classifier",
            "--data-dir",
            missing,
            "--output-dir",
            str(tmp_path / "run"),
            "--weights",
            "none",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 2, process.stderr
    assert f"tfxfer: error: Data directory not found: {missing!r}" in process.stderr
    assert "Traceback" not in process.stderr + process.stdout


# === The `tfxfer predict` command on the run (here, so the run is made once per worker) ===


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_predict_on_a_saved_run(image_recipe_run, tmp_path, capsys):

    run_dir = image_recipe_run["run_dir"]
    paths = [
        write_image(str(tmp_path / "a.png"), 40, 52, seed=1),
        write_image(str(tmp_path / "b.jpg"), 33, 33, seed=2),
    ]
    status = tfxfer_command(
        [
            "predict",
            "--json",
            "--model",
            os.path.join(run_dir, "model.keras"),
            "--class-names",
            os.path.join(run_dir, "class_names.json"),
            "--images",
            *paths,
        ]
    )
    assert status == 0
    predictions = _json_lines(capsys.readouterr().out)
    assert [p["input"] for p in predictions] == paths

    class_names = image_recipe_run["class_names"]
    from tfxfer.data.images import decode_and_resize

    size = image_recipe_run["config"].image_size
    for prediction, path in zip(predictions, paths, strict=True):
        # Decoded and resized as training read the images (TensorFlow's decoder; PIL's
        # rounds differently), then the model.
        image = decode_and_resize(path, size).numpy()[None]
        probabilities = image_recipe_run["model"].predict(image, verbose=0)[0]
        assert prediction["label"] == class_names[int(probabilities.argmax())]
        assert prediction["probability"] == pytest.approx(float(probabilities.max()), rel=1e-4)


def test_predict_without_class_names_prints_the_index(image_recipe_run, tmp_path, capsys):
    import shutil

    path = write_image(str(tmp_path / "c.png"), 32, 32)
    # A model.keras alone, without the class_names.json a run keeps beside it.
    model_path = shutil.copy(
        os.path.join(image_recipe_run["run_dir"], "model.keras"), str(tmp_path / "model.keras")
    )
    assert tfxfer_command(["predict", "--json", "--model", model_path, "--images", path]) == 0
    (prediction,) = _json_lines(capsys.readouterr().out)
    assert prediction["label"] in (0, 1, 2)
