"""The run directory: everything a run leaves behind, written so that nothing is lost.

Layout::

    .tfxfer-run.json   the manifest: every top-level entry tfxfer wrote here
    config.json        the resolved config (every default filled in)
    class_names.json   label order of the model's outputs
    history.csv        one row per epoch of every stage: epoch, stage, metrics, lr
    metrics.json       one object per evaluated split: {"val": {"accuracy": ..., "loss": ...}}
    best.json          the best epoch
    stages.json        how each stage trained (cached features, best epoch, compiled steps)
    checkpoints/       best.weights.h5 and per-epoch resume states
    model.keras        the final model; reloads and predicts identically
    export/            a SavedModel that takes raw inputs
    training_curves.png  loss, accuracy and learning rate per epoch, stages marked
    confusion_matrix.png, per_class.csv, top_losses.csv, top_losses.png   the reports
    tensorboard/       TensorBoard event files (train/, validation/)
    lr_find_<stage>.png  the range test of a stage whose learning rate is "auto"

A run deletes or changes only what it wrote itself. Every path a run writes goes through
`RunDir.file` (or `write_json`), which records the path's top-level entry in the manifest
*before* the first byte is written, so the manifest always covers what is on disk. `overwrite`
then deletes exactly the manifest's entries, and refuses a directory that holds anything else
(a data folder, a user's notes, a run from before the manifest existed): those are never
tfxfer's to delete. A directory that already holds a run is never overwritten or mixed into
unless the caller asks (`overwrite=True` replaces it, `resume=True` continues it); the one
exception is a run that stopped before its first checkpoint, with no results and nothing but
its manifest's entries: nothing in it can be resumed, so a plain re-run replaces it. Files are
written to a temporary name and renamed into place, so a crash mid-write leaves the old file
intact.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import tensorflow as tf

from tfxfer import fs
from tfxfer.errors import RunDirError

# The atomic writes live in tfxfer.fs; `atomic_write_text` is importable from here as before.
from tfxfer.fs import TMP_PREFIX, atomic_write_json, atomic_write_text  # noqa: F401
from tfxfer.runlock import LOCK_FILE, RunLock, check_reachable, refuse_shared_locations

log = logging.getLogger(__name__)

# The manifest's name: hidden, so that it never looks like a class folder or a result.
MANIFEST = ".tfxfer-run.json"
MANIFEST_FORMAT = 1
# Any of these in a directory means a run has written there.
RUN_MARKERS = ("config.json", "history.csv", "metrics.json", "model.keras", "checkpoints")
# Every top-level entry tfxfer's own code writes into a run directory. A run from before the
# manifest existed is adopted with these names when it is resumed (see `RunDir.__init__`).
RUN_ENTRIES = (
    "config.json",
    "class_names.json",
    "history.csv",
    "metrics.json",
    "best.json",
    "stages.json",
    "checkpoints",
    "model.keras",
    "export",
    "curves.png",  # what runs before the reports wrote
    "training_curves.png",
    "confusion_matrix.png",
    "per_class.csv",
    "top_losses.csv",
    "top_losses.png",
    "tensorboard",
)
# How many foreign entries an error message names before it says "and N more".
_NAMED_IN_ERRORS = 3


def listed_in_run_manifest(path: str) -> bool:
    """Whether `path` is a top-level entry that its parent's run manifest says tfxfer wrote.

    `export_saved_model` asks this so a run's own `export/` (recorded before it was written)
    can be replaced even when it predates the export's own marker file.
    """
    path = _absolute(path)
    entries = _read_manifest(fs.dirname(path))
    return entries is not None and fs.basename(path) in entries


def _read_manifest(directory: str) -> set[str] | None:
    """The manifest's entries in `directory`, or None when it has none."""
    path = fs.join(directory, MANIFEST)
    if not fs.isfile(path):
        return None
    try:
        with fs.open(path) as handle:
            manifest = json.load(handle)
        entries = manifest["entries"]
        if not isinstance(entries, list):
            raise TypeError(f"entries is a {type(entries).__name__}")
        for name in entries:
            _check_entry_name(name)
    except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as error:
        raise RunDirError(
            f"The run manifest {path!r} cannot be read ({error}). tfxfer deletes only what "
            "this file lists, so it will not touch this directory: check the file, or "
            "choose another --output-dir."
        ) from None
    return set(entries)


def _check_entry_name(name: Any) -> None:
    # A manifest entry is one plain name inside the run directory, never a path out of it.
    if (
        not isinstance(name, str)
        or name in ("", ".", "..", MANIFEST)
        or "/" in name
        or os.sep in name
        or (os.altsep and os.altsep in name)
    ):
        raise ValueError(f"entry {name!r} is not a plain file or folder name")


