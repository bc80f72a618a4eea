"""The reports a person reads after a run: pictures, tables, TensorBoard logs, the summary.

Most tests build reports from small numpy arrays and a made-up history (milliseconds). One
module fixture trains the tiny model for two epochs on the shapes folder and finishes the run
as a recipe does, to check what a real run leaves and that `--overwrite` deletes exactly it.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from helpers import InterruptAfterEpoch, tiny_backbone, tiny_model, tiny_two_stage_run
from PIL import Image

import tfxfer
from tfxfer import report
from tfxfer.data.datasets import make_datasets
from tfxfer.recipe import finish_run, open_run
from tfxfer.rundir import MANIFEST, RunDir
from tfxfer.train.compiling import acts_on_batches

NAMES = ["cat", "dog", "fox"]


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _png_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _scalars(directory: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files under `directory`."""
    found: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars", value.tag
                found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return found


# === Top losses ===


def test_top_losses_lists_the_wrong_examples_most_confidently_wrong_first():
    labels = np.array([0, 1, 2, 0, 1])
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.6, 0.3, 0.1],  # wrong, p(true) 0.3
            [0.05, 0.9, 0.05],  # wrong, p(true) 0.05: the most confidently wrong
            [0.2, 0.7, 0.1],  # wrong, p(true) 0.2
            [0.1, 0.8, 0.1],  # right
        ]
    )
    inputs = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    rows = report.top_losses(inputs, labels, probabilities, NAMES)
    assert [row["input"] for row in rows] == ["c.png", "d.png", "b.png"]
    assert [row["rank"] for row in rows] == [1, 2, 3]
    worst = rows[0]
    assert (worst["true_label"], worst["predicted_label"]) == ("fox", "dog")
    assert worst["predicted_probability"] == 0.9 and worst["true_probability"] == 0.05
    assert worst["loss"] == pytest.approx(-np.log(0.05), abs=1e-4)
    assert [row["loss"] for row in rows] == sorted((row["loss"] for row in rows), reverse=True)
    assert set(rows[0]) == set(report.TOP_LOSS_COLUMNS)
    assert len(report.top_losses(inputs, labels, probabilities, NAMES, k=2)) == 2
    # The mean of the per-example losses is the loss metrics.json reports.
    metrics = report.classification_metrics(labels, probabilities, NAMES)
    assert metrics["loss"] == pytest.approx(report.example_losses(labels, probabilities).mean())


def test_multi_label_top_losses_name_label_sets_and_per_class_auc_is_the_pairwise_rate():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
    probabilities = np.array([[0.9, 0.2, 0.1], [0.2, 0.7, 0.1], [0.8, 0.7, 0.1], [0.7, 0.1, 0.2]])
    rows = report.top_losses(["w", "x", "y", "z"], labels, probabilities, NAMES, True)
    # Wrong: w (misses fox), z (says cat for nothing); w's true fox at 0.1 costs more.
    assert [row["input"] for row in rows] == ["w", "z"]
    assert (rows[0]["true_label"], rows[0]["predicted_label"]) == ("cat|fox", "cat")
    assert rows[0]["true_probability"] == 0.1 and rows[0]["predicted_probability"] == 0.9
    assert rows[1]["true_label"] == "" and rows[1]["true_probability"] is None

    metrics = report.classification_metrics(labels, probabilities, NAMES, multi_label=True)
    for i, name in enumerate(NAMES):
        truth, scores = labels[:, i] > 0, probabilities[:, i]
        pairs = [(p, n) for p in scores[truth] for n in scores[~truth]]
        expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
        assert metrics["per_class"][name]["auc"] == pytest.approx(expected), name
    assert report.roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None
    assert report.roc_auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5


# === Tables and pictures ===


def test_per_class_csv_has_a_row_per_split_and_class_with_auc_for_multi_label(tmp_path):
    labels = np.array([0, 1, 2, 2])
    probabilities = np.eye(3)[[0, 2, 2, 1]]
    metrics = {
        "val": report.classification_metrics(labels, probabilities, NAMES),
        "test": report.classification_metrics(labels[:2], probabilities[:2], NAMES),
    }
    rows = _read_csv(report.write_per_class(metrics, str(tmp_path / "per_class.csv")))
    assert [(row["split"], row["class"]) for row in rows] == [
        (split, name) for split in ("val", "test") for name in NAMES
    ]
    fox = rows[2]
    assert list(fox) == ["split", "class", "precision", "recall", "f1", "support"]
    assert (float(fox["precision"]), float(fox["recall"]), int(fox["support"])) == (0.5, 0.5, 2)

    multi = report.classification_metrics(np.eye(3)[[0, 1, 2, 0]], probabilities, NAMES, True)
    rows = _read_csv(report.write_per_class({"val": multi}, str(tmp_path / "multi.csv")))
    assert "auc" in rows[0] and float(rows[0]["auc"]) == multi["per_class"]["cat"]["auc"]


