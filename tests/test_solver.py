"""The linear-head solver: scikit-learn's minimiser without scikit-learn, and its CV for C.

The comparisons with scikit-learn need it installed (the `bench` extra) and are skipped
without it; everything else runs on NumPy alone. All problems are tiny: the whole file takes
a few seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfxfer.errors import TfxferError
from tfxfer.solver import TASKS, LinearFit, fit_linear, fit_linear_head

SKLEARN = "scikit-learn is the reference the solver is checked against: pip install -e .[bench]"
TIGHT = {"tol": 1e-10, "max_iter": 10_000}  # both solvers run to the optimum


def _data(n=60, d=5, k=3, seed=0, signal=1.0):
    """Random features whose first columns carry the label, plus an offset and mixed scales."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + rng.normal(size=d)
    x[:, :k] += signal * np.eye(k)[labels]
    return x, labels


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("C", [0.05, 5.0])
@pytest.mark.parametrize("shape", [(60, 5), (30, 50)], ids=["n>d", "n<d"])
def test_single_label_matches_sklearn_multinomial(C, shape):
    linear_model = pytest.importorskip("sklearn.linear_model", reason=SKLEARN)
    x, y = _data(*shape)
    fit = fit_linear(x, y, C=C, **TIGHT)
    ref = linear_model.LogisticRegression(C=C, **TIGHT).fit(x, y)
    assert fit.converged and fit.kernel.shape == (shape[1], 3) and fit.bias.dtype == np.float32
    np.testing.assert_allclose(fit.kernel, ref.coef_.T, atol=1e-3)
    # Softmax ignores a shift shared by every bias; both solvers leave them summing to ~0.
    np.testing.assert_allclose(
        fit.bias - fit.bias.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-3
    )
    np.testing.assert_allclose(_softmax(x @ fit.kernel + fit.bias), ref.predict_proba(x), atol=1e-3)


def test_multi_label_columns_match_binary_sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model", reason=SKLEARN)
    x, y = _data(n=80, d=6, k=3, seed=1)
    labels = np.eye(3)[y]
    labels[:, 2] = (x[:, 4] + np.random.default_rng(2).normal(size=80) > 0).astype(float)
    fit = fit_linear(x, labels, "multi_label", C=0.7, **TIGHT)
    for column in range(3):
        ref = linear_model.LogisticRegression(C=0.7, **TIGHT).fit(x, labels[:, column])
        np.testing.assert_allclose(fit.kernel[:, column], ref.coef_[0], atol=1e-3)
        np.testing.assert_allclose(fit.bias[column], ref.intercept_[0], atol=1e-3)


def test_two_class_softmax_is_sklearn_binary_at_twice_C():
    """Why 2C: with two softmax columns only w1 - w0 = v matters, and the penalty is least
    at w1 = -w0 = v/2, where it is 0.5 * ||v||^2 / 2. So the objective is half of
    `0.5 * ||v||^2 + 2C * loss(v)`: scikit-learn's binary logistic regression at 2C."""
    linear_model = pytest.importorskip("sklearn.linear_model", reason=SKLEARN)
    x, y = _data(n=70, d=4, k=2, seed=3)
    fit = fit_linear(x, y, C=0.3, **TIGHT)
    ref = linear_model.LogisticRegression(C=0.6, **TIGHT).fit(x, y)
    np.testing.assert_allclose(fit.kernel[:, 0], -fit.kernel[:, 1], atol=1e-5)
    np.testing.assert_allclose(fit.kernel[:, 1] - fit.kernel[:, 0], ref.coef_[0], atol=1e-3)
    np.testing.assert_allclose(fit.bias[1] - fit.bias[0], ref.intercept_[0], atol=1e-3)
    np.testing.assert_allclose(_softmax(x @ fit.kernel + fit.bias), ref.predict_proba(x), atol=1e-3)


def test_sample_weight_matches_sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model", reason=SKLEARN)
    x, y = _data(n=60, d=5, k=3, seed=4)
    weights = np.random.default_rng(5).uniform(0.0, 3.0, 60)
    weights[:5] = 0.0
    fit = fit_linear(x, y, C=2.0, sample_weight=weights, **TIGHT)
    ref = linear_model.LogisticRegression(C=2.0, **TIGHT).fit(x, y, sample_weight=weights)
    np.testing.assert_allclose(fit.kernel, ref.coef_.T, atol=1e-3)
    unweighted = fit_linear(x, y, C=2.0)
    assert np.abs(unweighted.kernel - ref.coef_.T).max() > 1e-2  # the weights did matter