def _stopped_before_first_checkpoint(path: str) -> bool:
    """Whether `path` holds only a tfxfer run that ended before anything could be resumed.

    That is what a run that crashed (or was stopped) in its first epoch leaves: a manifest,
    maybe `config.json` and `checkpoints/` without a checkpoint in it, and no results. It is
    tfxfer's own and holds nothing a resume could use, so a plain re-run replaces it rather
    than asking for --overwrite. Anything in `path` the manifest does not list, any
    checkpoint (`checkpoints/epoch-*`, `checkpoints/latest.json`) or any result
    (`model.keras`, `metrics.json`) makes it a run to keep.
    """
    entries = _read_manifest(path)
    if entries is None:
        return False
    names = _listing(path)
    foreign = [
        n for n in names if n != MANIFEST and n not in entries and not n.startswith(TMP_PREFIX)
    ]
    if foreign or "model.keras" in names or "metrics.json" in names:
        return False
    checkpoints = _listing(fs.join(path, "checkpoints"))
    return not any(n == "latest.json" or n.startswith("epoch-") for n in checkpoints)


def _listing(directory: str) -> list[str]:
    """The directory's entries but its lock, which is the run's and no entry of it."""
    names = fs.listdir(directory) if fs.isdir(directory) else []
    return sorted(name for name in names if name != LOCK_FILE)


def _resolved(path: str) -> str:
    """`path` with links resolved, to compare it with another (a URL as it is)."""
    if fs.is_url(path):
        return str(path).rstrip("/")
    return os.path.realpath(os.path.expanduser(str(path)))


def _absolute(path: str) -> str:
    """`path` made absolute (a URL is one already)."""
    if fs.is_url(path):
        return str(path).rstrip("/")
    return os.path.abspath(os.path.expanduser(str(path)))


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_NAMED_IN_ERRORS])
    more = len(names) - _NAMED_IN_ERRORS
    return shown + (f" and {more} more" if more > 0 else "")


def _foreign(names: list[str], entries: set[str] | None) -> list[str]:
    """The names in a directory that tfxfer did not write (by its manifest, else its markers)."""
    if entries is None:
        return [n for n in names if n not in RUN_MARKERS]
    return [n for n in names if n != MANIFEST and n not in entries and not n.startswith(TMP_PREFIX)]


def _refuse_foreign(path: str, foreign: list[str], *, holds_run: bool) -> None:
    """Refuses a directory holding files tfxfer did not write, beside a run or not."""
    if foreign and holds_run:
        raise RunDirError(
            f"Refusing to overwrite {path!r}: beside the earlier run it holds "
            f"{_some(foreign)}, which tfxfer did not write (not in {MANIFEST}). --overwrite "
            "deletes only what the run wrote, and a directory shared with other files is "
            "not the run's to replace. Move those out of it, or choose another --output-dir."
        )
    if foreign:
        raise RunDirError(
            f"Refusing to use {path!r} as the run directory: it holds {_some(foreign)}, "
            "which tfxfer did not write. A run directory is the run's alone, so that "
            "--overwrite can delete exactly what the run wrote. Move those out of it, or "
            "choose a new or empty --output-dir."
        )


