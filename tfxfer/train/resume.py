"""Resuming a run: which checkpoint, agreed by every worker, and the trainer's state from it.

A run directory written by an earlier version resumes as before: the checkpoint names
(`epoch-000003`, `epoch-000003-step-000005`), the keys of its `state.json` and the columns of
`history.csv` are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import tensorflow as tf

from tfxfer.distribute import broadcast_from_chief, count_workers_where, describe, is_chief
from tfxfer.errors import RunDirError
from tfxfer.rundir import RunDir
from tfxfer.train.checkpoints import Checkpointer, checkpoint_name
from tfxfer.train.trainer import NoCheckpoints, Trainer, config_differences

log = logging.getLogger(__name__)

# What the chief broadcasts in place of a checkpoint's epoch (see `_agreed_resume_state`).
_NO_CHECKPOINT = -1
_CHIEF_FAILED = -2


def _agreed_resume_state(
    checkpointer: Checkpointer | NoCheckpoints,
    run_dir: RunDir | None,
    strategy: tf.distribute.Strategy,
) -> dict[str, Any] | None:
    """The state of the checkpoint to resume from, the chief's choice on every worker.

    Only the chief looks for it (`Checkpointer.latest`, with its fallbacks). It broadcasts
    which one (its epoch and step) and a fingerprint of its files, and every other worker
    reads exactly that checkpoint. A worker that chose for itself would start fresh where it
    cannot see the chief's directory, or resume from another checkpoint where it sees a
    damaged pointer the chief fell back from, and its gradients would be averaged with the
    chief's as if they were one run. When any worker cannot read the chief's checkpoint, all
    of them stop with an error (agreed through a collective, so none waits for the others
    until a timeout).

    Returns:
        The checkpoint's state, or None when the run starts from the beginning.

    Raises:
        RunDirError: resuming was asked but there is no checkpoint, or a worker cannot read
            the chief's checkpoint.
    """
    chief = is_chief(strategy)
    state = _chiefs_state(checkpointer, run_dir, strategy) if chief else None
    choice = (_NO_CHECKPOINT, 0, 0)
    if state is not None:
        choice = (int(state["global_epoch"]), int(state.get("step", 0)), _fingerprint(state))
    epoch, step, fingerprint = broadcast_from_chief(strategy, choice)
    worker = f"Worker {describe(strategy)['worker_index']}" if not chief else "The chief"
    if epoch == _CHIEF_FAILED:
        raise RunDirError(f"{worker} stops: the chief cannot resume the run (its log says why).")
    if epoch == _NO_CHECKPOINT:
        return None
    name, problem = checkpoint_name(epoch, step), None
    if not chief:
        state, problem = _read_chiefs_checkpoint(checkpointer, name, fingerprint)
    failed = count_workers_where(strategy, problem is not None)
    shared = (
        "Every worker must see the chief's run directory, e.g. on a shared filesystem or a "
        "bucket mounted at the same path on every machine."
    )
    if problem is not None:
        raise RunDirError(
            f"{worker} cannot read the checkpoint {name} that the chief resumes from: {problem}. "
            f"{shared}"
        )
    if failed:
        raise RunDirError(
            f"{failed} worker(s) cannot read the checkpoint {name} that the chief resumes from "
            f"in {checkpointer.directory!r}; their logs say why. {shared}"
        )
    return state


def _chiefs_state(
    checkpointer: Checkpointer | NoCheckpoints,
    run_dir: RunDir | None,
    strategy: tf.distribute.Strategy,
) -> dict[str, Any] | None:
    """On the chief: the newest intact checkpoint's state (None when the run starts afresh).

    A failure is broadcast before it is raised, so that the workers stop too.
    """
    try:
        if run_dir is None or not run_dir.resumed:
            return None
        state = checkpointer.latest()
        if state is None:
            raise RunDirError(
                f"Cannot resume {run_dir.path!r}: it has no complete checkpoint yet. "
                "Start again with --overwrite, or choose another --output-dir."
            )
        return state
    except Exception:
        broadcast_from_chief(strategy, (_CHIEF_FAILED, 0, 0))  # The workers stop too.
        raise


def _fingerprint(state: dict[str, Any]) -> int:
    """60 bits of the digest of a checkpoint's recorded file sizes and SHA-256s (an int64)."""
    files = json.dumps(state["files"], sort_keys=True).encode("utf-8")
    return int(hashlib.sha256(files).hexdigest()[:15], 16)


def _read_chiefs_checkpoint(
    checkpointer: Checkpointer | NoCheckpoints, name: str, fingerprint: int
) -> tuple[dict[str, Any] | None, str | None]:
    """(state, None) for the chief's checkpoint `name`, or (None, why it cannot be read)."""
    directory = getattr(checkpointer, "directory", None)
    if directory is None:
        return None, "this worker was given no run directory"
    state, problem = checkpointer._read_intact(name)
    if problem is not None:
        return None, f"{problem} in {directory!r}"
    if _fingerprint(state) != fingerprint:
        return None, (
            f"{os.path.join(directory, name)!r} holds other files than the chief's (this worker "
            "sees another run directory)"
        )
    return state, None


def resume(
    trainer: Trainer, run_dir: RunDir | None, strategy: tf.distribute.Strategy
) -> dict[str, Any] | None:
    """The checkpoint's state to resume from (None: from the start), loaded into `trainer`.

    Raises:
        RunDirError: as `_agreed_resume_state`, or the checkpoint was made with another config.
    """
    state = _agreed_resume_state(trainer.checkpointer, run_dir, strategy)
    if state is None:
        return None
    differences = config_differences(state.get("config", {}), trainer.config)
    if differences:
        raise RunDirError(
            f"Cannot resume {run_dir.path!r}: its checkpoint was made with a different "
            f"config. Keys that differ: {differences}. Resume with the original settings, or "
            "start a new run with --overwrite or another --output-dir."
        )
    done_epochs = int(state["global_epoch"])
    # Steps into the next epoch: a checkpoint written on a preemption notice.
    done_step = int(state.get("step", 0))
    trainer.position = (done_epochs, done_step)
    trainer.history = list(state["history"])
    trainer.best = dict(state.get("best") or {})
    trainer.stages = dict(state.get("stages") or {})
    # The checkpoint's history is the truth: a kill between a checkpoint and the
    # history.csv write after it left the file an epoch short.
    trainer.write_history()
    log.info(
        "Resuming after epoch %d%s (stage %r).",
        done_epochs,
        f" and {done_step} steps of the next" if done_step else "",
        state["stage"],
    )
    return state
