"""Symbolic objective and complexity (theory.symbolic): §4 multilinearity, [9]–[12], [18] by sympy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from theory import Coefficients, NetworkSpec, residual_mlp, resnet_cifar
from theory.objective import ExactObjective, GateLayout, Weights, mask_probabilities
from theory.spec import Block, Layer
from theory.symbolic import (
    closed_form_gamma_1,
    coefficient_distance,
    derive_gammas,
    gamma_discrepancy,
    is_multilinear,
    make_ring,
    multilinearity_defect,
    symbolic_complexity,
    symbolic_expected_loss,
    symbolic_objective,
    textbook_complexity,
    theta_symbols,
)


@st.composite
def layouts(draw: st.DrawFn, max_gates: int = 12) -> GateLayout:
    """Residual-MLP gate layouts: 1–3 blocks × 1–3 units, widths 1–3, optional output gates, any mode."""
    L = draw(st.integers(1, 3))
    hidden = draw(st.lists(st.integers(1, 3), min_size=L, max_size=L))
    m = draw(st.integers(1, 3))
    out_gated = draw(st.booleans())
    spec = residual_mlp(m, hidden, draw(st.integers(1, 3)), out_gated=out_gated)
    flags = st.lists(st.booleans(), min_size=L, max_size=L)
    block, units, outputs = list(draw(flags)), list(draw(flags)), [o and out_gated for o in draw(flags)]
    for fl in (outputs, units, block):  # shed gates until the budget fits
        for l in reversed(range(L)):
            if GateLayout(spec, tuple(block), tuple(units), tuple(outputs)).K > max_gates:
                fl[l] = False
    if not any(block) and not any(units) and not any(outputs):
        block[0] = True
    return GateLayout(spec, tuple(block), tuple(units), tuple(outputs))


#: Dyadic coefficients are exact in float64 and in QQ, so symbolic identities hold exactly.
dyadic = st.integers(0, 64).map(lambda k: k / 16)
coefficients = st.builds(Coefficients, dyadic, dyadic, dyadic)
float_coefficients = st.builds(
    Coefficients, st.floats(0.0, 10.0), st.floats(0.0, 10.0), st.floats(0.0, 10.0)
)


@given(layouts(max_gates=5), st.integers(0, 2**32 - 1))
def test_expected_loss_polynomial_is_multilinear_and_matches_numeric(layout: GateLayout, seed: int) -> None:
    """§4: E = Σ_ξ P(ξ|Θ) ℓ_ξ with free ℓ_ξ is multilinear in θ (exactly) and evaluates like the numeric P @ ℓ."""
    E, th, ell = symbolic_expected_loss(layout)
    assert is_multilinear(E, th)
    assert multilinearity_defect(E, th) == 0.0
    assert not is_multilinear(E * th[0], th)  # the decision is not vacuous
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 1.0, layout.K)
    lv = rng.normal(size=len(ell))
    exact = E(*[sp.Rational(float(v)) for v in (*t, *lv)])
    assert float(exact) == pytest.approx(float(mask_probabilities(t) @ lv), rel=1e-12, abs=1e-12)


@given(layouts(), coefficients, st.booleans())
def test_complexity_model_equals_printed_formulas(layout: GateLayout, coeffs: Coefficients, elementwise: bool) -> None:
    """ComplexityModel's C(Θ) on symbolic gates ≡ [9]–[11] written out for the residual MLP (exact)."""
    C = symbolic_complexity(layout.spec, layout, coeffs, elementwise=elementwise)
    T = textbook_complexity(layout.spec, layout, coeffs, elementwise=elementwise, gens=C.ring.gens)
    assert C == T
    assert is_multilinear(C, C.ring.gens)


@given(layouts(), float_coefficients, st.booleans())
def test_complexity_model_equals_printed_formulas_float_coefficients(
    layout: GateLayout, coeffs: Coefficients, elementwise: bool
) -> None:
    """As above with arbitrary float (α_f, α_p, β): equal up to float64 rounding of the coefficients."""
    C = symbolic_complexity(layout.spec, layout, coeffs, elementwise=elementwise)
    T = textbook_complexity(layout.spec, layout, coeffs, elementwise=elementwise, gens=C.ring.gens)
    assert coefficient_distance(C, T) < 1e-14


@given(layouts(), coefficients)
def test_gamma_factorises_and_matches_formula_12(layout: GateLayout, coeffs: Coefficients) -> None:
    """[12]: ∂C/∂θ_1,i = θ_B γ_1 with γ_1 free of θ_B and of the layer's own units, equal for all units,
    and equal to the printed γ_1 = α_f(c_1(|θ_2^{l-1}|+1) + c_2|θ_2^l|) + α_p(d_1(...) + d_2 ...)."""
    spec = layout.spec
    gens = make_ring(theta_symbols(layout))[1]
    arr = np.empty(len(gens), dtype=object)
    arr[:] = gens
    gates = layout.unflatten(arr)
    derived = derive_gammas(spec, coeffs, gates=gates)
    printed = closed_form_gamma_1(spec, layout, coeffs, gens)
    for l, d in enumerate(derived):
        assert d.factorised
        if layout.units[l]:
            assert d.gamma_1[0] == printed[l]
        iB = layout.block_index(l)
        if iB is not None:
            C = symbolic_complexity(spec, layout, coeffs, gens=gens)
            assert d.gamma_B == C.diff(gens[iB])


