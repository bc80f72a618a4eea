"""Finished runs in seconds, for the export and predict tests: a tiny model in a real RunDir.

A run directory as a recipe leaves it, as far as `tfxfer export` and `tfxfer predict` read
it: the manifest, `checkpoints/`, `model.keras`, `class_names.json` and `config.json`. The
image model is trained for a few eager steps and the text model's head is scaled, so that
predictions differ from input to input, which a comparison of two runtimes needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
from bert_helpers import write_hf_checkpoint
from helpers import tiny_arrays, tiny_backbone

import tfxfer
from tfxfer.export import save_model, serving_model
from tfxfer.rundir import MANIFEST, RunDir

IMAGE_CLASSES = ["blue", "green", "red"]
TEXT_CLASSES = ["neg", "pos"]


def confident(model: keras.Model, scale: float = 4.0) -> keras.Model:
    """Scales the output layer's kernel: an untrained head otherwise predicts ~uniformly."""
    layer = model.get_layer("predictions")
    layer.kernel.assign(layer.kernel.numpy() * scale)
    return model


def tiny_image_model(hidden_units=(256, 256)) -> keras.Model:
    """The 16 px tiny backbone with a wide head (enough weights for quantization to show).

    Trained a few steps (eagerly: tracing would cost more than the steps) on `tiny_arrays`,
    whose class is the bright colour channel, so it tells those images apart.
    """
    keras.utils.set_random_seed(0)
    head = tfxfer.HeadConfig(hidden_units=list(hidden_units), dropout=0.0)
    model = tfxfer.build_model(tiny_backbone(), len(IMAGE_CLASSES), head=head)
    images, labels = tiny_arrays(n=48)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", run_eagerly=True)
    model.fit(images, labels, epochs=4, batch_size=16, verbose=0)
    return model


def write_run(path: Path, model: keras.Model, class_names: list[str], config: dict) -> str:
    """A finished run's directory around `model` (through `RunDir`, so with its manifest)."""
    run_dir = RunDir(str(path))
    save_model(model, run_dir.file("model.keras"))
    run_dir.write_json("class_names.json", class_names)
    run_dir.write_json("config.json", config)
    return run_dir.path


def tiny_text_run(root: Path, config: dict | None = None):
    """A tiny random BERT classifier's run; returns `(run path, serving model, backbone)`."""
    write_hf_checkpoint(root / "bert")
    keras.utils.set_random_seed(0)
    backbone = tfxfer.build_backbone(str(root / "bert"), sequence_length=8)
    model = confident(tfxfer.build_model(backbone, len(TEXT_CLASSES)), scale=40.0)
    serving = serving_model(model, backbone)
    path = write_run(root / "text_run", serving, TEXT_CLASSES, config or {})
    return path, serving, backbone


def manifest_entries(run: str) -> list[str]:
    with open(Path(run) / MANIFEST, encoding="utf-8") as handle:
        return json.load(handle)["entries"]


def sample_images(n: int, seed: int) -> np.ndarray:
    """Images like the training ones (`tiny_arrays`), at the model's 16 px."""
    return tiny_arrays(n=n, seed=seed)[0]
