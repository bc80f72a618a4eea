"""Training: `run_schedule` runs a schedule of stages, checkpointing every epoch, and resumes.

The modules, from the top down:
- `run`: `run_schedule`, stage by stage, around one `StageRun` (`context`).
- `lr_find`: the learning-rate range test (`find_learning_rate`, `Stage(learning_rate="auto")`).
- `solving`, `head_solver`: stages whose linear head is fitted by the solver.
- `resume`, `trainer`, `checkpoints`, `callbacks`, `preemption`: the run's record, its
  checkpoints, and resuming from them (also after a preemption notice).
- `features`, `compiling`, `selection`, `setfit`: cached features, compiling and XLA,
  `keep_better`'s choice, and SetFit's contrastive fine-tuning of a text encoder.
"""

from tfxfer.train.lr_find import find_learning_rate
from tfxfer.train.run import run_schedule
from tfxfer.train.trainer import (
    MONITOR_MODES,
    RESUME_IGNORED_KEYS,
    TrainResult,
    config_differences,
    resolve_monitor_mode,
)

__all__ = [
    "MONITOR_MODES",
    "RESUME_IGNORED_KEYS",
    "TrainResult",
    "config_differences",
    "find_learning_rate",
    "resolve_monitor_mode",
    "run_schedule",
]
