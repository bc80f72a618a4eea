"""Tests for `tfxfer.keras_compat`, the multi-worker patch for keras#20585.

The patched multi-worker run itself (two stages, evaluate, predict, equal to one process)
is `test_multi_worker_trains_two_stages_like_one_process` in `test_distribute.py`. Here:
the patch's guards, and proof in real worker processes that each part of it is still
needed. When Keras fixes the bug, those tests fail with "upstream fixed keras#20585",
which is the signal to delete the patch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import keras
import multiworker_helpers as mh
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import trainer

from tfxfer import keras_compat


@pytest.fixture
def clean_patch_state() -> Iterator[None]:
    """Runs a test on stock Keras and leaves the patch as the test found it."""
    was_patched = keras_compat.is_patched()
    keras_compat.unpatch_keras_for_multi_worker()
    try:
        yield
    finally:
        keras_compat.unpatch_keras_for_multi_worker()
        if was_patched:
            keras_compat.patch_keras_for_multi_worker()


def test_patch_is_idempotent_logged_and_undoable(
    clean_patch_state: None, caplog: pytest.LogCaptureFixture
) -> None:
    stock_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    stock_reduce = trainer.reduce_per_replica
    with caplog.at_level(logging.INFO, logger="tfxfer.keras_compat"):
        assert keras_compat.patch_keras_for_multi_worker() == ["symbolic_build", "metric_reduce"]
    assert "symbolic_build, metric_reduce" in caplog.text and "20585" in caplog.text
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is not stock_build
    assert trainer.reduce_per_replica is not stock_reduce
    patched_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    assert keras_compat.patch_keras_for_multi_worker() == []  # Already applied.
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is patched_build
    assert sorted(keras_compat.unpatch_keras_for_multi_worker()) == [
        "metric_reduce",
        "symbolic_build",
    ]
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is stock_build
    assert trainer.reduce_per_replica is stock_reduce
    assert not keras_compat.is_patched()


def test_patch_only_applies_to_tested_keras_versions(
    clean_patch_state: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert keras.__version__ in keras_compat.PATCHED_KERAS_VERSIONS, (
        f"Keras {keras.__version__} is installed but the patch covers "
        f"{keras_compat.PATCHED_KERAS_VERSIONS}: run these tests against it and widen the range"
    )
    for untested in ("3.10.0", "3.16.0", "4.0.0"):
        monkeypatch.setattr(keras, "__version__", untested)
        with caplog.at_level(logging.WARNING, logger="tfxfer.keras_compat"):
            assert keras_compat.patch_keras_for_multi_worker() == []
        assert f"Keras {untested} is outside" in caplog.text
        assert not keras_compat.is_patched()
    assert keras_compat.patch_keras_for_multi_worker(force=True) == [
        "symbolic_build",
        "metric_reduce",
    ]
    with pytest.raises(ValueError, match="symbolic_build"):
        keras_compat.patch_keras_for_multi_worker(only=("nope",))


def test_patched_keras_still_trains_on_one_host(clean_patch_state: None) -> None:
    """Single-host strategies keep the stock code paths: same numbers with and without."""
    x = np.linspace(-1, 1, 32, dtype="float32").reshape(16, 2)
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
    results = []
    for patched in (False, True):
        if patched:
            keras_compat.patch_keras_for_multi_worker()
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            model = keras.Sequential(
                [keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")]
            )
            model.set_weights([np.full((2, 1), 0.3, "float32"), np.zeros((1,), "float32")])
            model.compile(
                optimizer=keras.optimizers.SGD(0.5),
                loss="binary_crossentropy",
                metrics=["accuracy"],
            )
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
        results.append((history, model.evaluate(x, y, verbose=0), model.predict(x, verbose=0)))
    (h0, e0, p0), (h1, e1, p1) = results
    assert h0 == h1 and e0 == e1
    np.testing.assert_array_equal(p0, p1)


# === The bug is still there upstream (each part of the patch is needed) ===

UPSTREAM_FIXED = "upstream fixed keras#20585: remove tfxfer.keras_compat patch"


class KnownKerasBug(AssertionError):
    """Workers failed exactly the way keras#20585 makes them fail."""


PER_REPLICA_BATCH = "Attempt to convert a value (PerReplica"
SCALAR_AXIS_0 = "Invalid reduction dimension 0 for input with 0 dimensions"


def _multi_worker_fit(tmp_path: Path, patch: str, known_errors: tuple[str, ...]) -> None:
    """Runs the two-stage program on 2 workers; raises `KnownKerasBug` on a known error."""
    results = mh.run_workers(
        mh.THIS_FILE,
        ["two_stage", "--out", str(tmp_path), "--patch", patch],
        num_workers=2,
        log_dir=tmp_path / "logs",
        timeout=120,
        grace=15,
    )
    if all(r.ok for r in results):
        return  # Keras trained without (this part of) the patch: the xfail turns into XPASS.
    timed_out = any(r.killed_by == "timeout" for r in results)
    seen = [e for e in known_errors if any(e in r.output for r in results)]
    if seen and not timed_out:
        raise KnownKerasBug(f"{seen[0]!r}, as reported in keras#20585")
    raise AssertionError(  # Anything else is a real failure, not the known bug.
        f"Workers failed, but not with {known_errors}:\n{mh.describe_results(results)}"
    )


@pytest.mark.xfail(raises=KnownKerasBug, strict=True, reason=UPSTREAM_FIXED)
@pytest.mark.large
def test_unpatched_multi_worker_fit_fails(tmp_path: Path) -> None:
    _multi_worker_fit(tmp_path, "none", (PER_REPLICA_BATCH, SCALAR_AXIS_0))


def _needs(missing: str, applied: str, known_error: str) -> object:
    return pytest.param(
        applied,
        known_error,
        id=f"without_{missing}",
        marks=pytest.mark.xfail(
            raises=KnownKerasBug, strict=True, reason=f"{UPSTREAM_FIXED} part {missing!r}"
        ),
    )


@pytest.mark.parametrize(
    ("applied", "known_error"),
    [
        _needs("symbolic_build", applied="metric_reduce", known_error=PER_REPLICA_BATCH),
        _needs("metric_reduce", applied="symbolic_build", known_error=SCALAR_AXIS_0),
    ],
)
@pytest.mark.large
def test_each_part_of_the_patch_is_needed(tmp_path: Path, applied: str, known_error: str) -> None:
    _multi_worker_fit(tmp_path, applied, (known_error,))
