"""Stages fitted by the solver: a linear head on cached features, to convergence, in one go.

A `Stage(solver=...)` that trains only a linear head is not trained by epochs: the head is
fitted by L-BFGS with its strength chosen by cross-validation (`tfxfer.train.head_solver`),
and the stage counts as one epoch of the run, checkpointed once.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer.backbones.base import LayerGroups
from tfxfer.data.pipeline import TrainData
from tfxfer.model import task_of
from tfxfer.schedule import Stage, apply_stage
from tfxfer.train.callbacks import _EpochEnd
from tfxfer.train.context import StageRun
from tfxfer.train.features import STORE, HeadSplit, why_not_cached
from tfxfer.train.head_solver import feature_blocks, linear_output_layer, solve_head


def solver_layer(stage_run: StageRun) -> keras.layers.Dense | None:
    """The output layer a `solver` stage fits, or None when the stage trains by epochs.

    The solver fits a stage that trains only a linear head, on cached features; anything
    else (a hidden layer, LoRA, no cache, weights below the head) trains by epochs.
    """
    run, stage = stage_run.run, stage_run.stage
    if stage.solver is None or stage_run.trainable or stage.lora_rank or not run.cache_features:
        return None
    if why_not_cached(run.model, run.split, run.train_data) is not None:
        return None
    return linear_output_layer(run.split)


def _announce(stage_run: StageRun) -> None:
    info = stage_run.info
    print(
        f"[tfxfer] stage {stage_run.index + 1}/{len(stage_run.run.stages)} "
        f"{stage_run.stage.name!r}: fits the linear "
        f"head to convergence (L-BFGS, C by cross-validation) on cached features "
        f"{info['feature_shape']} of {info['train_examples']} examples "
        + (
            "(found from an earlier extraction)"
            if info["found_in_cache"]
            else f"(extracted in {info['extract_seconds']:.1f} s)"
        ),
        flush=True,
    )


def solve_stage(stage_run: StageRun) -> None:
    """Fits a head-only stage by the solver; records it as one epoch, checkpointed once.

    A resume after it finds its checkpoint; an interruption during it (seconds) refits.
    """
    run, stage, trainer = stage_run.run, stage_run.stage, stage_run.trainer
    cached = trainer.cached
    info = stage_run.info
    head, cached_train, cached_val = stage_run.fit_model, stage_run.fit_train, stage_run.fit_val
    if run.verbose:
        _announce(stage_run)
    fitted = solve_head(
        stage_run.solver_layer,
        cached.features,
        cached.labels,
        task_of(run.model),
        class_weight=run.class_weight,
        seed=int(trainer.config.get("seed", 0) or 0),
        solver=stage.solver,
        blocks=feature_blocks(run.split),
    )
    info.update(solver=fitted)
    logs = head.evaluate(
        cached_train.build(stage_run.start),
        steps=cached_train.steps_per_epoch,
        return_dict=True,
        verbose=0,
    )
    if cached_val is not None:
        val_logs = head.evaluate(cached_val, return_dict=True, verbose=0)
        logs.update({f"val_{key}": value for key, value in val_logs.items()})
    if run.verbose:
        shown = ", ".join(f"{key} {float(value):.4g}" for key, value in logs.items())
        print(
            f"[tfxfer] stage {stage.name!r}: C={fitted['C']:.3g} ({fitted['folds']}-fold"
            + (
                f"; branch weights {fitted['blocks_chosen']['weights']}"
                if "blocks_chosen" in fitted
                else ""
            )
            + "), "
            f"{fitted['iterations']} iterations in {fitted['seconds']:.2f} s; {shown}",
            flush=True,
        )
    for callback in [_EpochEnd(stage_run), *run.callbacks]:
        callback.set_model(head)
        callback.on_epoch_end(stage_run.start, logs)


def refit_probe_on_all_labels(
    model: keras.Model,
    groups: LayerGroups,
    split: HeadSplit | None,
    stage: Stage,
    *,
    train_data: TrainData,
    val_data: tf.data.Dataset | None,
    class_weight: dict[int, float] | None,
    seed: int,
) -> dict[str, Any] | None:
    """When the run ends on a solved probe, its head fit again on train and val together.

    The validation split was needed to choose between the probe and the fine-tuned model;
    once the probe is chosen, the labels it held back (a tenth of 8 a class is most of one)
    are worth more in the head than in a validation score. The head's strength is chosen by
    cross-validation on all of them, as the stage chose it on the training split.
    """
    layer = linear_output_layer(split)
    if layer is None or val_data is None:
        return None
    apply_stage(model, groups, stage)
    train_x, train_y, _ = STORE.features(split.features, train_data.examples)
    val_x, val_y, _ = STORE.features(split.features, val_data.unbatch())
    info = solve_head(
        layer,
        np.concatenate([train_x, val_x]),
        np.concatenate([train_y, val_y]),
        task_of(model),
        class_weight=class_weight,
        seed=seed,
        solver=stage.solver,
        blocks=feature_blocks(split),
    )
    refit = {"examples": int(len(train_x) + len(val_x)), "C": info["C"], "folds": info["folds"]}
    if "blocks_chosen" in info:
        refit["blocks_chosen"] = info["blocks_chosen"]["weights"]
    return refit