class RunDir:
    """A run's output directory, which knows which of its entries tfxfer wrote.

    The directory keeps a manifest (`.tfxfer-run.json`) of every top-level entry written
    through `file` or `write_json`, recorded before the entry is written. That is what makes
    `overwrite` safe: it deletes the manifest's entries and nothing else, and it refuses a
    directory that holds anything tfxfer did not write, so a data folder or a user's file
    that ended up in the output directory is never deleted. A run directory must be new,
    empty, or an earlier tfxfer run; `/`, the home directory and the working directory are
    refused outright.

    Args:
        path: str. Where the run writes.
        overwrite: bool. Delete what an earlier run in `path` wrote (the manifest's entries)
            first. Defaults to `False`.
        resume: bool. Continue the run in `path`. Defaults to `False`.
        write: bool. False on every worker of a multi-worker run but the chief: the
            directory is then only read (to resume from the checkpoint the chief chose),
            never checked, created, locked or deleted. Defaults to `True`.
        lock: bool. Hold the directory's lock (`tfxfer.runlock`) until `close` (or the
            process's end), so that no other run writes it meanwhile (local paths only). The
            recipes lock the runs they open, and close them when they end. Defaults to
            `False`.

    Raises:
        RunDirError: `path` holds an earlier run and neither flag was given; or it holds
            files tfxfer did not write; or `overwrite` was asked of a run without a manifest;
            or `path` is a file, empty, `/`, home or the working directory; or both flags
            were given; or another live run holds its lock.

    Example:

    >>> run_dir = RunDir("runs/photos", overwrite=True)
    >>> run_dir.write_json("notes.json", {"seen": True})  # recorded, then written
    """

    def __init__(
        self,
        path: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        write: bool = True,
        lock: bool = False,
    ):
        self.path = _absolute(path)
        self.write = write
        self.lock = None
        if not write:
            # The chief writes this (shared) directory at the same moment: what is there is
            # its new run, not an earlier one to refuse or delete. Nor does this worker decide
            # from what it sees whether to resume: it may not see the chief's directory at
            # all, or see a damaged pointer the chief falls back from. `run_schedule` takes
            # the chief's choice of checkpoint and loads exactly that one on every worker.
            self.resumed = resume
            return
        existed = fs.exists(self.path)
        if lock and not fs.is_url(self.path):
            # The refusals that need no lock come first (never a lock file in a home
            # directory or beside a user's files); then the lock, before anything in the
            # directory is read to be replaced; then the checks again, under the lock.
            RunLock(self.path).check()  # "in use" before "holds a run": the better reason
            self.check(path, overwrite=overwrite, resume=resume)
            os.makedirs(self.path, exist_ok=True)
            self.lock = RunLock(self.path)
            self.lock.acquire()
        try:
            self._open(path, overwrite, resume, existed)
        except BaseException:
            self.close()
            raise

    def _open(self, given: str, overwrite: bool, resume: bool, existed: bool) -> None:
        self.resumed = self.check(given, overwrite=overwrite, resume=resume)
        if resume and not self.resumed:
            log.warning(
                "Nothing to resume in %r (%s); starting a new run there.",
                self.path,
                "no such directory" if not existed else "no run was saved in it",
            )
        if overwrite:
            self._remove_earlier_run()
        elif not self.resumed and _stopped_before_first_checkpoint(self.path):
            log.info(
                "Replacing the run in %r that stopped before its first checkpoint: it holds "
                "only %s, which tfxfer wrote and nothing can resume from.",
                self.path,
                _some(sorted(_read_manifest(self.path) or ())) or "its manifest",
            )
            self._remove_earlier_run()
        elif self.resumed and _read_manifest(self.path) is None:
            self._adopt_earlier_run()
        self._record("checkpoints")
        fs.makedirs(self.checkpoints)

    @classmethod
    def check(cls, path: str, *, overwrite: bool = False, resume: bool = False) -> bool:
        """Raises `RunDirError` if `path` cannot be used as asked; returns whether it resumes.

        Cheap and side-effect free, so a recipe calls it first and a forgotten `--overwrite`
        is reported before minutes go into loading a backbone.
        """
        if overwrite and resume:
            raise RunDirError("Pass either --overwrite or --resume, not both.")
        given = path
        path = _absolute(path)
        if not fs.is_url(path):  # A bucket holds no home or working directory.
            refuse_shared_locations(given, path)
        else:
            check_reachable(path)
        if fs.exists(path) and not fs.isdir(path):
            raise RunDirError(f"Output path {path!r} is a file, not a directory.")
        names = _listing(path)
        if not names:
            return False
        entries = _read_manifest(path)
        markers = [name for name in RUN_MARKERS if name in names]
        holds_run = entries is not None or bool(markers)
        foreign = _foreign(names, entries)
        if resume and holds_run:
            return True
        if not overwrite and _stopped_before_first_checkpoint(path):
            return False  # `__init__` replaces it: tfxfer's own, with nothing to resume.
        if overwrite and entries is None and markers:
            raise RunDirError(
                f"Refusing to overwrite {path!r}: it holds {_some(markers)} but no tfxfer "
                f"manifest ({MANIFEST}), so tfxfer cannot tell what it wrote there (a run "
                "from an older tfxfer, or files of your own). --overwrite deletes only what a "
                "run recorded writing. Delete the old files yourself, pass --resume to continue "
                "an earlier tfxfer run, or choose another --output-dir."
            )
        if holds_run and not overwrite:
            fix = (
                "Pass --resume to continue it, --overwrite to replace it, or choose another "
                "--output-dir."
                if entries is not None
                else "Pass --resume to continue it, or choose another --output-dir (--overwrite "
                f"needs the manifest {MANIFEST} that runs of this tfxfer version write)."
            )
            shown = ", ".join(markers) if markers else MANIFEST
            raise RunDirError(f"Output directory {path!r} already holds a run ({shown}). {fix}")
        _refuse_foreign(path, foreign, holds_run=holds_run)
        return False

    @classmethod
    def check_inputs(cls, output_dir: str, paths: list[str | None]) -> None:
        """Raises `RunDirError` if an input path and the output directory overlap.

        A data folder inside the output directory would be written into (and then read back
        with `checkpoints/` as a class), and one that holds the output directory would get the
        run as a new class folder; neither is the run's to change. Paths are compared after
        resolving links, so `data` and `./runs/../data` are the same.

        Args:
            output_dir: str. The run directory.
            paths: list of str or None. The run's inputs (data, weights, a local backbone);
                None entries are skipped.
        """
        output = _resolved(output_dir)
        sep = "/" if fs.is_url(output) else os.sep
        for given in paths:
            if given is None or not str(given).strip():
                continue
            path = _resolved(given)
            if path == output or path.startswith(output.rstrip(sep) + sep):
                where = "is" if path == output else "lies inside"
                raise RunDirError(
                    f"Input path {given!r} {where} the output directory {output_dir!r}: the run "
                    "would write among your data and read its own files back as data. Pass an "
                    "--output-dir outside your data, e.g. --output-dir runs/my_run."
                )
            if output.startswith(path.rstrip(sep) + sep):
                raise RunDirError(
                    f"The output directory {output_dir!r} lies inside the input path {given!r}: "
                    "the run would add its files to your data (a new class folder, for an image "
                    "folder). Pass an --output-dir outside your data, e.g. --output-dir "
                    "runs/my_run."
                )

    def _remove_earlier_run(self) -> None:
        # `check` has made sure the directory holds only the manifest's entries and our
        # temporary files; anything else would have been refused.
        entries = _read_manifest(self.path)
        if entries is None:
            return
        leftovers = [n for n in _listing(self.path) if n.startswith(TMP_PREFIX)]
        for name in sorted(entries) + leftovers:
            target = fs.join(self.path, name)
            if fs.is_url(target):
                if fs.isdir(target):
                    fs.rmtree(target)
                elif fs.exists(target):
                    fs.remove(target)
            elif os.path.islink(target) or os.path.isfile(target):
                os.remove(target)  # A link is removed, never followed.
            elif os.path.isdir(target):
                fs.rmtree(target)
        # Emptied only now: a crash above leaves entries listed, and so still ours to delete.
        self._write_manifest(set())

    def _adopt_earlier_run(self) -> None:
        # A run from before the manifest existed, continued with --resume: a complete
        # checkpoint shows tfxfer wrote it, so its run entries are recorded as tfxfer's.
        # Without one, nothing is adopted, and an --overwrite later refuses those files.
        if not fs.isfile(fs.join(self.checkpoints, "latest.json")):
            return
        names = _listing(self.path)
        self._write_manifest({name for name in RUN_ENTRIES if name in names})

    def _write_manifest(self, entries: set[str]) -> None:
        fs.makedirs(self.path)
        atomic_write_json(
            fs.join(self.path, MANIFEST),
            {
                "written_by": "tfxfer",
                "format": MANIFEST_FORMAT,
                "about": "The entries tfxfer wrote in this run directory; --overwrite "
                "deletes exactly these (and tfxfer's .tmp-* files), nothing else.",
                "entries": sorted(entries),
            },
        )

    def _record(self, name: str) -> str:
        """Records the top-level entry of `name` in the manifest; returns the entry."""
        if os.path.isabs(name):
            raise RunDirError(f"Expected a path relative to the run directory. Received: {name!r}.")
        entry = os.path.normpath(name).split(os.sep)[0]
        try:
            _check_entry_name(entry)
        except ValueError:
            raise RunDirError(
                f"Expected a path inside the run directory {self.path!r}. Received: {name!r}."
            ) from None
        if not self.write:
            return entry
        entries = _read_manifest(self.path) or set()
        if entry in entries:
            return entry
        target = fs.join(self.path, entry)
        if fs.exists(target) if fs.is_url(target) else os.path.lexists(target):
            raise RunDirError(
                f"Refusing to write {target!r}: it is already there "
                f"and tfxfer did not write it (it is not in {MANIFEST}). Move it out of the run "
                "directory, or choose another --output-dir."
            )
        self._write_manifest(entries | {entry})
        return entry

    def _markers(self) -> list[str]:
        return [name for name in RUN_MARKERS if fs.exists(fs.join(self.path, name))]

    def holds_run(self) -> bool:
        return bool(self._markers()) or fs.isfile(fs.join(self.path, MANIFEST))

    def owned_entries(self) -> list[str]:
        """The top-level entries tfxfer wrote here, as the manifest lists them."""
        return sorted(_read_manifest(self.path) or ())

    def close(self) -> None:
        """Releases the directory's lock: another run may write it from now on."""
        if self.lock is not None:
            self.lock.release()

    def file(self, name: str) -> str:
        """The path of `name` in the run, recorded in the manifest as tfxfer's to write.

        Call it for every path the run writes; it refuses an entry that is already there
        without having been written by tfxfer.
        """
        self._record(name)
        return fs.join(self.path, name)

    @property
    def checkpoints(self) -> str:
        return fs.join(self.path, "checkpoints")

    def write_json(self, name: str, obj: Any) -> str:
        path = self.file(name)
        atomic_write_json(path, obj)
        return path

    def read_json(self, name: str) -> Any:
        with fs.open(fs.join(self.path, name)) as handle:
            return json.load(handle)
