"""Imbalanced classes: class weights from label frequencies, or balanced sampling.

Two remedies, `balance="weights"` or `balance="sampling"` in a recipe (`--balance`):

- **weights**: each training example's loss is weighted by n / (k · n_c) for its class c (n
  examples, k classes present, n_c of class c), so every class carries the same total weight
  and the mean weight stays 1 (the learning rate means what it meant). Keras' `class_weight`.
- **sampling**: the training split is oversampled until every class has as many examples as
  the largest: each class's examples repeated whole, the remainder a seeded random draw
  without replacement. An epoch then has k · max(n_c) examples; shuffling and augmentation
  still vary every copy. The validation and test splits are never changed, so their metrics
  are those of the data as it is.

Both are for single-label data; a run that uses neither gets a warning when the largest
class has at least `IMBALANCE_RATIO` times as many training examples as the smallest.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfxfer.data.examples import Examples, LabelledData
from tfxfer.errors import TfxferError

BALANCE_MODES = ("weights", "sampling")

# Warn when the largest class has this many times the training examples of the smallest.
IMBALANCE_RATIO = 3.0


def class_weights(examples: Examples) -> dict[int, float]:
    """`{class id: n / (k · n_c)}` over the classes present; 1.0 for a class with no examples."""
    counts = np.bincount(examples.labels, minlength=len(examples.class_names))
    present = counts > 0
    weights = np.ones(len(counts))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return {index: float(weight) for index, weight in enumerate(weights)}


def oversampled(examples: Examples, seed: int) -> Examples:
    """The examples with every class oversampled to the size of the largest, in class order.

    Training shuffles every epoch, so the order here does not matter; the draw is seeded.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(examples.labels, minlength=len(examples.class_names))
    target = int(counts.max())
    indices: list[np.ndarray] = []
    for class_id in np.flatnonzero(counts):
        members = np.flatnonzero(examples.labels == class_id)
        whole, rest = divmod(target, len(members))
        indices.append(np.tile(members, whole))
        indices.append(rng.choice(members, size=rest, replace=False))
    return examples.subset(np.concatenate(indices))


def imbalance(examples: Examples) -> tuple[str, int, str, int] | None:
    """`(largest class, its count, smallest class, its count)` when the ratio reaches
    `IMBALANCE_RATIO`, else None. Multi-label data is not checked."""
    if examples.multi_label or not len(examples):
        return None
    counts = examples.counts()
    present = {name: n for name, n in counts.items() if n > 0}
    largest = max(present, key=present.get)
    smallest = min(present, key=present.get)
    if present[largest] < IMBALANCE_RATIO * present[smallest]:
        return None
    return largest, present[largest], smallest, present[smallest]


def imbalance_warning(examples: Examples) -> str | None:
    """The one-line warning for imbalanced training classes, or None when they are not."""
    found = imbalance(examples)
    if found is None:
        return None
    largest, most, smallest, fewest = found
    return (
        f"the training classes are imbalanced: {largest!r} has {most} examples, {smallest!r} "
        f"{fewest} ({most / fewest:.1f}x). Accuracy then rewards predicting the large classes; "
        "consider --balance weights (loss weighted by class frequency) or --balance sampling "
        "(oversample the small classes), and read per-class recall and macro F1."
    )


def balance_data(
    data: LabelledData, mode: str | None, seed: int
) -> tuple[LabelledData, dict[int, float] | None]:
    """The data to train on and the Keras `class_weight` for `mode` (None, weights, sampling).

    Raises:
        TfxferError: an unknown mode, or a mode for multi-label data.
    """
    if mode is None:
        return data, None
    if mode not in BALANCE_MODES:
        raise TfxferError(f"balance={mode!r} (expected one of {BALANCE_MODES} or none).")
    if data.multi_label:
        raise TfxferError(
            f"balance={mode!r} is for single-label data; this data is multi-label, where a "
            "class's frequency is not one number per example. Leave balance unset."
        )
    if mode == "weights":
        return data, class_weights(data.train)
    return dataclasses.replace(data, train=oversampled(data.train, seed)), None
