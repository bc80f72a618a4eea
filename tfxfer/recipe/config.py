"""`RecipeConfig`: the config fields every fine-tuning recipe shares, and their checks.

A recipe's `Config` subclasses it and adds its own fields (where its data are, the size its
backbone sees). Flags come from the fields (`image_size` becomes `--image-size`) and `--help`
text from the comment after each field (`tfxfer.flags`), so flags, defaults and help never
drift apart. `validate` names every bad value at once, before minutes go into a backbone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tfxfer.backbones import modality_of
from tfxfer.backbones.base import Backbone
from tfxfer.configfile import stage_documents_to_stages, stage_problems
from tfxfer.data.balance import BALANCE_MODES
from tfxfer.distribute import MIXED_PRECISION_POLICIES, STRATEGY_NAMES
from tfxfer.errors import TfxferError
from tfxfer.flags import FlagConfig
from tfxfer.fusion import FUSIONS
from tfxfer.heads import HeadConfig
from tfxfer.recipe.task import build_classifier
from tfxfer.schedule import REGULARIZERS, Stage, default_schedule
from tfxfer.train.lr_find import AUTO
from tfxfer.train.random_start import BATCHNORM_STARTS
from tfxfer.transferability import METRICS

# `backbone` of a run that ranks `candidates` first and fine-tunes the best (`tfxfer.recipe.rank`).
AUTO_BACKBONE = "auto"

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
    candidates: list[str] = field(default_factory=list)  # --backbone auto ranks these: a,b,c
    rank_metric: str = "logme"  # how --backbone auto ranks them: logme | hscore
    random_batchnorm: str = "auto"  # random backbones' BatchNorm: auto | initial | recompute
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
        found: list[str] = []
        check = self.checker(found)
        self._check_numbers(check)
        self._check_training(check)
        found += self._backbone_problems()
        check("strategy", lambda v: v in STRATEGY_NAMES, f"one of {STRATEGY_NAMES}")
        check("rank_metric", lambda v: v in METRICS, f"one of {sorted(METRICS)}")
        check("random_batchnorm", lambda v: v in BATCHNORM_STARTS, f"one of {BATCHNORM_STARTS}")
        check("verbose", lambda v: _int(v) and v in (0, 1, 2), "0, 1 or 2, or none (automatic)")
        modes = ("auto", *MIXED_PRECISION_POLICIES)
        check("mixed_precision", lambda v: v in modes, f"one of {modes}")
        found += self._schedule_problems()
        found += self._output_problems()
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

    def _check_numbers(self, check) -> None:
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

    def _check_training(self, check) -> None:
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

    def _schedule_problems(self) -> list[str]:
        if self.stages is not None:
            return stage_problems(self.stages)
        if self.head_epochs == 0 and self.finetune_epochs == 0:
            return ["head_epochs and finetune_epochs are both 0 (nothing would train)"]
        return []

    def _output_problems(self) -> list[str]:
        found = []
        if self.overwrite and self.resume:
            found.append("overwrite and resume are both set (pick one)")
        if not str(self.output_dir).strip():
            found.append(
                "output_dir='' (expected a directory; an empty value would be the "
                "current directory)"
            )
        return found

    def data_kind(self) -> str | None:
        """What the run classifies, "image" or "text": the recipe's `MODALITY`."""
        return self.MODALITY

    def backbone_names(self) -> list[str]:
        """The backbones `--backbone a,b` names: one, or several for a fusion model."""
        return [name.strip() for name in str(self.backbone).split(",") if name.strip()]

    def _backbone_problems(self) -> list[str]:
        if self.backbone == AUTO_BACKBONE:
            if not self.candidates:
                return ["backbone='auto' (expected --candidates a,b,c: the backbones to rank)"]
            return []
        if self.candidates:
            return [
                f"candidates={self.candidates!r} (ranked only with --backbone auto; drop "
                "--candidates, or pass --backbone auto)"
            ]
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
        return build_classifier(self, backbones, num_outputs, task)

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
