"""Kill-and-resume with real processes: a run SIGKILLed at any point ends where it would have.

`test_rundir.py` interrupts `fit` with an exception inside the test process; here a child
process (`schedule_worker.py`, a real two-stage tfxfer run) is killed with SIGKILL, which
leaves no chance to flush or clean up, and then the same command is started again with
`--resume`. The child stops itself at an exact point and waits to be killed, and the test
kills it once that point's marker and the checkpoint it expects are both there: the moment
is certain and nothing sleeps. Every child has a deadline and is killed when a test fails.

The schedule: stage "head" (epochs 1-2, backbone frozen) then stage "finetune" (epochs 3-5,
every group, layer-wise learning rates), 6 steps per epoch.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import multiworker_helpers as mh
import numpy as np
import pytest
import schedule_worker as sw
from helpers import (
    InterruptAfterEpoch,
    snapshot_files,
    tiny_arrays,
    tiny_backbone,
    tiny_train_data,
)

import tfxfer
from tfxfer import fs
from tfxfer.rundir import RunDir
from tfxfer.train.checkpoints import KEEP_CHECKPOINTS

# Real processes killed with SIGKILL and restarted: one kill point in the default tier, the
# rest in the large one.
TIMEOUT = 150.0  # per child; a healthy one takes ~10 s on two busy cores
STAGES = ["head", "head", "finetune", "finetune", "finetune"]


def _run(command: list[str], log_dir: Path, *, kill_when=None) -> mh.WorkerResult:
    return mh.run_processes(
        [command], [mh.child_env()], log_dir=log_dir, timeout=TIMEOUT, kill_when=kill_when
    )[0]


def _blocked_at(run_dir: Path, checkpoint: str | None):
    """Kill condition: the child says it stopped, and `latest.json` is where it should be."""
    return lambda outputs: (
        "[worker] BLOCKED" in outputs[0] and sw.latest_checkpoint(run_dir) == checkpoint
    )


def _assert_history(history: list[dict], reference: list[dict]) -> None:
    """One row per epoch, in order, with the right stage, as an uninterrupted run logged.

    `history` may come from history.csv, whose values are strings.
    """
    assert [int(row["epoch"]) for row in history] == [1, 2, 3, 4, 5]
    assert [row["stage"] for row in history] == STAGES
    assert [int(row["stage_epoch"]) for row in history] == [1, 2, 1, 2, 3]
    for row, want in zip(history, reference, strict=True):
        assert sorted(row) == sorted(want)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            assert float(row[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), (
                row["epoch"],
                key,
            )


def _assert_same_weights(weights: list[np.ndarray], reference: list[np.ndarray]) -> None:
    assert len(weights) == len(reference)
    for i, (value, want) in enumerate(zip(weights, reference, strict=True)):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5, err_msg=f"weight {i}")


def _assert_same_metrics(metrics: dict, reference: dict) -> None:
    """The evaluation `finish_run` wrote: the same predictions, so the same numbers."""
    assert metrics["confusion_matrix"] == reference["confusion_matrix"]
    assert metrics["num_examples"] == reference["num_examples"]
    for key in ("loss", "accuracy", "macro_f1"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-5), key


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_reference) -> dict:
    """The same command, never killed (conftest.py's one reference run, read-only)."""
    assert uninterrupted_reference["summary"]["resumed_from_epoch"] == 0
    return uninterrupted_reference


def test_the_uninterrupted_run_trained_both_stages(uninterrupted):
    history = uninterrupted["summary"]["history"]
    assert [row["stage"] for row in history] == STAGES
    assert [row["stage"] for row in sw.read_history_csv(uninterrupted["run_dir"])] == STAGES
    # Learning happened in both stages, and each stage's schedule decayed to zero.
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)
    assert history[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)
    assert uninterrupted["summary"]["metrics"]["val"]["num_examples"] == 32


# kill point -> (how the child stops, the checkpoint latest.json names then, history.csv rows)
KILL_POINTS = {
    "mid_head": (["--block-at", "2:3"], "epoch-000001", 1),
    "mid_finetune": (["--block-at", "4:3"], "epoch-000003", 3),
    "while_writing_a_checkpoint": (["--block-in-save", "4"], "epoch-000003", 3),
    "after_the_last_checkpoint": (["--block-before-history", "5"], "epoch-000005", 4),
}


