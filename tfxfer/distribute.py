"""Strategies, mixed precision and batch sizes: where a run's compute comes from.

A config names its hardware with one word ("auto", "cpu", "mirrored", "multi_worker",
"tpu") and gives its batch size per replica. This module turns the word into a
`tf.distribute.Strategy`, derives the global batch and the mixed-precision policy from it,
and says in plain words what is wrong when the environment does not match the request (no
TPU, no or a broken `TF_CONFIG`, a batch that does not split evenly), so that a user learns it
before a model is built rather than from a TensorFlow traceback ten minutes later.
`Distribution` does all of it for one run in one call.

Create the strategy first thing in a process: `MultiWorkerMirroredStrategy` configures
collective ops, which TensorFlow only allows before it has run any op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfxfer import keras_compat
from tfxfer.cluster import (  # noqa: F401  (ClusterInfo is part of what this module offers)
    ClusterInfo,
    cluster_from_tf_config,
    count_training_tasks,
    place_in_cluster,
)
from tfxfer.errors import TfxferError
from tfxfer.strategies import (  # noqa: F401  (offered here too: `distribute.get_strategy`)
    STRATEGY_NAMES,
    TpuResolverFactory,
    get_strategy,
    resolve_strategy_name,
)

MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def _is_tpu_strategy(strategy: tf.distribute.Strategy) -> bool:
    return any(cls.__name__.startswith("TPUStrategy") for cls in type(strategy).__mro__)


def _device_types(strategy: tf.distribute.Strategy) -> set[str]:
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # The default strategy has no device list: it uses what is there.
        return {d.device_type for d in tf.config.list_logical_devices()}
    return {tf.DeviceSpec.from_string(d).device_type or "CPU" for d in devices}


def _strategy_name(strategy: tf.distribute.Strategy) -> str:
    # The names users write: MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy.
    named = (
        (tf.distribute.MultiWorkerMirroredStrategy, "MultiWorkerMirroredStrategy"),
        (tf.distribute.MirroredStrategy, "MirroredStrategy"),
        (tf.distribute.OneDeviceStrategy, "OneDeviceStrategy"),
    )
    for cls, name in named:
        if isinstance(strategy, cls):
            return name
    if _is_tpu_strategy(strategy):
        return "TPUStrategy"
    if type(strategy).__name__ == "_DefaultDistributionStrategy":
        return "DefaultStrategy"
    return type(strategy).__name__


def _multi_worker_task(
    strategy: tf.distribute.Strategy | None,
) -> tuple[dict[str, list[str]], str, int]:
    """Returns (cluster, task type, task index) under a multi-worker strategy, else ({}, "", 0).

    A MultiWorkerMirroredStrategy made without `TF_CONFIG` trains one local worker and has
    an empty cluster: it counts as single-host.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return {}, "", 0
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster or resolver.task_type is None:
        return {}, "", 0
    return cluster, resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process writes the run's files (run directory, checkpoints, exports).

    Every worker of a multi-worker run trains the same model; if each wrote it, they would
    race on one shared directory. Exactly one does: the "chief" task, or worker 0 when the
    cluster has no chief (the rule `cluster_from_tf_config` applies to `TF_CONFIG`). A
    single-host strategy (one device, mirrored GPUs, a TPU) has one process, which writes.

    Args:
        strategy: tf.distribute.Strategy or None. The run's strategy; `None` means no
            strategy (one process).

    Returns:
        True when this process should write the run's files.

    Example:

    >>> is_chief(get_strategy("cpu"))
    True
    """
    cluster, task_type, task_index = _multi_worker_task(strategy)
    if not cluster:
        return True
    return place_in_cluster(cluster, task_type, task_index)[1]


def broadcast_from_chief(
    strategy: tf.distribute.Strategy | None, values: Sequence[int]
) -> tuple[int, ...]:
    """The chief's `values` on every worker of a multi-worker run; `values` itself elsewhere.

    What the run does next must not depend on what each worker sees on its own disk (which
    checkpoint to resume from, say): the chief decides, and this hands its decision to every
    worker. Like any collective, every worker must call it at the same point of the program.
    It is one all-reduce (a sum to which only the chief contributes), run eagerly; this form
    works under `MultiWorkerMirroredStrategy` on CPU, where reducing a distributed dataset's
    batch does not (see `tfxfer.keras_compat`).

    Args:
        strategy: tf.distribute.Strategy or None. The run's strategy.
        values: sequence of int. What the chief sends; other workers' values are ignored.

    Returns:
        The chief's values, as a tuple of ints.

    Example:

    >>> broadcast_from_chief(get_strategy("cpu"), [3, -1])
    (3, -1)
    """
    return _sum_over_workers(strategy, values, chief_only=True)


def count_workers_where(strategy: tf.distribute.Strategy | None, condition: bool) -> int:
    """How many workers of a multi-worker run have `condition` true (0 or 1 elsewhere).

    Lets every worker stop together, with an error that says which went wrong, when one of
    them cannot go on (a collective would otherwise wait for it until it times out). Every
    worker must call it at the same point of the program.

    Example:

    >>> count_workers_where(get_strategy("cpu"), True)
    1
    """
    return _sum_over_workers(strategy, [int(bool(condition))], chief_only=False)[0]


def _sum_over_workers(
    strategy: tf.distribute.Strategy | None, values: Sequence[int], *, chief_only: bool
) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    cluster, _, _ = _multi_worker_task(strategy)
    if not cluster:
        return values
    contributes = is_chief(strategy) or not chief_only
    mine = tf.constant(values, tf.int64)
    nothing = tf.zeros_like(mine)
    # Replica ids are numbered worker by worker (the chief's first): each worker contributes
    # once, from its first local replica, however many devices it has.
    local_replicas = len(strategy.extended.worker_devices)

    def value(context: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        first = int(context.replica_id_in_sync_group) % local_replicas == 0
        return mine if contributes and first else nothing

    per_replica = strategy.experimental_distribute_values_from_function(value)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return tuple(int(v) for v in tf.reshape(total, [-1]).numpy())


def describe(strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """Summarises a strategy as plain JSON-able values for a run's `config.json`.

    A run's results depend on how many replicas shared each batch; recording it next to the
    config makes a run on 8 GPUs distinguishable from one on a laptop months later.

    Args:
        strategy: tf.distribute.Strategy. The strategy the run trains with.

    Returns:
        A dict with "strategy" (class name), "num_replicas", "device_types", "worker_index",
        "worker_count" and "is_chief" (whether this process should write the run's files).

    Example:

    >>> describe(get_strategy("cpu"))["num_replicas"]
    1
    """
    worker_index, worker_count = 0, 1
    cluster, task_type, task_index = _multi_worker_task(strategy)
    if cluster:
        worker_count = count_training_tasks(cluster)
        worker_index, _ = place_in_cluster(cluster, task_type, task_index)
    elif _is_tpu_strategy(strategy):
        worker_count = int(getattr(strategy.extended, "num_hosts", 1))
    return {
        "strategy": _strategy_name(strategy),
        "num_replicas": int(strategy.num_replicas_in_sync),
        "device_types": sorted(_device_types(strategy)),
        "worker_index": worker_index,
        "worker_count": worker_count,
        "is_chief": is_chief(strategy),
    }


# === Mixed precision ===


def mixed_precision_policy(
    name: str = "auto", strategy: tf.distribute.Strategy | None = None
) -> str:
    """Chooses the Keras dtype policy for the hardware a strategy trains on.

    Half precision roughly doubles throughput where the hardware has units for it (float16
    on GPU tensor cores, bfloat16 on TPU and on CPUs with AMX tile units, whose bfloat16
    matrix products oneDNN runs) and slows other CPUs down, so "auto" picks per device. On
    a 2-core AMX Xeon, fine-tuning MiniLM in mixed_bfloat16 took 0.6-0.75x the CPU time of
    float32 at the same test accuracy (benchmarks/README.md).

    Args:
        name: str. "auto", "float32", "mixed_float16" or "mixed_bfloat16". Defaults to
            `"auto"`.
        strategy: tf.distribute.Strategy. The run's strategy, read by "auto". Defaults to
            the devices visible to this process.

    Returns:
        A policy name for `apply_mixed_precision`.

    Raises:
        TfxferError: `name` is not one of the above.

    Example:

    >>> mixed_precision_policy("auto", get_strategy("cpu"))  # a CPU without AMX
    'float32'
    """
    known = ("auto", *MIXED_PRECISION_POLICIES)
    if name not in known:
        raise TfxferError(
            f"Expected `mixed_precision` to be one of {known}. Received: mixed_precision={name!r}"
        )
    if name != "auto":
        return name
    if strategy is not None:
        if _is_tpu_strategy(strategy):
            return "mixed_bfloat16"
        return "mixed_float16" if "GPU" in _device_types(strategy) else _cpu_policy()
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else _cpu_policy()


def _cpu_policy() -> str:
    return "mixed_bfloat16" if cpu_has_amx_bf16() else "float32"


def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU has AMX bfloat16 tile units (Linux; False elsewhere)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def apply_mixed_precision(policy: str) -> str:
    """Sets Keras's global dtype policy and returns the one it replaces.

    Layers take the global policy when they are constructed, so call this before building
    the model. Loss scaling then needs nothing more: under "mixed_float16", Keras 3's
    `Model.compile` wraps the optimizer in a `LossScaleOptimizer` by itself (its
    `auto_scale_loss=True` default) when the *model's* policy is "mixed_float16", at every
    compile, so each stage of a schedule gets one; an optimizer already wrapped is not wrapped
    twice. bfloat16 has float32's range and needs no scaling. A model built before this
    call keeps float32 and gets no loss scaling.

    Args:
        policy: str. "float32", "mixed_float16" or "mixed_bfloat16" (resolve "auto" with
            `mixed_precision_policy` first).

    Returns:
        The name of the previous global policy; pass it back to restore it.

    Raises:
        TfxferError: `policy` is not one of the above.

    Example:

    >>> previous = apply_mixed_precision("mixed_bfloat16")
    >>> _ = apply_mixed_precision(previous)
    """
    if policy not in MIXED_PRECISION_POLICIES:
        raise TfxferError(
            f"Expected the dtype policy to be one of {MIXED_PRECISION_POLICIES}. "
            f"Received: policy={policy!r}"
        )
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(policy)
    return previous


# === Batch size ===


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TfxferError(f"Expected `{name}` to be a positive integer. Received: {name}={value!r}")
    return value


def global_batch_size(per_replica_batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Multiplies the per-replica batch size of a config by the number of replicas.

    Configs give the batch per replica so that one config fits every device count; the
    input pipeline batches by the global size and the strategy splits each batch evenly.

    Args:
        per_replica_batch_size: int. Examples each replica sees per step.
        strategy: tf.distribute.Strategy. The run's strategy.

    Returns:
        The global batch size.

    Example:

    >>> global_batch_size(32, get_strategy("cpu"))
    32
    """
    _check_positive_int("per_replica_batch_size", per_replica_batch_size)
    return per_replica_batch_size * int(strategy.num_replicas_in_sync)


# === One run's distribution ===


class Distribution:
    """One run's compute: its strategy, precision policy, batch sizes and chief, in one call.

    Every recipe needs the same facts in the same order: the strategy first (before any
    TensorFlow op), the dtype policy before any layer is built, then the global batch for the
    input pipeline and who writes the run's files. Building them together keeps that order
    right and gives `config.json` one record of what the run used.

    Under `MultiWorkerMirroredStrategy` it also applies the Keras multi-worker patch
    (`keras_compat.patch_keras_for_multi_worker`), which Keras 3 needs there (keras#20585);
    every other strategy runs stock Keras.

    Args:
        strategy: str. A name from `STRATEGY_NAMES`, built by `get_strategy`. Defaults to
            `"auto"`.
        mixed_precision: str. "auto", "float32", "mixed_float16" or "mixed_bfloat16"; "auto"
            picks by the strategy's devices (`mixed_precision_policy`). It becomes Keras's
            global dtype policy. Defaults to `"auto"`.
        per_replica_batch_size: int. Examples each replica sees per step, as configs give it.
            Defaults to `32`.
        scale_learning_rate: bool. Multiply learning rates by global batch / per-replica
            batch, i.e. the number of replicas (the linear scaling rule of Goyal et al.,
            2017). Defaults to `False`.

    Attributes:
        strategy: tf.distribute.Strategy. Build the model inside `scope()`.
        policy: str. The dtype policy applied.
        per_replica_batch_size: int. As given.
        global_batch_size: int. What the input pipeline batches by.
        lr_scale: float. What to multiply each stage's learning rate by (1.0 unless
            `scale_learning_rate`).
        is_chief: bool. Whether this process writes the run's files (see `is_chief`).

    Raises:
        TfxferError: an unknown strategy or precision name, a strategy this machine cannot
            provide, or a batch size that is not a positive integer.

    Example:

    >>> distribution = Distribution("cpu", "float32", per_replica_batch_size=16)
    >>> distribution.global_batch_size
    16
    >>> with distribution.scope():
    ...     model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    """

    def __init__(
        self,
        strategy: str = "auto",
        mixed_precision: str = "auto",
        per_replica_batch_size: int = 32,
        scale_learning_rate: bool = False,
    ):
        # Checked before the strategy exists: building one can take a while (a TPU) and
        # fixes the process's collective setup (multi-worker).
        self.per_replica_batch_size = _check_positive_int(
            "per_replica_batch_size", per_replica_batch_size
        )
        self.strategy = get_strategy(strategy)
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            keras_compat.patch_keras_for_multi_worker()
        elif keras_compat.builds_from_one_replica(self.strategy):
            # Several mirrored replicas: a first batch they share unequally still builds.
            keras_compat.patch_keras_for_multi_worker(only=("symbolic_build",))
        self.policy = mixed_precision_policy(mixed_precision, self.strategy)
        apply_mixed_precision(self.policy)
        self.global_batch_size = global_batch_size(self.per_replica_batch_size, self.strategy)
        self.lr_scale = (
            self.global_batch_size / self.per_replica_batch_size if scale_learning_rate else 1.0
        )
        self.is_chief = is_chief(self.strategy)

    def scope(self) -> contextlib.AbstractContextManager:
        """The strategy's scope: build and compile the model inside it."""
        return self.strategy.scope()

    def describe(self) -> dict[str, Any]:
        """`describe(strategy)` plus precision and batch sizes, as `config.json` records them."""
        return {
            "distribution": {
                **describe(self.strategy),
                "mixed_precision": self.policy,
                "per_replica_batch_size": self.per_replica_batch_size,
                "global_batch_size": self.global_batch_size,
                "learning_rate_scale": self.lr_scale,
            }
        }
