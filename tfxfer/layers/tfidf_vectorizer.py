"""`TfIdfVectorizer`: raw strings to L2-normalised TF-IDF vectors of words and word pairs.

The lexical view of a text. Keywords (function names, file names, jargon) carry much of the
signal in technical and domain text, and a small BERT that reads 128 tokens misses what lies
past them; a bag of words and word pairs sees the whole text. The layer holds its vocabulary
and inverse document frequencies in its config, so a saved model, its SavedModel export and
a reloaded model take raw strings and need nothing else.

The weighting is scikit-learn's `TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)`:
term frequency `1 + log(count)`, smooth idf `ln((1 + n) / (1 + df)) + 1`, rows L2-normalised.
Words are lowercased runs of letters, digits and underscores (`foo_bar.c` is `foo_bar`, `c`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

# Anything but a letter, a digit or an underscore separates words.
_SEPARATORS = r"[^\pL\pN_]+"


def standardize(texts: tf.Tensor) -> tf.Tensor:
    """Lowercased texts with every run of separators one space (`TfIdfVectorizer`'s words)."""
    return tf.strings.strip(
        tf.strings.regex_replace(tf.strings.lower(texts, encoding="utf-8"), _SEPARATORS, " ")
    )


@keras.saving.register_keras_serializable(package="tfxfer")
class TfIdfVectorizer(keras.layers.Layer):
    """Raw strings `(batch,)` to TF-IDF vectors `(batch, len(vocabulary))`.

    Build it with `fit_tfidf(texts)` on the training texts only; a word seen only later
    (validation, test, serving) is out of vocabulary and counts nowhere.

    Args:
        vocabulary: list of str. The terms (words and "word word" pairs), one column each.
        idf: list of float. Each term's inverse document frequency, in vocabulary order.
        ngrams: int. Terms are runs of 1 to `ngrams` words. Defaults to `2`.
        sublinear_tf: bool. Term frequency `1 + log(count)` instead of the count.
            Defaults to `True`.

    Example:

    >>> layer = fit_tfidf(["gcc fails to link", "the cat sat"])
    >>> layer(tf.constant(["gcc links"])).shape
    TensorShape([1, 11])
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        idf: Sequence[float],
        *,
        ngrams: int = 2,
        sublinear_tf: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(vocabulary) != len(idf) or not vocabulary:
            raise ValueError(
                "Expected one idf value per term of a non-empty vocabulary. Received: "
                f"{len(vocabulary)} terms and {len(idf)} idf values."
            )
        self.vocabulary = [str(term) for term in vocabulary]
        self.idf = [float(value) for value in idf]
        self.ngrams = int(ngrams)
        self.sublinear_tf = bool(sublinear_tf)
        # Count mode keeps one column for out-of-vocabulary terms first; `call` drops it.
        self._counts = keras.layers.TextVectorization(
            standardize=None,
            split="whitespace",
            ngrams=self.ngrams if self.ngrams > 1 else None,
            output_mode="count",
            vocabulary=self.vocabulary,
            name="counts",
        )
        self._idf = tf.constant(np.asarray(self.idf, np.float32))

    @property
    def width(self) -> int:
        return len(self.vocabulary)

    def build(self, input_shape=None):
        self.built = True

    def call(self, texts):
        texts = tf.convert_to_tensor(texts)
        if texts.shape.rank == 2:  # (batch, 1) as some pipelines give it
            texts = tf.squeeze(texts, axis=-1)
        counts = tf.cast(self._counts(standardize(texts)), tf.float32)[:, 1:]
        if self.sublinear_tf:
            counts = tf.where(counts > 0, 1.0 + tf.math.log(tf.maximum(counts, 1.0)), 0.0)
        weighted = tf.ensure_shape(counts * self._idf, [None, self.width])
        return tf.cast(tf.math.l2_normalize(weighted, axis=-1), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.width)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((inputs.shape[0], self.width), dtype=self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary": self.vocabulary,
            "idf": self.idf,
            "ngrams": self.ngrams,
            "sublinear_tf": self.sublinear_tf,
        }


def fit_tfidf(
    texts: Sequence[str],
    *,
    max_terms: int = 20000,
    ngrams: int = 2,
    sublinear_tf: bool = True,
    name: str = "tfidf",
) -> TfIdfVectorizer:
    """A `TfIdfVectorizer` whose vocabulary and idf come from `texts` (the training texts).

    Args:
        texts: sequence of str. The texts to learn the vocabulary from: the training split
            only, so nothing of validation or test leaks into the model.
        max_terms: int. Keep the this many most frequent terms (by count over `texts`, ties
            by first appearance). Defaults to `20000`.
        ngrams: int. Terms are runs of 1 to `ngrams` words. Defaults to `2`.
        sublinear_tf: bool. See `TfIdfVectorizer`. Defaults to `True`.
        name: str. The layer's name. Defaults to `"tfidf"`.

    Returns:
        The fitted layer; its width is the number of terms kept (at most `max_terms`).
    """
    if isinstance(max_terms, bool) or not isinstance(max_terms, int) or max_terms < 1:
        raise ValueError(f"Expected `max_terms` to be a positive int. Received: {max_terms!r}")
    if isinstance(ngrams, bool) or not isinstance(ngrams, int) or not 1 <= ngrams <= 3:
        raise ValueError(f"Expected `ngrams` to be 1, 2 or 3. Received: {ngrams!r}")
    cleaned = standardize(tf.constant([str(t) for t in texts], tf.string))
    adapter = keras.layers.TextVectorization(
        max_tokens=max_terms + 1,  # + the out-of-vocabulary column
        standardize=None,
        split="whitespace",
        ngrams=ngrams if ngrams > 1 else None,
        output_mode="multi_hot",
    )
    adapter.adapt(tf.data.Dataset.from_tensor_slices(cleaned).batch(512))
    vocabulary = adapter.get_vocabulary()[1:]
    if not vocabulary:
        raise ValueError(
            "The training texts hold no words (letters or digits), so a TF-IDF vocabulary "
            "cannot be learned from them."
        )
    present = np.zeros(len(vocabulary), np.float64)
    for start in range(0, len(texts), 512):
        present += np.asarray(adapter(cleaned[start : start + 512]))[:, 1:].sum(axis=0)
    idf = np.log((1.0 + len(texts)) / (1.0 + present)) + 1.0
    return TfIdfVectorizer(
        vocabulary, idf.tolist(), ngrams=ngrams, sublinear_tf=sublinear_tf, name=name
    )