# One kill point in the default tier; the remaining ones in the large tier.
DEFAULT_TIER_KILL_POINT = "mid_finetune"


@pytest.mark.parametrize(
    "kill_point",
    [
        pytest.param(k, marks=() if k == DEFAULT_TIER_KILL_POINT else pytest.mark.large)
        for k in KILL_POINTS
    ],
)
def test_sigkill_then_resume_ends_where_an_uninterrupted_run_ends(
    tmp_path, uninterrupted, kill_point
):
    block, checkpoint, rows = KILL_POINTS[kill_point]
    run_dir = tmp_path / "run"
    killed = _run(
        sw.command(run_dir, tmp_path / "killed", *block),
        tmp_path / "logs1",
        kill_when=_blocked_at(run_dir, checkpoint),
    )
    assert killed.killed_by == "condition" and killed.returncode == -9, mh.describe_results(
        [killed]
    )
    assert "TFXFER_DONE" not in killed.output
    assert sw.latest_checkpoint(run_dir) == checkpoint
    assert len(sw.read_history_csv(run_dir)) == rows
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.keras").exists()
    if kill_point == "while_writing_a_checkpoint":
        # A complete-looking checkpoint that was never renamed into place must not win.
        leftover = run_dir / "checkpoints" / ".tmp-epoch-000004"
        assert sorted(p.name for p in leftover.iterdir()) == [
            "model.npz",
            "optimizer.npz",
            "state.json",
        ]
        assert json.loads((leftover / "state.json").read_text())["global_epoch"] == 4

    # A fresh process with a different initialisation: only the checkpoint can bring it back.
    resumed = _run(
        sw.command(run_dir, tmp_path / "resumed", "--resume", "--init-seed", "7"),
        tmp_path / "logs2",
    )
    assert resumed.ok, mh.describe_results([resumed])
    weights, summary = sw.load_result(tmp_path / "resumed")
    assert summary["resumed_from_epoch"] == int(checkpoint[-6:])
    _assert_same_weights(weights, uninterrupted["weights"])
    reference_history = uninterrupted["summary"]["history"]
    _assert_history(summary["history"], reference_history)
    _assert_history(sw.read_history_csv(run_dir), reference_history)
    _assert_same_metrics(summary["metrics"]["val"], uninterrupted["summary"]["metrics"]["val"])
    assert json.loads((run_dir / "metrics.json").read_text()) == summary["metrics"]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    kept = [f"epoch-{epoch:06d}" for epoch in range(1, 6)][-KEEP_CHECKPOINTS:]
    assert checkpoints == ["best.weights.h5", *kept, "latest.json"]


@pytest.mark.large  # over ~10 s on two cores
def test_resume_before_the_first_checkpoint_is_refused_clearly(tmp_path):
    run_dir = tmp_path / "run"
    killed = _run(
        sw.command(run_dir, tmp_path / "killed", "--block-at", "1:2"),
        tmp_path / "logs1",
        kill_when=_blocked_at(run_dir, None),
    )
    assert killed.killed_by == "condition", mh.describe_results([killed])
    assert (run_dir / "config.json").exists()  # the run had started
    before = snapshot_files(run_dir)

    refused = _run(sw.command(run_dir, tmp_path / "resumed", "--resume"), tmp_path / "logs2")
    assert refused.returncode == 2, mh.describe_results([refused])
    assert f"tfxfer: error: Cannot resume '{run_dir}': it has no complete checkpoint yet" in (
        refused.output
    )
    assert "--overwrite" in refused.output and "Traceback" not in refused.output
    assert snapshot_files(run_dir) == before


def test_resume_with_a_different_config_names_the_keys_that_differ(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["run_dir"], run_dir)
    before = snapshot_files(run_dir)
    refused = _run(
        sw.command(
            run_dir,
            tmp_path / "out",
            "--resume",
            "--learning-rate",
            "0.02",
            "--finetune-epochs",
            "4",
        ),
        tmp_path / "logs",
    )
    assert refused.returncode == 2, mh.describe_results([refused])
    assert (
        "its checkpoint was made with a different config. Keys that differ: "
        "['finetune_epochs', 'learning_rate']" in refused.output
    )
    assert "Traceback" not in refused.output
    assert snapshot_files(run_dir) == before


