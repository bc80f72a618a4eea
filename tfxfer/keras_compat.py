"""Work-arounds for Keras bugs that break tfxfer, each limited to the versions that have it.

Keras 3 (3.6 to at least 3.15.1) cannot `fit`, `evaluate` or `predict` under
`tf.distribute.MultiWorkerMirroredStrategy` on the TensorFlow backend (keras-team/keras
issue 20585). Two lines of `keras/src/backend/tensorflow/trainer.py` fail:

1. `TensorFlowTrainer._maybe_symbolic_build` builds the model from one batch of the
   distributed dataset and, to get a plain tensor from the per-replica batch, calls
   `strategy.reduce("MEAN", batch, axis=None)`. Across workers that is a collective op
   run eagerly on input data, and TensorFlow refuses it: "Attempt to convert a value
   (PerReplica ...) with an unsupported type ... to a Tensor".
2. `reduce_per_replica`, which turns each step's per-replica metric values into one, calls
   `strategy.reduce("MEAN", value, axis=0)` in multi-worker mode. Metric values are
   scalars, so this fails with "Invalid reduction dimension 0 for input with 0 dimensions";
   on a vector metric it would also average over the vector instead of over the replicas.

`patch_keras_for_multi_worker` replaces exactly these two behaviours, and only in
multi-worker mode: the build takes the first local replica's batch (only its shapes and
dtypes matter, as in the single-host path), and the metric reduction averages over
replicas only (`axis=None`), which is what the single-host path computes with
`tf.reduce_mean(local_results, axis=0)`. Single-host strategies run the original code.

The patch applies to the Keras versions in `PATCHED_KERAS_VERSIONS`, where it has been run:
3.11.0, 3.12.0, 3.13.0, 3.14.0 and 3.15.1 all fail unpatched and fit, evaluate and predict
patched. Keras before 3.11 iterates epochs differently and is not patched; Keras from 3.16
is untested, so the patch logs a warning and does nothing there.
`tests/test_keras_compat.py` runs an unpatched multi-worker fit and fails with "upstream
fixed keras#20585" once Keras fixes it, which is the signal to delete this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)

PATCHED_KERAS_VERSIONS = SpecifierSet(">=3.11.0,<3.16.0")
KERAS_ISSUE = "https://github.com/keras-team/keras/issues/20585"

# What each patch replaced, to undo it: {patch name: (owner, attribute, original)}.
_originals: dict[str, tuple[Any, str, Any]] = {}


def _trainer_module() -> Any:
    from keras.src.backend.tensorflow import trainer

    return trainer


def in_multi_worker_mode(strategy: Any) -> bool:
    """Whether `strategy` is a MultiWorkerMirroredStrategy over several workers."""
    import tensorflow as tf

    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def builds_from_one_replica(strategy: Any) -> bool:
    """Whether the patched build applies to `strategy`: several workers, or several mirrored
    replicas on one host (where the stock build averages the first batch over the replicas,
    and fails, "AddN ... must have the same size", when they got unequal shares of it: a
    split smaller than one global batch whose size is not a multiple of the replicas)."""
    import tensorflow as tf

    return in_multi_worker_mode(strategy) or (
        isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync > 1
    )


def _patch_symbolic_build(trainer: Any) -> None:
    """Builds from the first local replica's batch instead of a mean over the replicas."""
    import tensorflow as tf
    from keras.src import tree

    cls = trainer.TensorFlowTrainer
    original = cls._maybe_symbolic_build

    def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and builds_from_one_replica(strategy):
            for _, _, distributed_iterator in iterator:
                batch = next(distributed_iterator)
                data_batch = tree.map_structure(
                    lambda v: (
                        strategy.experimental_local_results(v)[0]
                        if isinstance(v, tf.distribute.DistributedValues)
                        else v
                    ),
                    batch,
                )
                break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    cls._maybe_symbolic_build = _maybe_symbolic_build
    _originals["symbolic_build"] = (cls, "_maybe_symbolic_build", original)


