"""The joint objective L_T + λ·L_S as a stage option: L2-SP, feature distance, source task."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import (
    InterruptAfterEpoch,
    backbone_layers,
    layer_weights,
    tiny_arrays,
    tiny_backbone,
    tiny_model,
    tiny_train_data,
    write_image_folder,
)

import tfxfer
from tfxfer.backbones.base import SourceHead
from tfxfer.errors import TfxferError, WeightsError
from tfxfer.regularizers import build_reference, check_regularizers


def _run(kind, weight, *, run_dir=None, resume=False, callbacks=None, seed=0):
    """Fine-tunes the tiny model (with a toy source head) under `kind` at λ = `weight`.

    `weight=None` is plain fine-tuning. Returns the model, its backbone, the backbone's weights
    before training, the result, and how far the features and the source predictions moved.
    """
    backbone, model = tiny_model(seed=seed)
    pretrained = layer_weights(backbone_layers(backbone))
    source = _with_source_head(backbone)
    images, labels = tiny_arrays(n=18)
    features = keras.Model(model.input, model.get_layer("head_features").output)
    before = features.predict(images, verbose=0)
    extra = {"regularizer": kind, "regularizer_weight": weight} if weight is not None else {}
    result = tfxfer.run_schedule(
        model,
        backbone,
        [
            tfxfer.Stage("head", 1, learning_rate=1e-2),
            tfxfer.Stage("finetune", 3, train="all", learning_rate=5e-3, **extra),
        ],
        tiny_train_data(images, labels, batch_size=6),
        run_dir=tfxfer.RunDir(str(run_dir), resume=resume) if run_dir else None,
        callbacks=callbacks,
        verbose=0,
    )
    after = features.predict(images, verbose=0)
    moved = {
        "features": float(np.mean((after - before) ** 2)),
        "source_task": float(np.abs(source(after) - source(before)).sum(-1).mean()),
    }
    return model, backbone, pretrained, result, moved


def _finetune(weight: float | None, **kwargs):
    return _run("l2sp", weight, **kwargs)[:4]


def _forward_regularized(kind, weight, **kwargs):
    model, _, _, result, moved = _run(kind, weight, **kwargs)
    return model, result, moved


def _distance(backbone, pretrained) -> float:
    now = layer_weights(backbone_layers(backbone))
    return float(sum(np.sum((now[p] - pretrained[p]) ** 2) for p in pretrained))


def test_lambda_zero_is_plain_fine_tuning_exactly():
    plain, *_ = _finetune(None)
    zero, *_ = _finetune(0.0)
    for a, b in zip(plain.weights, zero.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_very_large_lambda_holds_the_backbone_at_its_pretrained_weights():
    model, backbone, pretrained, _ = _finetune(1e9)
    assert _distance(backbone, pretrained) == pytest.approx(0.0, abs=1e-10)
    head = model.get_layer("predictions").kernel.numpy()
    assert not np.allclose(head, tiny_model()[1].get_layer("predictions").kernel.numpy())


def test_l2sp_keeps_the_backbone_closer_to_its_pretrained_weights_than_plain_fine_tuning():
    _, plain_backbone, pretrained, _ = _finetune(None)
    distances = [_distance(plain_backbone, pretrained)]
    for weight in (20.0, 60.0):
        _, backbone, _, _ = _finetune(weight)
        distances.append(_distance(backbone, pretrained))
    # The larger λ, the closer to θ₀; never all the way at these λ.
    assert distances[0] > distances[1] > distances[2] > 0.0, distances


@pytest.mark.large  # over ~10 s on two cores
def test_a_resume_in_the_middle_of_a_regularised_stage_ends_as_the_whole_run(tmp_path):
    whole, *_ = _finetune(20.0, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _finetune(20.0, run_dir=tmp_path / "cut", callbacks=[InterruptAfterEpoch(3)])
    # A fresh process builds the model from the same pretrained weights (θ₀), then resumes.
    resumed, *_ = _finetune(20.0, run_dir=tmp_path / "cut", resume=True)
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"regularizer": "l2sp", "regularizer_weight": -0.1}, "must be a number >= 0"),
        ({"regularizer": "l2sp", "regularizer_weight": float("nan")}, "must be a number >= 0"),
        ({"regularizer": "l2sp", "regularizer_weight": float("inf")}, "must be finite"),
        ({"regularizer": "l1", "regularizer_weight": 0.1}, "regularizer must be one of"),
        (
            {"regularizer": "l2sp", "regularizer_weight": 0.1, "optimizer": "sgd"},
            "needs optimizer 'adamw' or 'adam'",
        ),
    ],
)
def test_bad_regularizer_settings_are_named(fields, message):
    with pytest.raises(TfxferError, match=message):
        tfxfer.Stage("finetune", 1, train="all", **fields).validate()


def test_recipe_flags_put_the_regularizer_on_the_fine_tuning_stage():
    from recipes.bert_text_classifier import Config

    config = Config.from_flags(["--regularizer", "l2sp", "--regularizer-weight", "0.5"])
    head, finetune = config.schedule()
    assert (finetune.regularizer, finetune.regularizer_weight) == ("l2sp", 0.5)
    assert (head.regularizer, head.regularizer_weight) == (None, 0.0)
    bad = Config(regularizer="l3", regularizer_weight=-1.0).problems()
    assert any("regularizer='l3'" in p for p in bad)
    assert any("regularizer_weight=-1.0" in p for p in bad)


# === "features" and "source_task": a frozen copy of the pretrained backbone beside ===


def _with_source_head(backbone):
    """Gives the tiny backbone a source task: 5 classes read from its avg-pooled features."""
    keras.utils.set_random_seed(7)
    dense = keras.layers.Dense(5, activation="softmax", name="toy_source")
    dense.build((None, 8))
    backbone.source_heads = {"toy": SourceHead(dense, "avg", 5)}
    return dense


@pytest.mark.parametrize("kind", ["features", "source_task"])
def test_lambda_zero_of_a_forward_regularizer_is_plain_fine_tuning_exactly(kind):
    plain, *_ = _forward_regularized(kind, None)
    zero, *_ = _forward_regularized(kind, 0.0)
    for a, b in zip(plain.weights, zero.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.large  # over ~10 s on two cores
@pytest.mark.parametrize("kind", ["features", "source_task"])
def test_a_forward_regularizer_keeps_what_it_measures_closer_to_the_pretrained_model(kind):
    _, _, plain = _forward_regularized(kind, None)
    _, result, weak = _forward_regularized(kind, 3.0)
    _, _, strong = _forward_regularized(kind, 300.0)
    assert plain[kind] > weak[kind] > strong[kind], (plain, weak, strong)
    assert strong[kind] < plain[kind] / 5
    info = result.stages["finetune"]
    assert (info["regularizer"], info["regularizer_weight"]) == (kind, 3.0)


def test_the_frozen_copy_costs_one_backbone_of_memory_and_says_so():
    backbone, model = tiny_model(seed=0)
    _with_source_head(backbone)
    reference = build_reference(model, backbone, ["features", "source_task"])
    expected = sum(4 * int(np.prod(w.shape)) for w in backbone.network.weights)
    expected += 4 * (8 * 5 + 5)  # the source head, frozen too
    assert reference.bytes == expected
    assert not reference.frozen.trainable_weights
    # A copy, not the same variables: training the model leaves it at θ₀.
    live = {id(v) for v in model.weights}
    assert not any(id(v) in live for v in reference.frozen.weights)


@pytest.mark.large  # over ~10 s on two cores
@pytest.mark.parametrize("kind", ["features", "source_task"])
def test_a_resume_in_the_middle_of_a_forward_regularized_stage_ends_as_the_whole_run(
    kind, tmp_path
):
    whole, *_ = _forward_regularized(kind, 5.0, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _forward_regularized(
            kind, 5.0, run_dir=tmp_path / "cut", callbacks=[InterruptAfterEpoch(3)]
        )
    # θ₀ is recomputed: a fresh process builds the model from the same pretrained weights.
    resumed, *_ = _forward_regularized(kind, 5.0, run_dir=tmp_path / "cut", resume=True)
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize("kind", ["l2sp", "features", "source_task"])
def test_every_regularizer_trains_under_mixed_bfloat16(kind):
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")  # conftest restores the policy
    backbone, model = tiny_model(seed=0)
    _with_source_head(backbone)
    images, labels = tiny_arrays(n=18)
    result = tfxfer.run_schedule(
        model,
        backbone,
        [
            tfxfer.Stage("head", 1, learning_rate=1e-2),
            tfxfer.Stage(
                "finetune",
                2,
                train="all",
                learning_rate=5e-3,
                regularizer=kind,
                regularizer_weight=5.0,
            ),
        ],  # fmt: skip
        tiny_train_data(images, labels, batch_size=6),
        verbose=0,
    )
    assert backbone.network.get_layer("low_conv").compute_dtype == "bfloat16"
    assert all(np.isfinite(row["loss"]) for row in result.history)


def test_source_task_on_a_backbone_without_a_source_head_says_which_heads_it_has():
    backbone, model = tiny_model()
    images, labels = tiny_arrays(n=6)
    stage = tfxfer.Stage("ft", 1, train="all", regularizer="source_task", regularizer_weight=1.0)
    with pytest.raises(TfxferError, match="'tiny' carries no source-task head.*none"):
        tfxfer.run_schedule(model, backbone, [stage], tiny_train_data(images, labels), verbose=0)


def test_source_task_needs_the_pooling_its_source_head_reads():
    backbone = tiny_backbone()
    tfxfer.build_model(backbone, 3, head=tfxfer.HeadConfig(pooling="max"))
    _with_source_head(backbone)
    stage = tfxfer.Stage("ft", 1, train="all", regularizer="source_task", regularizer_weight=1.0)
    with pytest.raises(TfxferError, match="reads 'avg'-pooled features.*pools with 'max'"):
        check_regularizers([stage], backbone)


def test_the_text_recipe_refuses_source_task_before_writing_a_run(tmp_path):
    from bert_helpers import write_hf_checkpoint

    from recipes.bert_text_classifier import Config, main

    checkpoint = tmp_path / "bert"
    write_hf_checkpoint(checkpoint)
    output = tmp_path / "run"
    config = Config.smoke(
        backbone=str(checkpoint), output_dir=str(output), regularizer="source_task",
        regularizer_weight=1.0,
    )  # fmt: skip
    with pytest.raises(TfxferError, match="carries no source-task head"):
        main(config)
    assert not output.exists()


@pytest.mark.large
def test_every_regularizer_under_mirrored_matches_one_process(tmp_path):
    import multiworker_helpers as mh

    runs = {}
    for strategy, cpus in (("cpu", "0"), ("mirrored", "2")):
        out = tmp_path / strategy
        args = ["regularized", "--out", str(out), "--strategy", strategy, "--logical-cpus", cpus]
        result = mh.run_single(str(mh.THIS_FILE), args, log_dir=out / "logs", timeout=180)
        assert result.ok, mh.describe_results([result])
        runs[strategy] = out
    for kind in ("l2sp", "features", "source_task"):
        one, two = (
            mh.load_npz(runs["cpu"] / f"{kind}.npz"),
            mh.load_npz(runs["mirrored"] / f"{kind}.npz"),
        )
        assert sorted(one) == sorted(two)
        for key in one:
            # Two replicas sum gradients in another order than one process: float32 noise.
            np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=kind)


# === Source heads of keras.applications backbones ===


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
    """Weights files of the whole EfficientNetV2-B0 classifier and of its notop network."""
    root = tmp_path_factory.mktemp("weights")
    keras.utils.set_random_seed(3)
    full = keras.applications.EfficientNetV2B0(include_top=True, weights=None)
    full.save_weights(str(root / "full.weights.h5"))
    notop = keras.applications.EfficientNetV2B0(include_top=False, weights=None)
    notop.save_weights(str(root / "notop.weights.h5"))
    return full, str(root / "full.weights.h5"), str(root / "notop.weights.h5")


def test_a_vision_backbone_keeps_its_imagenet_classifier_from_a_whole_weights_file(
    classifier_weights,
):
    full, path, _ = classifier_weights
    backbone = tfxfer.build_backbone(
        "efficientnetv2b0", weights=path, image_size=32, source_head=True
    )
    head = backbone.source_heads["imagenet"]
    assert (head.pooling, head.classes) == ("avg", 1000)
    top = full.get_layer("predictions")
    np.testing.assert_array_equal(head.layer.kernel.numpy(), top.kernel.numpy())
    stem = backbone.network.get_layer("stem_conv").kernel.numpy()
    np.testing.assert_array_equal(stem, full.get_layer("stem_conv").kernel.numpy())
    assert backbone.info["source_heads"] == ["imagenet"]


def test_source_heads_need_weights_with_the_top(classifier_weights):
    _, _, notop = classifier_weights
    with pytest.raises(WeightsError, match="does not hold it.*include_top=True"):
        tfxfer.build_backbone("efficientnetv2b0", weights=notop, image_size=32, source_head=True)
    with pytest.raises(WeightsError, match="randomly initialised weights.*have none"):
        tfxfer.build_backbone("efficientnetv2b0", weights="none", image_size=32, source_head=True)
    with pytest.raises(TfxferError, match="mobilenetv3small keeps no source head"):
        tfxfer.build_backbone("mobilenetv3small", weights="none", image_size=32, source_head=True)


@pytest.mark.large
def test_the_image_recipe_runs_learning_without_forgetting_on_the_imagenet_head(
    classifier_weights, tmp_path
):
    from recipes.resnet50_image_classifier import Config, main

    _, path, _ = classifier_weights
    data = write_image_folder(str(tmp_path / "data"), {"a": 5, "b": 5}, size=32)
    config = Config.smoke(
        data_dir=data, output_dir=str(tmp_path / "run"), backbone="efficientnetv2b0",
        weights=path, regularizer="source_task", regularizer_weight=1.0,
        # The top group fine-tunes under the regularizer; the frozen copy is the whole network
        # and head whatever trains, without tracing EfficientNetV2-B0's whole backward pass.
        unfreeze="1",
    )  # fmt: skip
    result = main(config)
    info = result["result"].stages["finetune"]
    assert info["regularizer"] == "source_task"
    assert info["cached_features"] is False  # the regularized stage trained the backbone
    # The frozen copy holds the network and the 1000-way head: EfficientNetV2-B0 is 7.2 M.
    assert 25e6 < info["reference_bytes"] < 35e6


# === "source_task" on BERT: the checkpoint's own masked-LM loss ===


def _masked_lm_loss(backbone, texts) -> float:
    """The masked-LM loss on `texts`, each real token masked in turn (pseudo-likelihood)."""
    import tensorflow as tf

    tokens = {k: np.asarray(v) for k, v in backbone.preprocessor(tf.constant(texts)).items()}
    head = backbone.source_heads["masked_lm"]
    losses = []
    for row in range(len(texts)):
        length = int(tokens["padding_mask"][row].sum())
        for position in range(1, length - 1):  # not [CLS] or [SEP]
            masked = {k: v[row : row + 1].copy() for k, v in tokens.items()}
            target = int(masked["token_ids"][0, position])
            masked["token_ids"][0, position] = head.masking["mask_token_id"]
            sequence = backbone.network(masked)["sequence_output"]
            logits = head.layer(sequence, mask_positions=np.array([[position]], "int32"))
            losses.append(
                float(
                    keras.losses.sparse_categorical_crossentropy(
                        np.array([[target]]), logits, True
                    )[0, 0]
                )
            )
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def masked_lm_preset(tmp_path_factory):
    from bert_helpers import write_masked_lm_preset

    path = tmp_path_factory.mktemp("mlm") / "preset"
    write_masked_lm_preset(path)
    return str(path)


TEXTS = ["the movie was great fun", "i hated the awful plot", "good acting", "a boring film"]


def _text_finetune(preset, weight):
    from tfxfer.data.examples import Examples
    from tfxfer.data.text import text_train_data

    keras.utils.set_random_seed(0)
    backbone = tfxfer.build_backbone(preset, sequence_length=16, source_head=True)
    model = tfxfer.build_model(backbone, 2, head=tfxfer.HeadConfig(dropout=0.0))
    extra = {"regularizer": "source_task", "regularizer_weight": weight} if weight else {}
    train = text_train_data(
        Examples(TEXTS * 12, np.array([1, 0, 1, 0] * 12, "int32"), ["neg", "pos"], "text"),
        backbone.preprocessor,
        batch_size=4,
    )  # fmt: skip
    result = tfxfer.run_schedule(
        model,
        backbone,
        [tfxfer.Stage("finetune", 8, train="all", learning_rate=1e-2, **extra)],
        train,
        verbose=0,
    )
    return backbone, result


def test_a_bert_preset_saved_from_a_masked_lm_keeps_its_head(masked_lm_preset):
    import keras_hub

    backbone = tfxfer.build_backbone(masked_lm_preset, sequence_length=16, source_head=True)
    head = backbone.source_heads["masked_lm"]
    assert head.kind == "masked_lm" and head.classes == backbone.info["vocab_size"]
    saved = keras_hub.models.BertMaskedLM.from_preset(masked_lm_preset, preprocessor=None)
    for mine, theirs in zip(head.layer.weights, saved.masked_lm_head.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)
    assert backbone.info["source_heads"] == ["masked_lm"]


@pytest.mark.large  # over ~10 s on two cores
def test_the_masked_lm_loss_joins_fine_tuning_and_keeps_the_source_task(masked_lm_preset):
    plain, _ = _text_finetune(masked_lm_preset, None)
    kept, result = _text_finetune(masked_lm_preset, 20.0)
    # Fine-tuning with the masked-LM loss beside learns the source task on these texts too.
    assert _masked_lm_loss(kept, TEXTS) < _masked_lm_loss(plain, TEXTS) - 0.1
    info = result.stages["finetune"]
    assert (info["regularizer"], info["reference_bytes"]) == ("source_task", 0)


def test_a_bert_checkpoint_without_a_masked_lm_head_says_it_has_none(tmp_path):
    from bert_helpers import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "bert")
    with pytest.raises(TfxferError, match=r"carries no source-task head \(heads it has: none\)"):
        tfxfer.build_backbone(str(tmp_path / "bert"), sequence_length=8, source_head=True)
