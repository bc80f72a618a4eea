"""The lexical text backbone: TF-IDF of words and word pairs, learned from the training texts.

`--backbone tfidf` alone is the classic TF-IDF + logistic regression (its head is solved on
the cached vectors); fused with a BERT (`--backbone minilm-l6,tfidf`) it gives the head the
keywords a small BERT truncated at 128 tokens misses, beside what BERT understands. Unlike
a pretrained network it has nothing to download and nothing to fine-tune: its vocabulary
and idf come from the run's own training texts (`build_tfidf_backbone(texts)`), and it has
no trainable weights, so fine-tuning stages train the other branches and the head.

The backbone takes raw strings (its network's input is a string tensor, like a TF-Hub text
model's); in a fusion with a BERT it reads the raw string the fused model carries beside the
token ids (`tfxfer.layers.text_views.TokensAndText`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from tfxfer.backbones.base import Backbone
from tfxfer.errors import DataError, TfxferError

# Names `build_backbone` takes for the lexical backbone, with the builder's settings.
LEXICAL_BACKBONES: dict[str, dict[str, Any]] = {
    "tfidf": {"ngrams": 2, "max_terms": 20000},
}


def is_lexical(backbone: Backbone) -> bool:
    """Whether `backbone` is a lexical (TF-IDF) one."""
    return backbone.info.get("family") == "lexical"


def build_tfidf_backbone(
    texts: Sequence[str] | None,
    *,
    max_terms: int = 20000,
    ngrams: int = 2,
    sublinear_tf: bool = True,
    name: str = "tfidf",
) -> Backbone:
    """A TF-IDF backbone whose vocabulary and idf are learned from `texts`.

    Args:
        texts: sequence of str. The training texts (never validation or test ones: a word
            seen only there stays out of vocabulary, as it would for a new text).
        max_terms: int. The most frequent this many words and word pairs are kept.
            Defaults to `20000`.
        ngrams: int. Terms are runs of 1 to `ngrams` words. Defaults to `2`.
        sublinear_tf: bool. `1 + log(count)` as term frequency. Defaults to `True`.
        name: str. The backbone's name. Defaults to `"tfidf"`.

    Returns:
        A `Backbone` with `input_kind="text"`, `output_kind="vector"`, no preprocessor (it
        takes raw strings), and one layer group `tfidf` with no trainable weights.

    Example:

    ```python
    backbone = build_tfidf_backbone(data.train.inputs)
    model = tfxfer.build_model(backbone, num_outputs=len(data.class_names))
    ```
    """
    from tfxfer.layers.tfidf_vectorizer import fit_tfidf

    if texts is None:
        raise TfxferError(
            f"The {name!r} backbone learns its vocabulary from the training texts: build it "
            "with them (`build_backbone('tfidf', texts=train_texts)`); the recipes and "
            "`Classifier` pass them for you."
        )
    try:
        layer = fit_tfidf(
            list(texts), max_terms=max_terms, ngrams=ngrams, sublinear_tf=sublinear_tf
        )
    except ValueError as error:
        raise DataError(f"Cannot build the {name!r} backbone: {error}") from error
    inputs = keras.Input(shape=(), dtype="string", name="text")
    network = keras.Model(inputs, layer(inputs), name="tfidf_network")
    return Backbone(
        name=name,
        network=network,
        preprocessor=None,
        output_kind="vector",
        input_kind="text",
        layer_groups={"tfidf": [layer]},
        info={
            "family": "lexical",
            "weights": "fitted on the training texts",
            "terms": layer.width,
            "max_terms": max_terms,
            "ngrams": ngrams,
            "sublinear_tf": sublinear_tf,
            "training_texts": len(texts),
        },
        namespace=name,
    )
