"""A finished run as the next run's backbone: `--weights runs/a/` (images), `--backbone runs/a/`
(text). Its trained network comes along, its head stays behind, and a mismatch is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import register_tiny_backbones, write_image_folder

import tfxfer
from tfxfer.errors import TfxferError, WeightsError


# The image run's backbone: the tiny row in the default tier, MobileNetV3 in the large one.
@pytest.fixture(
    scope="module", params=["tinynet", pytest.param("mobilenetv3small", marks=pytest.mark.large)]
)
def _image_run(request, tmp_path_factory):
    from recipes.resnet50_image_classifier import Config, main

    root = tmp_path_factory.mktemp("image")
    # unfreeze="1": stage 2 still trains the network the next run takes (its top group, so
    # the weights compared below are trained ones, not a seed's), and MobileNetV3 skips
    # tracing its whole backward pass (setup 24.5 -> 12.7 s, then 22.9 -> 18.9 s, two cores).
    data = write_image_folder(str(root / "data"), {"a": 5, "b": 5}, size=32)
    with pytest.MonkeyPatch.context() as monkeypatch:
        register_tiny_backbones(monkeypatch)
        result = main(
            Config.smoke(
                data_dir=data, output_dir=str(root / "run"), backbone=request.param, unfreeze="1"
            )
        )
    return result, data


@pytest.fixture
def image_run(_image_run, tiny_backbones):
    """A finished image run (read-only) and its data folder."""
    return _image_run


def _name(image_run) -> str:
    """The image run's backbone, as its config.json records it."""
    return json.loads((Path(image_run[0]["run_dir"]) / "config.json").read_text())["backbone"]


def _network(model):
    return next(layer for layer in model.layers if layer.__class__.__name__ == "Functional")


def test_an_image_run_gives_its_trained_network_to_the_next_run(image_run):
    result, data = image_run
    backbone = tfxfer.build_backbone(_name(image_run), weights=result["run_dir"], image_size=48)
    trained = _network(result["model"])
    for layer in (layer for layer in backbone.network.layers if layer.weights):
        for mine, theirs in zip(layer.weights, trained.get_layer(layer.name).weights, strict=True):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
    assert backbone.info["weights"] == result["run_dir"]
    assert backbone.info["image_size"] == 48  # the new run's size; the weights do not care


def test_the_image_recipe_reads_an_earlier_run_and_never_writes_into_it(image_run, tmp_path):
    from recipes.resnet50_image_classifier import Config, main

    result, data = image_run
    config = Config.smoke(
        data_dir=data, output_dir=str(Path(result["run_dir"]) / "b"), backbone=_name(image_run),
        weights=result["run_dir"],
    )  # fmt: skip
    assert result["run_dir"] in config.input_paths()
    # An output inside run A (the input) is refused before anything is written.
    with pytest.raises(TfxferError, match="lies inside the input path"):
        main(config)
    assert not (Path(result["run_dir"]) / "b").exists()


def test_an_image_run_of_another_architecture_is_named(image_run):
    result, _ = image_run
    with pytest.raises(
        WeightsError, match=f"holds a '{_name(image_run)}' backbone, not 'resnet50'"
    ):
        tfxfer.build_backbone("resnet50", weights=result["run_dir"], image_size=32)


def test_a_run_that_has_not_finished_has_no_backbone(image_run, tmp_path):
    result, _ = image_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(Path(result["run_dir"]) / "config.json", unfinished / "config.json")
    with pytest.raises(WeightsError, match="no model.keras, so no backbone in it.*--resume"):
        tfxfer.build_backbone(_name(image_run), weights=str(unfinished), image_size=32)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="not a tfxfer run .*no backbone in it"):
        tfxfer.build_backbone("mobilenetv3small", weights=str(tmp_path), image_size=32)


def test_a_fusion_run_is_refused_with_its_backbones(image_run, tmp_path):
    result, _ = image_run
    fused = tmp_path / "fused"
    shutil.copytree(result["run_dir"], fused)
    config = json.loads((fused / "config.json").read_text())
    name = _name(image_run)
    config["backbone_info"] = {"backbones": [{"name": "resnet50"}, {"name": name}]}
    (fused / "config.json").write_text(json.dumps(config))
    with pytest.raises(TfxferError, match=rf"fusion run over \['resnet50', '{name}'\]"):
        tfxfer.build_backbone(name, weights=str(fused), image_size=32)


# === Text ===


@pytest.fixture(scope="module")
def text_run(text_recipe_run):
    """conftest.py's finished tiny text run (read-only)."""
    return text_recipe_run


def test_a_text_run_gives_its_fine_tuned_bert_and_tokenizer_to_the_next_task(text_run, tmp_path):
    from recipes.bert_text_classifier import Config, main

    backbone = tfxfer.build_backbone(text_run["run_dir"], sequence_length=16)
    trained = text_run["backbone"].network
    for mine, theirs in zip(backbone.network.weights, trained.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
    vocabulary = text_run["backbone"].preprocessor.tokenizer.get_vocabulary()
    assert backbone.preprocessor.tokenizer.get_vocabulary() == vocabulary
    assert backbone.info["kind"] == "tfxfer_run"
    # Task B: other labels, from task A's backbone.
    rows = [("good acting", "yes"), ("boring film", "no"), ("fun plot", "yes")] * 6
    train = tmp_path / "b.csv"
    train.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    second = main(
        Config.smoke(train=str(train), backbone=text_run["run_dir"], output_dir=str(tmp_path / "b"))
    )
    assert second["class_names"] == ["no", "yes"]


def test_untrained_from_a_text_run_is_its_architecture_at_random(text_run):
    backbone = tfxfer.build_backbone(text_run["run_dir"], sequence_length=16, weights=False)
    trained = text_run["backbone"].network
    assert [w.shape for w in backbone.network.weights] == [w.shape for w in trained.weights]
    assert not np.array_equal(backbone.network.weights[0].numpy(), trained.weights[0].numpy())


def test_a_text_run_is_not_an_image_backbone_and_back(text_run, image_run):
    with pytest.raises(WeightsError, match="holds a text backbone.*takes images"):
        tfxfer.build_backbone(_name(image_run), weights=text_run["run_dir"], image_size=32)
    with pytest.raises(WeightsError, match="holds an image backbone .*not a BERT one"):
        tfxfer.build_backbone(image_run[0]["run_dir"], sequence_length=16)
