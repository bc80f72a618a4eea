"""`tfxfer.Classifier`: from data and a backbone to a run directory, predictions and exports.

One tiny image run (a backbone object of our own, 16 px) and one tiny text run (a random
2-layer BERT, 16 tokens) are shared by the tests of each; the bad-input tests build nothing.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
from bert_helpers import VOCAB, WORDS, write_hf_checkpoint

import tfxfer
from tfxfer.backbones.from_model import backbone_from_model

TINY_RUN = {"batch_size": 8, "head_epochs": 1, "verbose": 0, "export": False}


def tiny_network(size: int = 16) -> keras.Model:
    """Three conv blocks with BatchNorm, named so a test can tell the groups apart."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = inputs
    for name, width in (("low", 4), ("mid", 8), ("top", 16)):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"{name}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return keras.Model(inputs, x, name="tiny_net")


def first_image_of_each_class(directory: str) -> list[str]:
    return [
        os.path.join(directory, c, sorted(os.listdir(os.path.join(directory, c)))[0])
        for c in sorted(os.listdir(directory))
    ]


@pytest.fixture(scope="module")
def image_run(shapes_dir, tmp_path_factory):
    network = tiny_network()
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in network.layers}
    output_dir = str(tmp_path_factory.mktemp("classifier") / "images")
    clf = tfxfer.Classifier.from_folder(
        shapes_dir, backbone=network, output_dir=output_dir, augment=False, **TINY_RUN
    )
    # The top group only: the stage must leave the lower groups as they were.
    # keep_better off: the test looks at what the stage trained, not at which model won.
    metrics = clf.fine_tune(epochs=1, unfreeze="1", finetune_learning_rate=0.05, keep_better=False)
    return {"clf": clf, "network": network, "before": before, "metrics": metrics}


def test_image_run_end_to_end(image_run, shapes_dir, tmp_path):
    clf = image_run["clf"]
    assert clf.class_names == ["circle", "square", "triangle"]
    assert set(image_run["metrics"]) == {"val"}  # no selection with keep_better=False
    run_files = set(os.listdir(clf.run_dir))
    assert {"config.json", "metrics.json", "model.keras", "class_names.json"} <= run_files
    with open(os.path.join(clf.run_dir, "config.json")) as handle:
        config = json.load(handle)
    assert config["backbone"] == "custom:tiny_net" and config["kind"] == "image"

    scores = clf.evaluate(shapes_dir)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(scores)
    assert np.asarray(scores["confusion_matrix"]).sum() == 18  # every image, once

    paths = first_image_of_each_class(shapes_dir)
    predictions = clf.predict(paths, top_k=2)
    assert [p["input"] for p in predictions] == paths
    for p in predictions:
        assert len(p["top_k"]) == 2 and p["top_k"][0] == (p["label"], p["probability"])
        assert p["top_k"][0][1] >= p["top_k"][1][1] and p["label"] in clf.class_names
    # A folder means its images; raw uint8 arrays work too.
    assert len(clf.predict(os.path.join(shapes_dir, "circle"))) == 6
    assert len(clf.predict(np.zeros((2, 40, 40, 3), "uint8"))) == 2

    export = clf.export(str(tmp_path / "export"))
    assert os.path.isfile(os.path.join(export, "saved_model.pb"))

    loaded = tfxfer.Classifier.load(clf.run_dir)
    assert loaded.class_names == clf.class_names and loaded.kind == "image"
    again = loaded.predict(paths, top_k=2)
    for a, b in zip(predictions, again, strict=True):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(
            [p for _, p in a["top_k"]], [p for _, p in b["top_k"]], rtol=1e-5, atol=1e-6
        )
    assert loaded.evaluate(shapes_dir)["accuracy"] == pytest.approx(scores["accuracy"])


def test_inferred_groups_and_a_stage_trains_only_its_groups(image_run):
    clf, before = image_run["clf"], image_run["before"]
    groups = clf.backbone.layer_groups
    assert list(groups) == clf.backbone.group_names and len(groups) >= 2
    # In model order, about equal parameter counts: the wide top conv starts the last group.
    order = [layer.name for members in groups.values() for layer in members]
    assert order == [layer.name for layer in clf.backbone.network.layers[1:]]
    assert "top_conv" in {layer.name for layer in groups[list(groups)[-1]]}
    lower = [layer for name in list(groups)[:-1] for layer in groups[name]]
    for layer in lower:  # frozen in both stages (BatchNorm statistics included)
        for new, old in zip(layer.get_weights(), before[layer.name], strict=True):
            np.testing.assert_array_equal(new, old, err_msg=layer.name)
    top_conv = clf.backbone.network.get_layer("top_conv")
    assert not np.allclose(top_conv.get_weights()[0], before["top_conv"][0])
    # The run trained a copy: the user's network is as it was.
    untouched = image_run["network"].get_layer("top_conv").get_weights()[0]
    np.testing.assert_array_equal(untouched, before["top_conv"][0])


