"""`WarmupCosine`: the learning-rate schedule of every tfxfer stage."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfxfer")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from zero to `peak`, then cosine decay to `peak * min_ratio`.

    Args:
        peak: float. Learning rate at the end of warmup.
        total_steps: int. Steps in the stage.
        warmup_steps: int. Steps of linear warmup.
        min_ratio: float. Final learning rate as a fraction of `peak`.
        decay: str. "cosine" or "constant" (after warmup).
    """

    def __init__(
        self,
        peak: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_ratio: float = 0.0,
        decay: str = "cosine",
    ):
        self.peak = float(peak)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        self.min_ratio = float(min_ratio)
        self.decay = decay

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = ops.cast(max(self.warmup_steps, 1), "float32")
        # Step 0 gets a small nonzero rate, so the first batch is not wasted.
        warm = self.peak * (step + 1.0) / (warmup + 1.0)
        if self.decay == "constant":
            after = ops.convert_to_tensor(self.peak, "float32")
        else:
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
            after = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
        return ops.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_ratio": self.min_ratio,
            "decay": self.decay,
        }
