"""SetFit-style contrastive fine-tuning: pairs of labelled texts pull one class together."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfxfer
from tfxfer.train.features import split_at_head
from tfxfer.train.setfit import contrastive_finetune, make_pairs
from tfxfer.train.setfit_inbatch import (
    _batch_plan,
    all_pairs_loss,
    contrastive_plan,
    in_batch_finetune,
)

# Each class's texts mix its own words with words every class uses.
CLASS_WORDS = [["great", "good", "loved", "fun"], ["bad", "awful", "boring", "hated"]]
SHARED_WORDS = ["the", "a", "movie", "film", "plot", "acting", "it", "was"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from bert_helpers import write_hf_checkpoint
    from safetensors.numpy import load_file, save_file

    path = tmp_path_factory.mktemp("bert") / "hf_bert"
    write_hf_checkpoint(path)
    # Word embeddings 5x the helper's: at its scale every text's mean-pooled embedding
    # points the same way (cosine 0.95), leaving same-class pairs no room to grow closer.
    tensors = load_file(str(path / "model.safetensors"))
    tensors["embeddings.word_embeddings.weight"] *= 5
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)


def _texts(per_class: list[int], seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, count in enumerate(per_class):
        own = CLASS_WORDS[label % len(CLASS_WORDS)]
        for _ in range(count):
            words = [*rng.choice(own, 3), *rng.choice(SHARED_WORDS, int(rng.integers(2, 12)))]
            texts.append(" ".join(rng.permutation(words)))
            labels.append(label)
    return texts, np.asarray(labels, np.int32)


def _encoder(bert_path: str, classes: int = 2):
    keras.utils.set_random_seed(0)
    backbone = tfxfer.build_backbone(bert_path, sequence_length=64)
    model = tfxfer.build_model(backbone, classes, head=tfxfer.HeadConfig(pooling="mean"))
    return backbone, model, split_at_head(model).features


def _tokens(backbone, texts):
    return {k: np.asarray(v) for k, v in backbone.preprocessor(tf.constant(texts)).items()}


def _run(bert_path, per_class=(6, 6), **kwargs):
    backbone, model, features = _encoder(bert_path, len(per_class))
    texts, labels = _texts(list(per_class))
    inputs = _tokens(backbone, texts)
    kwargs = {"pairs_per_example": 4, "learning_rate": 3e-3, "batch_size": 8, **kwargs}
    info = contrastive_finetune(features, inputs, labels, **kwargs)
    return model, features, info


def test_same_class_pairs_grow_closer_and_different_class_pairs_apart(tiny_bert):
    _, _, info = _run(tiny_bert, epochs=2)
    assert info["positive_cosine_after"] > info["positive_cosine_before"]
    assert info["negative_cosine_after"] < info["negative_cosine_before"]
    assert info["positive_cosine_after"] - info["negative_cosine_after"] > 0.1
    assert info["pairs"] == 12 * 4 * 2 and info["positive_pairs"] == 48
    assert info["steps"] == 2 * 12 and len(info["epoch_losses"]) == 2
    assert "note" not in info
    json.dumps(info)  # the run records it as is


def _weight(backbone, path):
    return next(v.numpy() for v in backbone.network.weights if v.path == path)


@pytest.mark.large  # over ~10 s on two cores
def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(tiny_bert):
    runs = [_run(tiny_bert, per_class=(4, 4), seed=s) for s in (0, 0, 1)]
    a, b, c = ([v.numpy() for v in run[1].weights] for run in runs)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=True))
    assert runs[0][2]["final_loss"] == runs[1][2]["final_loss"]


@pytest.mark.large  # over ~10 s on two cores
def test_a_class_with_one_example_gets_no_same_class_pairs_and_says_so(tiny_bert):
    _, _, info = _run(tiny_bert, per_class=(4, 1, 4), pairs_per_example=3)
    assert "class ids 1" in info["note"]
    assert info["positive_pairs"] == 8 * 3 and info["negative_pairs"] == 9 * 3


def test_partners_go_through_their_pool_before_repeating():
    labels = np.asarray([0, 0, 0, 1, 1, 2])
    first, second, targets, note = make_pairs(labels, 5, np.random.default_rng(0))
    assert "class ids 2" in note
    assert not np.any(first == second)
    assert np.array_equal(targets == 1, labels[first] == labels[second])
    for i in range(len(labels)):
        others = second[(first == i) & (targets == 0)]
        assert len(set(others.tolist())) == min(5, int(np.sum(labels != labels[i])))
    # Same inputs, same seed: the same pairs.
    again = make_pairs(labels, 5, np.random.default_rng(0))
    assert all(
        np.array_equal(x, y) for x, y in zip((first, second, targets), again[:3], strict=True)
    )


def test_a_labelled_dataset_can_stand_in_for_arrays(tiny_bert):
    backbone, _, features = _encoder(tiny_bert)
    texts, labels = _texts([3, 3])
    tokens = backbone.preprocessor(tf.constant(texts))
    examples = tf.data.Dataset.from_tensor_slices((dict(tokens), labels))
    info = contrastive_finetune(features, examples, pairs_per_example=1)
    assert info["pairs"] == 12


def test_bad_labels_are_refused_with_what_was_received(tiny_bert):
    backbone, _, features = _encoder(tiny_bert)
    texts, labels = _texts([3, 3])
    with pytest.raises(tfxfer.TfxferError, match="Received: shape=\\(5,\\)"):
        contrastive_finetune(features, _tokens(backbone, texts), labels[:5])
    with pytest.raises(tfxfer.TfxferError, match="pairs_per_example=0"):
        contrastive_finetune(features, _tokens(backbone, texts), labels, pairs_per_example=0)


# === In-batch SetFit (`setfit_inbatch`): the default with few labels ===


def test_the_all_pairs_loss_is_setfits_loss_over_every_pair_of_the_batch():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(6, 5)).astype("float32")
    labels = np.asarray([0, 0, 1, 1, 1, 2])
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    same, other = [], []
    for i in range(6):
        for j in range(i + 1, 6):
            cosine = float(unit[i] @ unit[j])
            (same if labels[i] == labels[j] else other).append(cosine)
    expected = 0.5 * np.mean([(c - 1) ** 2 for c in same]) + 0.5 * np.mean([c**2 for c in other])
    got = float(all_pairs_loss(labels, embeddings))
    assert got == pytest.approx(expected, rel=1e-5)
    # One kind of pair only: that kind's term alone.
    alone = float(all_pairs_loss(np.asarray([0, 1, 2]), embeddings[:3]))
    others = [float(unit[i] @ unit[j]) ** 2 for i, j in ((0, 1), (0, 2), (1, 2))]
    assert alone == pytest.approx(np.mean(others), rel=1e-5)


def test_batches_go_through_every_example_before_repeating_one():
    plan = _batch_plan(10, 7, 4, np.random.default_rng(0))
    assert [len(b) for b in plan] == [4] * 7
    flat = np.concatenate(plan)
    assert sorted(flat[:10].tolist()) == list(range(10))  # the first pass: each once
    assert sorted(flat[10:20].tolist()) == list(range(10))
    again = _batch_plan(10, 7, 4, np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(plan, again, strict=True))


def test_in_batch_setfit_pulls_classes_together_and_apart(tiny_bert):
    backbone, model, features = _encoder(tiny_bert, 2)
    texts, labels = _texts([6, 6])
    info = in_batch_finetune(
        features, _tokens(backbone, texts), labels, steps=12, batch_size=8, learning_rate=3e-3
    )
    assert info["mode"] == "in_batch" and info["steps"] == 12 and info["batch_size"] == 8
    assert info["pairs"] == 12 * 28
    assert info["positive_cosine_after"] > info["positive_cosine_before"]
    assert info["negative_cosine_after"] < info["negative_cosine_before"]
    assert info["positive_cosine_after"] - info["negative_cosine_after"] > 0.1
    json.dumps(info)


@pytest.mark.parametrize("train", ["pairs", "in_batch"])
def test_the_backbone_trains_in_place_and_trainable_flags_come_back(tiny_bert, train):
    backbone, model, features = _encoder(tiny_bert)
    # A head stage's flags: the backbone frozen, one head weight frozen inside a trainable layer.
    backbone.network.trainable = False
    output = model.layers[-1]
    output.kernel.trainable = False
    flags = [(layer.name, layer.trainable) for layer in model._flatten_layers()]
    weights = {v.path: v.trainable for v in model.weights}
    before = {v.path: np.array(v.numpy()) for v in backbone.network.weights}
    head_before = [np.array(v.numpy()) for v in output.weights]

    texts, labels = _texts([5, 5])
    if train == "pairs":
        contrastive_finetune(
            features, _tokens(backbone, texts), labels, pairs_per_example=2, learning_rate=1e-3
        )
    else:
        in_batch_finetune(features, _tokens(backbone, texts), labels, steps=3, learning_rate=1e-3)
    changed = [p for p, w in before.items() if not np.allclose(w, _weight(backbone, p))]
    assert len(changed) > len(before) // 2  # the encoder itself trained, frozen or not
    for old, variable in zip(head_before, output.weights, strict=True):
        np.testing.assert_array_equal(old, variable.numpy())  # the head took no part
    assert [(layer.name, layer.trainable) for layer in model._flatten_layers()] == flags
    assert {v.path: v.trainable for v in model.weights} == weights


def test_in_batch_setfit_refuses_bad_arguments_in_one_line(tiny_bert):
    backbone, _, features = _encoder(tiny_bert)
    texts, labels = _texts([3, 3])
    tokens = _tokens(backbone, texts)
    for kwargs, message in (
        ({"steps": 0}, "steps=0"),
        ({"batch_size": 1}, "batch_size` of at least 2"),
        ({"warmup": 1.0}, "warmup=1.0"),
    ):
        with pytest.raises(tfxfer.TfxferError, match=message):
            in_batch_finetune(features, tokens, labels, **kwargs)
    with pytest.raises(tfxfer.TfxferError, match="at least two examples"):
        in_batch_finetune(features, {k: v[:1] for k, v in tokens.items()}, labels[:1])


# === contrastive_pairs / contrastive_steps: what a run does ===


@pytest.mark.parametrize(
    ("counts", "multi_label", "expected"),
    [
        ({"a": 8, "b": 8}, False, ("in_batch", 30)),  # few texts a class: SetFit
        ({"a": 16, "b": 200}, False, ("in_batch", 30)),  # the smallest class decides
        ({"a": 17, "b": 40}, False, None),  # enough labels: the solved head alone
        ({"a": 4, "b": 4}, True, None),  # multi-label: not measured
        ({"a": 8}, False, None),  # one class: no other-class pairs
    ],
)
def test_auto_runs_in_batch_setfit_only_with_few_labels_a_class(counts, multi_label, expected):
    def plan(pairs, steps, plain=True):
        found = contrastive_plan(pairs, steps, counts, multi_label=multi_label, plain=plain)
        if found is None:
            return None
        return (found.mode, found.steps or found.pairs_per_example)

    assert plan("auto", "auto") == expected
    # Numbers are what they say, whatever the counts.
    assert plan(5, "auto") == ("pairs", 5)
    assert plan("auto", 7) == ("in_batch", 7)
    assert plan(0, "auto") is None and plan("auto", 0) is None
    # Fused encoders or a regularizer: auto stays off (not measured); a number still runs.
    assert plan("auto", "auto", plain=False) is None
    assert plan(5, "auto", plain=False) == ("pairs", 5)
    assert plan("auto", 4, plain=False) == ("in_batch", 4)


def test_the_text_recipe_defaults_to_auto_and_checks_the_field():
    from recipes.bert_text_classifier import Config

    assert Config().contrastive_pairs == "auto"
    assert Config.smoke().contrastive_pairs == 0  # smoke runs skip SetFit
    assert Config.from_flags(["--contrastive-pairs", "7"]).contrastive_pairs == 7
    assert Config.from_flags(["--contrastive-pairs", "auto"]).contrastive_pairs == "auto"
    assert Config().contrastive_steps == "auto"
    assert Config.from_flags(["--contrastive-steps", "12"]).contrastive_steps == 12
    for bad in (-1, "many", 2.5, True):
        for field in ("contrastive_pairs", "contrastive_steps"):
            problems = Config(**{field: bad}).problems()
            assert any(p.startswith(f"{field}={bad!r} (expected") for p in problems), bad


@pytest.mark.parametrize(
    "finetune_epochs",
    # Asked-for fine-tuning after SetFit: a second recipe run (~17 s), in the large tier.
    [None, pytest.param(1, marks=pytest.mark.large)],
)
def test_a_default_text_run_with_few_labels_trains_pairs_first(
    tiny_bert, tmp_path, finetune_epochs
):
    """The recipe's default ("auto") on 8 texts a class: in-batch SetFit runs and says so;
    then the solved head alone, refit on every label, unless fine-tuning epochs are given."""
    from recipes.bert_text_classifier import Config, main

    texts, labels = _texts([8, 8])
    names = ["pos" if y == 0 else "neg" for y in labels]
    rows = "".join(f"{t},{name}\n" for t, name in zip(texts, names, strict=True))
    (tmp_path / "train.csv").write_text("text,label\n" + rows, encoding="utf-8")
    config = Config.smoke(
        train=str(tmp_path / "train.csv"),
        output_dir=str(tmp_path / "run"),
        backbone=tiny_bert,
        contrastive_pairs="auto",
        head_epochs=None,  # the solved head
        finetune_epochs=finetune_epochs,
        val_split=0.25,
    )
    result = main(config)
    run = tmp_path / "run"
    info = json.loads((run / "contrastive.json").read_text())
    assert info["requested"] == "auto" and info["requested_steps"] == "auto"
    assert info["mode"] == "in_batch" and info["steps"] == 30
    assert info["pairs"] > 0
    stages = {row["stage"] for row in result["history"]}
    selection = json.loads((run / "metrics.json").read_text())["selection"]
    if finetune_epochs is None:
        assert info["finetune"] == "dropped after the automatic SetFit"
        assert stages == {"head"}
        assert selection["rule"] == "head_only" and selection["kept"] == "probe"
        assert selection["refit"]["examples"] == 16  # 12 training + 4 validation texts
        assert selection["val_held_out"] is False
    else:
        assert info["finetune"] == "run"
        assert stages == {"head", "finetune"}
        assert selection["rule"] != "head_only"
