"""The LP relaxation of makespan by bin *type*, solved by cutting planes on its dual (numba).

Primal, with ``c[i, k] = times[i, k] / V_k`` (``V_k`` = summed speed of the type-k bins)::

    min T   s.t.   Σ_k x[i, k] = 1 (every item),   Σ_i c[i, k]·x[i, k] <= T (every type),
                   x >= 0,   x[i, k] = 0 where item i is not eligible for type k.

Dual: ``max_{μ in simplex} g(μ)``, ``g(μ) = Σ_i min_{k eligible} μ_k·c[i, k]``. ``g`` is
concave and positively homogeneous; at any μ the argmin assignment σ gives the
supergradient ``s_k = Σ_{i: σ(i)=k} c[i, k]`` and the cut ``g(ν) <= s·ν`` for every ν.
Kelley's method: the master ``max z s.t. z <= s_r·μ (all cuts so far), Σμ <= 1, μ >= 0``
(K+1 variables) is solved exactly by a dense tableau simplex with Bland's rule; its
optimum ``z*`` bounds ``max g`` from above, its maximiser is the next point, and its
dual weights ``p_r`` (Σ p_r = 1) mix the cut assignments into a fractional primal
``x[i, k] = Σ_r p_r·[σ_r(i) = k]`` whose type loads are at most ``z*``.

Weak duality makes every evaluated ``g(μ)`` a valid lower bound, whatever the master
returns, so the bound's validity never rests on the simplex; the simplex only decides
how fast the bound tightens. Stops when ``z* − max g <= tol·max g`` (``tol = 1e-6``) or after ``max_cuts``
(60) cuts.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["type_lp"]

_EPS = 1e-12


@njit(cache=True, nogil=True)
def _evaluate(c, ok, mu, arg, weight):
    """g(μ), its supergradient, and the argmin type of every item (written to ``arg``).
    Row ``i`` stands for ``weight[i]`` identical items (1.0 everywhere: plain items)."""
    n, num = c.shape
    grad = np.zeros(num)
    g = 0.0
    for i in range(n):
        best = np.inf
        bk = -1
        for k in range(num):
            if ok[i, k]:
                v = mu[k] * c[i, k]
                if v < best:
                    best = v
                    bk = k
        g += weight[i] * best
        grad[bk] += weight[i] * c[i, bk]
        arg[i] = bk
    return g, grad


@njit(cache=True, nogil=True)
def _master(cuts, num_cuts, num):
    """Solve max z s.t. z - cuts[r]·μ <= 0 (r < num_cuts), Σμ <= 1, μ, z >= 0.

    Returns (z*, μ*, p) with p[r] the dual weight of cut r. Dense tableau simplex from the
    origin (feasible: the right-hand side is >= 0), Bland's rule against cycling.
    """
    rows = num_cuts + 1
    cols = num + 1 + rows  # μ_0..μ_{num-1}, z, one slack per row
    tab = np.zeros((rows + 1, cols + 1))  # last row: objective (reduced costs); last column: rhs
    for r in range(num_cuts):
        for k in range(num):
            tab[r, k] = -cuts[r, k]
        tab[r, num] = 1.0
        tab[r, num + 1 + r] = 1.0
    for k in range(num):
        tab[num_cuts, k] = 1.0
    tab[num_cuts, num + 1 + num_cuts] = 1.0
    tab[num_cuts, cols] = 1.0
    tab[rows, num] = -1.0  # maximise z  <=>  reduced cost of z is -1
    basis = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        basis[r] = num + 1 + r
    for _ in range(50 * (rows + cols)):
        enter = -1
        for q in range(cols):  # Bland: lowest index with a negative reduced cost
            if tab[rows, q] < -_EPS:
                enter = q
                break
        if enter < 0:
            break
        leave = -1
        best_ratio = np.inf
        for r in range(rows):
            a = tab[r, enter]
            if a > _EPS:
                ratio = tab[r, cols] / a
                if ratio < best_ratio - _EPS or (abs(ratio - best_ratio) <= _EPS and leave >= 0 and basis[r] < basis[leave]):
                    best_ratio = ratio
                    leave = r
        if leave < 0:  # unbounded cannot happen (Σμ <= 1 bounds z); stop defensively
            break
        pivot = tab[leave, enter]
        for q in range(cols + 1):
            tab[leave, q] /= pivot
        for r in range(rows + 1):
            if r != leave:
                f = tab[r, enter]
                if f != 0.0:
                    for q in range(cols + 1):
                        tab[r, q] -= f * tab[leave, q]
        basis[leave] = enter
    mu = np.zeros(num)
    z = 0.0
    for r in range(rows):
        if basis[r] < num:
            mu[basis[r]] = tab[r, cols]
        elif basis[r] == num:
            z = tab[r, cols]
    p = np.zeros(num_cuts)
    for r in range(num_cuts):
        p[r] = tab[rows, num + 1 + r]  # dual value of cut r = reduced cost of its slack
    return z, mu, p


@njit(cache=True, nogil=True)
def _kelley(c, ok, weight, tol, max_cuts):
    n, num = c.shape
    cuts = np.zeros((max_cuts, num))
    args = np.zeros((max_cuts, n), dtype=np.int64)
    mu = np.full(num, 1.0 / num)
    best = 0.0
    best_mu = mu.copy()
    p = np.zeros(1)
    num_cuts = 0
    upper = np.inf
    for it in range(max_cuts):
        g, grad = _evaluate(c, ok, mu, args[it], weight)
        if g > best:
            best = g
            best_mu = mu.copy()
        for k in range(num):
            cuts[it, k] = grad[k]
        num_cuts = it + 1
        upper, nxt, p = _master(cuts, num_cuts, num)
        if upper - best <= tol * best or upper <= 0.0:
            break
        total = nxt.sum()
        if total <= 0.0:
            break
        mu = nxt / total
    # fractional primal from the master's duals
    x = np.zeros((n, num))
    weight = p.sum()
    if weight > 0.0:
        for r in range(num_cuts):
            if p[r] > 0.0:
                for i in range(n):
                    x[i, args[r, i]] += p[r] / weight
    else:
        for i in range(n):
            x[i, args[0, i]] = 1.0
    return best, upper, best_mu, x, num_cuts


def type_lp(
    times: np.ndarray,
    bin_type: np.ndarray,
    speed: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    tol: float = 1e-6,
    max_cuts: int = 60,
) -> tuple[float, np.ndarray, int]:
    """LP by type on validated inputs.

    ``weights``: float64[n] multiplicity of every row (default 1): row ``i`` stands for
    ``weights[i]`` items with identical times, so callers can solve the LP once per
    distinct item (e.g. per distinct sequence length). Each item of a row gets the row's
    share in ``x``. With ``weights=None`` the arithmetic is exactly that of unit weights.

    Returns (lower bound in seconds — the best ``g(μ)``, a valid bound even when not
    converged; x float64[n, K] fractional share of every item on every type (0 for types
    with no bin); number of cuts used).
    """
    n, num_types = times.shape
    present = np.unique(bin_type)
    cap = np.bincount(bin_type, weights=speed, minlength=num_types)[present]
    t = times[:, present]
    ok = np.isfinite(t)
    x_full = np.zeros((n, num_types))
    wt = np.ones(n) if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    if wt.shape != (n,) or not np.all(np.isfinite(wt)) or np.any(wt < 0):
        raise ValueError(f"weights must be {n} finite numbers >= 0 (one per row of times), got shape {wt.shape}")
    if present.shape[0] == 1:
        x_full[:, present[0]] = 1.0
        total = t[:, 0].sum() if weights is None else float((wt * t[:, 0]).sum())
        return float(total / cap[0]), x_full, 0
    c = np.where(ok, t, 0.0) / cap[None, :]
    scale = float(c.max())
    if scale <= 0.0:  # all times zero
        x_full[np.arange(n), present[np.argmax(ok, axis=1)]] = 1.0
        return 0.0, x_full, 0
    best, _, _, x, cuts = _kelley(np.ascontiguousarray(c / scale), np.ascontiguousarray(ok), wt, tol, max_cuts)
    x_full[:, present] = x
    return float(best) * scale, x_full, int(cuts)
