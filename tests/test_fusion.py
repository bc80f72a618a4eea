"""Feature fusion: one model over several backbones, every fusion mode, and the recipes' flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from bert_helpers import VOCAB, write_hf_checkpoint
from helpers import (
    assert_reloads_alike,
    layer_weights,
    save_and_reload_alike,
    tiny_arrays,
    tiny_backbone,
    tiny_train_data,
    tiny_val_data,
    write_image_folder,
)

import tfxfer
from tfxfer.backbones import Backbone, split_into_groups
from tfxfer.backbones.base import LayerGroups
from tfxfer.backbones.vision import ImagePreprocessing
from tfxfer.errors import TfxferError
from tfxfer.fusion import FUSIONS, GatedFusion, build_fusion_model, fusion_summary

WIDE = 12  # the second tiny backbone's feature width (the first's is 8)


def wide_backbone(seed: int = 1) -> Backbone:
    """A second tiny image backbone: another size (24 px), another width, its own names."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="base_conv")(inputs)
    x = keras.layers.Conv2D(WIDE, 3, padding="same", activation="relu", name="head_conv")(x)
    network = keras.Model(inputs, x, name="wide_network")
    return Backbone(
        name="wide",
        network=network,
        preprocessor=ImagePreprocessing(24, "torch", name="image_preprocessing"),
        output_kind="spatial",
        input_kind="image",
        layer_groups=split_into_groups(network.layers, [("base", "base_"), ("top", "head_")]),
    )


def fused(fusion: str = "concat", **kwargs):
    backbones = [tiny_backbone(seed=0), wide_backbone()]
    keras.utils.set_random_seed(2)
    model = build_fusion_model(
        backbones, 3, fusion=fusion, head=tfxfer.HeadConfig(dropout=0.0), **kwargs
    )
    return backbones, model


def train(model, backbones, stages, n=18):
    images, labels = tiny_arrays(n=n)
    return tfxfer.run_schedule(
        model,
        backbones,
        stages,
        tiny_train_data(images, labels, batch_size=6),
        tiny_val_data(images, labels),
        verbose=0,
    )


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_mode_trains_saves_and_reloads_to_the_same_predictions(fusion, tmp_path):
    backbones, model = fused(fusion)
    train(
        model,
        backbones,
        [
            tfxfer.Stage("head", 2, learning_rate=1e-2),
            tfxfer.Stage("finetune", 1, train="all", learning_rate=1e-3),
        ],
    )
    images = tiny_arrays(n=5, seed=3)[0]
    predictions = model.predict(images, verbose=0)
    assert predictions.shape == (5, 3)
    np.testing.assert_allclose(predictions.sum(-1), 1.0, rtol=1e-5)
    reloaded = save_and_reload_alike(model, tmp_path / "fused.keras", images, atol=1e-6)
    assert fusion_summary(reloaded)["mode"] == fusion


@pytest.mark.parametrize("fusion", ["sum", "product", "gated", "attention"])
def test_element_wise_modes_project_unequal_widths_to_a_common_one(fusion):
    _, model = fused(fusion)
    layer = model.get_layer("fusion")
    assert layer.widths == [8, WIDE]
    assert layer.width == WIDE  # "auto": the largest, only because the widths differ
    assert [p.kernel.shape for p in layer.projections] == [(8, WIDE), (WIDE, WIDE)]
    assert model.get_layer("head_features").output.shape[-1] == 8 + WIDE
    assert model.get_layer("predictions").kernel.shape == (WIDE, 3)


def test_equal_widths_are_not_projected_and_concat_keeps_both_side_by_side():
    a, b = tiny_backbone(seed=0), tiny_backbone(seed=1)
    model = build_fusion_model([a, b], 3, fusion="sum")
    assert model.get_layer("fusion").projections == []
    _, concat = fused("concat")
    assert concat.get_layer("predictions").kernel.shape == (8 + WIDE, 3)


@pytest.mark.parametrize("fusion", ["sum", "product", "gated", "attention"])
def test_unequal_widths_without_a_projection_are_refused_with_the_widths(fusion):
    with pytest.raises(TfxferError, match=r"need one width.*\[8, 12\].*projection width"):
        fused(fusion, width=None)


def test_the_sum_is_the_sum_of_the_projected_parts():
    _, model = fused("sum")
    layer = model.get_layer("fusion")
    features = np.random.default_rng(0).normal(size=(4, 8 + WIDE)).astype("float32")
    a = features[:, :8] @ layer.projections[0].kernel.numpy()
    b = features[:, 8:] @ layer.projections[1].kernel.numpy()
    np.testing.assert_allclose(layer(features), a + b, rtol=1e-5, atol=1e-6)
    product = fused("product")[1].get_layer("fusion")
    a = features[:, :8] @ product.projections[0].kernel.numpy()
    b = features[:, 8:] @ product.projections[1].kernel.numpy()
    np.testing.assert_allclose(product(features), a * b, rtol=1e-5, atol=1e-6)


