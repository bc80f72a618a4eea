"""Cached feature extraction: run a frozen backbone once, then train the head on its features.

While a stage trains only the head, everything below the head is a fixed function of the
input: running the backbone's full forward pass again every epoch recomputes the same numbers.
So such a stage extracts the pooled features of every training and validation example once
(the model's inputs up to its `head_features` layer, in inference mode) and trains the head
layers, the same layer objects as the full model's, on them. The batches are the uncached
stage's, in the same order (`TrainData.regroup`), so the head ends where it would have.

Two things differ from running the backbone in the loop, and both are deliberate:
- Dropout inside the frozen backbone (BERT's) does not run: the features are the backbone's
  inference-mode output, as in the classic "extract features, fit a classifier" recipe.
- Random augmentation does not run either: the head trains on each image's one feature
  vector. `run_schedule` logs this when the data has augmentation.

Features are kept in memory. They are never larger than the inputs the training shuffle
already holds in memory (ResNet50's pooled 2048 floats are 8 KB for a 224 px image of 147 KB;
a MiniLM mean-pooled text is 384 floats, 1.5 KB, as its 128 token ids and masks are), so
spilling them to disk would save nothing the pipeline does not already spend.

Extracted features are kept for reuse in this process, keyed by a digest of everything they
depend on: the frozen part's architecture and every one of its weights, the examples that
went in (token ids or decoded pixels, and labels) and their shapes. Change any of them and
the features are extracted again; run the same stage again (another seed of a benchmark, a
second schedule on the same data) and they are not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer.data.pipeline import TrainData

log = logging.getLogger(__name__)

# The name of the layer `build_model` puts between pooling and the head: the cut.
FEATURES_LAYER = "head_features"
# Bytes of features kept for reuse in one process (least recently used go first).
KEEP_BYTES = 2 * 1024**3
_EXTRACT_BATCH = 64
# The compiled inference step of each extractor `extract` has run (forgotten with it).
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _OneTracePerExtractor(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning about `extract`'s step.

    Each extractor gets its own step, traced once per shape; TensorFlow counts the traces of
    all of them together (one source function) and warns after a few, which several
    extractors in one process (`tfxfer rank`, a benchmark's seeds) always reach.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("retracing" in message and "extract.<locals>" in message)


logging.getLogger("tensorflow").addFilter(_OneTracePerExtractor())


@dataclass
class HeadSplit:
    """A model cut at its `head_features` layer: what is below it, and the head above it."""

    features: keras.Model
    head: keras.Model


def split_at_head(model: keras.Model) -> HeadSplit | None:
    """The model's frozen part and head as two models sharing its layers, or None.

    None when the model has no `head_features` layer (a model not made by
    `tfxfer.build_model`, or saved before this layer existed).
    """
    try:
        cut = model.get_layer(FEATURES_LAYER)
    except ValueError:
        return None
    features = keras.Model(model.inputs, cut.output, name=f"{model.name}_features")
    head = keras.Model(cut.output, model.outputs, name=f"{model.name}_head")
    return HeadSplit(features, head)


def why_not_cached(model: keras.Model, split: HeadSplit | None, train: TrainData) -> str | None:
    """Why the current stage (trainable flags already set) cannot train on cached features."""
    if split is None:
        return f"the model has no {FEATURES_LAYER!r} layer (build it with tfxfer.build_model)"
    if train.examples is None or train.regroup is None:
        return "the training data cannot be regrouped (make it with make_datasets or epoch_batches)"
    head = {id(v) for v in split.head.trainable_variables}
    below = [v.path for v in model.trainable_variables if id(v) not in head]
    if below:
        return f"weights below the head train in this stage (e.g. {below[0]})"
    return None


class FeatureStore:
    """Extracted features kept for reuse in this process, by the digest of their inputs."""

    def __init__(self, keep_bytes: int = KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self._entries: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.extractions = 0  # how many times features were computed (not found)

    def clear(self) -> None:
        self._entries.clear()

    def features(
        self, extractor: keras.Model, examples: tf.data.Dataset
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """`(features, labels, found)` for unbatched `(input, label)` examples, in order."""
        inputs, labels = _materialize(examples)
        key = digest(extractor, inputs, labels)
        if key in self._entries:
            self._entries.move_to_end(key)
            return (*self._entries[key], True)
        features = extract(extractor, inputs)
        self.extractions += 1
        self._entries[key] = (features, labels)
        while len(self._entries) > 1 and _bytes(self._entries) > self.keep_bytes:
            self._entries.popitem(last=False)
        return features, labels, False


STORE = FeatureStore()


def _bytes(entries: OrderedDict) -> int:
    return sum(f.nbytes + y.nbytes for f, y in entries.values())


def _materialize(examples: tf.data.Dataset) -> tuple[Any, np.ndarray]:
    """All `(input, label)` pairs as numpy: inputs an array or a dict of arrays.

    Token sequences may come in different lengths (dynamically padded batches, unbatched):
    they are padded with zeros (the padding token, masked out) to the longest.
    """
    batches = list(examples.padded_batch(1024).as_numpy_iterator())
    xs = [x for x, _ in batches]
    labels = np.concatenate([y for _, y in batches])
    if isinstance(xs[0], dict):
        return {k: _concatenate_padded([x[k] for x in xs]) for k in xs[0]}, labels
    return _concatenate_padded(xs), labels


def _concatenate_padded(arrays: list[np.ndarray]) -> np.ndarray:
    if all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays)
    shape = np.max([a.shape[1:] for a in arrays], axis=0)
    return np.concatenate(
        [
            np.pad(a, [(0, 0), *[(0, s - n) for s, n in zip(shape, a.shape[1:], strict=True)]])
            for a in arrays
        ]
    )


def digest(extractor: keras.Model, inputs: Any, labels: np.ndarray) -> str:
    """SHA-256 of the extractor's architecture and weights, and of the inputs and labels."""
    h = hashlib.sha256()
    try:
        architecture = json.dumps(extractor.get_config(), sort_keys=True, default=str)
    except Exception:  # a layer without get_config: its class and name still say a lot
        architecture = repr([(type(layer).__name__, layer.name) for layer in extractor.layers])
    h.update(architecture.encode())
    for variable in extractor.weights:
        h.update(variable.path.encode())
        h.update(np.ascontiguousarray(variable.numpy()).tobytes())
    parts = sorted(inputs.items()) if isinstance(inputs, dict) else [("", inputs)]
    for name, array in [*parts, ("labels", labels)]:
        array = np.ascontiguousarray(array)
        h.update(f"{name}:{array.dtype}:{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def extract(extractor: keras.Model, inputs: Any) -> np.ndarray:
    """The extractor's inference-mode outputs for all `inputs`, in order, as one array.

    Token inputs of an extractor that takes any length run shortest first, each batch cut to
    its longest text (rounded up to a multiple of 16, so few shapes are traced): most texts
    are far shorter than the maximum, and attention costs grow with the length.
    """
    count = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    step = _STEPS.get(extractor)
    if step is None:  # one compiled step per extractor: a new one per call retraces (warned)
        # A weak reference: the step must not keep its extractor (the dictionary's key) alive.
        model = weakref.ref(extractor)
        step = _STEPS[extractor] = tf.function(
            lambda x: model()(x, training=False), reduce_retracing=True
        )
    lengths = _token_lengths(extractor, inputs)
    order = np.argsort(lengths, kind="stable") if lengths is not None else np.arange(count)
    outputs = []
    for start in range(0, count, _EXTRACT_BATCH):
        rows = order[start : start + _EXTRACT_BATCH]
        if isinstance(inputs, dict):
            batch = {k: v[rows] for k, v in inputs.items()}
            if lengths is not None:
                width = int(min(-(-max(int(lengths[rows].max()), 1) // 16) * 16, _width(inputs)))
                batch = {k: v[:, :width] for k, v in batch.items()}
        else:
            batch = inputs[rows]
        outputs.append(np.asarray(step(batch)))
    features = np.concatenate(outputs)
    unsorted = np.empty_like(features)
    unsorted[order] = features
    return unsorted


def _width(inputs: dict[str, np.ndarray]) -> int:
    return int(inputs["padding_mask"].shape[1])


def _token_lengths(extractor: keras.Model, inputs: Any) -> np.ndarray | None:
    """Tokens per example when `inputs` are padded token sequences the extractor takes at any
    length, else None."""
    if not isinstance(inputs, dict) or "padding_mask" not in inputs:
        return None
    shapes = [getattr(t, "shape", None) for t in tf.nest.flatten(extractor.inputs)]
    if not shapes or any(s is None or len(s) != 2 or s[1] is not None for s in shapes):
        return None
    mask = inputs["padding_mask"]
    # The last position holding a token, plus one (masks are contiguous from the start).
    return np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)


@dataclass
class CachedStage:
    """What a cached stage trains on, and what the run records about it."""

    train: TrainData
    val: tf.data.Dataset | None
    info: dict[str, Any]
    # The training split's features and labels as arrays, for a full-batch solver.
    features: np.ndarray | None = None
    labels: np.ndarray | None = None


def cached_stage(
    split: HeadSplit,
    train: TrainData,
    val: tf.data.Dataset | None,
    store: FeatureStore = STORE,
) -> CachedStage:
    """Extracts (or finds) the features of `train` and `val`; returns the data to fit on."""
    started = time.perf_counter()
    features, labels, found_train = store.features(split.features, train.examples)
    cached_train = train.regroup(tf.data.Dataset.from_tensor_slices((features, labels)))
    cached_val, found_val = None, True
    if val is not None:
        batch_size = _first_batch_size(val)
        val_features, val_labels, found_val = store.features(split.features, val.unbatch())
        cached_val = (
            tf.data.Dataset.from_tensor_slices((val_features, val_labels))
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    info = {
        "cached_features": True,
        "feature_shape": list(features.shape[1:]),
        "train_examples": int(features.shape[0]),
        "found_in_cache": bool(found_train and found_val),
        "extract_seconds": round(time.perf_counter() - started, 3),
        "skipped_augmentation": bool(train.augmented),
    }
    return CachedStage(cached_train, cached_val, info, features, labels)


def _first_batch_size(dataset: tf.data.Dataset) -> int:
    """The size of a batched dataset's first batch (every batch but the last has it)."""
    for _, y in dataset.take(1):
        return int(tf.shape(y)[0])
    return 1
