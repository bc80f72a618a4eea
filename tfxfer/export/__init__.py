"""Exporting trained models: a SavedModel that serves raw inputs, or a TFLite file.

`savedmodel` writes the TensorFlow SavedModel (`export_saved_model`, `serving_model`);
`tflite` converts to a TFLite flatbuffer with a sidecar describing it (`export_tflite`).
Saving and loading `.keras` files lives in `tfxfer.saving`; its functions and `RawTextModel`
are importable from here too, as they were before.
"""

from tfxfer.export.savedmodel import (
    EXPORT_MARKER,
    export_saved_model,
    is_tfxfer_export,
    serving_model,
)
from tfxfer.export.tflite import (
    CALIBRATION_EXAMPLES,
    QUANTIZATIONS,
    TFLITE_SIDECAR_SUFFIX,
    export_tflite,
    is_tfxfer_tflite,
    refuse_foreign_tflite_target,
    tflite_file_name,
)
from tfxfer.layers.raw_text_model import RawTextModel
from tfxfer.runs import image_size_of
from tfxfer.saving import load_model, save_model

__all__ = [
    "CALIBRATION_EXAMPLES",
    "EXPORT_MARKER",
    "QUANTIZATIONS",
    "TFLITE_SIDECAR_SUFFIX",
    "RawTextModel",
    "export_saved_model",
    "export_tflite",
    "image_size_of",
    "is_tfxfer_export",
    "is_tfxfer_tflite",
    "load_model",
    "refuse_foreign_tflite_target",
    "save_model",
    "serving_model",
    "tflite_file_name",
]