def test_groups_can_be_given():
    network = tiny_network()
    names = [layer.name for layer in network.layers[1:]]
    backbone = backbone_from_model(network, groups={"low": names[:3], "high": names[3:]})
    assert backbone.group_names == ["low", "high"]
    assert [layer.name for layer in backbone.layer_groups["low"]] == names[:3]
    called = backbone_from_model(network, groups=lambda net: {"all": net.layers[1:]})
    assert called.group_names == ["all"]
    with pytest.raises(tfxfer.TfxferError, match="leaves out 2 layer"):
        backbone_from_model(network, groups={"low": names[:6]})
    with pytest.raises(tfxfer.TfxferError, match="not a layer of 'tiny_net'"):
        backbone_from_model(network, groups={"low": ["nope"]})


def test_a_keras_applications_network_gets_its_table_groups():
    network = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    backbone = backbone_from_model(network)
    assert backbone.group_names == ["stem", "early", "middle", "late", "top"]
    assert backbone.info["like"] == "mobilenetv3small" and backbone.info["image_size"] == 32


# === Text ===


@pytest.fixture(scope="module")
def texts_csv(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for label, words in (("pos", ["great", "good", "loved", "fun"]), ("neg", ["bad", "awful"])):
        for _ in range(8):
            rows.append(f"the movie was {rng.choice(words)} {rng.choice(WORDS)},{label}")
    path = tmp_path_factory.mktemp("texts") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.large  # over ~10 s on two cores
def test_text_run_from_a_local_bert(texts_csv, tmp_path):
    write_hf_checkpoint(tmp_path / "bert")
    clf = tfxfer.Classifier.from_file(
        texts_csv,
        backbone=str(tmp_path / "bert"),
        output_dir=str(tmp_path / "run"),
        sequence_length=16,
        val_split=0.25,
        **TINY_RUN,
    )
    assert clf.kind == "text" and clf.class_names == ["neg", "pos"]
    clf.fine_tune(epochs=0)  # the head only: fine-tuning a BERT object is tested below
    predictions = clf.predict(["the movie was great", "awful plot"], top_k=2)
    assert [p["input"] for p in predictions] == ["the movie was great", "awful plot"]
    assert sum(p for _, p in predictions[0]["top_k"]) == pytest.approx(1.0, abs=1e-5)
    assert clf.evaluate(texts_csv)["confusion_matrix"] is not None
    loaded = tfxfer.Classifier.load(clf.run_dir)
    assert loaded.kind == "text"
    np.testing.assert_allclose(
        [p["probability"] for p in loaded.predict(["the movie was great", "awful plot"])],
        [p["probability"] for p in predictions],
        rtol=1e-5,
    )


@pytest.mark.large  # an MLM-preset run with its source head, ~8 s
def test_source_task_regularizer_keeps_the_checkpoints_masked_lm_head(texts_csv, tmp_path):
    from bert_helpers import write_masked_lm_preset

    # A preset saved from a BertMaskedLM: its masked-LM head is the source task's.
    write_masked_lm_preset(tmp_path / "mlm")
    clf = tfxfer.Classifier.from_file(
        texts_csv,
        backbone=str(tmp_path / "mlm"),
        output_dir=str(tmp_path / "run"),
        sequence_length=16,
        regularizer="source_task",
        regularizer_weight=0.5,
        **{**TINY_RUN, "head_epochs": 0},
    )
    metrics = clf.fine_tune(epochs=1)
    assert "masked_lm" in clf.backbone.source_heads
    assert metrics["val"]["num_examples"] > 0
    stages = json.loads(open(os.path.join(clf.run_dir, "config.json")).read())
    assert stages["regularizer"] == "source_task"


def _tiny_bert(module):
    from bert_helpers import TINY

    keras.utils.set_random_seed(0)
    bert = module.models.BertBackbone(vocabulary_size=len(VOCAB), **TINY)
    return bert, module.models.BertTokenizer(vocabulary=VOCAB)


def test_keras_hub_backbone_object(texts_csv, tmp_path):
    import keras_hub

    bert, tokenizer = _tiny_bert(keras_hub)
    original = bert.get_layer("transformer_layer_1").get_weights()
    clf = tfxfer.Classifier.from_file(
        texts_csv,
        backbone=bert,
        tokenizer=tokenizer,
        output_dir=str(tmp_path / "run"),
        sequence_length=16,
        **{**TINY_RUN, "head_epochs": 0},
    )
    clf.fine_tune(epochs=1, unfreeze="1", finetune_learning_rate=0.01)
    # MiniLM-style mean pooling is not the default for a bare BERT: CLS reads the pooler.
    assert clf.backbone.group_names == ["embeddings", "layer_0", "layer_1", "pooler"]
    # The copy's name depends on how many BERTs this process built before (bert_backbone_2).
    (bert_copy,) = [
        layer
        for layer in clf.backbone.network.layers
        if isinstance(layer, keras_hub.models.BertBackbone)
    ]
    assert bert_copy is not bert
    embeddings = bert_copy.get_layer("token_embedding").get_weights()[0]
    np.testing.assert_array_equal(embeddings, bert.get_layer("token_embedding").get_weights()[0])
    pooler = bert_copy.get_layer("pooled_dense").get_weights()[0]
    assert not np.allclose(pooler, bert.get_layer("pooled_dense").get_weights()[0])
    for new, old in zip(bert.get_layer("transformer_layer_1").get_weights(), original, strict=True):
        np.testing.assert_array_equal(new, old)
    assert len(clf.predict("loved it")) == 1


def test_keras_nlp_objects_are_keras_hub_objects():
    keras_nlp = pytest.importorskip("keras_nlp")
    bert, tokenizer = _tiny_bert(keras_nlp)
    backbone = backbone_from_model(bert, preprocessor=tokenizer, sequence_length=16)
    assert backbone.input_kind == "text" and backbone.output_kind == "sequence"
    assert backbone.group_names == ["embeddings", "layer_0", "layer_1", "pooler"]
    assert backbone.preprocessor.sequence_length == 16


# === Bad input ===


def test_bad_backbones_say_what_would_work(shapes_dir, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(tfxfer.TfxferError, match="Cannot use a .*Dense as a backbone"):
        tfxfer.Classifier.from_folder(shapes_dir, backbone=keras.layers.Dense(3), output_dir=out)
    inputs = keras.Input((16, 16, 3))
    tokens = keras.layers.Reshape((256, 3))(inputs)
    with pytest.raises(tfxfer.TfxferError, match=r"outputs shape \(None, 256, 3\): neither"):
        tfxfer.Classifier.from_folder(
            shapes_dir, backbone=keras.Model(inputs, tokens), output_dir=out
        )
    vectors = keras.Input((10,))
    with pytest.raises(tfxfer.TfxferError, match="not images"):
        tfxfer.Classifier.from_folder(
            shapes_dir,
            backbone=keras.Model(vectors, keras.layers.Dense(4)(vectors)),
            output_dir=out,
        )
    import keras_hub

    bert, _ = _tiny_bert(keras_hub)
    with pytest.raises(tfxfer.TfxferError, match="carries no tokenizer"):
        backbone_from_model(bert)
    with pytest.raises(tfxfer.TfxferError, match="Unknown backbone 'resnet5'"):
        tfxfer.Classifier.from_folder(shapes_dir, backbone="resnet5", output_dir=out)
    with pytest.raises(tfxfer.TfxferError, match="takes image, and from_file reads text"):
        tfxfer.Classifier.from_file(shapes_dir, backbone="resnet50", output_dir=out)
    assert not os.path.exists(out)  # nothing was written


def test_bad_options_and_uses(image_run, shapes_dir, tmp_path):
    clf = image_run["clf"]
    out = str(tmp_path / "run")
    with pytest.raises(tfxfer.TfxferError, match="unknown option 'batchsize'.*'batch_size'"):
        tfxfer.Classifier.from_folder(shapes_dir, backbone=tiny_network(), batchsize=4)
    with pytest.raises(tfxfer.TfxferError, match="batch_size=0"):
        tfxfer.Classifier.from_folder(shapes_dir, backbone=tiny_network(), batch_size=0)
    with pytest.raises(tfxfer.TfxferError, match="overwrite"):
        tfxfer.Classifier.from_folder(shapes_dir, backbone=tiny_network(), output_dir=clf.run_dir)
    with pytest.raises(tfxfer.TfxferError, match="fixed when the data are loaded"):
        clf.fine_tune(image_size=64)
    with pytest.raises(tfxfer.TfxferError, match="takes images"):
        clf.predict([1, 2])
    with pytest.raises(tfxfer.TfxferError, match="Image not found"):
        clf.predict([os.path.join(shapes_dir, "nope.png")])
    with pytest.raises(tfxfer.TfxferError, match="top_k"):
        clf.predict(first_image_of_each_class(shapes_dir), top_k=0)
    with pytest.raises(tfxfer.TfxferError, match="format"):
        clf.export(out, format="onnx")
    with pytest.raises(tfxfer.TfxferError, match="applies to TFLite"):
        clf.export(out, quantize="int8")
    with pytest.raises(tfxfer.TfxferError, match="not a finished tfxfer run"):
        tfxfer.Classifier.load(str(tmp_path))
    with pytest.raises(tfxfer.TfxferError, match="not trained yet"):
        tfxfer.Classifier.from_folder(shapes_dir, backbone=tiny_network(), output_dir=out).predict(
            first_image_of_each_class(shapes_dir)
        )
    with pytest.raises(tfxfer.TfxferError, match="a finished run is a backbone"):
        tfxfer.Classifier.load(clf.run_dir).fine_tune()
    assert not os.path.exists(out)
