"""Masked-LM pretraining: BERT's masking rule, replayable masks, the recipe, its preset, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from bert_helpers import VOCAB, write_hf_checkpoint

import tfxfer
from tfxfer.data.unlabelled import read_unlabelled_texts
from tfxfer.errors import DataError, TfxferError, WeightsError
from tfxfer.pretrain.masked_lm import (
    UNUSED_SLOT,
    MaskedTokenAccuracy,
    TokenMasker,
    check_mask_rate,
    masked_train_data,
    masker_for,
)

PAD, CLS, SEP, MASK = 0, 2, 3, 4
WORDS = VOCAB[5:]


def _batch(lengths: list[int], width: int, seed: int = 0) -> dict[str, tf.Tensor]:
    """Token dicts of texts of `lengths` words between [CLS] and [SEP], padded to `width`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        ids[row, : n + 2] = [CLS, *rng.integers(5, len(VOCAB), n), SEP]
    return {
        "token_ids": tf.constant(ids),
        "segment_ids": tf.zeros_like(ids),
        "padding_mask": tf.constant(ids != PAD),
    }


def _masker(rate: float = 0.15) -> TokenMasker:
    return TokenMasker(
        mask_token_id=MASK, vocabulary_size=len(VOCAB), unselectable_ids=[PAD, CLS, SEP], rate=rate
    )


def test_masking_follows_berts_rule():
    x = _batch([60] * 400, width=64)
    inputs, labels = _masker()(x, tf.constant([0, 1], tf.int64))
    original, masked = x["token_ids"].numpy(), inputs["token_ids"].numpy()
    labels, positions = labels.numpy(), inputs["mask_positions"].numpy()
    assert labels.shape == positions.shape == (400, 10)  # ceil(0.15 * 64) slots
    used = labels != UNUSED_SLOT
    assert (used.sum(axis=1) == 9).all()  # round(0.15 * 60) tokens of each text
    rows = np.arange(400)[:, None].repeat(10, axis=1)
    assert (labels[used] == original[rows[used], positions[used]]).all()
    chosen = np.zeros_like(original, bool)
    chosen[rows[used], positions[used]] = True
    # Padding, [CLS] and [SEP] are never chosen; tokens not chosen are never changed.
    assert not chosen[np.isin(original, [PAD, CLS, SEP])].any()
    assert (masked[~chosen] == original[~chosen]).all()
    now = masked[chosen]
    was = original[chosen]
    share_mask = np.mean(now == MASK)
    share_kept = np.mean(now == was)
    assert 0.77 < share_mask < 0.83, share_mask  # 80% [MASK]
    # 10% kept, plus the random draws that happen to hit the original token (1/22 of 10%).
    assert 0.09 < share_kept < 0.13, share_kept
    assert 0.08 < 1 - share_mask - share_kept < 0.12  # 10% random


def test_masks_are_a_function_of_the_seed():
    x = _batch([5, 12, 3, 30], width=32)
    masker = _masker()
    first = masker(x, tf.constant([3, 7], tf.int64))
    again = masker(x, tf.constant([3, 7], tf.int64))
    other = masker(x, tf.constant([3, 8], tf.int64))
    tf.nest.map_structure(np.testing.assert_array_equal, first, again)
    assert not np.array_equal(first[1].numpy(), other[1].numpy())


def test_short_texts_get_at_least_one_mask_and_empty_rows_none():
    x = _batch([1, 2, 0], width=16)
    _, labels = _masker()(x, tf.constant([0, 0], tf.int64))
    assert list((labels.numpy() != UNUSED_SLOT).sum(axis=1)) == [1, 1, 0]


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.1, "0.15", True, float("nan")])
def test_a_mask_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(TfxferError, match="mask rate to be a number in \\(0, 1\\)"):
        check_mask_rate(rate)


def test_masked_token_accuracy_counts_masked_slots_only():
    metric = MaskedTokenAccuracy()
    logits = np.zeros((1, 3, 5), np.float32)
    logits[0, 0, 2] = logits[0, 1, 4] = logits[0, 2, 1] = 1.0
    metric.update_state(np.array([[2, 3, UNUSED_SLOT]]), logits)
    assert float(metric.result()) == pytest.approx(0.5)


