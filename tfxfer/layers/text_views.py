"""`TokensAndText`: a BERT preprocessor that also hands the raw string on.

A fused text model whose branches read text differently (a BERT reads token ids, the lexical
`tfidf` branch reads the words of the raw string) takes both: the token dict and, under
`"text"`, the string itself. This layer makes that input from raw strings, inside `tf.data`
(training) and inside the serving model alike, so each branch gets its own view of the
same text.
"""

from __future__ import annotations

import keras
import tensorflow as tf

TEXT_KEY = "text"


@keras.saving.register_keras_serializable(package="tfxfer")
class TokensAndText(keras.layers.Layer):
    """The token dict of `tokens` (a keras-hub text preprocessor) plus the raw string.

    Args:
        tokens: keras.layers.Layer. The BERT branch's preprocessor (strings to token dict).

    Example:

    >>> views = TokensAndText(bert_backbone.preprocessor)
    >>> sorted(views(tf.constant(["a text"])))
    ['padding_mask', 'segment_ids', 'text', 'token_ids']
    """

    # `tfxfer.data.datasets.data_backbone` picks the backbone whose preprocessor carries it.
    carries_text = True

    def __init__(self, tokens: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.tokens = tokens

    @property
    def sequence_length(self):
        return getattr(self.tokens, "sequence_length", None)

    @property
    def tokenizer(self):
        return getattr(self.tokens, "tokenizer", None)

    def build(self, input_shape=None):
        self.built = True

    def call(self, x, y=None, sample_weight=None):
        texts = tf.convert_to_tensor(x)
        inputs = dict(self.tokens(texts))
        inputs[TEXT_KEY] = texts
        return keras.utils.pack_x_y_sample_weight(inputs, y, sample_weight)

    def get_config(self):
        return {**super().get_config(), "tokens": keras.layers.serialize(self.tokens)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["tokens"] = keras.layers.deserialize(config["tokens"])
        return cls(**config)
