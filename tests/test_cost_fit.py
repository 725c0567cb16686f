"""balancer.fit and CostModel.fit / fit_layouts: NNLS, recovery from noisy samples, R², errors."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from balancer.cost import CostModel
from balancer.fit import design_matrix, fit_quadratic, nnls
from strategies import Layout

A_TRUE, B_TRUE, C_TRUE = 2.0e-9, 1.5e-5, 4.0e-3  # seconds per token², per token, per micro-batch


def _noisy(seed: int, n: int = 40, noise: float = 0.03, c: float = C_TRUE):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(128, 16_384, size=n)
    clean = A_TRUE * lengths.astype(float) ** 2 + B_TRUE * lengths + c
    return lengths, clean * (1 + noise * rng.standard_normal(n))


_ENTRY = st.one_of(st.just(0.0), st.floats(1e-6, 10.0), st.floats(-10.0, -1e-6))
"""Matrix and target entries: zero, or 1e-6..10 in magnitude — seven decades, as Σs², Σs and n
span in a calibration. (Near 1e-308 the exact optimum itself overflows float64.)"""


@settings(max_examples=80, deadline=None)
@given(
    matrix=arrays(np.float64, st.tuples(st.integers(3, 12), st.integers(1, 3)), elements=_ENTRY),
    data=st.data(),
)
def test_nnls_satisfies_the_kkt_conditions(matrix, data):
    y = data.draw(arrays(np.float64, matrix.shape[0], elements=_ENTRY))
    x = nnls(matrix, y)
    grad = matrix.T @ (matrix @ x - y)
    tol = 1e-7 * (1 + np.abs(matrix).sum() * (1 + np.abs(y).sum()))
    assert (x >= 0).all()
    assert (grad >= -tol).all()  # no descent direction into the feasible set
    assert (np.abs(grad[x > 1e-9]) <= tol).all()  # stationary on the support


def test_nnls_scales_columns_whose_squares_underflow():
    """A column of 1e-270 entries: its squared norm underflows to 0, yet it is a column like
    any other (the optimum uses it with a huge coefficient)."""
    eps = 6.5e-270
    matrix = np.array([[eps, eps], [-1.0, eps], [eps, eps]])
    y = np.array([1.0, 0.0, 0.0])
    x = nnls(matrix, y)
    grad = matrix.T @ (matrix @ x - y)
    assert (x >= 0).all() and (grad >= -1e-9).all()
    assert np.linalg.norm(matrix @ x - y) < np.linalg.norm(y) - 0.1


def test_nnls_matches_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for _ in range(50):
        A, y = rng.standard_normal((8, 3)), rng.standard_normal(8)
        assert np.allclose(nnls(A, y), optimize.nnls(A, y)[0], atol=1e-9)


def test_nnls_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"must be \(n, k\) and \(n,\)"):
        nnls(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match="handles 1..8"):
        nnls(np.ones((20, 9)), np.ones(20))


@pytest.mark.parametrize("seed", range(6))
def test_fit_recovers_known_coefficients_from_noisy_samples(seed):
    # 200 samples with 3 % noise: over 300 seeds the estimates' spread is 2.5 % (a) and
    # 4.4 % (b), so the tolerances below are 4 standard deviations.
    lengths, seconds = _noisy(seed, n=200)
    res = fit_quadratic(lengths, seconds)
    assert res.fitted_c and res.num_samples == 200
    assert res.a == pytest.approx(A_TRUE, rel=0.1)
    assert res.b == pytest.approx(B_TRUE, rel=0.2)
    assert res.c == pytest.approx(C_TRUE, abs=0.02)  # small next to samples of up to 0.8 s
    assert res.r2 > 0.99
    fixed = fit_quadratic(lengths, seconds, c=C_TRUE)
    assert not fixed.fitted_c and fixed.c == C_TRUE
    assert fixed.a == pytest.approx(A_TRUE, rel=0.1) and fixed.b == pytest.approx(B_TRUE, rel=0.2)


def test_noise_free_fit_is_exact_and_r2_falls_with_noise():
    lengths, seconds = _noisy(0, noise=0.0)
    exact = fit_quadratic(lengths, seconds)
    assert (exact.a, exact.b, exact.c) == pytest.approx((A_TRUE, B_TRUE, C_TRUE), rel=1e-6)
    assert exact.r2 == pytest.approx(1.0) and exact.rmse < 1e-9
    r2 = [fit_quadratic(*_noisy(1, noise=n)).r2 for n in (0.01, 0.05, 0.2)]
    assert r2 == sorted(r2, reverse=True)


def test_fit_of_micro_batches_of_several_sequences():
    rng = np.random.default_rng(3)
    batches = [rng.integers(64, 4096, size=rng.integers(1, 6)) for _ in range(30)]
    seconds = [A_TRUE * float((b.astype(float) ** 2).sum()) + B_TRUE * b.sum() + C_TRUE for b in batches]
    res = fit_quadratic(batches, seconds)
    assert (res.a, res.b, res.c) == pytest.approx((A_TRUE, B_TRUE, C_TRUE), rel=1e-6)
    assert np.allclose(res.predict(batches), seconds)
    assert res.max_tokens == max(int(b.sum()) for b in batches)  # the largest micro-batch measured
    assert design_matrix([[3, 4], [5]]).tolist() == [[25.0, 7.0, 2.0], [25.0, 5.0, 1.0]]
    assert res.fitted_d and res.d == pytest.approx(0.0, abs=1e-9)  # counts 1-5: d is identified (and 0 here)


D_TRUE = 3.0e-4  # seconds per sequence


def _packed(seed: int, noise: float = 0.0):
    """Micro-batches of 1-64 sequences (as calibration times them) and their times with a per-sequence term."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(40):
        k = int(rng.choice([1, 2, 4, 16, 64]))
        batches.append(rng.integers(32, 16_384 // k + 1, size=k))
    clean = np.array([A_TRUE * float((b.astype(float) ** 2).sum()) + B_TRUE * b.sum() + D_TRUE * b.size + C_TRUE
                      for b in batches])
    return batches, clean * (1 + noise * rng.standard_normal(clean.size))


def test_fit_recovers_the_per_sequence_term_from_packed_micro_batches():
    batches, seconds = _packed(0)
    exact = fit_quadratic(batches, seconds)
    assert exact.fitted_c and exact.fitted_d
    assert (exact.a, exact.b, exact.c, exact.d) == pytest.approx((A_TRUE, B_TRUE, C_TRUE, D_TRUE), rel=1e-6)
    assert np.allclose(exact.predict(batches), seconds)
    noisy = fit_quadratic(*_packed(1, noise=0.02))
    assert noisy.d == pytest.approx(D_TRUE, rel=0.25) and noisy.r2 > 0.99
    fixed = fit_quadratic(batches, seconds, c=C_TRUE, d=D_TRUE)
    assert not fixed.fitted_c and not fixed.fitted_d and fixed.a == pytest.approx(A_TRUE, rel=1e-6)
    # Without d the single-sequence view under-prices many short sequences: the 1.7× of issue 16
    without = fit_quadratic(batches, seconds, d=0.0)
    assert not without.fitted_d and without.r2 < exact.r2


def test_single_sequence_samples_cannot_tell_d_from_c():
    lengths, seconds = _noisy(2, noise=0.0)
    res = fit_quadratic(lengths, seconds)
    assert not res.fitted_d and res.d == 0.0 and res.c == pytest.approx(C_TRUE, rel=1e-6)
    # the same count of sequences everywhere (here 2): d stays 0 even with c fixed
    pairs = [[int(s), int(s)] for s in lengths]
    assert not fit_quadratic(pairs, 2 * seconds, c=0.0).fitted_d


def test_negative_coefficients_are_clamped():
    # times that fall with length: the unconstrained fit would make b negative
    res = fit_quadratic([100, 200, 300, 400], [4.0, 3.0, 2.0, 1.0])
    assert res.a >= 0 and res.b >= 0 and res.c >= 0
    assert res.c == pytest.approx(2.5) and res.r2 == pytest.approx(0.0)


@pytest.mark.parametrize(
    "lengths, seconds, kw, message",
    [
        ([100, 200], [1.0], {}, "2 samples of lengths but 1 times"),
        ([100, 200, 300], [1.0, -1.0, 2.0], {}, "time of sample 1 is -1.0"),
        ([100, 200, 300], [1.0, float("nan"), 2.0], {}, "time of sample 1 is nan"),
        ([100, 0, 300], [1.0, 1.0, 2.0], {}, "sample 1: length 0 must be >= 1"),
        ([100, 100, 200], [1.0, 1.0, 2.0], {}, "2 distinct micro-batch shapes cannot determine 3.*pass c="),
        ([100, 100], [1.0, 1.0], {"c": 0.0}, "1 distinct micro-batch shapes cannot determine 2"),
        ([100, 200], [1.0, 2.0], {"c": -1.0}, "c=-1.0 must be finite and >= 0"),
        ([100, 200], [1.0, 2.0], {"d": float("inf")}, "d=inf must be finite and >= 0"),
        # one length only: Σs², Σs and n are proportional, whatever the counts
        ([[10], [10, 10], [10, 10, 10], [10] * 4], [1.0, 2.0, 3.0, 4.0], {}, "cannot separate 4 coefficients"),
        ([[100, 2.5]], [1.0], {"c": 0.0}, "must be whole tokens"),
    ],
)
def test_fit_rejects_bad_input(lengths, seconds, kw, message):
    with pytest.raises(ValueError, match=message):
        fit_quadratic(lengths, seconds, **kw)


def test_cost_model_fit_reports_r2_and_round_trips():
    lengths, seconds = _noisy(4)
    model = CostModel.fit(lengths, seconds, layout="tp2", token_capacity=32768)
    assert model.source == "fit" and model.layouts == [Layout(tp=2)]
    cost = model.cost(Layout(tp=2))
    assert cost.token_capacity == 32768 and cost.a == pytest.approx(A_TRUE, rel=0.1)
    assert model.fit_r2("tp2") == model.meta["fit"]["tp2"]["r2"] > 0.99
    again = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.cost(Layout(tp=2)) == cost and again.fit_r2(Layout(tp=2)) == model.fit_r2("tp2")
    assert model.measured_tokens("tp2") == again.measured_tokens(Layout(tp=2)) == int(np.max(lengths))
    assert model.measured_tokens("tp1") is None  # nothing measured there
    assert CostModel.from_coefficients({"tp1": (1e-9, 1e-6, 0.0, 4096)}).measured_tokens("tp1") is None
    with pytest.raises(ValueError, match=r"no fit for layout tp1 \(fitted layouts: tp2\)"):
        model.fit_r2(Layout())
    with pytest.raises(ValueError, match="no coefficients for layout tp4"):
        model.cost(Layout(tp=4))


def test_fit_layouts_fits_each_layout():
    samples = {}
    for tp, scale in ((1, 1.0), (2, 0.55), (4, 0.3)):
        lengths, seconds = _noisy(tp, noise=0.0)
        samples[Layout(tp=tp)] = (lengths, seconds * scale)
    model = CostModel.fit_layouts(samples, token_capacity={"tp1": 4096, "tp2": 8192, "tp4": 16384}, c=None)
    assert [model.token_capacity(Layout(tp=t)) for t in (1, 2, 4)] == [4096, 8192, 16384]
    assert model.cost(Layout(tp=2)).a == pytest.approx(0.55 * A_TRUE, rel=1e-6)
    assert all(model.fit_r2(lay) == pytest.approx(1.0) for lay in samples)
    with pytest.raises(ValueError, match="no token_capacity for layout tp4"):
        CostModel.fit_layouts(samples, token_capacity={"tp1": 4096, "tp2": 8192})
    with pytest.raises(ValueError, match=r"layout tp1: .*distinct micro-batch shapes"):
        CostModel.fit_layouts({"tp1": ([5, 5, 5], [1.0, 1.0, 1.0])}, token_capacity=100)
    with pytest.raises(ValueError, match="no samples"):
        CostModel.fit_layouts({}, token_capacity=100)
