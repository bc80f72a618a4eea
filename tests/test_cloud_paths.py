"""Runs on `tf.io.gfile` URLs, through TensorFlow's in-memory ram:// filesystem.

ram:// takes the same calls as gs:// (including rename), so what passes here is what a Cloud
TPU run writing to a bucket relies on.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import tensorflow as tf

import tfxfer
from tests.helpers import InterruptAfterEpoch, tiny_arrays, tiny_model, tiny_train_data
from tfxfer import fs
from tfxfer.errors import RunDirError
from tfxfer.rundir import MANIFEST, RunDir


def _ram(name: str) -> str:
    # A fresh location per test: ram:// lives as long as the process, shared by its tests.
    return f"ram://tfxfer-{secrets.token_hex(6)}/{name}"


def _run(run_dir: RunDir, callbacks=(), seed: int = 0):
    backbone, model = tiny_model(seed=seed)
    images, labels = tiny_arrays(n=18)
    stages = [
        tfxfer.Stage("head", 1, learning_rate=1e-2),
        tfxfer.Stage("finetune", 2, train="all", learning_rate=5e-3),
    ]
    tfxfer.run_schedule(
        model,
        backbone,
        stages,
        tiny_train_data(images, labels, batch_size=6),
        None,
        run_dir=run_dir,
        callbacks=list(callbacks),
        verbose=0,
    )
    return model


def test_fs_dispatches_urls_to_gfile():
    root = _ram("fs")
    fs.makedirs(fs.join(root, "a"))
    fs.write_bytes(fs.join(root, "a", "x.bin"), b"abc")
    fs.rename(fs.join(root, "a", "x.bin"), fs.join(root, "a", "y.bin"))
    assert fs.listdir(fs.join(root, "a")) == ["y.bin"]
    assert fs.read_bytes(fs.join(root, "a", "y.bin")) == b"abc"
    assert fs.isdir(fs.join(root, "a")) and fs.isfile(fs.join(root, "a", "y.bin"))
    fs.rmtree(fs.join(root, "a"))
    assert not tf.io.gfile.exists(fs.join(root, "a", "y.bin"))


def test_killed_run_on_ram_resumes_to_the_uninterrupted_weights(tmp_path):
    straight = _run(RunDir(str(tmp_path / "straight"))).get_weights()
    path = _ram("run")
    with pytest.raises(KeyboardInterrupt):
        _run(RunDir(path), callbacks=[InterruptAfterEpoch(2)])
    checkpoints = fs.join(path, "checkpoints")
    assert "latest.json" in fs.listdir(checkpoints)
    assert "history.csv" in fs.listdir(path)
    resumed = _run(RunDir(path, resume=True), seed=1)
    for a, b in zip(straight, resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with fs.open(fs.join(path, "history.csv")) as handle:
        assert len(handle.read().strip().splitlines()) == 1 + 3


def test_overwrite_on_ram_deletes_only_the_manifest_entries():
    path = _ram("run")
    run_dir = RunDir(path)
    run_dir.write_json("metrics.json", {"val": {"accuracy": 1.0}})
    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir(path)
    # A file tfxfer did not write, beside the run: --overwrite must refuse, not delete it.
    fs.write_bytes(fs.join(path, "notes.txt"), b"mine")
    with pytest.raises(RunDirError, match="notes.txt"):
        RunDir(path, overwrite=True)
    fs.remove(fs.join(path, "notes.txt"))
    RunDir(path, overwrite=True)
    assert sorted(fs.listdir(path)) == [MANIFEST, "checkpoints"]


def test_load_images_from_ram():
    root = _ram("photos")
    images, labels = tiny_arrays(n=6)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = fs.join(root, f"class_{label}")
        fs.makedirs(folder)
        fs.write_bytes(fs.join(folder, f"{i}.png"), tf.io.encode_png(image).numpy())
    data = tfxfer.load_images(root, val_split=0.5)
    assert data.class_names == ["class_0", "class_1", "class_2"]
