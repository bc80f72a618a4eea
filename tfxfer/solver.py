"""Fits a linear head to convergence on cached features, its L2 strength cross-validated.

On frozen features the head is a convex problem, and a few epochs of SGD stop short of its
optimum with the weight decay guessed. This module solves it as scikit-learn's
`LogisticRegression(solver="lbfgs")` does, full batch in float64 (without importing
scikit-learn), and picks the inverse penalty `C` by k-fold cross-validation on held-out loss.

The objective is scikit-learn's: `0.5 * ||W||^2 + C * sum_i w_i * loss_i`, bias not penalised.
Where it pays, the solver works along the principal axes of the centred features: an exact
change of variables (the penalty does not see a rotation, the bias absorbs the centring)
under which the Hessian is nearly diagonal, so L-BFGS starts from a diagonal estimate of it
and needs about half the steps.

    fit = fit_linear_head(features, labels, num_outputs=10)
    logits = features @ fit.kernel + fit.bias
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from tfxfer.errors import TfxferError
from tfxfer.solver_core import Problem, mean_loss, solve

TASKS = ("single_label", "multi_label", "regression")
# Two a decade, from near-constant predictions to almost no penalty on z-scored features.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 3, 13))
# Where `fit_linear_head(rescale=True)` leaves the features' overall spread as it is.
RESCALE_RANGE = (1e-2, 1e2)
# Tolerance of the cross-validation fits, most of the work. Each starts from the path's
# extrapolation, so the held-out losses match tol=1e-6 fits to about 1e-3 (measured).
CV_TOL = 1e-3


@dataclass
class LinearFit:
    """A fitted linear head, and how its penalty was chosen.

    Attributes:
        kernel: (features, outputs) float32, applying to the raw features.
        bias: (outputs,) float32.
        C: the inverse penalty used, in scikit-learn's convention.
        cv_loss: candidate `C` -> mean held-out loss over the folds (empty without CV).
        folds: the folds used (0 when no cross-validation ran).
        iterations: L-BFGS iterations of the final fit (0 for closed-form regression).
        converged: whether the final fit met its tolerance.
        seconds: wall time of the whole call.
        note: why cross-validation was skipped, sampled or ended at the grid's edge.
    """

    kernel: np.ndarray
    bias: np.ndarray
    C: float
    cv_loss: dict[float, float] = field(default_factory=dict)
    folds: int = 0
    iterations: int = 0
    converged: bool = True
    seconds: float = 0.0
    note: str | None = None

    def info(self) -> dict:
        """A JSON-able summary, for a run's `stages.json`."""
        return {
            "C": float(self.C),
            "folds": int(self.folds),
            "cv_loss": {f"{c:.4g}": round(float(v), 6) for c, v in self.cv_loss.items()},
            "iterations": int(self.iterations),
            "converged": bool(self.converged),
            "seconds": round(float(self.seconds), 3),
            "note": self.note,
        }


