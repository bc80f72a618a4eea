"""Contrastive fine-tuning of a text encoder on pairs of labelled examples, before its head.

With a handful of labelled texts per class, fine-tuning the whole classifier on them adds
little over a linear head on frozen features: a softmax loss over 8 examples a class gives
the encoder few and noisy gradients. SetFit (Tunstall et al., 2022, "Efficient Few-Shot
Learning Without Prompts") gets more out of the same labels by training on pairs: n labelled
examples make n^2 pairs, each one either "same class" or "different class". The encoder
learns to give texts of one class pooled embeddings that point the same way, and texts of
different classes embeddings at right angles; the linear head is then fitted on the new
features.

The loss: for a pair with pooled embeddings u and v, the cosine of the angle between them is
compared with a target, 1 for a same-class pair and 0 for a different-class pair, and the
squared difference is averaged over the batch. Both sides go through one encoder (the same
weights: a siamese network), so each step moves the encoder for both texts of every pair.

`contrastive_finetune` trains the classifier's own layers in place: pass it
`split_at_head(model).features`, then fit the head on features extracted again.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfxfer.errors import TfxferError
from tfxfer.train.compiling import build_before_tracing
from tfxfer.train.features import _materialize, _token_lengths, extract

# Pairs drawn per example and kind (same class, other class) when pairs are sampled
# (`contrastive_pairs=N`). With MiniLM-L6 at 8 texts a class (fortunes, debian-sections,
# 2 seeds each), 20 scored 2.7 points above 5 on average (3 runs of 4), at 4x the time.
DEFAULT_PAIRS_PER_EXAMPLE = 20
# `contrastive_pairs="auto"` (the text recipe's default) runs SetFit when the smallest class
# has at most this many training texts, on every pair inside each batch
# (`tfxfer.train.setfit_inbatch`). At 4, 8 and 16 texts a class (fortunes and
# debian-sections, 3 seeds each; benchmarks/README.md) it beat the solved head on frozen
# features by 2.8-7.2 points on the means; above 16 it is not measured.
SETFIT_AUTO_MAX_PER_CLASS = 16
# Batches sorted by length together: long enough that batches of similar lengths form, short
# enough that the order stays shuffled.
_SORT_WINDOW_BATCHES = 32
# Trimmed batch widths are multiples of this, so few shapes are traced.
_WIDTH_STEP = 16


def contrastive_finetune(
    features_model: keras.Model,
    inputs: Any,
    labels: np.ndarray | None = None,
    *,
    pairs_per_example: int = DEFAULT_PAIRS_PER_EXAMPLE,
    epochs: int = 1,
    learning_rate: float = 2e-5,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    seed: int = 0,
    verbose: int = 0,
) -> dict[str, Any]:
    """Trains the encoder under `features_model` to pull same-class examples together.

    Every example gets `pairs_per_example` pairs with another example of its class (target
    cosine similarity 1) and as many with an example of another class (target 0). Partners
    are drawn without repeats until a class runs out, then again, all from `seed`. The model
    trains for `epochs` passes over the pairs with AdamW, the learning rate rising linearly
    over the first `warmup` share of steps and falling linearly to 0 after. Token batches are
    cut to their longest text (texts of similar length batched together), since attention
    costs grow with the length.

    The weights of `features_model`'s layers change in place; which layers and weights are
    trainable is the same after the call as before. Every layer trains except BatchNorm
    layers, which stay as they were (frozen ones in inference mode, so their moving
    statistics do not drift toward pair batches).

    Args:
        features_model: keras.Model. From the classifier's inputs to its pooled features,
            sharing its layers (`split_at_head(model).features`).
        inputs: the training inputs: an array, a dict of padded token arrays
            (`token_ids`, `padding_mask`, `segment_ids`), or an unbatched `(input, label)`
            `tf.data.Dataset` (then `labels` comes from it).
        labels: int array of class ids, one per example. Defaults to `None` (from `inputs`).
        pairs_per_example: int. Same-class pairs per example, as many other-class. Defaults
            to `20`.
        epochs: int. Passes over the pairs. Defaults to `1`.
        learning_rate: float. Peak learning rate. Defaults to `2e-5`.
        warmup: float. Share of steps the rate rises over, in [0, 1). Defaults to `0.1`.
        weight_decay: float. AdamW's decoupled weight decay. Defaults to `0.01`.
        batch_size: int. Pairs per step. Defaults to `16`.
        seed: int. Seeds the pairs, their order and dropout. Defaults to `0`.
        verbose: int. Keras `fit` verbosity. Defaults to `0`.

    Returns:
        A JSON-able dict: `mode` ("pairs"), `pairs`, `positive_pairs`, `negative_pairs`,
        `steps`, `epochs`, `seconds`, `final_loss`, the pairs' mean cosines before and after
        (`positive_cosine_before`, ...), and `note` when some kind of pair could not be made.

    Raises:
        TfxferError: the labels do not match the inputs, or an argument is out of range.

    Example:

    ```python
    split = split_at_head(model)
    contrastive_finetune(split.features, train.examples, pairs_per_example=20)
    ```
    """
    started = time.perf_counter()
    if isinstance(inputs, tf.data.Dataset):
        inputs, dataset_labels = _materialize(inputs)
        labels = dataset_labels if labels is None else labels
    labels = _check_arguments(
        inputs, labels, pairs_per_example, epochs=epochs, batch_size=batch_size, warmup=warmup
    )
    rng = np.random.default_rng(seed)
    first, second, targets, note = _pairs_of(labels, pairs_per_example, rng)
    before = _mean_cosines(features_model, inputs, first, second, targets)
    steps, losses = _train_on_pairs(
        features_model,
        inputs,
        (first, second, targets),
        rng,
        epochs=epochs,
        learning_rate=learning_rate,
        warmup=warmup,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        verbose=verbose,
    )
    after = _mean_cosines(features_model, inputs, first, second, targets)
    info = {
        "mode": "pairs",
        **_pair_counts(targets),
        "pairs_per_example": pairs_per_example,
        "steps": steps,
        "epochs": epochs,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "final_loss": round(losses[-1], 6),
        "epoch_losses": [round(x, 6) for x in losses],
        **_cosines(before, after),
        "seconds": round(time.perf_counter() - started, 3),
        **({"note": note} if note else {}),
    }
    return info


def _pairs_of(labels: np.ndarray, pairs_per_example: int, rng: np.random.Generator) -> tuple:
    """`make_pairs`, or an error when no pair can be made."""
    first, second, targets, note = make_pairs(labels, pairs_per_example, rng)
    if len(targets) == 0:
        raise TfxferError(
            "Expected at least two examples of one class, or two classes, to make pairs. "
            f"Received: {len(labels)} example(s) of {len(np.unique(labels))} class(es)."
        )
    return first, second, targets, note


def _pair_counts(targets: np.ndarray) -> dict[str, int]:
    return {
        "pairs": len(targets),
        "positive_pairs": int(targets.sum()),
        "negative_pairs": int(len(targets) - targets.sum()),
    }


def _cosines(before: tuple[float, float], after: tuple[float, float]) -> dict[str, float]:
    """The mean cosines of same-class and other-class pairs, before and after training."""
    return {
        "positive_cosine_before": before[0],
        "negative_cosine_before": before[1],
        "positive_cosine_after": after[0],
        "negative_cosine_after": after[1],
    }


def _train_on_pairs(
    features_model: keras.Model,
    inputs: Any,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
    *,
    epochs: int,
    learning_rate: float,
    warmup: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    verbose: int,
) -> tuple[int, list[float]]:
    """The siamese training on `pairs` (first, second, target); returns (steps, epoch losses).

    Every layer but BatchNorm trains meanwhile; the trainable flags are put back after.
    """
    first, second, targets = pairs
    lengths = _token_lengths(features_model, inputs)
    with encoder_training(features_model, seed):
        siamese = _Siamese(features_model, name="siamese")
        steps = epochs * math.ceil(len(targets) / batch_size)
        siamese.compile(
            optimizer=keras.optimizers.AdamW(
                learning_rate=WarmupLinear(learning_rate, steps, round(warmup * steps)),
                weight_decay=weight_decay,
            ),
            loss="mean_squared_error",
            # Batch widths vary: XLA would compile each one again.
            jit_compile=False,
        )
        losses = []
        for epoch in range(epochs):
            batches = _batches(first, second, lengths, batch_size, rng)
            dataset = _pair_dataset(
                inputs, first, second, targets, batches=batches, lengths=lengths
            )
            with warnings.catch_warnings():
                # Weights the pooled features do not use (BERT's [CLS] pooler under mean
                # pooling) get no gradient, as expected.
                warnings.filterwarnings("ignore", "Gradients do not exist", UserWarning)
                build_before_tracing(siamese, dataset)
                history = siamese.fit(dataset, epochs=1, shuffle=False, verbose=verbose)
            losses.append(float(history.history["loss"][-1]))
            if verbose:
                print(f"[tfxfer] contrastive epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
    return steps, losses


@contextlib.contextmanager
def encoder_training(features_model: keras.Model, seed: int):
    """Every layer under `features_model` but BatchNorm trainable while the block runs (the
    trainable flags put back after, however it ends), dropout seeded by `seed`."""
    flags = _trainable_flags(features_model)
    try:
        _unfreeze_except_batchnorm(features_model)
        keras.utils.set_random_seed(seed)  # dropout inside the encoder
        yield
    finally:
        _restore_trainable_flags(flags)


def make_pairs(
    labels: np.ndarray, pairs_per_example: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None]:
    """`(first, second, targets, note)`: index pairs and their targets (1 same class, 0 not).

    Each example is the first of `pairs_per_example` same-class pairs and as many
    other-class pairs; its partners go through a shuffled pool once before any repeats.
    `note` says which classes had no same-class partner, or that there was no other class.
    """
    first, second, targets = [], [], []
    lonely = []
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    for i, label in enumerate(labels):
        same = members[label][members[label] != i]
        other = np.flatnonzero(labels != label)
        for pool, target in ((same, 1.0), (other, 0.0)):
            if len(pool) == 0:
                continue
            partners = _draw(pool, pairs_per_example, rng)
            first.extend([i] * len(partners))
            second.extend(partners.tolist())
            targets.extend([target] * len(partners))
        if len(same) == 0:
            lonely.append(label)
    notes = []
    if lonely:
        names = ", ".join(str(c) for c in sorted({int(c) for c in lonely}))
        notes.append(f"no same-class pairs for classes with one example (class ids {names})")
    if len(classes) < 2:
        notes.append("one class only: no different-class pairs")
    return (
        np.asarray(first, np.int64),
        np.asarray(second, np.int64),
        np.asarray(targets, np.float32),
        "; ".join(notes) or None,
    )


def _draw(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` members of `pool`: whole shuffled passes through it, then part of one more."""
    passes = [rng.permutation(pool) for _ in range(-(-count // len(pool)))]
    return np.concatenate(passes)[:count]


class WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):
    """Rises linearly from 0 to `peak` over `warmup_steps`, then falls linearly to 0."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int):
        self.peak = peak
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rise = (step + 1.0) / max(self.warmup_steps, 1)
        fall = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * ops.clip(ops.minimum(rise, fall), 0.0, 1.0)

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


class _Siamese(keras.Model):
    """Both sides of each pair through one encoder; outputs their cosine similarity."""

    def __init__(self, encoder: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def call(self, pair, training=False):
        a, b = pair
        # One pass over both sides: one batch of twice the size runs faster than two.
        both = tf.nest.map_structure(lambda x, y: ops.concatenate([x, y], axis=0), a, b)
        u, v = ops.split(self.encoder(both, training=training), 2, axis=0)
        return _cosine(u, v)


def _cosine(u, v):
    u = u / ops.maximum(ops.norm(u, axis=-1, keepdims=True), 1e-12)
    v = v / ops.maximum(ops.norm(v, axis=-1, keepdims=True), 1e-12)
    return ops.sum(u * v, axis=-1)


def _batches(
    first: np.ndarray,
    second: np.ndarray,
    lengths: np.ndarray | None,
    batch_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Pair indices per batch, shuffled; with token lengths, similar lengths batched together."""
    order = rng.permutation(len(first))
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    longest = np.maximum(lengths[first], lengths[second])
    window = batch_size * _SORT_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(longest[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _pair_dataset(inputs, first, second, targets, *, batches, lengths) -> tf.data.Dataset:
    """One epoch of `((first inputs, second inputs), targets)` batches, cut to their width."""
    is_dict = isinstance(inputs, dict)
    full = {k: v.shape[1] for k, v in inputs.items()} if is_dict else None

    def rows(index, width):
        if not is_dict:
            return inputs[index]
        return {k: v[index][:, : min(width, full[k])] for k, v in inputs.items()}

    def generate():
        for batch in batches:
            a, b = first[batch], second[batch]
            width = max(full.values()) if is_dict else 0
            if lengths is not None:
                longest = max(int(lengths[a].max()), int(lengths[b].max()), 1)
                width = -(-longest // _WIDTH_STEP) * _WIDTH_STEP
            yield (rows(a, width), rows(b, width)), targets[batch]

    def spec(array):
        shape = (None, None) if lengths is not None else (None, *array.shape[1:])
        return tf.TensorSpec(shape, tf.as_dtype(array.dtype))

    side = {k: spec(v) for k, v in inputs.items()} if is_dict else spec(inputs)
    signature = ((side, side), tf.TensorSpec((None,), tf.float32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(len(batches))).prefetch(2)


def _mean_cosines(features_model, inputs, first, second, targets) -> tuple[float, float]:
    """Mean inference-mode cosine similarity of the same-class and of the other-class pairs."""
    features = extract(features_model, inputs)
    cosines = np.asarray(_cosine(features[first], features[second]))
    same, other = cosines[targets == 1], cosines[targets == 0]
    return (
        round(float(same.mean()), 6) if len(same) else None,
        round(float(other.mean()), 6) if len(other) else None,
    )


def _trainable_flags(model: keras.Model) -> list[tuple[Any, bool]]:
    """Every layer's and weight's `trainable`, parents before their children."""
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    return [(layer, layer.trainable) for layer in layers] + [
        (variable, variable.trainable) for variable in model.weights
    ]


def _restore_trainable_flags(flags: list[tuple[Any, bool]]) -> None:
    # Setting a layer's flag sets its children's too: parents first, then each child, then
    # each weight (a weight can be frozen inside a trainable layer) puts every one back.
    for owner, trainable in flags:
        if isinstance(owner, keras.layers.Layer):
            _set_trainable(owner, trainable)
        else:
            owner.trainable = trainable


def _unfreeze_except_batchnorm(model: keras.Model) -> None:
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    batchnorm = [
        (layer, layer.trainable)
        for layer in layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in layers:
        _set_trainable(layer, True)
    for layer, trainable in batchnorm:
        _set_trainable(layer, trainable)


def _set_trainable(layer: keras.layers.Layer, value: bool) -> None:
    # Not `layer.trainable = value`: TensorFlow's attribute tracking skips an assignment of
    # the value the attribute already holds, so `model.trainable = True` on a trainable model
    # whose backbone is frozen would leave the backbone frozen.
    keras.layers.Layer.trainable.fset(layer, value)


def _check_arguments(
    inputs, labels, pairs_per_example, *, epochs, batch_size, warmup
) -> np.ndarray:
    labels = checked_labels(inputs, labels)
    check_counts(pairs_per_example=pairs_per_example, epochs=epochs, batch_size=batch_size)
    if not 0.0 <= warmup < 1.0:
        raise TfxferError(f"Expected `warmup` in [0, 1). Received: warmup={warmup!r}")
    return labels


def checked_labels(inputs, labels) -> np.ndarray:
    """`labels` as an array: one int class id per example of `inputs`, or an error."""
    count = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    if labels is None:
        raise TfxferError("Expected `labels` (int class ids) with array inputs. Received: None")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise TfxferError(
            f"Expected `labels` a 1-D int array of {count} class ids, one per input. "
            f"Received: shape={labels.shape}, dtype={labels.dtype}"
        )
    return labels


def check_counts(**values: Any) -> None:
    """Each keyword's value a positive int (not a bool), or an error naming it."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TfxferError(f"Expected `{name}` a positive int. Received: {name}={value!r}")
