"""Feature fusion: one classifier over several pretrained backbones of one modality.

Each backbone keeps its own preprocessing (its image size and pixel convention, or its
network on the shared token ids) and its own pooling; the pooled vectors are laid side by
side into the `head_features` layer, and a fusion layer combines them before the dense head:

    raw input -> [preprocess_a -> backbone_a -> pool_a] ┐
              -> [preprocess_b -> backbone_b -> pool_b] ┴-> head_features -> fusion -> head

Because the fusion layer sits *above* `head_features`, it trains with the head, and a stage
that freezes every backbone trains head and fusion on features extracted once
(`tfxfer.train.features`). Each backbone's layer groups are namespaced (`"resnet50/conv5"`,
`"efficientnetv2b0/top"`) so one schedule can freeze, unfreeze and decay them separately.

The fusion modes, each a small layer (see their docstrings for when to pick them):
`concat`, `sum`, `product`, `gated`, `attention`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras

from tfxfer.backbones.base import Backbone
from tfxfer.backbones.lexical import is_lexical
from tfxfer.data.datasets import data_backbone
from tfxfer.errors import TfxferError
from tfxfer.heads import HeadConfig, Task, dense_head, mark_head_features, pool_features
from tfxfer.layers.fusion_layers import (
    AttentionFusion,
    ConcatFusion,
    FusionLayer,
    GatedFusion,
    ProductFusion,
    SumFusion,
)
from tfxfer.layers.text_views import TEXT_KEY, TokensAndText

FUSIONS = ("concat", "sum", "product", "gated", "attention")


_LAYERS = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "product": ProductFusion,
    "gated": GatedFusion,
    "attention": AttentionFusion,
}


def fusion_layer(mode: str, widths: Sequence[int], width: int | str | None = "auto"):
    """The fusion layer for `mode`; `width="auto"` projects only when the widths differ."""
    if mode not in _LAYERS:
        raise TfxferError(f"Unknown fusion {mode!r}. Expected one of {FUSIONS}.")
    if width == "auto":
        equal = len({int(w) for w in widths}) == 1
        width = None if equal or mode == "concat" else max(int(w) for w in widths)
    return _LAYERS[mode](widths, width, name="fusion")


def build_fusion_model(
    backbones: Sequence[Backbone],
    num_outputs: int,
    *,
    fusion: str = "concat",
    width: int | str | None = "auto",
    task: Task = "single_label",
    head: HeadConfig | None = None,
    name: str = "tfxfer_fusion_model",
) -> keras.Model:
    """One classifier over several backbones of one modality, joined by a fusion layer.

    Args:
        backbones: list of Backbones (two or more) from `tfxfer.build_backbone`, all for
            images or all for text. Text backbones must share one tokenizer (the same
            vocabulary, as BERT checkpoints trained from one vocabulary do): the model
            takes one set of token ids. A lexical backbone (`"tfidf"`) is the exception:
            it reads the raw string, which the model then takes beside the token ids.
        num_outputs: int. Number of classes, or of regression targets.
        fusion: str. One of `FUSIONS`. Defaults to "concat".
        width: int, "auto" or None. The common width element-wise modes project to. "auto"
            projects only when the widths differ (to the largest); None never projects, and
            then modes other than "concat" need equal widths.
        task: str. As in `tfxfer.build_model`.
        head: HeadConfig or None. Its pooling (when given) applies to every backbone whose
            output can take it; the others pool their own default way.
        name: str. The model's name.

    Returns:
        A functional `keras.Model` taking the same raw input as a single-backbone model
        (uint8 images of any size, or the shared token dict); pass the list of backbones to
        `tfxfer.run_schedule`, `tfxfer.make_datasets` and `tfxfer.export.serving_model`.

    Example:

    ```python
    backbones = [tfxfer.build_backbone("resnet50"), tfxfer.build_backbone("efficientnetv2b0")]
    model = tfxfer.build_fusion_model(backbones, num_outputs=5, fusion="gated")
    ```
    """
    backbones = list(backbones)
    _check_fusable(backbones)
    head = head or HeadConfig()
    _give_unique_names(backbones)
    inputs, outputs = _shared_input(backbones)
    pooled = _pooled_per_backbone(backbones, outputs, head)
    widths = [int(p.shape[-1]) for p in pooled]
    joined = keras.layers.Concatenate(name="pooled_features")(pooled)
    fused = fusion_layer(fusion, widths, width)(mark_head_features(joined))
    return keras.Model(inputs, dense_head(fused, head, num_outputs, task), name=name)


def _shared_input(backbones: list[Backbone]):
    """The one raw input every backbone reads, and each backbone's features of it."""
    if backbones[0].input_kind == "image":
        inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
        return inputs, [b.network(b.preprocessor(inputs)) for b in backbones]
    readers = [b for b in backbones if not is_lexical(b)]
    if readers and readers[0].preprocessor is not None and len(readers) < len(backbones):
        return _tokens_and_text_input(backbones, readers)
    network_inputs = data_backbone(readers or backbones).network.input
    if isinstance(network_inputs, dict):
        inputs = {
            key: keras.Input(shape=(None,), dtype=tensor.dtype, name=key)
            for key, tensor in network_inputs.items()
        }
    else:
        inputs = keras.Input(shape=(), dtype="string", name="text")
    return inputs, [b.network(inputs) for b in backbones]


