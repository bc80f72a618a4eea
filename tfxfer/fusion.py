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
import numpy as np
from keras import ops

from tfxfer.backbones.base import Backbone
from tfxfer.data.datasets import data_backbone
from tfxfer.errors import TfxferError
from tfxfer.heads import HeadConfig, Task, dense_head, mark_head_features, pool_features

FUSIONS = ("concat", "sum", "product", "gated", "attention")


class _Fusion(keras.layers.Layer):
    """Splits the side-by-side pooled features into one part per backbone, projected.

    Args:
        widths: list[int]. The width of each backbone's pooled features, in model order.
        width: int or None. Project every part to this width with a learned matrix (no
            bias) first: the "transformation matrix" that lets features of different widths
            be added. None keeps the parts as they are, which needs equal widths for every
            mode but `concat`.
    """

    needs_equal_widths = True

    def __init__(self, widths: Sequence[int], width: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.widths = [int(w) for w in widths]
        self.width = None if width is None else int(width)
        if len(self.widths) < 2:
            raise TfxferError(f"Fusion needs two or more backbones. Received widths {widths}.")
        if self.width is not None and self.width < 1:
            raise TfxferError(f"Expected a positive fusion width. Received: width={width}")
        if self.needs_equal_widths and self.width is None and len(set(self.widths)) > 1:
            raise TfxferError(
                f"{self.mode!r} fusion combines the backbones' features element-wise, so they "
                f"need one width, and these have {self.widths}. Give a projection width "
                f"(`width=` / --fusion-width, e.g. {max(self.widths)}) or use 'concat'."
            )
        self.projections = (
            [
                keras.layers.Dense(self.width, use_bias=False, name=f"projection_{i}")
                for i in range(len(self.widths))
            ]
            if self.width is not None
            else []
        )

    @property
    def mode(self) -> str:
        return type(self).__name__.removesuffix("Fusion").lower()

    @property
    def part_width(self) -> int:
        return self.width if self.width is not None else self.widths[0]

    def build(self, input_shape):
        if input_shape[-1] is not None and int(input_shape[-1]) != sum(self.widths):
            raise TfxferError(
                f"The fusion layer expected {sum(self.widths)} features ({self.widths} side by "
                f"side). Received a shape of {tuple(input_shape)}."
            )
        if self.projections:
            for projection, width in zip(self.projections, self.widths, strict=True):
                projection.build((None, width))

    def parts(self, features) -> list:
        bounds = np.cumsum([0, *self.widths])
        parts = [features[:, int(a) : int(b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if self.projections:
            parts = [
                projection(part) for projection, part in zip(self.projections, parts, strict=True)
            ]
        return parts

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.part_width)

    def get_config(self):
        return {**super().get_config(), "widths": self.widths, "width": self.width}


@keras.saving.register_keras_serializable(package="tfxfer")
class ConcatFusion(_Fusion):
    """The backbones' pooled features side by side (projected first if `width` is given).

    The default, and the safe choice: no backbone's information is mixed away before the
    head sees it, and it works with any widths. The head's first layer then learns how much
    of each to use. Its cost is a head input as wide as all backbones together.
    """

    needs_equal_widths = False

    def call(self, features):
        if not self.projections:
            return features
        return ops.concatenate(self.parts(features), axis=-1)

    def compute_output_shape(self, input_shape):
        width = sum(self.widths) if self.width is None else self.width * len(self.widths)
        return (input_shape[0], width)


@keras.saving.register_keras_serializable(package="tfxfer")
class SumFusion(_Fusion):
    """The element-wise sum of the (projected) features.

    Use it when the backbones describe the same thing in the same space (two checkpoints of
    one architecture) or after a projection that learns that space; the head stays as small
    as one backbone's. Every backbone counts equally.
    """

    def call(self, features):
        parts = self.parts(features)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


@keras.saving.register_keras_serializable(package="tfxfer")
class ProductFusion(_Fusion):
    """The element-wise product of the (projected) features.

    A multiplicative interaction: a feature survives only where every backbone agrees that
    it is present. It can separate classes that neither backbone separates alone, and it is
    the least stable of the modes (a zero in one backbone silences the rest): prefer it with
    a projection, and compare it with `concat` on held-out data.
    """

    def call(self, features):
        parts = self.parts(features)
        product = parts[0]
        for part in parts[1:]:
            product = product * part
        return product


@keras.saving.register_keras_serializable(package="tfxfer")
class GatedFusion(_Fusion):
    """A weighted sum of the (projected) features, with learned softmax weights per backbone.

    Use it to learn *how much each backbone contributes*, and to read it afterwards:
    `contributions()` (and a run's `metrics.json`) gives the weights, which sum to 1. The
    weights start equal. Weights that move far from equal say one backbone carries the task;
    close to equal, both help or neither is preferred.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self.gate_logits = self.add_weight(
            shape=(len(self.widths),), initializer="zeros", name="gate_logits"
        )

    def call(self, features):
        parts = self.parts(features)
        weights = ops.softmax(ops.cast(self.gate_logits, parts[0].dtype))
        total = parts[0] * weights[0]
        for i, part in enumerate(parts[1:], start=1):
            total = total + part * weights[i]
        return total

    def contributions(self) -> list[float]:
        """The softmax weight of each backbone, in model order."""
        logits = np.asarray(keras.ops.convert_to_numpy(self.gate_logits), "float64")
        weights = np.exp(logits - logits.max())
        return [float(w) for w in weights / weights.sum()]


@keras.saving.register_keras_serializable(package="tfxfer")
class AttentionFusion(_Fusion):
    """A small cross-attention: a learned query attends over the per-backbone features.

    Each example gets its own weighting of the backbones (where `gated` learns one weighting
    for all), so one backbone can lead on some inputs and another on others. It has the most
    parameters of the modes; with few labels, `concat` or `gated` are safer.

    Args:
        num_heads: int. Attention heads; the part width must divide by it. Defaults to 1.
    """

    def __init__(self, widths, width=None, num_heads: int = 1, **kwargs):
        super().__init__(widths, width, **kwargs)
        self.num_heads = int(num_heads)
        if self.num_heads < 1 or self.part_width % self.num_heads:
            raise TfxferError(
                f"Attention fusion needs a feature width ({self.part_width}) divisible by "
                f"num_heads ({num_heads})."
            )
        self.attention = keras.layers.MultiHeadAttention(
            self.num_heads, self.part_width // self.num_heads, name="cross_attention"
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.query = self.add_weight(
            shape=(1, 1, self.part_width), initializer="random_normal", name="query"
        )
        tokens = (None, len(self.widths), self.part_width)
        self.attention.build((None, 1, self.part_width), tokens)

    def call(self, features):
        tokens = ops.stack(self.parts(features), axis=1)  # (batch, backbones, width)
        query = ops.broadcast_to(
            ops.cast(self.query, tokens.dtype), (ops.shape(tokens)[0], 1, self.part_width)
        )
        return ops.squeeze(self.attention(query, tokens), axis=1)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


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
            takes one set of token ids.
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
    if backbones[0].input_kind == "image":
        inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
        outputs = [b.network(b.preprocessor(inputs)) for b in backbones]
    else:
        network_inputs = data_backbone(backbones).network.input
        if isinstance(network_inputs, dict):
            inputs = {
                key: keras.Input(shape=(None,), dtype=tensor.dtype, name=key)
                for key, tensor in network_inputs.items()
            }
        else:
            inputs = keras.Input(shape=(), dtype="string", name="text")
        outputs = [b.network(inputs) for b in backbones]
    pooled = []
    for backbone, features in zip(backbones, outputs, strict=True):
        own = dataclasses.replace(head, pooling=_pooling_for(head, backbone))
        own.validate(backbone.output_kind)
        pooling = own.resolved_pooling(backbone.output_kind)
        backbone.head_pooling = pooling
        pooled.append(
            pool_features(features, backbone.output_kind, pooling, f"{backbone.namespace}_")
        )
    widths = [int(p.shape[-1]) for p in pooled]
    joined = keras.layers.Concatenate(name="pooled_features")(pooled)
    fused = fusion_layer(fusion, widths, width)(mark_head_features(joined))
    return keras.Model(inputs, dense_head(fused, head, num_outputs, task), name=name)


def fusion_summary(model: keras.Model) -> dict | None:
    """What a run records about a fused model: mode, widths and, for `gated`, the weights."""
    try:
        layer = model.get_layer("fusion")
    except ValueError:
        return None
    if not isinstance(layer, _Fusion):
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
        _check_one_tokenizer(backbones)


def _check_one_tokenizer(backbones: list[Backbone]) -> None:
    raw = [b.name for b in backbones if b.preprocessor is None]
    if raw and len(raw) != len(backbones):
        raise TfxferError(
            f"Cannot fuse text backbones that take raw strings ({raw}) with ones that take "
            "token ids: the fused model has one input. Fuse TF-Hub text models with each other, "
            "or BERT checkpoints with each other."
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
                "ids. Fuse checkpoints that share a vocabulary (e.g. BERT uncased models)."
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