def fit_linear(
    features,
    targets,
    task: str = "single_label",
    *,
    C: float = 1.0,
    num_outputs: int | None = None,
    sample_weight=None,
    standardize: bool = False,
    max_iter: int = 500,
    tol: float = 1e-6,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> LinearFit:
    """Fits the linear head at one inverse penalty `C`, to convergence.

    The minimiser is scikit-learn's for the same `C` and weights: multinomial softmax
    cross-entropy (`single_label`), a sigmoid cross-entropy per column (`multi_label`), or
    half the squared error (`regression`, in closed form: ridge with `alpha = 1 / C`).
    A class absent from the targets (or a label column that never changes) would drive its
    bias to -inf; it gets zero weights and a bias `log(n + 1)` beyond the others instead.

    Args:
        features: array (n, d). The cached features.
        targets: class ids (n,) for `single_label`, 0/1 labels (n, k) for `multi_label`,
            values (n,) or (n, k) for `regression`.
        task: str. One of `TASKS`. Defaults to `"single_label"`.
        C: float. Inverse penalty, scikit-learn's convention. Defaults to `1.0`.
        num_outputs: int. Classes or columns. Defaults to `None` (read off the targets).
        sample_weight: array (n,). Non-negative weights. Defaults to `None` (all 1).
        standardize: bool. Fit on z-scored features (which changes what the penalty
            favours), then fold the scaling into the kernel and bias. Defaults to `False`.
        max_iter: int. Most L-BFGS iterations. Defaults to `500`.
        tol: float. Stop once no gradient entry of the objective over `C * sum(w)` is
            larger, scikit-learn's test. Defaults to `1e-6`.
        init: (kernel, bias). A warm start, on raw features. Defaults to `None` (zeros).
    """
    start = time.perf_counter()
    x, targets, weights, k = _check_inputs(features, targets, task, num_outputs, sample_weight)
    _check_positive(C, "C")
    shift, scale = _zscore(x, standardize)
    basis = _principal_axes(x := (x - shift) / scale, k)
    problem, point = Problem(_rotate(x, basis), targets, weights, task, k), None
    if init is not None:
        kernel, bias = _check_init(init, x.shape[1], k)
        point = (_rotate(kernel.T * scale, basis).T, bias + shift @ kernel)
    W, c, iterations, converged = solve(problem, C, point, tol=tol, max_iter=max_iter, basis=basis)
    kernel, bias = _to_raw(basis, W, c, shift, scale)
    return LinearFit(
        kernel,
        bias,
        float(C),
        iterations=iterations,
        converged=converged,
        seconds=time.perf_counter() - start,
    )


def fit_linear_head(
    features,
    targets,
    task: str = "single_label",
    *,
    num_outputs: int | None = None,
    Cs=None,
    folds: int = 5,
    seed: int = 0,
    sample_weight=None,
    standardize: bool = True,
    rescale: bool = False,
    max_cv_examples: int = 4000,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> LinearFit:
    """Chooses `C` by k-fold cross-validation, then fits the head on all examples at it.

    Each fold fits the candidates smallest first, warm-started along the path, and scores
    its held-out examples (weighted log loss; mean squared error for regression). The grid
    stops once the mean held-out loss has risen twice past its minimum; the best `C` wins
    (the smaller on a tie) and the final fit starts from the folds' mean solution there.
    Folds are stratified for `single_label`, no more than the rarest class has examples. A
    class with one example, or under two examples a class, leaves no CV to run: the fit
    uses `C=1.0` and `note` says why. Above `max_cv_examples`, CV runs on a seeded
    stratified sample. `C` keeps scikit-learn's sum convention (as `LogisticRegressionCV`
    refits), so on more examples the penalty per example is smaller.

    Args:
        features, targets, task, num_outputs, sample_weight, max_iter, tol: as `fit_linear`.
        Cs: list[float]. The candidates. Defaults to `None` (`DEFAULT_CS`, 1e-3 to 1e3).
        folds: int. Folds, at least 2. Defaults to `5`.
        seed: int. Seeds the folds and the sample. Defaults to `0`.
        standardize: bool. Z-score with all examples' mean and std (a std of ~0 counts as 1).
            Defaults to `True`.
        rescale: bool. Without `standardize`: where the features' common root-mean-square
            spread lies outside `RESCALE_RANGE` (1e-2 to 1e2), divide them all by it (one
            number, so their geometry is kept), so that the `Cs` grid reaches them: a
            randomly initialised CNN's pooled features can be 1e-11. Defaults to `False`.
        max_cv_examples: int. Most examples cross-validation runs on. Defaults to `4000`.
    """
    start = time.perf_counter()
    x, targets, weights, k = _check_inputs(features, targets, task, num_outputs, sample_weight)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise TfxferError(f"Expected `folds` an integer >= 2. Received: folds={folds!r}")
    Cs = sorted({_check_positive(c, "Cs") for c in np.ravel(DEFAULT_CS if Cs is None else Cs)})
    if not Cs:
        raise TfxferError("Expected at least one candidate in `Cs`. Received: none.")
    notes: list[str] = []
    usable, skip = _usable_folds(targets, task, k, folds)
    if len(Cs) == 1 or skip:
        notes.append(
            f"cross-validation skipped: {skip}; fitted at C=1.0" if skip else "one C: no CV"
        )
        Cs = Cs if len(Cs) == 1 else [1.0]
    shift, scale = _zscore(x, standardize, rescale)
    basis = _principal_axes(x := (x - shift) / scale, k)
    problem, point, cv_loss, C = (
        Problem(_rotate(x, basis), targets, weights, task, k),
        None,
        {},
        Cs[0],
    )
    if len(Cs) > 1:
        cv_loss, point, C = _cross_validated_C(
            problem,
            Cs,
            folds=(folds, usable),
            seed=seed,
            max_cv_examples=max_cv_examples,
            max_iter=max_iter,
            notes=notes,
        )
    W, c, iterations, converged = solve(problem, C, point, tol=tol, max_iter=max_iter, basis=basis)
    kernel, bias = _to_raw(basis, W, c, shift, scale)
    return LinearFit(
        kernel,
        bias,
        C,
        cv_loss,
        folds=usable if cv_loss else 0,
        iterations=iterations,
        converged=converged,
        seconds=time.perf_counter() - start,
        note="; ".join(notes) or None,
    )


def _usable_folds(targets, task: str, k: int, folds: int) -> tuple[int, str | None]:
    """How many folds the examples allow, and why cross-validation cannot run (or None)."""
    n = len(targets)
    usable, skip = min(folds, n // 2), f"{n} examples" if n < 4 else None
    if task == "single_label":
        counts = np.bincount(targets, minlength=k)
        rarest = int(np.argmin(np.where(counts > 0, counts, n + 1)))
        usable = min(folds, int(counts[rarest]))
        if counts[rarest] < 2:
            skip = f"class {rarest} has 1 example, and every fold needs each class"
        elif n < 2 * np.count_nonzero(counts):
            skip = f"{n} examples for {np.count_nonzero(counts)} classes (needs 2 a class)"
    return usable, skip


def _cross_validated_C(problem: Problem, Cs, *, folds, seed, max_cv_examples, max_iter, notes):
    """(held-out loss per C tried, the folds' mean solution at the chosen C, the chosen C).

    `folds` is (asked, usable). Runs on a seeded stratified sample above `max_cv_examples`;
    what differs from what was asked is appended to `notes`.
    """
    (asked, usable), n = folds, len(problem.x)
    stratify = problem.task == "single_label"
    rng, rows = np.random.default_rng(seed), np.arange(n)
    if n > max_cv_examples:
        rows = _subsample(problem.targets, max_cv_examples, usable, rng, stratify)
        notes.append(f"cross-validation on a sample of {len(rows)} of {n} examples")
    if usable < asked:
        notes.append(f"{usable} folds, not {asked}: too few examples for more")
    fold_of = _fold_ids(problem.targets[rows], usable, rng, stratify)
    cv_loss, point, chosen = _cross_validate(problem.rows(rows), Cs, fold_of, max_iter)
    if chosen in (Cs[0], Cs[-1]):
        notes.append(f"chosen C={chosen:.4g} is at the edge of the candidates")
    return cv_loss, point, chosen


def _cross_validate(problem: Problem, Cs, fold_of, max_iter):
    """Mean held-out loss per candidate tried, the folds' mean solution at the chosen C, and C.

    The chosen C follows the one-standard-error rule, anchored at C=1 (scikit-learn's
    default): of the candidates whose mean held-out loss is within one standard error (over
    folds) of the lowest, the one nearest C=1 in log scale. With a handful of examples a fold
    the lowest mean is mostly noise, and picking it chose worse strengths than C=1 on real
    few-label text; a C far from 1 is chosen only where it is clearly better (features of a
    very different scale).
    """
    folds = fold_of.max() + 1
    paths, caches, losses = [[] for _ in range(folds)], [{} for _ in range(folds)], {}
    per_fold: dict[float, list[float]] = {}
    for j, C in enumerate(Cs):
        total, held_losses = 0.0, []
        for fold, path in enumerate(paths):
            train, held = fold_of != fold, fold_of == fold
            point = path[-1] if path else None
            if j > 1:  # as far along the path as its last step went, in log C
                ahead = math.log(C / Cs[j - 1]) / math.log(Cs[j - 1] / Cs[j - 2])
                point = tuple(a + ahead * (a - b) for a, b in zip(*path[-1:-3:-1], strict=True))
            fit = solve(
                problem.rows(train), C, point, tol=CV_TOL, max_iter=max_iter, cache=caches[fold]
            )
            path.append(fit[:2])
            held_rows = problem.rows(held)
            logits = held_rows.x @ path[-1][0] + path[-1][1]
            held_losses.append(
                mean_loss(logits, held_rows.targets, held_rows.weights, problem.task)
            )
            total += held_losses[-1] / folds
        losses[C], per_fold[C] = total, held_losses
        if j > 1 and min(list(losses.values())[-2:]) > min(losses.values()):
            break  # risen twice past the minimum: a larger C only over-fits more
    lowest = min(losses, key=losses.get)
    error = float(np.std(per_fold[lowest]) / math.sqrt(max(folds - 1, 1)))
    close = [C for C in losses if losses[C] <= losses[lowest] + error]
    chosen = min(close, key=lambda C: (abs(math.log(C)), C))
    index = list(losses).index(chosen)
    return (
        losses,
        tuple(np.mean(part, axis=0) for part in zip(*(p[index] for p in paths), strict=True)),
        chosen,
    )


def _check_inputs(features, targets, task, num_outputs, sample_weight):
    """Float64 features, targets, weights and the number of outputs, or a TfxferError."""
    if task not in TASKS:
        raise TfxferError(f"Expected `task` to be one of {TASKS}. Received: task={task!r}")
    x = _as_array(features, "features")
    if x.ndim != 2 or 0 in x.shape:
        raise TfxferError(
            "Expected `features` as a non-empty 2-D array (examples, features). Received: "
            f"shape {x.shape}; check that the feature cache is not empty."
        )
    if not np.isfinite(x).all():
        raise TfxferError(
            f"Expected finite `features`. Received: {(~np.isfinite(x)).sum()} NaN or inf, "
            f"first in row {np.argmin(np.isfinite(x).all(axis=1))}; drop or impute those rows."
        )
    t, n = _as_array(targets, "targets"), len(x)
    if t.ndim == 0 or len(t) != n:
        raise TfxferError(
            f"Expected one target per example, {n}. Received: {len(t) if t.ndim else 0} "
            "targets; pass the features and targets of the same examples."
        )
    if num_outputs is not None:
        count = isinstance(num_outputs, int | np.integer) and not isinstance(num_outputs, bool)
        if not count or num_outputs < 1:
            raise TfxferError(f"Expected `num_outputs` a positive int. Received: {num_outputs!r}")
        num_outputs = int(num_outputs)
    if task == "single_label":
        if t.ndim != 1 or not (np.isfinite(t) & (t == np.round(t))).all():
            raise TfxferError(
                "Expected integer class ids of shape (n,) for task='single_label'. Received: "
                f"shape {t.shape}, values like {t.ravel()[:3]}; pass ids, not one-hot rows."
            )
        t = t.astype(np.int64)
        k = num_outputs or int(t.max()) + 1
        if t.min() < 0 or t.max() >= k or k < 2:
            raise TfxferError(
                f"Expected class ids in [0, {k}) of at least 2 classes. Received: ids from "
                f"{t.min()} to {t.max()}; fix the labels or pass the right `num_outputs`."
            )
    else:
        t = t[:, None] if t.ndim == 1 and task == "regression" else t
        k = t.shape[1] if t.ndim == 2 else 0
        labels = task == "regression" or ((t >= 0) & (t <= 1)).all()
        if not (k and np.isfinite(t).all() and labels and num_outputs in (None, k)):
            raise TfxferError(
                f"Expected `targets` of shape (n, {num_outputs or 'k'}) for task={task!r}, "
                + ("0/1 labels" if task == "multi_label" else "finite values")
                + f". Received: shape {t.shape}"
                + (f", values from {t.min()} to {t.max()}." if t.size else ".")
            )
    w = np.ones(n) if sample_weight is None else _as_array(sample_weight, "sample_weight")
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise TfxferError(
            f"Expected `sample_weight` as {n} finite non-negative numbers, not all 0. "
            f"Received: shape {w.shape}, sum {w.sum()}."
        )
    return x, t, w, k


def _as_array(value, name):
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TfxferError(f"Expected `{name}` as numbers. Received: {error}") from None


def _check_positive(value, name):
    number = _as_array(value, name)
    if number.ndim or not 0 < number < math.inf:
        raise TfxferError(f"Expected `{name}` positive and finite. Received: {value!r}")
    return float(number)


def _check_init(init, d, k):
    parts = init if isinstance(init, tuple | list) and len(init) == 2 else (None, None)
    kernel, bias = (np.zeros(0) if part is None else _as_array(part, "init") for part in parts)
    if kernel.shape != (d, k) or bias.shape != (k,):
        raise TfxferError(
            f"Expected `init` as (kernel ({d}, {k}), bias ({k},)). Received: shapes "
            f"{kernel.shape} and {bias.shape}."
        )
    return kernel, bias


def _zscore(x, standardize, rescale=False):
    """Each feature's mean, and its std (0 counted as 1), or one number for all, or 1.

    Centring always: it changes nothing but the bias, and uncouples the bias from the kernel.
    `rescale` divides every feature by their common root-mean-square spread when it lies
    outside `RESCALE_RANGE`; inside it, features are left as they are.
    """
    if rescale and not standardize:
        spread = float(np.sqrt(np.mean((x - x.mean(axis=0)) ** 2)))
        low, high = RESCALE_RANGE
        if spread > 0 and not low <= spread <= high:
            return x.mean(axis=0), np.full(x.shape[1], spread)
    std = x.std(axis=0) if standardize else np.ones(x.shape[1])
    # A feature that is constant up to rounding (MiniLM has dimensions of ~1e-32 whatever
    # the text) is not scaled up: dividing by its spread would give it a kernel of 1e30.
    constant = std <= 1e-6 * max(float(std.max(initial=0.0)), 1e-30)
    return x.mean(axis=0), np.where(constant, 1.0, std)


def _principal_axes(x, outputs):
    """Orthonormal axes (d, r) spanning the (centred) rows; `None` where they cost too much.

    They are worth about 100 objective evaluations: more than half of a typical fit's.
    """
    (n, d), small = x.shape, min(x.shape)
    if small * (n * d + 4 * small**2) > 100 * n * d * outputs:
        return None
    if n > d:
        return np.linalg.eigh(x.T @ x)[1]
    _, values, axes = np.linalg.svd(x, full_matrices=False)
    return axes[values > values.max(initial=0.0) * 1e-10].T


def _rotate(x, basis):
    return x if basis is None else x @ basis


def _to_raw(basis, W, c, shift, scale):
    """The kernel and bias on raw features, as float32."""
    kernel = W if basis is None else basis @ W
    bias = c - (shift / scale) @ kernel
    return (kernel / scale[:, None]).astype(np.float32), bias.astype(np.float32)


def _fold_ids(targets, folds, rng, stratify):
    """A fold for each example; stratified, each class is dealt round the folds in turn."""
    ids, dealt = np.empty(len(targets), dtype=np.int64), 0
    groups = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    for members in groups if stratify else [np.arange(len(targets))]:
        ids[rng.permutation(members)] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return ids


def _subsample(targets, size, folds, rng, stratify):
    """About `size` rows, classes in proportion, each keeping `folds` examples if it has them."""
    if not stratify:
        return np.sort(rng.choice(len(targets), size, replace=False))
    keep = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        take = min(len(members), max(folds, round(len(members) * size / len(targets))))
        keep.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(keep))
