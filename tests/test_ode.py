"""Integrators of the projected ODE [22] (theory/ode.py): exact face handling, batch = reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.block_model import BlockProblem, field, unpack
from theory.jit import NUMBA_AVAILABLE
from theory.ode import (
    TABLEAUS,
    BatchResult,
    OdeResult,
    hits_one,
    hits_zero,
    odeint,
    odeint_batch,
    rkc_coefficients,
    stable_dt,
)

#: Agreement of the batch integrator with the solve_ivp reference (LSODA, rtol 1e-8, atol 1e-10): max |Δy|
#: over the whole state and a grid of 51 times on [0, T], random canonical blocks (m=2, n=3, p=2, N=12,
#: θ(0) uniform in H, ||W(0)|| ≤ 2, T = 5).  Measured on seeds 0-5: RK4 ≤ 3.6e-7, RKC ≤ 2.0e-4 (the numpy and
#: the compiled backend alike; they agree with each other far more closely, see tests/test_block_ode.py).
RK4_DT = 0.005
RK4_TOL = 1e-6
RKC_RTOL = 1e-6
RKC_TOL = 1e-3


def decoupled(rates: np.ndarray):
    """θ̇_j = rates_j (constant): the projected solution is clip(θ_0 + rates·t) exactly."""

    def fun(t, y):
        return np.broadcast_to(rates, y.shape).copy()

    return fun


# --------------------------------------------------------------------------------------------------
# exact solutions
# --------------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_constant_rates_give_clipped_lines(seed, K):
    rng = np.random.default_rng(seed)
    rates = rng.uniform(-2, 2, size=K)
    y0 = rng.uniform(0, 1, size=(6, K))
    t = np.linspace(0, 1.5, 7)
    exact = np.clip(y0[None] + t[:, None, None] * rates, 0, 1)
    for method in ("rk4", "heun", "rkc"):
        res = odeint_batch(
            decoupled(rates), y0, t, theta_slice=slice(0, K), dt=0.1, method=method, rtol=1e-8, atol=1e-10
        )
        np.testing.assert_allclose(res.y, exact, atol=1e-9)
    one = odeint(decoupled(rates), y0[0], (0.0, 1.5), theta_slice=slice(0, K), t_eval=t)
    np.testing.assert_allclose(one.y, exact[:, 0], atol=1e-7)


def release_problem():
    """y = (θ, u): u̇ = 1, θ̇ = u − 1 from θ = u = 0: θ is pinned at 0 until t = 1, then θ = (t−1)²/2."""

    def fun(t, y):
        v = np.zeros_like(y)
        v[..., 0] = y[..., 1] - 1.0
        v[..., 1] = 1.0
        return v

    def exact(t):
        return np.stack([np.where(t > 1, 0.5 * (t - 1) ** 2, 0.0), t], axis=-1)

    return fun, exact


def test_release_from_a_face_is_exact():
    fun, exact = release_problem()
    t = np.linspace(0, 2.2, 12)
    one = odeint(fun, [0.0, 0.0], (0, 2.2), theta_slice=slice(0, 1), t_eval=t)
    np.testing.assert_allclose(one.y, exact(t), atol=1e-8)
    assert [k for _, _, k in one.switches] == ["release"]
    assert one.switches[0][0] == pytest.approx(1.0, abs=1e-8)
    for method, tol in (("rk4", 1e-12), ("rkc", 1e-6)):
        res = odeint_batch(fun, np.zeros((3, 2)), t, theta_slice=slice(0, 1), dt=0.07, method=method, rtol=1e-9)
        np.testing.assert_allclose(res.y, np.repeat(exact(t)[:, None], 3, axis=1), atol=tol)
        assert res.switches == 3


def test_hit_times_are_exact_and_gates_stay_on_the_face():
    """θ̇ = −(1 + u), u̇ = −u: θ hits 0 where θ0 = t + u0 (1 − e^{−t}) and stays there."""

    def fun(t, y):
        return np.stack([-(1 + y[..., 1]), -y[..., 1]], axis=-1)

    y0 = np.array([[0.7, 0.5], [0.3, 2.0], [1.0, 0.0]])
    from scipy.optimize import brentq

    t_hit = [brentq(lambda s, a=a, b=b: s + b * (1 - np.exp(-s)) - a, 0, 2) for a, b in y0]
    t = np.linspace(0, 1.5, 16)
    res = odeint_batch(fun, y0, t, theta_slice=slice(0, 1), dt=0.05, events=[hits_zero(0)])
    np.testing.assert_allclose(res.t_events[0], t_hit, atol=1e-6)
    for b in range(3):
        assert np.all(res.y[t > t_hit[b] + 1e-9, b, 0] == 0.0)
        one = odeint(fun, y0[b], (0, 1.5), theta_slice=slice(0, 1), t_eval=t, events=[hits_zero(0, terminal=False)])
        assert one.t_events[0][0] == pytest.approx(t_hit[b], abs=1e-8)
        np.testing.assert_allclose(res.y[:, b], one.y, atol=1e-7)
    stop = odeint(fun, y0[0], (0, 1.5), theta_slice=slice(0, 1), events=[hits_zero(0, terminal=True)])
    assert stop.status == 1 and stop.t[-1] == pytest.approx(t_hit[0], abs=1e-8) and stop.y[-1, 0] == 0.0


@pytest.mark.parametrize("method", ["LSODA", "BDF", "Radau"])
def test_stiff_reference_crosses_faces(method):
    """Implicit solvers on the raw projected field stall at a face; the segmented reference does not."""

    def fun(t, y):
        return np.stack([-(1.0 + 0.0 * y[0]), -1000.0 * (y[1] - y[0]), 2.0 * (y[0] - 0.5)])

    res = odeint(fun, [0.4, 0.0, 0.9], (0, 2), theta_slice=slice(0, 1), method=method, t_eval=[0, 0.2, 1, 2],
                 events=[hits_zero(0), hits_one(2)])
    assert res.success, res.message
    assert res.y[-1, 0] == 0.0 and res.t_events[0][0] == pytest.approx(0.4, abs=1e-7)
    assert res.theta.shape == (4, 1)
    assert res.segments < 10


def test_gate_velocity_vanishing_on_the_face_is_not_a_release():
    """θ̇_B = −1, θ̇_1 = −θ_B: θ_1 hits 0 at (1 − √0.2)/2, then θ_B hits 0 at 0.5 and v_1 ≡ 0 on the face.

    (Regression: solve_ivp counts an event function going 0 -> 0 as a crossing, which made the
    segmented reference alternate release/hit forever at t = 0.5.)
    """

    def fun(t, y):
        return np.stack([-np.ones_like(y[..., 0]), -y[..., 0]], axis=-1)

    t = np.array([0.0, 0.4, 1.0])
    res = odeint(fun, [0.5, 0.1], (0, 1), theta_slice=slice(0, 2), t_eval=t)
    assert res.success and res.segments == 3, res.message
    assert [k for _, _, k in res.switches] == ["hit0", "hit0"]
    assert res.switches[0][0] == pytest.approx((1 - np.sqrt(0.2)) / 2, abs=1e-7)
    np.testing.assert_allclose(res.y[-1], [0.0, 0.0])
    bat = odeint_batch(fun, np.array([[0.5, 0.1]]), t, theta_slice=slice(0, 2), dt=0.03)
    np.testing.assert_allclose(bat.y[:, 0], res.y, atol=1e-7)


@pytest.mark.parametrize("method", ["rk4", "rkc"])
def test_gate_leaving_and_returning_to_a_face_within_a_step(method):
    """θ̇ = u, u̇ = −10 from θ = 0, u = 0.01: θ leaves 0 and is back at t = 0.002, then stays at 0.

    (Regression: the crossing search must not return the trivial root s = 0, which made the adaptive
    integrator re-apply a zero-length switch forever.)
    """

    def fun(t, y):
        return np.stack([y[..., 1], np.full_like(y[..., 1], -10.0)], axis=-1)

    t = np.array([0.0, 0.001, 0.5])
    res = odeint_batch(fun, np.array([[0.0, 0.01]]), t, theta_slice=slice(0, 1), dt=0.05, method=method,
                       rtol=1e-8, atol=1e-10, events=[hits_zero(0)])
    assert res.t_events[0, 0] == pytest.approx(0.002, abs=1e-6)
    assert res.y[1, 0, 0] == pytest.approx(0.01 * 0.001 - 5e-6, abs=1e-7)
    assert res.y[2, 0, 0] == 0.0 and res.y[2, 0, 1] == pytest.approx(0.01 - 5.0)


# --------------------------------------------------------------------------------------------------
# batch vs reference on the canonical block
# --------------------------------------------------------------------------------------------------


def block_case(seed: int, B: int):
    rng = np.random.default_rng(seed)
    prob = BlockProblem.random(rng, m=2, n=3, p=2, N=12)
    th = rng.uniform(size=(B, 1 + prob.n))
    W = rng.standard_normal((B, prob.D - 1 - prob.n))
    W *= 2.0 * rng.uniform(0.2, 1, size=(B, 1)) / np.linalg.norm(W, axis=1, keepdims=True)
    return prob, np.concatenate([th, W], axis=1)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_agrees_with_solve_ivp_reference(seed, backend):
    if backend == "numba" and not NUMBA_AVAILABLE:
        pytest.skip("numba not installed")
    prob, Y0 = block_case(seed, 3)
    T = 5.0
    t = np.linspace(0, T, 51)
    f = field(prob)
    refs = [odeint(f, y, (0, T), theta_slice=prob.theta_slice, t_eval=t, events=[hits_zero(0)]) for y in Y0]
    assert all(r.success for r in refs)
    ref = np.stack([r.y for r in refs], axis=1)
    rk4 = odeint_batch(f, Y0, t, theta_slice=prob.theta_slice, dt=RK4_DT, events=[hits_zero(0)], backend=backend)
    assert rk4.backend == backend
    assert np.abs(rk4.y - ref).max() <= RK4_TOL
    rkc = odeint_batch(f, Y0, t, theta_slice=prob.theta_slice, method="rkc", rtol=RKC_RTOL, atol=RKC_RTOL * 1e-2,
                       backend=backend)
    assert np.abs(rkc.y - ref).max() <= RKC_TOL
    for b, r in enumerate(refs):  # first pruning times agree
        t_ref = r.t_events[0][0] if r.t_events[0].size else np.nan
        np.testing.assert_allclose(rk4.t_events[0, b], t_ref, atol=1e-6)
    for res in (rk4, rkc):
        assert isinstance(res, BatchResult) and res.y.shape == (t.size, 3, prob.D)
        assert np.all((res.theta >= 0) & (res.theta <= 1))
        assert res.nfev > 0 and res.wall_time > 0


def test_chunks_and_threads_give_identical_results():
    prob, Y0 = block_case(3, 10)
    t = np.linspace(0, 1, 3)
    f = field(prob)
    a = odeint_batch(f, Y0, t, theta_slice=prob.theta_slice, dt=0.02)
    b = odeint_batch(f, Y0, t, theta_slice=prob.theta_slice, dt=0.02, chunk_size=3, workers=2)
    np.testing.assert_allclose(a.y, b.y, rtol=0, atol=1e-13)  # only summation order differs
    c = odeint_batch(f, Y0, t, theta_slice=prob.theta_slice, method="rkc", chunk_size=4, workers=2)
    d = odeint_batch(f, Y0[:4], t, theta_slice=prob.theta_slice, method="rkc")
    np.testing.assert_allclose(c.y[:, :4], d.y, rtol=0, atol=1e-13)


def test_rk4_converges_at_fourth_order_on_a_smooth_block_flow():
    rng = np.random.default_rng(11)
    prob = BlockProblem.random(rng, m=2, n=2, p=1, N=8)
    y0 = unpack(np.zeros(prob.D), prob)
    Y0 = np.zeros((1, prob.D))
    Y0[0, : 1 + prob.n] = 0.5  # interior gates, small weights: no face is reached on [0, 0.5]
    Y0[0, 1 + prob.n :] = 0.3 * rng.standard_normal(prob.D - 1 - prob.n)
    assert y0.theta.shape == (2,)
    t = np.array([0.0, 0.5])
    f = field(prob)
    ref = odeint(f, Y0[0], (0, 0.5), theta_slice=prob.theta_slice, t_eval=t, rtol=1e-12, atol=1e-13).y[-1]
    errs = [
        np.abs(odeint_batch(f, Y0, t, theta_slice=prob.theta_slice, dt=h).y[-1, 0] - ref).max() for h in (0.1, 0.05)
    ]
    assert 10 < errs[0] / errs[1] < 25  # 2^4 = 16


# --------------------------------------------------------------------------------------------------
# schemes and validation
# --------------------------------------------------------------------------------------------------


def test_rkc_coefficients_stability_and_order():
    for s in (2, 5, 12):
        co = rkc_coefficients(s)

        def R(z, co=co):  # one step of y' = z y from y = 1, h = 1
            Yjm2, Yjm1 = 1.0, 1.0 + co.mu_t[1] * z
            for j in range(2, co.s + 1):
                Yj = (1 - co.mu[j] - co.nu[j]) + co.mu[j] * Yjm1 + co.nu[j] * Yjm2 + co.mu_t[j] * z * Yjm1
                Yj += co.gamma_t[j] * z
                Yjm2, Yjm1 = Yjm1, Yj
            return Yjm1

        zs = np.linspace(-co.beta, 0, 400)
        assert max(abs(R(z)) for z in zs) <= 1.0 + 1e-12
        assert abs(R(1e-3) - np.exp(1e-3)) < 1e-9  # second order: local error O(z³)
        assert 0.45 * s**2 < co.beta < 0.66 * s**2
    assert stable_dt(100.0) == pytest.approx(0.9 * TABLEAUS["rk4"].real_stability / 100)


def test_validation_errors():
    f = decoupled(np.array([1.0]))
    with pytest.raises(ValueError, match="method must be one of"):
        odeint_batch(f, np.zeros((2, 1)), [0, 1], theta_slice=slice(0, 1), method="nope")
    with pytest.raises(ValueError, match="t_eval must be"):
        odeint_batch(f, np.zeros((2, 1)), [1, 0], theta_slice=slice(0, 1))
    with pytest.raises(ValueError, match="FaceEvents"):
        odeint_batch(f, np.zeros((2, 2)), [0, 1], theta_slice=slice(0, 1), events=[hits_zero(1)])
    with pytest.raises(ValueError, match="t_span must be increasing"):
        odeint(f, np.zeros(1), (1, 0), theta_slice=slice(0, 1))
    with pytest.raises(ValueError, match="theta_slice must be a contiguous"):
        odeint(f, np.zeros(3), (0, 1), theta_slice=slice(0, 3, 2))
    with pytest.raises(ValueError, match="face must be 0 or 1"):
        hits_zero(0).__class__(0, 0.5)
    res = odeint(f, np.array([0.2]), (0, 1), theta_slice=slice(0, 1))
    assert isinstance(res, OdeResult) and res.y[-1, 0] == 1.0 and res.t[-1] == 1.0
