"""Resume checkpoints: written whole, verified, found again after damage.

After every epoch (and on a preemption notice, mid-epoch) the trainer writes a complete
checkpoint (model weights, this stage's optimizer state, which stage, epoch and step, the
history so far, and the size and SHA-256 of each array file) into a fresh directory, reads it
back to verify it, and only then moves the `latest.json` pointer to it and deletes the
checkpoints before the previous one.

Arrays are raw variable values matched to variables by path, not Keras' per-layer saving:
that merges LoRA adapters into kernels and zeroes the adapters on load, which would silently
end a LoRA stage on resume.

Disks fill up, copies stop half-way, people delete the wrong folder. So two checkpoints stay,
the newest verified one and the one before it, and a resume checks what it reads: when
`latest.json` is unreadable, or names a checkpoint that is gone or no longer matches its
recorded sizes and digests, it warns and falls back to the newest intact checkpoint; when
none is intact it says what is damaged and how to start over, rather than raising a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfxfer import fs
from tfxfer.errors import RunDirError
from tfxfer.rundir import atomic_write_json

log = logging.getLogger(__name__)

# The newest verified checkpoint and the one before it: the fallback when the newest (or the
# `latest.json` pointer) is damaged after it was written.
KEEP_CHECKPOINTS = 2
# A checkpoint directory's name: "epoch-000003" at the end of global epoch 3, or
# "epoch-000003-step-000005" 5 steps into the epoch after it (written on a preemption notice).
# Both numbers are zero-padded, so names sort in training order: an epoch's end, the steps
# into the next epoch, that epoch's end.
CHECKPOINT_NAME = re.compile(r"epoch-(\d{6,})(?:-step-(\d{6,}))?")
# The array files of a checkpoint, each recorded in its state.json with size and SHA-256.
ARRAY_FILES = ("model.npz", "optimizer.npz")
# Written besides them in a stage that stops at convergence: its best epoch's weights so far.
OPTIONAL_ARRAY_FILES = ("stage_best.npz",)
# Keys a checkpoint's state.json must hold for a resume to use it.
STATE_KEYS = (
    "stage_index",
    "stage",
    "global_epoch",
    "history",
    "config",
    "model_variables",
    "optimizer_variables",
    "files",
)
# Bytes read at a time when hashing, so a gigabyte of optimizer state costs no memory.
DIGEST_CHUNK = 1 << 20


class Checkpointer:
    """Writes, verifies and finds per-epoch checkpoints in `run_dir/checkpoints`.

    A checkpoint is intact when its state.json parses and every array file it lists has the
    size and SHA-256 recorded when it was written. Only an intact checkpoint is pointed at or
    resumed from, and the one before it is kept until a newer one has been verified.

    Args:
        directory: str. The run's checkpoints directory.
        write: bool. False on a worker that only reads checkpoints (to resume). Defaults to
            `True`.
    """

    def __init__(self, directory: str, write: bool = True):
        self.directory = directory
        self.write = write

    @property
    def pointer(self) -> str:
        return fs.join(self.directory, "latest.json")

    def latest(self) -> dict[str, Any] | None:
        """The state of the checkpoint to resume from, or None when none was written yet.

        That is the checkpoint `latest.json` names, when both are intact; otherwise, with a
        warning that says what is damaged, the newest intact checkpoint on disk.

        Raises:
            RunDirError: checkpoints were written, but none of them is intact.
        """
        names = self._checkpoint_names()
        if not names and not fs.exists(self.pointer):
            return None  # A leftover `.tmp-` directory is not a checkpoint.
        problems: list[str] = []
        named = self._pointed_at(problems)
        if named is not None:
            state, problem = self._read_intact(named)
            if state is not None:
                return state
            problems.append(problem)
        for name in reversed(names):  # Newest first.
            if name == named:
                continue
            state, problem = self._read_intact(name)
            if state is None:
                problems.append(problem)
                continue
            step = state.get("step", 0)
            position = f"after epoch {state['global_epoch']}" + (
                f" and {step} steps of the next" if step else ""
            )
            log.warning(
                "Damaged checkpoint files in %r: %s. Resuming from %s (%s), the newest intact "
                "checkpoint.",
                self.directory,
                "; ".join(problems),
                name,
                position,
            )
            return state
        raise RunDirError(
            f"Cannot resume from {self.directory!r}: no checkpoint in it is intact "
            f"({'; '.join(problems)}). Start again with --overwrite, or choose another "
            "--output-dir."
        )

    def save(
        self,
        model: keras.Model,
        state: dict[str, Any],
        stage_best: list[np.ndarray] | None = None,
    ) -> None:
        """Writes the checkpoint of `state["global_epoch"]` (and `state["step"]` steps into the
        epoch after it, when given), verifies it, points at it, prunes.

        `stage_best`, when given, is kept as `stage_best.npz` (the arrays a stage that stops at
        convergence goes back to; `Checkpointer.stage_best` reads them).

        Raises:
            RunDirError: the checkpoint just written does not read back intact (a full or
                failing disk); `latest.json` and the checkpoints before are left as they were.
        """
        if not self.write:
            return
        name = checkpoint_name(state["global_epoch"], state.get("step", 0))
        final = fs.join(self.directory, name)
        # On an object store a folder cannot be renamed in one step, so the checkpoint is
        # written where it stays; it is just as safe, since nothing reads it before the
        # `latest.json` written after it is verified names it (see `tfxfer.fs`).
        tmp = final if fs.is_url(final) else fs.join(self.directory, f".tmp-{name}")
        fs.rmtree(tmp, ignore_errors=True)
        fs.makedirs(tmp)
        # Raw variable values, in order, rather than Keras' per-layer saving: that merges
        # LoRA adapters into kernels and zeroes the adapters on load, which would silently
        # end a LoRA stage on resume.
        optimizer = getattr(model, "optimizer", None)
        optimizer_variables = list(optimizer.variables) if optimizer is not None else []
        files = {
            "model.npz": _save_arrays(fs.join(tmp, "model.npz"), model.variables),
            "optimizer.npz": _save_arrays(fs.join(tmp, "optimizer.npz"), optimizer_variables),
        }
        if stage_best is not None:
            files["stage_best.npz"] = _save_arrays(fs.join(tmp, "stage_best.npz"), stage_best)
        state = {
            **state,
            "model_variables": [v.path for v in model.variables],
            "optimizer_variables": [v.path for v in optimizer_variables],
            "files": files,
        }
        atomic_write_json(fs.join(tmp, "state.json"), state)
        if tmp != final:
            # What this replaces, if anything, was never verified or is damaged: a resume only
            # starts before an existing checkpoint when that one could not be used.
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        # Read back what is on disk now, before anything older is given up for it.
        _, problem = self._read_intact(name)
        if problem is not None:
            raise RunDirError(
                f"The checkpoint just written does not read back intact: {problem}. The disk "
                f"holding {self.directory!r} may be full or failing; the checkpoint before it "
                "is kept, so free space and continue the run with --resume."
            )
        atomic_write_json(self.pointer, {"checkpoint": name})
        self._prune(keep=name)

    @staticmethod
    def stage_best(state: dict[str, Any]) -> list[np.ndarray] | None:
        """The `stage_best` arrays a checkpoint was saved with, or None."""
        if "stage_best.npz" not in state["files"]:
            return None
        path = fs.join(state["checkpoint_dir"], "stage_best.npz")
        with fs.open(path, "rb") as handle, np.load(handle, allow_pickle=False) as arrays:
            return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]

    @staticmethod
    def restore(model: keras.Model, state: dict[str, Any], with_optimizer: bool) -> None:
        """Loads a checkpoint's model variables (and this stage's optimizer state).

        Raises:
            RunDirError: a file is unreadable or damaged, or was made from another model.
        """
        _load_arrays(
            fs.join(state["checkpoint_dir"], "model.npz"),
            model.variables,
            state["model_variables"],
            "model",
        )
        if with_optimizer:
            model.optimizer.build(model.trainable_variables)
            _load_arrays(
                fs.join(state["checkpoint_dir"], "optimizer.npz"),
                model.optimizer.variables,
                state["optimizer_variables"],
                "optimizer",
            )

    def _checkpoint_names(self) -> list[str]:
        """The `epoch-*` entries in the directory, oldest first."""
        if not fs.isdir(self.directory):
            return []
        return sorted(
            (n for n in fs.listdir(self.directory) if CHECKPOINT_NAME.fullmatch(n)),
            key=_position_of,
        )

    def _pointed_at(self, problems: list[str]) -> str | None:
        """The checkpoint `latest.json` names, or None with the reason added to `problems`."""
        try:
            with fs.open(self.pointer) as handle:
                pointer = json.load(handle)
        except (FileNotFoundError, tf.errors.NotFoundError):
            problems.append("latest.json is missing")
            return None
        except (
            OSError,
            ValueError,
            tf.errors.OpError,
        ) as error:  # Truncated JSON, or not text at all.
            problems.append(f"latest.json cannot be read ({error})")
            return None
        name = pointer.get("checkpoint") if isinstance(pointer, dict) else None
        if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
            problems.append(f"latest.json names no checkpoint (it holds {pointer!r:.80})")
            return None
        return name

    def _read_intact(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(state, None) when checkpoint `name` is intact, else (None, what is wrong)."""
        folder = fs.join(self.directory, name)
        if not fs.isdir(folder):
            return None, f"{name} is missing"
        try:
            with fs.open(fs.join(folder, "state.json")) as handle:
                state = json.load(handle)
        except (FileNotFoundError, tf.errors.NotFoundError):
            return None, f"{name}/state.json is missing"
        except (OSError, ValueError, tf.errors.OpError) as error:
            return None, f"{name}/state.json cannot be read ({error})"
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            return None, f"{name}/state.json lacks {missing} (an older tfxfer wrote it?)"
        position = (state["global_epoch"], state.get("step", 0))  # No "step": an epoch's end.
        if position != _position_of(name):
            return None, f"{name}/state.json is for (epoch, step) {position!r}"
        files = state["files"]
        required = (
            sorted(f for f in files if f not in OPTIONAL_ARRAY_FILES)
            if isinstance(files, dict)
            else None
        )
        if required != sorted(ARRAY_FILES):
            return None, f"{name}/state.json does not list the files {list(ARRAY_FILES)}"
        for file in files:
            problem = _file_problem(fs.join(folder, file), files[file])
            if problem is not None:
                return None, f"{name}/{file} {problem}"
        return {**state, "checkpoint_dir": folder}, None

    def _prune(self, keep: str) -> None:
        """Deletes every checkpoint but `keep` (just verified) and the newest before it.

        Checkpoints newer than `keep` go too: they are what a resume fell back past, and a
        later fallback must not take them for the newest.
        """
        names = self._checkpoint_names()
        older = [n for n in names if _position_of(n) < _position_of(keep)]
        kept = {keep, *older[max(0, len(older) - (KEEP_CHECKPOINTS - 1)) :]}
        for name in names:
            if name not in kept:
                fs.rmtree(fs.join(self.directory, name), ignore_errors=True)