def test_dropout_masks_replay_after_resume(tmp_path):
    """Dropout draws from the model's seed-generator state, which is a model variable and so in
    every checkpoint: a resumed run draws the masks the uninterrupted one drew. (In process:
    this is about what a checkpoint holds, not about how the run died.)"""

    def run(path, seed, callbacks=None, resume=False):
        backbone = tiny_backbone(seed=seed)
        head = tfxfer.HeadConfig(hidden_units=[8], dropout=0.5)
        model = tfxfer.build_model(backbone, 3, head=head)
        images, labels = tiny_arrays(n=20)
        stages = [
            tfxfer.Stage("head", 2, learning_rate=1e-2),
            tfxfer.Stage("finetune", 2, train="all", learning_rate=5e-3),
        ]
        tfxfer.run_schedule(
            model,
            backbone,
            stages,
            tiny_train_data(images, labels, batch_size=6),
            None,
            run_dir=RunDir(str(path), resume=resume),
            config={},
            callbacks=callbacks,
            verbose=0,
        )
        return model

    straight = run(tmp_path / "straight", seed=0)
    assert any("seed_generator_state" in v.path for v in straight.variables)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", seed=0, callbacks=[InterruptAfterEpoch(3)])
    resumed = run(tmp_path / "killed", seed=5, resume=True)
    for value, want in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
    # The masks were real: two training-mode calls differ.
    images = tiny_arrays(n=4)[0]
    assert not np.allclose(straight(images, training=True), straight(images, training=True))


def test_a_url_output_dir_goes_through_gfile_not_the_local_disk(tmp_path, monkeypatch):
    # os.makedirs("gs://bucket/run") would make a local directory "gs:" and say nothing.
    monkeypatch.chdir(tmp_path)
    run_dir = RunDir("ram://resume-url-test/run")
    assert run_dir.path == "ram://resume-url-test/run"
    assert fs.isdir("ram://resume-url-test/run/checkpoints")
    assert list(tmp_path.iterdir()) == []


# === The recipe's command line ===


@pytest.mark.large  # two recipe processes
def test_the_image_recipe_resumes_from_the_command_line(tmp_path, shapes_dir):
    """The image recipe's command line (`python -m recipes.resnet50_image_classifier`, on the
    tiny row), SIGKILLed mid-fine-tuning, then the same command with `--resume`.

    The command line and its resume are the point, not the network (MobileNetV3 here spent
    its two processes' time tracing). The tiny row's epochs take a fraction of a second, so
    the child stops after the checkpoint of epoch 2 (the first fine-tuning epoch) and waits
    to be killed there (`multiworker_helpers._image_recipe`).
    """
    run_dir = tmp_path / "run"
    recipe_args = [
        "--data-dir",
        shapes_dir,
        "--output-dir",
        str(run_dir),
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
        "4",
        "--no-augment",
        "--no-export",
        "--strategy",
        "cpu",
        "--verbose",
        "2",
    ]
    program = [sys.executable, str(mh.THIS_FILE), "image_recipe"]
    command = [*program, "--block-after-checkpoint", "2", *recipe_args]
    mid_finetune = _blocked_at(run_dir, "epoch-000002")

    killed = _run(command, tmp_path / "logs1", kill_when=mid_finetune)
    assert killed.killed_by == "condition" and killed.returncode == -9, mh.describe_results(
        [killed]
    )
    done = int(sw.latest_checkpoint(run_dir)[-6:])
    assert done == 2, "killed after the first fine-tuning epoch"
    assert not (run_dir / "metrics.json").exists()

    resumed = _run([*program, *recipe_args, "--resume"], tmp_path / "logs2")
    assert resumed.ok, mh.describe_results([resumed])
    # It went on from the checkpoint, in the second stage, and did not start over.
    assert f"stage 2/2 'finetune': epochs {done + 1}-5" in resumed.output
    assert "stage 1/2" not in resumed.output
    rows = sw.read_history_csv(run_dir)
    assert [(int(r["epoch"]), r["stage"]) for r in rows] == [
        (1, "head"),
        (2, "finetune"),
        (3, "finetune"),
        (4, "finetune"),
        (5, "finetune"),
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val"]["num_examples"] == 3 and 0 <= metrics["val"]["accuracy"] <= 1
    assert (run_dir / "model.keras").exists()
    assert sw.latest_checkpoint(run_dir) == "epoch-000005"
