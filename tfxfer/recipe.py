"""The recipe skeleton: the config fields every recipe shares, and the one way a recipe runs.

A recipe is a story of three parts: its own config fields, how it loads its data, and how it
builds its model. Everything else is the same for every recipe and lives here, in this order:
check the config and the output directory (cheap, before minutes go into a backbone) -> seed
-> distribution scope -> data -> model -> schedule -> run directory -> train -> evaluate ->
save and export. A new recipe subclasses `RecipeConfig` and calls `run`:

```python
@dataclass
class Config(RecipeConfig):
    data_dir: str | None = None  # one subfolder per class

def main(config: Config) -> dict:
    return run(config, build_data, build_model)

if __name__ == "__main__":
    sys.exit(command_line(main, Config, __doc__))
```

Flags come from the fields (`image_size` becomes `--image-size`) and `--help` text from the
comment after each field (`tfxfer.flags`), so flags, defaults and help never drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import keras
import tensorflow as tf

from tfxfer import export, keras_compat, report
from tfxfer.backbones import modality_of
from tfxfer.backbones.base import Backbone, LayerGroups
from tfxfer.batchnorm import has_batchnorm, recompute_batchnorm_statistics
from tfxfer.configfile import recipe_name, to_document
from tfxfer.data.balance import BALANCE_MODES, balance_data, imbalance_warning
from tfxfer.data.examples import Examples, LabelledData
from tfxfer.errors import TfxferError
from tfxfer.flags import FlagConfig
from tfxfer.fusion import FUSIONS, build_fusion_model, fusion_summary
from tfxfer.heads import HeadConfig
from tfxfer.model import build_model
from tfxfer.regularizers import check_regularizers
from tfxfer.rundir import RunDir
from tfxfer.schedule import REGULARIZERS, Stage, default_schedule, validate_schedule
from tfxfer.train import TrainResult, run_schedule
from tfxfer.train.lr_find import AUTO

log = logging.getLogger(__name__)

# The largest `image_size` a config accepts: a batch of 32 at 1024 px in float32 with a
# ResNet50's activations already needs tens of GB.
MAX_IMAGE_SIZE = 1024

# What every recipe's smoke config sets: tiny and fast, for tests.
SMOKE_SETTINGS = {
    "batch_size": 8,
    "head_epochs": 1,
    "finetune_epochs": 1,
    "export": False,
    "verbose": 0,
}


@dataclass
class RecipeConfig(FlagConfig):
    """The fields every recipe shares; a recipe's `Config` subclasses it and adds its own.

    A recipe may redeclare a field to change its default (the text recipe trains with a
    smaller batch). `validate` names every bad value at once.
    """

    output_dir: str = "runs/tfxfer"  # where the run directory goes
    backbone: str = "resnet50"  # a backbone name, preset or local directory (`tfxfer backbones`)
    fusion: str = "concat"  # with --backbone a,b: concat | sum | product | gated | attention
    fusion_width: int | None = None  # projection width for sum/product/gated/attention fusion
    val_split: float = 0.2  # share of the training data held out when no val set is given
    batch_size: int = 32  # per replica; the global batch is this times the replicas
    head_epochs: int | None = None  # stage 1 (head only): none solves a linear head; N epochs
    head_patience: int | None = None  # e.g. 3: stage 1 ends once val loss stalls this many epochs
    finetune_epochs: int | None = None  # stage 2: none sizes it by steps (>=50, 3-10 epochs)
    keep_better: bool = True  # end on the stage-1 model if fine-tuning made validation worse
    head_learning_rate: float | str = 1e-3  # peak learning rate of stage 1 (auto: range test)
    finetune_learning_rate: float | str = 1e-4  # peak learning rate of stage 2 (auto: range test)
    unfreeze: str = "all"  # stage 2 trains "all" backbone layer groups, or the top K ("2")
    layerwise_lr_decay: float | None = None  # e.g. 0.8: each lower group learns 0.8x as fast
    regularizer: str | None = None  # l2sp | features | source_task: stage 2 stays near pretrained
    regularizer_weight: float = 0.0  # λ of the regularizer (0 is plain fine-tuning)
    lora_rank: int | None = None  # stage 2 trains LoRA adapters of this rank, not the backbone
    stages: list[dict] | None = None  # JSON list of Stage fields; replaces head_* and finetune_*
    pooling: str | None = None  # head pooling; default: the backbone's (avg; text: cls or mean)
    hidden_units: list[int] = field(default_factory=list)  # head's dense widths, e.g. 256,128
    dropout: float = 0.2  # dropout before each dense layer of the head
    balance: str | None = None  # weights | sampling: for imbalanced classes (warned about if unset)
    seed: int = 0  # seeds the split, the head's initialisation, dropout and shuffling
    strategy: str = "auto"  # auto | cpu | one_device | mirrored | multi_worker | tpu
    mixed_precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    scale_learning_rate: bool = False  # multiply learning rates by the number of replicas
    cache_features: bool = True  # stage 1 trains the head on features computed once
    export: bool = True  # also write a SavedModel that takes raw inputs
    overwrite: bool = False  # replace the files an earlier run wrote in output_dir
    resume: bool = False  # continue the run in output_dir from its last complete epoch
    verbose: int | None = None  # 0 silent, 1 bar, 2 a line per epoch; none: a bar on a terminal
    quiet: bool = False  # only warnings, errors and the end-of-run summary

    SMOKE_SETTINGS: ClassVar[dict[str, Any]] = SMOKE_SETTINGS
    # What the recipe classifies ("image" or "text"); every backbone must take it.
    MODALITY: ClassVar[str | None] = None

    def problems(self) -> list[str]:
        """Every invalid value, as "name=value (expected ...)"; a recipe extends the list."""
        from tfxfer.distribute import MIXED_PRECISION_POLICIES, STRATEGY_NAMES

        found: list[str] = []
        check = self.checker(found)

        # Recipes name their input sizes alike, so a recipe's own size fields are checked here.
        for name in ("batch_size", "lora_rank", "image_size", "sequence_length", "head_patience"):
            check(name, _positive_int, "a positive integer")
        for name in ("head_epochs", "finetune_epochs"):
            check(name, lambda v: _int(v) and v >= 0, "an integer >= 0, or none (automatic)")
        check("seed", lambda v: _int(v) and v >= 0, "an integer >= 0")
        for name in ("head_learning_rate", "finetune_learning_rate"):
            # inf or nan would train to NaN and fail only after the first epoch.
            check(
                name,
                lambda v: v == AUTO or _number(v) and math.isfinite(v) and v > 0,
                "a finite number > 0, or auto (the learning-rate range test finds one)",
            )
        check("val_split", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")
        check("dropout", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")
        check("layerwise_lr_decay", lambda v: _number(v) and 0 < v <= 1, "in (0, 1]")
        check("regularizer", lambda v: v in REGULARIZERS, f"one of {REGULARIZERS} or none")
        check(
            "regularizer_weight",
            lambda v: _number(v) and math.isfinite(v) and v >= 0,
            "a finite number >= 0",
        )
        check(
            "unfreeze", lambda v: str(v) == "all" or str(v).isdigit(), "'all' or a number of groups"
        )
        check("hidden_units", lambda v: all(_positive_int(u) for u in v), "positive integers")
        check("balance", lambda v: v in BALANCE_MODES, f"one of {BALANCE_MODES} or none")
        check("fusion", lambda v: v in FUSIONS, f"one of {FUSIONS}")
        check("fusion_width", _positive_int, "a positive integer")
        found += self._backbone_problems()
        check("strategy", lambda v: v in STRATEGY_NAMES, f"one of {STRATEGY_NAMES}")
        check("verbose", lambda v: _int(v) and v in (0, 1, 2), "0, 1 or 2, or none (automatic)")
        modes = ("auto", *MIXED_PRECISION_POLICIES)
        check("mixed_precision", lambda v: v in modes, f"one of {modes}")
        if self.stages is not None:
            from tfxfer.configfile import stage_problems

            found += stage_problems(self.stages)
        elif self.head_epochs == 0 and self.finetune_epochs == 0:
            found.append("head_epochs and finetune_epochs are both 0 (nothing would train)")
        if self.overwrite and self.resume:
            found.append("overwrite and resume are both set (pick one)")
        if not str(self.output_dir).strip():
            found.append(
                "output_dir='' (expected a directory; an empty value would be the "
                "current directory)"
            )
        # For recipes with an image size: beyond this one batch outgrows most memory.
        check(
            "image_size",
            lambda v: not _int(v) or v <= MAX_IMAGE_SIZE,
            f"at most {MAX_IMAGE_SIZE}; larger images need more memory than a batch can have",
        )
        output_problem = output_dir_problem(str(self.output_dir))
        if output_problem:
            found.append(output_problem)
        return found

    def backbone_names(self) -> list[str]:
        """The backbones `--backbone a,b` names: one, or several for a fusion model."""
        return [name.strip() for name in str(self.backbone).split(",") if name.strip()]

    def _backbone_problems(self) -> list[str]:
        names = self.backbone_names()
        if not names:
            return [f"backbone={self.backbone!r} (expected a backbone name, or a,b to fuse)"]
        found = []
        if len(names) == 1 and (self.fusion != "concat" or self.fusion_width is not None):
            found.append(
                f"fusion={self.fusion!r} with one backbone (fusion joins several: --backbone a,b)"
            )
        if len(names) != len(set(names)):
            found.append(f"backbone={self.backbone!r} (names a backbone twice)")
        if self.MODALITY is not None:
            other = {name: modality_of(name) for name in names}
            other = {n: kind for n, kind in other.items() if kind not in (None, self.MODALITY)}
            if other:
                found.append(
                    f"backbone={self.backbone!r} ({', '.join(other)} takes "
                    f"{'images' if self.MODALITY == 'text' else 'text'}, and this recipe "
                    f"classifies {'text' if self.MODALITY == 'text' else 'images'}: fuse "
                    "backbones of one modality)"
                )
        return found

    def head(self) -> HeadConfig:
        """The head these fields describe."""
        return HeadConfig(
            pooling=self.pooling, hidden_units=list(self.hidden_units), dropout=self.dropout
        )

    def classifier(self, backbones: list[Backbone], num_outputs: int, task: str = "single_label"):
        """`(backbone, model)` for one backbone, `(backbones, fused model)` for several."""
        if len(backbones) == 1:
            model = build_model(backbones[0], num_outputs, task=task, head=self.head())
            return backbones[0], model
        model = build_fusion_model(
            backbones,
            num_outputs,
            fusion=self.fusion,
            width=self.fusion_width or "auto",
            task=task,
            head=self.head(),
        )
        return backbones, model

    def validate(self) -> RecipeConfig:
        """Raises `TfxferError` naming every invalid field at once; returns the config."""
        found = self.problems()
        if found:
            raise TfxferError(f"Invalid {type(self).__name__}: " + "; ".join(found) + ".")
        return self

    def schedule(self) -> list[Stage]:
        """The schedule: `stages` when given, else the two stages the head_*/finetune_* fields
        describe."""
        if self.stages is not None:
            from tfxfer.configfile import stage_documents_to_stages

            return stage_documents_to_stages(self.stages)
        stages = default_schedule(
            self.head_epochs,
            self.finetune_epochs,
            head_learning_rate=self.head_learning_rate,
            finetune_learning_rate=self.finetune_learning_rate,
            unfreeze=int(self.unfreeze) if str(self.unfreeze).isdigit() else self.unfreeze,
            layerwise_lr_decay=self.layerwise_lr_decay,
            head_patience=self.head_patience,
        )
        for stage in stages:
            if stage.name == "finetune":
                stage.regularizer = self.regularizer
                stage.regularizer_weight = self.regularizer_weight
        if self.lora_rank:
            for stage in stages:
                if stage.name == "finetune":
                    # Adapters start from zero, so they need a higher rate than full weights.
                    stage.lora_rank = self.lora_rank
                    head = self.head_learning_rate
                    stage.learning_rate = head if head == AUTO else head / 3
        return stages

    def augmentation(self):
        """Training-time augmentation for `make_datasets`; None unless a recipe adds one."""
        return None

    def input_paths(self) -> list[str]:
        """The local paths the run reads (data, weights, a backbone directory).

        `run` refuses an output directory that overlaps any of them before anything is
        written, so a run never writes into (or overwrites) the user's data. A recipe with
        path fields overrides this; the shared fields hold no input paths.
        """
        return []


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _int(value) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def output_dir_problem(path: str) -> str | None:
    """Why the run could not create or write `path`, found before minutes go into training."""
    if not path.strip() or "://" in path:
        return None  # reported as an empty value, or by RunDir.check
    target = os.path.abspath(os.path.expanduser(path))
    existing = target
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if existing == target and not os.path.isdir(target):
        return None  # a file at the path itself: RunDir.check says so
    if not os.path.isdir(existing):
        return f"output_dir={path!r} (expected a folder path; {existing!r} is a file)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output_dir={path!r} (expected a writable place; {existing!r} is not writable)"
    return None


# === Running a recipe ===

BuildData = Callable[[Any], LabelledData]
BuildModel = Callable[[Any, LabelledData], tuple[Backbone | list[Backbone], keras.Model]]


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


@contextlib.contextmanager
def keeping_dtype_policy():
    """Gives the caller's global dtype policy back: the one `Distribution` sets is the run's."""
    previous_policy = keras.config.dtype_policy()
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)


def start_run(config: Any):
    """Checks the config and the output directory, seeds, and returns the `Distribution`.

    Shared by every recipe, fine-tuning or pretraining (`config` has their common fields):
    a forgotten --overwrite or a bad value is reported before minutes go into a backbone.
    """
    from tfxfer.distribute import Distribution

    config.validate()
    RunDir.check(config.output_dir, overwrite=config.overwrite, resume=config.resume)
    RunDir.check_inputs(config.output_dir, config.input_paths())
    # Head initialisation, dropout and shuffles follow config.seed: a run repeats exactly.
    keras.utils.set_random_seed(config.seed)
    return Distribution(
        config.strategy, config.mixed_precision, config.batch_size, config.scale_learning_rate
    )


@dataclass
class _Prepared:
    """A run's data (balanced as asked), its model, and what it warned about."""

    config: Any
    distribution: Any
    data: LabelledData
    class_weight: dict[int, float] | None
    notes: list[str]
    backbone: Backbone | list[Backbone]
    model: keras.Model

    def datasets(self):
        from tfxfer.data.datasets import make_datasets

        return make_datasets(
            self.data,
            self.backbone,
            batch_size=self.distribution.global_batch_size,
            seed=self.config.seed,
            augmentation=self.config.augmentation(),
        )


