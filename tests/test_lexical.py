"""The lexical backbone (`tfidf`): TF-IDF as a real layer, alone and fused with a BERT."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from bert_helpers import VOCAB, write_hf_checkpoint
from helpers import InterruptAfterEpoch, save_and_reload_alike

import tfxfer
from tfxfer.data.examples import Examples
from tfxfer.errors import DataError, TfxferError
from tfxfer.fusion import build_fusion_model
from tfxfer.layers.tfidf_vectorizer import fit_tfidf
from tfxfer.solver import fit_linear_head
from tfxfer.train import features as feature_cache
from tfxfer.train.head_solver import solve_head

TRAIN_ROWS = [
    ("gcc fails to link libfoo.so", "devel"),
    ("the compiler cannot find the header", "devel"),
    ("build the kernel module with make", "devel"),
    ("python setup.py build_ext fails", "devel"),
    ("postfix rejects the mail from my server", "mail"),
    ("dovecot imap login is slow", "mail"),
    ("spam filter drops every message", "mail"),
    ("the smtp relay needs tls", "mail"),
] * 2
TEST_ROWS = [("the linker cannot find libfoo", "devel"), ("imap mail stuck", "mail")]


def _csv(path, rows) -> str:
    path.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n")
    return str(path)


# === The layer ===


def test_the_vectors_equal_scikit_learns_tfidf_with_word_pairs_and_sublinear_tf():
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [t for t, _ in TRAIN_ROWS[:8]] + ["The THE the cat; cat_dog, Ünïcode wörds!"]
    layer = fit_tfidf(texts)
    reference = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    expected = reference.fit_transform(texts).toarray()
    assert sorted(layer.vocabulary) == sorted(reference.vocabulary_)
    columns = [reference.vocabulary_[term] for term in layer.vocabulary]
    np.testing.assert_allclose(layer(tf.constant(texts)), expected[:, columns], atol=1e-6)


def test_max_terms_keeps_the_most_frequent_and_unseen_words_count_nowhere():
    layer = fit_tfidf(["red red red blue", "red green"], max_terms=2, ngrams=1)
    assert layer.vocabulary == ["red", "blue"] or layer.vocabulary == ["red", "green"]
    assert layer.width == 2
    np.testing.assert_array_equal(layer(tf.constant(["purple yellow"])), [[0.0, 0.0]])


def test_bad_settings_and_texts_without_words_are_one_line_errors():
    with pytest.raises(ValueError, match="max_terms"):
        fit_tfidf(["a text"], max_terms=0)
    with pytest.raises(ValueError, match="ngrams"):
        fit_tfidf(["a text"], ngrams=5)
    with pytest.raises(DataError, match="hold no words"):
        tfxfer.build_backbone("tfidf", texts=["!!!", "?? --"])
    with pytest.raises(TfxferError, match="learns its vocabulary from the training texts"):
        tfxfer.build_backbone("tfidf")
    with pytest.raises(TfxferError, match="no pretrained weights"):
        tfxfer.build_backbone("tfidf", texts=["a text"], weights=False)
    with pytest.raises(TfxferError, match="source-task head"):
        tfxfer.build_backbone("tfidf", texts=["a text"], source_head=True)


# === Alone ===


def test_the_tfidf_model_takes_raw_strings_saves_reloads_and_exports_alike(tmp_path):
    texts = [t for t, _ in TRAIN_ROWS]
    backbone = tfxfer.build_backbone("tfidf", texts=texts)
    assert backbone.preprocessor is None and backbone.output_kind == "vector"
    assert tfxfer.known_backbones()["text"].count("tfidf") == 1
    model = tfxfer.build_model(backbone, 2)
    probe = tf.constant(["gcc cannot link", "smtp mail relay", "nothing known here"])
    save_and_reload_alike(model, tmp_path / "m.keras", probe)
    tfxfer.export.export_saved_model(model, str(tmp_path / "export"))
    exported = tf.saved_model.load(str(tmp_path / "export"))  # held: its tables live in it
    served = exported.serve(probe)
    np.testing.assert_allclose(served, model.predict(probe, verbose=0), atol=1e-6)


def test_the_recipe_learns_the_vocabulary_from_the_training_split_only(tmp_path, capsys):
    from recipes.bert_text_classifier import Config, main

    rows = [*TRAIN_ROWS, ("zebra zebra zebra", "mail")]
    config = Config(
        train=_csv(tmp_path / "train.csv", rows),
        val=_csv(tmp_path / "val.csv", [("quokka compiler", "devel"), ("quokka mail", "mail")]),
        test=_csv(tmp_path / "test.csv", TEST_ROWS),
        output_dir=str(tmp_path / "run"),
        backbone="tfidf",
        export=False,
        verbose=0,
        quiet=True,
    )
    result = main(config)
    layer = result["model"].get_layer("tfidf_network").get_layer("tfidf")
    assert "zebra" in layer.vocabulary and "quokka" not in layer.vocabulary
    # Nothing to fine-tune: the default schedule ends on the solved head.
    assert result["metrics"]["selection"]["rule"] == "head_only"
    assert result["metrics"]["test"]["accuracy"] == 1.0
    # The saved model takes raw strings in its first layer: predict and evaluate feed them.
    from tfxfer.cli import main as tfxfer_command

    run = str(result["run_dir"])
    capsys.readouterr()  # the run's own lines
    assert tfxfer_command(["evaluate", run, "--text-file", config.test]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    assert tfxfer_command(["predict", run, "--texts", "gcc link error", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] == "devel"


# === Fused with a BERT ===


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lexical") / "bert"
    write_hf_checkpoint(path)
    return str(path)


def _fused(bert_dir: str, texts: list[str]):
    backbones = [
        tfxfer.build_backbone(bert_dir, sequence_length=16),
        tfxfer.build_backbone("tfidf", texts=texts),
    ]
    return backbones, build_fusion_model(backbones, 2)


def test_a_bert_and_tfidf_fuse_each_reads_its_own_view_and_the_whole_saves_and_exports(
    bert_dir, tmp_path
):
    texts = [t for t, _ in TRAIN_ROWS]
    backbones, model = _fused(bert_dir, texts)
    assert sorted(model.input) == ["padding_mask", "segment_ids", "text", "token_ids"]
    serving = tfxfer.export.serving_model(model, backbones)
    probe = ["gcc cannot link", "smtp mail relay"]
    views = backbones[1].preprocessor(tf.constant(probe))
    assert sorted(views) == ["padding_mask", "segment_ids", "text", "token_ids"]
    expected = np.asarray(model(views))
    np.testing.assert_allclose(serving.predict(np.array(probe), verbose=0), expected, atol=1e-5)
    save_and_reload_alike(serving, tmp_path / "fused.keras", np.array(probe), atol=1e-5)
    tfxfer.export.export_saved_model(serving, str(tmp_path / "export"))
    exported = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(exported.serve(tf.constant(probe)), expected, atol=1e-5)
    # TFLite has no string ops for the lexical branch: refused in one line, nothing written.
    with pytest.raises(TfxferError, match="lexical branch.*--format savedmodel"):
        tfxfer.export.export_tflite(serving, str(tmp_path / "m.tflite"))
    assert not (tmp_path / "m.tflite").exists()


def test_two_tokenizers_fuse_only_when_one_branch_is_lexical(bert_dir, tmp_path):
    write_hf_checkpoint(tmp_path / "other", vocab=[*VOCAB, "extra"])
    other = tfxfer.build_backbone(str(tmp_path / "other"), sequence_length=16)
    with pytest.raises(TfxferError, match="tokenizers differ.*only a lexical branch"):
        build_fusion_model([tfxfer.build_backbone(bert_dir, sequence_length=16), other], 2)
    lexical = tfxfer.build_backbone("tfidf", texts=["a text", "another"])
    assert build_fusion_model([other, lexical], 2).get_layer("fusion").widths[0] == 16


def _fused_run(run_dir, bert_dir, *, callbacks=None, resume=False):
    keras.utils.set_random_seed(3)
    texts, labels = [t for t, _ in TRAIN_ROWS], [0 if y == "devel" else 1 for _, y in TRAIN_ROWS]
    names = ["devel", "mail"]
    data = tfxfer.LabelledData(
        train=Examples(texts, labels, names, "text"),
        val=Examples(texts[:8], labels[:8], names, "text"),
        test=None,
        class_names=names,
        kind="text",
    )
    backbones, model = _fused(bert_dir, texts)
    datasets = tfxfer.make_datasets(data, backbones, batch_size=8, seed=0)
    stages = [
        tfxfer.Stage("head", 1, solver="lbfgs"),
        tfxfer.Stage("finetune", 2, train="all", learning_rate=1e-3),
    ]
    result = tfxfer.run_schedule(
        model,
        backbones,
        stages,
        datasets.train,
        datasets.val,
        run_dir=tfxfer.RunDir(str(run_dir), resume=resume),
        callbacks=callbacks,
        verbose=0,
    )
    return model, result


@pytest.mark.large  # three fused runs, ~20 s
def test_a_fused_run_solves_the_head_fine_tunes_bert_and_resumes_where_it_would_end(
    bert_dir, tmp_path
):
    whole, result = _fused_run(tmp_path / "whole", bert_dir)
    solved = result.stages["head"]["solver"]
    assert solved["blocks_chosen"]["weights"][0] == 1.0 and len(solved["cv_loss"]) > 1
    assert result.stages["finetune"]["cached_features"] is False
    with pytest.raises(KeyboardInterrupt):
        _fused_run(tmp_path / "cut", bert_dir, callbacks=[InterruptAfterEpoch(2)])
    feature_cache.STORE.clear()
    resumed, again = _fused_run(tmp_path / "cut", bert_dir, resume=True)
    assert again.resumed_from_epoch == 2  # mid fine-tuning: epoch 3 is the one left
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


# === The solver's branch weights ===


def test_the_solver_weighs_branches_by_cross_validation_and_folds_it_into_the_kernel():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    informative = (labels[:, None] * 2.0 - 1.0) + rng.normal(0, 1.5, (60, 4))
    noise = rng.normal(0, 1.0, (60, 40))
    # The informative branch at a hundredth of the other's scale: one penalty over both
    # leaves it out, as MiniLM's norm-4 vectors would crowd out norm-1 TF-IDF ones.
    features = np.concatenate([noise, informative * 0.01], axis=1).astype(np.float32)
    layer = keras.layers.Dense(2, name="predictions")
    layer.build((None, 44))
    info = solve_head(layer, features, labels, "single_label", blocks=[40, 4])
    chosen = info["blocks_chosen"]
    assert len(chosen["cv_loss"]) == 5
    best = min(chosen["cv_loss"], key=chosen["cv_loss"].get)
    assert best == ":".join(f"{w:g}" for w in chosen["weights"])
    plain = fit_linear_head(features, labels, standardize=False, rescale=True, num_outputs=2)
    assert chosen["cv_loss"][best] < min(plain.cv_loss.values()) - 0.2
    # The kernel reads the raw features: the branch scales are folded into it.
    norms, weights = chosen["row_norms"], chosen["weights"]
    scale = np.repeat([weights[0] / norms[0], weights[1] / norms[1]], [40, 4])
    fit = fit_linear_head(
        features * scale, labels, standardize=False, rescale=True, seed=0, num_outputs=2
    )
    np.testing.assert_allclose(
        layer(features), features * scale @ fit.kernel + fit.bias, rtol=1e-4, atol=1e-4
    )


def test_a_classifier_on_tfidf_fine_tunes_predicts_and_evaluates_raw_strings(tmp_path):
    train = _csv(tmp_path / "train.csv", TRAIN_ROWS)
    clf = tfxfer.Classifier.from_file(
        train, backbone="tfidf", output_dir=str(tmp_path / "run"), verbose=0, quiet=True
    )
    clf.fine_tune()
    seen = ["gcc fails to link libfoo.so", "dovecot imap login is slow"]  # training texts
    assert [p["label"] for p in clf.predict(seen)] == ["devel", "mail"]
    assert clf.evaluate(_csv(tmp_path / "test.csv", TEST_ROWS))["accuracy"] == 1.0


def test_few_labels_run_setfit_on_the_bert_branch_of_the_hybrid_and_leave_tfidf_as_fitted(
    bert_dir, tmp_path
):
    """The recipe's automatic SetFit (few texts a class) trains the BERT branch of a fusion
    with a lexical branch, on the BERT's own pooled features; the TF-IDF branch is untouched."""
    from recipes.bert_text_classifier import Config, main

    config = Config.smoke(
        train=_csv(tmp_path / "train.csv", TRAIN_ROWS),
        output_dir=str(tmp_path / "run"),
        backbone=f"{bert_dir},tfidf",
        contrastive_pairs="auto",
        head_epochs=None,  # the solved head
        finetune_epochs=None,  # dropped after the automatic SetFit: only SetFit moves the BERT
        val_split=0.25,
    )
    keras.utils.set_random_seed(0)
    untrained = tfxfer.build_backbone(bert_dir, sequence_length=config.sequence_length)
    result = main(config)
    info = json.loads((tmp_path / "run" / "contrastive.json").read_text())
    assert info["mode"] == "in_batch" and info["finetune"] == "dropped after the automatic SetFit"
    bert, lexical = result["backbone"]
    moved = [
        not np.allclose(a, b)
        for a, b in zip(bert.network.get_weights(), untrained.network.get_weights(), strict=True)
    ]
    assert any(moved)
    layer = lexical.network.get_layer("tfidf")
    assert layer.vocabulary == fit_tfidf(_texts_of(config)).vocabulary
    solved = json.loads((tmp_path / "run" / "stages.json").read_text())["head"]["solver"]
    assert "blocks_chosen" in solved


def _texts_of(config) -> list[str]:
    """The training split's texts of a run's config (its validation split held out)."""
    from tfxfer.recipe import load_data

    return list(load_data(config, config.train).train.inputs)
