"""A real two-stage tfxfer schedule on two workers (MultiWorkerMirroredStrategy on 127.0.0.1).

Each worker is a process of its own running `schedule_worker.py` through `Distribution`,
`open_run`, `run_schedule` and `finish_run`, as a recipe would. The tests check that two
workers with a global batch of 16 (8 each) end with the weights, history and evaluation of
one process with a batch of 16; that only the chief writes the run directory; and that a
worker SIGKILLed mid-fine-tuning takes its peer down within a grace period (a stuck
collective must never hang CI) and that both, restarted with `--resume`, read the chief's
checkpoint and end where an uninterrupted run ends; and that SIGTERM to one worker stops
both after the same step, with a mid-epoch checkpoint to resume from. Every worker has a
deadline.
"""

from __future__ import annotations

import json
from pathlib import Path

import multiworker_helpers as mh
import numpy as np
import preemption_worker as pw
import pytest
import schedule_worker as sw

# Several worker processes per test.
pytestmark = pytest.mark.large  # every test here runs a cluster of processes

TIMEOUT = 150.0  # per launch; a healthy one takes ~20 s on two busy cores
GRACE = 10.0  # how long a worker may outlive its killed peer
STAGES = ["head", "head", "finetune", "finetune", "finetune"]
MULTI_WORKER = ["--strategy", "multi_worker", "--per-replica-batch", "8"]


def _run_workers(
    args: list[str], log_dir: Path, *, worker_args=None, kill_when=None, kill=None
) -> list[mh.WorkerResult]:
    return mh.run_workers(
        sw.THIS_FILE,
        args,
        num_workers=2,
        log_dir=log_dir,
        timeout=TIMEOUT,
        worker_args=worker_args,
        kill_when=kill_when,
        kill=kill,
        grace=GRACE,
    )


def _audit_lines(result: mh.WorkerResult) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("[audit]")]


def _assert_like_reference(out: Path, reference: dict, cut_epoch: int | None = None) -> None:
    """Both workers: identical weights, equal to one process's; same history and evaluation.

    `cut_epoch`: an epoch resumed part-way, whose training loss and accuracy cover only the
    batches after the resume (the validation metrics still cover all)."""
    (w0, s0), (w1, s1) = sw.load_result(out, 0), sw.load_result(out, 1)
    for i, (a, b) in enumerate(zip(w0, w1, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"weight {i} differs between the workers")
    assert len(w0) == len(reference["weights"])
    for i, (value, want) in enumerate(zip(w0, reference["weights"], strict=True)):
        # Only the order of float32 sums differs between two workers and one process.
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5, err_msg=f"weight {i}")
    for index, summary in enumerate((s0, s1)):
        assert summary["distribution"]["strategy"] == "MultiWorkerMirroredStrategy"
        assert summary["distribution"]["num_replicas"] == 2
        assert summary["distribution"]["global_batch_size"] == 16
        assert summary["distribution"]["is_chief"] == (index == 0)
        history = summary["history"]
        assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
        assert [row["stage"] for row in history] == STAGES
        for row, want in zip(history, reference["summary"]["history"], strict=True):
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
                if row["epoch"] == cut_epoch and key in ("loss", "accuracy"):
                    continue
                assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (index, key)
        # finish_run evaluates on every worker (each on the whole validation set).
        metrics, want = summary["metrics"]["val"], reference["summary"]["metrics"]["val"]
        assert metrics["num_examples"] == want["num_examples"] == 32
        assert metrics["confusion_matrix"] == want["confusion_matrix"]
        assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def reference(uninterrupted_reference) -> dict:
    """One process, one replica, batch 16: what two workers with 8 each must reproduce.

    conftest.py's one reference run (`schedule_worker.py`'s defaults: `--strategy cpu
    --per-replica-batch 16`), read-only.
    """
    summary = uninterrupted_reference["summary"]
    assert summary["distribution"]["global_batch_size"] == 16
    return uninterrupted_reference


def test_two_workers_train_like_one_process_and_only_the_chief_writes(tmp_path, reference):
    # Each worker gets a directory of its own: the non-chief's must never come to exist.
    run_dirs = [tmp_path / "run", tmp_path / "run-of-worker1"]
    results = _run_workers(
        [*MULTI_WORKER, "--out", str(tmp_path / "out")],
        tmp_path / "logs",
        worker_args=lambda i: ["--run-dir", str(run_dirs[i])],
    )
    assert all(r.ok for r in results), mh.describe_results(results)
    _assert_like_reference(tmp_path / "out", reference)

    assert not run_dirs[1].exists()
    assert _audit_lines(results[1]) == []
    assert _audit_lines(results[0])  # the audit sees the chief's writes
    for name in (
        "config.json",
        "history.csv",
        "metrics.json",
        "model.keras",
        "checkpoints/latest.json",
        "checkpoints/best.weights.h5",
    ):
        assert (run_dirs[0] / name).exists(), name
    config = json.loads((run_dirs[0] / "config.json").read_text())
    assert config["distribution"]["worker_count"] == 2
    assert sw.latest_checkpoint(run_dirs[0]) == "epoch-000005"