def _prepare(config: RecipeConfig, build_data: BuildData, build_model: BuildModel, distribution):
    """Loads the data, balances it, checks it against the replicas, builds the model."""
    data = build_data(config)
    if not config.quiet:
        print(f"[tfxfer] data: {data.summary()}", flush=True)
    data, class_weight = balance_data(data, config.balance, config.seed)
    if config.balance == "sampling" and not config.quiet:
        print(
            f"[tfxfer] balance: the training split is oversampled to {len(data.train)} examples, "
            f"{data.train.counts()}",
            flush=True,
        )
    replicas = int(distribution.strategy.num_replicas_in_sync)
    if keras_compat.is_patched() and keras_compat.in_multi_worker_mode(distribution.strategy):
        replicas = 1  # the patched build reads one local replica's batch, whatever its share
    for split in ("train", "val"):
        problem = uneven_first_batch(
            split, getattr(data, split), distribution.global_batch_size, replicas
        )
        if problem:
            raise TfxferError(problem)
    notes = []
    if config.balance is None:
        warning = imbalance_warning(data.train)
        if warning:
            log.warning("%s", warning)
            notes.append(warning)
    with distribution.scope():
        backbone, model = build_model(config, data)
    if randomly_initialised(backbone):
        print("[tfxfer] the backbone is randomly initialised, not pretrained.", flush=True)
    return _Prepared(config, distribution, data, class_weight, notes, backbone, model)