def test_regression_is_ridge():
    linear_model = pytest.importorskip("sklearn.linear_model", reason=SKLEARN)
    x, _ = _data(n=50, d=6, seed=6)
    targets = x @ np.arange(1.0, 7.0)[:, None] * [1.0, -0.5] + np.random.default_rng(7).normal(
        size=(50, 2)
    )
    weights = np.random.default_rng(8).uniform(0.5, 2.0, 50)
    fit = fit_linear(x, targets, "regression", C=0.1, sample_weight=weights)
    ref = linear_model.Ridge(alpha=10.0).fit(x, targets, sample_weight=weights)
    np.testing.assert_allclose(fit.kernel, ref.coef_.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fit.bias, ref.intercept_, rtol=1e-4, atol=1e-4)
    one_column = fit_linear(x, targets[:, 0], "regression", C=0.1, sample_weight=weights)
    assert one_column.kernel.shape == (6, 1)


def test_standardize_is_fitting_z_scored_features():
    x, y = _data(n=90, d=8, k=4, seed=9)
    x[:, 7] = 3.0  # a constant feature: std 0 counts as 1
    fit = fit_linear(x, y, C=0.5, standardize=True)
    std = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    z_scored = (x - x.mean(axis=0)) / std
    direct = fit_linear(z_scored, y, C=0.5)
    np.testing.assert_allclose(
        x @ fit.kernel + fit.bias, z_scored @ direct.kernel + direct.bias, atol=1e-4
    )
    plain = fit_linear(x, y, C=0.5)
    assert np.abs(plain.kernel - fit.kernel).max() > 1e-2  # z-scoring changes the penalty's pull


def test_near_constant_feature_is_not_scaled_up():
    x, y = _data(n=60, d=5, k=3, seed=23)
    x[:, 4] = 1e-32 * np.random.default_rng(24).normal(size=60)  # constant but for rounding
    fit = fit_linear_head(x, y)
    assert np.isfinite(fit.kernel).all() and np.abs(fit.kernel).max() < 1e3


def test_warm_start_reaches_the_same_optimum():
    x, y = _data(n=200, d=30, k=5, seed=10, signal=0.5)
    cold = fit_linear(x, y, C=1.0)
    near = fit_linear(x, y, C=1.0, init=(cold.kernel * 1.01, cold.bias))
    assert near.converged and near.iterations < cold.iterations
    np.testing.assert_allclose(near.kernel, cold.kernel, atol=1e-3)
    # Far off, with the biases shifted (which softmax cannot see): the solver must not drift
    # along the directions softmax is blind to (it took 100+ steps when it did).
    far = fit_linear(x, y, C=1.0, init=(cold.kernel * 3.0, cold.bias + 1.0))
    assert far.converged and far.iterations < 3 * cold.iterations, (far.iterations, cold.iterations)
    np.testing.assert_allclose(far.kernel, cold.kernel, atol=1e-3)


def test_preconditioned_solver_needs_few_iterations_on_correlated_features():
    # Correlated, badly scaled columns, nearly separable at this C: plain L-BFGS takes ~850
    # steps, ~290 without the diagonal guess, and a guess blind to the curvature flattening
    # as classes separate never converged. The solver takes ~130.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(400, 60)) @ (rng.normal(size=(60, 60)) * np.logspace(0, -3, 60)[:, None])
    y = (x @ rng.normal(size=(60, 4)) + rng.normal(size=(400, 4))).argmax(axis=1)
    fit = fit_linear(x * 100.0, y, C=10.0)
    assert fit.converged and fit.iterations < 200, fit.iterations


def test_cv_chooses_less_penalty_for_separable_labels_than_for_noise():
    x, separable = _data(n=150, d=20, k=3, seed=12, signal=4.0)
    noise = np.random.default_rng(13).integers(0, 3, 150)
    clean = fit_linear_head(x, separable)
    noisy = fit_linear_head(x, noise)
    assert clean.folds == noisy.folds == 5
    assert noisy.C < clean.C, (noisy.C, clean.C)
    # One-standard-error rule: the chosen C is among the tried, near the lowest loss.
    assert noisy.C in noisy.cv_loss and noisy.cv_loss[noisy.C] <= 1.1 * min(noisy.cv_loss.values())
    assert ((x @ clean.kernel + clean.bias).argmax(axis=1) == separable).mean() > 0.95


