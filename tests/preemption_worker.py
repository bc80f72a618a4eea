"""`schedule_worker.py` behind the command line's error boundary, for the preemption tests.

A recipe ends through `tfxfer.cli.error_boundary`, and what a user (or a job scheduler) sees
of a preempted run is what the boundary makes of it: one line and exit status 143. This
program runs `schedule_worker.main` exactly as that program does, but inside the boundary:

    python tests/preemption_worker.py --run-dir RUN --out OUT [--sigterm-at E:B] [--resume]

and takes every option `schedule_worker.py` takes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import schedule_worker  # This file's folder is first on sys.path when it runs as a script.

THIS_FILE = Path(__file__).resolve()


def command(run_dir: str | Path, out: str | Path, *args: str) -> list[str]:
    """The argv that runs this program (for `multiworker_helpers.run_processes`)."""
    return [sys.executable, str(THIS_FILE), "--run-dir", str(run_dir), "--out", str(out), *args]


if __name__ == "__main__":
    arguments = schedule_worker.parse_args()
    from tfxfer.cli import error_boundary

    # debug=True: an unexpected error keeps its traceback, for the test's failure message.
    status = error_boundary(lambda: schedule_worker.main(arguments), debug=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # Skip TensorFlow's teardown.