def test_training_batches_and_their_masks_replay_from_any_step(tmp_path):
    write_hf_checkpoint(tmp_path / "bert")
    backbone = tfxfer.build_backbone(str(tmp_path / "bert"), sequence_length=16)
    texts = [" ".join(WORDS[i % 7 : i % 7 + 2 + i % 5]) for i in range(40)]
    data = masked_train_data(texts, backbone, masker_for(backbone), batch_size=8, seed=4)
    assert data.steps_per_epoch == 5
    whole = list(data.build(0, 0).take(8).as_numpy_iterator())
    resumed = list(data.build(1, 2).take(1).as_numpy_iterator())
    # Batch 2 of epoch 1 is the run's 8th batch: the same texts and the same masks.
    tf.nest.map_structure(np.testing.assert_array_equal, resumed[0], whole[7])
    # Epochs mask anew: the same text is masked differently in another epoch.
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(whole[:3], whole[5:8], strict=True))


def test_a_new_masked_lm_head_trains_alone_first_by_default(tmp_path):
    from bert_helpers import write_masked_lm_preset

    from recipes.bert_mlm_pretrain import Config

    write_hf_checkpoint(tmp_path / "hf")  # a BertModel: no masked-LM head
    write_masked_lm_preset(tmp_path / "preset")  # a BertMaskedLM: its own head
    new_head = Config(backbone=str(tmp_path / "hf"), epochs=2).stages()
    assert [(s.name, s.epochs, s.train) for s in new_head] == [
        ("head", 1, "head"),
        ("pretrain", 2, "all"),
    ]
    assert [s.name for s in Config(backbone=str(tmp_path / "preset")).stages()] == ["pretrain"]
    assert [s.name for s in Config(backbone=str(tmp_path / "hf"), head_epochs=0).stages()] == [
        "pretrain"
    ]
    problems = Config(head_epochs=-1, head_learning_rate=0.0).problems()
    assert "head_epochs=-1 (expected an integer >= 0, or none)" in problems
    assert "head_learning_rate=0.0 (expected a number > 0)" in problems


# === Reading unlabelled texts ===