def test_cv_keeps_C_at_one_unless_the_folds_clearly_prefer_another():
    x, y = _data(n=150, d=20, k=3, seed=12, signal=4.0)
    # Features a thousand times smaller: C=1 underfits them, and CV moves far from it.
    tiny = fit_linear_head(x * 1e-3, y, standardize=False)
    assert tiny.C >= 100, tiny.cv_loss
    at_one = fit_linear(x * 1e-3, y, C=1.0)

    def accuracy(fit):
        return ((x * 1e-3 @ fit.kernel + fit.bias).argmax(axis=1) == y).mean()

    assert accuracy(tiny) > accuracy(at_one) + 0.2, (accuracy(tiny), accuracy(at_one))
    # Candidates whose held-out losses differ by less than the folds' spread: C=1 is kept,
    # though it is not the lowest (a larger C always fits noise labels a little closer).
    noise = np.random.default_rng(13).integers(0, 3, 150)
    near = fit_linear_head(x, noise, standardize=False, Cs=[0.9, 1.0, 1.1])
    assert near.C == 1.0 and min(near.cv_loss, key=near.cv_loss.get) != 1.0, near.cv_loss


def test_rescale_reaches_features_far_smaller_than_the_grid_and_leaves_others_alone():
    # A random CNN's pooled features can be 1e-11 (tfxfer.train.random_start): no C of the
    # grid reaches them, and the head predicts one class. Rescaled by their common spread,
    # they are fitted as the same features at unit scale are.
    x, y = _data(n=150, d=20, k=3, seed=12, signal=4.0)
    x = x / np.sqrt(np.mean((x - x.mean(axis=0)) ** 2))  # spread 1: inside the range

    def accuracy(fit, scale):
        return ((x * scale @ fit.kernel + fit.bias).argmax(axis=1) == y).mean()

    plain = fit_linear_head(x * 1e-11, y, standardize=False)
    rescaled = fit_linear_head(x * 1e-11, y, standardize=False, rescale=True)
    unit = fit_linear_head(x, y, standardize=False)
    assert accuracy(plain, 1e-11) < 0.5
    assert rescaled.C == unit.C and accuracy(rescaled, 1e-11) == accuracy(unit, 1.0) > 0.95
    np.testing.assert_allclose(rescaled.kernel * 1e-11, unit.kernel, rtol=1e-4, atol=1e-4)
    # Inside the range (1e-2 to 1e2) rescale changes nothing.
    inside = fit_linear_head(x * 30, y, standardize=False, rescale=True)
    same = fit_linear_head(x * 30, y, standardize=False)
    assert inside.C == same.C
    np.testing.assert_array_equal(inside.kernel, same.kernel)


def test_cv_final_fit_is_fit_linear_at_the_chosen_C():
    x, y = _data(n=120, d=10, k=3, seed=14, signal=1.5)
    head = fit_linear_head(x, y, Cs=[0.01, 0.1, 1.0, 10.0])
    single = fit_linear(x, y, C=head.C, standardize=True)
    assert set(head.cv_loss) <= {0.01, 0.1, 1.0, 10.0} and len(head.cv_loss) >= 3
    np.testing.assert_allclose(head.kernel, single.kernel, atol=1e-4)


def test_class_with_one_example_skips_cv_and_says_so():
    x, y = _data(n=40, d=5, k=3, seed=15)
    y[y == 2] = 0
    y[7] = 2
    fit = fit_linear_head(x, y)
    assert fit.C == 1.0 and fit.folds == 0 and fit.cv_loss == {}
    assert "cross-validation skipped" in fit.note and "class 2 has 1 example" in fit.note
    assert fit.kernel.shape == (5, 3) and np.isfinite(fit.kernel).all()