def test_the_confusion_matrix_grows_with_the_classes_and_shortens_long_names(tmp_path):
    small = report.plot_confusion_matrix(np.eye(3, dtype=int), NAMES, str(tmp_path / "3.png"))
    names = [f"a_rather_long_class_name_number_{i:02d}" for i in range(20)]
    large = report.plot_confusion_matrix(
        np.random.default_rng(0).integers(0, 9, (20, 20)), names, str(tmp_path / "20.png")
    )
    (w3, h3), (w20, h20) = _png_size(small), _png_size(large)
    assert w20 > 1.8 * w3 and h20 > 1.8 * h3
    short = [report.shorten(name) for name in names]
    assert len(set(short)) == 20 and max(map(len, short)) == report.MAX_LABEL_CHARS
    assert short[7].startswith("a_rather_lon") and short[7].endswith("number_07")
    assert report.shorten("cat") == "cat"


def _history(with_lr: bool = True) -> list[dict]:
    rows = []
    for epoch, stage in enumerate(["head", "head", "finetune", "finetune"], start=1):
        row = {"epoch": epoch, "stage": stage, "loss": 1 / epoch, "val_loss": 1.1 / epoch}
        if with_lr:
            row.update(accuracy=0.2 * epoch, val_accuracy=0.2 * epoch, learning_rate=10.0**-epoch)
        rows.append(row)
    return rows


def test_training_curves_have_a_learning_rate_panel_and_read_history_csv_rows(tmp_path):
    full = report.plot_training_curves(_history(), str(tmp_path / "full.png"))
    loss_only = report.plot_training_curves(_history(False), str(tmp_path / "loss.png"))
    # Three panels (loss, accuracy, learning rate) against the loss alone.
    assert _png_size(full)[0] > 2.5 * _png_size(loss_only)[0]
    # Rows as history.csv gives them back: strings, and "" where a stage had no value.
    as_text = [{k: str(v) for k, v in row.items()} for row in _history()]
    as_text[0]["val_accuracy"] = ""
    assert report.plot_training_curves(as_text, str(tmp_path / "text.png"))


