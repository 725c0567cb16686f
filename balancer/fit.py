"""Least-squares fits of ``t = a·Σs² + b·Σs + d·n + c`` to measured micro-batch times.

A sample is one measured micro-batch: the lengths of the sequences it held (tokens) and
its time (seconds, or any one unit). Its model time is ``Σ_i (a·s_i² + b·s_i + d) + c``
with ``n`` sequences, so a sample of a single sequence is ``a·s² + b·s + (c + d)``: the
per-sequence overhead ``d`` can only be told apart from the per-micro-batch overhead
``c`` by micro-batches of different sequence counts (calibration times packed ones). The
coefficients must be non-negative (a negative ``a`` would make long sequences cheaper than
short ones), so the fit is a non-negative least-squares problem in two to four unknowns,
solved exactly by :func:`nnls` — small enough to try every support.

>>> r = fit_quadratic([512, 1024, 2048], [0.31, 0.72, 1.87], c=0.05)
>>> round(r.r2, 3) > 0.99
True
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["FitResult", "nnls", "fit_quadratic", "design_matrix"]

MAX_NNLS_UNKNOWNS = 8
""":func:`nnls` enumerates the 2ⁿ supports; fine for the 2-4 unknowns of a cost fit."""


@dataclass(frozen=True, slots=True)
class FitResult:
    """Fitted coefficients and the fit's quality (same time unit as the samples)."""

    a: float
    """Per token²."""
    b: float
    """Per token."""
    c: float
    """Per micro-batch (fitted, or the value that was held fixed)."""
    r2: float
    """Coefficient of determination of the predicted vs measured times (1 = perfect)."""
    rmse: float
    """Root-mean-square residual, same unit as the times."""
    num_samples: int
    fitted_c: bool
    """``True`` when ``c`` was fitted, ``False`` when it was given."""
    d: float = 0.0
    """Per sequence in a micro-batch (fitted, given, or 0 when the samples cannot tell it from ``c``)."""
    fitted_d: bool = False
    """``True`` when ``d`` was fitted (the samples held micro-batches of different sequence counts)."""
    max_tokens: int = 0
    """The largest measured micro-batch (tokens): beyond it the coefficients extrapolate."""

    def predict(self, lengths: Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
        """Model time of each sample (same input forms as :func:`fit_quadratic`)."""
        x = design_matrix(lengths)
        return self.a * x[:, 0] + self.b * x[:, 1] + self.d * x[:, 2] + self.c

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nnls(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``argmin_{x >= 0} ||matrix·x − target||₂`` for a few unknowns (exact).

    The optimum's nonzero entries solve the unconstrained least-squares problem on their
    own columns (the KKT conditions), so solving that problem for every subset of columns
    and keeping the best non-negative answer finds it. Columns are scaled to unit norm
    first: ``Σs²``, ``Σs`` and ``n`` differ by orders of magnitude.
    """
    A = np.asarray(matrix, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if A.ndim != 2 or y.ndim != 1 or A.shape[0] != y.shape[0]:
        raise ValueError(f"nnls: matrix {A.shape} and target {y.shape} must be (n, k) and (n,)")
    k = A.shape[1]
    if not 1 <= k <= MAX_NNLS_UNKNOWNS:
        raise ValueError(f"nnls: {k} unknowns; this exact solver handles 1..{MAX_NNLS_UNKNOWNS}")
    if not (np.isfinite(A).all() and np.isfinite(y).all()):
        raise ValueError("nnls: matrix and target must be finite")
    peak = np.abs(A).max(axis=0)
    peak[peak == 0] = 1.0
    scale = peak * np.linalg.norm(A / peak, axis=0)  # the norm without squaring tiny entries to 0
    scale[scale == 0] = 1.0
    As = A / scale
    best = np.zeros(k)
    best_res = float(y @ y)  # the empty support: x = 0
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(As[:, cols], y, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(k)
            x[cols] = sol
            r = As @ x - y
            res = float(r @ r)
            if res < best_res:
                best, best_res = x, res
    return best / scale


def design_matrix(lengths: Sequence[int] | Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Rows ``(Σs², Σs, n)`` per sample (float64, shape ``(n_samples, 3)``; ``n`` = sequences).

    ``lengths`` is either one length per sample (each sample a single sequence) or one
    sequence of lengths per sample (micro-batches). Lengths must be integers >= 1.
    """
    if isinstance(lengths, np.ndarray) and lengths.ndim == 1:
        samples: list[np.ndarray] = [lengths[i : i + 1] for i in range(lengths.shape[0])]
    else:
        samples = [np.atleast_1d(np.asarray(x)) for x in lengths]
    rows = np.empty((len(samples), 3), dtype=np.float64)
    for k, s in enumerate(samples):
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"sample {k}: expected a length or a non-empty list of lengths, got {s.tolist()}")
        if not np.issubdtype(s.dtype, np.integer) and not np.all(s == np.round(s)):
            raise ValueError(f"sample {k}: lengths {s.tolist()} must be whole tokens")
        if (s < 1).any():
            raise ValueError(f"sample {k}: length {int(s.min())} must be >= 1 token")
        sf = s.astype(np.float64)
        rows[k] = (sf @ sf, sf.sum(), sf.size)
    return rows


def _check_fixed(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"fit: {name}={value} must be finite and >= 0, or None to fit it")


def fit_quadratic(
    lengths: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
    seconds: Sequence[float] | np.ndarray,
    *,
    c: float | None = None,
    d: float | None = None,
) -> FitResult:
    """Non-negative least-squares fit of ``seconds ≈ a·Σs² + b·Σs + d·n + c``.

    ``c=None`` fits the per-micro-batch overhead (needs at least three distinct
    micro-batch shapes); a number holds it fixed. ``d=None`` fits the per-sequence
    overhead when the samples hold micro-batches of at least two different sequence
    counts — otherwise ``d`` and ``c`` cannot be told apart and ``d`` is 0
    (``fitted_d=False``); a number holds it fixed. Fixed terms are subtracted from the
    times. Raises ``ValueError`` for mismatched, non-finite or negative inputs and for
    samples that cannot determine the coefficients, naming the fix.
    """
    x = design_matrix(lengths)
    y = np.asarray(seconds, dtype=np.float64)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"fit: {x.shape[0]} samples of lengths but {y.size} times; give one time per sample")
    bad = np.flatnonzero(~np.isfinite(y) | (y < 0))
    if bad.size:
        raise ValueError(f"fit: time of sample {int(bad[0])} is {y[bad[0]]}; times must be finite and >= 0")
    _check_fixed("c", c)
    _check_fixed("d", d)
    fit_d = d is None and np.unique(x[:, 2]).size >= 2
    columns = [x[:, 0], x[:, 1]] + ([x[:, 2]] if fit_d else []) + ([np.ones(x.shape[0])] if c is None else [])
    unknowns = len(columns)
    distinct = np.unique(x, axis=0).shape[0]
    if distinct < unknowns:
        fix = "pass c=<seconds> to hold the overhead fixed, or " if c is None else ""
        raise ValueError(
            f"fit: {distinct} distinct micro-batch shapes cannot determine {unknowns} coefficients; "
            f"{fix}measure at least {unknowns} different lengths"
        )
    matrix = np.column_stack(columns)
    scaled = matrix / np.linalg.norm(matrix, axis=0)
    if np.linalg.matrix_rank(scaled, tol=1e-9) < unknowns:
        raise ValueError(
            f"fit: the {distinct} micro-batch shapes cannot separate {unknowns} coefficients (their columns "
            "Σs², Σs, sequences, 1 are linearly dependent); add micro-batches of other lengths and sequence counts"
        )
    d_fixed = 0.0 if d is None else float(d)
    c_fixed = 0.0 if c is None else float(c)
    coef = nnls(matrix, y - c_fixed - d_fixed * x[:, 2])
    a, b = float(coef[0]), float(coef[1])
    d_fit = float(coef[2]) if fit_d else d_fixed
    c_fit = float(coef[-1]) if c is None else c_fixed
    pred = a * x[:, 0] + b * x[:, 1] + d_fit * x[:, 2] + c_fit
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # every time equal: perfect if the model reproduces it, else no explanatory power
        r2 = 1.0 if ss_res <= 1e-24 * max(1.0, float(y @ y)) else 0.0
    return FitResult(
        a=a, b=b, c=c_fit, r2=r2, rmse=math.sqrt(ss_res / y.size), num_samples=int(y.size), fitted_c=c is None,
        d=d_fit, fitted_d=fit_d,
        max_tokens=int(x[:, 1].max()),
    )