def _run(config: RecipeConfig, build_data: BuildData, build_model: BuildModel) -> dict[str, Any]:
    distribution = start_run(config)
    prepared = _prepare(config, build_data, build_model, distribution)
    data, backbone, model = prepared.data, prepared.backbone, prepared.model
    class_weight, notes = prepared.class_weight, prepared.notes
    stages = config.schedule()
    validate_schedule(stages, LayerGroups.of(backbone))
    check_regularizers(stages, backbone)
    # Only now, with every setting checked, is the run directory written: a typo in a flag
    # must not leave a half-started run that the next attempt refuses to overwrite.
    run_dir = open_run(
        config.output_dir,
        to_document(config),
        overwrite=config.overwrite,
        resume=config.resume,
        write=distribution.is_chief,
        extra={
            "data": data.summary(),
            "backbone_info": backbone_info(backbone),
            **distribution.describe(),
        },
    )
    datasets = prepared.datasets()
    stages = _from_scratch(stages, backbone, model, datasets, distribution, config.quiet)
    _contrastive_first(config, model, datasets, distribution, run_dir)
    result = run_schedule(
        model,
        backbone,
        stages,
        datasets.train,
        datasets.val,
        run_dir=run_dir,
        strategy=distribution.strategy,
        lr_scale=distribution.lr_scale,
        verbose=config.fit_verbosity(),
        cache_features=config.cache_features,
        class_weight=class_weight,
        # Resuming on another number of replicas would change every batch.
        config={**dataclasses.asdict(config), "global_batch_size": distribution.global_batch_size},
        callbacks=report.tensorboard_callbacks(run_dir, write=distribution.is_chief),
        keep_better=config.keep_better,
    )
    serving = export.serving_model(model, backbone)
    metrics = finish_run(
        run_dir,
        model,
        result,
        data.class_names,
        {"val": datasets.val, "test": datasets.test},
        examples={"val": data.val, "test": data.test},
        notes=notes,
        multi_label=data.multi_label,
        serving_model=serving,
        export_saved_model=config.export,
        write=distribution.is_chief,
    )
    return {
        "run_dir": run_dir.path,
        "model": model,
        "serving_model": serving,
        "backbone": backbone,
        "history": result.history,
        "metrics": metrics,
        "class_names": data.class_names,
        "data": data,
        "result": result,
    }


