"""Bring your own backbone: a `Backbone` from a Keras model or a keras-hub (keras-nlp) object.

`build_backbone` builds networks from names; this module takes networks the user already
has: any `keras.Model` over images (a `keras.applications` instance, a functional model of
one's own, a keras-hub image backbone) and keras-hub's `BertBackbone` (keras-nlp's
`BertBackbone` is the same class: keras-nlp is keras-hub's old name and an alias of it) or a
keras-hub BERT task (`BertTextClassifier`, whose backbone and preprocessor it takes).

What a schedule needs is inferred and can be overridden. Layer groups: a
`keras.applications` network gets the groups of its row in `VISION_BACKBONES` (and that
row's pixel convention), a BERT gets `embeddings, layer_0 ... pooler`, and any other model is
cut into up to four groups of about equal parameter count, in layer order (`block_1` at the
input). `groups=` replaces them: a dict of group name to layers (or layer names), input side
first, or a callable that returns one from the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

from tfxfer.backbones.base import Backbone, split_into_groups
from tfxfer.backbones.vision import VISION_BACKBONES
from tfxfer.errors import TfxferError
from tfxfer.layers.image_preprocessing import ImagePreprocessing

GroupsSpec = (
    Mapping[str, Sequence[Any]] | Callable[[keras.Model], Mapping[str, Sequence[Any]]] | None
)

PREPROCESSING_MODES = ("none", "caffe", "tf", "torch")
# The groups of a model tfxfer has no table row for: about equal parameter counts each.
GENERIC_GROUPS = 4
DEFAULT_IMAGE_SIZE = 224

WHAT_WORKS = (
    "a keras.Model over images (input (batch, height, width, 3); output a feature map "
    "(batch, h, w, c) or a vector (batch, d)), e.g. keras.applications.MobileNetV3Small("
    "include_top=False); a keras-hub or keras-nlp BertBackbone (with preprocessor= or "
    "tokenizer=) or BertTextClassifier; or a backbone name (`tfxfer backbones`)"
)


def is_keras_hub_task(obj: Any) -> bool:
    """Whether `obj` is a keras-hub task (keras-nlp's are the same classes): a backbone and
    its preprocessor under a task head, as `BertTextClassifier` is."""
    return (
        type(obj).__module__.startswith(("keras_hub", "keras_nlp"))
        and hasattr(obj, "backbone")
        and hasattr(obj, "preprocessor")
    )


def network_of(obj: Any) -> Any:
    """The network to build a backbone from: a keras-hub task's backbone, else `obj`."""
    return obj.backbone if is_keras_hub_task(obj) else obj


def backbone_from_model(
    model: Any,
    *,
    image_size: int | None = None,
    preprocessing: str | None = None,
    preprocessor: Any = None,
    sequence_length: int = 128,
    groups: GroupsSpec = None,
    name: str | None = None,
) -> Backbone:
    """Wraps a model the user built as a `Backbone`, inferring what a schedule needs.

    The backbone uses `model` itself (its layers, its weights): training it changes it. Pass
    `fresh_copy(model)` to keep the original as it was.

    Args:
        model: keras.Model, keras-hub `BertBackbone` or keras-hub BERT task. See `WHAT_WORKS`.
        image_size: int or None. Side of the square an image model sees; required when its
            input has no fixed size. Defaults to the model's input size, else 224.
        preprocessing: str or None. The pixel convention of an image model ("none": [0, 255]
            floats, "caffe", "tf": [-1, 1], "torch"). Defaults to its `VISION_BACKBONES`
            row's for a `keras.applications` model, else "none".
        preprocessor: keras-hub preprocessor or tokenizer, for a `BertBackbone` (which
            carries none). A tokenizer is wrapped in a `BertTextClassifierPreprocessor`.
        sequence_length: int. Tokens per text when `preprocessor` is a tokenizer.
            Defaults to `128`.
        groups: dict, callable or None. Overrides the inferred layer groups (see the module
            docstring). Every layer with weights must be in exactly one group: a layer in
            none would train in every stage. Defaults to `None`.
        name: str or None. The backbone's name. Defaults to "custom_" + the model's name.

    Returns:
        A `Backbone`.

    Raises:
        TfxferError: an object tfxfer cannot fine-tune, a model whose output is not a
            feature map or vector, a BERT without a preprocessor, or bad `groups`.
    """
    if is_keras_hub_task(model):  # BertTextClassifier: its backbone and its preprocessor
        preprocessor = preprocessor or model.preprocessor
        model = model.backbone
    if not isinstance(model, keras.Model):
        raise TfxferError(
            f"Cannot use a {type(model).__module__}.{type(model).__name__} as a backbone. "
            f"Expected {WHAT_WORKS}."
        )
    if type(model).__name__ == "BertBackbone":
        return _bert_backbone(model, preprocessor, sequence_length, groups, name)
    return _image_backbone(model, image_size, preprocessing, groups, name)


def fresh_copy(model: keras.Model) -> keras.Model:
    """A new model of the same architecture and weights, built where it is called.

    Called inside a strategy's scope, the copy's variables live on every replica; and
    training the copy leaves the user's object as it was.
    """
    try:
        copy = type(model).from_config(model.get_config())
    except (NotImplementedError, TypeError, ValueError) as error:
        raise TfxferError(
            f"Cannot copy the backbone {model.name!r} ({type(model).__name__}: {error}). "
            "Expected a functional or Sequential keras.Model, or a subclass that implements "
            "get_config() / from_config()."
        ) from error
    copy.set_weights(model.get_weights())
    return copy


# === Families ===


def _bert_backbone(bert, preprocessor, sequence_length: int, groups: GroupsSpec, name):
    from tfxfer.backbones.text import bert_layer_groups, bert_lora_targets, with_mask_passthrough

    if preprocessor is None:
        raise TfxferError(
            "A keras-hub BertBackbone object carries no tokenizer. Pass preprocessor="
            "keras_hub.models.BertTextClassifierPreprocessor.from_preset(...) or tokenizer="
            "keras_hub.models.BertTokenizer(...), or give the preset's name as backbone="
        )
    if type(preprocessor).__name__.endswith("Tokenizer"):
        import keras_hub

        preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
            tokenizer=preprocessor, sequence_length=sequence_length
        )
    inferred = bert_layer_groups(bert)
    return Backbone(
        name=name or f"custom_{bert.name}",
        network=with_mask_passthrough(bert),
        preprocessor=preprocessor,
        output_kind="sequence",
        input_kind="text",
        layer_groups=_groups(bert, groups, inferred),
        lora_targets=bert_lora_targets(bert),
        info={
            "backbone": "custom",
            "model": bert.name,
            "class": type(bert).__name__,
            "weights": "given",
            "num_layers": bert.num_layers,
            "hidden_dim": bert.hidden_dim,
            "sequence_length": getattr(preprocessor, "sequence_length", None),
        },
        namespace="bert",
        pooling_groups={"pooler": ("cls",)} if "pooler" in inferred and groups is None else {},
    )