def test_gated_weights_start_equal_sum_to_one_and_are_readable_after_training():
    backbones, model = fused("gated")
    gate = model.get_layer("fusion")
    assert isinstance(gate, GatedFusion)
    assert gate.contributions() == pytest.approx([0.5, 0.5])
    train(model, backbones, [tfxfer.Stage("head", 4, learning_rate=5e-2)])
    weights = gate.contributions()
    assert sum(weights) == pytest.approx(1.0)
    assert abs(weights[0] - 0.5) > 1e-3  # learned, not left at the start
    assert fusion_summary(model)["contributions"] == pytest.approx(weights)


def test_groups_are_namespaced_and_a_stage_trains_only_the_branch_it_names():
    backbones, model = fused()
    groups = LayerGroups.of(backbones)
    assert groups.names == ["tiny/low", "tiny/mid", "tiny/top", "wide/base", "wide/top"]
    before = {b.name: layer_weights(b.network.layers) for b in backbones}
    train(
        model,
        backbones,
        [tfxfer.Stage("head", 1, learning_rate=1e-2), tfxfer.Stage("ft", 1, train=["wide/top"])],
    )
    after = {b.name: layer_weights(b.network.layers) for b in backbones}
    # BatchNorm moving statistics aside (frozen BN runs in inference mode: they stay too).
    for path, value in before["tiny"].items():
        np.testing.assert_array_equal(after["tiny"][path], value, err_msg=path)
    assert not np.allclose(after["wide"]["head_conv/kernel"], before["wide"]["head_conv/kernel"])
    np.testing.assert_array_equal(
        after["wide"]["base_conv/kernel"], before["wide"]["base_conv/kernel"]
    )


def test_train_k_unfreezes_the_top_k_groups_of_every_backbone():
    backbones, _ = fused()
    assert LayerGroups.of(backbones).top(1) == ["tiny/top", "wide/top"]


def test_a_group_in_none_of_the_backbones_is_refused_with_every_groups_name():
    backbones, model = fused()
    with pytest.raises(TfxferError, match=r"Unknown layer group 'conv5'.*tiny/low.*wide/top"):
        train(model, backbones, [tfxfer.Stage("ft", 1, train=["conv5"])])


def test_the_head_stage_trains_on_cached_features_of_every_frozen_backbone():
    backbones, model = fused("gated")
    result = train(model, backbones, [tfxfer.Stage("head", 2, learning_rate=1e-2)])
    info = result.stages["head"]
    assert info["cached_features"] is True
    assert info["feature_shape"][-1] == 8 + WIDE  # both backbones' pooled features


def test_two_backbones_of_one_name_get_distinct_namespaces_and_layer_names():
    a, b = tiny_backbone(seed=0), tiny_backbone(seed=1)
    model = build_fusion_model([a, b], 2)
    assert (a.namespace, b.namespace) == ("tiny", "tiny_2")
    assert len({layer.name for layer in model.layers}) == len(model.layers)


def test_backbones_of_different_modalities_are_refused(tmp_path):
    checkpoint = tmp_path / "bert"
    write_hf_checkpoint(checkpoint)
    text = tfxfer.build_backbone(str(checkpoint), sequence_length=8)
    with pytest.raises(TfxferError, match="different modalities.*'tiny': 'image'"):
        build_fusion_model([tiny_backbone(), text], 2)


def test_one_backbone_is_refused_by_the_fusion_builder():
    with pytest.raises(TfxferError, match="two or more Backbones"):
        build_fusion_model([tiny_backbone()], 2)


def test_an_unknown_mode_is_refused():
    with pytest.raises(TfxferError, match="Unknown fusion 'mean'.*concat"):
        fused("mean")


# === Text fusion ===


@pytest.fixture(scope="module")
def two_berts(tmp_path_factory):
    root = tmp_path_factory.mktemp("berts")
    write_hf_checkpoint(root / "a", seed=0)
    write_hf_checkpoint(root / "b", seed=1)
    return str(root / "a"), str(root / "b")


def test_text_backbones_sharing_a_vocabulary_fuse_and_serve_raw_strings(two_berts):
    backbones = [tfxfer.build_backbone(path, sequence_length=12) for path in two_berts]
    model = build_fusion_model(backbones, 2, fusion="gated")
    assert model.get_layer("fusion").widths == [16, 16]
    serving = tfxfer.export.serving_model(model, backbones)
    texts = ["the movie was great", "awful plot"]
    tokens = backbones[0].preprocessor(tf.constant(texts))
    np.testing.assert_allclose(
        serving.predict(np.array(texts), verbose=0), model(tokens), atol=1e-5
    )


