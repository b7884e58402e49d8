"""Fitting scaling laws to (N, D, loss) points.

Approach 3 (Hoffmann et al. 2022, appendix D.2): minimise over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),

with A = exp(a), B = exp(b), E = exp(e), by L-BFGS-B from a grid of starting points; the best
local minimum wins. Confidence intervals come from refitting bootstrap resamples of the points
(Besiroglu et al. 2024 showed the published Chinchilla fit had stopped early, so the optimiser
here runs to tight tolerances, on an analytic gradient).

Approach 2: per compute budget, a parabola of loss in log N (and in log D); its minimum is
N*(C) (D*(C)); then log N* = log k + a log C by least squares, likewise for D*.
"""

import dataclasses
import itertools
from typing import Optional

import numpy as np
from scipy import optimize

from jaxlm.errors import UserError
from jaxlm.scaling.law import PARAM_NAMES, Law

# Hoffmann et al.'s grid of initialisations: alpha, beta, e, a, b.
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
        "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}
# L-BFGS-B runs from this many of the grid's best starting points (evaluating all 4500 is cheap,
# optimising from all of them is not, and the best local minimum is found from the first few).
STARTS = 24
BOOTSTRAP_STARTS = 3
EXPONENT_BOUNDS = (1e-4, 10.0)


def _grid() -> np.ndarray:
    """[K, 5] starting points in the order (a, b, e, alpha, beta)."""
    combos = itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])
    return np.array(list(combos), np.float64)


def _log_sum_exp_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray):
    """theta [..., 5] -> (log prediction [..., n], softmax weights [3, ..., n])."""
    a, b, e, alpha, beta = (theta[..., i:i + 1] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0.0 * log_n))
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    return top + np.log(total), w / total


def _huber(r: np.ndarray, delta: float):
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    slope = np.where(small, r, delta * np.sign(r))
    return value, slope


def objective(theta, log_n, log_d, log_l, delta: float, weights=None):
    """Mean Huber loss / delta (so tolerances do not depend on delta) and its gradient."""
    weights = np.ones_like(log_l) if weights is None else weights
    pred, w = _log_sum_exp_terms(theta, log_n, log_d)
    value, slope = _huber(pred - log_l, delta)
    scale = 1.0 / (delta * weights.sum())
    s = slope * weights * scale
    grad = np.array([np.sum(s * w[0]), np.sum(s * w[1]), np.sum(s * w[2]),
                     -np.sum(s * w[0] * log_n), -np.sum(s * w[1] * log_d)])
    return float(np.sum(value * weights) * scale), grad


def _grid_objectives(starts, log_n, log_d, log_l, delta, weights):
    pred, _ = _log_sum_exp_terms(starts, log_n, log_d)
    value, _ = _huber(pred - log_l, delta)
    return (value * weights).sum(axis=-1) / (delta * weights.sum())


def _minimise(start, log_n, log_d, log_l, delta, weights):
    bounds = [(None, None)] * 3 + [EXPONENT_BOUNDS] * 2
    start = np.array(start, np.float64)
    start[3:] = np.clip(start[3:], *EXPONENT_BOUNDS)
    result = optimize.minimize(objective, start, args=(log_n, log_d, log_l, delta, weights), jac=True,
                               method="L-BFGS-B", bounds=bounds,
                               options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10})
    return result.x, float(result.fun)


def _best_fit(starts, log_n, log_d, log_l, delta, weights) -> tuple[np.ndarray, float]:
    best_x, best_f = None, np.inf
    for start in starts:
        x, f = _minimise(start, log_n, log_d, log_l, delta, weights)
        if f < best_f:
            best_x, best_f = x, f
    return best_x, best_f


def _law_of(theta: np.ndarray) -> Law:
    a, b, e, alpha, beta = theta
    return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta))


@dataclasses.dataclass
class Approach3:
    law: Law
    objective: float  # Mean Huber loss / delta at the optimum.
    num_points: int
    huber_delta: float
    bootstrap: np.ndarray  # [resamples, 5] in PARAM_NAMES order (E, A, B, alpha, beta).
    confidence: float

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        tail = 100 * (1 - self.confidence) / 2
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    def bootstrap_laws(self) -> list[Law]:
        return [Law.from_vector(v) for v in self.bootstrap]

    def intervals(self) -> dict[str, tuple[float, float]]:
        if len(self.bootstrap) == 0:
            return {}
        return {name: self.interval(self.bootstrap[:, i]) for i, name in enumerate(PARAM_NAMES)}


