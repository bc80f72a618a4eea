"""Tests for `tfxfer.saving`: every class in `tfxfer.layers` saves and reloads, under the same
registered names as before, and model files written before `tfxfer.layers` existed still load.
"""

from __future__ import annotations

import json
import os
import zipfile

import keras
import numpy as np
import pytest
from helpers import tiny_backbone

from tfxfer import layers, saving
from tfxfer.fusion import build_fusion_model

OLD_FILES = os.path.join(os.path.dirname(__file__), "data", "saved_by_56e9d06")
# What a saved file calls each class (unchanged since the classes lived in their old modules).
REGISTERED = [
    "AttentionFusion",
    "ConcatFusion",
    "ContrastiveAccuracy",
    "GatedFusion",
    "HubLayer",
    "ImagePreprocessing",
    "LayerwiseAdamW",
    "MaskedSequencePooling",
    "NTXentLoss",
    "ProductFusion",
    "RawTextModel",
    "SumFusion",
    "WarmupCosine",
]


def _stored_config(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def test_every_layer_keeps_its_registered_name():
    for name in REGISTERED:
        cls = getattr(layers, name)
        assert keras.saving.get_registered_name(cls) == f"tfxfer>{name}"
        assert saving.CUSTOM_OBJECTS[f"tfxfer>{name}"] is cls
    assert saving.CUSTOM_OBJECTS["tfxfer>TextClassifier"] is layers.RawTextModel


@pytest.mark.parametrize("fusion", ["concat", "sum", "product", "gated", "attention"])
def test_a_fusion_model_saves_and_reloads_through_saving(tmp_path, fusion):
    backbones = [tiny_backbone(image_size=8, seed=0), tiny_backbone(image_size=8, seed=1)]
    backbones[1].name = "tiny2"
    model = build_fusion_model(backbones, 2, fusion=fusion)
    images = np.random.RandomState(0).randint(0, 255, (2, 8, 8, 3)).astype("uint8")
    path = saving.save_model(model, str(tmp_path / "model.keras"))
    reloaded = saving.load_model(path)
    assert isinstance(reloaded.get_layer("fusion"), type(model.get_layer("fusion")))
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6
    )


def test_an_image_fusion_model_saved_before_the_move_still_loads():
    path = os.path.join(OLD_FILES, "fusion.keras")
    model = saving.load_model(path)
    assert isinstance(model.get_layer("fusion"), layers.GatedFusion)
    assert any(isinstance(layer, layers.ImagePreprocessing) for layer in model.layers)
    images = np.load(os.path.join(OLD_FILES, "fusion_inputs.npy"))
    expected = np.load(os.path.join(OLD_FILES, "fusion_outputs.npy"))
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-5)
    # The optimizer the file was compiled with (and its schedule) deserializes too.
    optimizer = keras.saving.deserialize_keras_object(
        _stored_config(path)["compile_config"]["optimizer"],
        custom_objects=saving.CUSTOM_OBJECTS,
    )
    assert isinstance(optimizer, layers.LayerwiseAdamW)
    assert optimizer.lr_multipliers == {"x": 0.5}
    assert isinstance(optimizer._learning_rate, layers.WarmupCosine)


def test_a_text_model_saved_before_the_move_still_loads():
    path = os.path.join(OLD_FILES, "text.keras")
    model = saving.load_model(path)
    assert isinstance(model, layers.RawTextModel)
    assert any(isinstance(layer, layers.MaskedSequencePooling) for layer in model.classifier.layers)
    expected = np.load(os.path.join(OLD_FILES, "text_outputs.npy"))
    predicted = model.predict(["the match went to extra time", "time"], verbose=0)
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    compiled = _stored_config(path)["compile_config"]
    loss = keras.saving.deserialize_keras_object(
        compiled["loss"], custom_objects=saving.CUSTOM_OBJECTS
    )
    assert isinstance(loss, layers.NTXentLoss) and loss.temperature == 0.2
    metric = keras.saving.deserialize_keras_object(
        compiled["metrics"][0], custom_objects=saving.CUSTOM_OBJECTS
    )
    assert isinstance(metric, layers.ContrastiveAccuracy)