def randomly_initialised(backbone: Backbone | list[Backbone]) -> bool:
    """Whether any backbone starts from random weights (`--weights none`, `--no-pretrained`)."""
    backbones = backbone if isinstance(backbone, list) else [backbone]
    return any(
        str(backbone_info(b).get("weights")) in ("None", "none", "random", "False")
        for b in backbones
    )


def _from_scratch(stages, backbone, model, datasets, distribution, quiet: bool) -> list[Stage]:
    """A randomly initialised backbone's BatchNorm statistics, made to fit the data.

    Frozen BatchNorm runs in inference mode with its moving statistics, which at random
    initialisation are zero means and unit variances, whatever the data: the activations
    then shrink or blow up layer by layer, and the pooled features barely depend on the
    input (a head on them stays at chance). So before training, the statistics are
    recomputed from the training data (`tfxfer.batchnorm`), and every stage that trains the
    backbone also updates them (`Stage.train_batchnorm`): the weights are new, so are their
    statistics. Pretrained backbones keep theirs.
    """
    if not randomly_initialised(backbone) or not has_batchnorm(model):
        return stages
    with distribution.scope():
        info = recompute_batchnorm_statistics(model, datasets.train.build(0))
    if not quiet:
        print(
            f"[tfxfer] BatchNorm statistics of the random backbone recomputed from "
            f"{info['examples']} training examples ({info['layers']} layers); stages that "
            "train the backbone update them.",
            flush=True,
        )
    return [
        stage if stage.train == "head" else dataclasses.replace(stage, train_batchnorm=True)
        for stage in stages
    ]


