"""Importing TensorFlow without its start-up noise (shown again with `--debug`).

On a machine without a GPU, importing TensorFlow prints lines such as "Could not find cuda
drivers on your machine" and "failed call to cuInit: ... UNKNOWN ERROR (303)" to the process's
stderr, from C++, before TensorFlow's own log level applies; they are the first thing a CPU
user reads, and none of them is a problem. `import_tensorflow_quietly` imports TensorFlow and
lets it look for GPUs with file descriptor 2 pointed at a temporary file, then writes back
every captured line that is not one of these known start-up messages, so nothing else is
hidden; if the import fails, everything captured is written back. It also sets
`TF_CPP_MIN_LOG_LEVEL=3` unless the user set it: TensorFlow's C++ log lines off, errors
included. An error that matters reaches Python as an exception, which tfxfer reports; what
is left are notices written at the "error" level that are none, such as "oneDNN supports
DT_INT64 only on platforms with AVX-512. Falling back..." on every text prediction on a CPU
without AVX-512. Set `TF_CPP_MIN_LOG_LEVEL=2` (or pass `--debug`) to see them.

`--debug` on the command line, or `TFXFER_DEBUG=1`, leaves TensorFlow's output as it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# The start-up lines TensorFlow writes on machines without a GPU or TensorRT, and CPU-feature
# notices; matched per line.
STARTUP_NOISE = re.compile(
    r"cudart_stub\.cc|cuda_platform\.cc|cuda_driver\.cc|failed call to cuInit|"
    r"cpu_feature_guard\.cc|To enable the following instructions|rebuild TensorFlow with|"
    r"absl::InitializeLog\(\)|oneDNN custom operations are on|"
    r"Unable to register cu(DNN|FFT|BLAS) factory|computation_placer|TF-TRT Warning|"
    r"cuda_(dnn|fft|blas)\.cc|port\.cc:\d+\] oneDNN"
)


def debug_requested() -> bool:
    """`--debug` among the command-line arguments, or `TFXFER_DEBUG` set to a true value."""
    flag = os.environ.get("TFXFER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return flag or "--debug" in sys.argv[1:]


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (and lets it probe for GPUs) without its known start-up lines."""
    if "tensorflow" in sys.modules or debug_requested():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with stderr_without(STARTUP_NOISE):
        import tensorflow as tf

        # The cuInit message comes when TensorFlow first looks for devices, not at import.
        tf.config.list_physical_devices("GPU")


@contextlib.contextmanager
def stderr_without(noise: re.Pattern):
    """Runs the block with file descriptor 2 (C++ writes there too) pointed at a temporary
    file, then writes back every captured line `noise` does not match; everything, when the
    block raised. With `--debug` (or no file descriptor 2) the block runs as it is."""
    if debug_requested():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no file descriptor 2 to point elsewhere
        yield
        return
    failed = True
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [
                line
                for line in text.splitlines()
                if line.strip() and (failed or not noise.search(line))
            ]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
