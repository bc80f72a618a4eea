"""TFLite export: the file gives Keras' outputs, quantization shrinks it, bad input is refused.

Everything runs on a tiny 16 px image model with a wide head (so that weights, not the graph,
make up the file and the quantized sizes show) and on a tiny random BERT; each conversion
takes a few seconds. The interpreter is TensorFlow's own `tf.lite.Interpreter`.
"""

from __future__ import annotations

import json
import os

import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from export_helpers import (
    IMAGE_CLASSES,
    manifest_entries,
    sample_images,
    tiny_image_model,
    tiny_text_run,
    write_run,
)
from helpers import TINY_IMAGE_SIZE, write_image_folder

from tfxfer import cli
from tfxfer.errors import TfxferError
from tfxfer.export import TFLITE_SIDECAR_SUFFIX, export_tflite

# TF 2.21's interpreter warns that it is deprecated for LiteRT's (ai_edge_litert), which runs
# the same files; the converter builds one to calibrate int8 too.
pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")


def run_tflite(path: str, **inputs) -> np.ndarray:
    """The `serve` signature's output for `inputs` (the batch size is free)."""
    interpreter = tf.lite.Interpreter(model_path=path)
    return interpreter.get_signature_runner("serve")(**inputs)["output_0"]


def sidecar(path: str) -> dict:
    with open(path + TFLITE_SIDECAR_SUFFIX, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def image_model():
    return tiny_image_model()


@pytest.fixture(scope="module")
def exports(image_model, tmp_path_factory) -> dict:
    """The image model in float32 and each quantization, with what Keras gives."""
    root = tmp_path_factory.mktemp("tflite")
    calibration = sample_images(32, seed=1)
    paths = {
        quantize: export_tflite(
            image_model,
            str(root / f"model-{quantize}.tflite"),
            quantize=None if quantize == "float32" else quantize,
            representative_data=calibration if quantize == "int8" else None,
            class_names=IMAGE_CLASSES,
        )
        for quantize in ("float32", "dynamic", "float16", "int8")
    }
    return {"paths": paths, "root": root}


def test_float32_tflite_gives_keras_outputs_from_raw_uint8_pixels(image_model, exports):
    images = sample_images(6, seed=2)
    expected = image_model.predict(images, verbose=0)
    got = run_tflite(exports["paths"]["float32"], image=images)
    assert expected.std(axis=0).max() > 0.05  # the outputs differ from image to image
    np.testing.assert_allclose(got, expected, atol=1e-4)
    meta = sidecar(exports["paths"]["float32"])
    assert meta["written_by"] == "tfxfer" and meta["quantize"] == "none"
    assert meta["inputs"] == [
        {"name": "image", "dtype": "uint8", "shape": [-1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3]}
    ]
    assert meta["class_names"] == IMAGE_CLASSES


@pytest.mark.parametrize(
    "quantize, ratio, atol",
    # Measured: dynamic 4e-4, float16 2e-5, int8 5e-3 at most; about a sixth of each bound.
    [("dynamic", (0.2, 0.35), 0.003), ("float16", (0.45, 0.6), 1e-4), ("int8", (0.2, 0.35), 0.03)],
)
def test_quantized_files_are_smaller_and_agree_with_keras(
    image_model, exports, quantize, ratio, atol
):
    size = os.path.getsize(exports["paths"][quantize])
    float32 = os.path.getsize(exports["paths"]["float32"])
    assert ratio[0] < size / float32 < ratio[1], (quantize, size, float32)
    images = sample_images(18, seed=3)
    expected = image_model.predict(images, verbose=0)
    got = run_tflite(exports["paths"][quantize], image=images)
    np.testing.assert_allclose(got, expected, atol=atol)
    # The label agrees wherever Keras' top two are further apart than the tolerance.
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol
    assert clear.sum() >= 8
    np.testing.assert_array_equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def test_int8_runs_on_integer_kernels(exports):
    interpreter = tf.lite.Interpreter(model_path=exports["paths"]["int8"])
    types = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.int8 in types
    # The input stays raw uint8 pixels and the output float probabilities.
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.float32


def test_an_input_size_other_than_the_models_is_resized_inside(image_model, tmp_path):
    path = export_tflite(image_model, str(tmp_path / "camera.tflite"), input_size=[24, 20])
    images = np.random.default_rng(4).integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    # Keras' model resizes any size inside too: both must see the same pixels.
    np.testing.assert_allclose(
        run_tflite(path, image=images), image_model.predict(images, verbose=0), atol=1e-4
    )
    assert sidecar(path)["inputs"][0]["shape"] == [-1, 24, 20, 3]


@pytest.mark.large  # over ~10 s on two cores
def test_text_tflite_takes_token_ids_and_its_sidecar_rebuilds_the_tokenizer(tmp_path):
    _, serving, _ = tiny_text_run(tmp_path)
    path = export_tflite(serving, str(tmp_path / "text.tflite"))
    meta = sidecar(path)
    assert meta["kind"] == "text"
    assert [i["name"] for i in meta["inputs"]] == ["padding_mask", "segment_ids", "token_ids"]
    # What a user rebuilds from the sidecar alone tokenizes as the model's own preprocessor.
    settings = meta["tokenizer"]
    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=settings["vocabulary"], lowercase=settings["lowercase"]
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=settings["sequence_length"]
    )
    texts = ["the movie was great", "awful plot i hated it", "fun"]
    tokens = {k: tf.cast(v, tf.int32).numpy() for k, v in preprocessor(tf.constant(texts)).items()}
    own = serving.preprocessor(tf.constant(texts))
    for name, values in tokens.items():
        np.testing.assert_array_equal(values, tf.cast(own[name], tf.int32).numpy())
    expected = serving.predict(texts, verbose=0)
    assert np.ptp(expected[:, 0]) > 1e-3  # a random tiny BERT's outputs differ, if little
    np.testing.assert_allclose(run_tflite(path, **tokens), expected, atol=1e-5)
    # int8 calibrates on strings, tokenized by the model's own preprocessor.
    int8 = export_tflite(serving, str(tmp_path / "int8.tflite"), quantize="int8",
                         representative_data=texts * 4)  # fmt: skip
    np.testing.assert_allclose(run_tflite(int8, **tokens), expected, atol=0.02)


