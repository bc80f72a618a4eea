"""Every shipped recipe: importable without side effects, and its configs validate themselves."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest

import recipes
from tfxfer.errors import TfxferError
from tfxfer.pretrain.skeleton import PretrainConfig
from tfxfer.recipe import RecipeConfig

ALL_RECIPES = sorted(m.name for m in pkgutil.iter_modules(recipes.__path__))
# Pretraining recipes (`tfxfer.pretrain`) produce backbones; the others fine-tune one.
PRETRAINING = [n for n in ALL_RECIPES if n.endswith("_pretrain")]
RECIPES = [n for n in ALL_RECIPES if n not in PRETRAINING]


def test_there_are_recipes():
    assert {"bert_text_classifier", "resnet50_image_classifier"} <= set(RECIPES)
    assert {"bert_mlm_pretrain", "contrastive_image_pretrain"} <= set(PRETRAINING)


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_recipe_shape_and_configs_validate(name):
    module = importlib.import_module(f"recipes.{name}")
    assert module.__doc__ and "python -m recipes." + name in module.__doc__
    assert dataclasses.is_dataclass(module.Config)
    assert issubclass(module.Config, PretrainConfig)
    assert callable(module.main)
    assert callable(module.build_data) and callable(module.build_task)
    module.Config().validate()
    module.Config.smoke().validate()
    assert module.Config.from_flags([]) == module.Config()


@pytest.mark.parametrize("name", PRETRAINING)
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("batch_size", 0, "batch_size=0"),
        ("epochs", 0, "epochs=0"),
        ("learning_rate", float("inf"), "learning_rate=inf"),
        ("val_fraction", 1.0, "val_fraction=1.0"),
        ("strategy", "gpu_cluster", "strategy='gpu_cluster'"),
        ("backbone", "a,b", "pretraining takes one backbone"),
        ("output_dir", "", "output_dir=''"),
    ],
)
def test_bad_pretraining_values_are_named(name, field, value, message):
    module = importlib.import_module(f"recipes.{name}")
    config = dataclasses.replace(module.Config(), **{field: value})
    with pytest.raises(TfxferError, match=message.replace("(", r"\(")):
        config.validate()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_shape_and_shipped_configs_validate(name):
    module = importlib.import_module(f"recipes.{name}")
    assert module.__doc__ and "python -m recipes." + name in module.__doc__
    assert dataclasses.is_dataclass(module.Config)
    assert issubclass(module.Config, RecipeConfig)
    assert callable(module.main)
    assert callable(module.build_data) and callable(module.build_model)
    module.Config().validate()
    module.Config.smoke().validate()
    # Flags round-trip: parsing no flags gives the defaults.
    assert module.Config.from_flags([]) == module.Config()


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("batch_size", 0, "batch_size=0"),
        ("head_epochs", -1, "head_epochs=-1"),
        ("strategy", "gpu_cluster", "strategy='gpu_cluster'"),
        ("mixed_precision", "fp8", "mixed_precision='fp8'"),
        ("unfreeze", "most", "unfreeze='most'"),
        ("val_split", 1.5, "val_split=1.5"),
        ("seed", -1, "seed=-1"),
        ("output_dir", "", "output_dir=''"),
        ("hidden_units", [64, 0], r"hidden_units=\[64, 0\]"),
    ],
)
def test_bad_config_values_are_named(name, field, value, message):
    module = importlib.import_module(f"recipes.{name}")
    config = dataclasses.replace(module.Config(), **{field: value})
    with pytest.raises(TfxferError, match=message.replace("(", r"\(")):
        config.validate()


@pytest.mark.parametrize("name", RECIPES)
def test_several_problems_are_reported_together(name):
    module = importlib.import_module(f"recipes.{name}")
    config = dataclasses.replace(
        module.Config(), batch_size=-2, dropout=1.0, overwrite=True, resume=True
    )
    with pytest.raises(TfxferError) as error:
        config.validate()
    for part in ("batch_size=-2", "dropout=1.0", "overwrite and resume"):
        assert part in str(error.value)


def test_flags_parse_into_typed_fields():
    from recipes.bert_text_classifier import Config

    config = Config.from_flags(
        [
            "--batch-size",
            "4",
            "--hidden-units",
            "64,32",
            "--no-pretrained",
            "--layerwise-lr-decay",
            "0.8",
            "--lora-rank",
            "4",
        ]
    )
    assert config.batch_size == 4 and config.hidden_units == [64, 32]
    assert config.pretrained is False and config.layerwise_lr_decay == 0.8 and config.lora_rank == 4


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_flag_has_help_from_its_field_comment(name):
    """A field whose comment a formatter wrapped onto another line loses its --help text."""
    from tfxfer.flags import field_comments

    config_cls = importlib.import_module(f"recipes.{name}").Config
    comments = field_comments(config_cls)
    missing = [f.name for f in dataclasses.fields(config_cls) if not comments.get(f.name)]
    assert not missing, f"fields without a one-line comment: {missing}"


def test_contrastive_pretraining_trains_batchnorm_and_masked_lm_does_not():
    from recipes import bert_mlm_pretrain, contrastive_image_pretrain

    # From random weights a backbone's BatchNorm statistics are worth nothing: they train.
    assert contrastive_image_pretrain.Config().stages()[-1].train_batchnorm is True
    assert bert_mlm_pretrain.Config(head_epochs=0).stages()[-1].train_batchnorm is False