def _image_backbone(model: keras.Model, image_size, preprocessing, groups: GroupsSpec, name):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise TfxferError(
            f"The backbone {model.name!r} has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs. Expected {WHAT_WORKS}."
        )
    shape, out = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise TfxferError(
            f"The backbone {model.name!r} takes inputs of shape {shape}, not images "
            f"(batch, height, width, 3). Expected {WHAT_WORKS}."
        )
    kinds = {4: "spatial", 2: "vector"}
    if len(out) not in kinds:
        raise TfxferError(
            f"The backbone {model.name!r} outputs shape {out}: neither a feature map "
            "(batch, h, w, c) nor a vector (batch, d), so a pooling head cannot read it. Pass "
            "the network without its top (include_top=False), or a model that ends at its "
            "features."
        )
    size = _image_size(model, shape, image_size)
    row_name, row = _table_row(model)
    mode = preprocessing or (row["preprocessing"] if row else "none")
    if mode not in PREPROCESSING_MODES:
        raise TfxferError(
            f"Expected `preprocessing` to be one of {PREPROCESSING_MODES}. Received: "
            f"preprocessing={preprocessing!r}"
        )
    inferred = None
    if row is not None:
        try:
            inferred = split_into_groups(model.layers, row["groups"])
        except ValueError:
            inferred = None  # renamed layers: the generic split below
    return Backbone(
        name=name or f"custom_{model.name}",
        network=model,
        preprocessor=ImagePreprocessing(size, mode, name="image_preprocessing"),
        output_kind=kinds[len(out)],
        input_kind="image",
        layer_groups=_groups(model, groups, inferred or _equal_groups(model)),
        info={
            "backbone": "custom",
            "model": model.name,
            "class": type(model).__name__,
            "like": row_name,
            "weights": "given",
            "image_size": size,
            "preprocessing": mode,
        },
        namespace="custom",
    )


