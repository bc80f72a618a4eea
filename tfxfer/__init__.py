"""tfxfer: transfer learning on Keras 3 with TensorFlow.

A pretrained backbone, a pooling + dense head, a staged freeze-then-finetune schedule, and
`tf.distribute` underneath. The common case is one recipe call; the parts below are what the
recipes are built from, the same for images and text:

```python
import tfxfer

data = tfxfer.load_texts("reviews.csv", test="reviews_test.csv")   # or tfxfer.load_images(dir)
backbone = tfxfer.build_backbone("minilm-l6", sequence_length=64)
model = tfxfer.build_model(backbone, len(data.class_names))
train, val, test = tfxfer.make_datasets(data, backbone, batch_size=16)
tfxfer.run_schedule(model, backbone, tfxfer.default_schedule(), train, val)
```

Plumbing (strategies, pipelines' building blocks, the recipe skeleton, reports) lives in the
submodules: `tfxfer.distribute`, `tfxfer.data`, `tfxfer.recipe`, `tfxfer.report`, ...
"""

import os

# Keras 3 picks its backend at first import; tfxfer is built on TensorFlow's.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# TensorFlow's start-up lines about missing CUDA drivers are noise on a CPU (`--debug` shows them).
from tfxfer.startup import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

from tfxfer.backbones import Backbone, build_backbone, known_backbones  # noqa: E402
from tfxfer.classifier import Classifier  # noqa: E402
from tfxfer.data.datasets import make_datasets  # noqa: E402
from tfxfer.data.examples import LabelledData  # noqa: E402
from tfxfer.data.images import load_images  # noqa: E402
from tfxfer.data.text import load_texts  # noqa: E402
from tfxfer.errors import TfxferError  # noqa: E402
from tfxfer.export import export_saved_model, export_tflite, load_model  # noqa: E402
from tfxfer.fusion import build_fusion_model  # noqa: E402
from tfxfer.heads import HeadConfig  # noqa: E402
from tfxfer.model import build_model  # noqa: E402
from tfxfer.recipe.rank import rank_backbones  # noqa: E402
from tfxfer.rundir import RunDir  # noqa: E402
from tfxfer.schedule import Stage, default_schedule, gradual_unfreezing  # noqa: E402
from tfxfer.train import run_schedule  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Classifier",
    "HeadConfig",
    "LabelledData",
    "RunDir",
    "Stage",
    "TfxferError",
    "build_backbone",
    "build_fusion_model",
    "build_model",
    "default_schedule",
    "export_saved_model",
    "export_tflite",
    "gradual_unfreezing",
    "known_backbones",
    "load_images",
    "load_model",
    "load_texts",
    "make_datasets",
    "rank_backbones",
    "run_schedule",
]
