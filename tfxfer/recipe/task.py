"""The one task builder: a run's data, its backbone(s), its head and the model they make.

Both fine-tuning recipes and `tfxfer.Classifier` build their task here, so a setting means the
same wherever it is given: `weights` / `pretrained` / `image_size` / `sequence_length` for the
backbones, several backbone names (`a,b`) for one fusion model under one head, and a schedule
whose stage regularizes toward the source task (`regularizer="source_task"`, Learning without
Forgetting) gets backbones that keep their source head (`build_backbone(..., source_head=True)`).

A config handed to these functions is a `RecipeConfig` with the fields its kind of data needs:
`weights` and `image_size` for images; `pretrained` and `sequence_length` for text (and
`text_column`, `label_column`, `multi_label`, `label_separator` to read text files).
"""

from __future__ import annotations

from typing import Any

import keras

from tfxfer.backbones import build_backbone
from tfxfer.backbones.base import Backbone
from tfxfer.backbones.lexical import LEXICAL_BACKBONES
from tfxfer.data.examples import LabelledData
from tfxfer.data.images import load_images
from tfxfer.data.text import load_texts
from tfxfer.errors import TfxferError
from tfxfer.fusion import build_fusion_model
from tfxfer.model import build_model
from tfxfer.regularizers import needs_reference

HUB_PREFIX = "hub:"


def load_data(config: Any, train: str, *, val: str | None = None, test: str | None = None):
    """The labelled data of a run: images (one subfolder per class) or texts (a file or folder).

    Args:
        config: RecipeConfig. Says the kind of data (`data_kind()`), `val_split` and `seed`,
            and for text files which columns hold the text and the labels.
        train: str. The training folder or file.
        val: str or None. A validation folder or file; else `val_split` of `train`.
        test: str or None. A held-out test folder or file.

    Returns:
        A `LabelledData`.
    """
    if config.data_kind() == "image":
        return load_images(
            train,
            val_directory=val,
            test_directory=test,
            val_split=config.val_split,
            seed=config.seed,
        )
    return load_texts(
        train,
        val=val,
        test=test,
        text_column=config.text_column,
        label_column=config.label_column,
        multi_label=config.multi_label,
        label_separator=config.label_separator,
        val_split=config.val_split,
        seed=config.seed,
    )


def wants_source_head(config: Any) -> bool:
    """Whether a stage of the config's schedule regularizes toward the source task (λ > 0)."""
    return "source_task" in needs_reference(config.schedule())


def weights_per_backbone(config: Any) -> list[Any]:
    """The image weights of each backbone: one value for all, or `a,b` in backbone order."""
    names = config.backbone_names()
    weights = (
        [None] if config.weights is None else [w.strip() for w in str(config.weights).split(",")]
    )
    if len(weights) == 1:
        return weights * len(names)
    if len(weights) != len(names):
        raise TfxferError(
            f"weights={config.weights!r} (expected one value for every backbone, or one per "
            f"backbone of {config.backbone!r})"
        )
    return weights


def build_backbones(config: Any, texts: list[str] | None = None) -> list[Backbone]:
    """The backbones `config.backbone` names (`a,b` for several), built as the config says.

    `texts`: the training texts, which a lexical backbone (`tfidf`) learns its vocabulary
    from; `build_task_model` passes them."""
    # Only asked for when used: a hub backbone, or one without a source head, takes no flag.
    source = {"source_head": True} if wants_source_head(config) else {}
    names = config.backbone_names()
    if config.data_kind() == "image":
        # Learning without Forgetting keeps the ImageNet classifier's predictions.
        return [
            build_backbone(name, weights=weights, image_size=config.image_size, **source)
            for name, weights in zip(names, weights_per_backbone(config), strict=True)
        ]
    return [_text_backbone(config, name, source, texts) for name in names]


def _text_backbone(
    config: Any, name: str, source: dict[str, bool], texts: list[str] | None
) -> Backbone:
    if name.lower() in LEXICAL_BACKBONES:
        # Learned from the training split only: validation and test words stay unknown to it.
        return build_backbone(name.lower(), texts=texts)
    if name.startswith(HUB_PREFIX):
        # A TF-Hub text model takes raw strings and tokenizes inside itself.
        return build_backbone(name, input_kind="text")
    # `source`: the checkpoint's masked-LM head, for an auxiliary masked-LM loss.
    return build_backbone(
        name, sequence_length=config.sequence_length, weights=config.pretrained, **source
    )


def build_classifier(
    config: Any, backbones: list[Backbone], num_outputs: int, task: str = "single_label"
) -> tuple[Backbone | list[Backbone], keras.Model]:
    """`(backbone, model)` for one backbone, `(backbones, fused model)` for several.

    The head is the config's (`pooling`, `hidden_units`, `dropout`); several backbones are
    joined by its `fusion` (and `fusion_width`) under that one head.
    """
    if len(backbones) == 1:
        model = build_model(backbones[0], num_outputs, task=task, head=config.head())
        return backbones[0], model
    model = build_fusion_model(
        backbones,
        num_outputs,
        fusion=config.fusion,
        width=config.fusion_width or "auto",
        task=task,
        head=config.head(),
    )
    return backbones, model


def build_task_model(
    config: Any, data: LabelledData, backbones: list[Backbone] | None = None
) -> tuple[Backbone | list[Backbone], keras.Model]:
    """The model of a run: its backbone(s) (built from the config unless given) and a head
    with one output per class of `data`. Call it in the run's strategy scope (`run` does).

    Returns:
        `(backbone, model)`, or `(backbones, model)` for a fusion model over several.
    """
    if backbones is None:
        texts = list(data.train.inputs) if config.data_kind() == "text" else None
        backbones = build_backbones(config, texts)
    task = "multi_label" if data.multi_label else "single_label"
    return build_classifier(config, backbones, len(data.class_names), task)