def test_the_summary_gives_best_epoch_scores_weakest_classes_notes_and_places(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.eye(3)[[0, 0, 1, 0, 2, 1]]
    metrics = {"val": report.classification_metrics(labels, probabilities, NAMES)}
    best = {"epoch": 3, "stage": "finetune", "monitor": "val_loss", "value": 0.25}
    lines = report.run_summary(metrics, best, str(tmp_path), ["/x/top_losses.csv"], ["skewed"])
    assert all(line.startswith("[tfxfer] ") for line in lines)
    text = "\n".join(lines)
    assert "best epoch 3 (stage 'finetune', val_loss=0.2500)" in text
    assert "val: accuracy=0.6667" in text
    # F1: cat 0.8, dog 0.5, fox 0.667: lowest first.
    assert "weakest classes by F1 (val): dog 0.50, fox 0.67, cat 0.80" in text
    assert "note: skewed" in text and "reports: top_losses.csv" in text
    assert lines[-1] == f"[tfxfer] run saved to {tmp_path}/"


# === TensorBoard ===


def test_tensorboard_scalars_continue_across_stages_and_a_resume(tmp_path):
    run_dir = open_run(str(tmp_path / "run"), {}, overwrite=False, resume=False)
    loggers = report.tensorboard_callbacks(run_dir)
    assert not acts_on_batches(loggers)  # a cached stage keeps several steps per call
    with pytest.raises(KeyboardInterrupt):
        tiny_two_stage_run(run_dir, validate=True, callbacks=[*loggers, InterruptAfterEpoch(3)])
    resumed = RunDir(str(tmp_path / "run"), resume=True)
    _, result = tiny_two_stage_run(
        resumed, seed=1, validate=True, callbacks=report.tensorboard_callbacks(resumed)
    )
    history = {row["epoch"]: row for row in result.history}
    train = _scalars(str(tmp_path / "run" / "tensorboard" / "train"))
    validation = _scalars(str(tmp_path / "run" / "tensorboard" / "validation"))
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(train)
    assert {"epoch_loss", "epoch_accuracy"} <= set(validation)
    # Global epochs 1-4 through the head stage, the fine-tuning stage and the resume.
    for tag, key in (("epoch_loss", "loss"), ("epoch_learning_rate", "learning_rate")):
        assert train[tag] == pytest.approx({e: history[e][key] for e in (1, 2, 3, 4)}), tag
    assert validation["epoch_loss"] == pytest.approx({e: history[e]["val_loss"] for e in history})
    assert report.tensorboard_callbacks(resumed, write=False) == []


# === A finished run ===


@pytest.fixture(scope="module")
def finished_run(shapes_dir, tmp_path_factory):
    """The tiny model trained for two epochs on the shapes folder and finished as a recipe."""
    path = str(tmp_path_factory.mktemp("reports") / "run")
    data = tfxfer.load_images(shapes_dir, val_split=0.5, seed=0)
    backbone, model = tiny_model(num_classes=len(data.class_names))
    datasets = make_datasets(data, backbone, batch_size=8)
    run_dir = open_run(path, {"seed": 0}, overwrite=False, resume=False)
    result = tfxfer.run_schedule(
        model,
        backbone,
        [tfxfer.Stage("head", 2, learning_rate=1e-2)],
        datasets.train,
        datasets.val,
        run_dir=run_dir,
        callbacks=report.tensorboard_callbacks(run_dir),
        verbose=0,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = finish_run(
            run_dir,
            model,
            result,
            data.class_names,
            {"val": datasets.val},
            examples={"val": data.val},
            export_saved_model=False,
            notes=["classes are imbalanced"],
        )
    return {
        "path": path,
        "data": data,
        "metrics": metrics,
        "model": model,
        "sets": datasets,
        "printed": printed.getvalue(),
    }


def test_a_run_writes_every_report_and_overwrite_deletes_exactly_them(finished_run, tmp_path):
    path = finished_run["path"]
    reports = {
        "training_curves.png",
        "confusion_matrix.png",
        "per_class.csv",
        "top_losses.csv",
        "top_losses.png",
        "tensorboard",
    }
    assert reports <= set(os.listdir(path))
    copy = shutil.copytree(path, str(tmp_path / "run"))
    RunDir(copy, overwrite=True)
    assert sorted(os.listdir(copy)) == [MANIFEST, "checkpoints"]


def test_top_losses_csv_pairs_each_val_image_with_its_own_label(finished_run):
    rows = _read_csv(os.path.join(finished_run["path"], "top_losses.csv"))
    data = finished_run["data"]
    assert rows, "two epochs of the tiny model leave some mistakes"
    assert list(rows[0]) == list(report.TOP_LOSS_COLUMNS)
    losses = [float(row["loss"]) for row in rows]
    assert losses == sorted(losses, reverse=True)
    for row in rows:
        assert row["input"] in data.val.inputs
        # The class folder the image came from is the true label the table gives it.
        assert os.path.basename(os.path.dirname(row["input"])) == row["true_label"]
        assert row["predicted_label"] != row["true_label"]
    # The worst row is the wrong prediction with the lowest probability of the truth.
    labels, probabilities = report.collect(finished_run["model"], finished_run["sets"].val)
    truth = probabilities[np.arange(len(labels)), labels]
    wrong = probabilities.argmax(-1) != labels
    worst = data.val.inputs[int(np.flatnonzero(wrong)[truth[wrong].argmin()])]
    assert rows[0]["input"] == worst
    assert float(rows[0]["true_probability"]) == pytest.approx(truth[wrong].min(), abs=1e-4)


def test_the_finished_run_prints_its_summary_and_logs_tensorboard(finished_run):
    printed = finished_run["printed"].splitlines()
    path = finished_run["path"]
    assert printed[0].startswith("[tfxfer] best epoch ") and "val: accuracy=" in printed[1]
    assert "[tfxfer] note: classes are imbalanced" in printed
    assert any(line.startswith("[tfxfer] weakest classes by F1 (val): ") for line in printed)
    assert f"[tfxfer] TensorBoard: tensorboard --logdir {path}/tensorboard" in printed
    assert printed[-1] == f"[tfxfer] run saved to {path}/"
    scalars = _scalars(os.path.join(finished_run["path"], "tensorboard", "train"))
    assert sorted(scalars["epoch_loss"]) == [1, 2]
    per_class = _read_csv(os.path.join(finished_run["path"], "per_class.csv"))
    assert [row["class"] for row in per_class] == finished_run["data"].class_names
    val = finished_run["metrics"]["val"]
    assert float(per_class[0]["f1"]) == pytest.approx(val["per_class"]["circle"]["f1"], abs=1e-4)


def test_evaluation_batches_keep_the_order_of_the_examples(tmp_path):
    """`top_losses.csv` pairs `data.val.inputs[i]` with prediction i: the order must match."""
    root = tmp_path / "solid"
    for i in range(10):
        folder = root / ("odd" if i % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        # Solid colours survive resizing exactly: the red channel says which file it was.
        pixels = np.full((20, 20, 3), (20 * i, 0, 0), np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    data = tfxfer.load_images(str(root), test_directory=str(root), val_split=0.5, seed=3)
    datasets = make_datasets(data, tiny_backbone(), batch_size=3)
    for split, dataset in (("val", datasets.val), ("test", datasets.test)):
        reds = [int(image[0, 0, 0]) for images, _ in dataset for image in images.numpy()]
        expected = [20 * int(os.path.basename(p)[:2]) for p in getattr(data, split).inputs]
        assert reds == expected, split
