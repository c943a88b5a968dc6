"""Theorem 3.1 checks (THEORY §4): deterministic optima of ``L(W, ·)`` on the hypercube ``H``.

For fixed weights ``W`` the objective ``L(W, Θ) = E(W, Θ) + (λ/2)||W||² + C(Θ)``
of [2.2] is multilinear on ``H = [0,1]^K`` (``E`` is an expectation over
independent Bernoulli gates, ``C`` of [11] a sum of products of distinct
gates), hence every local minimum has the value of a vertex.  Each check below
draws random small gated residual MLPs (:func:`random_instance`: 1–3 blocks ×
1–3 units, random data, weights, losses, gate modes and ``(γ, ρ, δ)`` of
[13]), evaluates the *exact* objective of :mod:`theory.objective` and tests
one consequence:

* ``determinism.multilinear`` — (a): ``∂²L/∂θ_j² ≡ 0`` for every ``j``,
  symbolically (:mod:`theory.symbolic`, exact rational arithmetic), for ``L``
  with the instance's numeric mask losses and for ``E`` with one symbol per
  mask loss;
* ``determinism.affine-coordinate`` — (b): along every coordinate ``L`` is
  affine, and its slope is the analytic ``∂L/∂θ_j`` ([19]–[21] + [12]);
* ``determinism.vertex-min`` — (c): L-BFGS-B from several random starts in
  ``H`` never beats the best vertex;
* ``determinism.rounding`` — (d): coordinate-wise rounding to the better of
  0/1 never increases ``L`` and ends at a vertex with ``L(vertex) ≤ L(Θ)``;
* ``determinism.gradient-flow`` — (e): projected gradient flow ([22] with
  ``W`` frozen, Euler steps ``Θ ← Π_H(Θ − η∇L)``) from a generic start ends at
  a vertex or on a flat face (``L`` equal at every vertex of the face spanned
  by the non-integral coordinates);
* ``determinism.faces`` — the layer-only (``θ_1 ≡ 1``) and unit-only
  (``θ_B ≡ 1``) objectives are faces of the full one.

Violations are relative: ``|Δ| / max_vertex |L|`` (float64).  Every ``run_*``
function accepts ``perturb`` — a function of the flat ``θ`` (index it as
``theta[..., j]``; it receives numpy arrays and arrays of sympy ring elements)
whose value is added to ``L``, optionally with a ``grad(theta)`` attribute — so that tests can show the checks fail on a
non-multilinear objective (negative controls).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

from .architectures import residual_mlp
from .checks import CheckResult, register
from .complexity import coefficients_for, latency_coefficients_for
from .latency import LatencyCosts, elementwise_key, layer_key
from .objective import (
    ExactObjective,
    GateLayout,
    LossKind,
    OutActivation,
    Weights,
    cost_spec,
    mask_matrix,
    mask_probabilities,
)
from .projection import project, projected_field
from .spec import NetworkSpec

Perturbation = Callable[[Any], Any]
Progress = Callable[[], None]

#: Relative tolerances (float64) of the numerical checks.
TOL_AFFINE = 1e-10
TOL_VERTEX = 1e-9
TOL_ROUNDING = 1e-10
TOL_FLAT = 1e-8
TOL_FACES = 1e-12
#: Gate budget of random instances (2^K masks are enumerated); the symbolic check uses fewer.
MAX_INSTANCE_GATES = 10
MAX_SYMBOLIC_GATES = 7


# --------------------------------------------------------------------------------------------------
# Random instances
# --------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One random problem ``L(W, ·)`` with ``W`` frozen: the exact objective plus cached mask losses.

    ``L``/``grad`` evaluate the objective of :class:`ExactObjective` (``E`` as
    ``P(Θ) @ mask_losses``, ``C`` through :class:`ComplexityModel`) plus the
    optional ``perturb`` (whose gradient is taken by central differences).
    """

    objective: ExactObjective
    weights: Weights
    mode: str
    perturb: Perturbation | None = None
    mask_losses: np.ndarray = field(init=False)
    weight_decay: float = field(init=False)
    _vertices: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.mask_losses = np.asarray(self.objective.mask_losses(self.weights), dtype=float)
        self.weight_decay = 0.5 * self.objective.lam * float(self.weights.sq_norm())

    @property
    def K(self) -> int:
        return self.objective.K

    def with_perturbation(self, perturb: Perturbation | None) -> Instance:
        """The same problem with another perturbation (vertex values recomputed)."""
        return Instance(self.objective, self.weights, self.mode, perturb)

    def L(self, theta: np.ndarray) -> Any:
        """``L(W, Θ)`` for ``theta`` of shape ``batch + (K,)``."""
        theta = np.asarray(theta, dtype=float)
        obj = self.objective
        E = mask_probabilities(theta, obj.masks) @ self.mask_losses
        C = obj.model.complexity(obj.layout.unflatten(theta), obj.coeffs)
        out = E + C + self.weight_decay
        if self.perturb is not None:
            out = out + self.perturb(theta)
        return out

    def grad(self, theta: np.ndarray) -> np.ndarray:
        """Analytic ``∂L/∂Θ`` ([19]–[21] + [12]/[18]); the perturbation's by its ``grad`` attribute if it has
        one, else by central differences."""
        theta = np.asarray(theta, dtype=float)
        g = np.asarray(self.objective.grad_expected_loss(None, theta, self.mask_losses), dtype=float)
        g = g + np.asarray(self.objective.grad_complexity(theta), dtype=float)
        if self.perturb is not None:
            exact = getattr(self.perturb, "grad", None)
            if exact is not None:
                g = g + np.asarray(exact(theta), dtype=float)
            else:
                h = 1e-6
                eye = np.eye(self.K)
                g = g + (self.perturb(theta + h * eye) - self.perturb(theta - h * eye)) / (2 * h)
        return g

    def vertex_values(self) -> np.ndarray:
        """``L`` at all ``2^K`` vertices, in :func:`mask_matrix` order.

        At a vertex ``Θ = ξ_k`` the gate distribution is a point mass, so the
        data term is the mask loss itself (no ``2^K × 2^K`` probability table).
        """
        if self._vertices is None:
            obj = self.objective
            V = mask_matrix(self.K).astype(float)
            out = self.mask_losses + np.asarray(obj.model.complexity(obj.layout.unflatten(V), obj.coeffs)) + (
                self.weight_decay
            )
            if self.perturb is not None:
                out = out + self.perturb(V)
            self._vertices = np.asarray(out, dtype=float)
        return self._vertices

    @property
    def scale(self) -> float:
        """``max_vertex |L|``: the denominator of every relative violation."""
        return float(max(np.abs(self.vertex_values()).max(), 1e-300))

    def describe(self) -> str:
        obj = self.objective
        hidden = [b.unit_widths[0] for b in obj.spec.blocks]
        return (
            f"m={obj.spec.head[0].in_width} hidden={hidden} classes={obj.spec.num_classes} N={obj.N} K={self.K} "
            f"mode={self.mode} loss={obj.loss} g={obj.g}"
        )


