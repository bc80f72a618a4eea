"""Where a run may write, and one run at a time there: refused places, unreachable buckets,
and a lock file naming the process that holds a run directory.

`refuse_shared_locations` keeps runs out of `/`, the home and the working directory;
`check_reachable` names a bucket that cannot be reached instead of TensorFlow's page.

Two runs started into one `--output-dir` would write the same checkpoints, history and
model, and one of them (or a `--overwrite`, or the replacement of a run that stopped before
its first checkpoint) could delete what the other is writing. So a run directory is locked
while a run writes it: `.tfxfer-lock.json` holds the writer's process id, host, start time
and command, created atomically (`O_EXCL`: of two runs started at once, exactly one gets
it). A second run is refused at once, in one line that names the holder.

A lock whose holder has ended without removing it (SIGKILL, a power cut) is stale. On the
same host tfxfer can tell (the process id no longer runs): the stale lock is reported and
replaced. Held from another host (a shared file system), it cannot: the run is refused with
the holder's details, and the user deletes the file once sure that run is gone. A process
may take a lock it already holds again (a resume in the same Python session).

Only local directories are locked: an object store (`gs://`) has no atomic create-if-absent
through `tf.io.gfile`, and there the rule stays the user's (one run per directory).
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

LOCK_FILE = ".tfxfer-lock.json"

log = logging.getLogger(__name__)


def holder_description(holder: dict[str, Any]) -> str:
    return (
        f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')} ({holder.get('command', '?')})"
    )


class RunLock:
    """The lock of run directory `directory` (which must exist before `acquire`)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says, None without one; `{}` when it cannot be read."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                found = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def check(self) -> None:
        """Raises `RunDirError` when another live run holds the lock (changes nothing)."""
        holder = self.holder()
        if holder is None or _is_this_process(holder) or _stale(holder):
            return
        raise _in_use(os.path.dirname(self.path), holder)

    def acquire(self) -> None:
        """Takes the lock, replacing a stale one with a warning; raises `RunDirError` when
        another live run (or one this host cannot see) holds it."""
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released in between: try again
                if _is_this_process(holder):
                    self.held = True
                    return
                if not _stale(holder):
                    raise _in_use(os.path.dirname(self.path), holder) from None
                log.warning(
                    "Replacing a stale lock in %r: its %s is no longer running.",
                    os.path.dirname(self.path),
                    holder_description(holder),
                )
                _remove_if(self.path, holder)
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(_this_process(), handle)
            self.held = True
            atexit.register(self.release)
            return
        raise _in_use(os.path.dirname(self.path), self.holder() or {})

    def release(self) -> None:
        """Removes the lock if this process holds it; otherwise leaves it."""
        if not self.held:
            return
        self.held = False
        holder = self.holder()
        if holder and _is_this_process(holder):
            _remove_if(self.path, holder)


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv))[:300],
    }


def _is_this_process(holder: dict[str, Any]) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _stale(holder: dict[str, Any]) -> bool:
    """Whether the holder is known to have ended: a process of this host that is gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _in_use(directory: str, holder: dict[str, Any]) -> RunDirError:
    if not holder:
        return RunDirError(
            f"Output directory {directory!r} is locked ({LOCK_FILE} is there but cannot be "
            "read). If no run is using it, delete that file and run again; otherwise choose "
            "another --output-dir."
        )
    elsewhere = holder.get("host") != socket.gethostname()
    return RunDirError(
        f"Output directory {directory!r} is in use by another run: {holder_description(holder)}."
        + (
            " tfxfer cannot tell from this host whether it still runs: if it does not, delete "
            f"{os.path.join(directory, LOCK_FILE)!r} and run again."
            if elsewhere
            else " Wait for it to finish, or choose another --output-dir."
        )
    )


def _remove_if(path: str, holder: dict[str, Any]) -> None:
    """Removes the lock file if it still names `holder` (not a lock taken since)."""
    try:
        with open(path, encoding="utf-8") as handle:
            current = json.load(handle)
    except (OSError, ValueError):
        return
    if current == holder:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


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
