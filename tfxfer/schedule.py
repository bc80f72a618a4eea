"""Stages of a fine-tuning schedule, and what a stage does to a model before it trains.

Transfer learning works best in stages: first train only the new head on a frozen backbone
(a randomly initialised head would otherwise send large, noisy gradients into pretrained
weights), then unfreeze some or all of the backbone at a lower learning rate. A `Stage` says
which layer groups train, with which optimizer and learning rate, for how many epochs; a
schedule is a list of stages (`tfxfer.stage`, importable from here too). This module builds
schedules and applies a stage to a model; it knows nothing of data, strategies or run
directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from tfxfer.backbones.base import LayerGroups
from tfxfer.errors import TfxferError
from tfxfer.layers.layerwise_adamw import LayerwiseAdamW
from tfxfer.layers.warmup_cosine import WarmupCosine
from tfxfer.stage import DECAYS as DECAYS
from tfxfer.stage import FINETUNE_STEPS, Stage
from tfxfer.stage import OPTIMIZERS as OPTIMIZERS
from tfxfer.stage import REGULARIZERS as REGULARIZERS
from tfxfer.stage import SOLVERS as SOLVERS


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
