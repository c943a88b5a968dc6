"""The expected-complexity model: THEORY §3, eqs [9]–[13], [18].

This module is the single implementation of expected FLOPs ``E[F]`` [9],
expected parameters ``E[P]`` [10], the combined complexity ``C(Θ)`` [11], its
gradients — the effective regularisation ``γ_B``, ``γ_1`` of [12]/[18] — and
the reparametrisation ``(γ, ρ, δ) -> (α_f, α_p, β)`` of [13].  Everything else
(the exact objective, the symbolic layer, the torch trainer, reports) imports
it.

How it works.  Because all gates are independent Bernoulli variables, the
expected cost of a network is a sum of *terms*

    coef · [θ_B^l] · Π_g ( |θ_g|₁ + o_g )

where each factor is the expected active width of one gate group ``g`` (a
unit-gate vector ``θ_1``, an output-gate vector ``θ_2``, or a fixed width)
plus an offset (1 for the bias column), and ``[θ_B^l]`` appears for terms in a
block's nonlinear path.  Distinct factors of one term always belong to
distinct groups, so ``C`` is multilinear in every gate (Theorem 3.1) and the
gradient of a term with respect to any gate of group ``g`` is the product of
the *other* factors.  :func:`compile_terms` turns a :class:`NetworkSpec` into
these terms once; evaluation then only needs sums and products, so the same
code runs on numpy arrays and torch tensors (with leading batch axes), and
torch autograd through :func:`complexity` agrees with the analytic
:func:`complexity_grad`.  :meth:`ComplexityModel.compile` evaluates the same
terms as a handful of array operations (:class:`CompiledComplexity`: one
segment sum, a gather per factor column, one matrix–vector product) — the
per-step path of the trainer; the term loop stays the reference (and the
general path: mixed broadcasting, per-layer tables, gradients).

Counting conventions (§3, "two uses of one model"): with ``elementwise=False``
the model counts conv + linear multiply–accumulates and parameters including
BatchNorm affine pairs — the numbers reported and compared with the
literature.  With ``elementwise=True`` it also charges one operation per
element for each BatchNorm, activation and residual addition (``c_a``,
``c_b``, ``c_g`` of [9]), a real hardware cost that keeps ``γ_B > 0`` when
``β = 0`` (the remark after [26]).

Measured latency (the ``objective.cost = "latency"`` option).  Given a calibrated
:class:`theory.latency.LatencyCosts`, :func:`compile_terms` adds, per weight layer with input
group ``g_in`` and output group ``g_out`` (and block gate ``θ_B^l`` inside a path), the terms of
``t_l = a_l + b_l n_in n_out + c_l n_out + d_l n_in`` (:mod:`theory.latency`), and per alive block
``a + c n_out`` for its residual addition (inside ``ξ_B``) and output activation (outside).  They
carry a third coefficient ``coef_t`` (seconds) beside ``coef_f``/``coef_p``; ``E[T]`` is their sum
(:meth:`ComplexityModel.latency`).  Exactness: ``E[ξ_B n_in n_out] = θ_B |θ_in|₁ |θ_out|₁``
needs the gates of ``g_in``, ``g_out`` and ``θ_B`` to be independent, i.e. distinct groups —
which holds because a layer's input is the previous layer's (or block's) output group and never
its own; a residual stream shared by several blocks enters each block as that block's ``g_in``
once per term.  :func:`compile_terms` asserts it for every term (a group repeated in one term
would need ``E[n²] ≠ E[n]²``).  With latency the combined complexity becomes
``C = α_t E[T] + β Σ θ_B`` (:func:`latency_coefficients`): ``α_t = γ N L_b / T_tot`` — ``γ``
keeps its meaning (the price of one average block's share of the baseline cost, now its share of
the baseline time ``T_tot``), ``δ`` keeps its meaning (``β = γ δ N``, a block price on top of the
block-constant time ``a_l`` the measurement already charges to ``θ_B``), ``ρ`` has none (one
cost, nothing to share), and ``elementwise`` none (the measured times include BatchNorm,
activations and additions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .latency import LatencyCosts
from .spec import Block, Layer, NetworkSpec

Array = Any  # numpy.ndarray or torch.Tensor; evaluation uses only sum/product/ones_like

# --------------------------------------------------------------------------------------------------
# Gate groups and gate containers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockGates:
    """Gate parameters of one block: ``θ_B`` (scalar), ``θ_1`` (one vector per inner layer), ``θ_2``.

    ``None`` means "not gated", i.e. the gates are fixed at 1 (layer-only mode
    has ``theta_1=None``, unit-only mode ``theta_B=None``).  Arrays may carry
    leading batch axes: ``theta_B`` of shape ``batch``, vectors of shape
    ``batch + (n,)``.
    """

    theta_B: Array | None = None
    theta_1: tuple[Array | None, ...] | None = None
    theta_2: Array | None = None


Gates = Sequence[BlockGates]


@dataclass(frozen=True)
class _Group:
    """A width factor: ``|θ_g|₁`` for a gated group, or a fixed integer width."""

    kind: str  # "fixed", "unit", "out"
    block: int = -1
    index: int = 0
    width: int = 0  # baseline width (fixed width for kind == "fixed")


@dataclass(frozen=True)
class Term:
    """``(coef_f, coef_p) · [θ_B^block] · Π (|θ_g|₁ + offset)`` for one cost item.

    ``block`` is the index of the block gate multiplying the term (``None``
    for terms outside any nonlinear path); ``label`` names the layer the cost
    belongs to (for per-layer tables, the paper's Figure 2).
    """

    coef_f: float
    coef_p: float
    block: int | None
    factors: tuple[tuple[_Group, int], ...]
    label: str
    coef_t: float = 0.0  # seconds of measured latency (theory.latency), 0 for FLOPs/parameter terms


# --------------------------------------------------------------------------------------------------
# Compilation: NetworkSpec -> terms
# --------------------------------------------------------------------------------------------------


def _layer_terms(
    layer: Layer,
    g_in: _Group,
    g_out: _Group,
    block: int | None,
    label: str,
    elementwise: bool,
) -> list[Term]:
    """Weights ([9]'s ``c·n·(m+1)``, [10]'s ``d·n·(m+1)``), BN pairs and element-wise costs of one layer."""
    terms = [Term(float(layer.c), float(layer.d), block, ((g_in, int(layer.bias)), (g_out, 0)), label)]
    per_unit_f = (int(layer.bn) + int(layer.act)) * layer.positions if elementwise else 0
    per_unit_p = 2 * int(layer.bn)
    if per_unit_f or per_unit_p:
        terms.append(Term(float(per_unit_f), float(per_unit_p), block, ((g_out, 0),), label))
    return terms


def _latency_terms(
    coef: tuple[float, float, float, float], g_in: _Group | None, g_out: _Group, block: int | None, label: str
) -> list[Term]:
    """``[θ_B] (a + b n_in n_out + c n_out + d n_in)`` of :mod:`theory.latency` as terms (``g_in=None``: no input)."""
    a, b, c, d = coef
    out = [Term(0.0, 0.0, block, (), label, a), Term(0.0, 0.0, block, ((g_out, 0),), label, c)]
    if g_in is not None:
        out += [Term(0.0, 0.0, block, ((g_in, 0), (g_out, 0)), label, b), Term(0.0, 0.0, block, ((g_in, 0),), label, d)]
    return [t for t in out if t.coef_t]


def _walk(spec: NetworkSpec, layer: Callable[..., list[Term]], add: Callable[..., list[Term]],
          act: Callable[..., list[Term]]) -> list[Term]:
    """The terms of ``spec``, layer by layer: one walk for every cost (FLOPs/parameters, latency).

    ``layer(layer, g_in, g_out, block_gate, label)`` prices a weight layer between two gate groups,
    ``add(block, g_out, block_gate, label)`` a block's sum (inside ``ξ_B``), ``act(block, g_out, label)``
    its output activation (outside ``ξ_B``).
    """
    terms: list[Term] = []
    g_prev = _Group("fixed", width=spec.input_shape[0] if spec.input_shape else 0)
    for s, lay in enumerate(spec.stem):
        g_next = _Group("fixed", width=lay.out_width)
        terms += layer(lay, g_prev, g_next, None, f"stem.{s}")
        g_prev = g_next
    for l, block in enumerate(spec.blocks):
        g_out = _Group("out", l, width=block.out_width) if block.out_gated else _Group("fixed", width=block.out_width)
        b = l if block.gated else None
        if block.alive:
            groups = [g_prev] + [_Group("unit", l, j, w) for j, w in enumerate(block.unit_widths)] + [g_out]
            for j, lay in enumerate(block.path):
                terms += layer(lay, groups[j], groups[j + 1], b, f"blocks.{l}.path.{j}")
            terms += add(block, g_out, b, f"blocks.{l}.add")
        if block.shortcut_layer is not None:
            terms += layer(block.shortcut_layer, g_prev, g_out, None, f"blocks.{l}.shortcut")
        if block.out_act:
            terms += act(block, g_out, f"blocks.{l}.out")
        g_prev = g_out
    for h, lay in enumerate(spec.head):
        g_next = _Group("fixed", width=lay.out_width)
        terms += layer(lay, g_prev, g_next, None, f"head.{h}")
        g_prev = g_next
    return terms


def _latency_layers(spec: NetworkSpec, lat: LatencyCosts) -> list[Term]:
    return _walk(
        spec,
        lambda lay, gi, go, b, label: _latency_terms(lat.layer(lay), gi, go, b, label),
        lambda block, go, b, label: _latency_terms(lat.elementwise("add", block), None, go, b, label),
        lambda block, go, label: _latency_terms(lat.elementwise("act", block), None, go, None, label),
    )


def compile_terms(
    spec: NetworkSpec, *, elementwise: bool = False, latency: LatencyCosts | None = None
) -> tuple[Term, ...]:
    """Expand ``E[F]`` [9] and ``E[P]`` [10] of ``spec`` into multilinear terms (see module doc).

    With ``latency`` the terms of the measured step time ``E[T]`` follow (``coef_t``; module doc).
    Raises ``AssertionError`` if a term held one gate group twice (it would not be multilinear).
    """
    terms = _flops_params_terms(spec, elementwise)
    if latency is not None:
        terms += _latency_layers(spec, latency)
    for t in terms:  # exactness of E[Π] = Π E: every factor of a term is a distinct, independent group
        gated = [g for g, _ in t.factors if g.kind != "fixed"]
        if len(gated) != len(set(gated)):
            raise AssertionError(f"term {t.label} holds a gate group twice")
    return tuple(terms)


def _flops_params_terms(spec: NetworkSpec, elementwise: bool) -> list[Term]:
    def positions(block: Any, go: _Group, b: int | None, label: str) -> list[Term]:
        # c_b (the addition of the branch into the skip path, inside ξ_B) and c_g (the output
        # activation, outside ξ_B): element-wise costs, one per position of the block's output
        return [Term(float(block.positions), 0.0, b, ((go, 0),), label)] if elementwise else []

    return _walk(
        spec,
        lambda lay, gi, go, b, label: _layer_terms(lay, gi, go, b, label, elementwise),
        positions,
        lambda block, go, label: positions(block, go, None, label),
    )


# --------------------------------------------------------------------------------------------------
# Gate validation and evaluation helpers (numpy or torch)
# --------------------------------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _check_unit_interval(x: Array, name: str) -> None:
    if _is_torch(x):
        lo, hi = float(x.detach().min()), float(x.detach().max())
    else:
        arr = np.asarray(x)
        if arr.dtype == object:  # symbolic gates (sympy symbols): no numeric range to check
            return
        arr = arr.astype(float)
        if arr.size == 0:
            return
        lo, hi = float(arr.min()), float(arr.max())
    if not (0.0 <= lo and hi <= 1.0) or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:g}, {hi:g}]")


def _last_dim(x: Array) -> int:
    return int(x.shape[-1]) if getattr(x, "ndim", 0) else -1


def validate_gates(spec: NetworkSpec, gates: Gates | None) -> None:
    """Raise ``ValueError`` naming the offending entry if ``gates`` does not fit ``spec``."""
    if gates is None:
        return
    if len(gates) != len(spec.blocks):
        raise ValueError(f"gates must have one entry per block ({len(spec.blocks)}), got {len(gates)}")
    for l, (g, block) in enumerate(zip(gates, spec.blocks)):
        if not isinstance(g, BlockGates):
            raise ValueError(f"gates[{l}] must be a BlockGates, got {type(g).__name__}")
        if g.theta_B is not None:
            if not (block.gated and block.alive):
                raise ValueError(f"gates[{l}].theta_B must be None: block {l} has no block gate")
            _check_unit_interval(g.theta_B, f"gates[{l}].theta_B")
        if g.theta_1 is not None:
            if len(g.theta_1) != block.M:
                raise ValueError(f"gates[{l}].theta_1 must hold M={block.M} vectors, got {len(g.theta_1)}")
            for j, (t, n) in enumerate(zip(g.theta_1, block.unit_widths)):
                if t is None:
                    continue
                if _last_dim(t) != n:
                    raise ValueError(f"gates[{l}].theta_1[{j}] must have length {n}, got shape {tuple(t.shape)}")
                _check_unit_interval(t, f"gates[{l}].theta_1[{j}]")
        if g.theta_2 is not None:
            if not block.out_gated:
                raise ValueError(f"gates[{l}].theta_2 must be None: block {l} has no output gates")
            if _last_dim(g.theta_2) != block.out_width:
                raise ValueError(
                    f"gates[{l}].theta_2 must have length {block.out_width}, got shape {tuple(g.theta_2.shape)}"
                )
            _check_unit_interval(g.theta_2, f"gates[{l}].theta_2")


def _group_vector(gates: Gates | None, g: _Group) -> Array | None:
    if gates is None or g.kind == "fixed":
        return None
    bg = gates[g.block]
    if g.kind == "unit":
        return None if bg.theta_1 is None else bg.theta_1[g.index]
    return bg.theta_2


def _group_value(gates: Gates | None, g: _Group) -> Any:
    """``|θ_g|₁`` (``E`` of the active width) or the fixed width."""
    vec = _group_vector(gates, g)
    return g.width if vec is None else vec.sum(-1)


def _block_value(gates: Gates | None, block: int | None) -> Any:
    if block is None or gates is None or gates[block].theta_B is None:
        return 1.0
    return gates[block].theta_B


def _term_value(gates: Gates | None, term: Term) -> Any:
    value: Any = _block_value(gates, term.block)
    for g, offset in term.factors:
        value = value * (_group_value(gates, g) + offset)
    return value


# --------------------------------------------------------------------------------------------------
# Public model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coefficients:
    """``(α_f, α_p, β)`` of [11], from the user parameters by [13] (see :func:`reparametrize`)."""

    alpha_f: float
    alpha_p: float
    beta: float
    alpha_t: float = 0.0  # price of one second of measured latency E[T] (cost = "latency"); 0 otherwise

    def __post_init__(self) -> None:
        for name in ("alpha_f", "alpha_p", "beta", "alpha_t"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Coefficients.{name} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class GateGrads:
    """Gradients of ``C`` per block, laid out like :class:`BlockGates`.

    ``theta_B`` is ``γ_B^l = ∂C/∂θ_B^l``; ``gamma_1[j]`` is ``γ_1^{l,j}`` of
    [12] (a scalar per inner layer: every unit of a layer shares it), so that
    ``∂C/∂θ_1,i = θ_B · γ_1``; ``theta_1`` holds those full gradients as
    vectors (``None`` for ungated layers); ``theta_2`` the gradient for
    output gates (``None`` if the block has none passed).
    """

    theta_B: Any
    gamma_1: tuple[Any, ...]
    theta_1: tuple[Any, ...]
    theta_2: Any


class ComplexityModel:
    """Expected FLOPs [9], parameters [10] and complexity [11] of one :class:`NetworkSpec`.

    ``gates=None`` everywhere means "all gates 1", the deterministic network
    described by the spec itself: ``model.flops()`` is its (baseline) FLOPs.
    Every method validates the gates against the spec (:func:`validate_gates`);
    ``check=False`` skips that in hot loops whose gates were validated once
    (on an accelerator the range check reads values back and forces a sync).
    """

    def __init__(self, spec: NetworkSpec, *, elementwise: bool = False, latency: LatencyCosts | None = None) -> None:
        if not isinstance(spec, NetworkSpec):
            raise ValueError(f"spec must be a NetworkSpec, got {type(spec).__name__}")
        self.spec = spec
        self.elementwise = elementwise
        self.latency_costs = latency
        self.terms = compile_terms(spec, elementwise=elementwise, latency=latency)

    # -- expectations ---------------------------------------------------------------------------
    def flops(self, gates: Gates | None = None, *, check: bool = True) -> Any:
        """``Σ_l E[F_l] + F_0 + F_{L+1}``, eq. [9] (multiply–accumulates)."""
        if check:
            validate_gates(self.spec, gates)
        return self._sum(gates, "f")

    def params(self, gates: Gates | None = None, *, check: bool = True) -> Any:
        """``Σ_l E[P_l] + P_0 + P_{L+1}``, eq. [10]."""
        if check:
            validate_gates(self.spec, gates)
        return self._sum(gates, "p")

    def latency(self, gates: Gates | None = None, *, check: bool = True) -> Any:
        """``E[T]``: expected measured step time in seconds (module doc; needs ``latency=`` costs)."""
        if self.latency_costs is None:
            raise ValueError("this ComplexityModel was built without a latency model (latency=None)")
        if check:
            validate_gates(self.spec, gates)
        return self._sum(gates, "t")

    def _sum(self, gates: Gates | None, which: str) -> Any:
        total: Any = 0.0
        for t in self.terms:
            coef = {"f": t.coef_f, "p": t.coef_p, "t": t.coef_t}[which]
            if coef:
                total = total + coef * _term_value(gates, t)
        return total

    def per_layer(self, gates: Gates | None = None, *, check: bool = True) -> dict[str, tuple[float, float]]:
        """``{layer label: (E[F], E[P])}``, in network order (paper, Figure 2)."""
        if check:
            validate_gates(self.spec, gates)
        out: dict[str, list[float]] = {}
        for t in self.terms:
            v = float(_term_value(gates, t))
            acc = out.setdefault(t.label, [0.0, 0.0])
            acc[0] += t.coef_f * v
            acc[1] += t.coef_p * v
        return {k: (v[0], v[1]) for k, v in out.items()}

    # -- combined complexity and its gradient ---------------------------------------------------
    def complexity(self, gates: Gates | None, coeffs: Coefficients, *, check: bool = True) -> Any:
        """``C(Θ) = Σ_l [α_f E[F_l] + α_p E[P_l] + β θ_B^l]``, eq. [11] (constants included; ``+ α_t E[T_l]``
        with a latency model, module doc)."""
        if check:
            validate_gates(self.spec, gates)
        total: Any = 0.0
        for t in self.terms:
            w = coeffs.alpha_f * t.coef_f + coeffs.alpha_p * t.coef_p + coeffs.alpha_t * t.coef_t
            if w:
                total = total + w * _term_value(gates, t)
        if coeffs.beta:
            for l, block in enumerate(self.spec.blocks):
                if block.gated and block.alive:
                    total = total + coeffs.beta * _block_value(gates, l)
        return total

    def grad(self, gates: Gates | None, coeffs: Coefficients, *, check: bool = True) -> list[GateGrads]:
        """Analytic ``∇_Θ C``: ``γ_B = ∂C/∂θ_B`` and ``γ_1`` with ``∂C/∂θ_1,i = θ_B γ_1``, eqs. [12], [18].

        For a gate group ``g`` the derivative of a term is the product of its
        other factors (each factor is affine in ``|θ_g|₁`` and no term holds a
        group twice), so all units of a group share one coefficient.
        """
        if check:
            validate_gates(self.spec, gates)
        n_blocks = len(self.spec.blocks)
        dB: list[Any] = [0.0] * n_blocks
        dU: list[list[Any]] = [[0.0] * b.M for b in self.spec.blocks]  # γ_1 (without θ_B)
        dU_full: list[list[Any]] = [[0.0] * b.M for b in self.spec.blocks]
        dO: list[Any] = [0.0] * n_blocks
        for t in self.terms:
            w = coeffs.alpha_f * t.coef_f + coeffs.alpha_p * t.coef_p + coeffs.alpha_t * t.coef_t
            if not w:
                continue
            values = [_group_value(gates, g) + o for g, o in t.factors]
            if t.block is not None:
                prod: Any = w
                for v in values:
                    prod = prod * v
                dB[t.block] = dB[t.block] + prod
            theta_B = _block_value(gates, t.block)
            for k, (g, _) in enumerate(t.factors):
                if g.kind == "fixed":
                    continue
                other: Any = w
                for kk, v in enumerate(values):
                    if kk != k:
                        other = other * v
                if g.kind == "unit":
                    dU[g.block][g.index] = dU[g.block][g.index] + other
                    dU_full[g.block][g.index] = dU_full[g.block][g.index] + other * theta_B
                else:
                    dO[g.block] = dO[g.block] + other * theta_B
        grads: list[GateGrads] = []
        for l, block in enumerate(self.spec.blocks):
            bg = gates[l] if gates is not None else BlockGates()
            gB = dB[l] + coeffs.beta if (block.gated and block.alive) else None
            vec1 = tuple(
                _broadcast(dU_full[l][j], None if bg.theta_1 is None else bg.theta_1[j]) for j in range(block.M)
            )
            vec2 = _broadcast(dO[l], bg.theta_2)
            grads.append(GateGrads(gB, tuple(dU[l]), vec1, vec2))
        return grads

    # -- compiled evaluation (hot loops) --------------------------------------------------------
    def compile(
        self, coeffs: Coefficients | None = None, what: str | Sequence[str] | None = None
    ) -> CompiledComplexity:
        """A :class:`CompiledComplexity`: the same terms evaluated in a few array operations per call.

        ``what``: ``"complexity"`` (``C(Θ)`` [11] with ``coeffs``), ``"flops"`` (``E[F]`` [9]),
        ``"params"`` (``E[P]`` [10]) or a sequence of them (one tuple back per call); by default
        ``"complexity"`` when ``coeffs`` are given, else ``"flops"``.  ``model.compile(c)(gates)``
        equals ``model.complexity(gates, c, check=False)`` up to rounding (tested to 1e-12 in float64).
        """
        if what is None:
            what = "complexity" if coeffs is not None else "flops"
        return CompiledComplexity(self, coeffs, what)


# --------------------------------------------------------------------------------------------------
# Compiled evaluation: the same terms as a handful of array operations (the trainer's hot path)
# --------------------------------------------------------------------------------------------------

#: Quantities a :class:`CompiledComplexity` evaluates: ``C(Θ)`` [11], ``E[F]`` [9], ``E[P]`` [10].
QUANTITIES = ("complexity", "flops", "params", "latency")

_Layout = tuple[tuple[bool, tuple[bool, ...] | None, bool], ...]


@dataclass(frozen=True)
class _Plan:
    """The terms of one gate layout as arrays over ``ext = [0, |θ_g|₁ …, θ_B …]``.

    Row ``r`` is ``Π_k (ext[idx[r, k]] + off[r, k])``: a gated factor points at its group sum or
    block gate with the term's offset, padding is ``(0, 1)``.  Ungated factors (fixed widths, and
    ``θ_B = 1`` where the block gate is absent) are constants: they are multiplied into the row's
    weights, and rows with the same gated factors are merged; the all-constant row (``idx = 0``,
    ``off = 1``) carries the constant part.  ``seg[i]`` is the slot of the ``i``-th entry of the
    concatenation ``[θ vectors …, θ_B …]`` (a vector's entries all go to the slot of its sum).
    """

    seg: np.ndarray  # (Σ lengths + blocks,) int64
    idx: np.ndarray  # (rows, width) int64
    off: np.ndarray  # (rows, width) float64
    weights: np.ndarray  # (rows, k) float64: one column per requested quantity
    slots: int  # len(ext)
    constant: bool  # no row depends on a gate


class CompiledComplexity:
    """``C(Θ)``, ``E[F]`` and/or ``E[P]`` of one :class:`ComplexityModel` in a few array operations.

    Made by :meth:`ComplexityModel.compile`.  It evaluates *the same terms* (:func:`compile_terms`,
    held by the model) as :meth:`ComplexityModel.complexity`, ``flops`` and ``params`` — agreement
    to rounding is tested — but instead of a Python loop over every term each call does:

    1. one concatenation of every gate vector and block gate, one segment sum (``index_add``) into
       ``ext = [0, |θ_g|₁ …, θ_B …]``;
    2. one gather of ``ext`` per factor column (a term has at most three factors), offsets added,
       the columns multiplied;
    3. one matrix–vector product with the per-term coefficients (constants included).

    Works on torch tensors (differentiable: autograd gives ``∇_Θ C`` of [12]/[18]) and numpy arrays
    (object arrays too), with leading batch axes shared by all gates.  The plan depends only on
    which gates are present (``None`` entries); it is built once per layout and cached, and so are
    its torch constants per device and dtype.  ``check=True`` validates the gates
    (:func:`validate_gates`; off by default: this is the hot path and the range check reads every
    ``θ`` back to the host); ``dtype`` casts the gate values first (e.g. ``torch.float64`` for
    reported numbers).  Returns one value (``what`` a string) or a tuple in the order of ``what``;
    Python floats when no gate enters.  Torch is imported only when torch gates are passed.
    """

    def __init__(
        self, model: ComplexityModel, coeffs: Coefficients | None = None, what: str | Sequence[str] = "complexity"
    ) -> None:
        names = (what,) if isinstance(what, str) else tuple(what)
        if not names or any(n not in QUANTITIES for n in names):
            raise ValueError(f"what must name one or more of {', '.join(QUANTITIES)}; got {what!r}")
        if "complexity" in names and coeffs is None:
            raise ValueError("the complexity C(Θ) needs its Coefficients")
        self.model, self.coeffs, self.what = model, coeffs, names
        self._single = isinstance(what, str)
        self._plans: dict[_Layout, _Plan] = {}
        self._torch_consts: dict[tuple[_Layout, Any, Any], tuple[Any, ...]] = {}

    # -- plan -----------------------------------------------------------------------------------
    def _weights(self, t: Term) -> np.ndarray:
        coef = {"flops": t.coef_f, "params": t.coef_p, "latency": t.coef_t}
        if self.coeffs is not None:
            c = self.coeffs
            coef["complexity"] = c.alpha_f * t.coef_f + c.alpha_p * t.coef_p + c.alpha_t * t.coef_t
        return np.array([coef[n] for n in self.what], dtype=np.float64)

    def _plan(self, layout: _Layout) -> _Plan:
        spec = self.model.spec
        slot: dict[tuple[str, int, int], int] = {}
        seg: list[int] = []
        for l, (_, units, out) in enumerate(layout):
            for j, present in enumerate(units or ()):
                if present:
                    slot["unit", l, j] = 1 + len(slot)
                    seg += [slot["unit", l, j]] * spec.blocks[l].unit_widths[j]
            if out:
                slot["out", l, 0] = 1 + len(slot)
                seg += [slot["out", l, 0]] * spec.blocks[l].out_width
        for l, (has_B, _, _) in enumerate(layout):
            if has_B:
                slot["block", l, 0] = 1 + len(slot)
                seg.append(slot["block", l, 0])
        rows: dict[tuple[tuple[int, float], ...], np.ndarray] = {}

        def add(factors: list[tuple[int, float]], w: np.ndarray) -> None:
            key = tuple(sorted(f for f in factors if f[0]))
            fixed = math.prod(o for s, o in factors if not s)
            rows[key] = rows.get(key, np.zeros(len(self.what))) + w * fixed

        for t in self.model.terms:
            w = self._weights(t)
            if not w.any():
                continue
            s_B = slot.get(("block", t.block, 0), 0) if t.block is not None else 0
            factors = [(s_B, 0.0 if s_B else 1.0)]
            for g, o in t.factors:
                s = slot.get((g.kind, g.block, g.index), 0) if g.kind != "fixed" else 0
                factors.append((s, float(o) if s else float(g.width + o)))
            add(factors, w)
        if "complexity" in self.what and self.coeffs is not None and self.coeffs.beta:
            col = np.array([self.coeffs.beta if n == "complexity" else 0.0 for n in self.what])
            for l, block in enumerate(spec.blocks):
                if block.gated and block.alive:  # β θ_B^l (β alone where the block gate is fixed at 1)
                    s = slot.get(("block", l, 0), 0)
                    add([(s, 0.0 if s else 1.0)], col)
        keys = list(rows) or [()]
        width = max(1, *(len(key) for key in keys))
        idx = np.array([[s for s, _ in key] + [0] * (width - len(key)) for key in keys], dtype=np.int64)
        off = np.array([[o for _, o in key] + [1.0] * (width - len(key)) for key in keys], dtype=np.float64)
        weights = np.array([rows.get(key, np.zeros(len(self.what))) for key in keys], dtype=np.float64)
        return _Plan(np.array(seg, dtype=np.int64), idx, off, weights, 1 + len(slot), keys == [()])

    # -- evaluation -----------------------------------------------------------------------------
    def __call__(self, gates: Gates | None, *, check: bool = False, dtype: Any = None) -> Any:
        if check:
            validate_gates(self.model.spec, gates)
        values: list[Array] = []
        layout = []
        blocks: list[Array] = []
        for bg in gates if gates is not None else [BlockGates() for _ in self.model.spec.blocks]:
            if bg.theta_1 is not None:
                values.extend(t for t in bg.theta_1 if t is not None)
            if bg.theta_2 is not None:
                values.append(bg.theta_2)
            if bg.theta_B is not None:
                blocks.append(bg.theta_B)
            layout.append((bg.theta_B is not None,
                           None if bg.theta_1 is None else tuple(t is not None for t in bg.theta_1),
                           bg.theta_2 is not None))
        key = tuple(layout)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(key)
        if plan.constant or not (values or blocks):
            out = tuple(float(v) for v in plan.weights.sum(0))
        elif _is_torch((values or blocks)[0]):
            out = self._torch(key, plan, values, blocks, dtype)
        else:
            out = self._numpy(plan, values, blocks, dtype)
        return out[0] if self._single else out

    def _numpy(self, plan: _Plan, vecs: list[Array], blocks: list[Array], dtype: Any) -> tuple[Any, ...]:
        vecs = [np.asarray(v, dtype=dtype) for v in vecs]
        blocks = [np.asarray(b, dtype=dtype) for b in blocks]
        batch = np.broadcast_shapes(*[v.shape[:-1] for v in vecs], *[b.shape for b in blocks])
        flat = np.concatenate([np.broadcast_to(v, batch + v.shape[-1:]) for v in vecs]
                              + [np.broadcast_to(b, batch)[..., None] for b in blocks], -1)
        ext = np.zeros((plan.slots,) + batch, dtype=flat.dtype)
        np.add.at(ext, plan.seg, np.moveaxis(flat, -1, 0))  # the segment sum (object arrays too)
        ext = np.moveaxis(ext, 0, -1)
        vals = (np.take(ext, plan.idx, axis=-1) + plan.off).prod(-1)
        out = vals @ plan.weights
        return tuple(out[..., i][()] for i in range(out.shape[-1]))  # [()]: a scalar when unbatched

    def _torch(self, key: _Layout, plan: _Plan, vecs: list[Array], blocks: list[Array], dtype: Any) -> tuple[Any, ...]:
        import torch  # only reached with torch gates: theory/ itself never imports torch

        ref = (vecs or blocks)[0]
        dt = ref.dtype if dtype is None else dtype
        consts = self._torch_consts.get((key, ref.device, dt))
        if consts is None:
            k = len(self.what)
            consts = (
                torch.as_tensor(plan.seg, dtype=torch.long, device=ref.device),
                [torch.as_tensor(plan.idx[:, c].copy(), dtype=torch.long, device=ref.device)
                 for c in range(plan.idx.shape[1])],
                [torch.as_tensor(plan.off[:, c].copy(), dtype=dt, device=ref.device) for c in range(plan.off.shape[1])],
                torch.as_tensor(plan.weights[:, 0] if k == 1 else plan.weights, dtype=dt, device=ref.device),
            )
            self._torch_consts[(key, ref.device, dt)] = consts
        seg, idx, off, weights = consts
        batch = ref.shape[:-1] if vecs else ref.shape
        parts = list(vecs)
        if blocks:
            parts.append(torch.stack(blocks, -1))
        flat = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        if flat.dtype != dt:
            flat = flat.to(dt)
        ext = flat.new_zeros(batch + (plan.slots,)).index_add(-1, seg, flat)
        vals = ext.index_select(-1, idx[0]) + off[0]
        for i, o in zip(idx[1:], off[1:]):  # the factor columns, multiplied (cheaper to differentiate than prod)
            vals = vals * (ext.index_select(-1, i) + o)
        out = vals @ weights
        return (out,) if len(self.what) == 1 else tuple(out.unbind(-1))


def _broadcast(scalar: Any, like: Array | None) -> Any:
    """A per-group scalar spread over the group's gates (numpy or torch, batch axes kept); None if ungated."""
    if like is None:
        return None
    ones = like * 0 + 1
    if getattr(scalar, "ndim", 0):
        return scalar[..., None] * ones
    return scalar * ones


# --------------------------------------------------------------------------------------------------
# [13]: user parameters -> coefficients
# --------------------------------------------------------------------------------------------------


def reparametrize(
    gamma: float,
    rho: float,
    delta: float,
    *,
    N: int,
    F_tot: float,
    P_tot: float,
    L_b: int,
) -> Coefficients:
    """``α_f = γ ρ N L_b / F_tot``, ``α_p = γ (1 − ρ) N L_b / P_tot``, ``β = γ δ N``, eq. [13].

    ``γ > 0`` is the pruning level (price of one average block's cost in units
    of per-sample loss), ``ρ ∈ [0, 1]`` the FLOPs share, ``δ ≥ 0`` the layer
    emphasis, ``N`` the number of training samples, ``F_tot``/``P_tot`` the
    baseline totals and ``L_b`` the number of prunable blocks.
    """
    checks = {
        "gamma": (gamma, lambda v: v > 0, "must be > 0"),
        "rho": (rho, lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        "delta": (delta, lambda v: v >= 0, "must be >= 0"),
        "N": (N, lambda v: v >= 1, "must be a positive sample count"),
        "F_tot": (F_tot, lambda v: v > 0, "must be > 0"),
        "P_tot": (P_tot, lambda v: v > 0, "must be > 0"),
        "L_b": (L_b, lambda v: v >= 1, "must be >= 1 (the network has no prunable block)"),
    }
    for name, (value, ok, msg) in checks.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} {msg}, got {value!r}")
    return Coefficients(
        alpha_f=gamma * rho * N * L_b / F_tot,
        alpha_p=gamma * (1.0 - rho) * N * L_b / P_tot,
        beta=gamma * delta * N,
    )


def coefficients_for(
    spec: NetworkSpec, gamma: float, rho: float, delta: float, *, N: int, elementwise: bool = False
) -> Coefficients:
    """[13] with ``F_tot``, ``P_tot``, ``L_b`` read off the baseline ``spec``."""
    model = ComplexityModel(spec, elementwise=elementwise)
    return reparametrize(
        gamma, rho, delta, N=N, F_tot=float(model.flops()), P_tot=float(model.params()), L_b=spec.prunable_blocks
    )


def latency_coefficients(gamma: float, delta: float, *, N: int, T_tot: float, L_b: int) -> Coefficients:
    """[13] for the latency cost: ``α_t = γ N L_b / T_tot``, ``β = γ δ N`` (``α_f = α_p = 0``; ``ρ`` has no role).

    ``T_tot`` is the baseline's ``E[T]`` (all gates 1), so that ``γ`` keeps the meaning of [13]:
    the per-sample loss paid for one average block's share of the baseline cost (module doc).
    """
    base = reparametrize(gamma, 0.5, delta, N=N, F_tot=1.0, P_tot=1.0, L_b=L_b)  # validates γ, δ, N, L_b
    if isinstance(T_tot, bool) or not isinstance(T_tot, (int, float)) or not (math.isfinite(T_tot) and T_tot > 0):
        raise ValueError(f"T_tot must be > 0, got {T_tot!r}")
    return Coefficients(0.0, 0.0, base.beta, alpha_t=gamma * N * L_b / T_tot)


def latency_coefficients_for(
    spec: NetworkSpec, gamma: float, delta: float, *, N: int, latency: LatencyCosts
) -> Coefficients:
    """:func:`latency_coefficients` with ``T_tot`` and ``L_b`` read off the baseline ``spec``."""
    model = ComplexityModel(spec, latency=latency)
    return latency_coefficients(gamma, delta, N=N, T_tot=float(model.latency()), L_b=spec.prunable_blocks)


def ones_gates(spec: NetworkSpec, *, block: bool = True, units: bool = True, outputs: bool = True) -> list[BlockGates]:
    """All-ones gate vectors (numpy) for every gate ``spec`` carries; ``False`` leaves a kind ungated."""
    out = []
    for b in spec.blocks:
        tb = np.array(1.0) if (block and b.gated and b.alive) else None
        t1 = tuple(np.ones(n) for n in b.unit_widths) if (units and b.alive) else None
        t2 = np.ones(b.out_width) if (outputs and b.out_gated) else None
        out.append(BlockGates(tb, t1, t2))
    return out


__all__ = [
    "QUANTITIES",
    "Block",
    "BlockGates",
    "Coefficients",
    "CompiledComplexity",
    "ComplexityModel",
    "GateGrads",
    "Gates",
    "Layer",
    "NetworkSpec",
    "Term",
    "coefficients_for",
    "compile_terms",
    "latency_coefficients",
    "latency_coefficients_for",
    "ones_gates",
    "reparametrize",
    "validate_gates",
]
