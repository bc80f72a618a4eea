"""Stages of a fine-tuning schedule, and what a stage does to a model before it trains.

Transfer learning works best in stages: first train only the new head on a frozen backbone
(a randomly initialised head would otherwise send large, noisy gradients into pretrained
weights), then unfreeze some or all of the backbone at a lower learning rate. A `Stage` says
which layer groups train, with which optimizer and learning rate, for how many epochs; a
schedule is a list of stages. This module knows nothing of data, strategies or run
directories.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

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
        if groups is not None:
            try:
                self.trainable_groups(groups)
            except TfxferError as error:
                problems.append(str(error))
        if problems:
            raise TfxferError(f"Invalid stage {self.name!r}: " + "; ".join(problems) + ".")

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


def default_schedule(
    head_epochs: int | None = None,
    finetune_epochs: int | None = None,
    *,
    head_learning_rate: float | str = 1e-3,
    finetune_learning_rate: float | str = 1e-4,
    unfreeze: str | int | list[str] = "all",
    layerwise_lr_decay: float | None = None,
    head_patience: int | None = None,
) -> list[Stage]:
    """The two-stage schedule: fit the head on a frozen backbone, then fine-tune (LP-FT).

    Fine-tuning from a converged linear probe distorts the pretrained features less than
    fine-tuning from a random head (Kumar et al., "Fine-Tuning can Distort Pretrained
    Features and Underperform Out-of-Distribution", ICLR 2022). So by default the head is
    not trained for a few epochs but fit to convergence: on cached features a linear head is
    solved by L-BFGS with its L2 strength chosen by cross-validation (`Stage.solver`), in
    seconds; and both stages are sized by optimizer steps, not epochs (`Stage.epochs_for`).

    Args:
        head_epochs: int or None. Epochs of the first stage; 0 skips it. None: the solver,
            where the head is linear and its features cached, else epochs sized by steps.
            Defaults to `None`.
        finetune_epochs: int or None. Epochs of the second stage; 0 skips it. None: sized
            by steps (at least 50 optimizer steps and 3 epochs, at most 10 epochs).
            Defaults to `None`.
        head_learning_rate: float. Of a head stage trained by epochs. Defaults to `1e-3`.
        finetune_learning_rate: float. Lower than the head's, so pretrained weights move
            gently. Defaults to `1e-4`.
        unfreeze: "all", an int (top k groups) or group names for the second stage.
        layerwise_lr_decay: float or None. Discriminative learning rates in the second stage.
        head_patience: int or None. Train the head by epochs until convergence: the first
            stage ends once the validation loss has not improved for this many epochs, on
            its best epoch, with `head_epochs` the most; its learning rate is then constant.
            Defaults to `None`.
    """
    stages = []
    if head_epochs != 0:
        converge = {"decay": "constant", "warmup_fraction": 0.0} if head_patience else {}
        stages.append(
            Stage(
                "head",
                head_epochs,
                train="head",
                learning_rate=head_learning_rate,
                patience=head_patience,
                solver="lbfgs" if head_epochs is None and not head_patience else None,
                **converge,
            )
        )
    if finetune_epochs != 0:
        stages.append(
            Stage(
                "finetune",
                finetune_epochs,
                train=unfreeze,
                learning_rate=finetune_learning_rate,
                layerwise_lr_decay=layerwise_lr_decay,
                **FINETUNE_STEPS,
            )
        )
    if not stages:
        raise TfxferError("The schedule is empty: head_epochs and finetune_epochs are both 0.")
    return stages


def gradual_unfreezing(
    group_names: list[str],
    *,
    head_epochs: int = 1,
    epochs_per_group: int = 1,
    head_learning_rate: float = 1e-3,
    learning_rate: float = 1e-4,
    groups: int | None = None,
) -> list[Stage]:
    """ULMFiT-style gradual unfreezing: the head, then one more group per stage, top first.

    Unfreezing from the top lets the most task-specific features adapt before the general
    low-level ones are touched, which makes fine-tuning on small data more stable.

    Args:
        group_names: list[str]. The backbone's groups, input side first.
        head_epochs: int. Epochs of the head-only stage. Defaults to `1`.
        epochs_per_group: int. Epochs of each later stage. Defaults to `1`.
        head_learning_rate: float. Defaults to `1e-3`.
        learning_rate: float. For the unfreezing stages. Defaults to `1e-4`.
        groups: int or None. How many groups to unfreeze in all. Defaults to all of them.
    """
    count = len(group_names) if groups is None else int(groups)
    if not 0 <= count <= len(group_names):
        raise TfxferError(
            f"Expected `groups` between 0 and {len(group_names)} (the backbone's groups: "
            f"{group_names}). Received: groups={groups}"
        )
    stages = [Stage("head", head_epochs, train="head", learning_rate=head_learning_rate)]
    for k in range(1, count + 1):
        stages.append(
            Stage(
                f"unfreeze_{group_names[-k]}",
                epochs_per_group,
                train=k,
                learning_rate=learning_rate,
            )
        )
    return stages


def validate_schedule(stages: list[Stage], groups: LayerGroups | Sequence[str]) -> None:
    """Checks every stage against the model's groups; raises `TfxferError` naming the problem."""
    if not stages:
        raise TfxferError("The schedule has no stages.")
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise TfxferError(f"Stage names must be unique (they key the history). Received: {names}")
    for stage in stages:
        stage.validate(groups)


def apply_stage(model: keras.Model, groups: LayerGroups, stage: Stage) -> list[str]:
    """Sets which layers train in this stage; returns the trainable backbone groups.

    Every layer of the model outside the backbone groups is the head, and always trains.
    Frozen layers get `trainable=False`, which in Keras 3 also puts BatchNormalization into
    inference mode (it normalises with its moving statistics and never updates them). The
    caller must recompile afterwards: a compiled train step captured the old trainable set.

    With `stage.lora_rank`, the stage's groups stay frozen except for low-rank adapters added
    to their `groups.lora_targets` layers: only the adapters and the head train.

    `groups.frozen` never train: backbone layers the head does not read (BERT's pooler under
    mean pooling), which would otherwise get no gradient.

    Args:
        model: keras.Model. The model the groups' layers belong to.
        groups: LayerGroups. From `LayerGroups.of(backbone_or_backbones)`.
        stage: Stage. What to train.
    """
    trainable = stage.trainable_groups(groups)
    # Undo any earlier stage, then freeze what this stage freezes. A LoRA stage froze single
    # variables, which a layer's `trainable` does not reach: give those back first.
    for variable in getattr(model, "_tfxfer_lora_frozen", []):
        variable.trainable = True
    model._tfxfer_lora_frozen = []
    model.trainable = True
    for group_name, layers in groups.groups.items():
        for layer in layers:
            layer.trainable = group_name in trainable and not stage.lora_rank
            if (
                layer.trainable
                and not stage.train_batchnorm
                and isinstance(layer, keras.layers.BatchNormalization)
            ):
                layer.trainable = False
    for layer in groups.frozen:
        layer.trainable = False
    if stage.lora_rank:
        model._tfxfer_lora_frozen = _enable_lora(
            groups, trainable, int(stage.lora_rank), stage.name
        )
    return trainable


def _enable_lora(groups: LayerGroups, trainable: list[str], rank: int, stage_name: str) -> list:
    """Adds adapters to the stage's targets; returns the variables it froze one by one."""
    in_stage = {
        id(sublayer)
        for group in trainable
        for layer in groups.groups[group]
        for sublayer in layer._flatten_layers(include_self=True, recursive=True)
    }
    targets = [layer for layer in groups.lora_targets if id(layer) in in_stage]
    if not targets:
        raise TfxferError(
            f"Stage {stage_name!r} asks for LoRA, but no layer of its groups {trainable} can take "
            "adapters (this backbone supports LoRA on: "
            f"{sorted({layer.name for layer in groups.lora_targets}) or 'nothing'})."
        )
    # A frozen parent hides its children's weights from `trainable_weights`, so the stage's
    # group layers are made trainable and every weight in them except the adapters frozen.
    for group in trainable:
        for layer in groups.groups[group]:
            layer.trainable = True
    for layer in targets:
        if not getattr(layer, "lora_enabled", False):
            layer.enable_lora(rank)
    frozen = []
    for group in trainable:
        for layer in groups.groups[group]:
            for variable in layer.trainable_weights:
                if not variable.path.rsplit("/", 1)[-1].startswith("lora_kernel"):
                    variable.trainable = False
                    frozen.append(variable)
    return frozen


def layerwise_multipliers(
    groups: LayerGroups, trainable: list[str], decay: float | None
) -> dict[str, float]:
    """Learning-rate multiplier per variable path: 1 for each backbone's top trainable group,
    `decay`**d for the group d below it. The head is not in any group and keeps 1."""
    if decay is None or decay == 1.0:
        return {}
    multipliers = {}
    for group_name, depth in groups.depth_from_top(trainable).items():
        for layer in groups.groups[group_name]:
            for variable in layer.trainable_weights:
                multipliers[variable.path] = float(decay**depth)
    return multipliers


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


def make_optimizer(
    stage: Stage,
    steps_per_epoch: int,
    multipliers: dict[str, float] | None = None,
    lr_scale: float = 1.0,
    anchors: dict[str, Any] | None = None,
) -> keras.optimizers.Optimizer:
    """The optimizer for a stage, with its warmup + decay schedule over the stage's steps.

    Optimizers get fixed names: Keras would otherwise number them per process ("adam_w_3"),
    and that number ends up in the optimizer variables' paths a resume checkpoint compares.
    """
    total = max(stage.epochs_for(steps_per_epoch) * int(steps_per_epoch), 1)
    schedule = WarmupCosine(
        stage.learning_rate * lr_scale,
        total,
        int(total * stage.warmup_fraction),
        stage.min_lr_ratio,
        stage.decay,
    )
    if stage.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, name="sgd")
    l2sp = stage.regularizer == "l2sp" and stage.regularizer_weight > 0
    if stage.optimizer == "adam" and not multipliers and not l2sp:
        return keras.optimizers.Adam(schedule, name="adam")
    weight_decay = stage.weight_decay if stage.optimizer == "adamw" else 0.0
    return LayerwiseAdamW(
        lr_multipliers=multipliers,
        anchors=anchors if l2sp else None,
        anchor_weight=stage.regularizer_weight if l2sp else 0.0,
        learning_rate=schedule,
        weight_decay=weight_decay,
        name="adamw",
    )
