"""A new recipe is a config, a data builder and a model builder: `tfxfer.recipe.run` does the rest.

The recipe below is written the way the next recipes (fusion, pretraining) will be: its own
fields on `RecipeConfig`, `build_data`, `build_model`, and `main` calling `run`. It trains a
tiny backbone on the shapes folder in seconds, so everything the skeleton promises (checks
before any write, the run directory, val and test metrics, a config.json that is the config
plus facts, flags and help from the fields) is tested without a recipe's real backbone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import ClassVar

import keras
import numpy as np
import pytest
from helpers import tiny_backbone

import tfxfer
from tfxfer.errors import TfxferError
from tfxfer.recipe import RecipeConfig, command_line, run


@dataclass
class TinyConfig(RecipeConfig):
    """Train the tiny test backbone on an image folder."""

    data_dir: str = ""  # one subfolder per class
    width_seed: int = 0  # seeds the tiny backbone's initial weights
    backbone: str = "tiny"

    SMOKE: ClassVar[dict] = {"dropout": 0.0}


def build_data(config: TinyConfig) -> tfxfer.LabelledData:
    return tfxfer.load_images(
        config.data_dir,
        test_directory=config.data_dir,
        val_split=config.val_split,
        seed=config.seed,
    )


def build_model(config: TinyConfig, data: tfxfer.LabelledData):
    backbone = tiny_backbone(seed=config.width_seed)
    head = tfxfer.HeadConfig(pooling=config.pooling, dropout=config.dropout)
    return backbone, tfxfer.build_model(backbone, len(data.class_names), head=head)


def main(config: TinyConfig) -> dict:
    return run(config, build_data, build_model)


@pytest.fixture(scope="module")
def tiny_run(shapes_dir, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("skeleton") / "run")
    config = TinyConfig.smoke(data_dir=shapes_dir, output_dir=output, val_split=0.5, unfreeze="1")
    return config, main(config)


def test_a_recipe_of_three_functions_leaves_a_complete_run(tiny_run):
    config, result = tiny_run
    files = set(os.listdir(result["run_dir"]))
    assert {
        "config.json",
        "class_names.json",
        "history.csv",
        "metrics.json",
        "best.json",
        "checkpoints",
        "model.keras",
        "training_curves.png",
        "confusion_matrix.png",
        "per_class.csv",
        "top_losses.csv",
        "tensorboard",
    } <= files
    assert "export" not in files  # smoke(): export=False
    assert set(result["metrics"]) == {"val", "test", "selection"}
    assert result["metrics"]["selection"]["kept"] in ("probe", "finetuned")
    assert result["metrics"]["test"]["num_examples"] == 18
    assert [row["stage"] for row in result["history"]] == ["head", "finetune"]
    # unfreeze=1 trained the top group only, as the backbone counts its groups: the lower
    # groups still hold their initial weights, the top one moved.
    assert result["backbone"].group_names == ["low", "mid", "top"]
    initial = tiny_backbone(seed=config.width_seed).network
    trained = result["backbone"].network
    for name, moved in (("low_conv", False), ("mid_conv", False), ("top_conv", True)):
        same = np.array_equal(
            initial.get_layer(name).kernel.numpy(), trained.get_layer(name).kernel.numpy()
        )
        assert same != moved, name


def test_config_json_is_the_config_plus_what_the_run_found(tiny_run):
    config, result = tiny_run
    with open(os.path.join(result["run_dir"], "config.json"), encoding="utf-8") as handle:
        written = json.load(handle)
    # Every field, as resolved, so the run can be read back as a config.
    fields = {k: v for k, v in written.items() if k in TinyConfig.__dataclass_fields__}
    assert TinyConfig(**fields) == config
    assert written["data"]["kind"] == "image" and written["data"]["test_examples"] == 18
    assert written["backbone_info"]["groups"] == ["low", "mid", "top"]
    assert written["backbone_info"]["pooling"] == "avg"  # the backbone's default
    assert written["distribution"]["global_batch_size"] == 8


def test_a_bad_value_is_refused_before_anything_is_written(shapes_dir, tmp_path):
    output = tmp_path / "run"
    config = TinyConfig.smoke(data_dir=shapes_dir, output_dir=str(output), unfreeze="7")
    with pytest.raises(TfxferError, match=r"Invalid stage 'finetune'.*train=7 top groups"):
        main(config)
    assert not output.exists()
    with pytest.raises(
        TfxferError, match=r"learning_rate=0 \(expected a finite number > 0, or auto"
    ):
        main(TinyConfig.smoke(data_dir=shapes_dir, output_dir=str(output), head_learning_rate=0))
    assert not output.exists()


def test_flags_and_help_come_from_the_new_recipes_fields(capsys):
    config = TinyConfig.from_flags(["--data-dir", "photos", "--width-seed", "4", "--no-export"])
    assert (config.data_dir, config.width_seed, config.export) == ("photos", 4, False)
    with pytest.raises(SystemExit):
        TinyConfig.from_flags(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--width-seed WIDTH_SEED seeds the tiny backbone's initial weights (default: 0)" in text
    assert "Train the tiny test backbone on an image folder." in text


def test_command_line_turns_a_bad_folder_into_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    argv = ["--data-dir", missing, "--output-dir", str(tmp_path / "run"), "--verbose", "0"]
    assert command_line(main, TinyConfig, argv=argv) == 2
    assert capsys.readouterr().err.startswith("tfxfer: error: Data directory not found")


def test_a_run_gives_back_the_callers_dtype_policy(shapes_dir, tmp_path):
    # "mixed_bfloat16" for the run's model, whatever "auto" would pick on this machine.
    keras.config.set_dtype_policy("float32")
    config = TinyConfig.smoke(
        data_dir=shapes_dir,
        output_dir=str(tmp_path / "run"),
        val_split=0.5,
        mixed_precision="mixed_bfloat16",
    )
    result = main(config)
    assert result["model"].get_layer("predictions").dtype_policy.name == "float32"
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in result["model"].layers)
    assert keras.config.dtype_policy().name == "float32"


def test_a_split_too_small_to_share_over_the_replicas_is_named_before_training():
    from tfxfer.data.examples import Examples
    from tfxfer.recipe import uneven_first_batch

    def split(n):
        return Examples([f"t{i}" for i in range(n)], [i % 2 for i in range(n)], ["a", "b"], "text")

    # 3 validation examples, a global batch of 8 on 2 replicas: shares of 2 and 1.
    message = uneven_first_batch("val", split(3), 8, 2)
    assert "val split has 3 examples" in message and "--batch-size of at most 1" in message
    # One replica, an even share, or a first batch that is full are all fine.
    assert uneven_first_batch("val", split(3), 8, 1) is None
    assert uneven_first_batch("val", split(4), 8, 2) is None
    assert uneven_first_batch("train", split(15), 8, 2) is None
    assert uneven_first_batch("val", None, 8, 2) is None


def test_a_run_with_nothing_to_evaluate_says_so(shapes_dir, tmp_path, caplog):
    def without_held_out_data(config: TinyConfig) -> tfxfer.LabelledData:
        return tfxfer.load_images(config.data_dir, val_split=0.0, seed=config.seed)

    config = TinyConfig.smoke(data_dir=shapes_dir, output_dir=str(tmp_path / "run"), val_split=0.0)
    with caplog.at_level("WARNING", logger="tfxfer.recipe.finish"):
        result = run(config, without_held_out_data, build_model)
    assert "Nothing was evaluated" in caplog.text and "--val-split above 0" in caplog.text
    with open(os.path.join(result["run_dir"], "metrics.json"), encoding="utf-8") as handle:
        written = json.load(handle)
    assert not {"val", "test"} & set(written)


@pytest.mark.large  # a run, a failed run and a resume, ~7 s
def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_resumes(
    shapes_dir, tmp_path, monkeypatch, capsys
):
    import errno

    from tfxfer.boundary import error_boundary
    from tfxfer.train import checkpoints

    real_save, saved = checkpoints._save_arrays, []

    def fills_the_disk(path, variables):
        # The second checkpoint's first array: a write fails as a full disk fails it.
        saved.append(path)
        if len([p for p in saved if p.endswith("model.npz")]) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, variables)

    config = TinyConfig.smoke(
        data_dir=shapes_dir, output_dir=str(tmp_path / "run"), val_split=0.5, finetune_epochs=2
    )
    monkeypatch.setattr(checkpoints, "_save_arrays", fills_the_disk)
    assert error_boundary(lambda: main(config)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("tfxfer: error: No space left on")
    assert "--resume" in error
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["checkpoint"] == "epoch-000001"

    monkeypatch.setattr(checkpoints, "_save_arrays", real_save)  # space freed
    resumed = main(dataclasses.replace(config, resume=True))
    assert resumed["result"].resumed_from_epoch == 1
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
