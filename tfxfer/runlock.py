"""Where a run may write, and one run at a time there: refused places, unreachable buckets,
and a lock on the run directory naming the process that holds it.

`refuse_shared_locations` keeps runs out of `/`, the home and the working directory;
`check_reachable` names a bucket that cannot be reached instead of TensorFlow's page.

Two runs started into one `--output-dir` would write the same checkpoints, history and
model, and one of them (or a `--overwrite`, or the replacement of a run that stopped before
its first checkpoint) could delete what the other is writing. So a recipe locks its run
directory while it runs: `.tfxfer-lock.json` is held with `flock` (an exclusive lock the
kernel drops when the holding process ends, however it ends: SIGKILL, a crash, a power cut)
and names the holder (process id, host, start time, command) for the message a second run
gets. A second run is refused at once, in one line that names the holder. A lock file whose
`flock` is free is stale, whatever it says: the run that wrote it has ended, and the next
run reports it and takes it over. A process may take a lock it already holds (a resume in
the same Python session): holds are counted, and the lock goes when the last is released.

Only local directories are locked: an object store (`gs://`) has no such lock through
`tf.io.gfile`, and there the rule stays the user's (one run per directory). Where `fcntl`
is missing (Windows), runs are not locked.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import shlex
import socket
import sys
from typing import Any

import tensorflow as tf

from tfxfer import fs
from tfxfer.errors import RunDirError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".tfxfer-lock.json"

log = logging.getLogger(__name__)

# The locks this process holds: real path of the lock file -> [descriptor, holds].
_HELD: dict[str, list[int]] = {}


def holder_description(holder: dict[str, Any]) -> str:
    return (
        f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')} ({holder.get('command', '?')})"
    )


class RunLock:
    """The lock of run directory `directory` (which must exist before `acquire`)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self.key = os.path.realpath(self.path)
        self.held = False

    def check(self) -> None:
        """Raises `RunDirError` when another live process holds the lock; takes nothing."""
        if fcntl is None or self.key in _HELD:
            return
        try:
            descriptor = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or none this user can read): nothing holds it
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(os.path.dirname(self.path), _read(descriptor)) from None
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        finally:
            os.close(descriptor)

    def acquire(self) -> None:
        """Takes the lock (once more, if this process holds it); raises `RunDirError` when
        another live process holds it. A stale lock file is reported and taken over."""
        if fcntl is None or self.held:
            return
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            self.held = True
            return
        for _ in range(3):
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(descriptor)
                os.close(descriptor)
                raise _in_use(os.path.dirname(self.path), holder) from None
            # Locked; but the file may have been removed (a holder releasing it) between
            # the open and the lock: then this lock guards nothing, and the next try opens
            # the file that is there now.
            try:
                same = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(descriptor)
                continue
            earlier = _read(descriptor)
            if earlier:
                log.warning(
                    "Replacing a stale lock in %r: its %s has ended.",
                    os.path.dirname(self.path),
                    holder_description(earlier),
                )
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(_this_process()).encode("utf-8"), 0)
            _HELD[self.key] = [descriptor, 1]
            self.held = True
            atexit.register(self.release)
            return
        raise RunDirError(
            f"Could not lock {os.path.dirname(self.path)!r}: its lock file kept changing. "
            "Another run is starting there; wait for it, or choose another --output-dir."
        )

    def release(self) -> None:
        """Gives back this hold; the lock goes (and its file) with the last one."""
        if not self.held:
            return
        self.held = False
        entry = _HELD.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[self.key]
        try:
            os.remove(self.path)  # while still locked: no other run holds this file
        except FileNotFoundError:
            pass
        os.close(entry[0])


def _read(descriptor: int) -> dict[str, Any]:
    """The holder the lock file names; {} when it names none (empty, or not JSON)."""
    try:
        size = os.fstat(descriptor).st_size
        found = json.loads(os.pread(descriptor, size, 0).decode("utf-8")) if size else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv))[:300],
    }


def _in_use(directory: str, holder: dict[str, Any]) -> RunDirError:
    who = holder_description(holder) if holder else "a process that is still starting"
    return RunDirError(
        f"Output directory {directory!r} is in use by another run: {who}. Wait for it to "
        "finish, or choose another --output-dir."
    )


def check_reachable(url: str) -> None:
    """Raises `RunDirError` naming `url` when its storage cannot be reached (no network, an
    unknown host), instead of TensorFlow's page about libcurl."""
    try:
        fs.exists(url)
    except tf.errors.OpError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        detail = first.rsplit("error details: ", 1)[-1]
        raise RunDirError(
            f"Cannot reach {url!r} ({detail}). Check the network connection, the bucket's "
            "name and your credentials, or choose a local --output-dir."
        ) from None


def refuse_shared_locations(given: str, path: str) -> None:
    """Refuses the directories a run must never own: /, home, the working directory."""
    if not str(given).strip():
        raise RunDirError(
            f"Expected a directory for the run. Received: output_dir={given!r}, which would "
            "be the current directory. Pass a new directory, e.g. --output-dir runs/my_run."
        )
    real = os.path.realpath(path)
    shared = [
        (os.path.realpath(os.sep), "the filesystem root"),
        (os.path.realpath(os.path.expanduser("~")), "your home directory"),
    ]
    try:
        shared.append((os.path.realpath(os.getcwd()), "the current directory"))
    except OSError:  # The working directory was deleted: there is nothing there to protect.
        pass
    for location, what in shared:
        if real == location:
            raise RunDirError(
                f"Expected a directory of the run's own. Received: output_dir={given!r}, "
                f"which is {what} ({real!r}): a run there would mix its files into yours. "
                "Pass a new directory, e.g. --output-dir runs/my_run."
            )
    for location, what in shared[1:]:
        # A parent of home or of the working directory holds the user's files too.
        if location.startswith(real.rstrip(os.sep) + os.sep):
            raise RunDirError(
                f"Expected a directory of the run's own. Received: output_dir={given!r} "
                f"({real!r}), which holds {what}. Pass a new directory, e.g. --output-dir "
                "runs/my_run."
            )
