"""Where a randomly initialised backbone's BatchNorm statistics start: as built, or from data.

A backbone built without pretrained weights (`--weights none`) has BatchNorm moving means
of 0 and variances of 1, whatever the data. Frozen (inference mode, as the head stage runs
it), such a network's activations shrink block by block: MobileNetV3Small's pooled
features are ~1e-11, EfficientNetV2B0's ~1e-3. Two ways to start from there:

- **initial**: keep the statistics as built. The features are tiny but not empty: the head
  solver rescales them (`tfxfer.solver`, `rescale=True`), and in that small-signal regime
  the network is close to a random linear map of the pixels, which keeps what a linear head
  needs. Stages that train the backbone leave BatchNorm frozen, so the head keeps reading
  the features it was fitted on.
- **recompute**: set the statistics from the training data
  (`tfxfer.batchnorm.recompute_batchnorm_statistics`), and let stages that train the
  backbone update them. Activations keep unit scale, so nothing underflows (float16 would
  turn 1e-11 into 0), but the random network runs in its chaotic regime, where much of the
  input is lost.

Measured (linear probe, 8 labels a class, 500 test images, seeds 0 and 1, 32 px, random
weights), initial against recomputed: digits 76-87% against 15-38%, fashion-mnist 51-66%
against 14-29%, for MobileNetV3Small, EfficientNetV2B0 and ResNet50 alike; through the
image recipe (MobileNetV3Small) 72-81% against 33-37% on digits at 8 a class, 91% against
52% at 64 a class.

"auto" (the recipes' default) does not take that on trust: it fits the linear head to the
training features (up to `max_examples` of them) both ways and keeps the start whose
cross-validated held-out loss is lower. Features that are not finite or do not vary (the
float16 case) lose; with no cross-validation possible (a class with one example) the
initial statistics are kept if their features are usable. Where the head is not solved but
trained by gradient steps (`head_epochs` set, a hidden layer), which do not rescale, "auto"
recomputes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np

from tfxfer.batchnorm import batchnorm_layers, recompute_batchnorm_statistics
from tfxfer.data.pipeline import TrainData
from tfxfer.model import task_of
from tfxfer.solver import fit_linear_head
from tfxfer.train.features import STORE, split_at_head

log = logging.getLogger(__name__)

BATCHNORM_STARTS = ("auto", "initial", "recompute")
# Training examples the "auto" choice fits its two probes on, at most.
CHOICE_MAX_EXAMPLES = 2048


def start_batchnorm(
    model: keras.Model,
    train: TrainData,
    *,
    mode: str = "auto",
    seed: int = 0,
    max_examples: int = CHOICE_MAX_EXAMPLES,
    solved_head: bool = True,
) -> dict[str, Any]:
    """Leaves `model`'s BatchNorm statistics as built or recomputes them; says which and why.

    Call it on a model (`tfxfer.build_model`) whose backbone is randomly initialised, before
    its first stage. See the module docstring for the two starts.

    Args:
        model: keras.Model. Updated in place.
        train: TrainData. The training data (`make_datasets`); its `examples` feed the
            probes of "auto", its batches the recomputation.
        mode: str. "auto" (choose by cross-validated probe), "initial" or "recompute".
            Defaults to `"auto"`.
        seed: int. Seeds the sample and the folds. Defaults to `0`.
        max_examples: int. Most training examples the probes and the recomputation use.
            Defaults to `CHOICE_MAX_EXAMPLES`.
        solved_head: bool. Whether the first stage fits a linear head with the solver, which
            rescales the features. A head trained by gradient steps instead barely moves on
            features of 1e-11: "auto" then recomputes. Defaults to `True`.

    Returns:
        A dict for the run record: `mode`, `start` ("initial" or "recomputed"), `reason`,
        `cv_loss` (per start, where measured), `examples` and `seconds`.
    """
    if mode not in BATCHNORM_STARTS:
        raise ValueError(f"Expected `mode` one of {BATCHNORM_STARTS}. Received: mode={mode!r}")
    started = time.perf_counter()
    record: dict[str, Any] = {"mode": mode, "cv_loss": {}, "examples": 0}
    if mode == "initial":
        record.update(start="initial", reason="asked for (random_batchnorm=initial)")
    elif mode == "recompute":
        record.update(start="recomputed", reason="asked for (random_batchnorm=recompute)")
        record["examples"] = _recompute(model, train, max_examples)
    elif not solved_head:
        record.update(
            start="recomputed",
            reason="the head trains by gradient steps, which the initial statistics' tiny "
            "features would stall (a solved head, head_epochs none, can use them)",
        )
        record["examples"] = _recompute(model, train, max_examples)
    else:
        _choose(model, train, record, seed=seed, max_examples=max_examples)
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _choose(model, train: TrainData, record: dict, *, seed: int, max_examples: int) -> None:
    split = split_at_head(model)
    if split is None or train.examples is None:
        record.update(start="recomputed", reason="no cached features to compare them on")
        record["examples"] = _recompute(model, train, max_examples)
        return
    examples = _sample(train, max_examples, seed)
    outputs = int(model.outputs[0].shape[-1])
    task = task_of(model)
    initial, why_initial = _probe_loss(split.features, examples, task, outputs, seed)
    saved = [(layer, [v.numpy() for v in layer.non_trainable_weights]) for layer in
             batchnorm_layers(model)]  # fmt: skip
    keep_initial = True  # put back as built if anything below fails
    try:
        record["examples"] = _recompute(model, train, max_examples)
        recomputed, why_recomputed = _probe_loss(split.features, examples, task, outputs, seed)
        keep_initial, reason = _verdict(initial, why_initial, recomputed, why_recomputed)
    finally:
        if keep_initial:
            for layer, values in saved:
                for variable, value in zip(layer.non_trainable_weights, values, strict=True):
                    variable.assign(value)
    record["cv_loss"] = {
        name: round(loss, 6)
        for name, loss in (("initial", initial), ("recomputed", recomputed))
        if isinstance(loss, float)
    }
    record.update(start="initial" if keep_initial else "recomputed", reason=reason)


def _verdict(initial, why_initial, recomputed, why_recomputed) -> tuple[bool, str]:
    """(keep the initial statistics?, why) from the two probes' losses or reasons."""
    if initial == "unusable":
        return False, f"the initial statistics' features {why_initial}"
    if recomputed == "unusable":
        return True, f"the recomputed statistics' features {why_recomputed}"
    if isinstance(initial, float) and isinstance(recomputed, float):
        return initial <= recomputed, (
            f"held-out loss of a linear head: {initial:.4g} (initial) against "
            f"{recomputed:.4g} (recomputed)"
        )
    # The folds depend on the labels alone: neither start could be cross-validated.
    return True, (
        f"no cross-validation ({why_initial or why_recomputed}): kept the initial statistics, "
        "which measured better (tfxfer.train.random_start)"
    )


