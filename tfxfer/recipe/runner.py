"""`run`: the one way a fine-tuning recipe runs, from its config to a finished run directory.

A recipe is a story of three parts: its own config fields, how it loads its data, and how it
builds its model. Everything else is the same for every recipe and happens here, in this
order: check the config and the output directory (cheap, before minutes go into a backbone)
-> seed -> distribution scope -> data -> model -> schedule -> run directory -> train ->
evaluate -> save and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from tfxfer import export, report
from tfxfer.backbones.base import LayerGroups
from tfxfer.backbones.lexical import is_lexical
from tfxfer.batchnorm import has_batchnorm
from tfxfer.configfile import to_document
from tfxfer.recipe.config import RecipeConfig
from tfxfer.recipe.finish import finish_run
from tfxfer.recipe.rank import choose_backbone
from tfxfer.recipe.start import (
    BuildData,
    BuildModel,
    Prepared,
    backbone_info,
    keeping_dtype_policy,
    open_run,
    prepare,
    randomly_initialised,
    start_run,
)
from tfxfer.regularizers import check_regularizers
from tfxfer.rundir import RunDir
from tfxfer.schedule import Stage, validate_schedule
from tfxfer.train import run_schedule
from tfxfer.train.checkpoints import Checkpointer
from tfxfer.train.features import split_at_head
from tfxfer.train.head_solver import linear_output_layer
from tfxfer.train.random_start import start_batchnorm
from tfxfer.train.setfit import contrastive_finetune
from tfxfer.train.setfit_inbatch import contrastive_plan, in_batch_finetune


def run(config: RecipeConfig, build_data: BuildData, build_model: BuildModel) -> dict[str, Any]:
    """Runs a recipe: check, seed, distribute, load, build, train, evaluate, save, export.

    Args:
        config: RecipeConfig. The recipe's config; validated here.
        build_data: callable. `build_data(config)` returns the `LabelledData`.
        build_model: callable. `build_model(config, data)` returns `(backbone, model)` (or a
            list of backbones for a model over several); it runs in the strategy's scope.

    Returns:
        A dict with "run_dir", "model" (as trained), "serving_model" (what was saved: it
        takes raw inputs), "backbone", "history", "metrics" (per split), "class_names",
        "data" and "result" (the `TrainResult`).
    """
    with keeping_dtype_policy():
        return _run(config, build_data, build_model)


def _run(config: RecipeConfig, build_data: BuildData, build_model: BuildModel) -> dict[str, Any]:
    distribution = start_run(config)
    config, build_data, ranking = choose_backbone(config, build_data, build_model, distribution)
    prepared = prepare(config, build_data, build_model, distribution)
    stages = _nothing_to_fine_tune(config, prepared, config.schedule())
    validate_schedule(stages, LayerGroups.of(prepared.backbone))
    check_regularizers(stages, prepared.backbone)
    # Only now, with every setting checked, is the run directory written: a typo in a flag
    # must not leave a half-started run that the next attempt refuses to overwrite.
    run_dir = open_run(
        config.output_dir,
        to_document(config),
        overwrite=config.overwrite,
        resume=config.resume,
        write=distribution.is_chief,
        lock=True,  # released by `run_dir.close()` when the run ends
        extra={
            "data": prepared.data.summary(),
            "backbone_info": backbone_info(prepared.backbone),
            **({"ranking": ranking} if ranking else {}),
            **distribution.describe(),
        },
    )
    try:
        datasets = prepared.datasets()
        stages = _from_scratch(stages, prepared, datasets, run_dir)
        stages = _contrastive_first(config, prepared, datasets, run_dir, stages)
        result = run_schedule(
            prepared.model,
            prepared.backbone,
            stages,
            datasets.train,
            datasets.val,
            run_dir=run_dir,
            strategy=distribution.strategy,
            lr_scale=distribution.lr_scale,
            verbose=config.fit_verbosity(),
            cache_features=config.cache_features,
            class_weight=prepared.class_weight,
            # Resuming on another number of replicas would change every batch.
            config={
                **dataclasses.asdict(config),
                "global_batch_size": distribution.global_batch_size,
            },
            callbacks=report.tensorboard_callbacks(run_dir, write=distribution.is_chief),
            keep_better=config.keep_better,
        )
        return _finish(prepared, datasets, run_dir, result, ranking)
    finally:
        run_dir.close()  # its lock: another run may write the directory from now on


def _finish(prepared: Prepared, datasets, run_dir: RunDir, result, ranking) -> dict[str, Any]:
    """Evaluates, saves and exports the trained model; returns what `run` returns."""
    data, model, config = prepared.data, prepared.model, prepared.config
    serving = export.serving_model(model, prepared.backbone)
    metrics = finish_run(
        run_dir,
        model,
        result,
        data.class_names,
        {"val": datasets.val, "test": datasets.test},
        examples={"val": data.val, "test": data.test},
        notes=prepared.notes,
        multi_label=data.multi_label,
        serving_model=serving,
        export_saved_model=config.export,
        write=prepared.distribution.is_chief,
        extra={"ranking": ranking} if ranking else None,
    )
    return {
        "run_dir": run_dir.path,
        "model": model,
        "serving_model": serving,
        "backbone": prepared.backbone,
        "history": result.history,
        "metrics": metrics,
        "class_names": data.class_names,
        "data": data,
        "result": result,
    }


def _nothing_to_fine_tune(config, prepared: Prepared, stages: list[Stage]) -> list[Stage]:
    """The default fine-tuning stage dropped where no backbone has weights to train.

    A lexical backbone alone (`tfidf`) learns its vocabulary from the texts and has no
    trainable weights, so its run is the solved head; the stage would only train the head
    again by gradient steps. `finetune_epochs` or `stages` given keep the schedule as asked.
    """
    if _encoders(prepared.backbone) or config.finetune_epochs is not None or config.stages:
        return stages
    if not config.quiet:
        print(
            "[tfxfer] no backbone weights to fine-tune (a lexical backbone alone): the run "
            "fits the head only.",
            flush=True,
        )
    return [dataclasses.replace(s, epochs=0) if s.name == "finetune" else s for s in stages]


def _from_scratch(stages: list[Stage], prepared: Prepared, datasets, run_dir: RunDir):
    """A randomly initialised backbone's BatchNorm statistics: kept as built, or from the data.

    `config.random_batchnorm` picks (`tfxfer.train.random_start`): "auto" (the default)
    fits a linear head to the training features both ways and keeps the start with the
    lower cross-validated loss. Recomputed statistics are then updated by every stage that
    trains the backbone (`Stage.train_batchnorm`); kept ones stay frozen, so the head reads
    the features it was fitted on. Pretrained backbones keep theirs. The choice is written to
    `batchnorm.json`; a resumed run makes it again, on the same data and initial weights.
    """
    model = prepared.model
    if not randomly_initialised(prepared.backbone) or not has_batchnorm(model):
        return stages
    config = prepared.config
    with prepared.distribution.scope():
        info = start_batchnorm(
            model,
            datasets.train,
            mode=getattr(config, "random_batchnorm", "auto"),
            seed=config.seed,
            solved_head=_solved_head(stages, model, config),
        )
    if prepared.distribution.is_chief:
        run_dir.write_json("batchnorm.json", info)
    if not config.quiet:
        print(
            f"[tfxfer] BatchNorm statistics of the random backbone: {info['start']} "
            f"({info['reason']}; {info['seconds']:.0f} s).",
            flush=True,
        )
    if info["start"] != "recomputed":
        return stages
    return [
        stage if stage.train == "head" else dataclasses.replace(stage, train_batchnorm=True)
        for stage in stages
    ]


def _solved_head(stages: list[Stage], model, config) -> bool:
    """Whether the first stage fits a linear head with the solver (not by gradient steps):
    `solving.solver_layer`'s conditions, as far as they are known before training."""
    first = next((stage for stage in stages if stage.epochs != 0), None)
    return (
        first is not None
        and first.train == "head"
        and first.solver is not None
        and not first.lora_rank
        and bool(config.cache_features)
        and linear_output_layer(split_at_head(model)) is not None
    )