def random_instance(
    rng: np.random.Generator,
    *,
    max_blocks: int = 3,
    max_units: int = 3,
    max_gates: int = MAX_INSTANCE_GATES,
    max_samples: int = 5,
    perturb: Perturbation | None = None,
    cost: str = "flops-params",
) -> Instance:
    """A random gated residual MLP of 1–``max_blocks`` blocks × 1–``max_units`` units with data and weights.

    Input width and classes 1–3, ``N`` 1–``max_samples``, squared or
    cross-entropy loss, ``g`` tanh or identity, weights ``N(0, s²/fan_in)``
    with ``s ∈ [0.5, 3]``, ``λ`` 0 or in ``[0, 0.5]``, coefficients from
    [13] with ``γ ∈ [1e-3, 2]`` (log-uniform), ``ρ ∈ [0, 1]``, ``δ`` 0 or in
    ``[0, 1]``.  Gate modes: full, layer-only (``θ_1`` fixed at 1), unit-only
    (``θ_B`` fixed at 1) or a random mixture; output gates ``θ_2`` on about
    a third of the networks; at most ``max_gates`` free gates.  ``cost="latency"``: the complexity is
    a random measured-latency model (:func:`random_latency_costs`) priced by
    :func:`theory.complexity.latency_coefficients_for` instead of [9]/[10].
    """
    if max_gates < 1:
        raise ValueError(f"max_gates must be >= 1, got {max_gates}")
    L = int(rng.integers(1, max_blocks + 1))
    hidden = [int(h) for h in rng.integers(1, max_units + 1, L)]
    m = int(rng.integers(1, 4))
    classes = int(rng.integers(1, 4))
    out_gated = bool(rng.random() < 0.35)
    spec = residual_mlp(m, hidden, classes, out_gated=out_gated)
    mode = str(rng.choice(["full", "layer-only", "unit-only", "mixed"]))
    block = [mode != "unit-only"] * L
    units = [mode != "layer-only"] * L
    outputs = [out_gated] * L
    if mode == "mixed":
        block = list(rng.random(L) < 0.7)
        units = list(rng.random(L) < 0.7)
        outputs = [out_gated and bool(rng.random() < 0.7) for _ in range(L)]

    def count() -> int:
        return sum(int(b) + h * int(u) + m * int(o) for b, u, o, h in zip(block, units, outputs, hidden))

    for flags in (outputs, units, block):  # shed gates until the budget fits: outputs, then units, then blocks
        for l in rng.permutation(L):
            if count() > max_gates:
                flags[l] = False
    if count() == 0:
        block[0] = True
    layout = GateLayout(spec, tuple(bool(b) for b in block), tuple(bool(u) for u in units), tuple(outputs))
    N = int(rng.integers(1, max_samples + 1))
    X = rng.normal(0.0, 1.0, (N, m))
    loss: LossKind = "squared" if rng.random() < 0.5 else "cross_entropy"
    Y: np.ndarray = rng.normal(0.0, 1.0, (N, classes)) if loss == "squared" else rng.integers(0, classes, N)
    g: OutActivation = "tanh" if rng.random() < 0.5 else "identity"
    gamma = float(10 ** rng.uniform(-3.0, np.log10(2.0)))
    rho = float(rng.uniform())
    delta = 0.0 if rng.random() < 0.3 else float(rng.uniform())
    latency = None
    if cost == "latency":
        latency = random_latency_costs(rng, cost_spec(spec, g))
        coeffs = latency_coefficients_for(spec, gamma, delta, N=N, latency=latency)
    elif cost == "flops-params":
        coeffs = coefficients_for(spec, gamma, rho, delta, N=N)
    else:
        raise ValueError(f"cost must be 'flops-params' or 'latency', got {cost!r}")
    lam = 0.0 if rng.random() < 0.3 else float(rng.uniform(0.0, 0.5))
    obj = ExactObjective(spec, X, Y, loss=loss, g=g, lam=lam, coeffs=coeffs, layout=layout, latency=latency)
    weights = Weights.random(spec, rng, scale=float(rng.uniform(0.5, 3.0)))
    return Instance(obj, weights, mode, perturb)


