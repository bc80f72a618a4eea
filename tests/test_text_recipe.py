"""The BERT text recipe end to end, on a tiny random BERT written to a temporary directory.

What is checked here is what a user relies on: the run directory and its metrics, that the
saved and exported models take raw strings and agree with the training-time (tokenized)
path, LoRA and layer-wise learning rates doing what they promise, and clear errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from bert_helpers import NEGATIVE, POSITIVE, write_csv
from helpers import assert_reloads_alike
from hub_helpers import SentenceEncoder

import tfxfer
from recipes.bert_text_classifier import Config, main
from tfxfer.backbones.base import LayerGroups
from tfxfer.data.examples import Examples, LabelledData
from tfxfer.data.pipeline import TrainData
from tfxfer.data.text import make_text_dataset
from tfxfer.errors import DataError, RunDirError, TfxferError
from tfxfer.schedule import apply_stage

# The text recipe end to end, on a tiny BERT (`bert_helpers`): the default tier.

REPO = Path(__file__).resolve().parent.parent


# The module's names for conftest.py's session fixtures (read-only; shared with other files).
@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir):
    return tiny_bert_dir


@pytest.fixture(scope="module")
def text_files(review_files):
    return review_files


@pytest.fixture(scope="module")
def finished_run(text_recipe_run):
    return text_recipe_run


def test_run_directory_holds_every_artifact(finished_run):
    run = Path(finished_run["run_dir"])
    for name in (
        "config.json",
        "history.csv",
        "metrics.json",
        "class_names.json",
        "model.keras",
        "export/saved_model.pb",
        "checkpoints/best.weights.h5",
        "checkpoints/latest.json",
    ):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    # Which of the probe and the fine-tuned model the run ended on, and why (keep_better).
    selection = metrics.pop("selection")
    assert selection["kept"] in ("probe", "finetuned") and selection["reason"]
    assert set(metrics) == {"val", "test"}
    for split in metrics.values():
        assert {"accuracy", "loss", "macro_f1", "per_class", "confusion_matrix"} <= set(split)
        assert 0.0 <= split["accuracy"] <= 1.0
    assert metrics["test"]["num_examples"] == 4
    assert json.loads((run / "class_names.json").read_text()) == ["neg", "pos"]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["train_examples"] + config["data"]["val_examples"] == 40
    assert config["backbone_info"]["pooling"] == "cls"
    assert "pooler" in config["backbone_info"]["groups"]
    assert config["distribution"]["global_batch_size"] == 8


def test_history_spans_both_stages_with_global_epochs(finished_run):
    history = finished_run["history"]
    assert [(row["epoch"], row["stage"]) for row in history] == [(1, "head"), (2, "finetune")]


def test_saved_model_takes_raw_strings_and_matches_the_training_path(finished_run):
    texts = ["great fun film", "boring awful plot", "i loved the acting"]
    backbone, model = finished_run["backbone"], finished_run["model"]
    tokenized = np.asarray(model(backbone.preprocessor(tf.constant(texts)), training=False))
    # In bfloat16 (mixed_precision "auto" on a CPU with AMX units) batch shapes change the
    # rounding: 8 bits of mantissa.
    atol = 1e-5 if model.dtype_policy.compute_dtype == "float32" else 2e-3

    reloaded = tfxfer.load_model(str(Path(finished_run["run_dir"]) / "model.keras"))
    from_list = reloaded.predict(texts, verbose=0)
    np.testing.assert_allclose(from_list, tokenized, atol=atol)

    exported = tf.saved_model.load(str(Path(finished_run["run_dir"]) / "export"))
    served = exported.serve(tf.constant(texts)).numpy()
    np.testing.assert_allclose(served, tokenized, atol=atol)


def test_metrics_json_matches_the_reloaded_model_on_the_test_file(finished_run, text_files):
    reloaded = tfxfer.load_model(str(Path(finished_run["run_dir"]) / "model.keras"))
    texts = ["great movie", "awful acting", "fun film", "boring film"]
    labels = np.array([1, 0, 1, 0])
    accuracy = float(np.mean(reloaded.predict(texts, verbose=0).argmax(-1) == labels))
    assert accuracy == pytest.approx(finished_run["metrics"]["test"]["accuracy"])


def _tiny_text_setup(bert_dir, sequence_length=16):
    backbone = tfxfer.build_backbone(bert_dir, sequence_length=sequence_length)
    model = tfxfer.build_model(backbone, 2, head=tfxfer.HeadConfig(pooling="mean", dropout=0.0))
    texts = POSITIVE + NEGATIVE
    labels = np.array([1] * len(POSITIVE) + [0] * len(NEGATIVE), np.int32)
    data = LabelledData(
        Examples(texts, labels, ["neg", "pos"], "text"), None, None, ["neg", "pos"], "text"
    )
    train = tfxfer.make_datasets(data, backbone, batch_size=10).train
    # Mean pooling never reads the pooler: the backbone itself keeps it out of the schedule.
    assert backbone.head_pooling == "mean" and "pooler" not in backbone.group_names
    unused = backbone.unused_layers()
    assert unused == backbone.layer_groups["pooler"]
    return backbone, model, train, unused


def _values(layers):
    return {v.path: np.array(v.numpy()) for layer in layers for v in layer.weights}


def test_lora_stage_trains_only_adapters_and_head(bert_dir):
    stages = [tfxfer.Stage("lora", 1, train="all", learning_rate=1e-2, lora_rank=2)]
    backbone, model, train, unused = _tiny_text_setup(bert_dir)
    backbone_layers = [layer for group in backbone.layer_groups.values() for layer in group]
    head = model.get_layer("predictions")
    before, head_before = _values(backbone_layers), head.kernel.numpy().copy()

    tfxfer.run_schedule(model, backbone, stages, train, None, verbose=0)

    after = _values(backbone_layers)
    adapters = [p for p in after if p.rsplit("/", 1)[-1].startswith("lora_kernel")]
    assert len(adapters) == 2 * 2 * 2  # query and value, in 2 layers, A and B
    assert all(not v.trainable for layer in unused for v in layer.weights)
    trainable = {v.path for v in model.trainable_variables}
    assert set(adapters) <= trainable
    assert not {p for p in after if p not in adapters} & trainable
    for path, value in after.items():
        if path in adapters:
            continue
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    assert any(np.abs(after[p]).sum() > 0 for p in adapters if p.endswith("lora_kernel_b"))
    assert not np.allclose(head.kernel.numpy(), head_before)


def test_lora_needs_a_backbone_with_adapter_targets():
    backbone = tfxfer.build_backbone("mobilenetv3small", weights=None, image_size=32)
    model = tfxfer.build_model(backbone, 2)
    stage = tfxfer.Stage("lora", 1, train="all", lora_rank=2)
    with pytest.raises(TfxferError, match="LoRA"):
        apply_stage(model, LayerGroups.of(backbone), stage)


def test_layerwise_lr_decay_moves_lower_bert_layers_less(bert_dir):
    decay = 0.5
    stages = [
        tfxfer.Stage(
            "finetune",
            1,
            train="all",
            learning_rate=1e-3,
            optimizer="adamw",
            weight_decay=0.0,
            warmup_fraction=0.0,
            decay="constant",
            layerwise_lr_decay=decay,
        )
    ]
    backbone, model, train, unused = _tiny_text_setup(bert_dir)
    groups = backbone.trainable_groups()
    before = {name: _values(layers) for name, layers in groups.items()}
    # One step: Adam's first update is lr * sign(gradient) per weight, so a moved weight moves
    # by its group's learning rate.
    one_step = TrainData(train.build, 1)
    tfxfer.run_schedule(model, backbone, stages, one_step, None, verbose=0)

    def typical_change(name):
        # Median over the weights that moved (an embedding row moves only if its token occurs).
        after = _values(groups[name])
        changes = np.concatenate([np.abs(after[p] - before[name][p]).ravel() for p in after])
        return float(np.median(changes[changes > 0]))

    top, middle, bottom = (typical_change(g) for g in ("layer_1", "layer_0", "embeddings"))
    assert top == pytest.approx(1e-3, rel=0.2)
    assert middle == pytest.approx(top * decay, rel=0.2)
    assert bottom == pytest.approx(top * decay**2, rel=0.2)


def test_multi_label_rows_train_sigmoid_outputs(bert_dir, tmp_path):
    rows = [(t, "pos|fun") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    train = write_csv(tmp_path / "multi.csv", rows * 2)
    config = Config.smoke(train=train, output_dir=str(tmp_path / "run"), backbone=bert_dir)
    config.multi_label, config.finetune_epochs = True, 0
    result = main(config)
    assert result["class_names"] == ["fun", "neg", "pos"]
    probabilities = result["serving_model"].predict(["great fun"], verbose=0)
    assert probabilities.shape == (1, 3)
    assert probabilities.sum() != pytest.approx(1.0, abs=1e-3)  # independent sigmoids
    assert "macro_f1" in result["metrics"]["val"]


# === Bad input ===


def test_label_only_in_test_file_is_named(bert_dir, text_files, tmp_path):
    train, _ = text_files
    test = write_csv(tmp_path / "test.csv", [("great movie", "pos"), ("meh", "neutral")])
    config = Config.smoke(train=train, output_dir=str(tmp_path / "run"), backbone=bert_dir)
    config.test = test
    with pytest.raises(DataError, match="neutral"):
        main(config)
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_missing_label_column_names_the_columns_found(bert_dir, tmp_path):
    train = write_csv(
        tmp_path / "train.csv", [(t, "pos") for t in POSITIVE], header=("review", "stars")
    )
    config = Config.smoke(train=train, output_dir=str(tmp_path / "run"), backbone=bert_dir)
    with pytest.raises(DataError, match="review"):
        main(config)


def test_sequence_length_above_the_model_maximum(bert_dir, text_files, tmp_path):
    config = Config.smoke(train=text_files[0], output_dir=str(tmp_path / "run"), backbone=bert_dir)
    config.sequence_length = 4096
    with pytest.raises(TfxferError, match="4096"):
        main(config)


def test_existing_run_is_not_overwritten(finished_run, bert_dir, text_files):
    run = Path(finished_run["run_dir"])
    before = (run / "metrics.json").read_bytes()
    with pytest.raises(RunDirError, match="--overwrite"):
        main(Config.smoke(train=text_files[0], output_dir=str(run), backbone=bert_dir))
    assert (run / "metrics.json").read_bytes() == before


@pytest.mark.large  # a child interpreter pays TensorFlow's import, ~6 s
def test_command_line_error_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.bert_text_classifier",
            "--train",
            str(tmp_path / "missing.csv"),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "missing.csv" in result.stderr
    assert "Traceback" not in result.stderr


def test_make_text_dataset_batches_token_dicts(bert_dir):
    backbone = tfxfer.build_backbone(bert_dir, sequence_length=8)
    ds = make_text_dataset(POSITIVE[:5], np.ones(5, np.int32), backbone.preprocessor, batch_size=2)
    x, y = next(iter(ds))
    assert set(x) == {"token_ids", "segment_ids", "padding_mask"}
    assert x["token_ids"].shape == (2, 8) and y.shape == (2,)


def test_recipe_trains_on_a_tf_hub_text_model(text_files, tmp_path):
    hub_dir = str(tmp_path / "encoder")
    tf.saved_model.save(SentenceEncoder(), hub_dir)
    config = Config.smoke(
        train=text_files[0], output_dir=str(tmp_path / "run"), backbone=f"hub:{hub_dir}"
    )
    config.export = True
    result = main(config)
    assert result["backbone"].output_kind == "vector"
    texts = tf.constant(["goal match", "oven recipe"])
    assert_reloads_alike(tmp_path / "run", result["model"], texts, atol=1e-6, safe_mode=False)


def test_cli_evaluate_and_export_a_finished_text_run(finished_run, text_files, tmp_path, capsys):
    from tfxfer.cli import main as tfxfer_command

    model = str(Path(finished_run["run_dir"]) / "model.keras")
    assert tfxfer_command(["evaluate", "--model", model, "--text-file", text_files[1]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(finished_run["metrics"]["test"]["accuracy"])
    assert tfxfer_command(["export", "--model", model, "--output", str(tmp_path / "sm")]) == 0
    exported = tf.saved_model.load(str(tmp_path / "sm"))
    served = exported.serve(tf.constant(["great fun"])).numpy()
    assert served.shape == (1, 2)


def test_cli_evaluate_refuses_labels_the_model_never_saw(finished_run, tmp_path, capsys):
    from tfxfer.cli import main as tfxfer_command

    other = write_csv(tmp_path / "other.csv", [("great movie", "pos"), ("meh", "neutral")])
    model = str(Path(finished_run["run_dir"]) / "model.keras")
    assert tfxfer_command(["evaluate", "--model", model, "--text-file", other]) == 2
    assert "neutral" in capsys.readouterr().err


@pytest.mark.large  # two recipe runs (LoRA, then full fine-tuning), ~8 s
def test_full_finetune_after_a_lora_stage_trains_the_backbone_again(bert_dir):
    stages = [
        tfxfer.Stage("lora", 1, train="all", learning_rate=1e-2, lora_rank=2),
        tfxfer.Stage("finetune", 1, train="all", learning_rate=1e-3),
    ]
    backbone, model, train, unused = _tiny_text_setup(bert_dir)
    layer = backbone.layer_groups["layer_0"][0]
    tfxfer.run_schedule(model, backbone, stages[:1], train, None, verbose=0)
    after_lora = {v.path: v.numpy().copy() for v in layer.weights}
    tfxfer.run_schedule(model, backbone, stages[1:], train, None, verbose=0)
    after = {v.path: v.numpy() for v in layer.weights}
    moved = {p for p in after if not np.allclose(after_lora[p], after[p])}
    # Every weight the LoRA stage froze trains again; the adapted query/value projections
    # go on learning through their adapters (their base kernels stay merged-later constants).
    adapted = {p.rsplit("/", 1)[0] for p in after if "lora_kernel" in p}
    expected = {
        p
        for p in after
        if p.endswith(("kernel", "gamma", "beta", "bias"))
        and not (p.endswith("/kernel") and p.rsplit("/", 1)[0] in adapted)
        # Attention's key bias adds the same score to every key: softmax ignores it,
        # so its gradient is exactly zero.
        and not p.endswith("key/bias")
    }
    assert expected <= moved, sorted(expected - moved)
    assert {p for p in after if "lora_kernel" in p} <= moved


@pytest.mark.large  # over ~10 s on two cores
def test_a_run_repeats_exactly_with_the_same_seed(bert_dir, text_files, tmp_path):
    def losses(name, seed):
        config = Config.smoke(
            train=text_files[0], output_dir=str(tmp_path / name), backbone=bert_dir
        )
        config.seed, config.finetune_epochs = seed, 0
        return [row["loss"] for row in main(config)["history"]]

    assert losses("first", 3) == losses("second", 3)
    assert losses("third", 3) != losses("fourth", 4)


def test_a_run_saved_before_the_rename_still_loads(finished_run, tmp_path):
    """Runs saved when the wrapper was called `TextClassifier` load as `RawTextModel`."""
    import zipfile

    saved = Path(finished_run["run_dir"]) / "model.keras"
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                assert config["registered_name"] == "tfxfer>RawTextModel"
                config["registered_name"], config["class_name"] = (
                    "tfxfer>TextClassifier",
                    "TextClassifier",
                )
                data = json.dumps(config).encode()
            target.writestr(item, data)
    texts = ["great fun film", "boring awful plot"]
    np.testing.assert_allclose(
        tfxfer.load_model(str(old)).predict(texts, verbose=0),
        tfxfer.load_model(str(saved)).predict(texts, verbose=0),
        atol=1e-6,
    )


@pytest.mark.large  # over ~10 s on two cores
def test_contrastive_pairs_train_the_encoder_before_the_solved_head(bert_dir, text_files, tmp_path):
    """SetFit as a recipe option: pairs first (recorded), then the default solved head."""
    config = Config.smoke(
        train=text_files[0],
        output_dir=str(tmp_path / "run"),
        backbone=bert_dir,
        contrastive_pairs=2,
        head_epochs=None,
        finetune_epochs=0,
    )
    result = main(config)
    info = json.loads((tmp_path / "run" / "contrastive.json").read_text())
    assert info["mode"] == "pairs" and info["pairs_per_example"] == 2
    assert info["pairs"] > 0 and info["steps"] > 0
    assert result["result"].stages["head"]["solver"]["folds"] >= 2
    assert [row["stage"] for row in result["history"]] == ["head"]
