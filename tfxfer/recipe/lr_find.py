"""`tfxfer lr-find`: the learning-rate range test for one stage of a recipe's schedule.

The range test itself lives in `tfxfer.train` (`find_learning_rate`, on a model and a
stage); this module only brings a recipe's model to where the stage would start (the
stages before it train first, as the run would train them) and says what it found: a flag
to train with, `lr_find.json` and `lr_find.png`.
"""

from __future__ import annotations

from typing import Any

import keras

from tfxfer.backbones.base import LayerGroups
from tfxfer.configfile import recipe_name
from tfxfer.distribute import Distribution
from tfxfer.errors import TfxferError
from tfxfer.recipe.config import RecipeConfig
from tfxfer.recipe.start import BuildData, BuildModel, Prepared, keeping_dtype_policy, prepare
from tfxfer.rundir import RunDir
from tfxfer.schedule import Stage, validate_schedule
from tfxfer.train import find_learning_rate as range_test_of_stage
from tfxfer.train import run_schedule
from tfxfer.train.lr_find import AUTO, plot_finding


def find_learning_rate(
    config: RecipeConfig,
    build_data: BuildData,
    build_model: BuildModel,
    *,
    stage: str | None = None,
    steps: int | None = None,
    output_dir: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`tfxfer lr-find`: the learning-rate range test for one stage of a recipe's schedule.

    The stages before it train first (as the run would train them, without a run directory),
    so the test sees the model the stage would start from: the fine-tuning stage's test
    starts from a trained head. Writes `lr_find.png` and `lr_find.json` to `output_dir`
    (default: the config's output_dir + "-lr-find"), a run directory of its own, so the run
    itself can go to `output_dir` afterwards.

    Args:
        stage: str or None. The stage's name; default: the first with learning_rate auto,
            else the last stage (the fine-tuning one).
        steps: int or None. Steps of the test (default: 100).

    Returns:
        A dict with "stage", "suggestion", "finding" (`LRFinding`), "flag" (what to pass) and
        "output_dir".
    """
    with keeping_dtype_policy():
        config.validate()
        output_dir = output_dir or str(config.output_dir).rstrip("/") + "-lr-find"
        RunDir.check(output_dir, overwrite=overwrite, resume=False)
        RunDir.check_inputs(output_dir, config.input_paths())
        stages = config.schedule()
        index = _stage_index(stages, stage)
        keras.utils.set_random_seed(config.seed)
        distribution = Distribution(
            config.strategy, config.mixed_precision, config.batch_size, config.scale_learning_rate
        )
        prepared = prepare(config, build_data, build_model, distribution)
        validate_schedule(stages, LayerGroups.of(prepared.backbone))
        datasets = prepared.datasets()
        _train_earlier(prepared, datasets, stages, index)
        finding = range_test_of_stage(
            prepared.model,
            prepared.backbone,
            stages[index],
            datasets.train,
            strategy=distribution.strategy,
            cache_features=config.cache_features,
            class_weight=prepared.class_weight,
            steps=steps,
        )
        run_dir = RunDir(
            output_dir, overwrite=overwrite, resume=False, write=distribution.is_chief, lock=True
        )
        try:
            return _report(config, stages[index].name, index, finding, run_dir)
        finally:
            run_dir.close()


def _stage_index(stages: list[Stage], stage: str | None) -> int:
    """Where the named stage is in the schedule (default: the first auto one, else the last)."""
    names = [s.name for s in stages]
    if stage is None:
        autos = [s.name for s in stages if s.learning_rate == AUTO]
        stage = autos[0] if autos else names[-1]
    if stage not in names:
        raise TfxferError(
            f"--stage {stage!r} is not a stage of this schedule; its stages are {names}."
        )
    return names.index(stage)


def _train_earlier(prepared: Prepared, datasets, stages: list[Stage], index: int) -> None:
    """Trains the stages before `stages[index]` as the run would, so its test starts there."""
    earlier = [s for s in stages[:index] if s.epochs != 0]
    for s in earlier:
        if s.learning_rate == AUTO:
            raise TfxferError(
                f"Stage {s.name!r} comes before {stages[index].name!r} and has learning_rate "
                f"auto: find its rate first (--stage {s.name}), set it, then find "
                f"{stages[index].name!r}'s."
            )
    if not earlier:
        return
    print(f"[tfxfer] lr-find: training {[s.name for s in earlier]} first", flush=True)
    config, distribution = prepared.config, prepared.distribution
    run_schedule(
        prepared.model,
        prepared.backbone,
        earlier,
        datasets.train,
        datasets.val,
        strategy=distribution.strategy,
        lr_scale=distribution.lr_scale,
        verbose=config.fit_verbosity(),
        cache_features=config.cache_features,
        class_weight=prepared.class_weight,
    )


def _flag_hint(config: RecipeConfig, stage: str, index: int, suggestion: float) -> str:
    """What to train with: the recipe's flag for the stage, or a `--set` into `stages`."""
    flag = {"head": "head_learning_rate", "finetune": "finetune_learning_rate"}.get(stage)
    if flag and config.stages is None:
        return f"--{flag.replace('_', '-')} {suggestion:.2g}"
    return f"--set stages.{index}.learning_rate={suggestion:.2g}"


def _report(config: RecipeConfig, stage: str, index: int, finding, run_dir: RunDir) -> dict:
    """Writes `lr_find.json` and `lr_find.png` (on the chief) and says what was found."""
    hint = _flag_hint(config, stage, index, finding.suggestion)
    if run_dir.write:
        run_dir.write_json("lr_find.json", {"stage": stage, "flag": hint, **finding.to_json()})
        plot_finding(
            finding,
            run_dir.file("lr_find.png"),
            f"stage {stage!r} of {recipe_name(type(config))}: suggested {finding.suggestion:.2g}",
        )
    diverged = "; the loss diverged before the end" if finding.stopped_early else ""
    if not finding.fell:
        diverged += (
            "; the loss did not fall anywhere, so this is tfxfer's usual rate for such a "
            "stage, not a measurement"
        )
    print(
        f"[tfxfer] lr-find: stage {stage!r}: suggested learning rate "
        f"{finding.suggestion:.3g} (loss lowest at {finding.minimum:.3g}, falling fastest at "
        f"{finding.steepest:.3g}{diverged}). Train with {hint}. Plot: "
        f"{run_dir.path}/lr_find.png",
        flush=True,
    )
    return {
        "stage": stage,
        "suggestion": finding.suggestion,
        "finding": finding,
        "flag": hint,
        "output_dir": run_dir.path,
    }
