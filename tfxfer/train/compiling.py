"""How a stage's training steps are compiled: XLA with a fallback, several steps per call."""

from __future__ import annotations

import logging
from typing import Any

import keras
import tensorflow as tf

from tfxfer.errors import TfxferError

log = logging.getLogger(__name__)


# At most this many training steps per call of the compiled step, in cached stages.
MAX_STEPS_PER_EXECUTION = 32


def steps_per_execution(steps_per_epoch: int, skipped: int = 0) -> int:
    """The most steps per call, up to `MAX_STEPS_PER_EXECUTION`, that split every fit evenly.

    An epoch (and the rest of one that a resume starts part-way) must be a whole number of
    calls, or a call would run into the next epoch's batches, and a callback that acts after
    a step (a preemption notice, a NaN check) sees only the step that ends a call.
    """
    counts = [steps_per_epoch] + ([steps_per_epoch - skipped] if skipped else [])
    return max(k for k in range(1, MAX_STEPS_PER_EXECUTION + 1) if all(n % k == 0 for n in counts))


# What TensorFlow raises when XLA cannot compile a step: an op without an XLA kernel, or one
# whose shapes XLA needs to know and cannot.
XLA_ERRORS = (
    tf.errors.InvalidArgumentError,
    tf.errors.UnimplementedError,
    tf.errors.NotFoundError,
)


def build_before_tracing(model: keras.Model, data: tf.data.Dataset) -> None:
    """Creates the optimizer's, the metrics' and the loss's variables before `fit` traces its step.

    Without a distribution strategy Keras 3 leaves that to the first trace of the training
    step, and `tf.function` traces a function that created variables a second time, so every
    stage compiled its step twice (a MobileNetV3Small at 32 px: first `fit` 15.3 s, 8.2 s
    with the state built first). Under a strategy Keras builds it itself, the same way. Only
    `data`'s element spec is read, not a batch.
    """
    if getattr(model, "_distribute_strategy", None) is not None:
        return
    symbolic_build = getattr(model, "_symbolic_build", None)  # Keras' own pre-`fit` build
    if symbolic_build is not None:
        try:
            symbolic_build(data_batch=data.element_spec)
            return
        except TypeError:  # a Keras whose private build takes other arguments
            log.debug("Keras' _symbolic_build did not take data_batch; building the optimizer.")
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def fit_falling_back_from_xla(
    model: keras.Model,
    compiled: dict[str, Any],
    metrics: list | None,
    info: dict[str, Any],
    data: tf.data.Dataset,
    **fit_arguments: Any,
) -> None:
    """`model.fit`; when XLA cannot compile its first step, recompiles without XLA and fits.

    Only a failure before the first update is retried: after one, the weights have moved and
    fitting the same epochs again would train them twice, so the error goes on, named.
    """
    steps_before = int(model.optimizer.iterations.numpy())
    build_before_tracing(model, data)
    try:
        model.fit(data, **fit_arguments)
        return
    except XLA_ERRORS as error:
        if not model.jit_compile or "XLA" not in str(error) and "compil" not in str(error):
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        said = [line for line in lines if any(w in line for w in ("XLA", "unsupported", "compil"))]
        reason = (said or lines or [type(error).__name__])[0][:300]
        if int(model.optimizer.iterations.numpy()) != steps_before:
            raise TfxferError(
                f"XLA could not compile a step after training had begun ({reason}). Run with "
                "jit_compile=False."
            ) from error
    log.warning("XLA cannot compile this model's training step (%s); training without XLA.", reason)
    compiled["jit_compile"] = False
    model.compile(metrics=fresh_metrics(metrics), **compiled)
    info.update(jit_compile=False, jit_fallback=reason)
    build_before_tracing(model, data)
    model.fit(data, **fit_arguments)


def one_device(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` trains on one device (the default strategy, or OneDevice).

    Keras' loop of several steps per call fails on distributed iterators ("You must feed a
    value for placeholder tensor" under MultiWorkerMirroredStrategy), so only one device
    runs several.
    """
    return not isinstance(
        strategy,
        (
            tf.distribute.MirroredStrategy,
            tf.distribute.MultiWorkerMirroredStrategy,
            tf.distribute.TPUStrategy,
        ),
    )


def acts_on_batches(callbacks: list[keras.callbacks.Callback] | None) -> bool:
    """Whether a user's callback does something after single steps (it sees every step only
    with one step per call)."""
    hooks = ("on_train_batch_begin", "on_train_batch_end")
    return any(
        getattr(type(c), hook) is not getattr(keras.callbacks.Callback, hook)
        for c in (callbacks or [])
        for hook in hooks
    )


def fresh_metrics(metrics: list | None) -> list:
    """New metric objects of the same configs: a stage's compile must not share state."""
    return [
        m if isinstance(m, str) else type(m).from_config(m.get_config()) for m in (metrics or [])
    ]