def _contrastive_first(
    config, prepared: Prepared, datasets, run_dir: RunDir, stages: list[Stage]
) -> list[Stage]:
    """SetFit before the schedule, where the config asks for it (`contrastive_pairs`,
    `contrastive_steps`; `setfit_inbatch.contrastive_plan`); returns the stages to run.

    "auto" (the text recipe's default) runs it for single-label data with few texts in a
    class, one backbone and no regularizer, on every pair inside each batch. After such an
    automatic SetFit the fine-tuning stage is dropped unless `finetune_epochs` or `stages`
    was given: LP-FT discarded it in 11 of 12 measured runs at 4-8 texts a class
    (benchmarks/README.md), so it cost time and changed nothing; the solved head is then
    refit on training and validation examples together (`run_schedule`'s head-only case).

    The text encoder is trained on pairs of labelled examples (same class or not), then the
    schedule fits the head on its new features. A resumed run whose checkpoint exists skips
    the pair training (the checkpoint holds the weights it trained), not the plan.
    """
    requested = getattr(config, "contrastive_pairs", 0) or 0
    requested_steps = getattr(config, "contrastive_steps", "auto")
    plan = contrastive_plan(
        requested,
        requested_steps,
        prepared.data.train.counts(),
        multi_label=prepared.data.multi_label,
        # One encoder to train: a single backbone, or one BERT beside lexical branches.
        plain=len(_encoders(prepared.backbone)) == 1 and not config.regularizer,
    )
    if plan is None:
        return stages
    automatic = requested == "auto" and requested_steps == "auto"
    others_train = any(s.epochs != 0 for s in stages if s.name != "finetune")
    if automatic and others_train and config.finetune_epochs is None and config.stages is None:
        stages = [dataclasses.replace(s, epochs=0) if s.name == "finetune" else s for s in stages]
    distribution = prepared.distribution
    if config.resume and Checkpointer(run_dir.checkpoints, write=False).latest() is not None:
        return stages
    features = _encoder_features(prepared.model, prepared.backbone)
    with distribution.scope():
        if plan.mode == "in_batch":
            info = in_batch_finetune(
                features, datasets.train.examples, steps=plan.steps, seed=config.seed
            )
        else:
            info = contrastive_finetune(
                features,
                datasets.train.examples,
                pairs_per_example=plan.pairs_per_example,
                seed=config.seed,
            )
    info["requested"] = requested  # "auto" or the number asked for
    info["requested_steps"] = requested_steps
    info["finetune"] = (
        "run"
        if any(s.name == "finetune" and s.epochs for s in stages)
        else ("dropped after the automatic SetFit" if automatic else "none in the schedule")
    )
    if distribution.is_chief:
        run_dir.write_json("contrastive.json", info)
    if not config.quiet:
        print(
            f"[tfxfer] contrastive (SetFit, {info['mode']}): {info['pairs']} pairs, "
            f"{info['steps']} steps in {info['seconds']:.0f} s; same-class cosine "
            f"{_cosine(info, 'positive_cosine_before')} -> "
            f"{_cosine(info, 'positive_cosine_after')}, other-class "
            f"{_cosine(info, 'negative_cosine_before')} -> "
            f"{_cosine(info, 'negative_cosine_after')}"
            + (
                "; no fine-tuning stage after it (give finetune_epochs to have one)"
                if info["finetune"].startswith("dropped")
                else ""
            ),
            flush=True,
        )
    return stages


def _encoders(backbone) -> list:
    """The backbones SetFit could train: all but the lexical ones (nothing to train there)."""
    backbones = backbone if isinstance(backbone, list) else [backbone]
    return [b for b in backbones if not is_lexical(b)]


def _encoder_features(model, backbone):
    """From the model's inputs to the pooled features SetFit trains on: the whole head input
    for one backbone; the encoder's own part of it in a fusion with lexical branches, so the
    pairs' cosines are the encoder's and not diluted by fixed TF-IDF vectors."""
    if not isinstance(backbone, list) or len(backbone) == 1:
        return split_at_head(model).features
    encoder = backbone.index(_encoders(backbone)[0])
    pooled = model.get_layer("pooled_features").input[encoder]
    return keras.Model(model.inputs, pooled, name="encoder_features")


def _cosine(info: dict, key: str) -> str:
    """A mean cosine of `contrastive.json` for the progress line (None: no such pairs)."""
    return "n/a" if info.get(key) is None else f"{info[key]:.2f}"
