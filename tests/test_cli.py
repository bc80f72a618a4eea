"""The `tfxfer` command and the flag plumbing every recipe shares."""

from __future__ import annotations

import dataclasses
import errno
import json

import numpy as np
import pytest

from recipes import resnet50_image_classifier as recipe
from tfxfer import cli, report, runs
from tfxfer.errors import DataError, TfxferError
from tfxfer.flags import field_comments
from tfxfer.recipe import command_line


def test_backbones_lists_the_image_table(capsys):
    assert cli.main(["backbones"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "resnet50" in listed["image"] and "mobilenetv3small" in listed["image"]
    assert listed["image"] == sorted(listed["image"])
    assert "text" in listed


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


def _raise(error):
    def action():
        raise error

    return action


def test_an_unreachable_url_and_a_full_disk_are_the_users_errors(capsys):
    import errno

    import tensorflow as tf

    offline = tf.errors.FailedPreconditionError(
        None,
        None,
        "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve "
        "hostname', error details: Could not resolve host: www.googleapis.com\nmore",
    )
    assert cli.error_boundary(_raise(offline)) == 2
    assert capsys.readouterr().err.startswith(
        "tfxfer: error: Cannot reach the storage a path names (Could not resolve host: "
        "www.googleapis.com more)."
    )
    for full in (
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.ENOSPC, "No space left on device", "preds.csv"),
        tf.errors.ResourceExhaustedError(None, None, "write failed: No space left on device"),
    ):
        assert cli.error_boundary(_raise(full)) == 2
        err = capsys.readouterr().err
        assert err.startswith("tfxfer: error: No space left on the device"), err
        assert ("'preds.csv'" in err) == (getattr(full, "filename", None) is not None)


def test_error_boundary_turns_tfxfer_errors_into_exit_2(capsys):
    assert cli.error_boundary(_raise(DataError("Data directory not found: 'photos/'."))) == 2
    captured = capsys.readouterr()
    assert captured.err == "tfxfer: error: Data directory not found: 'photos/'.\n"
    assert cli.error_boundary(lambda: None) == 0
    # A message that spans lines is still one line.
    assert cli.error_boundary(_raise(TfxferError("Bad config:\n  batch_size=0\n"))) == 2
    assert capsys.readouterr().err == "tfxfer: error: Bad config: batch_size=0\n"


def test_an_unexpected_error_is_one_line_and_exit_1_unless_debug(capsys):
    buggy = _raise(KeyError("a bug in tfxfer"))
    assert cli.error_boundary(buggy) == 1
    assert capsys.readouterr().err == (
        "tfxfer: internal error: KeyError: 'a bug in tfxfer' (run with --debug for the traceback)\n"
    )
    with pytest.raises(KeyError):
        cli.error_boundary(buggy, debug=True)
    # TensorFlow's messages go on for pages; the first line names the problem.
    assert cli.error_boundary(_raise(RuntimeError("first line\n  graph\n  frames"))) == 1
    assert "RuntimeError: first line (run with --debug" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error,fragment",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/run"), "permission denied"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/run"), "is a file"),
        (OSError(errno.EROFS, "Read-only file system", "/data/run"), "read-only"),
    ],
)
def test_errors_of_the_users_machine_are_one_line_and_exit_2(error, fragment, capsys):
    assert cli.error_boundary(_raise(error)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tfxfer: error: Cannot use {error.filename!r}: ") and fragment in err
    assert err.count("\n") == 1


def test_running_out_of_memory_says_what_to_lower(capsys):
    import tensorflow as tf

    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor\n[[node]]")
    for error in (oom, MemoryError()):
        assert cli.error_boundary(_raise(error)) == 2
        err = capsys.readouterr().err
        assert err.startswith("tfxfer: error: Ran out of memory") and err.count("\n") == 1
        assert "--batch-size" in err and "--image-size" in err


def test_debug_is_a_flag_of_the_command_before_or_after_the_subcommand(monkeypatch, capsys):
    def buggy(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_backbones", buggy)
    assert cli.main(["backbones"]) == 1
    assert "internal error: RuntimeError: a bug" in capsys.readouterr().err
    for argv in (["--debug", "backbones"], ["backbones", "--debug"]):
        with pytest.raises(RuntimeError):
            cli.main(argv)


def test_debug_is_a_flag_of_every_recipe_but_no_config_field(capsys):
    assert recipe.Config.from_flags(["--debug"]) == recipe.Config()
    assert "debug" not in {f.name for f in dataclasses.fields(recipe.Config)}

    def main(config):
        raise KeyError("a bug")

    assert command_line(main, recipe.Config, argv=[]) == 1
    assert "internal error: KeyError" in capsys.readouterr().err
    with pytest.raises(KeyError):
        command_line(main, recipe.Config, argv=["--debug"])
    with pytest.raises(SystemExit):
        recipe.Config.from_flags(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_library_calls_still_raise():
    # Only the command line has a boundary: Python callers get the exception itself.
    with pytest.raises(TfxferError, match="batch_size=0"):
        recipe.main(recipe.Config(batch_size=0))


def test_class_names_must_be_a_list_that_fits_the_model(tmp_path):
    names = tmp_path / "class_names.json"
    with pytest.raises(TfxferError, match="Class names not found"):
        runs.read_class_names(str(names), 2)
    names.write_text('{"0": "cat"}')
    with pytest.raises(TfxferError, match="not a list of names"):
        runs.read_class_names(str(names), 2)
    names.write_text('["cat", "dog", "eel"]')
    with pytest.raises(TfxferError, match="has 3 name"):
        runs.read_class_names(str(names), 2)
    assert runs.read_class_names(str(names), 3) == ["cat", "dog", "eel"]


# === The metrics `evaluate` prints and a run writes ===


def test_macro_f1_averages_over_the_classes_the_split_has():
    # A perfect prediction of a test set without class 2 scores 1, not 2/3.
    labels = np.array([0, 0, 1, 1])
    probabilities = np.eye(3)[labels] * 0.9 + 0.1 / 3
    metrics = report.classification_metrics(labels, probabilities, ["a", "b", "c"])
    assert metrics["macro_f1"] == pytest.approx(1.0)
    assert metrics["per_class"]["c"]["support"] == 0
    # A class that is only predicted counts: predicting it wrongly costs.
    probabilities[0] = [0.1, 0.1, 0.8]
    metrics = report.classification_metrics(labels, probabilities, ["a", "b", "c"])
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # Multi-label: a label absent from truth and predictions is left out too.
    truth = np.array([[1, 0, 0], [0, 1, 0]])
    metrics = report.classification_metrics(
        truth, truth * 0.9 + 0.05, ["a", "b", "c"], multi_label=True
    )
    assert metrics["macro_f1"] == pytest.approx(1.0)


def test_metrics_of_a_model_that_outputs_nan_are_valid_json():
    probabilities = np.full((2, 2), np.nan)
    metrics = report.classification_metrics(np.array([0, 1]), probabilities, ["a", "b"])
    assert metrics["loss"] is None
    json.dumps(metrics, allow_nan=False)  # what a strict reader of metrics.json needs
    assert "loss=n/a" in report.summary_line("val", metrics)
    assert report.json_safe({"x": [float("inf"), np.float32(1.5)]}) == {"x": [None, 1.5]}


def test_command_line_runs_main_with_the_parsed_config(capsys):
    seen = []
    assert command_line(seen.append, recipe.Config, argv=["--seed", "3", "--overwrite"]) == 0
    assert (seen[0].seed, seen[0].overwrite) == (3, True)

    def main(config):
        raise DataError(f"Data directory not found: {config.data_dir!r}.")

    assert command_line(main, recipe.Config, argv=["--data-dir", "photos/"]) == 2
    assert capsys.readouterr().err == "tfxfer: error: Data directory not found: 'photos/'.\n"