def random_latency_costs(rng: np.random.Generator, spec: NetworkSpec) -> LatencyCosts:
    """A random latency model (:mod:`theory.latency`) covering ``spec``: ``a, b, c, d`` uniform in
    ``[0, 1]``, each zero with probability 1/4 (the ``cost="latency"`` instances of every check)."""
    keys = [layer_key(layer) for layer in (*spec.stem, *spec.head)]
    for b in spec.blocks:
        keys += [layer_key(layer) for layer in b.path]
        keys += [elementwise_key("add", b), elementwise_key("act", b)]
        if b.shortcut_layer is not None:
            keys.append(layer_key(b.shortcut_layer))
    coef = {}
    for k in keys:
        v = rng.uniform(0.0, 1.0, 4) * (rng.random(4) >= 0.25)
        coef[k] = (float(v[0]), float(v[1]), float(v[2]), float(v[3]))
    return LatencyCosts("train", coef, "random")


def _noop() -> None:
    return None


def _summary(res: CheckResult, started: float, Ks: list[int], modes: list[str]) -> CheckResult:
    res.details.setdefault("seconds", round(time.perf_counter() - started, 3))
    if Ks:
        res.details.setdefault("K_range", [int(min(Ks)), int(max(Ks))])
        res.details.setdefault("modes", {m: modes.count(m) for m in sorted(set(modes))})
    return res


# --------------------------------------------------------------------------------------------------
# (a) multilinearity, symbolically
# --------------------------------------------------------------------------------------------------


