"""Runs `test_bad_input.py`'s command-line cases one after another in one interpreter.

`python -m module --flags` for each case, as `python` would run it: `runpy.run_module(module,
run_name="__main__")` with `sys.argv` set, in the case's working directory, with file
descriptors 1 and 2 pointed at the case's own files (so TensorFlow's C++ output lands there
too). A `SystemExit` gives the exit status; any other exception is printed as the
interpreter would print it, with status 1. What this saves is TensorFlow's import, paid once
instead of once a case (~5 s each on 2 cores). The one thing a shared interpreter cannot show,
the top-level handling of an exception nothing caught, is checked in a process of its own
(`test_an_unexpected_error_is_one_line_unless_debug`).

    python bad_input_driver.py JOBS.json RESULTS.json

JOBS.json: a list of {"id", "argv" (["-m", module, *flags]), "cwd", "stdout", "stderr",
"tiny_rows"}; a job with "tiny_rows" true runs with the tiny image rows ("tinynet",
`helpers.TINY_ROWS`) in the backbone table, for that job only.
RESULTS.json: {id: exit status}, written after every case (a crash still leaves the earlier
ones).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what the interpreter does with `sys.exit("message")`
    return 1


def run_case(job: dict) -> int:
    argv = job["argv"]
    if argv[:1] != ["-m"]:
        raise ValueError(f"a case runs a module: ['-m', module, *flags]; got {argv!r}")
    os.chdir(job["cwd"])
    tiny_rows = None
    if job.get("tiny_rows"):
        import pytest
        from helpers import register_tiny_backbones  # this file's folder is on sys.path

        tiny_rows = pytest.MonkeyPatch()
        register_tiny_backbones(tiny_rows)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    try:
        sys.argv = [argv[1], *argv[2:]]
        try:
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as stop:
            status = _exit_status(stop.code)
        except BaseException:  # noqa: BLE001 - printed as the interpreter would
            traceback.print_exc()
            status = 1
    finally:
        if tiny_rows is not None:
            tiny_rows.undo()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (out, err, *saved):
            os.close(fd)
    return status


def main(jobs_path: str, results_path: str) -> None:
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    results: dict[str, int] = {}
    for job in jobs:
        results[job["id"]] = run_case(job)
        with open(results_path, "w", encoding="utf-8") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
