"""Lyapunov certificates of Theorems 5.1/5.2 (theory/certificates.py, THEORY §6-§7).

* the closed forms of the union of the regions over ``a`` (and ``R``) agree with brute force;
* the witness of a certified state is an admissible certificate that contains it;
* the rate bounds [32]/[34] (the stated and the sharp form) hold at random points of the regions;
* trajectories from the regions keep ``V`` non-increasing, prune, and decay (the registered checks pass);
* negative controls: a wrong (too small) Lemma-1 constant and a start outside the region are detected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import theory.certificates as C
from theory.block_model import BlockProblem, gradients, lemma1_k, unpack
from theory.checks import registry


def _problem(seed: int, **kw: float) -> BlockProblem:
    params = {"lam": 0.1, "c_B": 2.0, "c_1": 0.5, "teacher_units": 2, "teacher_scale": 1.5, "noise": 0.1}
    params.update(kw)
    return BlockProblem.random(np.random.default_rng(seed), m=2, n=3, p=2, N=16, **params)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------------

A_GRID = np.geomspace(1e-7, 1e7, 400_001)


@given(
    theta=st.floats(0.0, 0.05),
    q=st.floats(0.0, 0.05),
    c=st.floats(0.1, 10.0),
    k=st.floats(5.0, 500.0),
    R=st.one_of(st.none(), st.floats(0.01, 3.0)),
)
def test_union_margin_matches_brute_force(theta: float, q: float, c: float, k: float, R: float | None) -> None:
    margin, a = C.union_margin(theta, q, c, k, R)
    brute = float(np.max(C.rho_sup(A_GRID, c, k, R) - A_GRID * theta - q))
    if theta == 0:
        brute = max(brute, float(C.rho_sup(np.inf, c, k, R)) - q)
    scale = max(abs(brute), c / k * 1e-6)
    assert float(margin) >= brute - 1e-9 * scale  # the closed form is the sup
    assert float(margin) <= brute + 1e-4 * scale + A_GRID[0] * theta  # attained (up to the grid; a -> 0 edge)
    if float(margin) > 0 and math.isfinite(float(a)):
        # the maximiser certifies the state: V(a) < rho_sup(a)
        assert q + float(a) * theta < float(C.rho_sup(float(a), c, k, R))


def test_union_without_cap_is_the_sqrt_formula() -> None:
    """No radius cap: certified iff ||u||/√2 + √(2θ) < √(c/k)."""
    rng = np.random.default_rng(0)
    c, k = 1.5, 40.0
    th = rng.uniform(0, c / k, 2000)
    u = rng.uniform(0, 2 * math.sqrt(c / k), 2000)
    margin, _ = C.union_margin(th, 0.5 * u**2, c, k)
    formula = u / math.sqrt(2) + np.sqrt(2 * th) < math.sqrt(c / k)
    assert np.array_equal(margin > 0, formula)


@settings(max_examples=10)
@given(theta=st.floats(0.0, 0.03), q=st.floats(0.0, 0.03))
def test_union_over_radius_matches_grid(theta: float, q: float) -> None:
    c, k0, k2 = 2.0, 50.0, 30.0
    margin, a, R = C.union_margin_auto(theta, q, c, k0, k2)
    best = max(float(C.union_margin(theta, q, c, k0 + k2 * r * r, r)[0]) for r in np.geomspace(1e-3, 10, 600))
    assert float(margin) >= best - 1e-9
    assert float(margin) <= best + 2e-2 * abs(best) + 1e-6
    if float(margin) > 0 and math.isfinite(float(a)):
        kR = k0 + k2 * float(R) ** 2
        assert q + float(a) * theta < float(C.rho_sup(float(a), c, kR, float(R))) * (1 + 1e-9)


def test_witness_certifies_and_boundary_is_consistent() -> None:
    P = _problem(1)
    k0, k2 = C.lemma1_coeffs(P)
    assert lemma1_k(P, 0.7) == pytest.approx(k0 + k2 * 0.49)
    rng = np.random.default_rng(2)
    found = 0
    for _ in range(200):
        th = rng.uniform(0, P.c_B / (2 * k0))
        bnd = float(C.union_boundary(th, P.c_B, k0=k0, k2=k2))
        s = rng.uniform(0, 1.2 * bnd) if bnd > 0 else 0.01
        W1 = rng.standard_normal((P.n, P.m + 1))
        W2 = rng.standard_normal((P.p, P.n))
        nrm = math.sqrt(float(np.sum(W1**2) + np.sum(W2**2)))
        y = P.pack(th, rng.uniform(0, 1, P.n), W1 * s / nrm, W2 * s / nrm)
        cert = bool(C.certified_block(P, y))
        assert cert == (s < bnd)
        w = C.block_witness(P, y)
        assert (w is not None) == cert
        if w is not None:
            found += 1
            assert C.admissible(w.a, w.rho, P.c_B, w.k, w.R)
            assert bool(C.in_block_region(P, y, w.a, w.rho, w.R))
    assert found > 20


def test_region_constants() -> None:
    P = _problem(3)
    R = 0.5
    k = lemma1_k(P, R)
    a = 2.0
    rmax = float(C.rho_max(a, P.c_B, k))
    assert rmax == pytest.approx(a * P.c_B / ((2 + a) * k))
    assert C.kappa(a, 0.5 * rmax, P.c_B, k) > 0
    assert C.kappa(a, rmax, P.c_B, k) == pytest.approx(0.0, abs=1e-12)
    assert not C.admissible(a, rmax, P.c_B, k, R)
    with pytest.raises(ValueError, match="rho"):
        C.in_block_region(P, P.zero_state(), a, 2 * rmax, R)
    assert C.hit_time_bound(0.01, 0.5 * rmax, P.c_B, k) == pytest.approx(0.01 / (P.c_B - k * 0.5 * rmax))
    # gamma_B >= c_B along any state with gates in H ([26])
    ys = P.pack(np.linspace(0, 1, 5), np.random.default_rng(0).uniform(0, 1, (5, P.n)),
                np.zeros((5, P.n, P.m + 1)), np.zeros((5, P.p, P.n)))
    gB, g1 = C.gamma_lower_bounds(P, ys)
    assert gB >= P.c_B and g1 == P.c_1


def test_lemma1_bounds_hold_in_the_ball() -> None:
    """The bounds of [28] that the certificates rest on, at random points of the ball ||W|| <= R."""
    rng = np.random.default_rng(5)
    for seed in range(4):
        P = _problem(seed)
        R = float(rng.uniform(0.2, 2.0))
        k = lemma1_k(P, R)
        W1 = rng.standard_normal((200, P.n, P.m + 1))
        W2 = rng.standard_normal((200, P.p, P.n))
        nrm = np.sqrt(np.sum(W1**2, axis=(1, 2)) + np.sum(W2**2, axis=(1, 2)))
        s = R * rng.uniform(0, 1, 200) / nrm
        y = P.pack(rng.uniform(0, 1, 200), rng.uniform(0, 1, (200, P.n)), W1 * s[:, None, None],
                   W2 * s[:, None, None])
        g = gradients(P, y)
        stt = unpack(y, P)
        wv = stt.w_norms * stt.v_norms
        assert np.all(np.abs(g.g_B) <= k * wv.sum(axis=1) * (1 + 1e-9) + 1e-12)
        assert np.all(np.abs(g.g) <= k * wv * (1 + 1e-9) + 1e-12)
        # the sharper constant (½ in place of ¾, see the certificates module doc) bounds |g_i| too
        xn, rn = np.linalg.norm(P.Xh, axis=1), np.linalg.norm(P.R, axis=1)
        k_half = float(np.sum(xn * (rn + 0.5 * xn * R**2)))
        assert np.all(np.abs(g.g) <= k_half * wv * (1 + 1e-9) + 1e-12)
        assert np.all(np.linalg.norm(g.h, axis=-1) <= k * stt.v_norms * (1 + 1e-9) + 1e-12)
        assert np.all(np.linalg.norm(g.k, axis=-2) <= k * stt.w_norms * (1 + 1e-9) + 1e-12)


# --------------------------------------------------------------------------------------------------
# The rate bounds (pointwise, exact)
# --------------------------------------------------------------------------------------------------


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1))
def test_vdot_bounds_hold_in_the_regions(seed: int) -> None:
    for unit in (False, True):
        res = C.vdot_check(np.random.default_rng(seed), 2, lambda: None, unit=unit, points=96)
        assert res.failures == 0, res.record()
        assert res.worst_violation <= 1.0
        assert res.details["tightest_relative_slack"] <= 0.0


def test_vdot_bound_negative_control() -> None:
    """A too-small Lemma-1 constant certifies useful weights: the bound must fail somewhere."""
    res = C.vdot_check(np.random.default_rng(0), 8, lambda: None, unit=True, k_scale=1e-2)
    assert res.failures > 0
    assert res.worst_violation > 1.0


# --------------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------------


def test_block_trajectories_from_the_region() -> None:
    """V_B non-increasing on every step, θ_B below its linear bound and at 0, W decaying (Theorem 5.1)."""
    rng = np.random.default_rng(11)
    for lam in (0.2, 0.0):
        P = _problem(7, lam=lam)
        R = 0.6
        k = lemma1_k(P, R)
        a = 1.0
        rho = 0.8 * float(C.rho_sup(a, P.c_B, k, R))
        y0 = C.sample_block_start(P, rng, a, rho, aligned=True)
        assert bool(C.in_block_region(P, y0, a, rho, R))
        rep = C.check_block_trajectory(P, y0, a, rho, R)
        assert not rep.failed and not rep.inconclusive and rep.ball_held, rep.ratios
        assert rep.ratios["V_increase"] <= 1.0
        assert rep.final["theta_B"] <= C.TOL_THETA
        if lam > 0:
            assert rep.final["W_ratio"] <= C.W_DECAY


def test_registered_checks_pass_and_are_registered() -> None:
    reg = registry()
    for name in ("theorem5.1", "theorem5.2", "vdot5.1", "vdot5.2"):
        assert name in reg and reg[name].group == "dynamics"
    r51 = C.theorem51_check(np.random.default_rng(0), 4, lambda: None)
    assert r51.failures == 0 and r51.inconclusive == 0 and r51.passed, r51.record()
    r52 = C.theorem52_check(np.random.default_rng(0), 3, lambda: None)
    assert r52.failures == 0 and r52.instances > r52.inconclusive, r52.record()


def test_theorem51_negative_control_wrong_k() -> None:
    """With k/1000 the 'certified' region reaches useful weights: the checker must report failures."""
    res = C.theorem51_check(np.random.default_rng(0), 6, lambda: None, k_scale=1e-3, R_range=(2.0, 3.0),
                            aligned_frac=1.0, name="negative-control")
    assert res.failures > 0
    assert not res.passed
    assert res.worst_violation > 1.0


def test_start_outside_the_region_is_detected() -> None:
    """A useful block started outside D_B (θ_B = 0.5, trained-size weights inside the ball) under a valid
    (a, ρ): the block grows, V_B increases and the checker reports a failure (not a pass, not inconclusive)."""
    P = _problem(0, c_B=1.0, teacher_scale=2.0)
    R = 3.0
    k = lemma1_k(P, R)
    a = 1.0
    rho = 0.5 * float(C.rho_sup(a, P.c_B, k, R))
    w, v = C.useful_direction(P)
    W1 = np.tile(w, (P.n, 1))
    W2 = np.tile(v[:, None], (1, P.n))
    scale = 1.0 / math.sqrt(float(np.sum(W1**2) + np.sum(W2**2)))
    y0 = P.pack(0.5, np.ones(P.n), W1 * scale, W2 * scale)
    assert not bool(C.in_block_region(P, y0, a, rho, R))
    rep = C.check_block_trajectory(P, y0, a, rho, R, horizon=5.0)
    assert rep.failed and not rep.inconclusive, rep.ratios
    assert rep.ratios["V_increase"] > 1.0 and rep.ratios["theta_linear"] > 1.0


def test_integrate_reaches_the_end_when_theta_B_is_pruned() -> None:
    """θ_B → 0 with a unit gate pinned at 0 (its velocity then ≡ 0): the trajectory covers [0, t1]."""
    P = _problem(0)
    rng = np.random.default_rng(1)
    y0 = P.pack(0.01, np.array([0.0, 0.5, 0.5]), 0.05 * rng.standard_normal((P.n, P.m + 1)),
                0.05 * rng.standard_normal((P.p, P.n)))
    t, Y = C.integrate(P, y0, 2.0)
    assert t[-1] == pytest.approx(2.0)
    assert Y[-1, 0] == 0.0 and Y[-1, 1] == 0.0
    assert np.all((Y[:, P.theta_slice] >= 0) & (Y[:, P.theta_slice] <= 1))
