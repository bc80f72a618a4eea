"""The `tfxfer` command and the flag plumbing every recipe shares."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from helpers import write_image

from recipes import resnet50_image_classifier as recipe
from tfxfer import cli
from tfxfer.errors import DataError


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_backbones_lists_the_image_table(capsys):
    assert cli.main(["backbones"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "resnet50" in listed["image"] and "mobilenetv3small" in listed["image"]
    assert listed["image"] == sorted(listed["image"])
    assert "text" in listed


def test_predict_on_a_saved_run(image_recipe_run, tmp_path, capsys):
    import tensorflow as tf

    run_dir = image_recipe_run["run_dir"]
    paths = [write_image(str(tmp_path / "a.png"), 40, 52, seed=1),
             write_image(str(tmp_path / "b.jpg"), 33, 33, seed=2)]
    status = cli.main(["predict", "--model", os.path.join(run_dir, "model.keras"),
                       "--class-names", os.path.join(run_dir, "class_names.json"),
                       "--images", *paths])
    assert status == 0
    predictions = _json_lines(capsys.readouterr().out)
    assert [p["input"] for p in predictions] == paths

    class_names = image_recipe_run["class_names"]
    for prediction, path in zip(predictions, paths, strict=True):
        # TensorFlow's JPEG decoder, like the command's (PIL's rounds differently).
        image = tf.io.decode_image(tf.io.read_file(path), channels=3)[None]
        probabilities = image_recipe_run["model"].predict(image, verbose=0)[0]
        assert prediction["label"] == class_names[int(probabilities.argmax())]
        assert prediction["probability"] == pytest.approx(float(probabilities.max()), rel=1e-4)


def test_predict_without_class_names_prints_the_index(image_recipe_run, tmp_path, capsys):
    path = write_image(str(tmp_path / "c.png"), 32, 32)
    model_path = os.path.join(image_recipe_run["run_dir"], "model.keras")
    assert cli.main(["predict", "--model", model_path, "--images", path]) == 0
    (prediction,) = _json_lines(capsys.readouterr().out)
    assert prediction["label"] in (0, 1, 2)


def test_predict_with_a_missing_model_exits_2(tmp_path, capsys):
    missing = str(tmp_path / "nope.keras")
    assert cli.main(["predict", "--model", missing, "--images"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfxfer: error: Model file not found") and missing in err


def test_recipe_flags_come_from_its_config():
    config = recipe.parse_args([
        "--data-dir", "photos", "--image-size", "48", "--no-augment", "--hidden-units", "64,32",
        "--weights", "none", "--finetune-learning-rate", "3e-5", "--unfreeze", "2",
    ])
    assert isinstance(config, recipe.Config)
    assert (config.data_dir, config.image_size, config.augment) == ("photos", 48, False)
    assert config.hidden_units == [64, 32] and config.weights == "none"
    assert config.finetune_learning_rate == 3e-5 and config.unfreeze == "2"
    defaults = recipe.parse_args([])
    assert defaults == recipe.Config()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--image-size", "big"])


def test_run_recipe_turns_tfxfer_errors_into_exit_2(capsys):
    def main(config):
        raise DataError(f"Data directory not found: {config!r}.")

    assert cli.run_recipe(main, lambda: "photos/") == 2
    captured = capsys.readouterr()
    assert captured.err == "tfxfer: error: Data directory not found: 'photos/'.\n"
    assert cli.run_recipe(lambda config: None, lambda: "ok") == 0

    def buggy(config):
        raise KeyError("a bug in tfxfer keeps its traceback")

    with pytest.raises(KeyError):
        cli.run_recipe(buggy, lambda: None)


def test_cli_config_on_a_plain_parser():
    config = cli.cli_config(argparse.ArgumentParser(), recipe.Config,
                            ["--val-split", "0.5", "--overwrite", "--seed", "3"])
    assert (config.val_split, config.overwrite, config.seed) == (0.5, True, 3)