# === The command ===


@pytest.fixture
def image_run(image_model, tmp_path) -> str:
    data = write_image_folder(str(tmp_path / "data"), {"a": 3, "b": 3}, size=20)
    return write_run(tmp_path / "run", image_model, IMAGE_CLASSES, {"data_dir": data})


def test_cli_exports_into_the_run_and_records_it_in_the_manifest(image_run, capsys):
    assert cli.main(["export", image_run, "--format", "tflite"]) == 0
    path = os.path.join(image_run, "model.tflite")
    assert capsys.readouterr().out.strip() == path
    assert {"model.tflite", "model.tflite.json"} <= set(manifest_entries(image_run))
    # int8 calibrates on the training images config.json names; a second export replaces.
    for _ in range(2):
        assert cli.main(["export", image_run, "--format", "tflite", "--quantize", "int8"]) == 0
    int8 = os.path.join(image_run, "model-int8.tflite")
    assert sidecar(int8)["quantize"] == "int8"
    assert "model-int8.tflite" in manifest_entries(image_run)
    assert os.path.getsize(int8) < os.path.getsize(path) / 2


def test_cli_savedmodel_export_defaults_to_the_runs_export_folder(image_run, capsys):
    assert cli.main(["export", image_run]) == 0
    assert os.path.isfile(os.path.join(image_run, "export", "saved_model.pb"))
    assert "export" in manifest_entries(image_run)


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--format", "onnx"],
            "Expected --format to be 'savedmodel' or 'tflite'. Received: 'onnx'",
        ),
        (["--format", "tflite", "--quantize", "int4"], "Expected --quantize to be one of"),
        (["--quantize", "dynamic"], "--quantize is for --format tflite"),
        (["--format", "tflite", "--input-size", "big"], "Expected --input-size"),
    ],
)
def test_cli_refuses_unknown_formats_and_quantizations(image_run, flags, message, capsys):
    assert cli.main(["export", image_run, *flags]) == 2
    assert message in _error(capsys)