def run_multilinear(
    rng: np.random.Generator,
    instances: int,
    progress: Progress = _noop,
    *,
    perturb: Perturbation | None = None,
    cost: str = "flops-params",
    max_gates: int = MAX_SYMBOLIC_GATES,
) -> CheckResult:
    """Theorem 3.1 (a): ``∂²L/∂θ_j² ≡ 0`` for every ``j``, decided exactly with sympy.

    Per instance: ``L(W, ·)`` as an exact polynomial (:func:`theory.symbolic.symbolic_objective`,
    plus ``perturb``), its pure second derivatives must vanish identically;
    the symbolic ``E = Σ_ξ P(ξ|Θ) ℓ_ξ`` with free symbols ``ℓ_ξ`` must be
    multilinear too; and the polynomial must agree with the numeric objective
    at a random point (relative 1e-9) so that the proof is about the function
    the other checks evaluate.
    """
    import sympy as sp

    from .symbolic import multilinearity_defect, symbolic_expected_loss, symbolic_objective

    started = time.perf_counter()
    failures, worst, worst_eval = 0, 0.0, 0.0
    Ks: list[int] = []
    modes: list[str] = []
    for _ in range(instances):
        inst = random_instance(rng, max_gates=max_gates, perturb=perturb, cost=cost)
        Ks.append(inst.K)
        modes.append(inst.mode)
        poly, gens = symbolic_objective(inst.objective, inst.weights)
        if perturb is not None:
            gens_arr = np.empty(len(gens), dtype=object)
            gens_arr[:] = gens
            poly = poly + perturb(gens_arr)
        defect = multilinearity_defect(poly, gens) / inst.scale
        E_sym, th, _ = symbolic_expected_loss(inst.objective.layout)
        defect = max(defect, multilinearity_defect(E_sym, th))
        x = rng.uniform(0.0, 1.0, inst.K)
        value = float(poly(*[sp.Rational(float(v)) for v in x])) if inst.K > 1 else float(poly(sp.Rational(x[0])))
        mismatch = abs(value - float(inst.L(x))) / inst.scale
        worst_eval = max(worst_eval, mismatch)
        worst = max(worst, defect)
        if defect > 0.0 or mismatch > 1e-9:
            failures += 1
        progress()
    res = CheckResult(
        "determinism.multilinear",
        instances,
        failures,
        worst,
        tolerance=0.0,
        metric="max_j max|coeff of ∂²L/∂θ_j²| / max_vertex|L| (exact rational arithmetic; must be 0)",
        description="Theorem 3.1 (a): L(W,·) and E are multilinear in every gate (sympy, exact)",
        details={"max_eval_mismatch": worst_eval},
    )
    return _summary(res, started, Ks, modes)


# --------------------------------------------------------------------------------------------------
# (b) affine along every coordinate, slope = analytic gradient
# --------------------------------------------------------------------------------------------------


def run_affine(
    rng: np.random.Generator,
    instances: int,
    progress: Progress = _noop,
    *,
    perturb: Perturbation | None = None,
    cost: str = "flops-params",
    max_gates: int = MAX_INSTANCE_GATES,
    points: int = 4,
) -> CheckResult:
    """Theorem 3.1 (b): ``t ↦ L(θ_j = t)`` is affine on ``[0, 1]`` for every ``j``, with slope ``∂L/∂θ_j``.

    At a random ``Θ ∈ H`` and for every coordinate, ``L`` at ``points``
    random ``t`` must equal ``(1 − t) L(0) + t L(1)``, and the analytic
    gradient (difference of conditional expectations [19]–[21] plus
    ``γ`` of [12]) must equal ``L(1) − L(0)``.
    """
    started = time.perf_counter()
    failures, worst, worst_slope = 0, 0.0, 0.0
    Ks: list[int] = []
    modes: list[str] = []
    for _ in range(instances):
        inst = random_instance(rng, max_gates=max_gates, perturb=perturb, cost=cost)
        K = inst.K
        Ks.append(K)
        modes.append(inst.mode)
        theta = rng.uniform(0.0, 1.0, K)
        ts = np.concatenate([[0.0, 1.0], rng.uniform(0.0, 1.0, points)])
        batch = np.repeat(theta[None, None, :], K, 0).repeat(len(ts), 1)  # (K, T, K)
        for j in range(K):
            batch[j, :, j] = ts
        vals = np.asarray(inst.L(batch), dtype=float)  # (K, T)
        interp = (1 - ts)[None, :] * vals[:, :1] + ts[None, :] * vals[:, 1:2]
        v_aff = float(np.abs(vals - interp).max()) / inst.scale
        v_slope = float(np.abs(inst.grad(theta) - (vals[:, 1] - vals[:, 0])).max()) / inst.scale
        worst = max(worst, v_aff, v_slope)
        worst_slope = max(worst_slope, v_slope)
        if max(v_aff, v_slope) > TOL_AFFINE:
            failures += 1
        progress()
    res = CheckResult(
        "determinism.affine-coordinate",
        instances,
        failures,
        worst,
        tolerance=TOL_AFFINE,
        metric="max |L(t) − affine interpolation|, |∂L/∂θ_j − (L(1) − L(0))| relative to max_vertex|L|",
        description="Theorem 3.1 (b): L is affine along every coordinate; slope = analytic gradient [19]-[21], [12]",
        details={"worst_slope_violation": worst_slope, "points_per_coordinate": points},
    )
    return _summary(res, started, Ks, modes)