def _image_size(model: keras.Model, shape: tuple, image_size: int | None) -> int:
    height, width = shape[1], shape[2]
    if height is not None and width is not None:
        if height != width:
            raise TfxferError(
                f"The backbone {model.name!r} takes {height}x{width} images; tfxfer resizes "
                "to a square. Build it with a square input_shape, or with None for any size."
            )
        if image_size is not None and image_size != height:
            raise TfxferError(
                f"image_size={image_size}, but the backbone {model.name!r} takes {height}x"
                f"{width} images. Leave image_size out, or build the model with "
                f"input_shape=({image_size}, {image_size}, 3)."
            )
        return int(height)
    return int(image_size or DEFAULT_IMAGE_SIZE)


def _table_row(model: keras.Model) -> tuple[str | None, dict | None]:
    """The `VISION_BACKBONES` row of a `keras.applications` network, by its model name."""
    wanted = model.name.lower().replace("-", "").replace("_", "")
    for key, row in VISION_BACKBONES.items():
        if row["constructor"].lower() == wanted:
            return key, row
    return None, None


def _weighted(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if layer.weights]


def _equal_groups(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """Up to `GENERIC_GROUPS` runs of layers, in model order, of about equal parameter counts."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    weighted = _weighted(model)
    if not weighted:
        raise TfxferError(
            f"The backbone {model.name!r} has no weights, so there is nothing to fine-tune. "
            f"Expected {WHAT_WORKS}."
        )
    count = min(GENERIC_GROUPS, len(weighted))
    total = sum(layer.count_params() for layer in layers)
    # A group starts only at a layer that computes (a convolution, a dense layer): the
    # normalisation and activation after it stay in its group, as in a block.
    runs: list[list[keras.layers.Layer]] = [[] for _ in range(count)]
    index, seen = 0, 0
    for layer in layers:
        params = layer.count_params()
        if params and not _is_normalization(layer):
            index = max(index, min(count - 1, int(count * (seen + params / 2) / total)))
        runs[index].append(layer)
        seen += params
    return {f"block_{i + 1}": run for i, run in enumerate(r for r in runs if r)}


def _is_normalization(layer: keras.layers.Layer) -> bool:
    return "Normalization" in type(layer).__name__


def _groups(
    model: keras.Model, spec: GroupsSpec, inferred: dict[str, list[keras.layers.Layer]]
) -> dict[str, list[keras.layers.Layer]]:
    """`inferred`, or the user's groups checked against the model's layers."""
    if spec is None:
        return inferred
    given = spec(model) if callable(spec) else spec
    if not isinstance(given, Mapping) or not given:
        raise TfxferError(
            "Expected `groups` to be a dict of group name to layers or layer names, input side "
            f'first (e.g. {{"low": [...], "high": [...]}}), or a callable returning one. '
            f"Received: {type(given).__name__}"
        )
    by_name = {layer.name: layer for layer in model.layers}
    groups: dict[str, list[keras.layers.Layer]] = {}
    owner: dict[str, str] = {}
    for group, members in given.items():
        if isinstance(members, (str, keras.layers.Layer)):
            members = [members]
        groups[str(group)] = []
        for member in members:
            layer_name = member if isinstance(member, str) else getattr(member, "name", None)
            if layer_name not in by_name:
                raise TfxferError(
                    f"groups[{group!r}] names {member!r}, which is not a layer of "
                    f"{model.name!r}. Its layers begin: {list(by_name)[:8]}"
                )
            if layer_name in owner:
                raise TfxferError(
                    f"Layer {layer_name!r} is in groups {owner[layer_name]!r} and {group!r}. "
                    "Put each layer in one group."
                )
            owner[layer_name] = str(group)
            groups[str(group)].append(by_name[layer_name])
    missing = [layer.name for layer in _weighted(model) if layer.name not in owner]
    if missing:
        raise TfxferError(
            f"groups leaves out {len(missing)} layer(s) with weights ({missing[:5]}...): a "
            "backbone layer in no group would train in every stage. Put every layer with "
            "weights in a group."
        )
    return groups
