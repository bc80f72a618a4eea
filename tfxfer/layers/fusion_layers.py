"""The fusion layers: how a fusion model combines its backbones' pooled features.

Five small layers, one per fusion mode (`concat`, `sum`, `product`, `gated`, `attention`),
over one base that splits the side-by-side features into one part per backbone. They live in
one module, not five: each is a few lines on top of the base, and choosing a mode means
reading them side by side. `tfxfer.fusion` builds the models that use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from tfxfer.errors import TfxferError


class FusionLayer(keras.layers.Layer):
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
class ConcatFusion(FusionLayer):
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
class SumFusion(FusionLayer):
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
class ProductFusion(FusionLayer):
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
class GatedFusion(FusionLayer):
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
class AttentionFusion(FusionLayer):
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