def test_a_killed_worker_takes_its_peer_down_and_both_resume(tmp_path, reference):
    # One shared run directory, as on a cluster's shared filesystem.
    run_dir = tmp_path / "run"
    args = [*MULTI_WORKER, "--run-dir", str(run_dir)]

    def worker1_stopped_mid_finetune(outputs: list[str]) -> bool:
        return "[worker] BLOCKED" in outputs[1] and sw.latest_checkpoint(run_dir) == "epoch-000003"

    # Worker 1 stops after batch 3 of epoch 4 and is killed there; the chief is then stuck in
    # the next step's all-reduce until it fails or the helpers kill it after GRACE seconds.
    killed = _run_workers(
        [*args, "--out", str(tmp_path / "killed")],
        tmp_path / "logs1",
        worker_args=lambda i: ["--block-at", "4:3"] if i == 1 else [],
        kill_when=worker1_stopped_mid_finetune,
        kill=[1],
    )
    assert killed[1].killed_by == "condition" and killed[1].returncode == -9, mh.describe_results(
        killed
    )
    assert not killed[0].ok and "TFXFER_DONE" not in killed[0].output, mh.describe_results(killed)
    assert killed[0].killed_by in (None, "peer_failed")  # failed by itself, or was killed
    assert sw.latest_checkpoint(run_dir) == "epoch-000003"
    assert not (run_dir / "metrics.json").exists()

    # Both restart; each reads the chief's checkpoint from the shared directory.
    resumed = _run_workers(
        [*args, "--out", str(tmp_path / "resumed"), "--resume", "--init-seed", "7"],
        tmp_path / "logs2",
    )
    assert all(r.ok for r in resumed), mh.describe_results(resumed)
    for worker in (0, 1):
        assert sw.load_result(tmp_path / "resumed", worker)[1]["resumed_from_epoch"] == 3
    _assert_like_reference(tmp_path / "resumed", reference)
    rows = sw.read_history_csv(run_dir)
    assert [(int(r["epoch"]), r["stage"]) for r in rows] == list(enumerate(STAGES, start=1))
    assert sw.latest_checkpoint(run_dir) == "epoch-000005"

    # Only the chief wrote, before the kill and after the restart.
    assert _audit_lines(killed[1]) == [] and _audit_lines(resumed[1]) == []
    assert any("checkpoints/epoch-000005" in line for line in _audit_lines(resumed[0]))


def test_a_sigterm_to_one_worker_stops_both_after_the_same_step_and_both_resume(
    tmp_path, reference
):
    """A preemption notice to one worker: both finish the same step, the chief writes the
    mid-epoch checkpoint, both stop in one line (status 143), and a resume of both ends where
    an uninterrupted run ends."""
    run_dir = tmp_path / "run"
    args = [*MULTI_WORKER, "--run-dir", str(run_dir)]
    # Behind the command line's error boundary, as a recipe is: one line, status 143.
    stopped = mh.run_workers(
        pw.THIS_FILE,
        [*args, "--out", str(tmp_path / "stopped")],
        num_workers=2,
        log_dir=tmp_path / "logs1",
        timeout=TIMEOUT,
        worker_args=lambda i: ["--sigterm-at", "4:2"] if i == 1 else [],
        grace=GRACE,
    )
    assert [r.returncode for r in stopped] == [143, 143], mh.describe_results(stopped)
    assert all(r.killed_by is None for r in stopped), mh.describe_results(stopped)
    latest = sw.latest_checkpoint(run_dir)
    # The step the notice came in (or the next, had it come between two steps' checks).
    assert latest in ("epoch-000003-step-000002", "epoch-000003-step-000003"), latest
    for result in stopped:
        lines = [line for line in result.output.splitlines() if line.startswith("tfxfer:")]
        assert lines == [
            f"tfxfer: preempted: checkpoint written after epoch 4 step {latest[-1]}; "
            "rerun with --resume to continue"
        ], mh.describe_results(stopped)
        assert "TFXFER_DONE" not in result.output
    assert not (run_dir / "metrics.json").exists()
    assert _audit_lines(stopped[1]) == []  # the worker that got the notice wrote nothing

    resumed = _run_workers(
        [*args, "--out", str(tmp_path / "resumed"), "--resume", "--init-seed", "7"],
        tmp_path / "logs2",
    )
    assert all(r.ok for r in resumed), mh.describe_results(resumed)
    for worker in (0, 1):
        summary = sw.load_result(tmp_path / "resumed", worker)[1]
        assert (summary["resumed_from_epoch"], summary["resumed_from_step"]) == (
            3,
            int(latest[-1]),
        )
    _assert_like_reference(tmp_path / "resumed", reference, cut_epoch=4)


