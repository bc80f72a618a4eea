"""Backbones by name: `keras.applications` image networks, keras-hub BERT, TF-Hub models.

`build_backbone(name, ...)` looks the name up in the families' tables (plain dicts) and
calls that family's builder. Families are imported only when used, so `import tfxfer` does
not import keras-hub or tensorflow-hub.
"""

from __future__ import annotations

import os
from typing import Any

from tfxfer.backbones.base import Backbone, split_into_groups, split_layers_option
from tfxfer.backbones.vision import VISION_BACKBONES, build_vision_backbone
from tfxfer.errors import TfxferError

__all__ = ["Backbone", "build_backbone", "known_backbones", "split_into_groups"]

HUB_PREFIX = "hub:"


def _text_table() -> dict[str, Any]:
    from tfxfer.backbones.lexical import LEXICAL_BACKBONES
    from tfxfer.backbones.text import TEXT_BACKBONES

    return {**TEXT_BACKBONES, **LEXICAL_BACKBONES}


def known_backbones() -> dict[str, list[str]]:
    """The named backbones of each family."""
    return {"image": sorted(VISION_BACKBONES), "text": sorted(_text_table())}


def modality_of(name: str) -> str | None:
    """ "image" or "text" for a name `build_backbone` knows the kind of without building it.

    None for a TF-Hub handle (its kind is known once loaded) and for an unknown name.
    """
    name, _ = split_layers_option(name)
    key = name.lower()
    if key in VISION_BACKBONES:
        return "image"
    if name.startswith(HUB_PREFIX):
        return None
    if key in _text_table() or key.startswith("bert_") or os.path.isdir(os.path.expanduser(name)):
        return "text"
    return None


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Builds a backbone from a table name, a keras-hub preset, a local directory or a hub handle.

    Args:
        name: str. An image table name ("resnet50", ...), a text table name ("minilm-l6",
            "bert-tiny", ...), a keras-hub BERT preset ("bert_base_en_uncased"), a local
            keras-hub preset or Hugging Face BERT directory, or "hub:" followed by a TF-Hub
            handle or SavedModel path; or "tfidf", the lexical backbone, learned from
            `texts=` (the training texts).
        **kwargs: passed to the family's builder (`weights`, `image_size`,
            `sequence_length`, `texts`, ...).
    """
    source, layers = split_layers_option(name)
    if layers is not None:  # "minilm-l6:layers=3"
        if modality_of(source) != "text" or source.startswith(HUB_PREFIX):
            raise TfxferError(
                f"Backbone {name!r}: ':layers=K' keeps the first K transformer layers of a BERT "
                f"text backbone, and {source!r} is not one."
            )
        from tfxfer.backbones.text import build_bert_backbone

        return build_bert_backbone(source, layers=layers, **kwargs)
    key = name.lower()
    if key in VISION_BACKBONES:
        return build_vision_backbone(key, **kwargs)
    if key in _lexical_table():
        return _build_lexical(key, kwargs)
    if name.startswith(HUB_PREFIX):
        from tfxfer.backbones.hub import build_hub_backbone

        # A SavedModel comes with its weights, so recipes' `weights` has no meaning here;
        # `pretrained=False` cannot be honoured and is refused rather than ignored.
        weights = kwargs.pop("weights", True)
        if weights in (None, False) or str(weights).lower() == "none":
            raise TfxferError(
                "A TF-Hub backbone always loads its SavedModel's weights; random "
                "initialisation (--weights none / --no-pretrained) is not available for it."
            )
        kwargs.pop("sequence_length", None)  # a hub text model tokenizes inside itself
        return build_hub_backbone(name[len(HUB_PREFIX) :], **kwargs)
    if key in _text_table() or key.startswith("bert_") or os.path.isdir(os.path.expanduser(name)):
        from tfxfer.backbones.text import build_bert_backbone

        return build_bert_backbone(name, **kwargs)
    known = known_backbones()
    raise TfxferError(
        f"Unknown backbone {name!r}. Known image backbones: {known['image']}; text backbones: "
        f"{known['text']}; or a keras-hub BERT preset name (bert_...), a local BERT directory, "
        "or 'hub:<TF-Hub handle or SavedModel path>'."
    )


def _lexical_table() -> dict[str, Any]:
    from tfxfer.backbones.lexical import LEXICAL_BACKBONES

    return LEXICAL_BACKBONES


def _build_lexical(key: str, kwargs: dict[str, Any]) -> Backbone:
    """A TF-IDF backbone from `texts=` (the training texts); other text settings do not apply."""
    from tfxfer.backbones.lexical import LEXICAL_BACKBONES, build_tfidf_backbone

    weights = kwargs.pop("weights", True)
    if weights in (None, False) or str(weights).lower() in ("none", "random"):
        raise TfxferError(
            f"The {key!r} backbone has no pretrained weights to leave out: its vocabulary is "
            "learned from the training texts. Drop --no-pretrained for it."
        )
    texts = kwargs.pop("texts", None)
    # A TF-IDF vector counts every word of a text: no sequence length applies to it.
    kwargs.pop("sequence_length", None)
    if kwargs.pop("source_head", False):
        raise TfxferError(
            f"regularizer='source_task' keeps a checkpoint's own source-task head, and the "
            f"{key!r} backbone has none. Use it without that regularizer."
        )
    settings = {**LEXICAL_BACKBONES[key], **kwargs}
    return build_tfidf_backbone(texts, name=key, **settings)