@given(st.integers(1, 3), st.lists(st.integers(1, 3), min_size=1, max_size=3), st.booleans(), float_coefficients,
       st.booleans(), st.integers(0, 2**32 - 1))
def test_gamma_matches_complexity_model_grad_residual_mlp(
    m: int, hidden: list[int], out_gated: bool, coeffs: Coefficients, elementwise: bool, seed: int
) -> None:
    """γ_B, γ_1, ∂C/∂θ_1,i, ∂C/∂θ_2,i derived by sympy = ComplexityModel.grad at random Θ ([12], [18])."""
    spec = residual_mlp(m, hidden, 2, out_gated=out_gated)
    err, ok = gamma_discrepancy(spec, coeffs, np.random.default_rng(seed), points=2, elementwise=elementwise)
    assert ok
    assert err < 1e-12


def _tiny_bottleneck() -> NetworkSpec:
    """Two M = 2 blocks (two unit-gated inner layers each), output gates on the second: [9]'s c_mid term."""

    def block(name: str, out_gated: bool) -> Block:
        path = (
            Layer("linear", 3, 2, bias=True, act=True),
            Layer("linear", 2, 3, bias=True, act=True),
            Layer("linear", 3, 3, bias=False),
        )
        return Block(3, 3, path, out_gated=out_gated, name=name)

    head = (Layer("linear", 3, 2, bias=True),)
    return NetworkSpec("tiny-bottleneck", (3,), (), (block("b0", False), block("b1", True)), head, 2)


@pytest.mark.parametrize("spec", [resnet_cifar(8, width=2), _tiny_bottleneck()], ids=["resnet8-w2", "bottleneck"])
@given(coeffs=float_coefficients, elementwise=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gamma_matches_complexity_model_grad_conv_and_bottleneck(
    spec: NetworkSpec, coeffs: Coefficients, elementwise: bool, seed: int
) -> None:
    """The same for a CIFAR-style conv ResNet (conv2d, zero-padding shortcuts) and an M = 2 block."""
    err, ok = gamma_discrepancy(spec, coeffs, np.random.default_rng(seed), points=1, elementwise=elementwise)
    assert ok
    assert err < 1e-12


@given(layouts(max_gates=6), st.integers(0, 2**32 - 1))
def test_symbolic_objective_is_multilinear_and_exact(layout: GateLayout, seed: int) -> None:
    """Theorem 3.1 (a) on an instance: L(W,·) as an exact polynomial has ∂²L/∂θ_j² ≡ 0 and equals the numeric L."""
    rng = np.random.default_rng(seed)
    spec = layout.spec
    m, C = spec.head[0].in_width, spec.num_classes
    N = int(rng.integers(1, 4))
    obj = ExactObjective(
        spec,
        rng.normal(size=(N, m)),
        rng.normal(size=(N, C)),
        lam=float(rng.uniform()),
        coeffs=Coefficients(*rng.uniform(0.0, 1.0, 3)),
        layout=layout,
    )
    W = Weights.random(spec, rng)
    L, gens = symbolic_objective(obj, W)
    assert multilinearity_defect(L, gens) == 0.0
    t = rng.uniform(0.0, 1.0, layout.K)
    value = float(L(*[sp.Rational(float(v)) for v in t])) if layout.K > 1 else float(L(sp.Rational(float(t[0]))))
    assert value == pytest.approx(float(obj(W, t)), rel=1e-12)


def test_negative_controls() -> None:
    """A non-multilinear perturbation is caught, for ring elements and for plain sympy expressions."""
    layout = GateLayout.for_spec(residual_mlp(2, [2], 2))
    coeffs = Coefficients(0.5, 0.25, 1.0)
    C = symbolic_complexity(layout.spec, layout, coeffs)
    g = C.ring.gens
    assert multilinearity_defect(C, g) == 0.0
    assert multilinearity_defect(C + 3 * g[1] ** 2, g) == 6.0
    assert not is_multilinear(C + g[0] * g[1] * g[1], g)
    syms = theta_symbols(layout)
    expr = C.as_expr()
    assert multilinearity_defect(expr, syms) == 0.0
    assert multilinearity_defect(expr + sp.Rational(1, 2) * syms[2] ** 2, syms) == 1.0
    assert multilinearity_defect(expr + sp.sin(syms[0]) * 0, syms) == 0.0
    assert coefficient_distance(C, C + g[0] * 1e-3) > 0


def test_gamma_discrepancy_detects_a_wrong_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a ComplexityModel.grad off by 1e-9 relative in γ_B is reported."""
    from theory import complexity

    spec = residual_mlp(2, [2], 2)
    coeffs = Coefficients(0.5, 0.25, 1.0)
    original = complexity.ComplexityModel.grad

    def wrong(self: Any, gates: Any, coeffs: Any) -> Any:
        out = original(self, gates, coeffs)
        return [complexity.GateGrads(g.theta_B * (1 + 1e-9), g.gamma_1, g.theta_1, g.theta_2) for g in out]

    monkeypatch.setattr(complexity.ComplexityModel, "grad", wrong)
    err, _ = gamma_discrepancy(spec, coeffs, np.random.default_rng(0))
    assert err > 1e-10
