"""The errors tfxfer raises for bad input.

Every problem a user can fix (a missing folder, a wrong backbone name, a weights file for
another architecture) is raised as a `TfxferError` whose message names what was received and
what would fix it. The recipes and the `tfxfer` command catch this one class and print the
message alone, so a user never has to read a TensorFlow traceback to learn that a path is
wrong. Anything else that escapes is a bug in tfxfer and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TfxferError(ValueError):
    """A problem with the user's input, config or files, with a message that says how to fix it."""


class DataError(TfxferError):
    """The training or evaluation data cannot be used as given."""


class WeightsError(TfxferError):
    """Pretrained weights cannot be found, fetched, verified or loaded."""


class RunDirError(TfxferError):
    """The output directory cannot be used without losing or mixing an earlier run."""


class Preempted(Exception):
    """Training stopped on a preemption notice (SIGTERM) or Ctrl-C (SIGINT), after writing a
    checkpoint.

    Not a `TfxferError`: nothing is wrong with the user's input. The machine is being taken
    away (a spot or preemptible VM, a Slurm job at its time limit), or the user pressed
    Ctrl-C, and the run did what it could: it finished the step in flight, wrote a
    checkpoint, and stopped. `--resume` goes on from that checkpoint. The command line ends
    with one line and exit status 128 + the signal's number (143 for SIGTERM, 130 for
    SIGINT), what a process killed by that signal reports.

    Args:
        epoch: int. The epoch of the last training step done, from 1.
        step: int. That step's number in its epoch, from 1.
        checkpoint: str. The checkpoint directory written.
        signum: int. The signal that stopped it. Defaults to 15 (SIGTERM).
    """

    def __init__(self, epoch: int, step: int, checkpoint: str, signum: int = 15):
        super().__init__(
            f"checkpoint written after epoch {epoch} step {step}; rerun with --resume to continue"
        )
        self.epoch = epoch
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum
        self.exit_status = 128 + signum
        # What the command line calls it: "tfxfer: preempted: ..." / "tfxfer: interrupted: ...".
        self.kind = "interrupted" if signum == 2 else "preempted"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the choice closest to `word`, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