def _probe_loss(extractor, examples, task: str, outputs: int, seed: int):
    """(the best cross-validated held-out loss, None) or ("unusable" / None, why)."""
    features, labels, _ = STORE.features(extractor, examples)
    features = np.asarray(features, np.float64).reshape(len(features), -1)
    if not np.all(np.isfinite(features)):
        return "unusable", "are not finite"
    if not np.any(features.std(axis=0) > 0):
        return "unusable", "are the same for every example"
    fit = fit_linear_head(
        features,
        labels,
        task,
        num_outputs=outputs,
        standardize=False,
        rescale=True,
        seed=seed,
    )
    if not fit.cv_loss:
        return None, fit.note or "no cross-validation"
    return float(min(fit.cv_loss.values())), None


def _sample(train: TrainData, max_examples: int, seed: int):
    """The training examples, or a seeded sample of `max_examples` of them, the same sample
    every time it is read (both probes see the same examples)."""
    examples = train.examples
    count = int(examples.cardinality())
    if count < 0:  # unknown: count them (the sample must not be the first, class-sorted ones)
        count = int(examples.reduce(0, lambda n, _: n + 1))
    if count <= max_examples:
        return examples
    return examples.shuffle(count, seed=seed, reshuffle_each_iteration=False).take(max_examples)


def _recompute(model, train: TrainData, max_examples: int) -> int:
    """Recomputes the statistics from up to `max_examples` training examples; returns how many.

    Unaugmented data is read once (another pass would give the same batches' statistics);
    augmented data up to `max_examples`, over as many epochs as that takes.
    """
    count = int(train.examples.cardinality()) if train.examples is not None else -1
    if not train.augmented and count > 0:
        max_examples = min(max_examples, count)
    info = recompute_batchnorm_statistics(model, train.build(0), max_examples=max_examples)
    return int(info["examples"])
