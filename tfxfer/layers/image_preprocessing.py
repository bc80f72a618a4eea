"""`ImagePreprocessing`: raw uint8 images to the pixels a pretrained network expects."""

from __future__ import annotations

import keras
from keras import ops

# Per-channel constants of the two common ImageNet conventions.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="tfxfer")
class ImagePreprocessing(keras.layers.Layer):
    """Turns raw uint8 RGB images of any size into what a pretrained network expects.

    It resizes to the backbone's input size and applies the network's own pixel convention.
    Living inside the model (rather than in the user's code) is what lets a saved or exported
    model take raw images, and what makes a wrong convention impossible at serving time.

    Args:
        image_size: int. Height and width the network sees.
        mode: str. One of "caffe", "tf", "torch", "none" (see
            `tfxfer.backbones.vision.VISION_BACKBONES`).
    """

    def __init__(self, image_size: int, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch", "none"):
            raise ValueError(
                "Expected `mode` to be one of 'caffe', 'tf', 'torch', 'none'. "
                f"Received: mode={mode!r}"
            )
        self.image_size = int(image_size)
        self.mode = mode
        self.resize = keras.layers.Resizing(self.image_size, self.image_size, dtype="float32")

    def build(self, input_shape):
        # Building the (weightless) Resizing sublayer here keeps Keras from warning that this
        # layer has unbuilt state every time a saved model is loaded.
        self.resize.build(input_shape)

    def call(self, images):
        x = ops.cast(images, "float32")
        # Resizing is a no-op when the tf.data pipeline already resized to this size.
        x = self.resize(x)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEAN, "float32")
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "torch":
            x = (x / 255.0 - ops.convert_to_tensor(_TORCH_MEAN, "float32")) / ops.convert_to_tensor(
                _TORCH_STD, "float32"
            )
        return x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "mode": self.mode}
