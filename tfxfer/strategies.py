"""A strategy from its name: "auto", "cpu", "one_device", "mirrored", "multi_worker", "tpu".

One word in a config should move a run from a laptop to GPUs, workers or a TPU. This module
maps the word to a `tf.distribute.Strategy` and says in plain words what is wrong when the
environment does not match the request (no TPU, no or a broken `TF_CONFIG`). The rest of what
a run's compute needs (precision, batch sizes, the chief) is `tfxfer.distribute`, which also
offers these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tfxfer.cluster import cluster_from_tf_config
from tfxfer.errors import TfxferError

STRATEGY_NAMES = ("auto", "cpu", "one_device", "mirrored", "multi_worker", "tpu")

TpuResolverFactory = Callable[[], Any]


# === Strategy ===


def _default_tpu_resolver() -> Any:
    """Finds a TPU the way Colab and Cloud TPU VMs expose one."""
    resolver_cls = tf.distribute.cluster_resolver.TPUClusterResolver
    try:
        # Colab and TPU nodes: the address comes from the environment (TPU_NAME, ...).
        return resolver_cls()
    except ValueError:
        pass
    # Cloud TPU VMs: the chips are attached to this host.
    if tf.config.list_physical_devices("TPU"):
        return resolver_cls(tpu="local")
    raise ValueError("No TPU address in the environment and no TPU attached to this host.")


def _find_tpu(tpu_resolver_factory: TpuResolverFactory | None) -> tuple[Any, str]:
    """Returns (resolver, "") when a TPU resolves, else (None, why not)."""
    factory = tpu_resolver_factory or _default_tpu_resolver
    try:
        return factory(), ""
    except (ValueError, RuntimeError, KeyError, tf.errors.OpError) as e:
        return None, f"{type(e).__name__}: {e}"


def _normalize_name(name: str) -> str:
    if not isinstance(name, str):
        raise TfxferError(
            f"Expected the strategy name to be a string, one of {STRATEGY_NAMES}. "
            f"Received: {name!r}"
        )
    normalized = name.strip().lower().replace("-", "_")
    if normalized not in STRATEGY_NAMES:
        raise TfxferError(
            f"Expected the strategy to be one of {STRATEGY_NAMES}. Received: strategy={name!r}"
        )
    return normalized


def _resolve(name: str, tpu_resolver_factory: TpuResolverFactory | None) -> tuple[str, Any]:
    """Returns the concrete kind ("tpu", "multi_worker", ..., "default") and a TPU resolver."""
    name = _normalize_name(name)
    if name == "tpu":
        resolver, why = _find_tpu(tpu_resolver_factory)
        if resolver is None:
            raise TfxferError(
                "strategy='tpu' but no TPU resolves on this machine "
                f"({why}). On Colab, pick a TPU runtime; on a Cloud TPU VM, check that "
                "the TPU is attached; otherwise use strategy='auto'."
            )
        return "tpu", resolver
    if name == "multi_worker":
        if cluster_from_tf_config() is None:
            raise TfxferError(
                "strategy='multi_worker' needs TF_CONFIG, the JSON cluster description every "
                'worker gets, e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:2222", '
                '"host2:2222"]}, "task": {"type": "worker", "index": 0}}\'. '
                "It is not set in this process."
            )
        return "multi_worker", None
    if name != "auto":
        return name, None
    resolver, _ = _find_tpu(tpu_resolver_factory)
    if resolver is not None:
        return "tpu", resolver
    cluster = cluster_from_tf_config()  # A malformed TF_CONFIG raises even under "auto".
    if cluster is not None and cluster.worker_count > 1:
        return "multi_worker", None
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return "mirrored", None
    return "default", None


def resolve_strategy_name(
    name: str = "auto", *, tpu_resolver_factory: TpuResolverFactory | None = None
) -> str:
    """Says which strategy `get_strategy(name)` would build here, without building it.

    Building a strategy is not free (a TPU is initialised, a multi-worker one fixes
    TensorFlow's collective setup for the life of the process), so a CLI `--dry-run` or a
    test asks this instead.

    Args:
        name: str. One of `STRATEGY_NAMES`. Defaults to `"auto"`.
        tpu_resolver_factory: callable. Returns a `TPUClusterResolver`, raising
            `ValueError` when there is no TPU. Defaults to looking for Colab / Cloud TPU.

    Returns:
        One of "tpu", "multi_worker", "mirrored", "cpu", "one_device", or "default" (what
        "auto" gives on one GPU or on CPU: TensorFlow's default strategy).

    Example:

    >>> resolve_strategy_name("auto")  # on a laptop
    'default'
    """
    return _resolve(name, tpu_resolver_factory)[0]


def _tpu_strategy(resolver: Any) -> tf.distribute.Strategy:
    try:
        if resolver.cluster_spec().as_dict():  # A remote TPU (Colab, TPU node).
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, IndexError, tf.errors.OpError) as e:
        raise TfxferError(
            f"A TPU cluster resolved (master={resolver.master()!r}) but could not be "
            f"initialised: {type(e).__name__}: {str(e)[:500]}. Restart the runtime, or use "
            "strategy='cpu' to train without it."
        ) from e


def get_strategy(
    name: str = "auto", *, tpu_resolver_factory: TpuResolverFactory | None = None
) -> tf.distribute.Strategy:
    """Builds the `tf.distribute.Strategy` a strategy name asks for.

    One word in a config should be enough to move a run from a laptop to GPUs, workers or a
    TPU; "auto" picks the biggest thing this process can see, in this order: a TPU that
    resolves, a `TF_CONFIG` naming more than one worker (MultiWorkerMirroredStrategy),
    more than one GPU (MirroredStrategy), else TensorFlow's default strategy (one GPU or
    the CPU).

    Call it before building datasets or models: MultiWorkerMirroredStrategy must be created
    before TensorFlow runs its first op, and models must be built inside `strategy.scope()`.

    Args:
        name: str. One of "auto", "cpu" (`OneDeviceStrategy("/cpu:0")`), "one_device" (the
            first GPU, else the CPU), "mirrored" (all GPUs, else all logical CPUs of this
            host), "multi_worker" (needs `TF_CONFIG`), "tpu". Defaults to `"auto"`.
        tpu_resolver_factory: callable. Returns a `TPUClusterResolver`, raising
            `ValueError` when there is no TPU; tests pass a fake. Defaults to looking for a
            Colab / Cloud TPU.

    Returns:
        The strategy.

    Raises:
        TfxferError: an unknown name, "multi_worker" without (or with a malformed)
            `TF_CONFIG`, "tpu" where none resolves, or a TPU that resolves but does not
            initialise.

    Example:

    >>> strategy = get_strategy("cpu")
    >>> strategy.num_replicas_in_sync
    1
    """
    kind, resolver = _resolve(name, tpu_resolver_factory)
    if kind == "tpu":
        return _tpu_strategy(resolver)
    if kind == "multi_worker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            if "program startup" not in str(e):
                raise
            raise TfxferError(
                "MultiWorkerMirroredStrategy must be created before TensorFlow runs any op "
                f"({e}). Call tfxfer.distribute.get_strategy() first thing in the program, "
                "before building datasets or models."
            ) from e
    if kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if kind == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if kind == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    return tf.distribute.get_strategy()