def test_fewer_examples_per_class_than_folds_uses_fewer_folds():
    x, y = _data(n=9, d=4, k=3, seed=16)
    y = np.repeat([0, 1, 2], 3)
    fit = fit_linear_head(x, y, folds=5)
    assert fit.folds == 3 and "3 folds, not 5" in fit.note and fit.cv_loss
    tiny = fit_linear_head(x[:5], np.array([0, 1, 2, 0, 1]))
    assert tiny.folds == 0 and "cross-validation skipped" in tiny.note


def test_absent_class_keeps_a_column_that_is_never_predicted():
    x, y = _data(n=60, d=5, k=3, seed=17)
    for fit in (fit_linear(x, y, num_outputs=4), fit_linear_head(x, y, num_outputs=4)):
        assert fit.kernel.shape == (5, 4) and fit.bias.shape == (4,)
        assert np.all(fit.kernel[:, 3] == 0.0)
        assert _softmax(x @ fit.kernel + fit.bias)[:, 3].max() < 1.0 / 60
    three = fit_linear(x, y, num_outputs=3)
    np.testing.assert_allclose(
        fit_linear(x, y, num_outputs=4).kernel[:, :3], three.kernel, atol=1e-6
    )


def test_multi_label_constant_column_and_cv():
    x, y = _data(n=80, d=6, k=3, seed=18, signal=5.0)
    labels = np.eye(3)[y]
    labels[:, 1] = 0.0  # never positive
    fit = fit_linear_head(x, labels, "multi_label")
    assert fit.folds == 5 and fit.cv_loss
    assert np.all(fit.kernel[:, 1] == 0.0) and fit.bias[1] < -np.log(80)
    assert (
        _sigmoid(x @ fit.kernel + fit.bias)[:, [0, 2]].round() == labels[:, [0, 2]]
    ).mean() > 0.8


def test_regression_cv_prefers_more_penalty_for_noise():
    rng = np.random.default_rng(19)
    x = rng.normal(size=(100, 20))
    signal = fit_linear_head(x, x @ rng.normal(size=20) + 0.1 * rng.normal(size=100), "regression")
    noise = fit_linear_head(x, rng.normal(size=100), "regression")
    assert noise.C < signal.C and signal.iterations == 0


def test_large_data_runs_cv_on_a_sample():
    x, y = _data(n=600, d=8, k=3, seed=20)
    fit = fit_linear_head(x, y, max_cv_examples=150)
    assert "sample of 15" in fit.note and "of 600 examples" in fit.note and fit.folds == 5


def test_info_is_json():
    x, y = _data(seed=21)
    fit = fit_linear_head(x, y, Cs=[0.1, 1.0, 10.0])
    info = json.loads(json.dumps(fit.info()))
    assert set(info) == {"C", "folds", "cv_loss", "iterations", "converged", "seconds", "note"}
    assert info["C"] == fit.C and len(info["cv_loss"]) == len(fit.cv_loss)
    assert isinstance(fit, LinearFit) and TASKS == ("single_label", "multi_label", "regression")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"targets": np.zeros(59, int)}, "one target per example"),
        ({"features": np.full((60, 5), np.nan)}, "finite `features`"),
        ({"targets": np.arange(60) % 4, "num_outputs": 3}, "class ids in [0, 3)"),
        ({"targets": np.arange(60) % 3 - 1}, "class ids in"),
        ({"targets": np.full(60, 0.5)}, "integer class ids"),
        ({"task": "ranking"}, "`task` to be one of"),
        ({"features": np.zeros((0, 5)), "targets": np.zeros(0, int)}, "non-empty"),
        ({"C": 0.0}, "`C` positive"),
        ({"C": -1.0}, "`C` positive"),
        ({"Cs": [1.0, 0.0]}, "`Cs` positive"),
        ({"folds": 1}, "`folds`"),
        ({"sample_weight": -np.ones(60)}, "`sample_weight`"),
        ({"task": "multi_label", "targets": np.full((60, 2), 2.0)}, "0/1 labels"),
        ({"features": [["a"] * 5] * 60}, "`features` as numbers"),
    ],
)
def test_bad_input_is_a_tfxfer_error(change, words):
    x, y = _data(seed=22)
    kwargs = {"features": x, "targets": y, **change}
    fit = fit_linear_head if {"Cs", "folds"} & set(change) else fit_linear
    with pytest.raises(TfxferError, match=None) as error:
        fit(**kwargs)
    assert words in str(error.value) and "\n" not in str(error.value)