def _tokens_and_text_input(backbones: list[Backbone], readers: list[Backbone]):
    """Token ids for the BERT branches and the raw string for the lexical ones.

    The lexical backbones get `TokensAndText` as their preprocessor, so the data pipelines
    and the serving model (`data_backbone` picks it) make both views of every text.
    """
    token_source = data_backbone(readers)
    views = TokensAndText(token_source.preprocessor, name="tokens_and_text")
    token_inputs = {
        key: keras.Input(shape=(None,), dtype=tensor.dtype, name=key)
        for key, tensor in token_source.network.input.items()
    }
    inputs = {**token_inputs, TEXT_KEY: keras.Input(shape=(), dtype="string", name=TEXT_KEY)}
    outputs = []
    for backbone in backbones:
        if is_lexical(backbone):
            backbone.preprocessor = views
            outputs.append(backbone.network(inputs[TEXT_KEY]))
        else:
            outputs.append(backbone.network(token_inputs))
    return inputs, outputs


def _pooled_per_backbone(backbones: list[Backbone], outputs: list, head: HeadConfig) -> list:
    """Each backbone's features pooled its own way (recorded on it as `head_pooling`)."""
    pooled = []
    for backbone, features in zip(backbones, outputs, strict=True):
        own = dataclasses.replace(head, pooling=_pooling_for(head, backbone))
        own.validate(backbone.output_kind)
        pooling = own.resolved_pooling(backbone.output_kind)
        backbone.head_pooling = pooling
        pooled.append(
            pool_features(features, backbone.output_kind, pooling, f"{backbone.namespace}_")
        )
    return pooled


def fusion_summary(model: keras.Model) -> dict | None:
    """What a run records about a fused model: mode, widths and, for `gated`, the weights."""
    try:
        layer = model.get_layer("fusion")
    except ValueError:
        return None
    if not isinstance(layer, FusionLayer):
        return None
    summary = {"mode": layer.mode, "widths": layer.widths, "width": layer.width}
    if isinstance(layer, GatedFusion):
        summary["contributions"] = layer.contributions()
    return summary


def _pooling_for(head: HeadConfig, backbone: Backbone) -> str | None:
    if backbone.output_kind == "vector":
        return None
    allowed = {"spatial": ("avg", "max", "avg+max"), "sequence": ("cls", "mean", "max")}
    if head.pooling in allowed[backbone.output_kind]:
        return head.pooling
    return backbone.default_pooling


def _check_fusable(backbones: list[Backbone]) -> None:
    if len(backbones) < 2 or not all(isinstance(b, Backbone) for b in backbones):
        raise TfxferError(
            "A fusion model needs a list of two or more Backbones. Received: "
            f"{[type(b).__name__ for b in backbones]}; for one backbone use `tfxfer.build_model`."
        )
    kinds = {b.name: b.input_kind for b in backbones}
    if len(set(kinds.values())) > 1:
        raise TfxferError(
            f"Cannot fuse backbones of different modalities: {kinds}. Fusion joins backbones "
            "that read the same input; pick all image backbones or all text backbones."
        )
    if backbones[0].input_kind == "text":
        # A lexical branch reads the raw string beside any tokenizer's ids: it fuses with all.
        readers = [b for b in backbones if not is_lexical(b)]
        if len(readers) > 1:
            _check_one_tokenizer(readers)


def _check_one_tokenizer(backbones: list[Backbone]) -> None:
    raw = [b.name for b in backbones if b.preprocessor is None]
    if raw and len(raw) != len(backbones):
        raise TfxferError(
            f"Cannot fuse text backbones that take raw strings ({raw}) with ones that take "
            "token ids: the fused model has one input. Fuse TF-Hub text models with each other, "
            "or BERT checkpoints with each other (a lexical 'tfidf' branch fuses with either)."
        )
    if raw:
        return
    reference = backbones[0]
    vocabulary = _vocabulary(reference)
    for other in backbones[1:]:
        if _vocabulary(other) != vocabulary:
            raise TfxferError(
                f"Cannot fuse {reference.name!r} and {other.name!r}: their tokenizers differ "
                "(vocabulary or lowercasing), and a fused text model takes one set of token "
                "ids. Fuse checkpoints that share a vocabulary (e.g. BERT uncased models); "
                "only a lexical branch ('tfidf', which reads the raw words) fuses with any."
            )


def _vocabulary(backbone: Backbone) -> tuple:
    tokenizer = getattr(backbone.preprocessor, "tokenizer", None)
    if tokenizer is None:
        return (type(backbone.preprocessor).__name__,)
    return (
        tuple(tokenizer.get_vocabulary()),
        bool(getattr(tokenizer, "lowercase", False)),
    )


def _give_unique_names(backbones: list[Backbone]) -> None:
    """Distinct namespaces and layer names, so two backbones can live in one model."""
    seen: dict[str, int] = {}
    for backbone in backbones:
        count = seen.get(backbone.namespace, 0)
        seen[backbone.namespace] = count + 1
        if count:
            backbone.namespace = f"{backbone.namespace}_{count + 1}"
    names: set[str] = set()
    for backbone in backbones:
        for layer in (backbone.preprocessor, backbone.network):
            if layer is None or backbone.input_kind == "text" and layer is backbone.preprocessor:
                continue
            if layer.name in names:
                layer.name = f"{backbone.namespace}_{layer.name}"
            names.add(layer.name)