def checkpoint_name(global_epoch: int, step: int = 0) -> str:
    """The directory name of the checkpoint `step` steps into the epoch after `global_epoch`."""
    name = f"epoch-{int(global_epoch):06d}"
    return f"{name}-step-{int(step):06d}" if step else name


def _position_of(name: str) -> tuple[int, int]:
    """(global epoch, step) of a checkpoint name: where in training it was written."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)), int(match.group(2) or 0)


def _file_record(path: str) -> dict[str, Any]:
    """{"size", "sha256"} of the file at `path`, read a chunk at a time."""
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _file_problem(path: str, record: Any) -> str | None:
    """What is wrong with the file at `path` given its recorded size and digest, or None."""
    if not (
        isinstance(record, dict)
        and isinstance(record.get("size"), int)
        and isinstance(record.get("sha256"), str)
    ):
        return "has no recorded size and SHA-256"
    try:
        # The size first: a truncated file is told apart without reading it.
        size = fs.getsize(path)
        if size != record["size"]:
            return f"has {size} bytes where {record['size']} were written (truncated?)"
        if _file_record(path)["sha256"] != record["sha256"]:
            return "does not match the SHA-256 recorded when it was written"
    except (FileNotFoundError, tf.errors.NotFoundError):
        return "is missing"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except tf.errors.OpError as error:
        return f"cannot be read ({error.message})"
    return None


def _save_arrays(path: str, variables: list) -> dict[str, Any]:
    """Writes `variables` to an .npz at `path`; returns its size and SHA-256 for state.json."""
    if fs.is_url(path):
        # zipfile needs a seekable file; a gfile upload is not one. Written locally, hashed
        # from those same bytes, then copied; the read-back in `save` checks the copy.
        handle, local = tempfile.mkstemp(suffix=".npz")
        os.close(handle)
        try:
            record = _save_arrays(local, variables)
            tf.io.gfile.copy(local, path, overwrite=True)
        finally:
            os.remove(local)
        return record
    # An .npz written one variable at a time: np.savez would first copy every variable
    # (for a BERT-base AdamW state, a gigabyte) before writing any of them.
    with open(path, "wb") as raw:
        with zipfile.ZipFile(raw, "w", allowZip64=True) as archive:
            for i, variable in enumerate(variables):
                with archive.open(f"arr_{i}.npy", "w", force_zip64=True) as handle:
                    value = np.asarray(getattr(variable, "numpy", lambda v=variable: v)())
                    np.lib.format.write_array(handle, value, allow_pickle=False)
        # On disk before latest.json can name it, not only in the page cache.
        raw.flush()
        os.fsync(raw.fileno())
    return _file_record(path)


def _unnumbered(path: str) -> str:
    # Keras numbers auto-named objects per process ("seed_generator_3", "dense_7"), so the
    # same model built after others differs only in those numbers; they are not compared.
    return "/".join(re.sub(r"_\d+$", "", part) for part in path.split("/"))


def _load_arrays(path: str, variables: list, saved_paths: list[str], what: str) -> None:
    """Assigns saved arrays to `variables`, matched by variable path, never by position alone.

    Two models can have the same number of variables of the same shapes in the same order
    (a ResNet50 and a ResNet50V2 head on one class count, say); restoring one's checkpoint
    into the other would succeed silently and train nonsense.
    """
    current = [v.path for v in variables]
    if [_unnumbered(p) for p in saved_paths] != [_unnumbered(p) for p in current]:
        missing = [p for p in saved_paths if p not in set(current)]
        extra = [p for p in current if p not in set(saved_paths)]
        first = next(
            (
                f"{a!r} saved, {b!r} now"
                for a, b in zip(saved_paths, current, strict=False)
                if a != b
            ),
            "the same paths in another order",
        )
        raise RunDirError(
            f"The checkpoint in {os.path.dirname(path)!r} was made from another {what}: it holds "
            f"{len(saved_paths)} variables, this {what} has {len(current)} "
            f"(first difference: {first}; only in the checkpoint: {missing[:3]}; only here: "
            f"{extra[:3]}). Resume with the config and backbone the run started with."
        )
    try:
        with fs.open(path, "rb") as handle, np.load(handle, allow_pickle=False) as arrays:
            values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    except (
        zipfile.BadZipFile,
        ValueError,
        OSError,
        EOFError,
        KeyError,
        tf.errors.OpError,
    ) as error:
        # A resume verifies digests first; this is for a file damaged after that, or read
        # without it.
        raise RunDirError(
            f"Cannot read {path!r}: the file is damaged or unreadable ({error}). Delete "
            f"{os.path.dirname(path)!r} to resume from the checkpoint before it, or start "
            "again with --overwrite, or choose another --output-dir."
        ) from error
    shapes = [
        (p, tuple(v.shape), value.shape)
        for p, v, value in zip(current, variables, values, strict=False)
        if tuple(v.shape) != value.shape
    ]
    if len(values) != len(variables) or shapes:
        raise RunDirError(
            f"The checkpoint in {os.path.dirname(path)!r} does not fit this {what}: "
            f"{len(values)} arrays for {len(variables)} variables; shapes that differ "
            f"(path, now, saved): {shapes[:3]}. Resume with the config the run started with."
        )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