def fit_approach3(n, d, loss, delta: float = 1e-3, bootstrap: int = 200, seed: int = 0,
                  confidence: float = 0.95) -> Approach3:
    """Fits L(N, D) = E + A/N^alpha + B/D^beta to the points (approach 3)."""
    n, d, loss = (np.asarray(x, np.float64).ravel() for x in (n, d, loss))
    if len(n) < 5:
        raise UserError(f"the law has 5 constants but there are only {len(n)} points with a loss: "
                        f"train more runs (sizes x tokens) or give more rows in --points")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise UserError("every point needs N > 0, D > 0 and loss > 0")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    weights = np.ones_like(log_l)
    grid = _grid()
    order = np.argsort(_grid_objectives(grid, log_n, log_d, log_l, delta, weights))
    theta, best = _best_fit(grid[order[:STARTS]], log_n, log_d, log_l, delta, weights)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        # A resample is the same points drawn with replacement: counts as weights keep it exact.
        counts = np.bincount(rng.integers(0, len(n), len(n)), minlength=len(n)).astype(np.float64)
        keep = counts > 0
        args = (log_n[keep], log_d[keep], log_l[keep], delta, counts[keep])
        starts = [theta] + list(grid[np.argsort(_grid_objectives(grid, *args))[:BOOTSTRAP_STARTS]])
        x, _ = _best_fit(starts, *args)
        samples.append(_law_of(x).vector())
    return Approach3(law=_law_of(theta), objective=best, num_points=len(n), huber_delta=delta,
                     bootstrap=np.array(samples).reshape(-1, 5), confidence=confidence)


# == Approach 2: IsoFLOP parabolas ==================================================================

@dataclasses.dataclass
class IsoFlopBudget:
    flops: float
    params: list  # The budget's runs, in order of N.
    tokens: list
    losses: list
    parabola_n: Optional[list] = None  # loss = c0 x^2 + c1 x + c2 in x = ln N (np.polyfit order).
    parabola_d: Optional[list] = None
    optimal_params: Optional[float] = None
    optimal_tokens: Optional[float] = None
    optimal_loss: Optional[float] = None
    inside: bool = False  # N* lies within the budget's sizes (else it is extrapolated).
    note: str = ""


@dataclasses.dataclass
class PowerLaw:
    """y = k x^exponent, fitted in log-log by least squares."""

    k: float
    exponent: float

    def __call__(self, x):
        return self.k * np.asarray(x, np.float64) ** self.exponent


@dataclasses.dataclass
class Approach2:
    budgets: list
    params_law: Optional[PowerLaw]  # N*(C) = k C^a.
    tokens_law: Optional[PowerLaw]  # D*(C) = k C^b.


def _parabola_minimum(x: np.ndarray, y: np.ndarray):
    coeffs = np.polyfit(x, y, 2)
    if coeffs[0] <= 0:
        return coeffs, None, None
    x_min = -coeffs[1] / (2 * coeffs[0])
    return coeffs, float(x_min), float(np.polyval(coeffs, x_min))


def fit_budget(flops: float, n, d, loss) -> IsoFlopBudget:
    order = np.argsort(n)
    n, d, loss = (np.asarray(v, np.float64)[order] for v in (n, d, loss))
    budget = IsoFlopBudget(flops=float(flops), params=n.tolist(), tokens=d.tolist(), losses=loss.tolist())
    if len(np.unique(n)) < 3:
        budget.note = f"{len(np.unique(n))} model sizes: a parabola needs at least 3"
        return budget
    coeffs_n, x_n, loss_min = _parabola_minimum(np.log(n), loss)
    coeffs_d, x_d, _ = _parabola_minimum(np.log(d), loss)
    budget.parabola_n, budget.parabola_d = coeffs_n.tolist(), coeffs_d.tolist()
    if x_n is None or x_d is None:
        budget.note = "the losses are not convex in log N: no minimum (widen the sizes around the optimum)"
        return budget
    budget.optimal_params, budget.optimal_tokens, budget.optimal_loss = float(np.exp(x_n)), float(np.exp(x_d)), loss_min
    budget.inside = bool(n[0] <= budget.optimal_params <= n[-1])
    if not budget.inside:
        budget.note = "the minimum lies outside the budget's sizes (extrapolated)"
    return budget


def _power_law(x, y) -> PowerLaw:
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(k=float(np.exp(intercept)), exponent=float(slope))


def fit_approach2(groups: dict[float, tuple]) -> Approach2:
    """groups: budget C -> (N, D, loss) arrays of the runs trained with that budget."""
    budgets = [fit_budget(c, *groups[c]) for c in sorted(groups)]
    found = [b for b in budgets if b.optimal_params is not None]
    params_law = tokens_law = None
    if len(found) >= 2:
        c = np.array([b.flops for b in found])
        params_law = _power_law(c, [b.optimal_params for b in found])
        tokens_law = _power_law(c, [b.optimal_tokens for b in found])
    return Approach2(budgets=budgets, params_law=params_law, tokens_law=tokens_law)