def test_int8_without_calibration_data_is_refused(image_model, tmp_path, capsys):
    with pytest.raises(TfxferError, match="needs representative inputs"):
        export_tflite(image_model, str(tmp_path / "m.tflite"), quantize="int8")
    run = write_run(tmp_path / "run", image_model, IMAGE_CLASSES, {"data_dir": None})
    assert cli.main(["export", run, "--format", "tflite", "--quantize", "int8"]) == 2
    assert "names no training data" in _error(capsys)
    gone = write_run(tmp_path / "run2", image_model, IMAGE_CLASSES, {"data_dir": "/no/such"})
    assert cli.main(["export", gone, "--format", "tflite", "--quantize", "int8"]) == 2
    assert "'/no/such', which does not exist" in _error(capsys)
    assert not os.path.exists(os.path.join(run, "model-int8.tflite"))


def test_a_run_dir_without_a_model_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert cli.main(["export", str(run), "--format", "tflite"]) == 2
    message = _error(capsys)
    assert "has no model.keras" in message and "may not have finished" in message


def test_a_users_file_at_the_output_is_never_replaced(image_model, image_run, tmp_path, capsys):
    mine = tmp_path / "phone.tflite"
    mine.write_bytes(b"my own model")
    assert cli.main(["export", image_run, "--format", "tflite", "--output", str(mine)]) == 2
    assert "Refusing to export" in _error(capsys)
    # Its sidecar's name is protected too, and so is a user's file inside the run.
    (tmp_path / "other.tflite.json").write_text('{"mine": true}')
    with pytest.raises(TfxferError, match="other.tflite.json"):
        export_tflite(image_model, str(tmp_path / "other.tflite"))
    with open(os.path.join(image_run, "model-float16.tflite"), "wb") as handle:
        handle.write(b"mine too")
    assert cli.main(["export", image_run, "--format", "tflite", "--quantize", "float16"]) == 2
    _error(capsys)
    assert mine.read_bytes() == b"my own model"
    with open(os.path.join(image_run, "model-float16.tflite"), "rb") as handle:
        assert handle.read() == b"mine too"
    assert not os.path.exists(tmp_path / "other.tflite")


def test_models_tflite_cannot_take_are_refused_with_the_reason(image_model, tmp_path):
    import keras

    strings = keras.Input((), dtype="string")
    with pytest.raises(TfxferError, match="takes raw strings"):
        export_tflite(keras.Model(strings, strings), str(tmp_path / "s.tflite"))
    with pytest.raises(TfxferError, match="ending in '.tflite'"):
        export_tflite(image_model, str(tmp_path / "m.lite"))


def test_an_int8_export_prints_nothing_of_the_converters_own(image_model, tmp_path, capfd):
    # The converter writes "fully_quantize: 0, inference_type: 6, ..." from C++ to file
    # descriptor 2 on every quantized conversion, whatever TF_CPP_MIN_LOG_LEVEL says.
    export_tflite(
        image_model,
        str(tmp_path / "model.tflite"),
        quantize="int8",
        representative_data=sample_images(8, seed=2),
        class_names=IMAGE_CLASSES,
    )
    captured = capfd.readouterr()
    assert "fully_quantize" not in captured.err + captured.out


def test_stderr_without_drops_only_the_noise_and_keeps_everything_on_failure(capfd):
    import os
    import re

    from tfxfer.startup import stderr_without

    noise = re.compile(r"^known noise")
    with stderr_without(noise):
        os.write(2, b"known noise: 1\nsomething else\n")
    assert capfd.readouterr().err == "something else\n"
    with pytest.raises(RuntimeError), stderr_without(noise):
        os.write(2, b"known noise: 2\n")
        raise RuntimeError("failed")
    assert capfd.readouterr().err == "known noise: 2\n"
