"""tfxfer: transfer learning on Keras 3 with TensorFlow.

A pretrained backbone, a pooling + dense head, a staged freeze-then-finetune schedule, and
`tf.distribute` underneath. The recipes in `recipes/` show the whole path; this module is
the API they are built from.
"""

import os

# Keras 3 picks its backend at first import; tfxfer is built on TensorFlow's.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfxfer.backbones import Backbone, build_backbone, known_backbones  # noqa: E402
from tfxfer.cli import cli_config, run_recipe  # noqa: E402
from tfxfer.data.images import (  # noqa: E402
    Augmentation,
    image_train_data,
    load_image_folder,
    make_image_dataset,
)
from tfxfer.data.pipeline import TrainData, epoch_batches  # noqa: E402
from tfxfer.data.synthetic import write_shapes_dataset  # noqa: E402
from tfxfer.errors import DataError, RunDirError, TfxferError, WeightsError  # noqa: E402
from tfxfer.export import export_saved_model, load_model, save_model  # noqa: E402
from tfxfer.heads import HeadConfig  # noqa: E402
from tfxfer.model import build_model, loss_and_metrics  # noqa: E402
from tfxfer.run import Session, finish_run, open_run, validate_config  # noqa: E402
from tfxfer.rundir import RunDir  # noqa: E402
from tfxfer.schedule import (  # noqa: E402
    Stage,
    apply_stage,
    default_schedule,
    gradual_unfreezing,
    validate_schedule,
)
from tfxfer.train import TrainResult, run_schedule  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Augmentation",
    "Backbone",
    "DataError",
    "HeadConfig",
    "RunDir",
    "RunDirError",
    "Session",
    "Stage",
    "TfxferError",
    "TrainData",
    "TrainResult",
    "WeightsError",
    "apply_stage",
    "build_backbone",
    "build_model",
    "cli_config",
    "default_schedule",
    "epoch_batches",
    "export_saved_model",
    "finish_run",
    "gradual_unfreezing",
    "image_train_data",
    "known_backbones",
    "load_image_folder",
    "load_model",
    "loss_and_metrics",
    "make_image_dataset",
    "open_run",
    "run_recipe",
    "run_schedule",
    "save_model",
    "validate_config",
    "validate_schedule",
    "write_shapes_dataset",
]
