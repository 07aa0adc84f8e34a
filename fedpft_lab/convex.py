"""Why re-alignment matters, on a problem small enough to solve exactly: least squares with a biased gradient.

FedPFT clients fine-tune the adapter on a *sub*-FM, so the gradient they follow is a proxy of the gradient
the full FM would give. The proxy is biased, and the bias grows as the adapter drifts away from the point
where sub-FM and FM were last aligned. Every ``T`` rounds the server re-aligns the sub-FM (neuron-level
distillation), which resets the bias. The paper's convergence result has the same shape as the textbook
one for gradient descent with errors: an O(1/k) term plus a term set by the gradient discrepancy.

Here we watch that happen on a convex least-squares problem

    f(x) = 1/2 ||J x - y||^2,   gradient  A x - J^T y  with  A = J^T J,  L = largest eigenvalue of A.

Why this problem:

* **convex but not strongly convex.** ``J`` has one zero singular value (A is rank-deficient) and the others
  are spread log-uniformly over several decades. Strongly convex problems converge geometrically, which would
  hide the O(1/k) rate; with curvatures spanning decades, gradient descent keeps finding slower directions and
  the gap f(x_k) - f* follows the 1/k slope, under the classic bound L ||x0 - x*||^2 / (2k) for step 1/L.
* **a natural bias direction.** A proxy model that mispredicts the residual ``J x - y`` by a vector ``r``
  returns the gradient error ``J^T r``; so we take the fixed unit bias direction ``u = J^T v / ||J^T v||``
  for a random output direction v. The bias lives where the data can see, weighted by how strongly it sees.
* **the bias** at step k is ``delta * (k - k_last) * u``, where k_last is the last re-alignment step
  (a multiple of ``period``; never, if ``period`` is None), optionally capped at ``cap`` steps of drift.

Everything is deterministic and pure: the same seed gives the same problem and the same curves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, check_range


@dataclass(frozen=True)
class LeastSquares:
    """f(x) = 1/2 ||J x - y||^2 with a known minimiser ``x_star`` (the one nearest to ``x0``)."""

    J: np.ndarray
    y: np.ndarray
    x0: np.ndarray
    x_star: np.ndarray
    bias_direction: np.ndarray  # unit vector u of the proxy's gradient error

    @property
    def A(self) -> np.ndarray:
        return self.J.T @ self.J

    @property
    def L(self) -> float:
        """Smoothness constant: the largest eigenvalue of A (gradient descent uses step 1/L)."""
        return float(np.linalg.eigvalsh(self.A)[-1])

    def loss(self, x: np.ndarray) -> float:
        r = self.J @ x - self.y
        return 0.5 * float(r @ r)

    def gradient(self, x: np.ndarray) -> np.ndarray:
        return self.J.T @ (self.J @ x - self.y)

    @property
    def f_star(self) -> float:
        return self.loss(self.x_star)


def random_orthogonal(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A random rotation (QR of a Gaussian matrix, signs fixed so it is uniformly distributed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def make_problem(dim: int = 20, decades: float = 4.0, seed: int = 0) -> LeastSquares:
    """A rank-deficient least-squares problem with L = 1, ||x0 - x*|| = 1 and f* = 0.

    Curvatures (eigenvalues of A) are 1, ..., 10**-decades, log-spaced, plus one exact 0 (a flat direction).
    The start x0 = 0 is equally far from x* along every curved direction, so each curvature scale
    contributes to the gap at its own time and the sum follows 1/k until k ~ 10**decades.
    """
    check_range("dim", dim, 3, 500)
    check_range("decades", decades, 0.5, 8)
    rng = np.random.default_rng(seed)
    curved = dim - 1
    singular = np.sqrt(np.logspace(0.0, -decades, curved))
    singular = np.append(singular, 0.0)                      # the flat direction: not strongly convex
    U, V = random_orthogonal(dim, rng), random_orthogonal(dim, rng)
    J = U @ np.diag(singular) @ V.T
    signs = rng.choice([-1.0, 1.0], size=curved) / math.sqrt(curved)
    x_star = V @ np.append(signs, 0.0)                       # no flat component: nearest minimiser to 0
    x0 = np.zeros(dim)
    y = J @ x_star                                           # a perfect fit exists, so f* = 0
    jt_v = J.T @ rng.standard_normal(dim)
    return LeastSquares(J=J, y=y, x0=x0, x_star=x_star, bias_direction=jt_v / np.linalg.norm(jt_v))


def bias_sizes(num_steps: int, delta: float, period: float | None = None,
               cap: int | None = None) -> np.ndarray:
    """Size of the proxy's gradient bias at steps k = 0..num_steps-1: delta * steps since last alignment.

    ``period=None`` (or math.inf) means never re-align, so the bias grows forever; ``cap`` limits the
    drift to ``cap`` steps. Right after an alignment (k a multiple of period) the proxy is exact.
    """
    check_range("num_steps", num_steps, 1)
    check_range("delta", delta, 0)
    steps = np.arange(num_steps, dtype=np.float64)
    if period is not None and math.isfinite(period):
        check_range("period", period, 1)
        steps = steps % int(period)
    if cap is not None:
        check_range("cap", cap, 0)
        steps = np.minimum(steps, cap)
    return delta * steps


def gradient_descent_gaps(problem: LeastSquares, num_steps: int, delta: float = 0.0,
                          period: float | None = None, cap: int | None = None) -> np.ndarray:
    """Run x_{k+1} = x_k - (1/L) (grad f(x_k) + bias_k u) and return f(x_k) - f* for k = 0..num_steps.

    ``delta = 0`` is plain gradient descent with the true gradient (bit for bit).
    """
    if not isinstance(problem, LeastSquares):
        raise ConfigError(f"problem must be a LeastSquares (see make_problem), got {type(problem).__name__}")
    sizes = bias_sizes(num_steps, delta, period, cap)
    step = 1.0 / problem.L
    f_star = problem.f_star
    x = problem.x0.copy()
    gaps = np.empty(num_steps + 1)
    gaps[0] = problem.loss(x) - f_star
    for k in range(num_steps):
        proxy = problem.gradient(x) + sizes[k] * problem.bias_direction
        x = x - step * proxy
        gaps[k + 1] = problem.loss(x) - f_star
    return gaps


def gd_bound(problem: LeastSquares, num_steps: int) -> np.ndarray:
    """The classic guarantee for step 1/L on a convex L-smooth f: f(x_k) - f* <= L ||x0 - x*||^2 / (2k).

    Returned for k = 1..num_steps (the bound is infinite at k = 0).
    """
    k = np.arange(1, num_steps + 1, dtype=np.float64)
    distance2 = float(np.sum((problem.x0 - problem.x_star) ** 2))
    return problem.L * distance2 / (2.0 * k)


def loglog_slope(gaps: np.ndarray, start: int = 10, end: int | None = None) -> float:
    """Slope of log(gap) against log(k) between steps ``start`` and ``end``: -1 means the gap falls like 1/k."""
    gaps = np.asarray(gaps, dtype=np.float64)
    end = len(gaps) - 1 if end is None else end
    check_range("start", start, 1, end - 1)
    k = np.unique(np.geomspace(start, end, 20).astype(int))
    return float(np.polyfit(np.log(k), np.log(np.maximum(gaps[k], 1e-300)), 1)[0])


def final_gap(gaps: np.ndarray, tail: float = 0.2) -> float:
    """The worst gap over the last ``tail`` fraction of the run: where a curve has settled (its floor).

    Taking the max over a window, not the last value, ignores where in the re-alignment cycle the run ends.
    """
    check_range("tail", tail, 0, 1, lo_open=True)
    gaps = np.asarray(gaps, dtype=np.float64)
    start = min(len(gaps) - 1, int(len(gaps) * (1.0 - tail)))
    return float(np.max(gaps[start:]))


def largest_period(problem: LeastSquares, threshold: float, delta: float, num_steps: int,
                   max_period: int = 100) -> int | None:
    """The largest re-alignment period T <= max_period whose final gap stays <= threshold (None if none)."""
    check_range("threshold", threshold, 0, lo_open=True)
    check_range("max_period", max_period, 1)
    best = None
    for period in range(1, max_period + 1):
        if final_gap(gradient_descent_gaps(problem, num_steps, delta, period)) <= threshold:
            best = period
    return best
