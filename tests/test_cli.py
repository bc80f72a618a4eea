"""The `tfxfer` command and the flag plumbing every recipe shares."""

from __future__ import annotations

import json
import os

import pytest
from helpers import write_image

from recipes import resnet50_image_classifier as recipe
from tfxfer import cli
from tfxfer.errors import DataError
from tfxfer.recipe import command_line, field_comments


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_backbones_lists_the_image_table(capsys):
    assert cli.main(["backbones"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "resnet50" in listed["image"] and "mobilenetv3small" in listed["image"]
    assert listed["image"] == sorted(listed["image"])
    assert "text" in listed


@pytest.mark.slow
def test_predict_on_a_saved_run(image_recipe_run, tmp_path, capsys):
    import tensorflow as tf

    run_dir = image_recipe_run["run_dir"]
    paths = [
        write_image(str(tmp_path / "a.png"), 40, 52, seed=1),
        write_image(str(tmp_path / "b.jpg"), 33, 33, seed=2),
    ]
    status = cli.main(
        [
            "predict",
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
    for prediction, path in zip(predictions, paths, strict=True):
        # TensorFlow's JPEG decoder, like the command's (PIL's rounds differently).
        image = tf.io.decode_image(tf.io.read_file(path), channels=3)[None]
        probabilities = image_recipe_run["model"].predict(image, verbose=0)[0]
        assert prediction["label"] == class_names[int(probabilities.argmax())]
        assert prediction["probability"] == pytest.approx(float(probabilities.max()), rel=1e-4)


@pytest.mark.slow
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
    config = recipe.Config.from_flags(
        [
            "--data-dir",
            "photos",
            "--image-size",
            "48",
            "--no-augment",
            "--hidden-units",
            "64,32",
            "--weights",
            "none",
            "--finetune-learning-rate",
            "3e-5",
            "--unfreeze",
            "2",
            "--test-dir",
            "photos_test",
            "--layerwise-lr-decay",
            "0.7",
        ]
    )
    assert isinstance(config, recipe.Config)
    assert (config.data_dir, config.image_size, config.augment) == ("photos", 48, False)
    # "none" is None for a field that may be None: here, random initialisation.
    assert config.hidden_units == [64, 32] and config.weights is None
    assert config.finetune_learning_rate == 3e-5 and config.unfreeze == "2"
    assert (config.test_dir, config.layerwise_lr_decay) == ("photos_test", 0.7)
    defaults = recipe.Config.from_flags([])
    assert defaults == recipe.Config()
    with pytest.raises(SystemExit):
        recipe.Config.from_flags(["--image-size", "big"])
    with pytest.raises(SystemExit):
        recipe.Config.from_flags(["--hidden-units", "64,wide"])


def test_help_shows_each_fields_comment_with_the_recipes_own_options_first(capsys):
    with pytest.raises(SystemExit):
        recipe.Config.from_flags(["--help"], recipe.__doc__)
    text = " ".join(capsys.readouterr().out.split())
    assert "one subfolder per class; None draws the demo shapes (default: None)" in text
    assert "per replica; the global batch is this times the replicas (default: 32)" in text
    assert "python -m recipes.resnet50_image_classifier --data-dir photos/" in text
    assert text.index("--data-dir") < text.index("--batch-size")  # recipe options first
    # A redeclared field keeps the base class's comment, with the recipe's default.
    from recipes.bert_text_classifier import Config as TextConfig

    with pytest.raises(SystemExit):
        TextConfig.from_flags(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "per replica; the global batch is this times the replicas (default: 16)" in text


def test_field_comments_read_the_class_bodies():
    comments = field_comments(recipe.Config)
    assert comments["augment"] == "flips, small rotations, zoom, contrast (training only)"
    assert comments["seed"].startswith("seeds the split")
    assert "text_column" not in comments


def test_error_boundary_turns_tfxfer_errors_into_exit_2(capsys):
    def fail():
        raise DataError("Data directory not found: 'photos/'.")

    assert cli.error_boundary(fail) == 2
    captured = capsys.readouterr()
    assert captured.err == "tfxfer: error: Data directory not found: 'photos/'.\n"
    assert cli.error_boundary(lambda: None) == 0

    def buggy():
        raise KeyError("a bug in tfxfer keeps its traceback")

    with pytest.raises(KeyError):
        cli.error_boundary(buggy)


def test_command_line_runs_main_with_the_parsed_config(capsys):
    seen = []
    assert command_line(seen.append, recipe.Config, argv=["--seed", "3", "--overwrite"]) == 0
    assert (seen[0].seed, seen[0].overwrite) == (3, True)

    def main(config):
        raise DataError(f"Data directory not found: {config.data_dir!r}.")

    assert command_line(main, recipe.Config, argv=["--data-dir", "photos/"]) == 2
    assert capsys.readouterr().err == "tfxfer: error: Data directory not found: 'photos/'.\n"
