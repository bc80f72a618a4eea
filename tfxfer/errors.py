"""The errors tfxfer raises for bad input.

Every problem a user can fix (a missing folder, a wrong backbone name, a weights file for
another architecture) is raised as a `TfxferError` whose message names what was received and
what would fix it. The recipes and the `tfxfer` command catch this one class and print the
message alone, so a user never has to read a TensorFlow traceback to learn that a path is
wrong. Anything else that escapes is a bug in tfxfer and keeps its traceback.
"""

from __future__ import annotations


class TfxferError(ValueError):
    """A problem with the user's input, config or files, with a message that says how to fix it."""


class DataError(TfxferError):
    """The training or evaluation data cannot be used as given."""


class WeightsError(TfxferError):
    """Pretrained weights cannot be found, fetched, verified or loaded."""


class RunDirError(TfxferError):
    """The output directory cannot be used without losing or mixing an earlier run."""
