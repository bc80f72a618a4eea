"""`LayerwiseAdamW`: AdamW with a learning rate per variable, and L2-SP."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="tfxfer")
class LayerwiseAdamW(keras.optimizers.AdamW):
    """AdamW with a learning rate per variable (discriminative learning rates) and weight
    decay only where it belongs.

    Keras 3 optimizers take one learning rate for every variable, and scaling gradients does
    not help with Adam (its update is invariant to gradient scale). So the scaling is applied
    where the rate is used, in `update_step`, which every backend path (including
    `tf.distribute`'s per-replica update) calls once per variable. Decoupled weight decay
    happens there too, at the variable's own rate: Keras' AdamW decays every variable at the
    unscaled rate, which would pull a slowly-trained lower layer towards zero as hard as the
    head. Variables with fewer than two dimensions (biases, LayerNorm and BatchNorm scales
    and offsets) are never decayed: shrinking them towards zero only distorts what the layer
    normalises, as BERT's and most fine-tuning recipes agree.

    Args:
        lr_multipliers: dict[str, float]. Variable path to multiplier; absent paths get 1.
        **kwargs: passed to `keras.optimizers.AdamW`.
    """

    def __init__(
        self,
        lr_multipliers: dict[str, float] | None = None,
        anchors: dict[str, Any] | None = None,
        anchor_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.lr_multipliers = dict(lr_multipliers or {})
        self._multiplier_by_key: dict[Any, float] = {}
        # L2-SP: variable path to its pretrained value θ₀, and λ.
        self.anchors = dict(anchors or {}) if anchor_weight else {}
        self.anchor_weight = float(anchor_weight)
        self._anchor_by_key: dict[Any, Any] = {}

    def build(self, variables):
        super().build(variables)
        self._multiplier_by_key = {
            self._var_key(v): self.lr_multipliers[v.path]
            for v in variables
            if v.path in self.lr_multipliers
        }
        # θ₀ as optimizer variables: they sit on every replica and ride in the checkpoint.
        # Made with their value, not assigned one: Keras builds an optimizer inside a
        # stateless scope, where an assignment would be dropped.
        for variable in variables:
            if variable.path in self.anchors:
                value = np.asarray(self.anchors[variable.path])
                anchor = self.add_variable_from_reference(
                    variable,
                    "anchor",
                    initializer=lambda shape, dtype, value=value: ops.cast(value, dtype),
                )
                self._anchor_by_key[self._var_key(variable)] = anchor

    def _use_weight_decay(self, variable) -> bool:
        return len(variable.shape) >= 2 and super()._use_weight_decay(variable)

    def _apply_weight_decay(self, variables):
        # Decay is applied per variable in `update_step`, at that variable's rate.
        return

    def update_step(self, gradient, variable, learning_rate):
        key = self._var_key(variable)
        multiplier = self._multiplier_by_key.get(key, 1.0)
        if multiplier != 1.0:
            learning_rate = learning_rate * multiplier
        anchor = self._anchor_by_key.get(key)
        if anchor is None and self.weight_decay and self._use_weight_decay(variable):
            rate = ops.cast(learning_rate, variable.dtype) * ops.cast(
                self.weight_decay, variable.dtype
            )
            variable.assign(variable - variable * rate)
        super().update_step(gradient, variable, learning_rate)
        if anchor is not None:
            # Decoupled L2-SP: towards θ₀ by min(1, lr·λ) of the way (θ₀ itself for large λ).
            pull = ops.minimum(
                ops.cast(learning_rate, variable.dtype)
                * ops.cast(self.anchor_weight, variable.dtype),
                ops.cast(1.0, variable.dtype),
            )
            variable.assign(variable - (variable - anchor) * pull)

    def get_config(self):
        # θ₀ is state, not config: a reloaded optimizer starts without it.
        return {**super().get_config(), "lr_multipliers": self.lr_multipliers}
