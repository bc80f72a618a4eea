"""Tests for `tfxfer.transferability`: LogME and the shrinkage H-score.

LogME is checked against the paper's equations written out here with plain matrix inverses
(You et al., ICML 2021, Algorithm 1: MacKay's updates of alpha and beta, then the evidence),
not the library's SVD path; then that more informative features score higher, for every
task.
"""

from __future__ import annotations

import numpy as np
import pytest

from tfxfer.errors import TfxferError
from tfxfer.transferability import (
    _column_evidence,
    _noise_free_limit,
    h_score,
    logme,
    transferability,
)


def _evidence_at(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The paper's evidence per example at given precisions (matrix form)."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    return (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * np.sum((f @ m - y) ** 2)
        - alpha / 2 * (m @ m)
        - np.linalg.slogdet(a)[1] / 2
    ) / n


def _paper_logme_column(f: np.ndarray, y: np.ndarray) -> float:
    """One target column's evidence per example, the paper's way (n x d features f)."""
    n, d = f.shape
    ftf = f.T @ f
    alpha, beta = 1.0, 1.0
    for _ in range(10_000):
        a = alpha * np.eye(d) + beta * ftf  # posterior precision
        m = beta * np.linalg.solve(a, f.T @ y)
        gamma = d - alpha * np.trace(np.linalg.inv(a))  # = sum beta s_i / (alpha + beta s_i)
        new_alpha = gamma / (m @ m)
        new_beta = (n - gamma) / np.sum((f @ m - y) ** 2)
        converged = abs(new_alpha / new_beta - alpha / beta) < 1e-13 * alpha / beta
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    return _evidence_at(f, y, alpha, beta)


def _problem(n=120, d=12, k=3, seed=0, signal=2.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    features = rng.normal(size=(n, d))
    features[:, :k] += signal * np.eye(k)[labels]
    return features, labels


@pytest.mark.parametrize("shape", [(120, 12), (30, 50)])  # more examples, more features
def test_logme_equals_the_papers_equations(shape) -> None:
    n, d = shape
    f, labels = _problem(n=n, d=d)
    if d > n:
        # Of rank 20 < n: features of full rank n would fit any column exactly, and the
        # fixed point then runs off to beta = infinity (noise-free), where the paper's
        # matrix form breaks down in rounding.
        f = f[:, :20] @ np.random.default_rng(1).normal(size=(20, d))
    onehot = np.eye(3)[labels]
    expected = np.mean([_paper_logme_column(f, onehot[:, c]) for c in range(3)])
    assert logme(f, labels) == pytest.approx(expected, abs=1e-6)


def test_logme_ranks_labels_over_signal_over_noise_and_ignores_one_common_scale() -> None:
    f, labels = _problem(n=200, d=16, signal=2.0)
    noise = np.random.default_rng(5).normal(size=f.shape)
    near_labels = np.eye(3)[labels] + 0.05 * np.random.default_rng(6).normal(size=(200, 3))
    scores = [logme(x, labels) for x in (near_labels, f, noise)]
    assert scores[0] > scores[1] > scores[2], scores
    assert logme(f * 1e-11, labels) == pytest.approx(scores[1], abs=1e-6)


def test_logme_and_h_score_on_multi_label_targets() -> None:
    f, labels = _problem(n=150, d=10, k=4, signal=2.5)
    targets = np.eye(4)[labels]
    targets[::3, 0] = 1  # a second label on some rows
    noise = np.random.default_rng(7).normal(size=f.shape)
    for score in (logme, h_score):
        assert score(f, targets, "multi_label") > score(noise, targets, "multi_label"), score
    with pytest.raises(TfxferError, match="0/1"):
        logme(f, targets * 2, "multi_label")


def test_logme_on_regression_prefers_features_the_values_depend_on() -> None:
    rng = np.random.default_rng(8)
    f = rng.normal(size=(100, 8))
    values = f[:, 0] * 3 - f[:, 1] + 0.1 * rng.normal(size=100)
    assert logme(f, values, "regression") > logme(rng.normal(size=f.shape), values, "regression")
    with pytest.raises(TfxferError, match="for a regression task use --metric logme"):
        h_score(f, values, "regression")


def test_h_score_grows_with_class_separation_and_works_with_more_features_than_examples():
    weak, labels = _problem(n=40, d=100, signal=0.5, seed=2)
    strong, _ = _problem(n=40, d=100, signal=3.0, seed=2)
    assert np.isfinite(h_score(weak, labels)) and h_score(strong, labels) > h_score(weak, labels)
    assert transferability(strong, labels, metric="hscore") == h_score(strong, labels)


@pytest.mark.parametrize(
    "features, targets, words",
    [
        (np.zeros((5, 3)), [0, 1, 0, 1, 0], "the same for every example"),
        (np.full((4, 2), np.nan), [0, 1, 0, 1], "NaN or infinite"),
        (np.ones((3, 2)), [0, 1], "as many targets"),
        (np.eye(3), [0.5, 1, 0], "class ids"),
        (np.eye(3), ["cat", "dog", "cat"], "class ids"),
        (np.eye(3), np.eye(3), "for 0/1 label columns use task='multi_label'"),
    ],
)
def test_bad_input_is_one_clear_error(features, targets, words) -> None:
    for metric in ("logme", "hscore"):
        with pytest.raises(TfxferError, match=words):
            transferability(features, targets, metric=metric)
    with pytest.raises(TfxferError, match="Unknown transferability metric 'nce'"):
        transferability(np.eye(3), [0, 1, 2], metric="nce")


def test_more_features_than_examples_give_the_noise_free_limit_not_a_crash() -> None:
    # Full row rank: every column can be fitted exactly. For some columns the fixed point
    # runs off to beta = infinity (the case that divided by zero), and the evidence rises to
    # a finite limit: the paper's own formula at a large beta, at alpha = n / |m0|^2.
    f, labels = _problem(n=10, d=50, seed=3)
    onehot = np.eye(3)[labels]
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    found, took_limit = [], 0
    for c in range(3):
        z = u.T @ onehot[:, c]
        limit = _noise_free_limit((s**2, s), z, 0.0, shape=(10, 50)) / 10
        m0 = np.linalg.pinv(f) @ onehot[:, c]
        assert _evidence_at(f, onehot[:, c], 10 / (m0 @ m0), 1e7) == pytest.approx(limit, abs=1e-6)
        found.append(_column_evidence((s**2, s), z, 0.0, shape=(10, 50), tol=1e-10) / 10)
        took_limit += found[-1] == limit
    assert took_limit >= 1  # measured: column 0
    assert logme(f, labels) == pytest.approx(np.mean(found), abs=1e-9)


def test_repeated_examples_do_not_inflate_the_score() -> None:
    f, labels = _problem(n=24, d=30, seed=4)
    once = logme(f, labels)
    assert logme(np.tile(f, (4, 1)), np.tile(labels, 4)) == pytest.approx(once, abs=1e-9)
