"""The run directory: everything a run leaves behind, written so that nothing is lost.

Layout::

    config.json        the resolved config (every default filled in)
    class_names.json   label order of the model's outputs
    history.csv        one row per epoch of every stage: epoch, stage, metrics, lr
    metrics.json       one object per evaluated split: {"val": {"accuracy": ..., "loss": ...}}
    checkpoints/       best.weights.h5 and per-epoch resume states
    model.keras        the final model; reloads and predicts identically
    export/            a SavedModel that takes raw inputs

A directory that already holds a run is never overwritten or mixed into unless the caller
asks (`overwrite=True` replaces it, `resume=True` continues it). Files are written to a
temporary name and renamed into place, so a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from tfxfer.errors import RunDirError

# Any of these in a directory means a run has written there.
RUN_MARKERS = ("config.json", "history.csv", "metrics.json", "model.keras", "checkpoints")


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class RunDir:
    """A run's output directory.

    Args:
        path: str. Where the run writes.
        overwrite: bool. Delete an earlier run in `path` first. Defaults to `False`.
        resume: bool. Continue the run in `path`. Defaults to `False`.
        write: bool. False on every worker of a multi-worker run but the chief: the
            directory is then only read (to resume), never checked, created or deleted.
            Defaults to `True`.

    Raises:
        RunDirError: `path` holds an earlier run and neither flag was given, or `path` is a
            file, or both flags were given.
    """

    def __init__(
        self, path: str, *, overwrite: bool = False, resume: bool = False, write: bool = True
    ):
        self.path = os.path.abspath(os.path.expanduser(path))
        if not write:
            # The chief writes this (shared) directory at the same moment: what is there is
            # its new run, not an earlier one to refuse or delete. A worker resumes exactly
            # when there is a checkpoint, as the chief does; the chief cannot write a newer
            # one before every worker has joined the first training step.
            pointer = os.path.join(self.checkpoints, "latest.json")
            self.resumed = resume and os.path.exists(pointer)
            return
        self.resumed = self.check(path, overwrite=overwrite, resume=resume)
        if overwrite and self.holds_run():
            shutil.rmtree(self.path)
        os.makedirs(self.checkpoints, exist_ok=True)

    @classmethod
    def check(cls, path: str, *, overwrite: bool = False, resume: bool = False) -> bool:
        """Raises `RunDirError` if `path` cannot be used as asked; returns whether it resumes.

        Cheap and side-effect free, so a recipe calls it first and a forgotten `--overwrite`
        is reported before minutes go into loading a backbone.
        """
        if overwrite and resume:
            raise RunDirError("Pass either --overwrite or --resume, not both.")
        if "://" in str(path):
            # os.makedirs("gs://b/run") would quietly make a local directory named "gs:".
            raise RunDirError(
                f"Expected a local or mounted directory for the run. Received: {path!r}. The "
                "run directory is written through the local filesystem; write it to local "
                "disk (or a mounted bucket) and copy it to cloud storage afterwards."
            )
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise RunDirError(f"Output path {path!r} is a file, not a directory.")
        markers = cls._markers_in(path)
        if markers and not (overwrite or resume):
            raise RunDirError(
                f"Output directory {path!r} already holds a run ({', '.join(markers)}). Pass "
                "--resume to continue it, --overwrite to replace it, or choose another "
                "--output-dir."
            )
        return bool(markers) and resume

    @staticmethod
    def _markers_in(path: str) -> list[str]:
        if not os.path.isdir(path):
            return []
        return [name for name in RUN_MARKERS if os.path.exists(os.path.join(path, name))]

    def _markers(self) -> list[str]:
        return self._markers_in(self.path)

    def holds_run(self) -> bool:
        return bool(self._markers())

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, "checkpoints")

    def write_json(self, name: str, obj: Any) -> str:
        path = self.file(name)
        atomic_write_json(path, obj)
        return path

    def read_json(self, name: str) -> Any:
        with open(self.file(name), encoding="utf-8") as handle:
            return json.load(handle)
