"""The canonical block model of THEORY §7: closed forms, [23] semantics, Lemma 1/2 ([28]-[30])."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory.block_model import (
    BlockProblem,
    block_gammas,
    block_spec,
    complexity,
    expected_loss,
    expected_loss_enumerated,
    field,
    gradients,
    lemma1_constants,
    lemma1_k,
    objective,
    objective_gradient,
    pack,
    state_dim,
    theta_slice,
    unpack,
    velocity,
)
from theory.complexity import BlockGates, Coefficients, ComplexityModel

seeds = st.integers(0, 2**32 - 1)
dims = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 6))  # m, n, p, N


def make(seed: int, m: int, n: int, p: int, N: int, **kw: float) -> tuple[BlockProblem, np.random.Generator]:
    rng = np.random.default_rng(seed)
    prob = BlockProblem.random(rng, m=m, n=n, p=p, N=N, **kw)
    return prob, rng


def random_state(prob: BlockProblem, rng: np.random.Generator, batch: tuple[int, ...] = (), scale: float = 1.0):
    tB = rng.uniform(size=batch)
    th = rng.uniform(size=(*batch, prob.n))
    W1 = scale * rng.standard_normal((*batch, prob.n, prob.m + 1))
    W2 = scale * rng.standard_normal((*batch, prob.p, prob.n))
    return pack(tB, th, W1, W2)


# --------------------------------------------------------------------------------------------------
# construction, validation, packing
# --------------------------------------------------------------------------------------------------


def test_validation_names_field_and_shape():
    X, Y, S = np.zeros((5, 2)), np.zeros((5, 3)), np.zeros((3, 3))
    BlockProblem(X, Y, S, 4)
    with pytest.raises(ValueError, match=r"BlockProblem\.X must be a 2-D array, got shape \(5,\)"):
        BlockProblem(np.zeros(5), Y, S, 4)
    with pytest.raises(ValueError, match=r"BlockProblem\.Y must have N=5 rows"):
        BlockProblem(X, np.zeros((4, 3)), S, 4)
    with pytest.raises(ValueError, match=r"BlockProblem\.S must have shape \(p, m\+1\) = \(3, 3\), got \(3, 2\)"):
        BlockProblem(X, Y, np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match=r"BlockProblem\.n must be a positive integer"):
        BlockProblem(X, Y, S, 0)
    with pytest.raises(ValueError, match=r"BlockProblem\.lam"):
        BlockProblem(X, Y, S, 4, lam=-1.0)
    with pytest.raises(ValueError, match=r"BlockProblem\.c_B"):
        BlockProblem(X, Y, S, 4, c_B=0.0)
    with pytest.raises(ValueError, match=r"BlockProblem\.c_1"):
        BlockProblem(X, Y, S, 4, c_1=float("nan"))
    with pytest.raises(ValueError, match=r"BlockProblem\.X must be finite"):
        BlockProblem(np.full((5, 2), np.inf), Y, S, 4)


def test_problem_is_immutable_copy():
    X = np.ones((3, 2))
    prob = BlockProblem(X, np.zeros((3, 2)), np.zeros((2, 3)), 2)
    X[0, 0] = 5.0
    assert prob.X[0, 0] == 1.0
    with pytest.raises(ValueError):
        prob.X[0, 0] = 2.0
    assert prob.D == state_dim(2, 2, 2) == 1 + 2 + 6 + 4
    assert prob.theta_slice == theta_slice(2) == slice(0, 3)


def test_pack_unpack_roundtrip_with_batch_axes():
    prob, rng = make(0, 2, 3, 2, 4)
    y = random_state(prob, rng, batch=(5, 2))
    assert y.shape == (5, 2, prob.D)
    s = unpack(y, prob)
    assert s.theta_B.shape == (5, 2) and s.theta.shape == (5, 2, 3)
    assert s.W1.shape == (5, 2, 3, 3) and s.W2.shape == (5, 2, 2, 3)
    np.testing.assert_array_equal(pack(s.theta_B, s.theta, s.W1, s.W2), y)
    np.testing.assert_array_equal(prob.unpack(y).W2, unpack(y, (2, 3, 2)).W2)
    # layout: [θ_B, θ, W1 row-major, W2 row-major]
    y1 = prob.pack(0.5, [1, 2, 3], np.arange(9.0).reshape(3, 3), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(y1, [0.5, 1, 2, 3, *range(9), *range(6)])
    with pytest.raises(ValueError, match="last axis D"):
        unpack(np.zeros(7), prob)
    with pytest.raises(ValueError, match="W1 must have n=3 rows"):
        pack(0.5, np.ones(3), np.ones((2, 3)), np.ones((2, 3)))


# --------------------------------------------------------------------------------------------------
# closed forms: E exact, gradients = finite differences, [23] semantics, fast kernel = reference
# --------------------------------------------------------------------------------------------------


@given(seeds, dims)
def test_expected_loss_equals_mask_enumeration(seed, d):
    prob, rng = make(seed, *d)
    y = random_state(prob, rng)
    assert expected_loss(prob, y) == pytest.approx(expected_loss_enumerated(prob, y), rel=1e-12, abs=1e-12)


@given(seeds, dims)
def test_objective_gradient_equals_finite_differences(seed, d):
    prob, rng = make(seed, *d, lam=0.3)
    y = random_state(prob, rng)
    grad = objective_gradient(prob, y)
    h = 1e-6
    E = np.eye(prob.D) * h
    fd = (objective(prob, y + E) - objective(prob, y - E)) / (2 * h)
    scale = 1.0 + np.abs(grad).max()
    assert np.abs(fd - grad).max() <= 1e-6 * scale


@given(seeds, dims)
def test_gradients_are_the_conditional_quantities_of_23(seed, d):
    """g_B, g_i: differences of conditional expectations; h_i, k_i: gradients of E[ℓ | ξ_B = ξ_i = 1]."""
    prob, rng = make(seed, *d)
    y = random_state(prob, rng)
    gr = gradients(prob, y)
    s = unpack(y, prob)

    def E_with(tB=None, i=None, ti=None, W1=None, W2=None):
        th = s.theta.copy()
        if i is not None:
            th[i] = ti
        return float(
            expected_loss(prob, pack(s.theta_B if tB is None else tB, th, s.W1 if W1 is None else W1,
                                     s.W2 if W2 is None else W2))
        )

    assert gr.g_B == pytest.approx(E_with(tB=1.0) - E_with(tB=0.0), rel=1e-10, abs=1e-10)
    h = 1e-6
    for i in range(prob.n):
        assert gr.g[i] == pytest.approx(E_with(tB=1.0, i=i, ti=1.0) - E_with(tB=1.0, i=i, ti=0.0), rel=1e-10, abs=1e-10)
        for k in range(prob.m + 1):
            Wp, Wm = s.W1.copy(), s.W1.copy()
            Wp[i, k] += h
            Wm[i, k] -= h
            fd = (E_with(tB=1.0, i=i, ti=1.0, W1=Wp) - E_with(tB=1.0, i=i, ti=1.0, W1=Wm)) / (2 * h)
            assert gr.h[i, k] == pytest.approx(fd, rel=1e-5, abs=1e-6)
        for c in range(prob.p):
            Wp, Wm = s.W2.copy(), s.W2.copy()
            Wp[c, i] += h
            Wm[c, i] -= h
            fd = (E_with(tB=1.0, i=i, ti=1.0, W2=Wp) - E_with(tB=1.0, i=i, ti=1.0, W2=Wm)) / (2 * h)
            assert gr.k[c, i] == pytest.approx(fd, rel=1e-5, abs=1e-6)


@given(seeds, dims, st.integers(1, 40), st.sampled_from([1, 3, 7, 512]), st.sampled_from([0.0, 0.2]))
def test_fast_velocity_kernel_matches_reference(seed, d, B, chunk, lam):
    prob, rng = make(seed, *d, lam=lam)
    Y = random_state(prob, rng, batch=(B,), scale=2.0)
    ref = -objective_gradient(prob, Y)
    np.testing.assert_allclose(velocity(prob, Y, chunk=chunk), ref, rtol=1e-12, atol=1e-11)
    f = field(prob, chunk=chunk)
    np.testing.assert_allclose(f(0.0, Y), ref, rtol=1e-12, atol=1e-11)  # C-ordered (B, D)
    np.testing.assert_allclose(f(0.0, np.asfortranarray(Y)), ref, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(f(0.0, Y[0]), ref[0], rtol=1e-12, atol=1e-11)  # single state path
    np.testing.assert_allclose(velocity(prob, Y.reshape(B, 1, -1)), ref.reshape(B, 1, -1), rtol=1e-12, atol=1e-11)


def test_block_subsystem_24_structure():
    """[24]: θ̇_B = −(g_B+γ_B), θ̇_i = −θ_B(g_i+γ_1), ẇ_i = −θ_Bθ_i h_i − λw_i, v̇_i = −θ_Bθ_i k_i − λv_i."""
    prob, rng = make(3, 2, 4, 2, 16, lam=0.25)
    y = random_state(prob, rng)
    v = unpack(velocity(prob, y), prob)
    s = unpack(y, prob)
    gr = gradients(prob, y)
    gamma_B = prob.c_B + prob.c_1 * s.theta.sum()
    assert v.theta_B == pytest.approx(-(gr.g_B + gamma_B))
    np.testing.assert_allclose(v.theta, -s.theta_B * (gr.g + prob.c_1))
    tt = s.theta_B * s.theta
    np.testing.assert_allclose(v.W1, -tt[:, None] * gr.h - prob.lam * s.W1)
    np.testing.assert_allclose(v.W2, -tt[None, :] * gr.k - prob.lam * s.W2)
    # a pruned block (θ_B = 0) only decays: the weights see −λW, the unit gates stand still
    y0 = y.copy()
    y0[0] = 0.0
    v0 = unpack(velocity(prob, y0), prob)
    np.testing.assert_allclose(v0.theta, 0.0)
    np.testing.assert_allclose(v0.W1, -prob.lam * s.W1)
    np.testing.assert_allclose(v0.W2, -prob.lam * s.W2)


# --------------------------------------------------------------------------------------------------
# complexity from the one complexity model
# --------------------------------------------------------------------------------------------------


@given(seeds, st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.booleans())
def test_from_complexity_matches_complexity_model(seed, m, n, p, elementwise):
    rng = np.random.default_rng(seed)
    af, ap, beta = rng.uniform(0.01, 1.0, size=3)
    X, Y = rng.standard_normal((6, m)), rng.standard_normal((6, p))
    S = np.zeros((p, m + 1))
    prob = BlockProblem.from_complexity(X, Y, S, n, 0.1, af, ap, beta, elementwise=elementwise)
    model = ComplexityModel(block_spec(m, n, p), elementwise=elementwise)
    coeffs = Coefficients(af, ap, beta)
    for _ in range(3):
        tB, th = rng.uniform(), rng.uniform(size=n)
        gates = [BlockGates(theta_B=np.array(tB), theta_1=(th,))]
        g = model.grad(gates, coeffs)[0]
        assert float(g.theta_B) == pytest.approx(prob.c_B + prob.c_1 * th.sum(), rel=1e-12)  # γ_B
        assert float(g.gamma_1[0]) == pytest.approx(prob.c_1, rel=1e-12)  # γ_1
        # C(Θ) − C(θ_B = 0) = θ_B (c_B + c_1 |θ|₁), the §7 complexity
        off = [BlockGates(theta_B=np.array(0.0), theta_1=(th,))]
        dC = float(model.complexity(gates, coeffs) - model.complexity(off, coeffs))
        y = pack(tB, th, np.zeros((n, m + 1)), np.zeros((p, n)))
        assert dC == pytest.approx(float(complexity(prob, y)), rel=1e-10, abs=1e-12)


def test_from_complexity_c_values_and_zero_cB():
    # residual MLP block m -> n -> m (identity skip): γ_1 = (α_f + α_p)(m + 1 + p), c_B = β
    assert block_gammas(2, 4, 2, Coefficients(0.1, 0.0, 0.5)) == pytest.approx((0.5, 0.1 * 5))
    assert block_spec(2, 4, 2).name.startswith("residual-mlp")
    X, Y, S = np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"BlockProblem\.c_B must be > 0"):
        BlockProblem.from_complexity(X, Y, S, 4, 0.0, 0.1, 0.1, 0.0)
    # the gated addition (c_b, elementwise costs) keeps γ_B > 0 when β = 0 ([26])
    prob = BlockProblem.from_complexity(X, Y, S, 4, 0.0, 0.1, 0.1, 0.0, elementwise=True)
    assert prob.c_B == pytest.approx(0.1 * 2)


# --------------------------------------------------------------------------------------------------
# Lemma 1 [28] and Lemma 2 [29]-[30]
# --------------------------------------------------------------------------------------------------


def lemma1_ratios(prob: BlockProblem, y: np.ndarray) -> dict[str, np.ndarray]:
    s = unpack(y, prob)
    gr = gradients(prob, y)
    wn, vn = s.w_norms, s.v_norms
    hn = np.linalg.norm(gr.h, axis=-1)
    kn = np.linalg.norm(gr.k, axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "k_g": np.abs(gr.g) / (wn * vn),
            "k_h": hn / vn,
            "k_k": kn / wn,
            "k_B": np.abs(gr.g_B) / np.sum(wn * vn, axis=-1),
        }


def ball_states(prob: BlockProblem, rng: np.random.Generator, R: float, B: int) -> np.ndarray:
    """States with ||W|| ≤ R: random directions, radii uniform in volume, a third on the sphere."""
    Y = random_state(prob, rng, batch=(B,))
    W = rng.standard_normal((B, prob.D - 1 - prob.n))
    W *= rng.uniform(0, 1, size=(B, 1)) ** (1.0 / W.shape[1])
    W[: B // 3] /= np.linalg.norm(W[: B // 3], axis=1, keepdims=True)
    Y[:, 1 + prob.n :] = R * W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1.0)
    return Y


@given(seeds, dims, st.floats(0.05, 4.0))
def test_lemma1_bounds_hold_in_the_ball(seed, d, R):
    prob, rng = make(seed, *d)
    Y = ball_states(prob, rng, R, 200)
    k = lemma1_k(prob, R)
    consts = lemma1_constants(prob, R)
    assert consts["k_g"] == k and max(consts.values()) == k
    for name, ratio in lemma1_ratios(prob, Y).items():
        r = ratio[np.isfinite(ratio)]
        assert np.all(r <= consts[name] * (1 + 1e-10)), name
        assert np.all(r <= k * (1 + 1e-10)), name
    # |g_B| ≤ k Σ||w_i|| ||v_i|| ≤ (k/2)(||W_1||² + ||W_2||²)
    gB = np.abs(gradients(prob, Y).g_B)
    assert np.all(gB <= 0.5 * k * unpack(Y, prob).weight_norm_sq * (1 + 1e-10) + 1e-300)


def test_lemma1_constant_is_what_section7_states():
    prob, _ = make(5, 2, 4, 2, 10)
    R = 1.7
    xn = np.linalg.norm(prob.Xh, axis=1)
    rn = np.linalg.norm(prob.Y - prob.Xh @ prob.S.T, axis=1)
    assert lemma1_k(prob, R) == pytest.approx(np.sum(xn * (rn + 0.75 * xn * R**2)))
    with pytest.raises(ValueError, match="R must be finite"):
        lemma1_k(prob, -1.0)


@given(seeds, dims)
def test_lemma2_gB_is_quadratic_in_the_weights(seed, d):
    """g_B = O(||W||²) and g_i = O(||w_i|| ||v_i||) along rays W = s·U as s -> 0 ([29]-[30])."""
    prob, rng = make(seed, *d)
    y = random_state(prob, rng)
    U = y[1 + prob.n :] / np.linalg.norm(y[1 + prob.n :])
    scales = 2.0 ** -np.arange(0, 24, 2)
    Y = np.repeat(y[None], scales.size, axis=0)
    Y[:, 1 + prob.n :] = scales[:, None] * U
    gr = gradients(prob, Y)
    s = unpack(Y, prob)
    ratio_B = np.abs(gr.g_B) / s.weight_norm_sq
    bound = 0.5 * lemma1_k(prob, 1.0)
    assert np.all(ratio_B <= bound * (1 + 1e-9))
    # the ratio converges (to the quadratic form of the leading term) as the weights shrink
    assert abs(ratio_B[-1] - ratio_B[-2]) <= 1e-5 * (1.0 + bound)
    ratio_i = np.abs(gr.g) / (s.w_norms * s.v_norms)
    assert np.all(ratio_i[np.isfinite(ratio_i)] <= lemma1_k(prob, 1.0) * (1 + 1e-9))


def test_random_is_reproducible():
    a = BlockProblem.random(np.random.default_rng(7))
    b = BlockProblem.random(np.random.default_rng(7))
    np.testing.assert_array_equal(a.Y, b.Y)
    assert (a.m, a.n, a.p, a.N, a.D) == (2, 4, 2, 32, 25)


@given(seeds, dims, st.floats(0.05, 4.0))
def test_lemma1_bounds_hold_with_half_and_gB_carries_the_unit_gates(seed, d, R):
    """docs/theory.md §7 and Lemma 2's proof idea [30]: with k½ = Σ_n ||x̂_n|| (||r_n|| + ½ ||x̂_n|| R²) in the
    ball ||W|| ≤ R, |g_i| ≤ k½ ||w_i|| ||v_i||, ||h_i|| ≤ k½ ||v_i||, ||k_i|| ≤ k½ ||w_i|| (the ¾ of lemma1_k is
    conservative), and the telescoping bound |g_B| ≤ k½ Σ_i θ_i ||w_i|| ||v_i|| (a factor θ_i per unit)."""
    prob, rng = make(seed, *d)
    Y = ball_states(prob, rng, R, 200)
    xn = np.linalg.norm(prob.Xh, axis=1)
    rn = np.linalg.norm(prob.Y - prob.Xh @ prob.S.T, axis=1)
    k_half = float(np.sum(xn * (rn + 0.5 * xn * R**2)))
    assert k_half <= lemma1_k(prob, R)
    tol = 1 + 1e-10
    for name, ratio in lemma1_ratios(prob, Y).items():
        if name != "k_B":
            r = ratio[np.isfinite(ratio)]
            assert np.all(r <= k_half * tol), name
    s = unpack(Y, prob)
    gB = np.abs(gradients(prob, Y).g_B)
    assert np.all(gB <= k_half * np.sum(s.theta * s.w_norms * s.v_norms, axis=-1) * tol + 1e-300)