def _patch_metric_reduce(trainer: Any) -> None:
    """Averages per-replica step outputs over replicas only, in multi-worker mode."""
    from keras.src import tree

    original = trainer.reduce_per_replica

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        # "auto" means "mean" on every strategy but TPUStrategy; "concat" (predict) and
        # "sum" work in multi-worker mode and keep the original code.
        if reduction in ("auto", "mean") and in_multi_worker_mode(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    # Looked up as a module global when a step function is traced, so replacing the
    # module attribute reaches every train / test function traced afterwards.
    trainer.reduce_per_replica = reduce_per_replica
    _originals["metric_reduce"] = (trainer, "reduce_per_replica", original)


# Plain dict: patch name -> function applying it to keras's TF trainer module.
PATCHES: dict[str, Callable[[Any], None]] = {
    "symbolic_build": _patch_symbolic_build,
    "metric_reduce": _patch_metric_reduce,
}


def patch_keras_for_multi_worker(
    *, only: tuple[str, ...] | None = None, force: bool = False
) -> list[str]:
    """Makes `fit`, `evaluate` and `predict` work under MultiWorkerMirroredStrategy.

    Keras 3 on TensorFlow fails inside `fit` as soon as more than one worker trains
    (keras#20585); this patches the two functions that fail, as described in this module's
    docstring. It is idempotent and cheap: call it once at start-up in every worker, before
    the first `fit` / `evaluate` / `predict` (step functions traced earlier keep the old
    reduction). It changes nothing for single-host strategies. `tfxfer.distribute.Distribution`
    calls it when, and only when, its strategy is a `MultiWorkerMirroredStrategy`.

    Args:
        only: tuple of str. Names from `PATCHES` to apply; tests use it to show each one is
            needed. Defaults to all of them.
        force: bool. Patch even on a Keras version outside `PATCHED_KERAS_VERSIONS`.
            Defaults to `False`.

    Returns:
        The names of the patches applied by this call (empty when already applied, or
        when this Keras version or backend is not one the patch is for).

    Example:

    >>> patch_keras_for_multi_worker()  # doctest: +SKIP
    ['symbolic_build', 'metric_reduce']
    """
    names = tuple(PATCHES) if only is None else only
    unknown = sorted(set(names) - set(PATCHES))
    if unknown:
        raise ValueError(f"Expected patch names from {sorted(PATCHES)}. Received: {unknown}")
    version = _version_to_patch(force)
    if version is None:
        return []
    trainer = _trainer_module()
    applied = []
    for name in names:
        if name in _originals:
            continue
        PATCHES[name](trainer)
        applied.append(name)
    if applied:
        logger.info(
            "keras_compat: patched Keras %s for multi-worker training (%s): %s",
            version,
            KERAS_ISSUE,
            ", ".join(applied),
        )
    return applied


def _version_to_patch(force: bool) -> Version | None:
    """This Keras' version, or None (and why, logged) when it is not one the patch is for."""
    if keras.backend.backend() != "tensorflow":
        logger.info(
            "keras_compat: backend is %r, not tensorflow; nothing to patch.",
            keras.backend.backend(),
        )
        return None
    version = Version(keras.__version__)
    if version not in PATCHED_KERAS_VERSIONS and not force:
        logger.warning(
            "keras_compat: Keras %s is outside %s, where the multi-worker patch for %s is "
            "tested; not patching. If multi-worker fit fails, check that issue.",
            version,
            PATCHED_KERAS_VERSIONS,
            KERAS_ISSUE,
        )
        return None
    return version


def unpatch_keras_for_multi_worker() -> list[str]:
    """Restores the Keras functions `patch_keras_for_multi_worker` replaced.

    For tests and for code that must compare against stock Keras in the same process.

    Returns:
        The names of the patches removed.
    """
    removed = []
    for name, (owner, attribute, original) in list(_originals.items()):
        setattr(owner, attribute, original)
        del _originals[name]
        removed.append(name)
    return removed


def is_patched(name: str | None = None) -> bool:
    """Whether any multi-worker patch (or the one named, from `PATCHES`) is applied in this
    process."""
    return name in _originals if name is not None else bool(_originals)