def _contrastive_first(config, model, datasets, distribution, run_dir: RunDir) -> None:
    """SetFit before the schedule, where the config asks for it (`contrastive_pairs`).

    The text encoder is trained on pairs of labelled examples (same class or not,
    `tfxfer.train.setfit`), then the schedule fits the head on its new features. A resumed run
    whose checkpoint exists skips it: the checkpoint holds the weights it trained.
    """
    pairs = int(getattr(config, "contrastive_pairs", 0) or 0)
    if not pairs:
        return
    from tfxfer.train.checkpoints import Checkpointer
    from tfxfer.train.features import split_at_head
    from tfxfer.train.setfit import contrastive_finetune

    if config.resume and Checkpointer(run_dir.checkpoints, write=False).latest() is not None:
        return
    with distribution.scope():
        info = contrastive_finetune(
            split_at_head(model).features,
            datasets.train.examples,
            pairs_per_example=pairs,
            seed=config.seed,
            verbose=0,
        )
    if distribution.is_chief:
        run_dir.write_json("contrastive.json", info)
    if not config.quiet:
        print(
            f"[tfxfer] contrastive (SetFit): {info['pairs']} pairs, {info['steps']} steps in "
            f"{info['seconds']:.0f} s; same-class cosine {info['positive_cosine_before']:.2f}"
            f" -> {info['positive_cosine_after']:.2f}, other-class "
            f"{info['negative_cosine_before']:.2f} -> {info['negative_cosine_after']:.2f}",
            flush=True,
        )


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
    from tfxfer.distribute import Distribution
    from tfxfer.train import find_learning_rate as range_test_of_stage

    with keeping_dtype_policy():
        config.validate()
        output_dir = output_dir or str(config.output_dir).rstrip("/") + "-lr-find"
        RunDir.check(output_dir, overwrite=overwrite, resume=False)
        RunDir.check_inputs(output_dir, config.input_paths())
        stages = config.schedule()
        names = [s.name for s in stages]
        if stage is None:
            autos = [s.name for s in stages if s.learning_rate == AUTO]
            stage = autos[0] if autos else names[-1]
        if stage not in names:
            raise TfxferError(
                f"--stage {stage!r} is not a stage of this schedule; its stages are {names}."
            )
        index = names.index(stage)
        keras.utils.set_random_seed(config.seed)
        distribution = Distribution(
            config.strategy, config.mixed_precision, config.batch_size, config.scale_learning_rate
        )
        prepared = _prepare(config, build_data, build_model, distribution)
        backbone, model, class_weight = prepared.backbone, prepared.model, prepared.class_weight
        validate_schedule(stages, LayerGroups.of(backbone))
        datasets = prepared.datasets()
        earlier = [s for s in stages[:index] if s.epochs != 0]
        for s in earlier:
            if s.learning_rate == AUTO:
                raise TfxferError(
                    f"Stage {s.name!r} comes before {stage!r} and has learning_rate auto: find "
                    f"its rate first (--stage {s.name}), set it, then find {stage!r}'s."
                )
        if earlier:
            print(f"[tfxfer] lr-find: training {[s.name for s in earlier]} first", flush=True)
            run_schedule(
                model,
                backbone,
                earlier,
                datasets.train,
                datasets.val,
                strategy=distribution.strategy,
                lr_scale=distribution.lr_scale,
                verbose=config.fit_verbosity(),
                cache_features=config.cache_features,
                class_weight=class_weight,
            )
        finding = range_test_of_stage(
            model,
            backbone,
            stages[index],
            datasets.train,
            strategy=distribution.strategy,
            cache_features=config.cache_features,
            class_weight=class_weight,
            steps=steps,
        )
        run_dir = RunDir(output_dir, overwrite=overwrite, resume=False, write=distribution.is_chief)
        flag = {"head": "head_learning_rate", "finetune": "finetune_learning_rate"}.get(stage)
        hint = (
            f"--{flag.replace('_', '-')} {finding.suggestion:.2g}"
            if flag and config.stages is None
            else f"--set stages.{index}.learning_rate={finding.suggestion:.2g}"
        )
        if distribution.is_chief:
            from tfxfer.train.lr_find import plot_finding

            run_dir.write_json("lr_find.json", {"stage": stage, "flag": hint, **finding.to_json()})
            plot_finding(
                finding,
                run_dir.file("lr_find.png"),
                f"stage {stage!r} of {recipe_name(type(config))}: suggested "
                f"{finding.suggestion:.2g}",
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


def uneven_first_batch(
    split: str, examples: Examples | None, global_batch: int, replicas: int
) -> str | None:
    """Why a split's first batch cannot be split evenly over the replicas, or None.

    Keras builds a model under a multi-replica strategy from its first batch averaged over
    the replicas, which fails (deep in TensorFlow, "AddN ... must have the same size") when
    the replicas got different shares: a split smaller than one global batch whose size is
    not a multiple of the replicas. Later partial batches are fine.
    """
    if examples is None or replicas < 2:
        return None
    first = min(len(examples), global_batch)
    if first == 0 or first % replicas == 0:
        return None
    more = {
        "train": "more training examples",
        "val": "more validation examples (a larger --val-split, or --val-dir / --val)",
    }[split]
    return (
        f"The {split} split has {len(examples)} examples: fewer than one global batch "
        f"({global_batch}) and not a multiple of the {replicas} replicas, so its first batch "
        f"cannot be shared evenly, and Keras cannot build the model from it. Use {more}, a "
        f"--batch-size of at most {max(len(examples) // replicas, 1)} per replica, or a "
        "strategy with fewer replicas."
    )


def backbone_info(backbone: Backbone | list[Backbone]) -> dict[str, Any]:
    """The facts a run records about its backbone(s)."""
    if isinstance(backbone, Backbone):
        return {
            **backbone.info,
            "name": backbone.name,
            "pooling": backbone.head_pooling,
            "groups": backbone.group_names,
        }
    return {"backbones": [backbone_info(b) for b in backbone]}


def open_run(
    output_dir: str,
    config: dict[str, Any],
    *,
    overwrite: bool,
    resume: bool,
    extra: dict[str, Any] | None = None,
    write: bool = True,
) -> RunDir:
    """Opens the run directory and writes `config.json` (the resolved config plus facts)."""
    run_dir = RunDir(output_dir, overwrite=overwrite, resume=resume, write=write)
    if write and not run_dir.resumed:
        run_dir.write_json(
            "config.json",
            {
                **config,
                **(extra or {}),
                "versions": {
                    "tensorflow": tf.__version__,
                    "keras": keras.__version__,
                    "python": platform.python_version(),
                },
            },
        )
    return run_dir


def finish_run(
    run_dir: RunDir,
    model: keras.Model,
    result: TrainResult,
    class_names: list[str],
    eval_sets: dict[str, tf.data.Dataset | None],
    *,
    examples: dict[str, Examples | None] | None = None,
    multi_label: bool = False,
    serving_model: keras.Model | None = None,
    export_saved_model: bool = True,
    write: bool = True,
    notes: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluates every split; saves the model, the export, the class names and the reports.

    The reports (`tfxfer.report.write_reports`): training curves, confusion matrix,
    per-class table, top losses; then a few lines of summary in the terminal.

    Args:
        run_dir: RunDir. Where everything goes.
        model: keras.Model. The trained model (as trained: it may take tokenized input).
        result: TrainResult. From `run_schedule`.
        class_names: list[str]. Output order.
        eval_sets: dict. Split name to batched `(x, y)` dataset or None, e.g.
            {"val": ..., "test": ...}.
        examples: dict or None. Split name to the `Examples` its dataset was made from, in
            the same order (`make_datasets` keeps file order), for `top_losses.csv`.
            Defaults to none (no top-losses table).
        multi_label: bool. Threshold outputs instead of argmax.
        serving_model: keras.Model or None. What to save and export if it differs from
            `model` (a text model wrapped with its tokenizer). Defaults to `model`.
        export_saved_model: bool. Write `export/`. Defaults to `True`.
        write: bool. False on non-chief workers of a multi-worker run: evaluate, write nothing.
        notes: list[str] or None. Lines for the summary (a class-imbalance warning).

    Returns:
        The metrics per split, as written to `metrics.json`.
    """
    metrics, predictions = {}, {}
    for split, dataset in eval_sets.items():
        if dataset is None:
            continue
        predictions[split] = report.collect(model, dataset)
        metrics[split] = report.classification_metrics(
            *predictions[split], class_names, multi_label
        )
    if not write:
        for split, values in metrics.items():
            print("[tfxfer] " + report.summary_line(split, values), flush=True)
        return metrics
    written = report.write_reports(
        run_dir,
        result.history,
        metrics,
        predictions,
        class_names,
        examples,
        multi_label=multi_label,
    )
    if result.selection:
        metrics["selection"] = result.selection
    fused = fusion_summary(model)
    if fused:
        metrics["fusion"] = fused
        print(f"[tfxfer] fusion: {fused}", flush=True)
    run_dir.write_json("metrics.json", metrics)
    run_dir.write_json("class_names.json", class_names)
    if result.best:
        run_dir.write_json("best.json", result.best)
    if result.stages:
        run_dir.write_json("stages.json", result.stages)
    to_save = serving_model or model
    export.save_model(to_save, run_dir.file("model.keras"))
    if export_saved_model:
        export.export_saved_model(to_save, run_dir.file("export"))
    for line in report.run_summary(metrics, result.best, run_dir.path, written, notes or []):
        print(line, flush=True)
    return metrics


# === Command line ===


def cli_logging() -> None:
    """Logging for a command-line run: tfxfer's INFO lines, other libraries' from WARNING."""
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s %(message)s")
    logging.getLogger("tfxfer").setLevel(logging.INFO)


def command_line(
    main: Callable[[Any], Any],
    config_cls: type[RecipeConfig],
    description: str | None = None,
    argv: list[str] | None = None,
) -> int:
    """Runs a recipe from the command line: exit 0 on success, 2 with one line on bad input."""
    from tfxfer.cli import error_boundary

    cli_logging()
    # Under `python -m recipes.x`, say so in usage lines rather than the file's path.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and argv is None else None
    config, debug = config_cls.parse_flags(argv, description, prog)
    return error_boundary(lambda: main(config), debug=debug)
