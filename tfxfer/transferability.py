"""Transferability: how well frozen features suit a labelled task, scored without training.

Before fine-tuning several candidate backbones, score each one's frozen features on the
training data and fine-tune the best (`tfxfer rank`, `--backbone auto`). Two scores, both
higher-is-better and both free of any source classifier:

- **LogME** (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning", ICML 2021): the log marginal likelihood (evidence), per example, of a Bayesian
  linear model from the features to each target column, with its prior precision `alpha`
  and noise precision `beta` set to maximise it (MacKay's fixed-point updates, as in the
  paper's Algorithm 1 and its fixed-point analysis, arXiv 2110.10545). One thin SVD of the
  features serves every column and every iteration. Targets: one-hot classes (single-label),
  the label columns (multi-label) or the values (regression); the score is the mean over
  columns. It does not change when all features are scaled by one number.
- **H-score** (Bao et al., ICIP 2019), regularised as Ibrahim et al. (ICLR 2022) advise: the
  between-class covariance of the features against their total covariance,
  `tr(cov(f)^-1 cov(E[f | y]))`, with cov(f) shrunk towards a multiple of the identity
  (Ledoit-Wolf), which keeps it defined when there are more features than examples.
  Single- and multi-label (the mean over labels of each label's two-class score); not for
  regression.

Everything here is NumPy in float64 on features already extracted (`tfxfer.train.features`).
"""

from __future__ import annotations

import numpy as np

from tfxfer.errors import TfxferError

TASKS = ("single_label", "multi_label", "regression")
# Stop LogME's fixed point once alpha / beta moves by less than this, relatively.
LOGME_TOL = 1e-10
LOGME_MAX_ITER = 1000


def logme(features, targets, task: str = "single_label", *, tol: float = LOGME_TOL) -> float:
    """LogME's evidence per example, averaged over the target columns (higher is better).

    Args:
        features: array (n, d). Frozen features, one row per example.
        targets: class ids (n,) for `single_label`, 0/1 labels (n, k) for `multi_label`,
            values (n,) or (n, k) for `regression`.
        task: str. One of `TASKS`. Defaults to `"single_label"`.
        tol: float. Relative change of alpha / beta at which the fixed point stops.

    Returns:
        float. The mean over columns of each column's maximised log evidence divided by n.
    """
    x, y = _checked(features, targets, task)
    x, y = _distinct_rows(x, y)
    n, d = x.shape
    sigma, projected = _spectrum(x, y)
    s = np.sqrt(sigma)
    scores = []
    for column, z in zip(y.T, projected.T, strict=True):
        if not np.any(column):
            continue  # a label no example has: its evidence is unbounded, and says nothing
        outside = max(float(column @ column - z @ z), 0.0)  # |y|^2 off the features' span
        scores.append(_column_evidence((sigma, s), z, outside, shape=(n, d), tol=tol) / n)
    if not scores:
        raise TfxferError("Every target is 0: no label to score the features on.")
    return float(np.mean(scores))


def _distinct_rows(x, y) -> tuple[np.ndarray, np.ndarray]:
    """The rows of (features, targets) with exact repeats dropped.

    A repeated example (oversampling, a duplicated file) adds nothing to learn, but lets a
    model that fits the targets exactly claim a vanishing noise, and the evidence then grows
    without bound.
    """
    _, first = np.unique(np.concatenate([x, y], axis=1), axis=0, return_index=True)
    if len(first) < 2:
        raise TfxferError("Fewer than 2 distinct examples: nothing to score the features on.")
    first = np.sort(first)
    return x[first], y[first]


