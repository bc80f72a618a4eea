"""`RawTextModel`: a trained text model with its tokenizer in front, so it takes strings."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tfxfer")
class RawTextModel(keras.Model):
    """A trained text model together with its tokenizer, so it takes raw strings.

    Training feeds token dicts tokenized inside `tf.data` (fast); this wrapper puts the same
    preprocessor in front of the same classifier, so the saved model gives the training-time
    predictions from raw text. Token dicts pass straight through.

    Args:
        preprocessor: keras.layers.Layer. The backbone's preprocessor (strings to token dict).
        classifier: keras.Model. The trained model that takes token dicts.

    Example:

    >>> serving = RawTextModel(backbone.preprocessor, model)  # or export.serving_model(...)
    >>> serving.predict(["the match went to extra time"])
    """

    def __init__(self, preprocessor, classifier, **kwargs):
        super().__init__(**kwargs)
        self.preprocessor = preprocessor
        self.classifier = classifier

    def build(self, input_shape=None):
        # Nothing to create: the classifier is built. (Keras' default would trace `call` on
        # float zeros, which the tokenizer rejects.)
        self.built = True

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict):
            inputs = self.preprocessor(inputs)
        return self.classifier(inputs, training=training)

    def predict(self, x, *args, **kwargs):
        # Python lists and numpy unicode arrays are what users pass; tf.data wants tf.string.
        if isinstance(x, str):
            x = [x]
        if isinstance(x, (list, tuple)) or (
            hasattr(x, "dtype") and getattr(x.dtype, "kind", "") == "U"
        ):
            x = tf.constant([str(t) for t in x], tf.string)
        return super().predict(x, *args, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "preprocessor": keras.layers.serialize(self.preprocessor),
            "classifier": _without_compile_config(keras.layers.serialize(self.classifier)),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["preprocessor"] = keras.layers.deserialize(config["preprocessor"])
        config["classifier"] = keras.layers.deserialize(config["classifier"])
        return cls(**config)


# Runs saved before the rename (as `TextClassifier`, which read like keras-hub's own task
# class) still load.
keras.saving.get_custom_objects()["tfxfer>TextClassifier"] = RawTextModel


def _without_compile_config(config: dict) -> dict:
    # The wrapped classifier was compiled for training; a reloaded RawTextModel is for
    # inference, and recompiling it from the stored config would only warn about optimizer
    # state that does not fit.
    config = dict(config)
    config.pop("compile_config", None)
    return config
