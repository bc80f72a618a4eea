"""The run directory and what training leaves in it: no lost runs, complete checkpoints, resume.

The trainer's checkpoint and resume tests live here because they are about the run directory's
promise: a run killed at any moment continues from its last complete checkpoint to the same
result as a run that was never killed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import (
    InterruptAfterEpoch,
    snapshot_files,
    tiny_arrays,
    tiny_model,
    tiny_train_data,
    tiny_two_stage_run,
)

import tfxfer
from tfxfer import rundir as rundir_module
from tfxfer.errors import RunDirError
from tfxfer.rundir import MANIFEST, RunDir, atomic_write_json, atomic_write_text
from tfxfer.train import checkpoints as checkpoints_module
from tfxfer.train.checkpoints import KEEP_CHECKPOINTS, Checkpointer

# === RunDir ===


def test_new_directory_is_created_with_checkpoints(tmp_path):
    run_dir = RunDir(str(tmp_path / "a" / "run"))
    assert os.path.isdir(run_dir.checkpoints) and not run_dir.resumed
    run_dir.write_json("config.json", {"x": 1})
    assert run_dir.read_json("config.json") == {"x": 1}
    # An empty existing directory holds no run, so it can be used as is.
    (tmp_path / "empty").mkdir()
    assert not RunDir(str(tmp_path / "empty")).resumed


def _earlier_run(path):
    os.makedirs(path)
    for name, text in [
        ("config.json", '{"seed": 1}'),
        ("history.csv", "epoch\n1\n"),
        ("notes.txt", "mine"),
    ]:
        with open(os.path.join(path, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    return snapshot_files(path)


def test_refuses_a_directory_that_holds_a_run_and_leaves_it_untouched(tmp_path):
    path = str(tmp_path / "run")
    before = _earlier_run(path)
    with pytest.raises(RunDirError) as info:
        RunDir(path)
    message = str(info.value)
    assert path in message and "--overwrite" in message and "--resume" in message
    assert "config.json" in message
    assert snapshot_files(path) == before
    assert not os.path.exists(os.path.join(path, "checkpoints"))


def test_overwrite_replaces_the_earlier_run(tmp_path):
    # What the earlier run wrote through the RunDir is in its manifest, so it is replaced.
    # (A run without a manifest, like `_earlier_run`'s, is refused: see test_user_files.py.)
    path = str(tmp_path / "run")
    earlier = RunDir(path)
    earlier.write_json("config.json", {"seed": 1})
    atomic_write_text(earlier.file("history.csv"), "epoch\n1\n")
    assert earlier.owned_entries() == ["checkpoints", "config.json", "history.csv"]
    run_dir = RunDir(path, overwrite=True)
    assert not run_dir.resumed
    assert sorted(os.listdir(path)) == [MANIFEST, "checkpoints"]
    assert run_dir.owned_entries() == ["checkpoints"]


@pytest.mark.parametrize("exists", [False, True], ids=["no-folder", "empty-folder"])
def test_resume_with_nothing_to_resume_says_so_and_starts_a_new_run(tmp_path, caplog, exists):
    path = tmp_path / "run"
    if exists:
        path.mkdir()
    with caplog.at_level("WARNING", logger="tfxfer.rundir"):
        run_dir = RunDir(str(path), resume=True)
    assert not run_dir.resumed
    assert "Nothing to resume in" in caplog.text
    assert ("no such directory" if not exists else "no run was saved in it") in caplog.text
    assert os.path.isdir(run_dir.checkpoints)


def test_resume_keeps_the_earlier_run(tmp_path):
    path = str(tmp_path / "run")
    before = _earlier_run(path)
    run_dir = RunDir(path, resume=True)
    assert run_dir.resumed
    # Only the manifest is new: it records the checkpoints/ folder this RunDir created.
    after = snapshot_files(path)
    assert {k: v for k, v in after.items() if k != MANIFEST} == before
    assert run_dir.owned_entries() == ["checkpoints"]


def test_bad_run_dir_arguments(tmp_path):
    with pytest.raises(RunDirError, match="either --overwrite or --resume"):
        RunDir(str(tmp_path / "run"), overwrite=True, resume=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        RunDir(str(a_file))


# === Atomic writes ===


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(str(path), {"old": True})
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rundir_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(str(path), "new")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.json"], "no temporary file left behind"


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "history.csv"
    atomic_write_text(str(path), "a\n")
    atomic_write_text(str(path), "b\n")
    assert path.read_text() == "b\n"
    assert os.listdir(path.parent) == ["history.csv"]


# === Checkpoints ===


def _state(epoch):
    return {
        "stage_index": 0,
        "stage": "head",
        "global_epoch": epoch,
        "history": [],
        "best": {},
        "config": {},
    }


def test_checkpointer_points_only_at_complete_checkpoints(tmp_path, monkeypatch):
    _, model = tiny_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    checkpointer = Checkpointer(str(tmp_path))
    assert checkpointer.latest() is None
    for epoch in (1, 2, 3):
        checkpointer.save(model, _state(epoch))
    assert checkpointer.latest()["global_epoch"] == 3
    assert json.loads((tmp_path / "latest.json").read_text()) == {"checkpoint": "epoch-000003"}
    kept = sorted(n for n in os.listdir(tmp_path) if n.startswith("epoch-"))
    # The newest (which the pointer names) and the one before it survive, as a fallback.
    assert KEEP_CHECKPOINTS == 2
    assert kept == ["epoch-000002", "epoch-000003"]

    # A leftover temporary directory from a killed save is not a checkpoint.
    leftover = tmp_path / ".tmp-epoch-000004"
    leftover.mkdir()
    (leftover / "state.json").write_text(json.dumps(_state(4)))
    assert checkpointer.latest()["global_epoch"] == 3

    # A save killed before its checkpoint is complete leaves the pointer on the last complete one.
    real_write = checkpoints_module.atomic_write_json

    def killed_while_writing_state(path, obj):
        if path.endswith("state.json"):
            raise KeyboardInterrupt("killed while writing the checkpoint")
        real_write(path, obj)

    monkeypatch.setattr(checkpoints_module, "atomic_write_json", killed_while_writing_state)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(model, _state(5))
    assert checkpointer.latest()["global_epoch"] == 3
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("epoch-")) == kept


# === Resume ===

RESUME_CONFIG = {"learning_rate": 0.01, "seed": 0, "output_dir": "ignored", "verbose": 0}


def _two_stage_run(run_dir: RunDir, config=None, callbacks=None, seed=0):
    """Two stages (head 2 epochs, all groups 2 epochs with layer-wise decay), no dropout."""
    return tiny_two_stage_run(
        run_dir,
        seed=seed,
        examples=20,
        head_epochs=2,
        finetune_epochs=2,
        validate=True,
        config=RESUME_CONFIG if config is None else config,
        callbacks=callbacks,
    )


def _resumed_run(path, config):
    return _two_stage_run(RunDir(path, resume=True), config, seed=7)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, result = _two_stage_run(RunDir(str(tmp_path_factory.mktemp("straight") / "run")))
    return model.get_weights(), result.history


@pytest.mark.parametrize(
    "kill_after", [1, 2, 3], ids=["mid_head", "stage_boundary", "mid_finetune"]
)
def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(
    tmp_path, uninterrupted, kill_after
):
    weights, history = uninterrupted
    path = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        _two_stage_run(RunDir(path), callbacks=[InterruptAfterEpoch(kill_after)])
    with open(os.path.join(path, "checkpoints", "latest.json"), encoding="utf-8") as handle:
        assert json.load(handle) == {"checkpoint": f"epoch-{kill_after:06d}"}

    # `output_dir` and `verbose` may differ on resume.
    model, result = _resumed_run(path, {**RESUME_CONFIG, "output_dir": "elsewhere", "verbose": 2})
    assert result.resumed_from_epoch == kill_after
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert [row["stage"] for row in result.history] == ["head", "head", "finetune", "finetune"]
    for row, want in zip(result.history, history, strict=True):
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-4)
    for value, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)


def test_resume_of_a_finished_run_returns_its_final_weights(tmp_path, uninterrupted):
    path = str(tmp_path / "run")
    _two_stage_run(RunDir(path))
    model, result = _resumed_run(path, RESUME_CONFIG)
    assert result.resumed_from_epoch == 4 and len(result.history) == 4
    for value, want in zip(model.get_weights(), uninterrupted[0], strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)


def test_resume_with_a_different_config_names_the_differing_keys(tmp_path):
    path = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        _two_stage_run(RunDir(path), callbacks=[InterruptAfterEpoch(1)])
    before = snapshot_files(path)
    with pytest.raises(RunDirError) as info:
        _resumed_run(path, {**RESUME_CONFIG, "learning_rate": 0.1, "batch_size": 4})
    message = str(info.value)
    assert "['batch_size', 'learning_rate']" in message
    assert "seed" not in message and "output_dir" not in message
    assert snapshot_files(path) == before


def test_resume_without_a_checkpoint(tmp_path):
    path = str(tmp_path / "run")
    os.makedirs(path)
    atomic_write_json(os.path.join(path, "config.json"), RESUME_CONFIG)
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        _resumed_run(path, RESUME_CONFIG)


def _renamed_tiny_model(prefix: str, seed: int = 0):
    """The tiny model's architecture (same shapes, same order) with other layer names."""
    import keras

    from tfxfer.backbones import Backbone, split_into_groups
    from tfxfer.backbones.vision import ImagePreprocessing

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for group, width in zip(("low", "mid", "top"), (4, 6, 8), strict=True):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"{prefix}{group}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"{prefix}{group}_bn")(x)
        x = keras.layers.ReLU(name=f"{prefix}{group}_relu")(x)
    network = keras.Model(inputs, x, name=f"{prefix}network")
    backbone = Backbone(
        name=prefix,
        network=network,
        preprocessor=ImagePreprocessing(16, "tf", name="image_preprocessing"),
        output_kind="spatial",
        input_kind="image",
        layer_groups=split_into_groups(
            network.layers, [(g, f"{prefix}{g}_") for g in ("low", "mid", "top")]
        ),
    )
    return backbone, tfxfer.build_model(backbone, 3, head=tfxfer.HeadConfig(dropout=0.0))


