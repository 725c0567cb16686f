"""Least-squares fits of ``t = a·Σs² + b·Σs + c`` to measured micro-batch times.

A sample is one measured micro-batch: the lengths of the sequences it held (tokens) and
its time (seconds, or any one unit). Its model time is ``a·Σ_i s_i² + b·Σ_i s_i + c``, so a
sample of a single sequence is the plain ``a·s² + b·s + c``. The coefficients must be
non-negative (a negative ``a`` would make long sequences cheaper than short ones), so the
fit is a non-negative least-squares problem in two or three unknowns, solved exactly by
:func:`nnls` — small enough to try every support.

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
""":func:`nnls` enumerates the 2ⁿ supports; fine for the 2-3 unknowns of a cost fit."""


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

    def predict(self, lengths: Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
        """Model time of each sample (same input forms as :func:`fit_quadratic`)."""
        x = design_matrix(lengths)
        return self.a * x[:, 0] + self.b * x[:, 1] + self.c

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nnls(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``argmin_{x >= 0} ||matrix·x − target||₂`` for a few unknowns (exact).

    The optimum's nonzero entries solve the unconstrained least-squares problem on their
    own columns (the KKT conditions), so solving that problem for every subset of columns
    and keeping the best non-negative answer finds it. Columns are scaled to unit norm
    first: ``Σs²`` and ``Σs`` differ by orders of magnitude.
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
    scale = np.linalg.norm(A, axis=0)
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
    """Rows ``(Σs², Σs)`` per sample (float64, shape ``(n, 2)``).

    ``lengths`` is either one length per sample (each sample a single sequence) or one
    sequence of lengths per sample (micro-batches). Lengths must be integers >= 1.
    """
    if isinstance(lengths, np.ndarray) and lengths.ndim == 1:
        samples: list[np.ndarray] = [lengths[i : i + 1] for i in range(lengths.shape[0])]
    else:
        samples = [np.atleast_1d(np.asarray(x)) for x in lengths]
    rows = np.empty((len(samples), 2), dtype=np.float64)
    for k, s in enumerate(samples):
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"sample {k}: expected a length or a non-empty list of lengths, got {s.tolist()}")
        if not np.issubdtype(s.dtype, np.integer) and not np.all(s == np.round(s)):
            raise ValueError(f"sample {k}: lengths {s.tolist()} must be whole tokens")
        if (s < 1).any():
            raise ValueError(f"sample {k}: length {int(s.min())} must be >= 1 token")
        sf = s.astype(np.float64)
        rows[k] = (sf @ sf, sf.sum())
    return rows


def fit_quadratic(
    lengths: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
    seconds: Sequence[float] | np.ndarray,
    *,
    c: float | None = None,
) -> FitResult:
    """Non-negative least-squares fit of ``seconds ≈ a·Σs² + b·Σs + c``.

    ``c=None`` fits the per-micro-batch overhead too (needs at least three distinct
    micro-batch shapes); a number holds it fixed (it is subtracted from the times).
    Raises ``ValueError`` for mismatched, non-finite or negative inputs and for too few
    distinct samples, naming the fix.
    """
    x = design_matrix(lengths)
    y = np.asarray(seconds, dtype=np.float64)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"fit: {x.shape[0]} samples of lengths but {y.size} times; give one time per sample")
    bad = np.flatnonzero(~np.isfinite(y) | (y < 0))
    if bad.size:
        raise ValueError(f"fit: time of sample {int(bad[0])} is {y[bad[0]]}; times must be finite and >= 0")
    if c is not None and not (math.isfinite(c) and c >= 0):
        raise ValueError(f"fit: c={c} must be finite and >= 0, or None to fit it")
    unknowns = 2 if c is not None else 3
    distinct = np.unique(x, axis=0).shape[0]
    if distinct < unknowns:
        fix = "pass c=<seconds> to hold the overhead fixed, or " if c is None else ""
        raise ValueError(
            f"fit: {distinct} distinct micro-batch shapes cannot determine {unknowns} coefficients; "
            f"{fix}measure at least {unknowns} different lengths"
        )
    if c is None:
        coef = nnls(np.column_stack([x, np.ones(x.shape[0])]), y)
        a, b, c_fit = (float(v) for v in coef)
    else:
        a, b = (float(v) for v in nnls(x, y - c))
        c_fit = float(c)
    pred = a * x[:, 0] + b * x[:, 1] + c_fit
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # every time equal: perfect if the model reproduces it, else no explanatory power
        r2 = 1.0 if ss_res <= 1e-24 * max(1.0, float(y @ y)) else 0.0
    return FitResult(
        a=a, b=b, c=c_fit, r2=r2, rmse=math.sqrt(ss_res / y.size), num_samples=int(y.size), fitted_c=c is None
    )
