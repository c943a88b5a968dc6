"""The exact objective of theory.objective: THEORY §1–§2 ([1], [2.2]), [9]–[12], [19]–[21]."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory import BlockGates, Coefficients, ComplexityModel, coefficients_for, residual_mlp, resnet_cifar
from theory.objective import (
    MAX_GATES,
    ExactObjective,
    GateLayout,
    LossKind,
    OutActivation,
    Weights,
    expectation_gradient,
    mask_matrix,
    mask_probabilities,
    objective,
)

HAS_TORCH = importlib.util.find_spec("torch") is not None
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")


@dataclass
class Problem:
    obj: ExactObjective
    W: Weights
    theta: np.ndarray
    rng: np.random.Generator


def _shed(layout: GateLayout, max_gates: int) -> GateLayout:
    """Drop output gates, then unit gates (last block first) until at most ``max_gates`` remain."""
    block, units, outputs = list(layout.block), list(layout.units), list(layout.outputs)
    for flags in (outputs, units):
        for l in reversed(range(len(flags))):
            if GateLayout(layout.spec, tuple(block), tuple(units), tuple(outputs)).K > max_gates:
                flags[l] = False
    lay = GateLayout(layout.spec, tuple(block), tuple(units), tuple(outputs))
    if lay.K == 0:
        block[0] = True
        lay = GateLayout(layout.spec, tuple(block), tuple(units), tuple(outputs))
    return lay


@st.composite
def problems(draw: st.DrawFn, max_gates: int = 12, max_samples: int = 4) -> Problem:
    """Random gated residual MLPs: 1–3 blocks × 1–3 units, widths 1–3, any gate mode, random data/weights/Θ."""
    L = draw(st.integers(1, 3))
    hidden = draw(st.lists(st.integers(1, 3), min_size=L, max_size=L))
    m = draw(st.integers(1, 3))
    classes = draw(st.integers(1, 3))
    out_gated = draw(st.booleans())
    spec = residual_mlp(m, hidden, classes, out_gated=out_gated)
    flags = st.lists(st.booleans(), min_size=L, max_size=L)
    block, units, outputs = draw(flags), draw(flags), draw(flags)
    layout = _shed(GateLayout(spec, tuple(block), tuple(units), tuple(o and out_gated for o in outputs)), max_gates)
    N = draw(st.integers(1, max_samples))
    loss: LossKind = draw(st.sampled_from(["squared", "cross_entropy"]))
    g: OutActivation = draw(st.sampled_from(["tanh", "identity"]))
    lam = draw(st.floats(0.0, 1.0))
    gamma = draw(st.floats(1e-3, 2.0))
    rho = draw(st.floats(0.0, 1.0))
    delta = draw(st.floats(0.0, 1.0))
    elementwise = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.normal(0.0, 1.0, (N, m))
    Y = rng.normal(0.0, 1.0, (N, classes)) if loss == "squared" else rng.integers(0, classes, N)
    coeffs = coefficients_for(spec, gamma, rho, delta, N=N, elementwise=elementwise)
    obj = ExactObjective(spec, X, Y, loss=loss, g=g, lam=lam, coeffs=coeffs, layout=layout, elementwise=elementwise)
    W = Weights.random(spec, rng, scale=float(rng.uniform(0.5, 3.0)))
    theta = rng.uniform(0.0, 1.0, layout.K)
    return Problem(obj, W, theta, rng)


def _reference_E(obj: ExactObjective, W: Weights, theta: np.ndarray) -> float:
    """Eq. [1] and [2.2] with explicit loops over masks and samples (independent of the vectorised code)."""
    lay = obj.layout
    total = 0.0
    for xi in itertools.product([0.0, 1.0], repeat=lay.K):
        p = 1.0
        for t, x in zip(theta, xi):
            p *= t if x else 1.0 - t
        gates = lay.unflatten(np.array(xi))
        for x, y in zip(obj.X, obj.T):
            z = x.copy()
            for l, gl in enumerate(gates):
                h = np.tanh(W.W1[l] @ np.append(z, 1.0))
                if gl.theta_1 is not None:
                    h = h * gl.theta_1[0]
                u = z + (1.0 if gl.theta_B is None else float(gl.theta_B)) * (W.W2[l] @ h)
                z = np.tanh(u) if obj.g == "tanh" else u
                if gl.theta_2 is not None:
                    z = z * gl.theta_2
            out = W.head @ np.append(z, 1.0)
            if obj.loss == "squared":
                ell = 0.5 * float(np.sum((y - out) ** 2))
            else:
                ell = float(np.log(np.sum(np.exp(out - out.max()))) + out.max() - y @ out)
            total += p * ell
    return total


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(a), abs(b))


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@given(problems(max_gates=7))
def test_expected_loss_matches_explicit_enumeration(pb: Problem) -> None:
    """E(W, Θ) of [2.2] = Σ_ξ P(ξ|Θ) Σ_n ℓ_n(ξ), with the forward pass [1] written out per sample and mask."""
    E = float(pb.obj.expected_loss(pb.W, pb.theta))
    assert _rel(E, _reference_E(pb.obj, pb.W, pb.theta)) < 1e-12


@given(problems())
def test_probabilities_and_vertices(pb: Problem) -> None:
    """P(·|Θ) is a distribution; at a vertex E is the loss of that deterministic network."""
    obj, K = pb.obj, pb.obj.K
    probs = obj.mask_probs(pb.theta)
    assert probs.shape == (2**K,)
    assert np.all(probs >= 0) and abs(probs.sum() - 1.0) < 1e-12
    ml = obj.mask_losses(pb.W)
    k = int(pb.rng.integers(2**K))
    vertex = mask_matrix(K)[k]
    assert obj.expected_loss(pb.W, vertex) == pytest.approx(ml[k], rel=1e-13, abs=0)
    assert obj.expected_loss(pb.W, pb.theta) == pytest.approx(probs @ ml, rel=1e-13)


@given(problems())
def test_result_composition(pb: Problem) -> None:
    """L = E + (λ/2)||W||² + C ([2.2]) with C from ComplexityModel ([11]) on the BlockGates layout."""
    obj = pb.obj
    r = obj.evaluate(pb.W, pb.theta)
    gates = obj.layout.unflatten(pb.theta)
    C = obj.model.complexity(gates, obj.coeffs)
    wd = 0.5 * obj.lam * sum(float((a**2).sum()) for a in pb.W.arrays())
    assert r.C == pytest.approx(C, rel=1e-14)
    assert r.weight_decay == pytest.approx(wd, rel=1e-14, abs=1e-300)
    assert r.L == pytest.approx(r.E + r.C + r.weight_decay, rel=1e-14)
    np.testing.assert_allclose(r.grad, r.grad_E + r.grad_C, rtol=1e-14, atol=0)
    # BlockGates input gives the same result as the flat vector
    r2 = obj.evaluate(pb.W, gates)
    assert r2.L == r.L
    np.testing.assert_array_equal(r2.grad, r.grad)
    np.testing.assert_array_equal(obj.layout.flatten(gates), pb.theta)
    assert [type(g) for g in r.grad_gates()] == [BlockGates] * len(gates)


@given(problems())
def test_gradient_is_difference_of_conditional_expectations(pb: Problem) -> None:
    """[19]–[21]: ∂E/∂θ_j = E[ℓ|ξ_j=1] − E[ℓ|ξ_j=0]; ∂E/∂θ_B = g_B, ∂E/∂θ_1,i = θ_B g_i; exact slope."""
    obj, th, K = pb.obj, pb.theta, pb.obj.K
    ml = obj.mask_losses(pb.W)
    gE = obj.grad_expected_loss(None, th, ml)
    scale = max(1.0, float(np.abs(ml).max()))
    for j in range(K):
        diff = obj.conditional_loss(None, th, {j: 1}, ml) - obj.conditional_loss(None, th, {j: 0}, ml)
        assert abs(gE[j] - diff) <= 1e-12 * scale
        # E is affine in θ_j: a secant over any two points is the derivative
        a, b = th.copy(), th.copy()
        a[j], b[j] = 0.2, 0.9
        secant = (obj.expected_loss(pb.W, b) - obj.expected_loss(pb.W, a)) / 0.7
        assert abs(gE[j] - secant) <= 1e-11 * scale
    for l in range(len(obj.spec.blocks)):
        iB = obj.layout.block_index(l)
        units = list(obj.layout.unit_indices(l))
        if iB is None or not units:
            continue
        gB, gi = obj.block_unit_differences(pb.W, th, l)
        assert abs(gE[iB] - gB) <= 1e-12 * scale
        np.testing.assert_allclose(gE[units], th[iB] * gi, rtol=0, atol=1e-12 * scale)


@given(problems())
def test_complexity_gradient_is_effective_regularisation(pb: Problem) -> None:
    """∇_Θ C in layout order: γ_B for θ_B and θ_B γ_1 for θ_1,i ([12], [18]); secant-exact (C multilinear)."""
    obj, th = pb.obj, pb.theta
    gC = obj.grad_complexity(th)
    grads = obj.model.grad(obj.layout.unflatten(th), obj.coeffs)
    C0 = float(obj.complexity(th))
    for k, (l, kind, _) in enumerate(obj.layout.slots):
        if kind == "B":
            assert gC[k] == pytest.approx(grads[l].theta_B, rel=1e-14)
        elif kind == "1":
            tB = th[obj.layout.block_index(l)] if obj.layout.block[l] else 1.0
            assert gC[k] == pytest.approx(tB * grads[l].gamma_1[0], rel=1e-12, abs=1e-300)
        a, b = th.copy(), th.copy()
        a[k], b[k] = 0.0, 1.0
        secant = float(obj.complexity(b)) - float(obj.complexity(a))
        assert abs(gC[k] - secant) <= 1e-12 * max(1.0, abs(C0))


@given(problems())
def test_layout_roundtrip_and_probability_gradient(pb: Problem) -> None:
    """flatten ∘ unflatten = id; expectation_gradient of the all-ones vector is 0 (Σ_ξ P = 1)."""
    lay = pb.obj.layout
    np.testing.assert_array_equal(lay.flatten(lay.unflatten(pb.theta)), pb.theta)
    assert len(lay.names) == lay.K == len(set(lay.names))
    g = expectation_gradient(pb.theta, np.ones(2**lay.K))
    assert np.abs(g).max() < 1e-12


@requires_torch
@given(problems(max_gates=9))
def test_torch_matches_numpy_and_autograd(pb: Problem) -> None:
    """Same L on float64 torch; autograd ∂L/∂Θ equals the analytic gradient; ∂L/∂W flows to every weight."""
    import torch

    obj = pb.obj
    r = obj.evaluate(pb.W, pb.theta)
    Wt = pb.W.to_torch(requires_grad=True)
    tht = torch.tensor(pb.theta, dtype=torch.float64, requires_grad=True)
    rt = obj.evaluate(Wt, tht)
    scale = max(1.0, abs(float(r.L)))
    assert abs(rt.L.item() - float(r.L)) <= 1e-12 * scale
    assert abs(rt.E.item() - float(r.E)) <= 1e-12 * scale
    rt.L.backward()
    assert tht.grad is not None
    np.testing.assert_allclose(tht.grad.numpy(), r.grad, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(rt.grad.detach().numpy(), r.grad, rtol=0, atol=1e-11 * scale)
    # weight gradient: one entry against a central difference of the numpy objective
    arrays = pb.W.arrays()
    which = int(pb.rng.integers(len(arrays)))
    idx = tuple(int(pb.rng.integers(s)) for s in arrays[which].shape)
    h = 1e-6

    def shifted(delta: float) -> float:
        new = [a.copy() for a in arrays]
        new[which][idx] += delta
        W = Weights(tuple(new[0:-1:2]), tuple(new[1:-1:2]), new[-1])
        return float(obj(W, pb.theta))

    fd = (shifted(h) - shifted(-h)) / (2 * h)
    grad_w = Wt.arrays()[which].grad
    assert grad_w is not None
    assert abs(float(grad_w[idx]) - fd) <= 1e-6 * max(1.0, abs(fd), scale)


# --------------------------------------------------------------------------------------------------
# Edge cases and bad inputs
# --------------------------------------------------------------------------------------------------


def _small() -> tuple[ExactObjective, Weights]:
    rng = np.random.default_rng(0)
    spec = residual_mlp(2, [2, 1], 2)
    obj = ExactObjective(spec, rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), coeffs=Coefficients(0.1, 0.2, 0.3))
    return obj, Weights.random(spec, rng)


def test_zero_gates_is_the_deterministic_network() -> None:
    obj, W = _small()
    lay = GateLayout(obj.spec, (False, False), (False, False), (False, False))
    obj0 = ExactObjective(obj.spec, obj.X, obj.T, layout=lay, coeffs=obj.coeffs)
    r0 = obj0.evaluate(W, np.zeros(0))
    full = obj.evaluate(W, np.ones(obj.K))
    assert r0.L == pytest.approx(full.L, rel=1e-14)
    assert r0.grad.shape == (0,)


def test_one_shot_function_reads_layout_from_gates() -> None:
    obj, W = _small()
    gates = [BlockGates(np.array(0.3), None, None), BlockGates(None, (np.array([0.6]),), None)]
    r = objective(obj.spec, W, gates, obj.X, obj.T, coeffs=obj.coeffs)
    assert r.layout.K == 2 and r.layout.names == ("theta_B[0]", "theta_1[1][0]")
    full = obj.evaluate(W, np.array([0.3, 1.0, 1.0, 1.0, 0.6]))
    assert float(r.L) == pytest.approx(float(full.L), rel=1e-14)


def test_probabilities_accept_symbolic_gates() -> None:
    import sympy as sp

    a, b = sp.symbols("a b")
    P = mask_probabilities(np.array([a, b], dtype=object))
    assert sp.expand(sum(P)) == 1
    assert sp.expand(P[3] - a * b) == 0 and sp.expand(P[1] - (1 - a) * b) == 0
    g = expectation_gradient(np.array([a, b], dtype=object), np.array(sp.symbols("l0:4"), dtype=object))
    l0, l1, l2, l3 = sp.symbols("l0:4")
    assert sp.expand(g[0] - ((1 - b) * (l2 - l0) + b * (l3 - l1))) == 0


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda W: Weights((W.W1[0][:, :-1], W.W1[1]), W.W2, W.head), r"weights\.W1\[0\]"),
        (lambda W: Weights(W.W1, (W.W2[0], W.W2[1].T), W.head), r"weights\.W2\[1\]"),
        (lambda W: Weights(W.W1, W.W2, W.head[:1]), r"weights\.head"),
        (lambda W: Weights(W.W1[:1], W.W2[:1], W.head), r"weights\.W1"),
        (lambda W: Weights(W.W1, W.W2, W.head * np.nan), r"weights\.head"),
    ],
)
def test_bad_weights(mutate: Callable[[Weights], Weights], match: str) -> None:
    obj, W = _small()
    with pytest.raises(ValueError, match=match):
        obj.evaluate(mutate(W), np.full(obj.K, 0.5))


def test_bad_theta() -> None:
    obj, W = _small()
    for bad in (np.full(obj.K, 1.5), np.full(obj.K, -0.1), np.full(obj.K - 1, 0.5), np.full(obj.K, np.nan)):
        with pytest.raises(ValueError, match="theta"):
            obj.evaluate(W, bad)
    gates = obj.layout.unflatten(np.full(obj.K, 0.5))
    gates[0] = BlockGates(np.array(1.2), gates[0].theta_1, None)
    with pytest.raises(ValueError, match=r"gates\[0\]\.theta_B"):
        obj.evaluate(W, gates)
    gates[0] = BlockGates(None, gates[0].theta_1, None)
    with pytest.raises(ValueError, match="layout"):
        obj.evaluate(W, gates)


def test_too_many_gates() -> None:
    spec = residual_mlp(3, [3, 3, 3], 2, out_gated=True)  # 3 · (1 + 3 + 3) = 21 gates
    with pytest.raises(ValueError, match=f"layout.*MAX_GATES={MAX_GATES}"):
        ExactObjective(spec, np.zeros((1, 3)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="MAX_GATES"):
        mask_matrix(MAX_GATES + 1)


def test_bad_data_and_options() -> None:
    spec = residual_mlp(2, [2], 3)
    X, Y = np.zeros((4, 2)), np.zeros((4, 3))
    with pytest.raises(ValueError, match="X"):
        ExactObjective(spec, np.zeros((4, 3)), Y)
    with pytest.raises(ValueError, match="Y"):
        ExactObjective(spec, X, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="Y"):
        ExactObjective(spec, X, np.array([0, 1, 3, 0]), loss="cross_entropy")
    with pytest.raises(ValueError, match="loss"):
        ExactObjective(spec, X, Y, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="g must"):
        ExactObjective(spec, X, Y, g="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam"):
        ExactObjective(spec, X, Y, lam=-1.0)
    with pytest.raises(ValueError, match="spec"):
        ExactObjective(resnet_cifar(8, width=2), X, Y)
    with pytest.raises(ValueError, match="GateLayout.outputs"):
        GateLayout(spec, (True,), (True,), (True,))


@requires_torch
def test_torch_inputs_must_be_float64() -> None:
    import torch

    obj, W = _small()
    with pytest.raises(ValueError, match="theta"):
        obj.evaluate(W, torch.full((obj.K,), 0.5, dtype=torch.float32))
    W32 = Weights(tuple(torch.tensor(a, dtype=torch.float32) for a in W.W1), W.W2, W.head)
    with pytest.raises(ValueError, match=r"weights\.W1\[0\]"):
        obj.evaluate(W32, np.full(obj.K, 0.5))


def test_import_theory_does_not_import_torch() -> None:
    code = (
        "import sys, theory, theory.objective, theory.symbolic, theory.determinism; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_complexity_model_is_the_one_used() -> None:
    """C of the objective is ComplexityModel.complexity on the BlockGates layout (no second implementation)."""
    obj, W = _small()
    th = np.linspace(0.1, 0.9, obj.K)
    direct = ComplexityModel(obj.spec).complexity(obj.layout.unflatten(th), obj.coeffs)
    assert float(obj.complexity(th)) == float(direct)
