"""`Backbone`: a pretrained network plus what a head and a schedule need to know about it.

A backbone is not a class hierarchy. Each family (vision, text, hub) has a builder function
that returns this one dataclass, and a plain dict row says which builder and which settings a
name stands for. What differs between families is data: the preprocessing layer, the kind of
output, and the ordered layer groups a schedule unfreezes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import keras

OutputKind = Literal["spatial", "sequence", "vector"]
InputKind = Literal["image", "text"]


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
    """

    name: str
    network: keras.Model
    preprocessor: keras.layers.Layer | None
    output_kind: OutputKind
    input_kind: InputKind
    layer_groups: dict[str, list[keras.layers.Layer]]
    lora_targets: list[keras.layers.Layer] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def group_names(self) -> list[str]:
        return list(self.layer_groups)


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
        index = next(
            (i for i, layer in enumerate(layers) if layer.name.startswith(prefix)), None
        )
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
            layer for layer in layers[starts[i] : end] if not isinstance(layer, keras.layers.InputLayer)
        ]
    return groups
