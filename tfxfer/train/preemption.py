"""Preemption notices: SIGTERM (a spot VM's or Slurm's) and Ctrl-C (SIGINT) answered with a
checkpoint and a stop.

A single-process run listens while it trains: the step in flight finishes, a mid-epoch
checkpoint is written, and `Preempted` is raised (see `tfxfer.train.run`). A second Ctrl-C
before that stops at once, as Ctrl-C always did (`KeyboardInterrupt`; the command line still
ends it in one line, exit status 130).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable

import keras
import tensorflow as tf

from tfxfer.train.context import StageRun

log = logging.getLogger(__name__)


class PreemptionNotice:
    """Whether a notice (SIGTERM or SIGINT) has arrived, and which. Only the signal handler
    sets it.

    Python runs a signal handler in the main thread between any two bytecodes, in the middle
    of a checkpoint write as readily as anywhere; so the handler only sets this flag, and
    `StopOnPreemption` reads it where a step has ended.
    """

    received = False
    signum: int = signal.SIGTERM
    # A multi-worker run's agreement (`any_worker`): set, `stop()` asks every worker.
    agree: Callable[[bool], bool] | None = None

    def stop(self) -> bool:
        """Whether to stop after this step: this process's notice, or in a multi-worker run
        any worker's. There it is a collective: every worker must call it at the same step
        (the callbacks do, between steps), and all get the same answer."""
        if self.agree is None:
            return self.received
        return self.agree(self.received)

    def barrier(self) -> None:
        """In a multi-worker run, waits until every worker gets here (the chief's checkpoint
        is written before any worker leaves); elsewhere returns at once."""
        if self.agree is not None:
            self.agree(False)


def any_worker(strategy: tf.distribute.Strategy) -> Callable[[bool], bool]:
    """`flag -> whether any worker's flag is set`: an all-reduce over every replica of a
    multi-worker strategy, traced once."""

    @tf.function
    def total(flag):
        per_replica = strategy.run(lambda: tf.identity(flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return lambda flag: bool(total(tf.constant(1.0 if flag else 0.0, tf.float32)) > 0)


@contextlib.contextmanager
def preemption_notice(listen: bool, strategy: tf.distribute.Strategy | None = None):
    """Yields a `PreemptionNotice` that SIGTERM sets while the block runs (when `listen`).

    With `strategy` a multi-worker strategy of several workers, the notice is agreed among
    them (`PreemptionNotice.stop`): a notice to one worker stops all after the same step.
    The previous SIGTERM handler is back when the block ends, however it ends: after
    training, a SIGTERM ends the process as it did before.
    """
    notice = PreemptionNotice()
    if listen and strategy is not None and not answers_preemption(strategy):
        notice.agree = any_worker(strategy)
    # Handlers can only be set from the main thread; elsewhere SIGTERM keeps its action.
    if not listen or threading.current_thread() is not threading.main_thread():
        yield notice
        return

    def on_notice(signum, frame):
        if notice.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        notice.received, notice.signum = True, signum

    previous = {
        signum: signal.signal(signum, on_notice) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield notice
    finally:
        # None is a handler set outside Python, which cannot be put back; the default action
        # is what it most likely did.
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def answers_preemption(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process runs every replica of `strategy` (one device, GPUs, a TPU host).

    Such a run stops on its own preemption notice. The workers of a multi-worker run must
    all stop after the same step (a worker that stopped alone would leave the others
    waiting in a collective), so there every worker listens and they agree between steps
    (`preemption_notice(listen, strategy)`, one small all-reduce a step).
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return len(cluster.get("chief", [])) + len(cluster.get("worker", [])) <= 1


class StopOnPreemption(keras.callbacks.Callback):
    """On a preemption notice: a checkpoint after the step in flight, then `Preempted`.

    Between two steps the weights and the optimizer state are those of a finished step, and
    the data can restart at the next batch (`TrainData.build(epoch, step)`), so a checkpoint
    there loses no work. It raises rather than setting `model.stop_training`: `fit` would
    then still validate and call every callback's `on_epoch_end` for part of an epoch (a
    history row, an epoch checkpoint, a user's EarlyStopping acting on it), and a notice
    period is short. A notice in an epoch's last step or its validation lets the epoch end
    as usual: its own checkpoint is the one to resume from.

    Args:
        stage_run: StageRun. The stage being trained: its trainer writes the checkpoint
            (`checkpoint`, `preempted`) of the whole model.
        notice: PreemptionNotice. Set when SIGTERM or SIGINT arrived.
        first_epoch: int. The fit's first epoch (from 0).
        first_step: int. Steps of `first_epoch` done before this fit began (a resume from a
            mid-epoch checkpoint).
    """

    def __init__(
        self,
        stage_run: StageRun,
        notice: PreemptionNotice,
        first_epoch: int,
        first_step: int,
    ):
        super().__init__()
        self.whole_model = stage_run.run.model
        self.trainer = stage_run.trainer
        self.stage_index = stage_run.index
        self.stage = stage_run.stage
        self.steps_per_epoch = stage_run.run.steps_per_epoch
        self.notice = notice
        self.first_epoch = first_epoch
        self.first_step = first_step
        self.epoch = first_epoch
        self.steps_before = first_step

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.steps_before = self.first_step if epoch == self.first_epoch else 0

    def on_train_batch_end(self, batch, logs=None):
        step = self.steps_before + batch + 1
        # (`stop()` is a collective in a multi-worker run: every worker reaches this line
        # at the same steps.)
        if step >= self.steps_per_epoch or not self.notice.stop():
            return
        log.info(
            "%s: writing a checkpoint, then stopping.",
            "Ctrl-C" if self.notice.signum == signal.SIGINT else "Preemption notice (SIGTERM)",
        )
        self.trainer.checkpoint(self.whole_model, self.stage_index, self.stage, self.epoch, step)
        self.notice.barrier()
        raise self.trainer.preempted(self.steps_per_epoch, self.notice.signum)

    def on_epoch_end(self, epoch, logs=None):
        # `_EpochEnd` ran first: this epoch's checkpoint is written (and, in a multi-worker
        # run, `stop()` keeps every worker here until the chief has written it).
        if self.notice.stop():
            raise self.trainer.preempted(self.steps_per_epoch, self.notice.signum)
