"""What `TF_CONFIG` says about a cluster, checked before any strategy exists.

TensorFlow reads `TF_CONFIG` lazily and reports a malformed one as a hang or a gRPC error on
another machine; reading and checking it here turns a typo into a message that says which
key is wrong. The rule for which task is the chief (the one process that writes the run's
files) is written once, in `place_in_cluster`, and `tfxfer.distribute` applies the same
rule to a running strategy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from tfxfer.errors import TfxferError


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """What `TF_CONFIG` says about the cluster and this process's place in it.

    Args:
        worker_count: int. Number of training tasks ("chief" plus "worker").
        task_type: str. This process's job name, e.g. "worker".
        task_index: int. This process's index within its job.
        worker_index: int. This process's rank among the training tasks, the chief first.
        is_chief: bool. Whether this process is the one that writes the run's files.
    """

    worker_count: int
    task_type: str
    task_index: int
    worker_index: int
    is_chief: bool


def cluster_from_tf_config(environ: Mapping[str, str] | None = None) -> ClusterInfo | None:
    """Reads and checks `TF_CONFIG`, the cluster description every multi-worker job gets.

    TensorFlow reads `TF_CONFIG` lazily and reports a malformed one as a hang or a gRPC
    error on another machine; checking it here turns a typo into a message that says which
    key is wrong.

    Args:
        environ: mapping. Where to read `TF_CONFIG` from. Defaults to `os.environ`.

    Returns:
        A `ClusterInfo`, or `None` when `TF_CONFIG` is unset or empty.

    Raises:
        TfxferError: `TF_CONFIG` is not JSON, lacks "cluster" or "task", names a
            parameter-server cluster, or its task is not listed in the cluster.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    shown = raw if len(raw) <= 300 else raw[:300] + "..."
    config = _parsed(raw, shown)
    cluster = _checked_cluster(config.get("cluster"), shown)
    task_type, task_index = _checked_task(config.get("task"), cluster, shown)
    worker_index, is_chief = place_in_cluster(cluster, task_type, task_index)
    return ClusterInfo(count_training_tasks(cluster), task_type, task_index, worker_index, is_chief)


def _parsed(raw: str, shown: str) -> dict:
    """`TF_CONFIG`'s JSON object (`shown` is how an error quotes it)."""
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TfxferError(
            f"TF_CONFIG is not valid JSON ({e}). Received: TF_CONFIG={shown!r}"
        ) from None
    if not isinstance(config, dict):
        raise TfxferError(
            f"Expected TF_CONFIG to be a JSON object with 'cluster' and 'task'. "
            f"Received: TF_CONFIG={shown!r}"
        )
    return config


def _checked_cluster(cluster: Any, shown: str) -> dict[str, list[str]]:
    """TF_CONFIG's "cluster": job name -> 'host:port' list, with no parameter servers."""
    if not isinstance(cluster, dict) or not cluster:
        raise TfxferError(
            "TF_CONFIG has no 'cluster' (a mapping from job name to a list of 'host:port', "
            f"e.g. {{'worker': ['host1:2222', 'host2:2222']}}). Received: TF_CONFIG={shown!r}"
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise TfxferError(
                f"TF_CONFIG cluster job {job!r} must list 'host:port' strings. "
                f"Received: {addresses!r}"
            )
    if "ps" in cluster:
        raise TfxferError(
            "TF_CONFIG describes a parameter-server cluster ('ps' job); tfxfer trains with "
            "MultiWorkerMirroredStrategy, which needs only 'chief' and/or 'worker' jobs. "
            f"Received: cluster jobs {sorted(cluster)}"
        )
    return cluster


def _checked_task(task: Any, cluster: dict[str, list[str]], shown: str) -> tuple[str, int]:
    """TF_CONFIG's "task" as (type, index), a place the cluster lists."""
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise TfxferError(
            "TF_CONFIG has no 'task' with 'type' and 'index' (this process's job and its "
            f"position in that job's list, e.g. {{'type': 'worker', 'index': 0}}). "
            f"Received: TF_CONFIG={shown!r}"
        )
    task_type, task_index = task["type"], task["index"]
    if task_type not in cluster:
        raise TfxferError(
            f"TF_CONFIG task type {task_type!r} is not a job of the cluster. "
            f"Expected one of {sorted(cluster)}."
        )
    if isinstance(task_index, bool) or not isinstance(task_index, int):
        raise TfxferError(f"TF_CONFIG task index must be an integer. Received: {task_index!r}")
    num_tasks = len(cluster[task_type])
    if not 0 <= task_index < num_tasks:
        raise TfxferError(
            f"TF_CONFIG task index {task_index} is out of range: job {task_type!r} lists "
            f"{num_tasks} address(es), so the index must be in 0..{num_tasks - 1}."
        )
    return task_type, task_index


def count_training_tasks(cluster: Mapping[str, list[str]]) -> int:
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def place_in_cluster(
    cluster: Mapping[str, list[str]], task_type: str, task_index: int
) -> tuple[int, bool]:
    """Returns a task's (worker_index, is_chief): the one rule for who writes the run's files.

    The "chief" task is the chief; a cluster without one makes worker 0 the chief. Training
    tasks are ranked chief first, then the workers; any other task (an "evaluator" side-car)
    is not a training replica and gets index -1.
    """
    chiefs = len(cluster.get("chief", []))
    if task_type == "chief":
        return task_index, True
    if task_type == "worker":
        return chiefs + task_index, chiefs == 0 and task_index == 0
    return -1, False