def test_text_backbones_with_different_vocabularies_are_refused(two_berts, tmp_path):
    write_hf_checkpoint(tmp_path / "other", vocab=[*VOCAB, "extra"])
    backbones = [
        tfxfer.build_backbone(two_berts[0], sequence_length=12),
        tfxfer.build_backbone(str(tmp_path / "other"), sequence_length=12),
    ]
    with pytest.raises(TfxferError, match="tokenizers differ"):
        build_fusion_model(backbones, 2)


# === Recipes ===


def test_the_text_recipe_refuses_an_image_backbone_in_its_list():
    from recipes.bert_text_classifier import Config

    with pytest.raises(TfxferError, match="resnet50 takes images.*classifies text"):
        Config(backbone="minilm-l6,resnet50").validate()


def test_the_image_recipe_refuses_a_fusion_mode_with_one_backbone_and_unmatched_weights():
    from recipes.resnet50_image_classifier import Config

    with pytest.raises(TfxferError, match="fusion='gated' with one backbone"):
        Config(backbone="resnet50", fusion="gated").validate()
    with pytest.raises(TfxferError, match="one value for every backbone, or one per backbone"):
        Config(backbone="resnet50,mobilenetv3small", weights="none,none,none").validate()
    with pytest.raises(TfxferError, match=r"fusion='mean' \(expected one of"):
        Config(backbone="resnet50,mobilenetv3small", fusion="mean").validate()


# The tiny pair: what is under test is the recipe's fusion plumbing (two backbones from one
# flag, cached head features over both, fine-tuning the top group of each branch, the gated
# weights in metrics.json, save and export), the same for any two networks. The real pair
# (MobileNetV3 with EfficientNetV2-B0, 73-97 s) repeated it; a real pair is still built,
# fused and trained by `image_quickstart.ipynb` (`test_notebooks.py`), and real networks run
# the recipe in `test_image_recipe.py` (ResNet50) and `test_run_as_backbone.py`. In the large
# tier still (8 s measured alone): the default tier is over its 6 minutes.
@pytest.mark.large
def test_the_image_recipe_fuses_two_backbones_end_to_end(tmp_path, tiny_backbones):
    from recipes.resnet50_image_classifier import Config, main

    backbones = ("tinynet", "tinynetb")
    data = write_image_folder(str(tmp_path / "data"), {"a": 6, "b": 6}, size=32)
    config = Config.smoke(
        data_dir=data,
        output_dir=str(tmp_path / "run"),
        backbone=",".join(backbones),
        fusion="gated",
        # The top group of each backbone (the top-K of every branch, as the recipe's
        # --unfreeze K means).
        unfreeze="1",
        export=True,
    )
    result = main(config)
    run = Path(result["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fusion"]["mode"] == "gated"
    assert sum(metrics["fusion"]["contributions"]) == pytest.approx(1.0)
    info = json.loads((run / "config.json").read_text())["backbone_info"]["backbones"]
    assert [b["name"] for b in info] == list(backbones)
    stages = json.loads((run / "stages.json").read_text())
    assert stages["head"]["cached_features"] is True
    assert stages["finetune"]["cached_features"] is False  # it trained through both branches
    images = tiny_arrays(n=3, image_size=40)[0]
    expected = result["model"].predict(images, verbose=0)
    assert_reloads_alike(run, result["model"], images, atol=1e-5)
    exported = tf.saved_model.load(os.path.join(run, "export"))
    served = np.asarray(exported.serve(tf.constant(images)))
    # Value for value: three layers deep, the tiny networks are not in the chaotic regime
    # that made two random real networks' eager, tf.function and SavedModel answers differ.
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(served.sum(-1), 1.0, rtol=1e-4)


@pytest.mark.large
def test_the_text_recipe_fuses_two_berts_from_the_command_line_flags(two_berts, tmp_path):
    from recipes.bert_text_classifier import Config, main

    rows = [("the movie was great", "pos"), ("awful boring plot", "neg")] * 8
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    config = Config.from_flags(
        [
            "--train", str(train), "--output-dir", str(tmp_path / "run"),
            "--backbone", ",".join(two_berts), "--fusion", "attention", "--fusion-width", "8",
            "--head-epochs", "1", "--finetune-epochs", "0", "--batch-size", "8",
            "--sequence-length", "12", "--no-export",
        ]
    )  # fmt: skip
    # The head stage only: the flags, the projection and the namespaces are what this checks;
    # fine-tuning through fused branches is test_lexical.py's fused resume and the image
    # recipe's fusion test (19.7 -> 11.1 s).
    result = main(config)
    assert result["model"].get_layer("fusion").width == 8
    assert [b.namespace for b in result["backbone"]] == ["bert", "bert_2"]
    texts = np.array(["great movie", "boring plot"])
    # atol: bfloat16 on CPUs with AMX (mixed_precision "auto").
    assert_reloads_alike(result["run_dir"], result["serving_model"], texts, atol=1e-2)
