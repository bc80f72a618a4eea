"""`tfxfer predict RUN_DIR INPUTS...`: batched, in order, as a table, JSON lines or a file.

One tiny image run and one tiny random-BERT run per module; every test calls the command in
this process (`cli.main`) and checks what it printed or wrote against the model's own
predictions.
"""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest
from export_helpers import IMAGE_CLASSES, TEXT_CLASSES, tiny_image_model, tiny_text_run, write_run
from helpers import TINY_IMAGE_SIZE, tiny_arrays

from tfxfer import cli
from tfxfer.data.images import decode_and_resize


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> dict:
    """A run of the tiny image model, and 7 PNGs: 2 loose, 5 in nested folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("predict")
    model = tiny_image_model()
    run = write_run(root / "run", model, IMAGE_CLASSES, {"data_dir": None})
    images, _ = tiny_arrays(n=7, image_size=20, seed=5)
    names = ["a.png", "b.png", "photos/x.png", "photos/deep/y.png", "photos/z.png"]
    names += ["photos/deep/w.png", "photos/deep/v.png"]
    for name, pixels in zip(names, images, strict=True):
        os.makedirs(os.path.dirname(str(root / name)), exist_ok=True)
        Image.fromarray(pixels).save(str(root / name))
    return {"run": run, "model": model, "root": root}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("predict_text")
    run, serving, _ = tiny_text_run(root, {"text_column": "review"})
    return {"run": run, "model": serving, "root": root}


def _expected(model, paths: list[str]) -> np.ndarray:
    """What the model gives each image, read as the training pipeline reads it."""
    pixels = np.stack([decode_and_resize(p, TINY_IMAGE_SIZE).numpy() for p in paths])
    return model.predict(pixels, verbose=0)


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_files_and_folders_are_predicted_in_order_in_batches(image_run, monkeypatch, capsys):
    root = image_run["root"]
    calls = []
    predict_on_batch = keras.Model.predict_on_batch

    def counted(self, x):
        calls.append(len(x))
        return predict_on_batch(self, x)

    monkeypatch.setattr(keras.Model, "predict_on_batch", counted)
    argv = [image_run["run"], str(root / "b.png"), str(root / "photos"), str(root / "a.png")]
    assert cli.main(["predict", *argv, "--json", "--top-k", "2", "--batch-size", "3"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    # A folder's own files in sorted order, then its subfolders, as the data loaders read them.
    folder = ["x.png", "z.png", "deep/v.png", "deep/w.png", "deep/y.png"]
    paths = [str(root / "b.png"), *(str(root / "photos" / f) for f in folder), str(root / "a.png")]
    assert [row["input"] for row in rows] == paths
    assert calls == [3, 3, 1]  # batches, not one call per image
    expected = _expected(image_run["model"], paths)
    for row, probabilities in zip(rows, expected, strict=True):
        best = np.argsort(-probabilities)[:2]
        assert [c["label"] for c in row["top_k"]] == [IMAGE_CLASSES[i] for i in best]
        np.testing.assert_allclose(
            [c["probability"] for c in row["top_k"]], probabilities[best], atol=1e-5
        )
        assert (row["label"], row["probability"]) == (
            row["top_k"][0]["label"],
            row["top_k"][0]["probability"],
        )
    assert len({row["label"] for row in rows}) > 1  # the predictions are not all alike


def test_a_terminal_gets_a_table_of_top_labels(image_run, capsys):
    path = str(image_run["root"] / "a.png")
    assert cli.main(["predict", image_run["run"], path]) == 0
    header, line = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["input", "top", "labels", "(probability)"]
    probabilities = _expected(image_run["model"], [path])[0]
    best = np.argsort(-probabilities)
    shown = "  ".join(f"{IMAGE_CLASSES[i]} ({probabilities[i]:.3f})" for i in best)
    # A long path keeps its end, the file name.
    from tfxfer.prediction import _shown

    assert line == f"{_shown(path)}  {shown}"
    assert line.split()[0].endswith("a.png")


def test_output_csv_and_jsonl_refuse_to_replace_a_file_without_overwrite(
    image_run, tmp_path, capsys
):
    folder = str(image_run["root"] / "photos")
    base = ["predict", image_run["run"], folder, "--top-k", "2"]
    assert cli.main([*base, "--json"]) == 0
    printed = _json_lines(capsys.readouterr().out)
    jsonl = tmp_path / "preds.jsonl"
    assert cli.main([*base, "--output", str(jsonl)]) == 0
    assert _json_lines(jsonl.read_text()) == printed
    table = tmp_path / "preds.csv"
    assert cli.main([*base, "--output", str(table)]) == 0
    with open(table, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["input", "label", "probability", "label_2", "probability_2"]
    assert [(r["input"], r["label"], r["label_2"]) for r in rows] == [
        (p["input"], p["top_k"][0]["label"], p["top_k"][1]["label"]) for p in printed
    ]
    capsys.readouterr()
    before = table.read_bytes()
    assert cli.main([*base, "--top-k", "1", "--output", str(table)]) == 2
    assert "--overwrite" in _error(capsys)
    assert table.read_bytes() == before
    assert cli.main([*base, "--top-k", "1", "--output", str(table), "--overwrite"]) == 0
    assert table.read_bytes() != before


def test_texts_and_files_of_texts_in_one_batched_call(text_run, tmp_path, monkeypatch, capsys):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text('review,stars\n"the plot, oh the plot",1\ngreat fun,5\n', encoding="utf-8")
    lines = tmp_path / "more.txt"
    lines.write_text("i loved it\n\nboring film\n", encoding="utf-8")
    model = text_run["model"]
    calls = []
    predict = type(model).predict

    def counted(self, x, *args, **kwargs):
        calls.append(list(x))
        return predict(self, x, *args, **kwargs)

    monkeypatch.setattr(type(model), "predict", counted)
    argv = [text_run["run"], "a good movie", str(reviews), str(lines), "--json"]
    assert cli.main(["predict", *argv]) == 0
    rows = _json_lines(capsys.readouterr().out)
    texts = ["a good movie", "the plot, oh the plot", "great fun", "i loved it", "boring film"]
    assert [row["input"] for row in rows] == texts  # the run's text column: "review"
    assert calls == [texts]
    monkeypatch.undo()
    expected = model.predict(texts, verbose=0)
    for row, probabilities in zip(rows, expected, strict=True):
        assert row["label"] == TEXT_CLASSES[int(probabilities.argmax())]
        assert row["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_blank_lines_and_rows_left_out_of_predictions_are_counted_aloud(
    text_run, tmp_path, caplog, capsys
):
    table = tmp_path / "in.csv"
    table.write_text('review\nhello\n""\n"   "\nbye\n', encoding="utf-8")
    lines = tmp_path / "in.txt"
    lines.write_text("hello\n\n   \nbye\n", encoding="utf-8")
    for path in (table, lines):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert cli.main(["predict", text_run["run"], str(path), "--json"]) == 0
        assert [row["input"] for row in _json_lines(capsys.readouterr().out)] == ["hello", "bye"]
        assert f"Skipped 2 blank line(s) or row(s) of {path}: the 2 results" in caplog.text


def test_int8_calibration_on_an_empty_folder_names_the_flag_that_gave_it(
    image_run, tmp_path, capsys
):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["export", image_run["run"], "--format", "tflite", "--quantize", "int8"]
    argv += ["--calibration-data", str(empty), "--output", str(tmp_path / "q.tflite")]
    assert cli.main(argv) == 2
    error = _error(capsys)
    assert "holds no readable images" in error and "Point --calibration-data at" in error
    assert not (tmp_path / "q.tflite").exists()


def test_the_old_model_flags_still_work(image_run, capsys):
    model = os.path.join(image_run["run"], "model.keras")
    path = str(image_run["root"] / "a.png")
    assert cli.main(["predict", "--model", model, "--images", path, "--json"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    probabilities = _expected(image_run["model"], [path])[0]
    assert (row["input"], row["label"]) == (path, IMAGE_CLASSES[int(probabilities.argmax())])


def test_evaluate_takes_the_run_dir_too(image_run, tmp_path, capsys):
    from helpers import write_image_folder

    data = write_image_folder(str(tmp_path / "eval"), {name: 2 for name in IMAGE_CLASSES})
    assert cli.main(["evaluate", image_run["run"], "--images-dir", data]) == 0
    metrics = json.loads(capsys.readouterr().out)
    paths = sorted(str(p) for p in (tmp_path / "eval").rglob("*.png"))  # classes sorted too
    labels = np.repeat(np.arange(len(IMAGE_CLASSES)), 2)
    predicted = _expected(image_run["model"], paths).argmax(1)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(predicted == labels)))


# === Bad input: one line, exit 2 ===


def test_a_run_dir_without_a_model_says_the_run_may_not_have_finished(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert cli.main(["predict", str(run), "a text"]) == 2
    message = _error(capsys)
    assert "has no model.keras" in message and "may not have finished" in message
    assert cli.main(["predict", str(tmp_path / "nowhere"), "a text"]) == 2
    assert "Run directory not found" in _error(capsys)


def write(path, content) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as handle:
        handle.write(content)
    return str(path)


@pytest.mark.parametrize(
    "run, make_input, message",
    [
        ("image", lambda t: "a fine film", "is neither an image file nor a folder"),
        ("image", lambda t: write(t / "reviews.csv", "text\nok\n"), "is a file of texts"),
        ("text", lambda t: write(t / "p.png", b"\x89PNG"), "is an image, but this model takes"),
        ("text", lambda t: os.path.dirname(write(t / "d" / "a.png", b"x")), "is a folder"),
        ("image", lambda t: write(t / "broken.png", b"not a png"), "Cannot read"),
        ("image", lambda t: os.path.dirname(write(t / "e" / "notes.txt", "x")), "no images"),
        ("image", lambda t: str(t / "missing.jpg"), "Image not found"),
        ("text", lambda t: write(t / "r.csv", "review\n\xe9\n".encode("latin-1")), "not UTF-8"),
        ("text", lambda t: write(t / "r.csv", "body,stars\nok,1\n"), "has no column 'review'"),
        ("text", lambda t: str(t / "gone.jsonl"), "Text file not found"),
    ],
    ids=[
        "text-for-an-image-model",
        "csv-for-an-image-model",
        "image-for-a-text-model",
        "folder-for-a-text-model",
        "corrupt-image",
        "folder-without-images",
        "missing-image",
        "csv-not-utf8",
        "csv-without-the-column",
        "missing-text-file",
    ],
)
def test_bad_inputs_are_one_line_and_exit_2(
    image_run, text_run, tmp_path, run, make_input, message, capsys
):
    run_dir = (image_run if run == "image" else text_run)["run"]
    assert cli.main(["predict", run_dir, make_input(tmp_path)]) == 2
    assert message in _error(capsys)
    assert capsys.readouterr().out == ""  # nothing half-printed


def test_bad_flags_are_one_line_and_exit_2(image_run, tmp_path, capsys):
    path = str(image_run["root"] / "a.png")
    for flags, message in [
        (["--top-k", "0"], "Expected --top-k to be a positive integer"),
        (["--batch-size", "0"], "Expected --batch-size to be a positive integer"),
        (["--output", str(tmp_path / "preds.xlsx")], "Expected --output to end in .csv"),
    ]:
        assert cli.main(["predict", image_run["run"], path, *flags]) == 2
        assert message in _error(capsys)
    assert cli.main(["predict", image_run["run"]]) == 2
    assert "Nothing to predict" in _error(capsys)