def test_a_checkpoint_of_another_model_with_the_same_shapes_is_refused_by_path(tmp_path):
    images, labels = tiny_arrays(n=12)
    stages = [tfxfer.Stage("head", 1), tfxfer.Stage("finetune", 2, train="all")]
    path = str(tmp_path / "run")

    backbone, model = _renamed_tiny_model("first_")
    with pytest.raises(KeyboardInterrupt):
        tfxfer.run_schedule(
            model,
            backbone,
            stages,
            tiny_train_data(images, labels),
            None,
            run_dir=RunDir(path),
            callbacks=[InterruptAfterEpoch(2)],
            verbose=0,
        )
    other, other_model = _renamed_tiny_model("second_")
    # Same number of variables, same shapes, same order: only the paths tell them apart.
    assert [v.shape for v in other_model.variables] == [v.shape for v in model.variables]
    with pytest.raises(
        RunDirError,
        match=r"made from another model.*'first_low_conv/kernel' "
        r"saved, 'second_low_conv/kernel' now",
    ):
        tfxfer.run_schedule(
            other_model,
            other,
            stages,
            tiny_train_data(images, labels),
            None,
            run_dir=RunDir(path, resume=True),
            verbose=0,
        )
    # The same architecture under the same names resumes.
    again, again_model = _renamed_tiny_model("first_", seed=3)
    result = tfxfer.run_schedule(
        again_model,
        again,
        stages,
        tiny_train_data(images, labels),
        None,
        run_dir=RunDir(path, resume=True),
        verbose=0,
    )
    assert result.resumed_from_epoch == 2 and len(result.history) == 3