# --------------------------------------------------------------------------------------------------
# (c) no continuous optimiser beats the best vertex
# --------------------------------------------------------------------------------------------------


def run_vertex_min(
    rng: np.random.Generator,
    instances: int,
    progress: Progress = _noop,
    *,
    perturb: Perturbation | None = None,
    cost: str = "flops-params",
    max_gates: int = MAX_INSTANCE_GATES,
    starts: int = 4,
) -> CheckResult:
    """Theorem 3.1 (c): ``min_H L = min_vertices L``.

    Enumerates all vertices, then runs scipy's L-BFGS-B (bounds ``[0, 1]``,
    analytic gradient) from the centre of ``H`` and ``starts`` uniform random
    points; the violation is ``max(0, min_vertex L − min_optimiser L)``.
    """
    started = time.perf_counter()
    failures, worst = 0, 0.0
    runs = at_vertex = found_best = 0
    Ks: list[int] = []
    modes: list[str] = []
    for _ in range(instances):
        inst = random_instance(rng, max_gates=max_gates, perturb=perturb, cost=cost)
        K = inst.K
        Ks.append(K)
        modes.append(inst.mode)
        vmin = float(inst.vertex_values().min())

        def fun(x: np.ndarray, inst: Instance = inst) -> tuple[float, np.ndarray]:
            return float(inst.L(x)), inst.grad(x)

        best = np.inf
        for x0 in [np.full(K, 0.5), *rng.uniform(0.0, 1.0, (starts, K))]:
            r = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * K)
            x = np.clip(r.x, 0.0, 1.0)
            fx = float(inst.L(x))
            best = min(best, fx)
            runs += 1
            at_vertex += int(np.all(np.minimum(x, 1 - x) <= 1e-9))
            found_best += int(fx <= vmin + TOL_VERTEX * inst.scale)
        v = max(0.0, vmin - best) / inst.scale
        worst = max(worst, v)
        if v > TOL_VERTEX:
            failures += 1
        progress()
    res = CheckResult(
        "determinism.vertex-min",
        instances,
        failures,
        worst,
        tolerance=TOL_VERTEX,
        metric="max(0, min_vertex L − best L-BFGS-B value) / max_vertex|L|",
        description="Theorem 3.1 (c): no continuous optimiser (L-BFGS-B, several starts) beats the best vertex",
        details={"optimiser_runs": runs, "runs_ending_at_vertex": at_vertex, "runs_reaching_best_vertex": found_best},
    )
    return _summary(res, started, Ks, modes)


# --------------------------------------------------------------------------------------------------
# (d) rounding
# --------------------------------------------------------------------------------------------------


