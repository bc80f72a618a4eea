"""The numeric core of `tfxfer.solver`: the penalised objective, minimised by L-BFGS.

A linear head's objective (scikit-learn's `0.5 * ||W||^2 + C * sum_i w_i * loss_i`) on
features already on the solver's axes, minimised by a preconditioned L-BFGS with a Wolfe line
search, or for regression in closed form. `tfxfer.solver` chooses `C` and the axes; this
module only minimises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FACTOR = 4.0  # rebuild the diagonal Hessian guess once the curvature has moved this much
MEMORY = 10  # L-BFGS correction pairs, SciPy's default
FTOL = 64 * np.finfo(float).eps  # relative decrease that also stops it, as in scikit-learn


@dataclass
class Problem:
    """The examples a fit runs on: features on the solver's axes, targets, weights, outputs."""

    x: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    task: str
    k: int

    def rows(self, index) -> Problem:
        """The problem on the examples `index` picks (a fold, a sample)."""
        return Problem(self.x[index], self.targets[index], self.weights[index], self.task, self.k)


def solve(problem: Problem, C, init, *, tol, max_iter, basis=None, cache=None):
    """Minimises the objective over logits `x @ W + c`; returns `(W, c, iterations, converged)`.

    `init` is a `(W, c)` on `x`'s axes; `basis` maps the gradient back to the caller's axes
    for the stopping test, so that `tol` means what scikit-learn's does. `cache` keeps what
    stays the same at every C, for a fold.
    """
    x, targets, weights, task, k = (
        problem.x,
        problem.targets,
        problem.weights,
        problem.task,
        problem.k,
    )
    (n, r), cache = x.shape, {} if cache is None else cache
    share = weights / weights.sum()
    penalty = 1.0 / (C * weights.sum())  # the objective over C * sum(w), as scikit-learn's
    W, b = np.zeros((r, k)), np.zeros(k)
    if task == "regression":
        return _solve_regression(problem, share, penalty, cache)
    positives = share @ targets if task != "single_label" else None
    if task == "single_label":
        seen = np.bincount(targets, weights=share, minlength=k) > 0
        labels = (np.cumsum(seen) - 1)[targets]  # ids among the classes seen
    else:
        seen = (positives > 0) & (positives < 1)
        labels = targets[:, seen]
    active, m, rows = np.flatnonzero(seen), int(seen.sum()), np.arange(n)
    if init is not None:
        W[:, active], b[active] = init[0][:, active], init[1][active]

    def objective(theta):
        kernel = theta[: r * m].reshape(r, m)
        z = x @ kernel + theta[r * m :]
        if task == "single_label":
            z -= z.max(axis=1, keepdims=True)
            exp = np.exp(z)
            total = exp.sum(axis=1)
            loss = share @ (np.log(total) - z[rows, labels])
            residual = exp / total[:, None]
        else:
            loss = share @ (np.logaddexp(0.0, z) - labels * z).sum(axis=1)
            residual = 0.5 + 0.5 * np.tanh(0.5 * z)  # a sigmoid that cannot overflow
        curvature = np.maximum(share @ (residual * (1.0 - residual)), 1e-12)
        if not np.all((curvature < FACTOR * held) & (held < FACTOR * curvature)):
            held[:] = curvature
            scaling[: r * m] = (1.0 / (np.outer(spread, curvature) + penalty)).ravel()
            scaling[r * m :] = 1.0 / curvature
        if task == "single_label":
            residual[rows, labels] -= 1.0
        else:
            residual -= labels
        residual *= share[:, None]
        grad = np.concatenate([(x.T @ residual + penalty * kernel).ravel(), residual.sum(0)])
        return loss + 0.5 * penalty * np.vdot(kernel, kernel), grad

    def small(grad):  # every |gradient| <= tol on the caller's axes; the 2-norm bounds them
        norm = np.linalg.norm(grad)
        if basis is None or norm <= tol or norm > tol * math.sqrt((len(basis) + 1) * m):
            return np.abs(grad).max(initial=0.0) <= tol if basis is None else norm <= tol
        kernel_grad = basis @ grad[: r * m].reshape(r, m)
        return max(np.abs(kernel_grad).max(initial=0.0), np.abs(grad[r * m :]).max()) <= tol

    # On principal axes the Hessian is nearly diagonal: axis variance times the class's mean
    # curvature p(1 - p), plus the penalty. L-BFGS starts each step from that guess, rebuilt
    # only when the curvature has moved by FACTOR (it flattens as classes separate): a guess
    # that changed every step would unsettle the curvature pairs L-BFGS has gathered.
    spread = cache.setdefault("spread", share @ np.square(x))
    scaling, held = np.ones(r * m + m), np.zeros(m)

    def precondition(vector):
        vector = scaling * vector
        if task == "single_label":  # off the class-sum directions, which softmax cannot see
            vector = vector.reshape(r + 1, m)
            vector = (vector - vector.mean(axis=1, keepdims=True)).ravel()
        return vector

    theta = np.vstack([W[:, active], b[active]])
    if task == "single_label":  # the same logits with less penalty: where the optimum lies
        theta -= theta.mean(axis=1, keepdims=True)
    theta, iterations, converged = _lbfgs(objective, theta.ravel(), precondition, small, max_iter)
    W[:, active], b[active] = theta[: r * m].reshape(r, m), theta[r * m :]
    _set_missing_biases(b, seen, task, positives, n)
    return W, b, iterations, converged


