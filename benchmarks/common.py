"""What the benchmark scripts share: child processes, machine facts, README sections.

Every measurement runs in a fresh child process (the same script with `--child SPEC`), so a
variant's memory, thread pools and traced functions never leak into the next one, and so the
parent stays free of TensorFlow. A child prints progress lines and, last, one `RESULT {json}`
line; the parent collects those and writes the tables.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = Path(__file__).resolve().parent / "README.md"
RESULT_PREFIX = "RESULT "
# Lines TensorFlow and absl print whatever TF_CPP_MIN_LOG_LEVEL says; not worth forwarding.
_NOISE = re.compile(r"^(I0000|W0000|E0000|WARNING: All log messages|To enable the following)")


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # The children import tfxfer and recipes from this checkout, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_child(script: str, spec: dict[str, Any], label: str) -> dict[str, Any]:
    """Runs `script --child SPEC` in a fresh interpreter; returns its RESULT, or raises."""
    command = [sys.executable, script, "--child", json.dumps(spec)]
    started = time.perf_counter()
    print(f"  -> {label} ...", flush=True)
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_environment(),
            cwd=str(REPO),
        )
        result = None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX) :])
            elif line.strip() and not _NOISE.match(line):
                print(f"     {line}", flush=True)
        code = process.wait()
        if code != 0 or result is None:
            stderr.seek(0)
            tail = [x for x in stderr.read().splitlines() if not _NOISE.match(x)][-25:]
            raise RuntimeError(
                f"{label} failed (exit code {code}). Last lines of its stderr:\n" + "\n".join(tail)
            )
    print(f"     done in {time.perf_counter() - started:.0f} s (process wall time)", flush=True)
    return result


def emit_result(result: dict[str, Any]) -> None:
    """The child's last line: what the parent parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def quiet_tensorflow() -> None:
    """Sets the backend and log level before TensorFlow is imported."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    """Read-only git queries (commit, dirty files) for the record; empty if git is missing."""
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                "",
            )
    except OSError:
        pass
    dirty = [line[3:] for line in _git("status", "--porcelain").splitlines() if line[3:]]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "gpu": "an NVIDIA GPU" if os.path.exists("/proc/driver/nvidia/version") else "no GPU",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "keras": _version("keras"),
        "keras_hub": _version("keras-hub"),
        "tfxfer_commit": _git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted_files": dirty,
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "cwd": os.getcwd(),
    }


def facts_markdown(facts: dict[str, Any], wall_seconds: float) -> str:
    dirty = facts["uncommitted_files"]
    return "\n".join(
        [
            f"- date: {facts['date']}; whole script: {wall_seconds / 60:.1f} min",
            f"- machine: {facts['nproc']} CPU cores ({facts['cpu']}), {facts['gpu']}; load average "
            f"at start {', '.join(map(str, facts['load_average_at_start']))} (above the core "
            "count means other processes were competing for the cores)",
            f"- versions: Python {facts['python']}, TensorFlow {facts['tensorflow']}, Keras "
            f"{facts['keras']}, keras-hub {facts['keras_hub']}",
            f"- tfxfer: commit {facts['tfxfer_commit'] or '?'}"
            + (f" plus uncommitted changes in {', '.join(dirty)}" if dirty else " (clean tree)"),
            f"- command (from `{facts['cwd']}`): `{facts['command']}`",
        ]
    )


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(name: str, body: str, path: Path = README) -> None:
    """Puts `body` between `<!-- BEGIN name -->` and `<!-- END name -->`, replacing the old."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    print(f"[benchmarks] wrote section {name!r} of {path}", flush=True)


def publish(section: str, body: str, facts: dict[str, Any], started: float, write: bool) -> None:
    """Prints a script's tables; with `write`, puts them under the run's facts into its
    section of the README (`started`: the script's `time.perf_counter()` at its start)."""
    print("\n" + body + "\n", flush=True)
    if write:
        replace_section(
            section, facts_markdown(facts, time.perf_counter() - started) + "\n\n" + body
        )


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum."""
    return statistics.median(values), min(values), max(values)


def fmt_spread(values: list[float], digits: int = 1, suffix: str = "") -> str:
    """`median (min-max)` or just the value when there is one."""
    if not values:
        return "-"
    mid, low, high = median_spread(values)
    if len(values) == 1:
        return f"{mid:.{digits}f}{suffix}"
    return f"{mid:.{digits}f}{suffix} ({low:.{digits}f}-{high:.{digits}f})"


def add_common_arguments(parser) -> None:
    """The flags every benchmark script takes: README writing, raw output, child mode."""
    parser.add_argument("--no-readme", action="store_true", help="print only; leave README.md")
    parser.add_argument("--save-json", help="also write the raw measurements to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def dispatch(args, child, parent) -> int:
    """Runs one measurement (in a child process) or the whole comparison (the parent)."""
    if args.child:
        child(json.loads(args.child))
        return 0
    return parent(args)
