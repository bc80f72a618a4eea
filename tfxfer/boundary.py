"""The one error boundary, and the logging a command-line run sets up.

`error_boundary` is where every command-line entry point (the `tfxfer` command, and every
recipe through `tfxfer.recipe.command_line`) meets the user. What the user can fix ends as one
line, `tfxfer: error: <what was wrong and what would fix it>`, and exit status 2: a
`TfxferError`, and the few failures that are always about the user's machine rather than
tfxfer's code (a path that is a file, a folder without write permission, a full disk, running
out of memory). Anything else is a bug in tfxfer: one line naming it and exit status 1, and
with `--debug` its traceback. The Python API never goes through the boundary: library calls
raise.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from tfxfer.errors import Preempted, TfxferError

# What `--debug` says in `--help`, for this command and every recipe.
DEBUG_HELP = "on an unexpected error, show the full traceback instead of one line"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other error: one `tfxfer: error:` line and
    status 2, pointing to --help instead of printing the whole usage."""

    def error(self, message: str):
        self.exit(2, f"tfxfer: error: {message} (see {self.prog} --help)\n")


def error_boundary(action: Callable[[], Any], *, debug: bool = False) -> int:
    """Runs `action` and returns an exit status: 0, 2 for the user's error, 1 for tfxfer's.

    A run stopped by a preemption notice or Ctrl-C (`Preempted`) is none of these: one line
    saying where its checkpoint is, and status 143 (SIGTERM) or 130 (SIGINT), as a process
    ended by that signal reports. Ctrl-C anywhere else ends in one line and status 130 too.

    A user with a wrong path reads one sentence, not a traceback. An exception that is not
    the user's is a bug; it is named in one line too, because a page of TensorFlow frames
    helps nobody who did not write tfxfer, and `--debug` brings the traceback back.

    Args:
        action: callable. What the command does.
        debug: bool. Print tracebacks, and let an unexpected exception propagate (Python then
            prints it and exits with status 1). Defaults to `False`.
    """
    try:
        action()
    except Preempted as notice:
        print(f"tfxfer: {notice.kind}: {notice}", file=sys.stderr)
        return notice.exit_status
    except KeyboardInterrupt:
        # Ctrl-C outside training's steps (loading, evaluating), or twice within them.
        if debug:
            raise
        print(
            "tfxfer: interrupted (Ctrl-C); a run continues from its last checkpoint with --resume",
            file=sys.stderr,
        )
        return 128 + 2
    except Exception as error:  # the boundary: everything a command raises ends here
        message = str(error) if isinstance(error, TfxferError) else user_error_message(error)
        if message is None:
            if debug:
                raise
            detail = one_line(error)
            print(
                f"tfxfer: internal error: {type(error).__name__}{': ' if detail else ''}{detail} "
                "(run with --debug for the traceback)",
                file=sys.stderr,
            )
            return 1
        if debug:
            traceback.print_exc()
        print(f"tfxfer: error: {one_line(message)}", file=sys.stderr)
        return 2
    return 0


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for an exception that is the user's to fix, or None for a bug.

    These are failures tfxfer cannot check for in advance everywhere they may happen (the
    disk fills, a folder is not writable, memory runs out at the first large batch), and that
    are never a bug in tfxfer's code.
    """
    if is_disk_full(error):
        path = getattr(error, "filename", None)
        where = f" writing {os.fsdecode(path)!r}" if path is not None else ""
        return (
            f"No space left on the device{where}. What was written before is intact (a run "
            "keeps its last complete checkpoint): free some space or choose another path, "
            "then run again (--resume continues a run)."
        )
    text = str(error)
    if "libcurl code" in text or "Could not resolve host" in text:
        detail = one_line(text).rsplit("error details: ", 1)[-1]
        return (
            f"Cannot reach the storage a path names ({detail}). A gs:// or other URL path "
            "needs the network: check the connection and credentials, or use local paths."
        )
    if is_out_of_memory(error):
        return (
            f"Ran out of memory ({type(error).__name__}). Lower --batch-size, or --image-size "
            "/ --sequence-length (batch_size= / image_size= / sequence_length= in Python)."
        )
    if isinstance(error, OSError) and error.filename is not None:
        path = os.fsdecode(error.filename)
        reasons = {
            errno.EACCES: "permission denied. Choose a path you can read and write, or fix "
            "its permissions.",
            errno.EPERM: "operation not permitted. Choose a path you can read and write, or fix "
            "its permissions.",
            errno.EROFS: "it is on a read-only file system. Choose a writable path.",
            errno.ENOTDIR: "a part of the path is a file, not a folder. Choose another path.",
            errno.EEXIST: "it already exists, and is not a folder that can be used here. "
            "Choose another path.",
            errno.EISDIR: "it is a folder where a file was expected.",
            errno.ENOENT: "it, or a folder above it, does not exist (or cannot be created there).",
            errno.ENAMETOOLONG: "the name is too long. Choose a shorter path.",
        }
        reason = reasons.get(error.errno)
        if reason is not None:
            return f"Cannot use {path!r}: {reason}"
    return None


def is_disk_full(error: BaseException) -> bool:
    """A write that failed for want of space (or of quota), however it was raised: an
    `OSError` from Python's own files, or TensorFlow's and h5py's errors, which only say it in
    their message."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    tf = sys.modules.get("tensorflow")  # an error of TensorFlow's means it is imported
    return tf is not None and isinstance(error, tf.errors.ResourceExhaustedError)


def one_line(message: Any) -> str:
    """The message on one line: a TensorFlow error's first line, or lines joined."""
    text = str(message).strip()
    if isinstance(message, (TfxferError, str)):
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    # Other libraries' messages (TensorFlow's) go on for pages after the first line.
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= 500 else first[:497] + "..."


def cli_logging() -> None:
    """Logging for a command-line run: tfxfer's INFO lines, other libraries' from WARNING."""
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s %(message)s")
    logging.getLogger("tfxfer").setLevel(logging.INFO)