def test_unlabelled_texts_from_a_txt_a_table_and_a_folder(tmp_path):
    (tmp_path / "corpus.txt").write_text("first text\n\n   \nsecond text\n", encoding="utf-8")
    assert read_unlabelled_texts(str(tmp_path / "corpus.txt")) == ["first text", "second text"]
    (tmp_path / "t.csv").write_text('body,label\n"a, b",x\n,y\nc,z\n', encoding="utf-8")
    assert read_unlabelled_texts(str(tmp_path / "t.csv"), text_column="body") == ["a, b", "c"]
    (tmp_path / "t.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n', encoding="utf-8")
    assert read_unlabelled_texts(str(tmp_path / "t.jsonl")) == ["j1", "j2"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("one", encoding="utf-8")
    (folder / "sub" / "two.txt").write_text("two\nlines", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    assert read_unlabelled_texts(str(folder)) == ["one", "two\nlines"]


def test_an_empty_or_blank_corpus_is_refused(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\t\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no texts: every line or row in it is blank"):
        read_unlabelled_texts(str(tmp_path / "blank.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        read_unlabelled_texts(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        read_unlabelled_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "t.csv").write_text("body\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match="no column 'text'"):
        read_unlabelled_texts(str(tmp_path / "t.csv"))


def test_the_recipe_names_every_bad_setting_before_it_reads_anything(tmp_path, capsys):
    from recipes.bert_mlm_pretrain import Config, main
    from tfxfer.recipe import command_line

    argv = ["--corpus", str(tmp_path / "none.txt"), "--output-dir", str(tmp_path / "r")]
    status = command_line(main, Config, argv=[*argv, "--mask-rate", "1.5", "--epochs", "0"])
    error = capsys.readouterr().err
    assert status == 2
    assert "mask_rate=1.5 (expected a number in (0, 1)" in error
    assert "epochs=0 (expected a positive integer)" in error
    assert not (tmp_path / "r").exists()
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    argv = ["--corpus", str(tmp_path / "blank.txt"), "--output-dir", str(tmp_path / "r")]
    assert command_line(main, Config, argv=argv) == 2
    assert "holds no texts: every line or row in it is blank" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# === The recipe end to end ===

CORPUS = [
    "the movie was great fun",
    "i hated the awful plot",
    "a boring film it was",
    "loved the acting and the plot",
    "the film was bad and boring",
    "good fun i loved it",
] * 6


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    from recipes.bert_mlm_pretrain import Config, main

    root = tmp_path_factory.mktemp("mlm")
    write_hf_checkpoint(root / "bert")
    (root / "corpus.txt").write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    config = Config.smoke(
        corpus=str(root / "corpus.txt"),
        backbone=str(root / "bert"),
        output_dir=str(root / "run"),
        head_epochs=1,
        epochs=2,
        learning_rate=1e-3,
    )
    return main(config), config, root


@pytest.mark.large
def test_pretraining_writes_a_preset_the_text_recipe_fine_tunes_from(pretraining, tmp_path):
    from recipes.bert_text_classifier import Config, main

    result, _, root = pretraining
    run = Path(result["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    held_out = metrics["held_out"]
    assert held_out["masked_tokens"] > 0 and 0 <= held_out["masked_accuracy"] <= 1
    assert np.isfinite(held_out["perplexity"]) and held_out["perplexity"] > 1
    # The new masked-LM head trains alone for an epoch, then with the whole backbone.
    assert [row["stage"] for row in result["history"]] == ["head", "pretrain", "pretrain"]
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert result["output"] == str(run / "preset")
    pretrained = result["backbone"].network.get_layer("bert_backbone")
    # The run directory and the preset inside it are both backbones, with the masked-LM head.
    for source in (str(run), str(run / "preset")):
        backbone = tfxfer.build_backbone(source, sequence_length=16, source_head=True)
        loaded = backbone.network.get_layer("bert_backbone")
        for mine, theirs in zip(loaded.weights, pretrained.weights, strict=True):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
        assert "masked_lm" in backbone.source_heads
        assert backbone.preprocessor.tokenizer.get_vocabulary() == VOCAB
    rows = [("the movie was great fun", "pos"), ("i hated the awful plot", "neg")] * 8
    train = tmp_path / "labelled.csv"
    train.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    fine_tuned = main(
        Config.smoke(
            train=str(train),
            backbone=str(run),
            output_dir=str(tmp_path / "cls"),
            regularizer="source_task",
            regularizer_weight=0.5,
        )
    )
    assert fine_tuned["metrics"]["val"]["num_examples"] > 0


@pytest.mark.large
def test_a_killed_pretraining_run_resumes_to_the_uninterrupted_weights(
    pretraining, tmp_path, monkeypatch
):
    from recipes.bert_mlm_pretrain import main
    from tfxfer.train import callbacks as train

    result, config, _ = pretraining

    class Killed(Exception):
        pass

    original = train._EpochEnd.on_epoch_end

    def kill_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise Killed

    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(train._EpochEnd, "on_epoch_end", kill_after_first_epoch)
    with pytest.raises(Killed):
        main(type(config)(**{**config.__dict__, "output_dir": run_dir}))
    assert not (tmp_path / "run" / "preset").exists()
    with pytest.raises(WeightsError, match="pretraining run with no preset"):
        tfxfer.build_backbone(run_dir, sequence_length=16)
    monkeypatch.setattr(train._EpochEnd, "on_epoch_end", original)
    resumed = main(type(config)(**{**config.__dict__, "output_dir": run_dir, "resume": True}))
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    for mine, theirs in zip(resumed["model"].weights, result["model"].weights, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=1e-6, err_msg=mine.path)


@pytest.mark.large
def test_an_image_pretraining_run_is_not_a_text_backbone(pretraining, tmp_path):
    result, _, _ = pretraining
    config = json.loads((Path(result["run_dir"]) / "config.json").read_text())
    image_run = tmp_path / "simclr"
    image_run.mkdir()
    config["pretraining"] = {"objective": "contrastive", "modality": "image", "output": "w.h5"}
    (image_run / "config.json").write_text(json.dumps(config))
    (image_run / "w.h5").write_bytes(b"")
    with pytest.raises(WeightsError, match="pretraining run of an image backbone"):
        tfxfer.build_backbone(str(image_run), sequence_length=16)


@pytest.mark.large
def test_pretraining_runs_under_mirrored_strategy_in_bfloat16(tmp_path):
    import multiworker_helpers as mh

    mh.run_pretraining_under_mirrored("masked_lm", tmp_path)
    run = tmp_path / "run"
    # The preset is float32 whatever the run computed in, and loads as a backbone.
    preset = json.loads((run / "preset" / "config.json").read_text())
    assert preset["config"]["dtype"]["config"]["name"] == "float32"
    backbone = tfxfer.build_backbone(str(run), sequence_length=16)
    assert backbone.info["kind"] == "keras_hub_preset_dir"


def test_saving_a_preset_never_replaces_a_folder_tfxfer_did_not_write(tmp_path):
    from bert_helpers import write_masked_lm_preset

    from tfxfer.pretrain.masked_lm import save_masked_lm_preset

    task = write_masked_lm_preset(tmp_path / "source")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(TfxferError, match="is not a preset tfxfer wrote"):
        save_masked_lm_preset(task, str(mine))
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "source"]
    saved = save_masked_lm_preset(task, str(tmp_path / "out"), {"pooling": "mean"})
    assert save_masked_lm_preset(task, saved) == saved  # its own earlier save is replaced