def _spectrum(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values of `x` (r,) and the targets in its left singular basis (r, k).

    From the eigendecomposition of the smaller Gram matrix (`x x^T` or `x^T x`): the same
    numbers as a thin SVD at a fraction of its cost when n and d are both in the thousands.
    """
    n, d = x.shape
    if n <= d:
        sigma, u = np.linalg.eigh(x @ x.T)
        return np.clip(sigma, 0.0, None), u.T @ y
    sigma, v = np.linalg.eigh(x.T @ x)
    sigma = np.clip(sigma, 0.0, None)
    s = np.sqrt(sigma)
    # u_i = x v_i / s_i, so u_i^T y = v_i^T (x^T y) / s_i; a zero direction carries nothing.
    keep = s > s.max(initial=0.0) * 1e-12
    projected = np.where(keep[:, None], (v.T @ (x.T @ y)) / np.where(keep, s, 1.0)[:, None], 0.0)
    return sigma, projected


def _column_evidence(spectrum, z, outside, *, shape: tuple[int, int], tol: float) -> float:
    """The maximised log evidence of one target column, in the SVD basis of the features.

    `spectrum` is (squared singular values, singular values); `shape` the features' (n, d).
    With as many independent features as examples, a column can be fitted exactly, and the
    fixed point may then run off towards a noise-free model (beta to infinity): the
    evidence rises to a finite limit, which is returned (`_noise_free_limit`).
    """
    (sigma, _), (n, d) = spectrum, shape
    scale = float(z @ z + outside)  # |y|^2
    alpha, beta = 1.0, 1.0
    for _ in range(LOGME_MAX_ITER):
        gamma, m2, residual = _posterior(alpha, beta, spectrum, z, outside)
        if n - gamma <= 1e-9 * n or residual <= 1e-14 * scale:
            return _noise_free_limit(spectrum, z, outside, shape=shape)
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / residual
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    gamma, m2, residual = _posterior(alpha, beta, spectrum, z, outside)
    log_det = np.sum(np.log(alpha + beta * sigma)) + (d - len(sigma)) * np.log(alpha)
    return float(
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual
        - alpha / 2 * m2
        - log_det / 2
    )


def _noise_free_limit(spectrum, z, outside, *, shape: tuple[int, int]) -> float:
    """The evidence as beta goes to infinity, at the best alpha: finite when the features
    have rank n (every column is fitted exactly by the minimum-norm solution m0).

    With r = n the log-determinant's n log(beta) cancels n/2 log(beta), beta * residual
    vanishes, and what is left is maximised at alpha = n / |m0|^2:
    n/2 log(n / |m0|^2) - n/2 log(2 pi) - n/2 - 1/2 sum(log sigma_i).
    """
    sigma, s = spectrum
    n, _ = shape
    kept = sigma > sigma.max(initial=0.0) * 1e-12
    if int(kept.sum()) < n or outside > 1e-12 * float(z @ z + outside):
        # Fitted exactly by fewer directions than examples: an unbounded evidence. Rows are
        # distinct (`_distinct_rows`), so this is degenerate data; refuse to rank on it.
        raise TfxferError(
            "The targets are an exact linear function of fewer feature directions than there "
            "are examples: the evidence is unbounded, and LogME cannot score these features."
        )
    m0 = z[kept] / s[kept]
    norm = float(m0 @ m0)
    return float(
        n / 2 * np.log(n / norm)
        - n / 2 * np.log(2 * np.pi)
        - n / 2
        - np.sum(np.log(sigma[kept])) / 2
    )


def _posterior(alpha, beta, spectrum, z, outside):
    """(gamma, |m|^2, |F m - y|^2) of the posterior mean m at (alpha, beta)."""
    sigma, s = spectrum
    shrink = beta * sigma / (alpha + beta * sigma)
    m = shrink * z / np.where(s > 0, s, 1.0)  # m in the right singular basis
    gamma = float(shrink.sum())
    fitted = s * m
    residual = float(np.sum((fitted - z) ** 2) + outside)
    return gamma, float(m @ m), residual


def h_score(features, targets, task: str = "single_label") -> float:
    """The shrinkage H-score (higher is better); the mean over labels for `multi_label`."""
    if task == "regression":
        raise TfxferError(
            "The H-score needs class labels; for a regression task use --metric logme."
        )
    x, y = _checked(features, targets, task)
    x = x - x.mean(axis=0)
    inverse = _shrunk_covariance_inverse(x)
    if task == "single_label":
        return _between_classes(x, y.argmax(axis=1), inverse)
    varying = [col for col in y.T if 0 < col.sum() < len(col)]  # a constant label says nothing
    if not varying:
        raise TfxferError("Every label is the same for every example: nothing to score.")
    return float(np.mean([_between_classes(x, col.astype(int), inverse) for col in varying]))


def _between_classes(x, labels, inverse) -> float:
    score = 0.0
    for label in np.unique(labels):
        rows = labels == label
        mean = x[rows].mean(axis=0)
        score += rows.mean() * float(mean @ inverse @ mean)
    return score


def _shrunk_covariance_inverse(x) -> np.ndarray:
    """The inverse of the Ledoit-Wolf shrunk covariance of centred rows `x` (n, d)."""
    n, d = x.shape
    # Every sum below from the n x n Gram matrix or the d x d covariance, whichever is smaller:
    # tr(S), |S|_F^2 and each x_k^T S x_k (= sum_j (x_k . x_j)^2 / n).
    if n <= d:
        gram = x @ x.T
        trace, frobenius = float(np.trace(gram)) / n, float(np.sum(gram**2)) / n**2
        quadratic = np.sum(gram**2, axis=1) / n
    else:
        cov = x.T @ x / n
        trace, frobenius = float(np.trace(cov)), float(np.sum(cov**2))
        quadratic = np.einsum("ij,ij->i", x @ cov, x)
    scale = trace / d
    if scale <= 0:
        raise TfxferError("The features are the same for every example: nothing to score.")
    spread = frobenius - 2 * scale * trace + scale**2 * d  # |S - scale I|_F^2
    # (1/n^2) sum_k |x_k x_k^T - S|_F^2, without forming the n outer products.
    norms = np.sum(x**2, axis=1)
    noise = float(np.sum(norms**2 - 2 * quadratic + frobenius)) / n**2
    shrinkage = 1.0 if spread <= 0 else min(max(noise, 0.0), spread) / spread
    return _shrunk_inverse(x, scale, shrinkage)


def _shrunk_inverse(x, scale: float, shrinkage: float) -> np.ndarray:
    """(shrinkage * scale * I + (1 - shrinkage) * x^T x / n)^-1, through the smaller side."""
    n, d = x.shape
    ridge = shrinkage * scale
    if ridge <= 0:
        return np.linalg.pinv(x.T @ x / n, hermitian=True)
    if n < d:
        # Woodbury: (r I + c X^T X)^-1 = (I - c X^T (r I + c X X^T)^-1 X) / r
        c = (1 - shrinkage) / n
        inner = np.linalg.solve(ridge * np.eye(n) + c * (x @ x.T), x)
        return (np.eye(d) - c * x.T @ inner) / ridge
    return np.linalg.inv(ridge * np.eye(d) + (1 - shrinkage) * (x.T @ x) / n)


METRICS = {"logme": logme, "hscore": h_score}


def transferability(features, targets, task: str = "single_label", metric: str = "logme"):
    """`metric` ("logme" or "hscore") of the features for the targets."""
    if metric not in METRICS:
        raise TfxferError(
            f"Unknown transferability metric {metric!r}. Expected one of {sorted(METRICS)}."
        )
    return METRICS[metric](features, targets, task)


def _checked(features, targets, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, d) and targets as columns (n, k), float64, checked."""
    if task not in TASKS:
        raise TfxferError(f"Expected `task` one of {TASKS}. Received: {task!r}")
    try:
        x = np.asarray(features, dtype=np.float64)
        t = np.asarray(targets)
    except (TypeError, ValueError) as error:
        raise TfxferError(f"Expected features and targets as numbers. Received: {error}") from None
    if x.ndim == 0 or x.size == 0:
        raise TfxferError(f"Expected features as an (examples, width) array. Received: {x.shape}")
    x = x.reshape(len(x), -1)
    if len(x) < 2 or len(t) != len(x):
        raise TfxferError(
            f"Expected at least 2 examples and as many targets as feature rows. Received: "
            f"{len(x)} rows of features and {len(t)} targets."
        )
    if not np.all(np.isfinite(x)):
        raise TfxferError("The features hold NaN or infinite values: nothing to score.")
    if not np.any(np.ptp(x, axis=0) > 0):
        raise TfxferError("The features are the same for every example: nothing to score.")
    if task == "single_label":
        return x, _one_hot(t)
    try:
        y = t.astype(np.float64).reshape(len(t), -1)
    except (TypeError, ValueError):
        raise TfxferError(f"Expected numbers as {task} targets. Received: {t[:3]!r}") from None
    if not np.all(np.isfinite(y)):
        raise TfxferError(f"The {task} targets hold NaN or infinite values.")
    if task == "multi_label" and not np.all((y == 0) | (y == 1)):
        raise TfxferError("Expected 0/1 label columns as multi-label targets.")
    return x, y


def _one_hot(t: np.ndarray) -> np.ndarray:
    """Class ids (n,) as one-hot columns of the classes present."""
    if t.ndim != 1:
        raise TfxferError(
            f"Expected one class id per example as single-label targets, shape (n,). "
            f"Received: shape {t.shape} (for 0/1 label columns use task='multi_label')."
        )
    try:
        ids = t.astype(np.int64)
        whole = bool(np.all(ids == t.astype(np.float64)))
    except (TypeError, ValueError):
        whole = False
    if not whole or np.any(ids < 0):
        raise TfxferError(
            f"Expected class ids (integers >= 0) as single-label targets. Received: {t[:3]!r}"
        )
    present = np.unique(ids)  # a class with no example has nothing to score
    return (ids[:, None] == present[None, :]).astype(np.float64)
