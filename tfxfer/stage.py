"""A `Stage`: one step of a fine-tuning schedule, as plain checked data.

A `Stage` says which layer groups train, with which optimizer and learning rate, for how many
epochs (or steps), and with which regularizer; `tfxfer.schedule` builds lists of them and
applies one to a model. This module knows nothing of models, data or run directories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tfxfer.backbones.base import LayerGroups
from tfxfer.errors import TfxferError

OPTIMIZERS = ("adamw", "adam", "sgd")
# Forms of the source-task term L_S of the objective L_T + λ·L_S (`Stage.regularizer`).
REGULARIZERS = ("l2sp", "features", "source_task")
DECAYS = ("cosine", "constant")
# Ways to fit a head-only stage without epochs (`Stage.solver`).
SOLVERS = ("lbfgs",)
# How a stage with `epochs=None` is sized: 48 texts at batch 16 get 10 epochs (30 steps),
# 400 get 3 (75 steps), 4,000 get 3 (750 steps). Measured at 8 texts a class (MiniLM-L6, two
# real sets, 2 seeds): 10 epochs at 5e-5 scored as 20 did, in about half the time, and 2e-4 no
# better; the fine-tuned model kept train loss near zero after ~15 steps.
FINETUNE_STEPS = {"min_steps": 50, "min_epochs": 3, "max_epochs": 10}


@dataclass
class Stage:
    """One stage of training.

    Args:
        name: str. Shown in logs and recorded in the history (e.g. "head", "finetune").
        epochs: int or None. Epochs this stage trains. None sizes the stage by optimizer
            steps rather than epochs (`epochs_for`): at least `min_steps` steps and
            `min_epochs` epochs, at most `max_epochs` epochs, so 56 and 56,000 examples both
            get a sensible schedule. An explicit number always wins.
        train: str, int or list[str]. What trains besides the head: "head" (the backbone is
            frozen), "all" (every backbone group), an int k (the top k layer groups of each
            backbone), or a list of group names ("conv5", or "resnet50/conv5" in a model
            over several backbones). Defaults to `"head"`.
        learning_rate: float or "auto". Peak learning rate; "auto" runs the learning-rate
            range test (`tfxfer.train.lr_find`) when the stage starts and trains at the rate it
            suggests. Defaults to `1e-3`.
        optimizer: str. "adamw", "adam" or "sgd" (with momentum 0.9). Defaults to `"adamw"`.
        weight_decay: float. Decoupled weight decay for "adamw", at each variable's own
            (layer-wise) rate; biases and normalisation weights are never decayed. Defaults
            to `1e-4`.
        warmup_fraction: float. Fraction of the stage's steps over which the learning rate
            rises linearly from zero to its peak. Defaults to `0.1`.
        decay: str. "cosine" (to `min_lr_ratio` of the peak at the stage's end) or
            "constant". Defaults to `"cosine"`.
        min_lr_ratio: float. Final learning rate as a fraction of the peak. Defaults to `0.0`.
        layerwise_lr_decay: float or None. Discriminative learning rates: the top trainable
            backbone group gets the full rate, each group below it `layerwise_lr_decay` times
            the rate of the group above. The head always gets the full rate. Defaults to `None`.
        lora_rank: int or None. Train low-rank adapters (LoRA) of this rank on the backbone
            layers that support them, instead of the layers' own weights. Defaults to `None`.
        train_batchnorm: bool. Let BatchNormalization layers in unfrozen groups update their
            statistics. Off by default: with the small batches of fine-tuning, batch statistics
            are noisy and undo what pretraining learned. Frozen groups' BatchNorm layers always
            run in inference mode. Defaults to `False`.
        regularizer: str or None. Keep the backbone close to what it learned on its source
            task, the joint objective L_T + λ·L_S. "l2sp": λ/2·‖θ − θ₀‖² over the backbone's
            pretrained weights θ₀ (Li, Grandvalet & Davoine, ICML 2018), in place of weight
            decay towards zero for those weights. With AdamW and Adam it is applied decoupled,
            as AdamW applies weight decay: after each update, θ moves towards θ₀ by
            min(1, lr·λ) of the way, so a large λ holds the backbone at θ₀. θ₀ is what the
            backbone holds when `run_schedule` starts. "features": λ times the mean squared
            distance between the pooled features the head reads and those of a frozen copy
            of the backbone at θ₀, on the same batch (feature-map regularisation in the
            spirit of DELTA, Li et al., ICLR 2019); the copy costs one more backbone's
            weights in memory and one more forward pass per step. "source_task": λ times
            the KL divergence (temperature 2) between the source task's predictions, through
            the head the checkpoint came with (ImageNet's classifier), of the model and of
            the frozen copy (Learning without Forgetting, Li & Hoiem 2016); it needs a
            backbone built with its source head (`Backbone.source_heads`).
            `tfxfer.regularizers` has the details. Defaults to `None`.
        regularizer_weight: float. λ, >= 0; 0 is plain fine-tuning. Defaults to `0.0`.
        min_steps: int. With `epochs=None`: the fewest optimizer steps. Defaults to `50`.
        min_epochs: int. With `epochs=None`: the fewest epochs. Defaults to `3`.
        max_epochs: int. With `epochs=None`: the most epochs. Defaults to `10`.
        solver: str or None. "lbfgs": a head-only stage whose head is linear (one softmax,
            sigmoid or linear output layer on the pooled features) and trains on cached
            features is fit to convergence, full batch, by L-BFGS (`tfxfer.solver`), its L2
            strength chosen by 5-fold cross-validation on the training features
            (`tfxfer.train.head_solver` says how). The stage then counts as one epoch,
            checkpointed once at its end. A stage the solver
            cannot fit (a hidden layer, augmentation that must run, LoRA, no cache) trains
            with Keras epochs as usual. Defaults to `None`.
        patience: int or None. Train until convergence: end the stage once the monitored
            metric (`run_schedule`'s `monitor`, the validation loss by default) has not
            improved for this many epochs, and end it, early or not, on the weights of its best
            epoch; `epochs` is then the most it trains. Defaults to `None` (every epoch, and
            the last epoch's weights).
    """

    name: str
    epochs: int | None
    train: str | int | list[str] = "head"
    learning_rate: float | str = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    decay: str = "cosine"
    min_lr_ratio: float = 0.0
    layerwise_lr_decay: float | None = None
    lora_rank: int | None = None
    train_batchnorm: bool = False
    patience: int | None = None
    regularizer: str | None = None
    regularizer_weight: float = 0.0
    min_steps: int = 50
    min_epochs: int = 3
    max_epochs: int = 10
    solver: str | None = None

    def validate(self, groups: LayerGroups | Sequence[str] | None = None) -> None:
        problems = self._length_problems() + self._rate_problems() + self._regularizer_problems()
        if groups is not None:
            try:
                self.trainable_groups(groups)
            except TfxferError as error:
                problems.append(str(error))
        if problems:
            raise TfxferError(f"Invalid stage {self.name!r}: " + "; ".join(problems) + ".")

    def _length_problems(self) -> list[str]:
        """What is wrong with how long the stage trains (epochs, steps, patience, solver)."""
        problems = []
        if self.epochs is not None and (not _count(self.epochs) or self.epochs < 0):
            problems.append(
                f"epochs must be >= 0 (an int, or None: sized by steps), got {self.epochs!r}"
            )
        for key in ("min_steps", "min_epochs", "max_epochs"):
            value = getattr(self, key)
            if not _count(value) or value < (0 if key == "min_steps" else 1):
                problems.append(
                    f"{key} must be an int >= {0 if key == 'min_steps' else 1}, got {value!r}"
                )
        if (
            _count(self.min_epochs)
            and _count(self.max_epochs)
            and self.min_epochs > self.max_epochs
        ):
            problems.append(
                f"min_epochs ({self.min_epochs}) is above max_epochs ({self.max_epochs})"
            )
        if self.solver is not None and self.solver not in SOLVERS:
            problems.append(f"solver must be one of {SOLVERS} or None, got {self.solver!r}")
        return problems

    def _rate_problems(self) -> list[str]:
        """What is wrong with the optimizer and its learning-rate schedule."""
        problems = []
        rate = self.learning_rate
        if rate == "auto":
            pass  # found by the range test when the stage starts (tfxfer.train.lr_find)
        elif isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.decay not in DECAYS:
            problems.append(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.layerwise_lr_decay is not None:
            if not 0.0 < self.layerwise_lr_decay <= 1.0:
                problems.append(
                    f"layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}"
                )
            if self.optimizer == "sgd":
                problems.append("layerwise_lr_decay needs optimizer 'adamw' or 'adam'")
        if self.patience is not None and (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, int)
            or self.patience < 1
        ):
            problems.append(f"patience must be an int >= 1 or None, got {self.patience!r}")
        return problems

    def _regularizer_problems(self) -> list[str]:
        """What is wrong with the source-task regularizer and LoRA."""
        problems = []
        if self.regularizer is not None and self.regularizer not in REGULARIZERS:
            problems.append(
                f"regularizer must be one of {REGULARIZERS} or None, got {self.regularizer!r}"
            )
        weight = self.regularizer_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            problems.append(f"regularizer_weight (λ) must be a number >= 0, got {weight!r}")
        elif weight == float("inf"):
            problems.append("regularizer_weight (λ) must be finite, got inf")
        if self.regularizer == "l2sp" and self.optimizer == "sgd":
            problems.append(f"regularizer {self.regularizer!r} needs optimizer 'adamw' or 'adam'")
        if self.lora_rank is not None and int(self.lora_rank) < 1:
            problems.append(f"lora_rank must be >= 1, got {self.lora_rank}")
        return problems

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The epochs this stage trains when each epoch has `steps_per_epoch` steps.

        `epochs` when it is set; else enough epochs for `min_steps` optimizer steps, at least
        `min_epochs` and at most `max_epochs`.
        """
        if self.epochs is not None:
            return int(self.epochs)
        by_steps = math.ceil(int(self.min_steps) / max(int(steps_per_epoch), 1))
        return int(min(self.max_epochs, max(self.min_epochs, by_steps)))

    def trainable_groups(self, groups: LayerGroups | Sequence[str]) -> list[str]:
        """The backbone groups this stage trains, in model order."""
        groups = _as_layer_groups(groups)
        if self.train == "head":
            return []
        if self.train == "all":
            return groups.names
        if isinstance(self.train, int) and not isinstance(self.train, bool):
            return groups.top(self.train)
        if isinstance(self.train, (list, tuple)):
            problems, chosen = [], set()
            for name in self.train:
                try:
                    chosen.add(groups.resolve(name))
                except TfxferError as error:
                    problems.append(str(error))
            if problems:
                raise TfxferError("; ".join(problems))
            return [name for name in groups.names if name in chosen]
        raise TfxferError(
            f"Expected `train` to be 'head', 'all', an int or a list of group names. "
            f"Received: train={self.train!r}"
        )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_layer_groups(groups: LayerGroups | Sequence[str]) -> LayerGroups:
    return groups if isinstance(groups, LayerGroups) else LayerGroups.from_names(list(groups))