def round_to_vertex(inst: Instance, theta: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, float]:
    """Theorem 3.1 (d): set coordinates in ``order`` to whichever of 0/1 gives the lower ``L``.

    Returns the vertex and the largest increase of ``L`` over a single step
    (``≤ 0`` up to rounding for a multilinear ``L``).
    """
    theta = np.array(theta, dtype=float)
    current = float(inst.L(theta))
    worst_step = -np.inf
    for j in order:
        pair = np.repeat(theta[None, :], 2, 0)
        pair[0, j], pair[1, j] = 0.0, 1.0
        v0, v1 = (float(v) for v in inst.L(pair))
        theta[j] = 0.0 if v0 <= v1 else 1.0
        new = min(v0, v1)
        worst_step = max(worst_step, new - current)
        current = new
    return theta, worst_step


def run_rounding(
    rng: np.random.Generator,
    instances: int,
    progress: Progress = _noop,
    *,
    perturb: Perturbation | None = None,
    cost: str = "flops-params",
    max_gates: int = MAX_INSTANCE_GATES,
    starts: int = 3,
) -> CheckResult:
    """Theorem 3.1 (d): rounding one coordinate at a time never increases ``L`` and ends at a vertex.

    From ``starts`` points per instance (uniform in ``H``, and with some
    coordinates already on faces), in a random coordinate order.
    """
    started = time.perf_counter()
    failures, worst = 0, 0.0
    Ks: list[int] = []
    modes: list[str] = []
    for _ in range(instances):
        inst = random_instance(rng, max_gates=max_gates, perturb=perturb, cost=cost)
        K = inst.K
        Ks.append(K)
        modes.append(inst.mode)
        bad = False
        for s in range(starts):
            theta = rng.uniform(0.0, 1.0, K)
            if s % 2 == 1:  # some coordinates already integral
                on_face = rng.random(K) < 0.4
                theta[on_face] = rng.integers(0, 2, int(on_face.sum()))
            vertex, step = round_to_vertex(inst, theta, rng.permutation(K))
            total = float(inst.L(vertex)) - float(inst.L(theta))
            v = max(0.0, step, total) / inst.scale
            is_vertex = bool(np.all((vertex == 0.0) | (vertex == 1.0)))
            worst = max(worst, v)
            bad = bad or v > TOL_ROUNDING or not is_vertex
        failures += int(bad)
        progress()
    res = CheckResult(
        "determinism.rounding",
        instances,
        failures,
        worst,
        tolerance=TOL_ROUNDING,
        metric="max(0, largest single-step increase of L, L(vertex) − L(Θ)) / max_vertex|L|",
        description="Theorem 3.1 (d): coordinate-wise rounding to the better of 0/1 never increases L",
        details={"starts_per_instance": starts},
    )
    return _summary(res, started, Ks, modes)


# --------------------------------------------------------------------------------------------------
# (e) projected gradient flow ends at a vertex or on a flat face
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowEnd:
    """Where a projected gradient flow stopped: ``theta``, ``steps``, whether it reached stationarity
    (``‖projected field‖_∞ ≤ gtol · range_vertex L``), the non-integral coordinates, and the largest
    ``|L(face vertex) − L(Θ_end)| / max_vertex|L|`` over the face they span (0 at a vertex)."""

    theta: np.ndarray
    steps: int
    converged: bool
    free: tuple[int, ...]
    flatness: float