def test_the_image_recipe_trains_and_evaluates_on_two_workers(tmp_path, shapes_dir):
    """The recipe end to end on two workers sharing one output directory: the chief writes the
    run, both evaluate the final model on the whole validation split and agree.

    Its command line on the tiny row (`multiworker_helpers._image_recipe`): what is checked
    is the cluster, not the network. Every group fine-tunes, BatchNorm layers with them: each
    worker updated its own copy of their moving statistics until they were averaged at each
    epoch's end (on MobileNetV3, the workers' validation losses were 7.0035 and 7.0180).
    """
    run_dir = tmp_path / "run"
    args = [
        "image_recipe",
        "--data-dir",
        shapes_dir,
        "--output-dir",
        str(run_dir),
        "--strategy",
        "multi_worker",
        "--backbone",
        "tinynet",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--head-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--no-augment",
        "--no-export",
        "--verbose",
        "0",
    ]
    results = mh.run_workers(
        mh.THIS_FILE, args, num_workers=2, log_dir=tmp_path / "logs", timeout=TIMEOUT, grace=GRACE
    )
    assert all(r.ok for r in results), mh.describe_results(results)
    val_lines = [
        [line for line in r.output.splitlines() if line.startswith("[tfxfer] val:")]
        for r in results
    ]
    assert len(val_lines[0]) == 1 and val_lines[0] == val_lines[1]
    assert "run saved to" in results[0].output and "run saved to" not in results[1].output
    metrics = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert metrics["num_examples"] == 3  # the whole split, not one worker's shard
    assert f"n={metrics['num_examples']}" in val_lines[0][0]
    assert f"accuracy={metrics['accuracy']:.4f}" in val_lines[0][0]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distribution"]["num_replicas"] == 2
    assert config["distribution"]["global_batch_size"] == 8
    rows = sw.read_history_csv(run_dir)
    assert [(int(r["epoch"]), r["stage"]) for r in rows] == [(1, "head"), (2, "finetune")]


def _error_line(result: mh.WorkerResult) -> str:
    return next((line for line in result.output.splitlines() if "tfxfer: error:" in line), "")


def test_a_worker_that_cannot_see_the_chiefs_checkpoint_stops_the_cluster(tmp_path):
    """Resuming is the chief's decision. Worker 1 gets a directory of its own, as on machines
    without shared storage: it must not start afresh while the chief resumes (their
    all-reduces would mix two runs), but stop with an error that says what is needed."""
    from helpers import snapshot_files

    run_dirs = [tmp_path / "run", tmp_path / "run-of-worker1"]
    args = [*MULTI_WORKER, "--head-epochs", "1", "--finetune-epochs", "1"]
    first = _run_workers(
        [*args, "--out", str(tmp_path / "first")],
        tmp_path / "logs1",
        worker_args=lambda i: ["--run-dir", str(run_dirs[i])],
    )
    assert all(r.ok for r in first), mh.describe_results(first)
    assert sw.latest_checkpoint(run_dirs[0]) == "epoch-000002"
    before = snapshot_files(str(run_dirs[0]))

    resumed = _run_workers(
        [*args, "--out", str(tmp_path / "resumed"), "--resume"],
        tmp_path / "logs2",
        worker_args=lambda i: ["--run-dir", str(run_dirs[i])],
    )
    # Both stop by themselves, at once, with the error a user sees (exit status 2).
    assert [(r.returncode, r.killed_by) for r in resumed] == [(2, None), (2, None)], (
        mh.describe_results(resumed)
    )
    worker1 = _error_line(resumed[1])
    assert "Worker 1 cannot read the checkpoint epoch-000002 that the chief resumes from" in (
        worker1
    )
    assert str(run_dirs[1]) in worker1 and "must see the chief's run directory" in worker1
    chief = _error_line(resumed[0])
    assert "1 worker(s) cannot read the checkpoint epoch-000002" in chief
    assert "must see the chief's run directory" in chief
    assert not (tmp_path / "resumed").exists()
    assert not run_dirs[1].exists() and _audit_lines(resumed[1]) == []
    assert snapshot_files(str(run_dirs[0])) == before


def test_when_the_chief_cannot_resume_every_worker_stops(tmp_path):
    """A --resume of a run with no checkpoint yet: the chief's error, and worker 1 stops too
    rather than training alone until its first all-reduce times out."""
    from tfxfer.rundir import RunDir

    run_dir = tmp_path / "run"
    RunDir(str(run_dir))  # a run that stopped before its first checkpoint
    resumed = _run_workers(
        [*MULTI_WORKER, "--run-dir", str(run_dir), "--out", str(tmp_path / "out"), "--resume"],
        tmp_path / "logs",
    )
    assert [(r.returncode, r.killed_by) for r in resumed] == [(2, None), (2, None)], (
        mh.describe_results(resumed)
    )
    assert "has no complete checkpoint yet" in _error_line(resumed[0])
    assert "Worker 1 stops: the chief cannot resume the run" in _error_line(resumed[1])
    assert _audit_lines(resumed[1]) == []
