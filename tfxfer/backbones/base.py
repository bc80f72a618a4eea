"""`Backbone`: a pretrained network plus what a head and a schedule need to know about it.

A backbone is not a class hierarchy. Each family (vision, text, hub) has a builder function
that returns this one dataclass, and a plain dict row says which builder and which settings a
name stands for. What differs between families is data: the preprocessing layer, the kind of
output, the pooling a head should default to, and the ordered layer groups a schedule
unfreezes.

The backbone, not its caller, decides what a head can train: `head_pooling` (recorded by
`tfxfer.build_model`) says how the head reads the features, and a group that pooling never
reads (BERT's pooler under mean pooling) gets no gradient, so it is frozen for every stage
and left out of the schedule's groups. `LayerGroups` then joins the groups of one or several
backbones under namespaced names (`"resnet50/conv5"`, `"bert/layer_5"`) for one schedule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras

from tfxfer.errors import TfxferError

OutputKind = Literal["spatial", "sequence", "vector"]
InputKind = Literal["image", "text"]

# The pooling a head uses when neither the backbone's family nor the user says otherwise.
DEFAULT_POOLING = {"spatial": "avg", "sequence": "cls", "vector": None}


@dataclass
class SourceHead:
    """The head a checkpoint was trained with on its source task (ImageNet's classifier).

    Kept so that fine-tuning can be asked to keep the source task's predictions
    (`Stage(regularizer="source_task")`, Learning without Forgetting).

    Args:
        layer: keras.layers.Layer. Takes the backbone's features pooled by `pooling` and
            returns the source task's probabilities.
        pooling: str or None. The pooling it reads ("avg" for keras.applications
            classifiers); None for a masked-LM head, which reads tokens.
        classes: int. Number of source classes (the vocabulary size for a masked-LM head).
        kind: str. "classifier" (pooled features in, probabilities out) or "masked_lm"
            (keras-hub's `MaskedLMHead`: token features and mask positions in, logits over
            the vocabulary out). Defaults to "classifier".
        masking: dict. For "masked_lm": `mask_token_id` and `unselectable_token_ids` (padding,
            [CLS], [SEP]) of the tokenizer.
    """

    layer: keras.layers.Layer
    pooling: str | None
    classes: int
    kind: str = "classifier"
    masking: dict[str, Any] = field(default_factory=dict)


@dataclass
class Backbone:
    """A pretrained network ready to have a head put on it.

    Args:
        name: str. The name the backbone was built from (a table row, a preset, a path).
        network: keras.Model. The pretrained network. It takes the *preprocessed* input
            (float images, or a dict of token tensors) and returns features.
        preprocessor: keras.layers.Layer or None. Turns raw input (uint8 images of any
            size, or strings) into what `network` takes. It lives inside the final model so
            users never preprocess by hand.
        output_kind: "spatial" (a `(batch, h, w, c)` map), "sequence" (a dict with
            `sequence_output` `(batch, t, d)`, `padding_mask` and optionally
            `pooled_output`) or "vector" (`(batch, d)`).
        input_kind: "image" or "text".
        layer_groups: dict[str, list[keras.layers.Layer]]. Ordered from the input side to the
            output side (ResNet50: stem, conv2, conv3, conv4, conv5). A schedule unfreezes
            whole groups, usually the top ones first.
        lora_targets: list[keras.layers.Layer]. Layers that can take LoRA adapters (layers
            with `enable_lora`, e.g. BERT's attention query/value projections). Empty when the
            backbone does not support LoRA.
        info: dict. Facts worth recording in a run's config (weights source, image size,
            sequence length, digest of the weights file).
        namespace: str. Short name that prefixes this backbone's group names when a model
            has several backbones ("resnet50" gives "resnet50/conv5"). Defaults to `name`.
        default_pooling: str or None. The pooling a head uses unless told otherwise: what the
            checkpoint was trained with where that is known (MiniLM: "mean"), else "avg" for
            spatial maps, "cls" for sequences and None for vectors.
        pooling_groups: dict[str, tuple[str, ...]]. Groups that only some poolings read,
            with those poolings (BERT: `{"pooler": ("cls",)}`). Under any other pooling the
            group gets no gradient, so it never trains and no schedule counts it.
        head_pooling: str or None. The pooling of the head on this backbone; set by
            `tfxfer.build_model`. Defaults to `default_pooling` until then.
        source_heads: dict[str, SourceHead]. The checkpoint's own heads for its source task,
            by name ("imagenet"), where it was built with them. Defaults to none.
    """

    name: str
    network: keras.Model
    preprocessor: keras.layers.Layer | None
    output_kind: OutputKind
    input_kind: InputKind
    layer_groups: dict[str, list[keras.layers.Layer]]
    lora_targets: list[keras.layers.Layer] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    namespace: str = ""
    default_pooling: str | None = None
    pooling_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    head_pooling: str | None = None
    source_heads: dict[str, SourceHead] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.namespace = self.namespace or self.name
        if self.default_pooling is None:
            self.default_pooling = DEFAULT_POOLING[self.output_kind]
        if self.head_pooling is None:
            self.head_pooling = self.default_pooling

    @property
    def group_names(self) -> list[str]:
        """The groups a schedule can train (those the head reads), input side first."""
        return list(self.trainable_groups())

    def trainable_groups(self) -> dict[str, list[keras.layers.Layer]]:
        """The groups a schedule can train under this backbone's `head_pooling`, in order."""
        return {
            name: layers for name, layers in self.layer_groups.items() if self._read_by_head(name)
        }

    def unused_layers(self) -> list[keras.layers.Layer]:
        """Layers the head never reads (so never get a gradient): frozen in every stage."""
        return [
            layer
            for name, layers in self.layer_groups.items()
            if not self._read_by_head(name)
            for layer in layers
        ]

    def _read_by_head(self, group: str) -> bool:
        poolings = self.pooling_groups.get(group)
        return poolings is None or self.head_pooling in poolings


@dataclass
class LayerGroups:
    """The layer groups of one or several backbones, as one schedule addresses them.

    With one backbone the names are its own ("conv5"); "resnet50/conv5" is accepted too.
    With several, every name is namespaced ("resnet50/conv5", "bert/layer_5"), and a bare
    name that only one backbone has still resolves. An integer k in a stage means the top k
    groups *of each backbone*, so `train=2` unfreezes the top of every branch of a fusion.

    Args:
        groups: dict[str, list[keras.layers.Layer]]. Ordered, input side first within each
            backbone.
        namespaces: dict[str, list[str]]. Namespace to its group names, in order.
        frozen: list[keras.layers.Layer]. Layers that never train (unread by the head).
        lora_targets: list[keras.layers.Layer]. Layers that LoRA stages adapt.
    """

    groups: dict[str, list[keras.layers.Layer]]
    namespaces: dict[str, list[str]] = field(default_factory=dict)
    frozen: list[keras.layers.Layer] = field(default_factory=list)
    lora_targets: list[keras.layers.Layer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.namespaces:
            self.namespaces = {"": list(self.groups)}

    @classmethod
    def of(cls, backbones: Backbone | Sequence[Backbone] | LayerGroups) -> LayerGroups:
        """The groups of `backbones` (a Backbone, a list of them, or a LayerGroups)."""
        if isinstance(backbones, LayerGroups):
            return backbones
        if isinstance(backbones, Backbone):
            backbones = [backbones]
        if (
            not isinstance(backbones, Sequence)
            or not backbones
            or not all(isinstance(b, Backbone) for b in backbones)
        ):
            raise TfxferError(
                "Expected a Backbone or a non-empty list of Backbones (the ones the model was "
                f"built from). Received: {type(backbones).__name__}"
            )
        spaces = [b.namespace for b in backbones]
        if len(set(spaces)) != len(spaces):
            raise TfxferError(
                f"Backbones of one model need distinct namespaces to address their layer "
                f"groups. Received: {spaces}; set `backbone.namespace` on the duplicates."
            )
        several = len(backbones) > 1
        groups, namespaces, frozen, lora = {}, {}, [], []
        for backbone in backbones:
            names = []
            for name, layers in backbone.trainable_groups().items():
                key = f"{backbone.namespace}/{name}" if several else name
                groups[key] = layers
                names.append(key)
            namespaces[backbone.namespace] = names
            frozen += backbone.unused_layers()
            lora += backbone.lora_targets
        return cls(groups, namespaces, frozen, lora)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> LayerGroups:
        """Group names without layers: enough to validate a schedule."""
        return cls({name: [] for name in names})

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def resolve(self, name: str) -> str:
        """The group key `name` stands for; raises `TfxferError` if none or several."""
        if name in self.groups:
            return name
        if "/" in name and len(self.namespaces) == 1:
            space, _, group = name.partition("/")
            if space in self.namespaces and group in self.groups:
                return group
        matches = [key for key in self.groups if key.rpartition("/")[2] == name]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise TfxferError(
                f"Layer group {name!r} is ambiguous: the model has {matches}. Name one of them."
            )
        raise TfxferError(f"Unknown layer group {name!r}. This model's groups are {self.names}")

    def top(self, k: int) -> list[str]:
        """The top `k` groups of each backbone, in model order."""
        largest = max(len(names) for names in self.namespaces.values())
        if not 0 <= k <= largest:
            raise TfxferError(
                f"train={k} top groups, but the backbone has {largest} groups: {self.names}"
            )
        chosen = {
            name for names in self.namespaces.values() for name in names[len(names) - k :] if k
        }
        return [name for name in self.groups if name in chosen]

    def depth_from_top(self, trainable: list[str]) -> dict[str, int]:
        """For layer-wise learning rates: 0 for each backbone's top trainable group, 1 below..."""
        depths = {}
        for names in self.namespaces.values():
            in_stage = [name for name in names if name in trainable]
            for depth, name in enumerate(reversed(in_stage)):
                depths[name] = depth
        return depths


def split_into_groups(
    layers: list[keras.layers.Layer], boundaries: list[tuple[str, str]]
) -> dict[str, list[keras.layers.Layer]]:
    """Splits a model's layers, in model order, into named groups at boundary layers.

    `boundaries` is a list of `(group_name, first_layer_name_prefix)`; a group runs from the
    first layer whose name starts with its prefix up to the next group's first layer. The
    first group also takes every layer before its boundary. Splitting at boundaries rather
    than matching every name keeps the table short: auto-named layers such as `re_lu_13`
    land in the block they sit in.
    """
    starts: list[int] = []
    for group_name, prefix in boundaries:
        index = next((i for i, layer in enumerate(layers) if layer.name.startswith(prefix)), None)
        if index is None:
            raise ValueError(
                f"No layer name starts with {prefix!r} (group {group_name!r}). "
                f"Layer names begin: {[layer.name for layer in layers[:8]]}"
            )
        starts.append(index)
    if starts != sorted(starts):
        raise ValueError(f"Group boundaries are out of model order: {boundaries}")
    starts[0] = 0
    groups: dict[str, list[keras.layers.Layer]] = {}
    for i, (group_name, _) in enumerate(boundaries):
        end = starts[i + 1] if i + 1 < len(starts) else len(layers)
        groups[group_name] = [
            layer
            for layer in layers[starts[i] : end]
            if not isinstance(layer, keras.layers.InputLayer)
        ]
    return groups


# `NAME:layers=K`: a BERT backbone's embeddings and first K transformer layers only.
_LAYERS_OPTION = re.compile(r"^(?P<source>.+):layers=(?P<layers>-?\d+)$")


def split_layers_option(name: str) -> tuple[str, int | None]:
    """("minilm-l6", 3) from "minilm-l6:layers=3"; (name, None) without the option."""
    match = _LAYERS_OPTION.match(str(name))
    if match is None:
        return str(name), None
    return match["source"], int(match["layers"])