def gradient_flow(
    inst: Instance,
    theta0: np.ndarray,
    *,
    max_steps: int = 20000,
    gtol: float = 1e-9,
    grow: float = 1.5,
    max_growth: float = 1e6,
) -> FlowEnd:
    """Projected gradient flow of [22] with ``W`` frozen: ``Θ ← Π_H(Θ − η ∇_Θ L)`` (Theorem 3.1 (e)).

    ``η = 1/(2 K R)`` with ``R = max_vertex L − min_vertex L``: for a
    multilinear ``L`` every mixed second derivative is a signed sum of four
    conditional expectations of vertex values, so ``|∂²L/∂θ_i∂θ_j| ≤ 2R`` and
    ``η₀`` is below ``1/Lip(∇L)``.  Step-size control (Euler with an
    adaptive time step): after an accepted step ``η ← min(grow·η,
    max_growth·η₀)``, and ``η`` is halved whenever the step fails the
    sufficient-decrease test ``L(Θ') ≤ L(Θ) + ½ ∇L·(Θ' − Θ)`` (which every
    step with ``η ≤ η₀`` passes for a multilinear ``L``), so ``L`` decreases
    monotonically along the discrete path while coordinates with a small but
    non-zero slope still reach their face in few steps.
    Stops when the projected field of [27] is below ``gtol · R``.
    """
    V = inst.vertex_values()
    R = float(V.max() - V.min())
    K = inst.K
    theta = project(np.asarray(theta0, dtype=float))
    if R == 0.0:
        return FlowEnd(theta, 0, True, tuple(j for j in range(K) if 0.0 < theta[j] < 1.0), 0.0)
    eta0 = 1.0 / (2.0 * K * R)
    eta = eta0
    value = float(inst.L(theta))
    converged = False
    steps = 0
    while steps < max_steps:
        g = inst.grad(theta)
        if float(np.abs(projected_field(theta, -g)).max()) <= gtol * R:
            converged = True
            break
        new = project(theta - eta * g)
        new_value = float(inst.L(new))
        armijo = value + 0.5 * float(g @ (new - theta))  # sufficient decrease, σ = 1/2
        if new_value > armijo + 1e-14 * inst.scale and eta > 1e-12 * eta0:
            eta *= 0.5
            continue
        theta, value = new, new_value
        steps += 1
        eta = min(eta * grow, max_growth * eta0)
    free = tuple(j for j in range(K) if 0.0 < theta[j] < 1.0)
    flatness = 0.0
    if free:
        corners = np.repeat(theta[None, :], 2 ** len(free), 0)
        corners[:, list(free)] = mask_matrix(len(free))
        flatness = float(np.abs(np.asarray(inst.L(corners), dtype=float) - value).max()) / inst.scale
    return FlowEnd(theta, steps, converged, free, flatness)


def run_gradient_flow(
    rng: np.random.Generator,
    instances: int,
    progress: Progress = _noop,
    *,
    perturb: Perturbation | None = None,
    cost: str = "flops-params",
    max_gates: int = MAX_INSTANCE_GATES,
    max_steps: int = 20000,
) -> CheckResult:
    """Theorem 3.1 (e): projected gradient flow from a generic start ends at a vertex or on a flat face.

    Start uniform in ``[0.05, 0.95]^K``.  A run that does not become
    stationary within ``max_steps`` is *inconclusive*; a stationary end point
    whose non-integral coordinates span a face on which ``L`` is not constant
    (relative ``TOL_FLAT``) is a failure.
    """
    started = time.perf_counter()
    failures = inconclusive = vertices = flat = 0
    worst = 0.0
    steps: list[int] = []
    free_kinds: dict[str, int] = {}
    Ks: list[int] = []
    modes: list[str] = []
    for _ in range(instances):
        inst = random_instance(rng, max_gates=max_gates, perturb=perturb, cost=cost)
        Ks.append(inst.K)
        modes.append(inst.mode)
        end = gradient_flow(inst, rng.uniform(0.05, 0.95, inst.K), max_steps=max_steps)
        steps.append(end.steps)
        if not end.converged:
            inconclusive += 1
        else:
            worst = max(worst, end.flatness)
            if end.flatness > TOL_FLAT:
                failures += 1
            elif end.free:
                flat += 1
                for j in end.free:
                    kind = inst.objective.layout.slots[j][1]
                    free_kinds[kind] = free_kinds.get(kind, 0) + 1
            else:
                vertices += 1
        progress()
    res = CheckResult(
        "determinism.gradient-flow",
        instances,
        failures,
        worst,
        inconclusive=inconclusive,
        tolerance=TOL_FLAT,
        metric="max |L(face vertex) − L(end)| / max_vertex|L| over the face of the non-integral coordinates",
        description="Theorem 3.1 (e): projected gradient flow ends at a vertex or on a flat face",
        details={
            "ended_at_vertex": vertices,
            "ended_on_flat_face": flat,
            "free_coordinates_on_flat_faces": {f"theta_{k}": v for k, v in sorted(free_kinds.items())},
            "max_steps_taken": int(max(steps)) if steps else 0,
            "median_steps": float(np.median(steps)) if steps else 0.0,
        },
    )
    return _summary(res, started, Ks, modes)


# --------------------------------------------------------------------------------------------------
# Layer-only / unit-only objectives are faces
# --------------------------------------------------------------------------------------------------