def test_an_unreachable_bucket_is_named_in_one_line(monkeypatch):
    import tensorflow as tf

    from tfxfer import fs

    def offline(path):  # what TensorFlow's GCS filesystem raises with no network (measured)
        raise tf.errors.FailedPreconditionError(
            None,
            None,
            "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve "
            "hostname', error details: Could not resolve host: www.googleapis.com",
        )

    monkeypatch.setattr(fs, "exists", offline)
    with pytest.raises(RunDirError) as raised:
        RunDir.check("gs://no-such-bucket/run")
    assert str(raised.value).startswith(
        "Cannot reach 'gs://no-such-bucket/run' (Could not resolve host: www.googleapis.com)."
    )


# === One run at a time: the run directory's lock ===

_HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "h", "started": "s", "command": "c"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def _holder(path):
    """Another process that holds the lock of run directory `path`, as a live run does."""
    import subprocess
    import sys

    from tfxfer.runlock import LOCK_FILE

    path.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_live_runs_lock_refuses_a_second_run_before_anything_is_touched(tmp_path):
    path = tmp_path / "run"
    first = RunDir(str(path))
    first.write_json("config.json", {"seed": 0})
    other = _holder(path)
    try:
        before = snapshot_files(str(path))
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunDirError, match=f"is in use by another run: process {other.pid}"):
                RunDir(str(path), lock=True, **flags)
        assert snapshot_files(str(path)) == before
    finally:
        other.kill()
        other.wait()
    # Killed (as by SIGKILL): the kernel dropped its lock, and the next run takes it.
    run_dir = RunDir(str(path), resume=True, lock=True)
    assert run_dir.resumed
    run_dir.close()


