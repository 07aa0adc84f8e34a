"""The convex 'why alignment matters' model: the O(1/k) guarantee, and what a growing vs reset bias does."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpft_lab.convex import (bias_sizes, final_gap, gd_bound, gradient_descent_gaps, largest_period,
                               loglog_slope, make_problem)
from fedpft_lab.errors import ConfigError


@pytest.fixture(scope="module")
def problem():
    return make_problem(dim=20, decades=4.0, seed=0)


def test_problem_is_convex_not_strongly_convex_with_known_constants(problem):
    eig = np.linalg.eigvalsh(problem.A)
    assert eig[0] == pytest.approx(0.0, abs=1e-12)          # a flat direction: not strongly convex
    assert eig[1] > 0 and problem.L == pytest.approx(1.0)
    assert problem.f_star == pytest.approx(0.0, abs=1e-24)
    assert np.linalg.norm(problem.x0 - problem.x_star) == pytest.approx(1.0)
    np.testing.assert_allclose(problem.gradient(problem.x_star), 0.0, atol=1e-12)
    u = problem.bias_direction
    assert np.linalg.norm(u) == pytest.approx(1.0)
    null = np.linalg.eigh(problem.A)[1][:, 0]
    assert abs(u @ null) < 1e-10                             # the bias lives where the data can see


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(3, 25), decades=st.floats(0.5, 6.0))
def test_true_gradient_descent_meets_the_one_over_k_bound_at_every_step(seed, dim, decades):
    problem = make_problem(dim=dim, decades=decades, seed=seed)
    gaps = gradient_descent_gaps(problem, 300)
    bound = gd_bound(problem, 300)
    assert np.all(gaps[1:] <= bound * (1 + 1e-9) + 1e-15)
    assert np.all(np.diff(gaps) <= 1e-15)                    # exact gradient descent never goes uphill


def test_true_gradient_follows_the_one_over_k_slope(problem):
    gaps = gradient_descent_gaps(problem, 2000)
    assert -1.3 < loglog_slope(gaps, start=20) < -0.7          # 1/k, not geometric


@pytest.mark.parametrize("period", [None, 1, 7, math.inf])
def test_zero_delta_is_plain_gradient_descent_exactly(problem, period):
    np.testing.assert_array_equal(gradient_descent_gaps(problem, 200, 0.0, period),
                                  gradient_descent_gaps(problem, 200))


def test_infinite_period_is_no_realignment(problem):
    never = gradient_descent_gaps(problem, 300, 1e-3, None)
    np.testing.assert_array_equal(gradient_descent_gaps(problem, 300, 1e-3, math.inf), never)
    np.testing.assert_array_equal(gradient_descent_gaps(problem, 300, 1e-3, 10_000), never)


def test_realigned_floor_is_below_unaligned_and_grows_with_period(problem):
    unaligned = final_gap(gradient_descent_gaps(problem, 3000, 1e-4, None))
    floors = [final_gap(gradient_descent_gaps(problem, 3000, 1e-4, T)) for T in (10, 50, 200)]
    assert floors[0] < floors[1] < floors[2] < unaligned
    truth = final_gap(gradient_descent_gaps(problem, 3000))
    assert truth <= floors[0]


def test_unaligned_gap_keeps_growing(problem):
    gaps = gradient_descent_gaps(problem, 3000, 1e-4, None)
    assert gaps[3000] > gaps[1500] > gaps[500]


def test_bias_sizes_sawtooth_and_cap():
    np.testing.assert_array_equal(bias_sizes(7, 2.0, 3), [0, 2, 4, 0, 2, 4, 0])
    np.testing.assert_array_equal(bias_sizes(5, 1.0, None), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(bias_sizes(5, 1.0, None, cap=2), [0, 1, 2, 2, 2])


def test_largest_period_is_the_edge_of_the_threshold(problem):
    delta, steps, threshold = 1e-4, 1000, 5e-5
    best = largest_period(problem, threshold, delta, steps, max_period=60)
    assert best is not None and 1 <= best < 60
    assert final_gap(gradient_descent_gaps(problem, steps, delta, best)) <= threshold
    assert all(final_gap(gradient_descent_gaps(problem, steps, delta, T)) > threshold
               for T in range(best + 1, 61))


def test_final_gap_uses_the_tail():
    assert final_gap(np.array([9.0, 1.0, 2.0, 3.0, 4.0]), tail=0.4) == 4.0
    assert final_gap(np.array([9.0, 1.0]), tail=0.01) == 1.0


@pytest.mark.parametrize("kwargs", [dict(delta=-1.0), dict(period=0), dict(num_steps=0)])
def test_bad_inputs_raise_config_error(problem, kwargs):
    args = dict(num_steps=10, delta=0.1, period=None) | kwargs
    with pytest.raises(ConfigError):
        gradient_descent_gaps(problem, **args)


def test_bad_problem_inputs_raise_config_error():
    with pytest.raises(ConfigError):
        make_problem(dim=2)
    with pytest.raises(ConfigError):
        gradient_descent_gaps("not a problem", 10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        final_gap(np.ones(3), tail=0)


def test_loglog_slope_recovers_known_powers():
    k = np.arange(0, 1001, dtype=float)
    k[0] = 1.0
    assert loglog_slope(1.0 / k) == pytest.approx(-1.0)
    assert loglog_slope(3.0 / k**2, start=5, end=500) == pytest.approx(-2.0)