def _solve_regression(problem: Problem, share, penalty, cache):
    """Ridge regression in closed form: `(W, c, 0, True)`. `cache` keeps the Gram matrix."""
    x, r = problem.x, problem.x.shape[1]
    if not cache:
        centre = share @ x
        x = x - centre
        cache.update(centre=centre, gram=(x * share[:, None]).T @ x)
        cache.update(rhs=x.T @ (share[:, None] * problem.targets))
    W = np.linalg.solve(cache["gram"] + penalty * np.eye(r), cache["rhs"])
    return W, share @ problem.targets - cache["centre"] @ W, 0, True


def _set_missing_biases(b, seen, task, positives, n):
    """Biases of classes (or label columns) never seen, `log(n + 1)` beyond the others."""
    active, missing = np.flatnonzero(seen), np.flatnonzero(~seen)
    if task == "single_label":
        b[active] -= b[active].mean()  # softmax ignores a shared shift; scikit-learn's sums to 0
        b[missing] = b[active].min() - math.log(n + 1)
    else:
        b[missing] = np.where(positives[missing] > 0, 1.0, -1.0) * math.log(n + 1)


def _lbfgs(objective, theta, precondition, small, max_iter):
    """Limited-memory BFGS (two-loop recursion) from a diagonal inverse-Hessian guess."""
    value, grad = objective(theta)
    history = []  # (s, y, 1 / y.s), oldest first
    for iteration in range(max_iter):
        if small(grad):
            return theta, iteration, True
        direction, alphas, gamma = -grad, [], 1.0
        for s, y, rho in reversed(history):
            alphas.append(rho * (s @ direction))
            direction = direction - alphas[-1] * y
        if history:  # scale the guess to the latest curvature seen
            gamma = (history[-1][0] @ history[-1][1]) / (
                history[-1][1] @ precondition(history[-1][1])
            )
        direction = gamma * precondition(direction)
        for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
            direction = direction + s * (alpha - rho * (y @ direction))
        if not grad @ direction < 0:  # no longer a descent direction: forget the pairs
            history, direction = [], -precondition(grad)
        step, new_value, new_grad = _wolfe_step(objective, theta, value, grad, direction)
        if new_grad is None:  # no step lowers the objective: as close as float64 gets
            return theta, iteration, small(grad)
        s, y = step * direction, new_grad - grad
        theta, decrease, value, grad = theta + s, value - new_value, new_value, new_grad
        if s @ y > 1e-12 * (y @ y):
            history = [*history[1 - MEMORY :], (s, y, 1.0 / (s @ y))]
        if decrease <= FTOL * max(abs(value), 1.0):  # SciPy's second stopping rule
            return theta, iteration + 1, True
    return theta, max_iter, small(grad)


def _wolfe_step(objective, theta, value, grad, direction, c1=1e-4, c2=0.9, max_evals=30):
    """A step meeting the strong Wolfe conditions: bracket it, then zoom by quadratics."""
    slope0 = grad @ direction
    lo, value_lo, slope_lo, hi, value_hi = 0.0, value, slope0, math.inf, math.inf
    found, step = (0.0, value, None), 1.0
    for _ in range(max_evals):
        new_value, new_grad = objective(theta + step * direction)
        new_value = new_value if np.isfinite(new_value) else math.inf
        slope = new_grad @ direction
        if new_value > value + c1 * step * slope0 or new_value >= value_lo:
            hi, value_hi = step, new_value  # too far: the minimum lies before
        else:
            found = (step, new_value, new_grad)
            if abs(slope) <= -c2 * slope0:
                return found
            if slope * (hi - lo) >= 0:  # went past the minimum: it lies back towards lo
                hi, value_hi = lo, value_lo
            lo, value_lo, slope_lo = step, new_value, slope
        if math.isinf(hi):
            step = 4.0 * lo
            continue
        width = hi - lo  # the minimiser of the quadratic through lo's value, slope and hi's
        curve = (value_hi - value_lo - slope_lo * width) / width**2
        step = lo - slope_lo / (2 * curve) if 0 < curve < math.inf else lo + width / 2
        near, far = sorted((lo + 0.1 * width, lo + 0.9 * width))
        step = min(max(step, near), far)
    return found


def mean_loss(logits, targets, weights, task):
    """Weighted mean held-out loss: log loss, or squared error per output for regression."""
    if task == "single_label":
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        each = lse - logits[np.arange(len(targets)), targets]
    elif task == "multi_label":
        each = (np.logaddexp(0.0, logits) - targets * logits).sum(axis=1)
    else:
        each = ((logits - targets) ** 2).mean(axis=1)
    return float(np.average(each, weights=weights if weights.sum() > 0 else None))