@pytest.mark.parametrize("content", ['{"pid": 1, "host": "gone"}', "{half a lock", ""])
def test_a_lock_file_nobody_holds_is_stale_reported_and_taken_over(tmp_path, caplog, content):
    from tfxfer.runlock import LOCK_FILE

    path = tmp_path / "run"
    path.mkdir()
    (path / LOCK_FILE).write_text(content, encoding="utf-8")
    with caplog.at_level("WARNING", logger="tfxfer.runlock"):
        run_dir = RunDir(str(path), lock=True)
    if content.startswith('{"pid"'):
        assert "Replacing a stale lock" in caplog.text and "process 1 on host gone" in caplog.text
    held = json.loads((path / LOCK_FILE).read_text(encoding="utf-8"))
    assert held["pid"] == os.getpid()
    run_dir.close()
    assert not (path / LOCK_FILE).exists()


def test_a_process_may_hold_its_lock_twice_and_it_goes_with_the_last_release(tmp_path):
    from tfxfer.runlock import LOCK_FILE

    path = tmp_path / "run"
    outer = RunDir(str(path), lock=True)
    outer.write_json("config.json", {"seed": 0})
    inner = RunDir(str(path), resume=True, lock=True)  # a resume in the same session
    inner.close()
    assert (path / LOCK_FILE).exists()  # the outer run still holds it
    other = None
    try:
        import subprocess
        import sys

        # Another process cannot take it meanwhile.
        probe = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('free')\n"
            "except BlockingIOError:\n    print('held')\n"
        )
        other = subprocess.run(
            [sys.executable, "-c", probe, str(path / LOCK_FILE)], capture_output=True, text=True
        )
        assert other.stdout.strip() == "held", other.stderr
    finally:
        outer.close()
    assert not (path / LOCK_FILE).exists()


def test_a_run_dir_that_fails_to_open_leaves_no_lock(tmp_path):
    from tfxfer.runlock import LOCK_FILE

    path = tmp_path / "run"
    path.mkdir()
    (path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(RunDirError, match="which tfxfer did not write"):
        RunDir(str(path), lock=True)
    assert sorted(os.listdir(path)) == ["notes.txt"]
    assert LOCK_FILE not in os.listdir(path)
