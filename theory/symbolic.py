"""Exact symbolic objective and complexity (sympy): THEORY §3–§4, eqs. [2.2], [9]–[12], [18], Theorem 3.1 (a).

For tiny networks this module writes

* ``E(Θ) = Σ_ξ P(ξ|Θ) ℓ_ξ`` with one symbol ``ℓ_ξ`` per gate mask (§4), or
  with the numeric mask losses of a concrete instance
  (:func:`symbolic_objective`, which adds ``C`` and the weight decay: the whole
  ``L(W, ·)`` of [2.2] for fixed ``W``);
* ``C(Θ)`` of [11] by feeding symbolic gates through the one implementation
  :class:`theory.complexity.ComplexityModel` (:func:`symbolic_complexity`), and
  independently from the printed formulas [9]–[11] for residual MLPs
  (:func:`textbook_complexity`), so the two can be compared exactly;

as polynomials in the gate symbols, proves multilinearity exactly
(``∂²/∂θ_j² ≡ 0`` for every ``j``, :func:`multilinearity_defect`), and derives
the effective regularisation ``γ_B = ∂C/∂θ_B`` and ``γ_1`` with
``∂C/∂θ_1,i = θ_B γ_1`` ([12], [18]) symbolically (:func:`derive_gammas`),
checking the factorisation (``γ_1`` free of ``θ_B``, equal for all units of a
layer, free of that layer's own unit gates) and comparing with
:meth:`ComplexityModel.grad` at random points (:func:`gamma_discrepancy`).

Polynomials are sympy's sparse ``PolyElement`` (``sympy.polys.rings``): exact
rational (or integer) coefficients and fast arithmetic with hundreds of
generators; ``p.as_expr()`` gives an ordinary sympy expression in the
symbols of :func:`theta_symbols`.  Floats (mask losses, coefficients) enter
as exact rationals (``sympy.Rational(x)``) or, inside ComplexityModel's
arithmetic, through sympy's ``QQ`` conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import sympy as sp
from sympy.polys.rings import PolyElement, PolyRing, ring

from .complexity import BlockGates, Coefficients, ComplexityModel
from .objective import ExactObjective, GateLayout, Weights, mask_matrix, mask_probabilities
from .spec import NetworkSpec

Poly: TypeAlias = Any  # a sympy.polys.rings.PolyElement


# --------------------------------------------------------------------------------------------------
# Symbols and rings
# --------------------------------------------------------------------------------------------------


def _slot_name(l: int, kind: str, i: int) -> str:
    return f"thB_{l}" if kind == "B" else f"th{kind}_{l}_{i}"


def theta_symbols(layout: GateLayout) -> tuple[sp.Symbol, ...]:
    """One real symbol per free gate of ``layout``, in flat order: ``thB_l``, ``th1_l_i``, ``th2_l_i``."""
    return tuple(sp.Symbol(_slot_name(l, k, i), real=True) for l, k, i in layout.slots)


def loss_symbols(K: int) -> tuple[sp.Symbol, ...]:
    """``ℓ_k`` for every mask ``k`` of :func:`theory.objective.mask_matrix` (``2^K`` symbols)."""
    return tuple(sp.Symbol(f"ell_{k}", real=True) for k in range(2**K))


def make_ring(symbols: Sequence[sp.Symbol], domain: Any = sp.QQ) -> tuple[PolyRing, list[Poly]]:
    """A sparse polynomial ring over ``domain`` with ``symbols`` as generators."""
    if not symbols:
        raise ValueError("symbols must not be empty")
    R, *gens = ring(list(symbols), domain)
    return R, gens


def _obj(xs: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(xs), dtype=object)
    for k, x in enumerate(xs):
        out[k] = x
    return out


def _rational(x: Any) -> sp.Rational:
    return sp.Rational(float(x))


# --------------------------------------------------------------------------------------------------
# E and C as polynomials
# --------------------------------------------------------------------------------------------------


def symbolic_expected_loss(layout: GateLayout) -> tuple[Poly, list[Poly], list[Poly]]:
    """``E = Σ_k P(ξ_k | Θ) ℓ_k`` over ``QQ[θ, ℓ]`` (§4): returns ``(E, θ generators, ℓ generators)``.

    ``P`` is :func:`theory.objective.mask_probabilities` applied to the
    generators, i.e. the same polynomial the numeric objective evaluates.
    """
    K = layout.K
    if K < 1:
        raise ValueError("layout must have at least one gate")
    R, gens = make_ring([*theta_symbols(layout), *loss_symbols(K)], sp.QQ)
    th, ell = gens[:K], gens[K:]
    P = mask_probabilities(_obj(th), mask_matrix(K).astype(int))
    E = R.zero
    for p, e in zip(P, ell):
        E += p * e
    return E, th, ell


def symbolic_complexity(
    spec: NetworkSpec,
    layout: GateLayout,
    coeffs: Coefficients,
    *,
    elementwise: bool = False,
    gens: Sequence[Poly] | None = None,
) -> Poly:
    """``C(Θ)`` of [11] as a polynomial: :meth:`ComplexityModel.complexity` applied to symbolic gates.

    ``gens``: the θ generators to use (default: a fresh ring of :func:`theta_symbols`).
    """
    if gens is None:
        gens = make_ring(theta_symbols(layout))[1]
    C = ComplexityModel(spec, elementwise=elementwise).complexity(layout.unflatten(_obj(gens)), coeffs)
    return _as_poly(C, gens)


def _as_poly(x: Any, gens: Sequence[Poly]) -> Poly:
    if isinstance(x, PolyElement):
        return x
    return gens[0].ring(_rational(x))


def textbook_complexity(
    spec: NetworkSpec,
    layout: GateLayout,
    coeffs: Coefficients,
    *,
    elementwise: bool = False,
    gens: Sequence[Poly] | None = None,
) -> Poly:
    """``C(Θ)`` of a residual MLP written out from the printed formulas [9]–[11], independently of ComplexityModel.

    Per block, with ``m = |θ_2^{l-1}|₁`` (or the fixed width), ``n = |θ_1^l|₁``,
    ``p = |θ_2^l|₁`` and ``c_1 = c_2 = d_1 = d_2 = 1`` (fully connected),
    identity skip (``c_S = d_S = 0``)::

        E[F_l] = θ_B [ n (m + 1) + p n + c_a n + c_b p ] + c_g p         [9]
        E[P_l] = θ_B [ n (m + 1) + p n ]                                   [10]
        C      = Σ_l [ α_f E[F_l] + α_p E[P_l] + β θ_B ] + (α_f + α_p) · classes · (m_L + 1)   [11]

    with ``c_a = c_b = c_g = 1`` if ``elementwise`` else 0; the last term is
    the linear head ``F_{L+1} = P_{L+1}``.
    """
    from .objective import _check_spec

    _check_spec(spec)
    if gens is None:
        gens = make_ring(theta_symbols(layout))[1]
    R = gens[0].ring
    gates = layout.unflatten(_obj(gens))
    af, ap, beta = (_rational(v) for v in (coeffs.alpha_f, coeffs.alpha_p, coeffs.beta))
    e = 1 if elementwise else 0
    m: Any = R(spec.blocks[0].in_width if spec.blocks else spec.head[0].in_width)
    C: Any = R.zero
    for b, g in zip(spec.blocks, gates):
        tB: Any = R.one if g.theta_B is None else g.theta_B
        t1 = None if g.theta_1 is None else g.theta_1[0]
        n: Any = R(b.unit_widths[0]) if t1 is None else sum(t1, R.zero)
        p: Any = R(b.out_width) if g.theta_2 is None else sum(g.theta_2, R.zero)
        F = tB * (n * (m + 1) + p * n + e * n + e * p) + e * (1 if b.out_act else 0) * p
        P = tB * (n * (m + 1) + p * n)
        C += af * F + ap * P + (beta * tB if b.gated else 0)
        m = p
    C += (af + ap) * spec.num_classes * (m + 1)
    return C


def symbolic_objective(
    objective: ExactObjective, weights: Weights, *, gens: Sequence[Poly] | None = None
) -> tuple[Poly, list[Poly]]:
    """``L(W, ·) = Σ_k P(ξ_k|Θ) mask_loss_k + (λ/2)||W||² + C(Θ)`` as a polynomial in ``θ`` ([2.2]), exact rationals.

    The mask losses and the weight decay of the concrete instance enter as
    the exact rationals of their float64 values; returns ``(L, θ generators)``.
    """
    layout = objective.layout
    if layout.K < 1:
        raise ValueError("objective.layout must have at least one gate")
    if gens is None:
        gens = make_ring(theta_symbols(layout))[1]
    gens = list(gens)
    R = gens[0].ring
    ml = np.asarray(objective.mask_losses(weights), dtype=float)
    P = mask_probabilities(_obj(gens), mask_matrix(layout.K).astype(int))
    L: Any = R.zero
    for p, v in zip(P, ml):
        L += p * _rational(v)
    L += _rational(0.5 * objective.lam * float(weights.sq_norm()))
    L += _as_poly(objective.model.complexity(layout.unflatten(_obj(gens)), objective.coeffs), gens)
    return L, gens


# --------------------------------------------------------------------------------------------------
# Multilinearity (Theorem 3.1 (a))
# --------------------------------------------------------------------------------------------------


def _to_poly(p: Poly | sp.Expr, symbols: Sequence[Any]) -> tuple[Poly, list[Poly]]:
    """``p`` as a ring element and the generators corresponding to ``symbols``."""
    if isinstance(p, PolyElement):
        R = p.ring
        gens = [s if isinstance(s, PolyElement) else R(s) for s in symbols]
        return p, gens
    expr = sp.sympify(p)
    free = sorted(expr.free_symbols | {s for s in symbols if isinstance(s, sp.Symbol)}, key=str)
    R, gens_all = make_ring(free)
    by_name = dict(zip(free, gens_all))
    return R(expr), [by_name[s] for s in symbols]


def second_derivatives(p: Poly | sp.Expr, symbols: Sequence[Any]) -> list[Poly]:
    """``∂²p/∂θ_j²`` for every ``θ_j`` in ``symbols`` (ring elements or sympy symbols)."""
    q, gens = _to_poly(p, symbols)
    return [q.diff(g).diff(g) for g in gens]


def multilinearity_defect(p: Poly | sp.Expr, symbols: Sequence[Any]) -> float:
    """``max_j max |coefficient of ∂²p/∂θ_j²|``: exactly 0.0 iff ``p`` is multilinear in ``symbols`` (Thm 3.1 (a)).

    Coefficients that are themselves symbolic (e.g. ``ℓ`` not listed as a
    generator) count as 1 when non-zero.
    """
    worst = 0.0
    for d2 in second_derivatives(p, symbols):
        for c in d2.coeffs():
            try:
                worst = max(worst, abs(float(c)))
            except (TypeError, ValueError):
                worst = max(worst, 1.0)
    return worst


def coefficient_distance(p: Poly, q: Poly) -> float:
    """``max |coefficient of p − q| / max(1, max |coefficient of p|, max |coefficient of q|)`` (0.0 iff ``p == q``)."""
    scale = max([1.0] + [abs(float(c)) for c in p.coeffs()] + [abs(float(c)) for c in q.coeffs()])
    return max([0.0] + [abs(float(c)) for c in (p - q).coeffs()]) / scale


def is_multilinear(p: Poly | sp.Expr, symbols: Sequence[Any]) -> bool:
    """``∂²p/∂θ_j² ≡ 0`` for every ``j``, decided exactly."""
    return all(d2 == 0 for d2 in second_derivatives(p, symbols))


# --------------------------------------------------------------------------------------------------
# Effective regularisation γ_B, γ_1 ([12], [18]) for any spec
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SymbolicGateGrads:
    """Symbolic ``∇_Θ C`` of one block, derived from ``C`` (laid out like :class:`~theory.complexity.GateGrads`).

    ``gamma_B = ∂C/∂θ_B`` (``None`` if the block has no block gate);
    ``gamma_1[j]`` the common ``γ_1`` of inner layer ``j`` with
    ``∂C/∂θ_1,i = θ_B γ_1`` ([12]); ``grad_1[j]`` the full derivatives;
    ``grad_2`` those of the output gates (``None`` if absent).
    ``factorised`` records that every ``∂C/∂θ_1,i`` is divisible by ``θ_B``,
    that the quotient is free of ``θ_B`` and of layer ``j``'s own unit gates,
    and equal for all units of the layer.
    """

    gamma_B: Poly | None
    gamma_1: tuple[Poly, ...]
    grad_1: tuple[tuple[Poly, ...], ...]
    grad_2: tuple[Poly, ...] | None
    factorised: bool


def spec_gate_symbols(spec: NetworkSpec) -> tuple[list[BlockGates], list[Poly]]:
    """Symbolic gates for *every* gate of ``spec`` (block, all inner unit layers, outputs), any ``M``.

    Returns ``(gates, generators)``; names ``thB_l``, ``th1_l_j_i``, ``th2_l_i``.
    """
    names: list[sp.Symbol] = []
    for l, b in enumerate(spec.blocks):
        if b.gated and b.alive:
            names.append(sp.Symbol(f"thB_{l}", real=True))
        for j, n in enumerate(b.unit_widths):
            names += [sp.Symbol(f"th1_{l}_{j}_{i}", real=True) for i in range(n)]
        if b.out_gated:
            names += [sp.Symbol(f"th2_{l}_{i}", real=True) for i in range(b.out_width)]
    R, gens = make_ring(names)
    it = iter(gens)
    gates: list[BlockGates] = []
    for b in spec.blocks:
        tB = next(it) if (b.gated and b.alive) else None
        t1 = tuple(_obj([next(it) for _ in range(n)]) for n in b.unit_widths) if b.alive else None
        t2 = _obj([next(it) for _ in range(b.out_width)]) if b.out_gated else None
        gates.append(BlockGates(tB, t1, t2))
    return gates, gens


def derive_gammas(
    spec: NetworkSpec,
    coeffs: Coefficients,
    *,
    elementwise: bool = False,
    gates: list[BlockGates] | None = None,
) -> list[SymbolicGateGrads]:
    """Differentiate ``C`` of [11] symbolically: ``γ_B = ∂C/∂θ_B``, ``γ_1 = (∂C/∂θ_1,i)/θ_B`` ([12], [18]).

    ``gates`` default to :func:`spec_gate_symbols` (every gate of ``spec``).
    """
    if gates is None:
        gates = spec_gate_symbols(spec)[0]
    model = ComplexityModel(spec, elementwise=elementwise)
    elements = [x for g in gates for x in _gate_elements(g)]
    if not elements:
        raise ValueError("gates must hold at least one symbolic gate")
    C = _as_poly(model.complexity(gates, coeffs), elements)
    out: list[SymbolicGateGrads] = []
    for g in gates:
        tB = _unwrap(g.theta_B)
        gB = C.diff(tB) if tB is not None else None
        gamma_1: list[Poly] = []
        grad_1: list[tuple[Poly, ...]] = []
        ok = True
        for vec in g.theta_1 or ():
            if vec is None:
                continue
            ds = tuple(C.diff(t) for t in vec)
            grad_1.append(ds)
            if tB is not None:
                quotients = []
                for d in ds:
                    q, r = d.div(tB)
                    ok = ok and r == 0 and q.diff(tB) == 0
                    quotients.append(q)
            else:
                quotients = list(ds)
            ok = ok and all(q == quotients[0] for q in quotients)
            ok = ok and all(quotients[0].diff(t) == 0 for t in vec)
            gamma_1.append(quotients[0])
        g2 = tuple(C.diff(t) for t in g.theta_2) if g.theta_2 is not None else None
        out.append(SymbolicGateGrads(gB, tuple(gamma_1), tuple(grad_1), g2, ok))
    return out


def _unwrap(x: Any) -> Any:
    """A 0-d object array (what ``theta[..., i]`` gives for an object vector) -> its element."""
    return x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x


def _gate_elements(g: BlockGates) -> list[Poly]:
    out: list[Poly] = [] if g.theta_B is None else [_unwrap(g.theta_B)]
    for vec in g.theta_1 or ():
        out += [] if vec is None else list(vec)
    return out + ([] if g.theta_2 is None else list(g.theta_2))


def gamma_discrepancy(
    spec: NetworkSpec,
    coeffs: Coefficients,
    rng: np.random.Generator,
    *,
    points: int = 3,
    elementwise: bool = False,
) -> tuple[float, bool]:
    """Largest relative difference between :func:`derive_gammas` and :meth:`ComplexityModel.grad`.

    Evaluated at ``points`` random ``Θ ∈ H`` (every gate of ``spec``);
    compares ``γ_B``, ``γ_1`` (per inner layer), ``∂C/∂θ_1,i`` and
    ``∂C/∂θ_2,i``.  Returns ``(max relative error, all factorisations held)``.
    """
    gates_sym, gens = spec_gate_symbols(spec)
    derived = derive_gammas(spec, coeffs, elementwise=elementwise, gates=gates_sym)
    model = ComplexityModel(spec, elementwise=elementwise)
    worst = 0.0
    for _ in range(points):
        vals = rng.uniform(0.0, 1.0, len(gens))
        point = [sp.Rational(float(v)) for v in vals]
        numeric = _numeric_gates(gates_sym, dict(zip(gens, vals)))
        grads = model.grad(numeric, coeffs)

        def ev(p: Poly, point: list[sp.Rational] = point) -> float:
            return float(p(*point)) if len(point) > 1 else float(p(point[0]))

        for d, gg in zip(derived, grads):
            if d.gamma_B is not None:
                worst = max(worst, _rel(ev(d.gamma_B), float(gg.theta_B)))
            active = [j for j, vec in enumerate(gg.theta_1) if vec is not None]
            for k, j in enumerate(active):
                worst = max(worst, _rel(ev(d.gamma_1[k]), float(gg.gamma_1[j])))
                for dp, v in zip(d.grad_1[k], np.asarray(gg.theta_1[j], dtype=float)):
                    worst = max(worst, _rel(ev(dp), float(v)))
            if d.grad_2 is not None:
                for dp, v in zip(d.grad_2, np.asarray(gg.theta_2, dtype=float)):
                    worst = max(worst, _rel(ev(dp), float(v)))
    return worst, all(d.factorised for d in derived)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(a), abs(b))


def _numeric_gates(gates_sym: list[BlockGates], values: dict[Poly, float]) -> list[BlockGates]:
    def num(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, np.ndarray):
            return np.array([values[t] for t in x], dtype=float)
        return np.array(values[x])

    return [
        BlockGates(
            num(g.theta_B),
            None if g.theta_1 is None else tuple(num(v) for v in g.theta_1),
            num(g.theta_2),
        )
        for g in gates_sym
    ]


def closed_form_gamma_1(spec: NetworkSpec, layout: GateLayout, coeffs: Coefficients, gens: Sequence[Poly]) -> list[Any]:
    """``γ_1^l`` of a residual MLP from the printed formula [12] (``c = d = 1``, elementwise terms off)::

        γ_1 = α_f (c_1 (|θ_2^{l-1}|₁ + 1) + c_2 |θ_2^l|₁) + α_p (d_1 (|θ_2^{l-1}|₁ + 1) + d_2 |θ_2^l|₁)
    """
    R = gens[0].ring
    gates = layout.unflatten(_obj(list(gens)))
    af, ap = _rational(coeffs.alpha_f), _rational(coeffs.alpha_p)
    m: Any = R(spec.blocks[0].in_width) if spec.blocks else R.zero
    out = []
    for b, g in zip(spec.blocks, gates):
        p: Any = R(b.out_width) if g.theta_2 is None else sum(g.theta_2, R.zero)
        out.append(af * ((m + 1) + p) + ap * ((m + 1) + p))
        m = p
    return out


__all__ = [
    "SymbolicGateGrads",
    "closed_form_gamma_1",
    "coefficient_distance",
    "derive_gammas",
    "gamma_discrepancy",
    "is_multilinear",
    "loss_symbols",
    "make_ring",
    "multilinearity_defect",
    "second_derivatives",
    "spec_gate_symbols",
    "symbolic_complexity",
    "symbolic_expected_loss",
    "symbolic_objective",
    "textbook_complexity",
    "theta_symbols",
]
