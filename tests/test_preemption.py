"""Graceful preemption: on SIGTERM a run finishes its step, checkpoints it, and stops.

Spot VMs and Slurm give notice with SIGTERM before they take a machine away. A run then
writes a mid-epoch checkpoint (`epoch-EEEEEE-step-SSSSSS`) after the step in flight, exits
with status 143 and one line, and `--resume` goes on at the next batch: the final weights are
those of a run that was never stopped, and at most the step in flight when the notice came
is done after it. SIGKILL cannot be answered; a run killed that way resumes from its last
verified checkpoint, and the soak test SIGKILLs one three times over (and SIGTERMs it once).

The children are `preemption_worker.py` (`schedule_worker.py` behind the command line's error
boundary): stage "head" (epochs 1-2) then "finetune" (epochs 3-5), 6 steps per epoch. They
send themselves SIGTERM after a chosen batch, or stop there and wait for the test's SIGKILL;
every point is drawn from a fixed seed, so a failure replays.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import keras
import multiworker_helpers as mh
import numpy as np
import preemption_worker as pw
import pytest
import schedule_worker as sw
import tensorflow as tf
from helpers import tiny_arrays, tiny_model, tiny_train_data, tiny_val_data

import tfxfer
from tfxfer.cli import error_boundary
from tfxfer.data.pipeline import TrainData, epoch_batches
from tfxfer.errors import Preempted, RunDirError
from tfxfer.rundir import RunDir
from tfxfer.train.checkpoints import CHECKPOINT_NAME, Checkpointer, checkpoint_name

# Real processes stopped with SIGTERM and SIGKILL, and restarted (the soak and one SIGTERM
# case in the large tier).

TIMEOUT = 150.0  # per child; a healthy one takes ~4 s
STEPS = 6  # 96 examples, global batch 16
EPOCHS = 5
TOTAL_STEPS = STEPS * EPOCHS
STAGES = ["head", "head", "finetune", "finetune", "finetune"]
SIGTERM_SEED = 8
# Three kills and a SIGTERM (five processes with the last resume; six kills were eight): seed
# 30 gives every kind of stop (asserted), whichever of its two neighbouring steps the SIGTERM
# stops after, and both kills after the SIGTERM resume from its mid-epoch checkpoint.
SOAK_SEED = 30
SOAK_KILLS = 3


def _run(command: list[str], log_dir: Path, *, kill_when=None) -> mh.WorkerResult:
    return mh.run_processes(
        [command], [mh.child_env()], log_dir=log_dir, timeout=TIMEOUT, kill_when=kill_when
    )[0]


def _position(run_dir: Path) -> tuple[int, int] | None:
    """(global epoch, step) of the checkpoint `latest.json` names, or None before the first."""
    name = sw.latest_checkpoint(run_dir)
    if name is None:
        return None
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)), int(match.group(2) or 0)


def _at(step: int, resumed: tuple[int, int] | None) -> str:
    """The worker's `E:B` for global step `step` (from 1), in a run resumed at `resumed`.

    The worker counts the batches it ran itself: in the epoch it resumed part-way into,
    its batch B is step S + B of that epoch.
    """
    epoch, batch = (step - 1) // STEPS + 1, (step - 1) % STEPS + 1
    if resumed is not None and resumed[1] and epoch == resumed[0] + 1:
        batch -= resumed[1]
    return f"{epoch}:{batch}"


def _max_difference(weights: list[np.ndarray], reference: list[np.ndarray]) -> float:
    assert len(weights) == len(reference)
    return max(float(np.max(np.abs(w - r))) for w, r in zip(weights, reference, strict=True))


def _assert_history(history: list[dict], reference: list[dict], partial: int | None) -> None:
    """One row per epoch with the right stage; every number as uninterrupted, except the
    training metrics of epoch `partial` (from 1), which cover only the steps after a resume."""
    assert [int(row["epoch"]) for row in history] == list(range(1, EPOCHS + 1))
    assert [row["stage"] for row in history] == STAGES
    assert [int(row["stage_epoch"]) for row in history] == [1, 2, 1, 2, 3]
    for row, want in zip(history, reference, strict=True):
        keys = ["val_loss", "val_accuracy", "learning_rate"]
        keys += ["loss", "accuracy"] if int(row["epoch"]) != partial else []
        for key in keys:
            assert float(row[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), (
                row["epoch"],
                key,
            )


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_reference) -> dict:
    """The same command, never stopped: conftest.py's one reference run (`schedule_worker.py`
    outside the error boundary, which changes only how an error ends the process)."""
    assert [row["stage"] for row in uninterrupted_reference["summary"]["history"]] == STAGES
    return uninterrupted_reference


# === SIGTERM, then --resume ===


def _sigterm_steps() -> dict[str, int]:
    """Global steps (from 1) to send SIGTERM after, drawn from `SIGTERM_SEED`."""
    rng = np.random.default_rng(SIGTERM_SEED)
    # (A notice in a stage's first epoch is tested in process, below.)
    return {
        "anywhere": int(rng.integers(1, TOTAL_STEPS + 1)),
        # The epoch ends as usual; its own checkpoint is the one to resume from.
        "last_step_of_an_epoch": STEPS * int(rng.integers(1, EPOCHS)),
    }


SIGTERM_STEPS = _sigterm_steps()


# Every case in the large tier (subprocess runs of ~12 s each). Ctrl-C (SIGINT) is answered
# as SIGTERM is, with its own exit status and word.
@pytest.mark.parametrize(
    ("case", "sent_signal"),
    [pytest.param(c, "SIGTERM", marks=pytest.mark.large) for c in SIGTERM_STEPS]
    + [pytest.param("anywhere", "SIGINT", marks=pytest.mark.large, id="anywhere-ctrl-c")],
)
def test_sigterm_checkpoints_the_step_and_resume_ends_as_uninterrupted(
    tmp_path, uninterrupted, case, sent_signal
):
    sent = SIGTERM_STEPS[case]
    run_dir = tmp_path / "run"
    stopped = _run(
        pw.command(
            run_dir,
            tmp_path / "stopped",
            "--sigterm-at",
            _at(sent, None),
            "--sigterm-signal",
            sent_signal,
        ),
        tmp_path / "logs1",
    )
    status, word = (130, "interrupted") if sent_signal == "SIGINT" else (143, "preempted")
    assert stopped.returncode == status and stopped.killed_by is None, mh.describe_results(
        [stopped]
    )
    assert "Traceback" not in stopped.output and "TFXFER_DONE" not in stopped.output

    # At most the step in flight was done after the notice, and it is in the checkpoint.
    epoch, step = _position(run_dir)
    saved = epoch * STEPS + step
    assert saved - sent in (0, 1), (sent, epoch, step)
    name = checkpoint_name(epoch, step)
    state = json.loads((run_dir / "checkpoints" / name / "state.json").read_text())
    assert (state["global_epoch"], state["step"]) == (epoch, step)
    assert state["stage"] == STAGES[epoch if step else epoch - 1]
    shown = (epoch + 1, step) if step else (epoch, STEPS)
    assert [line for line in stopped.output.splitlines() if line.startswith("tfxfer:")] == [
        f"tfxfer: {word}: checkpoint written after epoch {shown[0]} step {shown[1]}; "
        "rerun with --resume to continue"
    ]
    # Nothing after training ran; the history ends at the last whole epoch.
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.keras").exists()
    assert len(sw.read_history_csv(run_dir)) == epoch == len(state["history"])
    # The checkpoint before it stays: the epoch's start (or the epoch before's end).
    before = epoch if step else epoch - 1
    kept = [checkpoint_name(before), name] if before >= 1 else [name]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*")) == kept

    # A fresh process with another initialisation: only the checkpoint can bring it back.
    resumed = _run(
        pw.command(run_dir, tmp_path / "resumed", "--resume", "--init-seed", "7"),
        tmp_path / "logs2",
    )
    assert resumed.ok, mh.describe_results([resumed])
    weights, summary = sw.load_result(tmp_path / "resumed")
    assert (summary["resumed_from_epoch"], summary["resumed_from_step"]) == (epoch, step)
    difference = _max_difference(weights, uninterrupted["weights"])
    print(f"SIGTERM after step {sent}: checkpoint {name}; max |dw| = {difference}")
    assert difference <= 1e-5
    reference = uninterrupted["summary"]
    partial = epoch + 1 if step else None
    _assert_history(summary["history"], reference["history"], partial)
    _assert_history(sw.read_history_csv(run_dir), reference["history"], partial)
    metrics, want = summary["metrics"]["val"], reference["metrics"]["val"]
    assert metrics["confusion_matrix"] == want["confusion_matrix"]
    assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.weights.h5",
        "epoch-000004",
        "epoch-000005",
        "latest.json",
    ]


# === Soak: SIGKILL three times (and SIGTERM once) at seeded moments ===


def _soak_plan(rng: np.random.Generator, position: tuple[int, int] | None) -> tuple[str, str]:
    """(flag, value) of the next stop: a few steps past `position` (the checkpoint the run
    resumes from), so that the run moves on but a stop is always left to make."""
    done = 0 if position is None else position[0] * STEPS + position[1]
    # The first checkpoint must exist before the first kill, or there is nothing to resume.
    lowest = done + 1 if position is not None else STEPS + 1
    step = min(lowest + int(rng.integers(0, 4)), TOTAL_STEPS)
    epoch = (step - 1) // STEPS + 1
    kind = str(rng.choice(["block_at", "block_in_save", "block_before_history"]))
    if kind == "block_in_save" and epoch >= 2:
        return "--block-in-save", str(epoch)  # killed half-way through epoch's checkpoint
    if kind == "block_before_history" and epoch < EPOCHS:  # (after the last: nothing left)
        return "--block-before-history", str(epoch)
    return "--block-at", _at(step, position)


def _expected_after_kill(flag: str, value: str, position: tuple[int, int] | None):
    """The checkpoint a kill at (flag, value) leaves `latest.json` naming."""
    if flag == "--block-before-history":
        return int(value), 0
    epoch = int(value) if flag == "--block-in-save" else int(value.split(":")[0])
    if position is not None and position[0] >= epoch - 1:
        return position  # No epoch ended since the checkpoint resumed from.
    return epoch - 1, 0


@pytest.mark.large  # seven processes in a row
def test_soak_sigkill_three_times_then_resume_ends_as_uninterrupted(tmp_path, uninterrupted):
    rng = np.random.default_rng(SOAK_SEED)
    run_dir = tmp_path / "run"
    # One SIGTERM among the kills: the kills after it resume from a mid-epoch checkpoint.
    sigterm_before = int(rng.integers(1, SOAK_KILLS))
    position: tuple[int, int] | None = None
    stops = []
    for cycle in range(SOAK_KILLS + 1):
        resume = ["--resume"] if position is not None else []
        seed = ["--init-seed", str(cycle)]  # Each process initialises the model differently.
        out, logs = tmp_path / f"out{cycle}", tmp_path / f"logs{cycle}"
        if cycle == sigterm_before:
            # Before the last step: the run must not end, so that the kills after it can come.
            step = position[0] * STEPS + position[1] + int(rng.integers(1, STEPS))
            step = min(step, TOTAL_STEPS - 1)
            at = _at(step, position)
            result = _run(pw.command(run_dir, out, *resume, *seed, "--sigterm-at", at), logs)
            assert result.returncode == 143, mh.describe_results([result])
            new = _position(run_dir)
            assert new[0] * STEPS + new[1] - step in (0, 1)
            stops.append(("SIGTERM", at, new))
            position = new
            continue
        flag, value = _soak_plan(rng, position)
        expected = _expected_after_kill(flag, value, position)
        killed = _run(
            pw.command(run_dir, out, *resume, *seed, flag, value),
            logs,
            kill_when=lambda outputs, e=expected: (
                "[worker] BLOCKED" in outputs[0] and _position(run_dir) == e
            ),
        )
        assert killed.killed_by == "condition" and killed.returncode == -9, (
            cycle,
            flag,
            value,
            mh.describe_results([killed]),
        )
        assert _position(run_dir) == expected
        stops.append((flag, value, expected))
        position = expected
    assert sum(flag.startswith("--") for flag, _, _ in stops) == SOAK_KILLS
    # The seed gives every kind of stop: a step, a checkpoint half-written, before history.
    assert {flag for flag, _, _ in stops} == {
        "SIGTERM",
        "--block-at",
        "--block-in-save",
        "--block-before-history",
    }, stops

    resumed = _run(pw.command(run_dir, tmp_path / "final", "--resume"), tmp_path / "final_logs")
    assert resumed.ok, (stops, mh.describe_results([resumed]))
    weights, summary = sw.load_result(tmp_path / "final")
    difference = _max_difference(weights, uninterrupted["weights"])
    print(f"soak stops (flag, value, checkpoint after): {stops}; max |dw| = {difference}")
    assert difference <= 1e-5, stops
    history = summary["history"]
    assert [int(row["epoch"]) for row in history] == list(range(1, EPOCHS + 1))
    assert [row["stage"] for row in history] == STAGES
    assert [row["stage"] for row in sw.read_history_csv(run_dir)] == STAGES
    for row, want in zip(history, uninterrupted["summary"]["history"], strict=True):
        assert row["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5), stops


# === In process: the pieces ===


def _labels(dataset: tf.data.Dataset, count: int) -> list[list[int]]:
    return [y.numpy().tolist() for _, y in dataset.take(count)]


def test_train_data_starts_at_any_step_of_any_epoch():
    x = np.arange(22, dtype="float32")
    examples = tf.data.Dataset.from_tensor_slices((x, np.arange(22)))
    data = epoch_batches(
        examples, num_examples=22, batch_size=4, seed=3, transform=lambda x, y: (x + 1, y)
    )
    assert data.steps_per_epoch == 5  # 22 // 4; the remainder is dropped
    stream = _labels(data.build(0), 25)
    # Each epoch draws 20 distinct examples, in another order than the epoch before.
    assert all(len(set(sum(stream[e : e + 5], []))) == 20 for e in (0, 5, 10))
    assert stream[:5] != stream[5:10]
    for epoch in range(3):
        for step in range(5):
            start = epoch * 5 + step
            assert _labels(data.build(epoch, step), 8) == stream[start : start + 8], (epoch, step)
    assert _labels(data.build(2), 3) == stream[10:13]  # build(start_epoch) as before
    with pytest.raises(ValueError, match=r"Expected `start_step` in \[0, 5\)"):
        data.build(1, 5)

    # A build that knows only epochs is wrapped to skip; one that knows steps is kept.
    epochs_only = TrainData(lambda start_epoch: data.build(start_epoch), 5)
    assert _labels(epochs_only.build(1, 3), 4) == stream[8:12]
    assert TrainData(data.build, 1).build is data.build


def test_checkpoint_names_sort_in_training_order(tmp_path):
    assert checkpoint_name(3) == "epoch-000003"
    assert checkpoint_name(3, 5) == "epoch-000003-step-000005"
    names = ["epoch-000004", "epoch-000003-step-000005", "epoch-000010", "epoch-000003"]
    names += ["epoch-000003-step-000012", "epoch-000001"]
    for name in [*names, ".tmp-epoch-000011", "epoch-3", "epoch-000003-step-5", "best.weights.h5"]:
        (tmp_path / name).mkdir()
    assert Checkpointer(str(tmp_path))._checkpoint_names() == [
        "epoch-000001",
        "epoch-000003",
        "epoch-000003-step-000005",
        "epoch-000003-step-000012",
        "epoch-000004",
        "epoch-000010",
    ]


def _tiny_dense() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_latest_is_the_newest_intact_checkpoint_mid_epoch_or_not(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    saver = Checkpointer(str(checkpoints))
    model = _tiny_dense()
    base = {"stage_index": 0, "stage": "head", "history": [], "config": {}}
    for epoch, step in [(1, 0), (1, 4), (2, 0), (2, 3)]:
        model.get_layer("dense").bias.assign([epoch, step])
        saver.save(model, {**base, "global_epoch": epoch, "step": step})
    # The newest and the one before it stay, whichever kind they are.
    assert sorted(p.name for p in checkpoints.glob("epoch-*")) == [
        "epoch-000002",
        "epoch-000002-step-000003",
    ]
    state = saver.latest()
    assert (state["global_epoch"], state["step"]) == (2, 3)

    # The mid-epoch checkpoint damaged: the epoch's end before it is the fallback.
    (checkpoints / "epoch-000002-step-000003" / "model.npz").write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="tfxfer.train"):
        state = saver.latest()
    assert (state["global_epoch"], state["step"]) == (2, 0)
    assert "Resuming from epoch-000002 (after epoch 2)" in caplog.text
    Checkpointer.restore(model, state, with_optimizer=True)
    np.testing.assert_array_equal(model.get_layer("dense").bias.numpy(), [2, 0])

    # A new mid-epoch checkpoint after that fallback replaces the damaged one.
    saver.save(model, {**base, "global_epoch": 2, "step": 3})
    assert saver.latest()["checkpoint_dir"].endswith("epoch-000002-step-000003")

    # A state.json that names another position than its directory is not intact.
    os.rename(checkpoints / "epoch-000002-step-000003", checkpoints / "epoch-000002-step-000004")
    (checkpoints / "latest.json").write_text('{"checkpoint": "epoch-000002-step-000004"}')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tfxfer.train"):
        assert saver.latest()["checkpoint_dir"].endswith("epoch-000002")
    assert "is for (epoch, step) (2, 3)" in caplog.text
    for name in ("epoch-000002", "epoch-000002-step-000004"):
        (checkpoints / name / "state.json").unlink()
    with pytest.raises(RunDirError, match="no checkpoint in it is intact"):
        saver.latest()


class _SigtermAt(keras.callbacks.Callback):
    """Sends this process SIGTERM (or `signum`, `times` times) after batch `batch` (from 1)
    of epoch `epoch` (from 1)."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGTERM, times: int = 1):
        super().__init__()
        self.target, self.epoch, self.handlers = (epoch, batch), 0, set()
        self.signum, self.times = signum, times

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        self.handlers.add(signal.getsignal(self.signum))
        if (self.epoch, batch + 1) == self.target:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def _run_in_process(run_dir: RunDir | None, seed: int, callbacks=()):
    backbone, model = tiny_model(seed=seed)
    images, labels = tiny_arrays(n=18)
    stages = [
        tfxfer.Stage("head", 1, learning_rate=1e-2),
        tfxfer.Stage("finetune", 2, train="all", learning_rate=5e-3),
    ]
    result = tfxfer.run_schedule(
        model,
        backbone,
        stages,
        tiny_train_data(images, labels, batch_size=6),
        tiny_val_data(images, labels),
        run_dir=run_dir,
        callbacks=list(callbacks),
        verbose=0,
    )
    return model, result


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers are only set from the main thread",
)
def test_in_process_sigterm_restores_the_handler_and_resumes_exactly(tmp_path):
    straight, _ = _run_in_process(RunDir(str(tmp_path / "straight")), seed=0)
    previous = signal.getsignal(signal.SIGTERM)

    # 3 steps per epoch; the finetune stage's first step: its optimizer state must come back
    # although the resumed epoch is the stage's first.
    notice = _SigtermAt(2, 1)
    with pytest.raises(Preempted) as raised:
        _run_in_process(RunDir(str(tmp_path / "run")), seed=0, callbacks=[notice])
    assert (raised.value.epoch, raised.value.step) == (2, 1)
    assert str(raised.value) == (
        "checkpoint written after epoch 2 step 1; rerun with --resume to continue"
    )
    assert raised.value.checkpoint == str(
        tmp_path / "run" / "checkpoints" / "epoch-000001-step-000001"
    )
    assert signal.getsignal(signal.SIGTERM) is previous
    assert previous not in notice.handlers  # tfxfer's handler was in place while training

    model, result = _run_in_process(RunDir(str(tmp_path / "run"), resume=True), seed=4)
    assert (result.resumed_from_epoch, result.resumed_from_step) == (1, 1)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    for value, want in zip(model.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_without_a_run_dir_sigterm_is_left_alone():
    # Nothing could be resumed: SIGTERM keeps its usual action (not sent here: it would end
    # the test process).
    watcher = _SigtermAt(99, 1)
    _run_in_process(None, seed=0, callbacks=[watcher])
    assert watcher.handlers == {signal.getsignal(signal.SIGTERM)}


def test_the_command_line_reports_a_preemption_in_one_line(capsys):
    def preempted():
        raise Preempted(4, 2, "run/checkpoints/epoch-000003-step-000002")

    assert error_boundary(preempted) == 143
    assert capsys.readouterr().err == (
        "tfxfer: preempted: checkpoint written after epoch 4 step 2; rerun with --resume to "
        "continue\n"
    )


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers are only set from the main thread",
)
def test_ctrl_c_checkpoints_like_sigterm_and_twice_stops_at_once(tmp_path, capsys):
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted) as raised:
        _run_in_process(
            RunDir(str(tmp_path / "run")), seed=0, callbacks=[_SigtermAt(2, 1, signal.SIGINT)]
        )
    assert (raised.value.epoch, raised.value.step, raised.value.signum) == (2, 1, signal.SIGINT)
    assert (tmp_path / "run" / "checkpoints" / "epoch-000001-step-000001").is_dir()
    assert signal.getsignal(signal.SIGINT) is previous

    def stopped():
        raise raised.value

    assert error_boundary(stopped) == 130
    assert capsys.readouterr().err == (
        "tfxfer: interrupted: checkpoint written after epoch 2 step 1; rerun with --resume to "
        "continue\n"
    )
    # A second Ctrl-C before the step ends: no checkpoint, KeyboardInterrupt as always.
    with pytest.raises(KeyboardInterrupt):
        _run_in_process(
            RunDir(str(tmp_path / "twice")),
            seed=0,
            callbacks=[_SigtermAt(2, 1, signal.SIGINT, times=2)],
        )
    assert not list((tmp_path / "twice" / "checkpoints").glob("epoch-000001-step-*"))
    assert signal.getsignal(signal.SIGINT) is previous


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert error_boundary(interrupted) == 130
    assert capsys.readouterr().err == (
        "tfxfer: interrupted (Ctrl-C); a run continues from its last checkpoint with --resume\n"
    )
