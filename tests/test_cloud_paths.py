"""Runs on `tf.io.gfile` URLs, through TensorFlow's in-memory ram:// filesystem.

ram:// takes the same calls as gs:// (including rename), so what passes here is what a Cloud
TPU run writing to a bucket relies on.
"""

from __future__ import annotations

import json
import secrets

import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    InterruptAfterEpoch,
    assert_reloads_alike,
    tiny_arrays,
    tiny_model,
    tiny_two_stage_run,
)

import tfxfer
from tfxfer import fs
from tfxfer.errors import DataError, RunDirError
from tfxfer.rundir import MANIFEST, RunDir


def _ram(name: str) -> str:
    # A fresh location per test: ram:// lives as long as the process, shared by its tests.
    return f"ram://tfxfer-{secrets.token_hex(6)}/{name}"


def _run(run_dir: RunDir, callbacks=(), seed: int = 0):
    return tiny_two_stage_run(
        run_dir, seed=seed, finetune_epochs=2, layerwise_lr_decay=None, callbacks=callbacks
    )[0]


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


def _write_image_folder_to_ram(root: str, n: int = 18) -> str:
    images, labels = tiny_arrays(n=n)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = fs.join(root, f"class_{label}")
        fs.makedirs(folder)
        fs.write_bytes(fs.join(folder, f"{i}.png"), tf.io.encode_png(image).numpy())
    return root


# The tiny row only: what is under test is the ram:// plumbing, the same for any network. A
# real network's run end to end, its export served value for value and reloaded alike, is
# conftest's ResNet50 `image_recipe_run` (test_image_recipe.py); the MobileNetV3 case here
# repeated that for 38 s of the large tier.
@pytest.mark.parametrize("backbone", ["tinynet"])
def test_image_recipe_writes_its_run_to_ram(tiny_backbones, backbone, tmp_path, capsys):
    from recipes import resnet50_image_classifier as recipe

    root = _ram("recipe")
    data_dir = _write_image_folder_to_ram(fs.join(root, "shapes"))
    output_dir = fs.join(root, "run")
    result = recipe.main(
        recipe.Config.smoke(
            data_dir=data_dir, output_dir=output_dir, export=True, backbone=backbone
        )
    )
    for name in ("model.keras", "metrics.json", "training_curves.png", "export/saved_model.pb"):
        assert fs.isfile(fs.join(output_dir, name)), name
    assert tfxfer.export.is_tfxfer_export(fs.join(output_dir, "export"))
    images, _ = tiny_arrays(n=4, seed=1)
    loaded = assert_reloads_alike(
        fs.join(output_dir, "model.keras"), result["serving_model"], images, rtol=1e-5, atol=1e-6
    )
    exported = tf.saved_model.load(fs.join(output_dir, "export"))
    served = exported.serve(tf.constant(images))
    np.testing.assert_allclose(served.numpy(), loaded.predict(images, verbose=0), atol=1e-5)
    # The commands take the run where it is: RUN_DIR may be a URL too.
    from tfxfer import cli

    image = fs.join(data_dir, "class_0", "0.png")
    local = tmp_path / "0.png"
    local.write_bytes(fs.read_bytes(image))
    assert cli.main(["predict", output_dir, str(local), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["input"] == str(local) and row["label"].startswith("class_")
    assert cli.main(["evaluate", output_dir, "--images-dir", data_dir]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_export_on_ram_replaces_only_its_own_export():
    _, model = tiny_model()
    root = _ram("exports")
    target = fs.join(root, "export")
    tfxfer.export_saved_model(model, target)
    tfxfer.export_saved_model(model, target)  # tfxfer's own export: replaced
    assert fs.isfile(fs.join(target, "saved_model.pb"))
    mine = fs.join(root, "mine")
    fs.makedirs(mine)
    fs.write_bytes(fs.join(mine, "notes.txt"), b"mine")
    with pytest.raises(tfxfer.TfxferError, match="Refusing to export"):
        tfxfer.export_saved_model(model, mine)
    assert fs.listdir(mine) == ["notes.txt"]


def test_load_texts_from_ram():
    root = _ram("texts")
    fs.makedirs(root)
    fs.write_bytes(fs.join(root, "train.csv"), b"text,label\ngood,pos\nbad,neg\nfine,pos\n")
    data = tfxfer.load_texts(fs.join(root, "train.csv"), val_split=0)
    assert data.class_names == ["neg", "pos"]
    assert sorted(data.train.inputs) == ["bad", "fine", "good"]
    for label, text in [("pos", "good"), ("neg", "bad"), ("neg", "awful")]:
        fs.makedirs(fs.join(root, "folder", label, "sub"))
        fs.write_bytes(fs.join(root, "folder", label, "sub", f"{text}.txt"), text.encode())
    fs.write_bytes(fs.join(root, "folder", "pos", ".hidden.txt"), b"hidden")
    data = tfxfer.load_texts(fs.join(root, "folder"), val_split=0)
    assert data.class_names == ["neg", "pos"]
    assert sorted(data.train.inputs) == ["awful", "bad", "good"]
    assert data.train.ignored == 1
    with pytest.raises(DataError, match="does not exist"):
        tfxfer.load_texts(fs.join(root, "missing.csv"))


def test_demo_shapes_for_a_cloud_run_are_drawn_locally_not_into_a_folder_named_ram(
    tmp_path, monkeypatch
):
    from recipes import resnet50_image_classifier as recipe

    monkeypatch.chdir(tmp_path)
    data = recipe.build_data(recipe.Config.smoke(output_dir="ram://demo-bucket/run"))
    assert data.kind == "image" and len(data.class_names) == 3
    assert not (tmp_path / "ram:").exists()  # os.path.join would have made "ram:/..."
    assert all(not path.startswith(("ram:", str(tmp_path))) for path in data.train.inputs)
