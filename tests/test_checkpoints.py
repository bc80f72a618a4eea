"""Checkpoints that survive damage: verified writes, a kept fallback, resume from what is intact.

A checkpoint can be damaged after it was written: a full disk truncates a file, a copy stops
half-way, someone deletes a folder. Each checkpoint records the size and SHA-256 of its array
files, the one before the newest is kept until a newer one is verified, and a resume uses the
newest intact checkpoint (with a warning naming the damage) or says what to do when there is
none. The schedule here: stage "head" (epoch 1), then "finetune" (epochs 2-4, every group);
the run is killed after epoch 3, leaving `epoch-000002` (mid-finetune) and `epoch-000003`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
from helpers import (
    InterruptAfterEpoch,
    snapshot_files,
    tiny_model,
    tiny_two_stage_run,
)

from tfxfer.errors import RunDirError
from tfxfer.rundir import RunDir
from tfxfer.train import checkpoints as checkpoints_module
from tfxfer.train.checkpoints import Checkpointer

KILL_AFTER = 3


def _run(run_dir: RunDir, seed: int = 0, callbacks=None):
    return tiny_two_stage_run(run_dir, seed=seed, callbacks=callbacks)


def _checkpoint_dirs(checkpoints) -> list[str]:
    return sorted(n for n in os.listdir(checkpoints) if n.startswith("epoch-"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, result = _run(RunDir(str(tmp_path_factory.mktemp("straight") / "run")))
    return model.get_weights(), result.history


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> str:
    """A run killed after epoch 3, to be copied by each test (never changed itself)."""
    path = str(tmp_path_factory.mktemp("killed") / "run")
    with pytest.raises(KeyboardInterrupt):
        _run(RunDir(path), callbacks=[InterruptAfterEpoch(KILL_AFTER)])
    checkpoints = os.path.join(path, "checkpoints")
    assert _checkpoint_dirs(checkpoints) == ["epoch-000002", "epoch-000003"]
    return path


@pytest.fixture
def killed(tmp_path, killed_run) -> str:
    path = str(tmp_path / "run")
    shutil.copytree(killed_run, path)
    return path


# === Ways a checkpoint gets damaged ===


def _truncate(path: str) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def _flip_bytes(path: str) -> None:
    """Same size, other bytes: only the digest can tell."""
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    with open(path, "wb") as handle:
        handle.write(bytes(data))


def _in(checkpoints: str, *parts: str) -> str:
    return os.path.join(checkpoints, *parts)


# damage -> (what it does to `checkpoints/`, a fragment of the warning, epoch resumed from)
DAMAGES = {
    "truncated_latest_json": (
        lambda c: _truncate(_in(c, "latest.json")),
        "latest.json cannot be read",
        3,
    ),
    "deleted_latest_json": (
        lambda c: os.remove(_in(c, "latest.json")),
        "latest.json is missing",
        3,
    ),
    "deleted_newest_checkpoint": (
        lambda c: shutil.rmtree(_in(c, "epoch-000003")),
        "epoch-000003 is missing",
        2,
    ),
    "truncated_model_npz": (
        lambda c: _truncate(_in(c, "epoch-000003", "model.npz")),
        "epoch-000003/model.npz has",
        2,
    ),
    "flipped_bytes_in_optimizer_npz": (
        lambda c: _flip_bytes(_in(c, "epoch-000003", "optimizer.npz")),
        "epoch-000003/optimizer.npz does not match the SHA-256",
        2,
    ),
    "truncated_state_json": (
        lambda c: _truncate(_in(c, "epoch-000003", "state.json")),
        "epoch-000003/state.json cannot be read",
        2,
    ),
    "truncated_latest_json_and_newest_model_npz": (
        lambda c: [
            _truncate(_in(c, "latest.json")),
            _truncate(_in(c, "epoch-000003", "model.npz")),
        ],
        "latest.json cannot be read",
        2,
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_to_the_newest_intact_checkpoint(killed, uninterrupted, caplog, damage):
    weights, history = uninterrupted
    damage_files, warning, epoch = DAMAGES[damage]
    checkpoints = os.path.join(killed, "checkpoints")
    damage_files(checkpoints)

    caplog.set_level(logging.WARNING, logger="tfxfer.train")
    model, result = _run(RunDir(killed, resume=True), seed=7)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warning in warnings[0]
    assert f"Resuming from epoch-{epoch:06d} (after epoch {epoch})" in warnings[0]
    assert result.resumed_from_epoch == epoch
    # The history is the checkpoint's, then the epochs trained again: one row per epoch.
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert [row["stage"] for row in result.history] == ["head", *["finetune"] * 3]
    for row, want in zip(result.history, history, strict=True):
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for value, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6)
    # The damaged checkpoint was replaced; what is left is healthy again.
    assert _checkpoint_dirs(checkpoints) == ["epoch-000003", "epoch-000004"]
    with open(_in(checkpoints, "latest.json"), encoding="utf-8") as handle:
        assert json.load(handle) == {"checkpoint": "epoch-000004"}
    assert Checkpointer(checkpoints).latest()["global_epoch"] == 4


def test_an_intact_run_resumes_without_a_warning(killed, uninterrupted, caplog):
    caplog.set_level(logging.WARNING, logger="tfxfer.train")
    model, result = _run(RunDir(killed, resume=True), seed=7)
    assert result.resumed_from_epoch == KILL_AFTER
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    for value, want in zip(model.get_weights(), uninterrupted[0], strict=True):
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6)


# damage of every checkpoint -> (what it does to `checkpoints/`, fragments of the message)
EVERYTHING_DAMAGED = {
    "both_checkpoints_files": (
        lambda c: [
            _truncate(_in(c, "epoch-000003", "model.npz")),
            _flip_bytes(_in(c, "epoch-000002", "optimizer.npz")),
        ],
        ["epoch-000003/model.npz has", "epoch-000002/optimizer.npz does not match"],
    ),
    "pointer_and_every_state_json": (
        lambda c: [
            _truncate(_in(c, "latest.json")),
            _truncate(_in(c, "epoch-000003", "state.json")),
            os.remove(_in(c, "epoch-000002", "state.json")),
        ],
        [
            "latest.json cannot be read",
            "epoch-000003/state.json cannot be read",
            "epoch-000002/state.json is missing",
        ],
    ),
    "every_checkpoint_deleted": (
        lambda c: [shutil.rmtree(_in(c, n)) for n in ("epoch-000002", "epoch-000003")],
        ["epoch-000003 is missing"],
    ),
}


@pytest.mark.parametrize("damage", list(EVERYTHING_DAMAGED))
def test_resume_with_no_intact_checkpoint_says_what_to_do(killed, damage):
    damage_files, fragments = EVERYTHING_DAMAGED[damage]
    checkpoints = os.path.join(killed, "checkpoints")
    damage_files(checkpoints)
    before = snapshot_files(killed)

    with pytest.raises(RunDirError) as info:
        _run(RunDir(killed, resume=True), seed=7)
    message = str(info.value)
    assert message.startswith(f"Cannot resume from {checkpoints!r}: no checkpoint in it is intact")
    for fragment in fragments:
        assert fragment in message
    assert "--overwrite" in message and "--output-dir" in message
    assert "\n" not in message and "Traceback" not in message and 'File "' not in message
    assert snapshot_files(killed) == before


# === Writing: digests, verification, what is kept ===


def _state(epoch: int) -> dict:
    return {
        "stage_index": 0,
        "stage": "head",
        "global_epoch": epoch,
        "history": [],
        "best": {},
        "config": {},
    }


@pytest.fixture
def compiled_model():
    _, model = tiny_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def test_state_records_each_array_files_size_and_sha256(tmp_path, compiled_model):
    Checkpointer(str(tmp_path)).save(compiled_model, _state(1))
    folder = tmp_path / "epoch-000001"
    state = json.loads((folder / "state.json").read_text())
    assert sorted(state["files"]) == ["model.npz", "optimizer.npz"]
    for name, record in state["files"].items():
        data = (folder / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_the_previous_checkpoint_is_kept_until_the_one_after_the_next(tmp_path, compiled_model):
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(compiled_model, _state(1))
    checkpointer.save(compiled_model, _state(2))
    assert _checkpoint_dirs(tmp_path) == ["epoch-000001", "epoch-000002"]
    checkpointer.save(compiled_model, _state(3))
    assert _checkpoint_dirs(tmp_path) == ["epoch-000002", "epoch-000003"]
    assert checkpointer.latest()["global_epoch"] == 3


def test_a_checkpoint_that_does_not_read_back_intact_gives_up_nothing(
    tmp_path, compiled_model, monkeypatch
):
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(compiled_model, _state(1))
    checkpointer.save(compiled_model, _state(2))
    real_replace = os.replace

    def replace_then_lose_half(src, dst):
        # As a disk that fills up between the write and the read-back would.
        real_replace(src, dst)
        if os.path.basename(src) == ".tmp-epoch-000003":
            _truncate(os.path.join(dst, "model.npz"))

    monkeypatch.setattr(checkpoints_module.os, "replace", replace_then_lose_half)
    with pytest.raises(RunDirError, match=r"does not read back intact: epoch-000003/model\.npz"):
        checkpointer.save(compiled_model, _state(3))
    monkeypatch.undo()
    # The pointer did not move and nothing older was pruned for the damaged one.
    assert json.loads((tmp_path / "latest.json").read_text()) == {"checkpoint": "epoch-000002"}
    assert _checkpoint_dirs(tmp_path) == ["epoch-000001", "epoch-000002", "epoch-000003"]
    assert checkpointer.latest()["global_epoch"] == 2
    # The next good save replaces the damaged one and prunes as usual.
    checkpointer.save(compiled_model, _state(3))
    assert _checkpoint_dirs(tmp_path) == ["epoch-000002", "epoch-000003"]


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes], ids=["truncated", "flipped_bytes"])
def test_restore_turns_an_unreadable_npz_into_a_run_dir_error(tmp_path, compiled_model, damage):
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(compiled_model, _state(1))
    state = checkpointer.latest()
    path = str(tmp_path / "epoch-000001" / "model.npz")
    damage(path)  # After verification, as a file damaged while it is read would be.
    with pytest.raises(RunDirError) as info:
        Checkpointer.restore(compiled_model, state, with_optimizer=False)
    message = str(info.value)
    assert message.startswith(f"Cannot read {path!r}: the file is damaged or unreadable")
    assert "--overwrite" in message
