"""What every run does before it trains: check, seed, distribute, load, balance and build.

Shared by `run`, the `lr-find` command and the pretraining recipes (`tfxfer.pretrain`): a
forgotten --overwrite or a bad value is reported before minutes go into a backbone, and the
run directory is opened (`open_run`) only once every setting has been checked.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from tfxfer import keras_compat
from tfxfer.backbones.base import Backbone
from tfxfer.data.balance import balance_data, imbalance_warning
from tfxfer.data.datasets import make_datasets
from tfxfer.data.examples import Examples, LabelledData
from tfxfer.distribute import Distribution
from tfxfer.errors import TfxferError
from tfxfer.recipe.config import RecipeConfig
from tfxfer.rundir import RunDir

log = logging.getLogger(__name__)

BuildData = Callable[[Any], LabelledData]
BuildModel = Callable[[Any, LabelledData], tuple[Backbone | list[Backbone], keras.Model]]


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
    config.validate()
    RunDir.check(config.output_dir, overwrite=config.overwrite, resume=config.resume)
    RunDir.check_inputs(config.output_dir, config.input_paths())
    # Head initialisation, dropout and shuffles follow config.seed: a run repeats exactly.
    keras.utils.set_random_seed(config.seed)
    return Distribution(
        config.strategy, config.mixed_precision, config.batch_size, config.scale_learning_rate
    )


@dataclass
class Prepared:
    """A run's data (balanced as asked), its model, and what it warned about."""

    config: Any
    distribution: Any
    data: LabelledData
    class_weight: dict[int, float] | None
    notes: list[str]
    backbone: Backbone | list[Backbone]
    model: keras.Model

    def datasets(self):
        return make_datasets(
            self.data,
            self.backbone,
            batch_size=self.distribution.global_batch_size,
            seed=self.config.seed,
            augmentation=self.config.augmentation(),
        )


def prepare(config: RecipeConfig, build_data: BuildData, build_model: BuildModel, distribution):
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
    if keras_compat.is_patched("symbolic_build") and keras_compat.builds_from_one_replica(
        distribution.strategy
    ):
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
    return Prepared(
        config=config,
        distribution=distribution,
        data=data,
        class_weight=class_weight,
        notes=notes,
        backbone=backbone,
        model=model,
    )


def randomly_initialised(backbone: Backbone | list[Backbone]) -> bool:
    """Whether any backbone starts from random weights (`--weights none`, `--no-pretrained`)."""
    backbones = backbone if isinstance(backbone, list) else [backbone]
    return any(
        str(backbone_info(b).get("weights")) in ("None", "none", "random", "False")
        for b in backbones
    )


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
    lock: bool = False,
) -> RunDir:
    """Opens the run directory and writes `config.json` (the resolved config plus facts).

    `lock` holds the directory's lock (`tfxfer.runlock`) until `RunDir.close`, as the
    recipes do for the whole run."""
    run_dir = RunDir(output_dir, overwrite=overwrite, resume=resume, write=write, lock=lock)
    try:
        _write_config(run_dir, config, extra, write)
    except BaseException:
        run_dir.close()  # no lock left behind by a run that could not start
        raise
    return run_dir


def _write_config(run_dir: RunDir, config: dict[str, Any], extra, write: bool) -> None:
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