def run_faces(
    rng: np.random.Generator, instances: int, progress: Progress = _noop, *, max_gates: int = MAX_INSTANCE_GATES
) -> CheckResult:
    """§4: the layer-only objective (``θ_1`` not gated) is the face ``θ_1 ≡ 1`` of the full one, the
    unit-only objective (``θ_B`` not gated) the face ``θ_B ≡ 1``: equal ``L`` and equal ``∂L/∂θ`` on
    the shared coordinates."""
    started = time.perf_counter()
    failures, worst = 0, 0.0
    Ks: list[int] = []
    modes: list[str] = []
    for _ in range(instances):
        inst = random_instance(rng, max_gates=max_gates)
        full = inst.objective
        lay = full.layout
        Ks.append(inst.K)
        modes.append(inst.mode)
        theta = rng.uniform(0.0, 1.0, inst.K)
        v = 0.0
        for drop in ("units", "block"):
            flags = {"block": lay.block, "units": lay.units, "outputs": lay.outputs}
            if not any(flags[drop]):
                continue
            flags[drop] = tuple(False for _ in flags[drop])
            sub = GateLayout(lay.spec, flags["block"], flags["units"], flags["outputs"])
            if sub.K == 0:
                continue
            dropped_kind = "1" if drop == "units" else "B"
            keep = [k for k, (_, kind, _) in enumerate(lay.slots) if kind != dropped_kind]
            on_face = theta.copy()
            on_face[[k for k in range(inst.K) if k not in keep]] = 1.0
            face = full.evaluate(inst.weights, on_face)
            # same data; cross-entropy targets passed as their one-hot rows
            obj = ExactObjective(
                lay.spec, full.X, full.T, loss=full.loss, g=full.g, lam=full.lam, coeffs=full.coeffs, layout=sub
            )
            r = obj.evaluate(inst.weights, theta[keep])
            scale = max(abs(float(face.L)), 1e-300)
            v = max(v, abs(float(r.L) - float(face.L)) / scale, float(np.abs(r.grad - face.grad[keep]).max()) / scale)
        worst = max(worst, v)
        failures += int(v > TOL_FACES)
        progress()
    res = CheckResult(
        "determinism.faces",
        instances,
        failures,
        worst,
        tolerance=TOL_FACES,
        metric="max relative difference of L and ∂L/∂θ between the reduced objective and the face",
        description="§4: layer-only (θ_1 ≡ 1) and unit-only (θ_B ≡ 1) objectives are faces of the full one",
    )
    return _summary(res, started, Ks, modes)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


check_multilinear = register(
    "determinism.multilinear",
    instances=20,
    group="determinism",
    description="Theorem 3.1 (a): ∂²L/∂θ_j² ≡ 0 for every gate (sympy, exact)",
)(run_multilinear)


check_affine = register(
    "determinism.affine-coordinate",
    instances=200,
    group="determinism",
    description="Theorem 3.1 (b): L affine along every coordinate, slope = analytic ∂L/∂θ",
)(run_affine)


check_vertex_min = register(
    "determinism.vertex-min",
    instances=100,
    group="determinism",
    description="Theorem 3.1 (c): L-BFGS-B from random starts never beats the best vertex",
)(run_vertex_min)


check_rounding = register(
    "determinism.rounding",
    instances=200,
    group="determinism",
    description="Theorem 3.1 (d): coordinate-wise rounding never increases L",
)(run_rounding)


check_gradient_flow = register(
    "determinism.gradient-flow",
    instances=100,
    group="determinism",
    description="Theorem 3.1 (e): projected gradient flow ends at a vertex or on a flat face",
)(run_gradient_flow)


check_faces = register(
    "determinism.faces",
    instances=100,
    group="determinism",
    description="§4: layer-only / unit-only objectives are the faces θ_1 ≡ 1 / θ_B ≡ 1",
)(run_faces)


__all__ = [
    "MAX_INSTANCE_GATES",
    "MAX_SYMBOLIC_GATES",
    "TOL_AFFINE",
    "TOL_FACES",
    "TOL_FLAT",
    "TOL_ROUNDING",
    "TOL_VERTEX",
    "FlowEnd",
    "Instance",
    "gradient_flow",
    "random_instance",
    "round_to_vertex",
    "run_affine",
    "run_faces",
    "run_gradient_flow",
    "run_multilinear",
    "run_rounding",
    "run_vertex_min",
]
