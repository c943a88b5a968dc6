"""Lyapunov certificates of Theorems 5.1 and 5.2 and their numerical checks (THEORY §6–§7).

Everything is stated for the canonical block of §7 (:mod:`theory.block_model`),
whose Lemma-1 constant on the ball ``||W|| ≤ R`` is explicit [28]::

    k(R) = Σ_n ||x̂_n|| (||r_n|| + ¾ ||x̂_n|| R²) = k₀ + k₂ R².

**Theorem 5.1 (layer), [31]–[32].**  ``V_B = ½(||W_1||² + ||W_2||²) + a θ_B``,
``D_B(a, ρ) = {V_B < ρ}`` with ``0 < ρ < ρ_max(a) = a c_B / ((2 + a) k)`` and
``2ρ ≤ R²``.  In ``D_B``: ``V̇_B ≤ −(κ_B θ_B + λ||W||²)``, ``κ_B = a c_B −
(2+a) k ρ > 0``; ``θ̇_B ≤ −(c_B − kρ)`` while ``θ_B > 0`` (finite-time hit of
``θ_B = 0`` no later than ``θ_B(0)/(c_B − kρ)``); with ``λ > 0``, ``W → 0``.
Inside ``D_B`` the ball hypothesis holds automatically (``||W||² < 2ρ ≤ R²``).

**Theorem 5.2 (unit), [33]–[34].**  ``V_i = ½(||w_i||² + ||v_i||²) + a θ_i``,
``D_i(a, ρ) = {V_i < ρ}`` with ``ρ < a c_1 / ((2 + a) k)`` (and ``2ρ ≤ R²``,
implied by the ball).  ``V̇_i ≤ −(κ_1 θ_B θ_i + λ(||w_i||² + ||v_i||²))``,
``κ_1 = a c_1 − (2+a) k ρ``.  Here Lemma 1's ball ``||W|| ≤ R`` (all the
block's weights, not only unit ``i``'s) is a genuine hypothesis: ``D_i`` does
not control the other units, so the checks verify it along every trajectory
and count trajectories that leave the ball as *inconclusive*.

The maths checked here (derivations in the docstrings):

* the proofs of [32]/[34] give sharper rates than stated in [32]/[34] (both are
  checked): ``V̇_B ≤ −κ_B − λ||W||²`` while ``θ_B > 0`` (the term
  ``aθ̇_B ≤ −a(c_B − (k/2)||W||²)`` carries no factor ``θ_B``; the stated
  ``κ_B θ_B`` follows from ``θ_B ≤ 1``), and ``V̇_i ≤ −κ_1 θ_B − λ||u_i||²``
  while ``θ_i > 0``; ``θ̇_i ≤ −θ_B (c_1 − kρ)`` while ``θ_i > 0``, so ``θ_i``
  reaches 0 once ``∫θ_B ≥ θ_i(0)/(c_1 − kρ)``;
* the union of the regions over ``a > 0`` has a closed form
  (:func:`union_margin`): for fixed ``k`` and no radius cap a state is
  certified iff ``||u||/√2 + √(2θ) < √(c/k)``;
* for Theorem 5.1 the radius ``R`` is free too (any ``R`` with ``2ρ ≤ R²``);
  the union over ``(a, R)`` is a 1-D concave maximisation
  (:func:`union_margin_auto`).

Remarks (not used by the checks): the §7 constant is conservative — the
four bounds of [28] hold with ``½`` in place of ``¾`` (``|g_i|``: the bracket
``−r_n + ½φ_ni v_i + Σ_{j≠i} θ_j φ_nj v_j`` is bounded by ``||r_n|| + Σ_j
|φ_nj| ||v_j|| ≤ ||r_n|| + ½||x̂_n||R²``), and the proof of [32] only needs
``k_h + k_k + a k_B`` in place of ``(2 + a)k`` (see
:func:`theory.block_model.lemma1_constants`).  For ``λ > 0`` Lemma 1's ball
can always be met: ``L`` does not increase along [22] and ``L ≥ (λ/2)||W||²``,
so ``||W(t)||² ≤ 2L(y(0))/λ``.

The registered checks (group ``dynamics``) are ``theorem5.1``,
``theorem5.2`` (trajectories from inside the certified regions, integrated
with :func:`theory.ode.odeint`) and ``vdot5.1``, ``vdot5.2`` (the pointwise
bounds on ``V̇`` at random points of the regions; exact, no integrator).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .block_model import BlockProblem, lemma1_k, unpack, velocity
from .checks import CheckResult, register
from .projection import projected_field

Array = np.ndarray

# --------------------------------------------------------------------------------------------------
# Lyapunov functions and their rates
# --------------------------------------------------------------------------------------------------


def weight_sq(problem: BlockProblem, y: Any) -> Array:
    """``||W||² = ||W_1||² + ||W_2||²`` of a state (batched)."""
    return np.asarray(unpack(y, problem).weight_norm_sq)


def unit_weight_sq(problem: BlockProblem, y: Any, i: int) -> Array:
    """``||u_i||² = ||w_i||² + ||v_i||²`` of unit ``i`` (batched)."""
    st = unpack(y, problem)
    return np.asarray(np.sum(st.W1[..., i, :] ** 2, axis=-1) + np.sum(st.W2[..., :, i] ** 2, axis=-1))


def lyapunov_block(problem: BlockProblem, y: Any, a: Any) -> Array:
    """``V_B = ½(||W_1||² + ||W_2||²) + a θ_B`` of Theorem 5.1 [31]."""
    st = unpack(y, problem)
    return np.asarray(0.5 * st.weight_norm_sq + a * st.theta_B)


def lyapunov_unit(problem: BlockProblem, y: Any, a: float, i: int) -> Array:
    """``V_i = ½(||w_i||² + ||v_i||²) + a θ_i`` of Theorem 5.2 [33]."""
    st = unpack(y, problem)
    return np.asarray(0.5 * unit_weight_sq(problem, y, i) + a * st.theta[..., i])


def clip_gates(problem: BlockProblem, y: Any) -> Array:
    """``y`` with its gates clipped to ``H = [0, 1]`` (removes an integrator's ~1e-12 overshoot of a face)."""
    ya = np.array(y, dtype=np.float64)
    sl = problem.theta_slice
    ya[..., sl] = np.clip(ya[..., sl], 0.0, 1.0)
    return ya


def projected_velocity(problem: BlockProblem, y: Any, *, atol: float = 0.0) -> Array:
    """The right-hand side of [22]/[24]: ``−∇L`` with the gate part projected as in [27].

    ``−∇L`` is :func:`theory.block_model.velocity`, or for many states with gates in ``H`` the compiled
    kernel :func:`theory.block_kernel.velocity_batch` (the same closed forms to ~1e-13 relative) when
    numba is installed.
    """
    ya = np.asarray(y, dtype=np.float64)
    v = _velocity(problem, ya)
    sl = problem.theta_slice
    v[..., sl] = projected_field(ya[..., sl], v[..., sl], atol=atol)
    return v


def _velocity(problem: BlockProblem, y: Array) -> Array:
    """``−∇L`` at ``y`` (..., D): the compiled kernel for many states in ``H`` when it applies, else numpy."""
    if y.ndim == 2 and y.shape[0] >= 32:
        from .block_kernel import FUSED_M1, FUSED_P, velocity_batch
        from .jit import compiled_enabled

        gates = y[:, problem.theta_slice]
        if (compiled_enabled() and problem.m + 1 <= FUSED_M1 and problem.p <= FUSED_P
                and np.all((gates >= 0) & (gates <= 1))):
            return velocity_batch(problem, y, workers=min(2, os.cpu_count() or 1))
    return velocity(problem, y)


def lyapunov_block_rate(
    problem: BlockProblem, y: Any, a: Any, *, atol: float = 0.0, v: Array | None = None
) -> Array:
    """``V̇_B = W·Ẇ + a θ̇_B`` along the projected field [24] (exact, no integrator); ``v``: the projected
    velocity at ``y`` when already computed (:func:`projected_velocity`)."""
    ya = np.asarray(y, dtype=np.float64)
    v = projected_velocity(problem, ya, atol=atol) if v is None else v
    st, sd = unpack(ya, problem), unpack(v, problem)
    ww = np.sum(st.W1 * sd.W1, axis=(-2, -1)) + np.sum(st.W2 * sd.W2, axis=(-2, -1))
    return np.asarray(ww + a * sd.theta_B)


def lyapunov_unit_rate(
    problem: BlockProblem, y: Any, a: float, i: int, *, atol: float = 0.0, v: Array | None = None
) -> Array:
    """``V̇_i = w_i·ẇ_i + v_i·v̇_i + a θ̇_i`` along the projected field [24] (``v`` as for
    :func:`lyapunov_block_rate`)."""
    ya = np.asarray(y, dtype=np.float64)
    v = projected_velocity(problem, ya, atol=atol) if v is None else v
    st, sd = unpack(ya, problem), unpack(v, problem)
    uu = np.sum(st.W1[..., i, :] * sd.W1[..., i, :], axis=-1) + np.sum(st.W2[..., :, i] * sd.W2[..., :, i], axis=-1)
    return np.asarray(uu + a * sd.theta[..., i])


# --------------------------------------------------------------------------------------------------
# Effective regularisation and its lower bounds [26]
# --------------------------------------------------------------------------------------------------


def gamma_B(problem: BlockProblem, y: Any) -> Array:
    """``γ_B = c_B + c_1 |θ|₁`` of the canonical block (§7, [12])."""
    st = unpack(y, problem)
    return np.asarray(problem.c_B + problem.c_1 * np.sum(st.theta, axis=-1))


def gamma_lower_bounds(problem: BlockProblem, ys: Any) -> tuple[float, float]:
    """``(inf_t γ_B, inf_t γ_1)`` along a trajectory ``ys`` (..., D): the ``c_B``, ``c_1`` of [26].

    For the canonical block ``γ_B = c_B + c_1|θ|₁ ≥ c_B`` (as ``θ ≥ 0``, up to the
    integrator's overshoot of the face) and ``γ_1 ≡ c_1``.
    """
    return float(np.min(gamma_B(problem, ys))), float(problem.c_1)


# --------------------------------------------------------------------------------------------------
# Radii and rates [31], [33]
# --------------------------------------------------------------------------------------------------


def lemma1_coeffs(problem: BlockProblem) -> tuple[float, float]:
    """``(k₀, k₂)`` with ``lemma1_k(problem, R) = k₀ + k₂ R²`` (§7: ``k₀ = Σ||x̂_n|| ||r_n||``, ``k₂ = ¾Σ||x̂_n||²``)."""
    k0 = lemma1_k(problem, 0.0)
    k2 = lemma1_k(problem, 1.0) - k0
    return k0, k2


def rho_max(a: Any, c: float, k: float) -> Array:
    """The strict upper bound ``a c / ((2 + a) k)`` on ``ρ`` of [31] (``c = c_B``) / [33] (``c = c_1``)."""
    a = np.asarray(a, dtype=np.float64)
    frac = np.where(np.isinf(a), 1.0, a / (2.0 + np.where(np.isinf(a), 0.0, a)))
    return np.asarray(c * frac / k)


def rho_sup(a: Any, c: float, k: float, R: float | None = None) -> Array:
    """``sup ρ`` allowed for this ``a``: ``min(a c/((2+a)k), R²/2)`` (the cap ``2ρ ≤ R²`` of [31])."""
    out = rho_max(a, c, k)
    return out if R is None else np.minimum(out, 0.5 * R * R)


def admissible(a: float, rho: float, c: float, k: float, R: float | None = None) -> bool:
    """``a > 0``, ``0 < ρ < a c/((2+a)k)`` and (when ``R`` is given) ``2ρ ≤ R²``."""
    return bool(a > 0 and 0 < rho < float(rho_max(a, c, k)) and (R is None or 2 * rho <= R * R))


def kappa(a: Any, rho: Any, c: float, k: Any) -> Any:
    """``κ = a c − (2 + a) k ρ`` of [32]/[34]; ``> 0`` iff ``ρ < ρ_max(a)`` (a float, or an array for arrays)."""
    out = np.asarray(a) * c - (2.0 + np.asarray(a)) * np.asarray(k) * np.asarray(rho)
    return float(out) if np.ndim(out) == 0 else out


def hit_time_bound(theta0: Any, rho: float, c: float, k: float) -> Array:
    """``θ(0)/(c − kρ)``: in ``D_B``, ``θ̇_B ≤ −(c_B − kρ)`` while ``θ_B > 0`` [32], so ``θ_B = 0`` by then."""
    return np.asarray(np.asarray(theta0, dtype=np.float64) / (c - k * rho))


def block_rate_bound(problem: BlockProblem, y: Any, a: Any, rho: Any, k: Any, *, sharp: bool = False) -> Array:
    """The right side of [32]: ``−(κ_B θ_B + λ||W||²)``; ``sharp=True``: ``−(κ_B·1[θ_B > 0] + λ||W||²)``.

    The proof of [32] gives the sharp form: while ``θ_B > 0``,
    ``d/dt ½||W||² ≤ (kθ_B − λ)||W||² ≤ k||W||² − λ||W||²`` and
    ``aθ̇_B ≤ −a(c_B − (k/2)||W||²)`` (the latter has no factor ``θ_B``), so with
    ``||W||² < 2ρ``: ``V̇_B < (2+a)kρ − ac_B − λ||W||² = −κ_B − λ||W||²``; at
    ``θ_B = 0`` the projection gives ``θ̇_B = 0`` (``−(g_B + γ_B) ≤ −(c_B − kρ) < 0``)
    and ``V̇_B = −λ||W||²``.  the stated ``κ_B θ_B`` is the weaker consequence
    (``θ_B ≤ 1``); both are checked.
    """
    st = unpack(y, problem)
    gate = (st.theta_B > 0).astype(np.float64) if sharp else st.theta_B
    return np.asarray(-(kappa(a, rho, problem.c_B, k) * gate + problem.lam * st.weight_norm_sq))


def unit_rate_bound(
    problem: BlockProblem, y: Any, a: float, rho: float, k: float, i: int, *, sharp: bool = False
) -> Array:
    """The right side of [34]: ``−(κ_1 θ_B θ_i + λ||u_i||²)``; ``sharp``: ``θ_B·1[θ_i > 0]`` for ``θ_Bθ_i``.

    As for [32]: ``aθ̇_i = −aθ_B(g_i + c_1) ≤ −aθ_B(c_1 − (k/2)||u_i||²)`` while
    ``θ_i > 0`` carries the factor ``θ_B`` but not ``θ_i``, and
    ``d/dt ½||u_i||² ≤ (kθ_Bθ_i − λ)||u_i||²``; so ``V̇_i ≤ −κ_1 θ_B − λ||u_i||²``
    while ``θ_i > 0``.
    """
    st = unpack(y, problem)
    k1 = kappa(a, rho, problem.c_1, k)
    ti = st.theta[..., i]
    gate = (ti > 0).astype(np.float64) if sharp else ti
    return np.asarray(-(k1 * st.theta_B * gate + problem.lam * unit_weight_sq(problem, y, i)))


# --------------------------------------------------------------------------------------------------
# Membership: one region, and the union over a (and R)
# --------------------------------------------------------------------------------------------------


def in_block_region(problem: BlockProblem, y: Any, a: float, rho: float, R: float) -> Array:
    """``y ∈ D_B(a, ρ)`` of [31] with ``k = k(R)``; ``ValueError`` unless ``(a, ρ)`` is admissible."""
    k = lemma1_k(problem, R)
    if not admissible(a, rho, problem.c_B, k, R):
        raise ValueError(f"(a={a:g}, rho={rho:g}) violates rho < a c_B/((2+a)k) = {float(rho_max(a, problem.c_B, k)):g}"
                         f" or 2 rho <= R^2 = {R * R:g}")
    return np.asarray(lyapunov_block(problem, y, a) < rho)


def in_unit_region(problem: BlockProblem, y: Any, a: float, rho: float, R: float, i: int) -> Array:
    """``y ∈ D_i(a, ρ)`` of [33] with ``k = k(R)`` (the ball ``||W|| ≤ R`` is checked along trajectories)."""
    k = lemma1_k(problem, R)
    if not admissible(a, rho, problem.c_1, k, R):
        raise ValueError(f"(a={a:g}, rho={rho:g}) violates rho < a c_1/((2+a)k) = {float(rho_max(a, problem.c_1, k)):g}"
                         f" or 2 rho <= R^2 = {R * R:g}")
    return np.asarray(lyapunov_unit(problem, y, a, i) < rho)


def union_margin(theta: Any, q: Any, c: float, k: float, R: float | None = None) -> tuple[Array, Array]:
    """``sup_{a>0} [ρ_sup(a) − a θ − q]`` and the maximising ``a`` (closed form), ``q = ½||u||²``.

    A state ``(θ, q)`` lies in some ``D(a, ρ)`` of [31]/[33] iff this margin is
    ``> 0`` (then any ``ρ`` strictly between ``V(a)`` and ``ρ_sup(a)`` works).
    Derivation: ``F(a) = a c/((2+a)k) − aθ − q`` is concave with
    ``F'(a) = 2c/((2+a)²k) − θ``, maximal at ``a* = √(2c/(kθ)) − 2`` where
    ``F(a*) = (√(c/k) − √(2θ))² − q``; if ``a* ≤ 0`` (``θ ≥ c/(2k)``) the sup is
    ``F(0⁺) = −q ≤ 0``: not certified.  The cap ``R²/2`` binds exactly for
    ``a > a_c = kR²/(c − kR²/2)`` (where ``ρ_max(a_c) = R²/2``, independent of the
    state; ``a_c = ∞`` if ``c ≤ kR²/2``) and beyond ``a_c`` the objective
    decreases, so the maximiser is ``min(a*, a_c)``.  ``θ = 0`` gives
    ``a* = ∞`` and margin ``min(c/k, R²/2) − q``.
    """
    th = np.asarray(theta, dtype=np.float64)
    qq = np.asarray(q, dtype=np.float64)
    th, qq = np.broadcast_arrays(th, qq)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a_star = np.where(th > 0, np.sqrt(2.0 * c / (k * np.where(th > 0, th, 1.0))) - 2.0, np.inf)
    if R is not None and c > 0.5 * k * R * R:
        a_c = k * R * R / (c - 0.5 * k * R * R)
    else:
        a_c = math.inf
    a_opt = np.minimum(a_star, a_c)
    finite = np.isfinite(a_opt)
    a_safe = np.where(finite, np.maximum(a_opt, 0.0), 0.0)
    at = np.where(finite, a_safe * th, 0.0)
    cap = rho_sup(np.where(finite, a_safe, np.inf), c, k, R)
    margin = np.where(a_opt > 0, cap - at - qq, -qq)
    return np.asarray(margin), np.asarray(np.where(a_opt > 0, a_opt, 0.0))


def _auto_P(a: Array, c: float, k0: float, k2: float) -> Array:
    """``P(a) = R*(a)²/2``: the cap at the best radius, ``a c/((2+a)(k₀+k₂R²)) = R²/2`` solved for ``R²/2``."""
    u = np.where(np.isinf(a), 1.0, a / (2.0 + np.where(np.isinf(a), 0.0, a)))
    return np.asarray((-k0 + np.sqrt(k0 * k0 + 8.0 * k2 * c * u)) / (4.0 * k2))


def union_margin_auto(theta: Any, q: Any, c: float, k0: float, k2: float) -> tuple[Array, Array, Array]:
    """Union of [31]'s regions over ``a > 0`` *and* the radius ``R`` (``k = k₀ + k₂R²``): margin, ``a``, ``R``.

    For fixed ``a`` the best radius equalises the two caps, ``ρ_max(a; k(R)) =
    R²/2``, i.e. ``R²/2 = P(a) = (−k₀ + √(k₀² + 8k₂c·a/(2+a)))/(4k₂)``; ``P`` is
    concave increasing, so ``sup_a [P(a) − aθ − q]`` is attained where
    ``P'(a) = θ``.  With ``x = 1/(2+a)`` that is the quartic
    ``4c²x⁴ + 16θ²k₂c·x − θ²(k₀² + 8k₂c) = 0``, increasing in ``x``, with a
    root in ``(0, ½)`` iff ``θ < c/(2k₀)`` (bisection).  Otherwise the sup is
    ``−q`` (not certified).  Valid for Theorem 5.1, where the ball is implied.
    """
    th = np.asarray(theta, dtype=np.float64)
    qq = np.asarray(q, dtype=np.float64)
    th, qq = np.broadcast_arrays(th, qq)
    if k2 <= 0:
        m, a = union_margin(th, qq, c, k0, None)
        return m, a, np.full(th.shape, np.inf)
    feasible = th < c / (2.0 * k0)
    lo = np.zeros(th.shape)
    hi = np.full(th.shape, 0.5)
    t2 = th * th
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        val = 4 * c * c * mid**4 + 16 * t2 * k2 * c * mid - t2 * (k0 * k0 + 8 * k2 * c)
        pos = val > 0
        hi = np.where(pos, mid, hi)
        lo = np.where(pos, lo, mid)
    x = 0.5 * (lo + hi)
    with np.errstate(divide="ignore"):
        a = np.where(th > 0, 1.0 / np.maximum(x, 1e-300) - 2.0, np.inf)
    a = np.where(feasible, a, 0.0)
    P = _auto_P(a, c, k0, k2)
    at = np.where(np.isfinite(a), np.where(np.isfinite(a), a, 0.0) * th, 0.0)
    margin = np.where(feasible & (a > 0), P - at - qq, -qq)
    return np.asarray(margin), np.asarray(a), np.asarray(np.sqrt(2.0 * P))


def union_boundary(
    theta: Any, c: float, *, k: float | None = None, R: float | None = None, k0: float | None = None,
    k2: float | None = None,
) -> Array:
    """The largest certified ``||u||`` at gate value ``θ``: ``√(2 q_max(θ))`` (0 where nothing is).

    The maximiser ``a`` of :func:`union_margin` does not depend on ``q``, so the
    union is ``{q < q_max(θ)}`` with ``q_max = margin(θ, 0)``.  Pass ``k`` (and
    optionally ``R``) for a fixed ball, or ``k0, k2`` for the union over ``R``.
    """
    th = np.asarray(theta, dtype=np.float64)
    if k0 is not None and k2 is not None:
        qmax = union_margin_auto(th, 0.0, c, k0, k2)[0]
    elif k is not None:
        qmax = union_margin(th, 0.0, c, k, R)[0]
    else:
        raise ValueError("union_boundary: pass k (fixed ball) or k0 and k2 (union over R)")
    return np.asarray(np.sqrt(2.0 * np.maximum(qmax, 0.0)))


def certified_block(problem: BlockProblem, y: Any, R: float | None = None) -> Array:
    """``y ∈ ∪_a D_B(a, ρ)`` (fixed ``R``) or ``∪_{a,R}`` (``R=None``) — Theorem 5.1's largest certificate."""
    st = unpack(y, problem)
    q = 0.5 * st.weight_norm_sq
    if R is None:
        k0, k2 = lemma1_coeffs(problem)
        return np.asarray(union_margin_auto(st.theta_B, q, problem.c_B, k0, k2)[0] > 0)
    return np.asarray(union_margin(st.theta_B, q, problem.c_B, lemma1_k(problem, R), R)[0] > 0)


def certified_unit(problem: BlockProblem, y: Any, i: int, R: float) -> Array:
    """``y ∈ ∪_a D_i(a, ρ)`` for the ball ``||W|| ≤ R`` (Theorem 5.2; ``||W(0)|| ≤ R`` is required too)."""
    st = unpack(y, problem)
    q = 0.5 * unit_weight_sq(problem, y, i)
    inside = union_margin(st.theta[..., i], q, problem.c_1, lemma1_k(problem, R), R)[0] > 0
    return np.asarray(inside & (st.weight_norm_sq <= R * R))


@dataclass(frozen=True)
class Witness:
    """An admissible ``(a, ρ, R, k)`` whose region contains a given state."""

    a: float
    rho: float
    R: float
    k: float


def block_witness(problem: BlockProblem, y: Any, R: float | None = None) -> Witness | None:
    """A certificate ``(a, ρ, R)`` of Theorem 5.1 containing the single state ``y`` (``None`` if none exists)."""
    st = unpack(y, problem)
    q = 0.5 * float(st.weight_norm_sq)
    th = float(st.theta_B)
    if R is None:
        k0, k2 = lemma1_coeffs(problem)
        m, a, Rs = (float(v) for v in union_margin_auto(th, q, problem.c_B, k0, k2))
        R_use = Rs
    else:
        m, a = (float(v) for v in union_margin(th, q, problem.c_B, lemma1_k(problem, R), R))
        R_use = R
    if not m > 0:
        return None
    k = lemma1_k(problem, R_use)
    if not math.isfinite(a):  # θ_B = 0: any large a works; take one with ρ_sup(a) − q > 0
        a = 1e6
    V = q + a * th
    rho = 0.5 * (V + float(rho_sup(a, problem.c_B, k, R_use)))
    rho = min(rho, 0.5 * R_use * R_use)
    return Witness(a, rho, R_use, k) if admissible(a, rho, problem.c_B, k, R_use) and V < rho else None


# --------------------------------------------------------------------------------------------------
# Sampling problems and starts inside the regions
# --------------------------------------------------------------------------------------------------


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def random_problem(rng: np.random.Generator, *, lam: float | None = None) -> BlockProblem:
    """A random canonical block (§7) for the checks: sizes, ``λ`` (0 in a quarter of draws), ``c_B``, ``c_1``."""
    if lam is None:
        lam = 0.0 if rng.uniform() < 0.25 else _loguniform(rng, 0.05, 1.0)
    return BlockProblem.random(
        rng,
        m=int(rng.integers(1, 4)),
        n=int(rng.integers(2, 5)),
        p=int(rng.integers(1, 3)),
        N=int(rng.integers(8, 33)),
        lam=lam,
        c_B=_loguniform(rng, 0.5, 10.0),
        c_1=_loguniform(rng, 0.1, 3.0),
        teacher_units=2,
        teacher_scale=_loguniform(rng, 0.5, 3.0),
        noise=0.1,
    )


def useful_direction(problem: BlockProblem) -> tuple[Array, Array]:
    """Unit vectors ``(w, v)`` maximising ``v·(Σ_n r_n x̂_nᵀ) w``: to first order the most useful unit.

    Near ``W = 0``, ``g_B ≈ −Σ_i θ_i v_iᵀ M w_i`` with ``M = Σ_n r_n x̂_nᵀ``, so units
    along the top singular pair of ``M`` make ``g_B`` as negative as the
    weights allow: the hardest starts for the certificates.
    """
    M = problem.R.T @ problem.Xh  # (p, m+1)
    U, _, Vt = np.linalg.svd(M)
    return Vt[0].copy(), U[:, 0].copy()


def _unit_weights(
    problem: BlockProblem, rng: np.random.Generator, norm_sq: float, aligned: bool
) -> tuple[Array, Array]:
    """``(w, v)`` of one unit with ``||w||² + ||v||² = norm_sq``; random direction or the useful one."""
    if aligned:
        w, v = useful_direction(problem)
        split = 0.5
    else:
        w = rng.standard_normal(problem.m + 1)
        v = rng.standard_normal(problem.p)
        w /= np.linalg.norm(w)
        v /= np.linalg.norm(v)
        split = float(rng.uniform(0.1, 0.9))
    return math.sqrt(norm_sq * split) * w, math.sqrt(norm_sq * (1 - split)) * v


def _block_weights(
    problem: BlockProblem, rng: np.random.Generator, norm_sq: float, aligned: bool
) -> tuple[Array, Array]:
    """``(W1, W2)`` with ``||W||² = norm_sq``: every unit along the useful direction, or a random direction."""
    n, m1, p = problem.n, problem.m + 1, problem.p
    if aligned:
        w, v = useful_direction(problem)
        W1 = np.tile(w, (n, 1))
        W2 = np.tile(v[:, None], (1, n))
    else:
        W1 = rng.standard_normal((n, m1))
        W2 = rng.standard_normal((p, n))
    scale = math.sqrt(norm_sq / max(float(np.sum(W1**2) + np.sum(W2**2)), 1e-300))
    return W1 * scale, W2 * scale


def _gates(rng: np.random.Generator, n: int) -> Array:
    th = rng.uniform(0.0, 1.0, n)
    th[rng.uniform(size=n) < 0.2] = 1.0
    return th


def sample_block_start(
    problem: BlockProblem, rng: np.random.Generator, a: float, rho: float, *, aligned: bool
) -> Array:
    """A state in ``D_B(a, ρ)`` [31]: ``θ_B < ρ/a``, then ``||W||² < 2(ρ − aθ_B)``; gates ``θ_i`` uniform."""
    theta_B = float(rng.uniform(0.0, 1.0)) * min(1.0, rho / a)
    q = (rho - a * theta_B) * float(rng.uniform(0.3, 0.999))
    W1, W2 = _block_weights(problem, rng, 2.0 * q, aligned)
    return problem.pack(theta_B, _gates(rng, problem.n), W1, W2)


def sample_unit_start(
    problem: BlockProblem, rng: np.random.Generator, a: float, rho: float, R: float, i: int, *, aligned: bool,
    others_frac: float = 0.5,
) -> Array:
    """A state in ``D_i(a, ρ)`` [33] with ``||W||² ≤ R²``: unit ``i`` as in :func:`sample_block_start`;
    the other units random with ``||W||² ≈ others_frac · R²``; ``θ_B`` uniform in ``[0.05, 1]``."""
    theta_i = float(rng.uniform(0.0, 1.0)) * min(1.0, rho / a)
    q = (rho - a * theta_i) * float(rng.uniform(0.3, 0.999))
    W1, W2 = _block_weights(problem, rng, max(others_frac * R * R - 2.0 * q, 0.0), False)
    w, v = _unit_weights(problem, rng, 2.0 * q, aligned)
    W1[i], W2[:, i] = w, v
    theta = _gates(rng, problem.n)
    theta[i] = theta_i
    return problem.pack(float(rng.uniform(0.05, 1.0)), theta, W1, W2)


# --------------------------------------------------------------------------------------------------
# Integration of one trajectory (theory.ode)
# --------------------------------------------------------------------------------------------------

#: Tolerances of the reference integrator used by the trajectory checks.
RTOL, ATOL = 1e-10, 1e-13
#: Method of :func:`theory.ode.odeint` used by the checks (stiff-capable; the weights of a useful block are stiff).
METHOD = "LSODA"
#: Segments allowed to :func:`theory.ode.odeint` before the fallback takes over (see :func:`integrate`).
MAX_SEGMENTS = 200

#: How many times :func:`integrate` had to fall back (reported by the checks).
FALLBACKS = {"count": 0}


def _raw_projected(problem: BlockProblem, y0: Array, t0: float, t1: float) -> tuple[Array, Array]:
    """solve_ivp (explicit DOP853) on the projected field [22]/[27] itself, velocity at ``Π_H(y)``.

    No switching logic: a gate that reaches a face with an outward velocity
    stays there up to ``ATOL`` (its projected velocity is 0).  Used only when
    :func:`theory.ode.odeint` stops early.
    """
    from scipy.integrate import solve_ivp

    sl = problem.theta_slice

    def rhs(t: float, y: Array) -> Array:
        yc = clip_gates(problem, y)
        v = velocity(problem, yc)
        v[sl] = projected_field(yc[sl], v[sl])
        return v

    sol = solve_ivp(rhs, (t0, t1), y0, method="DOP853", rtol=RTOL, atol=ATOL)
    return np.asarray(sol.t), clip_gates(problem, np.asarray(sol.y).T)


def integrate(problem: BlockProblem, y0: Array, t1: float, *, t0: float = 0.0) -> tuple[Array, Array]:
    """One trajectory of [22]/[24] on ``[t0, t1]`` at every accepted step: ``(t (J,), Y (J, D))``, gates in ``H``.

    The reference is :func:`theory.ode.odeint` (hybrid: face hits/releases
    located by events).  If it stops early (it can chatter forever between
    "hit" and "release" on a pinned gate whose velocity is exactly 0 — e.g.
    every ``θ_i`` once ``θ_B = 0``, since ``θ̇_i = −θ_B(g_i + c_1)``), the rest
    of the interval is integrated by :func:`_raw_projected` and
    ``FALLBACKS["count"]`` is incremented.
    """
    from .block_model import field
    from .ode import odeint

    res = odeint(field(problem), y0, (t0, t1), theta_slice=problem.theta_slice, rtol=RTOL, atol=ATOL,
                 method=METHOD, max_segments=MAX_SEGMENTS)
    t = np.asarray(res.t)
    Y = np.asarray(res.y)
    if not res.success and t[-1] < t1:
        FALLBACKS["count"] += 1
        t2, Y2 = _raw_projected(problem, Y[-1], float(t[-1]), t1)
        t = np.concatenate([t, t2[1:]])
        Y = np.concatenate([Y, Y2[1:]])
    return t, Y


# --------------------------------------------------------------------------------------------------
# Checking one trajectory against Theorem 5.1 / 5.2
# --------------------------------------------------------------------------------------------------

#: Relative tolerance on a step-to-step increase of V (integrator at RTOL/ATOL): ΔV ≤ TOL_V · V(0).
TOL_V = 1e-7
#: Relative tolerance of the pointwise V̇ bound (floating point): V̇ − bound ≤ TOL_RATE · scale.
TOL_RATE = 1e-8
#: Absolute tolerance on gate values (θ trajectories, the face θ = 0).
TOL_THETA = 1e-8
#: Relative tolerance on the weight-decay bound ||W(t)||² ≤ ||W(0)||² exp(2k∫θ − 2λt).
TOL_W = 1e-5
#: The horizon is long enough for the decay bound to guarantee ||W(T)|| ≤ W_DECAY · ||W(0)|| when λ > 0.
W_DECAY = 1e-3


@dataclass
class TrajectoryReport:
    """What one trajectory showed: ratios ``excess / tolerance`` per criterion (``> 1`` violates).

    ``ball_held`` — Lemma 1's ``||W|| ≤ R`` held on the whole trajectory;
    ``failed`` — a criterion was violated while the ball held (or at the
    horizon with the ball held throughout); ``inconclusive`` — the ball was
    left before any violation (never counted as a pass).
    """

    ratios: dict[str, float]
    ball_held: bool
    failed: bool
    inconclusive: bool
    horizon: float
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    tightness: float = -math.inf

    @property
    def worst(self) -> float:
        return max(self.ratios.values(), default=0.0)


def _rate_ratio(
    rate: Array, bound: Array, scale: Array, active: Array | None = None
) -> tuple[float, float]:
    """``max (V̇ − bound)/(TOL_RATE·scale)`` and the tightness ``max (V̇ − bound)/|bound|`` (≤ 0 when it holds).

    The tightness is taken over ``active`` points only (where the gate is open; at ``θ = 0`` the bound
    ``−λ||u||²`` is attained trivially).
    """
    ex = rate - bound
    ratio = float(np.max(ex / (TOL_RATE * scale + 1e-300), initial=-math.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        tight = ex / np.abs(bound)
    if active is not None:
        tight = tight[active]
    tight = tight[np.isfinite(tight)]
    return ratio, float(np.max(tight)) if tight.size else -math.inf


def _lower_sum(t: Array, f: Array) -> Array:
    """Cumulative lower Riemann sum of ``f`` (J, ...) on the step grid ``t`` (J,) (a lower bound of ``∫f`` for ``f``
    monotone per step)."""
    dt = np.diff(t).reshape((-1,) + (1,) * (f.ndim - 1))
    return np.concatenate([np.zeros((1, *f.shape[1:])), np.cumsum(np.minimum(f[1:], f[:-1]) * dt, axis=0)])


def _upper_sum(t: Array, f: Array) -> Array:
    dt = np.diff(t).reshape((-1,) + (1,) * (f.ndim - 1))
    return np.concatenate([np.zeros((1, *f.shape[1:])), np.cumsum(np.maximum(f[1:], f[:-1]) * dt, axis=0)])


def _first_exit(wsq: Array, R: float) -> int:
    out = np.nonzero(wsq > R * R * (1 + 1e-9))[0]
    return int(out[0]) if out.size else len(wsq)


def check_block_trajectory(
    problem: BlockProblem, y0: Array, a: float, rho: float, R: float, *, k: float | None = None,
    horizon: float | None = None,
) -> TrajectoryReport:
    """Integrate [24] from ``y0 ∈ D_B(a, ρ)`` and test Theorem 5.1's claims on every accepted step.

    Criteria (each a ratio excess/tolerance): ``V_B`` non-increasing
    (``ΔV ≤ TOL_V·V(0)``); ``V̇_B ≤ −(κ_B θ_B + λ||W||²)`` at every step [32];
    ``θ_B(t) ≤ max(0, θ_B(0) − (c_B − kρ)t)`` (finite-time hit); ``θ_B(T) ≈ 0``;
    with ``λ > 0`` ``||W(t)||² ≤ ||W(0)||² exp(2k∫θ_B − 2λt)`` (from
    ``d/dt ½||W||² ≤ (kθ_B − λ)||W||²``, ``∫θ_B`` bounded by the linear bound
    on ``θ_B``) with the horizon long enough that this forces
    ``||W(T)|| ≤ W_DECAY·||W(0)||``.  ``k`` defaults to ``lemma1_k(problem, R)``
    (a wrong ``k`` is how the negative control breaks the certificate).
    """
    k = lemma1_k(problem, R) if k is None else k
    if not admissible(a, rho, problem.c_B, k, R):
        raise ValueError(f"check_block_trajectory: (a={a:g}, rho={rho:g}) is not admissible for k={k:g}, R={R:g}")
    if horizon is None:
        horizon = block_horizon(problem, y0, rho, k)
    t, Y = integrate(problem, y0, horizon)
    return judge_block_trajectory(problem, y0, a, rho, R, k, t, Y)


def block_horizon(problem: BlockProblem, y0: Array, rho: float, k: float) -> float:
    """The horizon of :func:`check_block_trajectory`: past the hit-time bound, and with ``λ > 0`` long enough for
    the weight-decay bound to force ``||W(T)|| ≤ W_DECAY·||W(0)||``."""
    st0 = unpack(y0, problem)
    th0 = float(st0.theta_B)
    delta = problem.c_B - k * rho
    t_hit = th0 / delta if delta > 0 else math.inf
    base = 1.2 * t_hit + 1.0 if math.isfinite(t_hit) else 50.0
    # exp(k ∫θ_B − λT) ≤ W_DECAY / 2 with ∫θ_B ≤ θ_B(0) t_hit / 2
    lam = problem.lam
    extra = (math.log(2 / W_DECAY) + 0.5 * k * th0 * min(t_hit, base)) / lam if lam > 0 else 4.0 * base
    return base + extra


def judge_block_trajectory(
    problem: BlockProblem, y0: Array, a: float, rho: float, R: float, k: float, t: Array, Y: Array
) -> TrajectoryReport:
    """Theorem 5.1's criteria (see :func:`check_block_trajectory`) on the states ``Y`` (J, D) at times ``t`` (J,)
    of a trajectory from ``y0`` (``t[0] = 0``): every accepted step of the reference integrator, or the output
    times of a batched one.  (One trajectory of :func:`judge_block_batch`.)"""
    return judge_block_batch(problem, np.asarray(y0)[None], np.array([a]), np.array([rho]), np.array([R]),
                             np.array([k]), t, np.asarray(Y)[:, None])[0]


def _pre_exit(wsq: Array, R: Array) -> Array:
    """(J, B) mask of the times before trajectory ``b`` first leaves the ball ``||W||² ≤ R_b²`` (as
    :func:`_first_exit`)."""
    return np.asarray(np.cumsum(wsq > R**2 * (1 + 1e-9), axis=0) == 0)


def _masked_max(x: Array, mask: Array, initial: float) -> Array:
    """Column-wise max of ``x`` (J, B) over ``mask``; ``initial`` where the mask is empty or smaller."""
    return np.asarray(np.max(np.where(mask, x, initial), axis=0, initial=initial))


def _rate_ratios(rate: Array, bound: Array, scale: Array, pre: Array, active: Array | None = None
                 ) -> tuple[Array, Array]:
    """Column-wise :func:`_rate_ratio` over the times in ``pre`` (J, B)."""
    ex = rate - bound
    ratio = _masked_max(ex / (TOL_RATE * scale + 1e-300), pre, -math.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tight = ex / np.abs(bound)
    use = pre & np.isfinite(tight) & (True if active is None else active)
    return ratio, _masked_max(tight, use, -math.inf)


def judge_block_batch(
    problem: BlockProblem, Y0: Array, a: Array, rho: Array, R: Array, k: Array, t: Array, Y: Array
) -> list[TrajectoryReport]:
    """:func:`judge_block_trajectory` for ``B`` trajectories at once: starts ``Y0`` (B, D), their ``a``, ``ρ``,
    ``R``, ``k`` (B,), common times ``t`` (J,) and states ``Y`` (J, B, D)."""
    c, lam = problem.c_B, problem.lam
    t = np.asarray(t, dtype=np.float64)
    tt = t[:, None]
    st0 = unpack(Y0, problem)
    th0, w0 = np.asarray(st0.theta_B), np.asarray(st0.weight_norm_sq)
    delta = c - k * rho
    with np.errstate(divide="ignore"):
        t_hit = np.where(delta > 0, th0 / np.where(delta > 0, delta, 1.0), math.inf)
    st = unpack(Y, problem)
    wsq = np.asarray(st.weight_norm_sq)
    pre = _pre_exit(wsq, R)
    V = lyapunov_block(problem, Y, a)
    ratios: dict[str, Array] = {}
    ratios["V_increase"] = _masked_max(np.diff(V, axis=0), pre[1:], 0.0) / (TOL_V * np.maximum(V[0], 1e-300))
    Yc = clip_gates(problem, Y)  # rates at Π_H of the integrator's state (faces overshot by ~ATOL)
    stc = unpack(Yc, problem)
    pv = projected_velocity(problem, Yc.reshape(-1, problem.D)).reshape(Yc.shape)
    rate = lyapunov_block_rate(problem, Yc, a, v=pv)
    bound = block_rate_bound(problem, Yc, a, rho, k)
    sd = unpack(pv, problem)
    scale = (np.sum(np.abs(stc.W1 * sd.W1), axis=(-2, -1)) + np.sum(np.abs(stc.W2 * sd.W2), axis=(-2, -1))
             + a * np.abs(sd.theta_B) + np.abs(bound))
    ratios["Vdot_bound"] = _rate_ratios(rate, bound, scale, pre)[0]
    sharp = block_rate_bound(problem, Yc, a, rho, k, sharp=True)
    ratios["Vdot_sharp"], tight = _rate_ratios(rate, sharp, scale + np.abs(sharp), pre, stc.theta_B > 0)
    lin = np.where(delta > 0, np.maximum(0.0, th0 - delta * tt), th0)
    ratios["theta_linear"] = _masked_max(st.theta_B - lin, pre, 0.0) / TOL_THETA
    if lam > 0:
        integ = np.where(tt < t_hit, th0 * tt - 0.5 * delta * tt**2, 0.5 * th0 * np.minimum(t_hit, 1e300))
        logb = np.log(np.maximum(w0, 1e-300)) + 2 * k * integ - 2 * lam * tt
        with np.errstate(divide="ignore"):
            excess = np.log(np.maximum(wsq, 1e-300)) - logb
        ratios["W_decay"] = np.where(w0 > 0, _masked_max(excess, pre, 0.0) / math.log1p(TOL_W), 0.0)
    held = np.asarray(pre.all(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        w_ratio = np.where(w0 > 0, np.sqrt(wsq[-1] / np.where(w0 > 0, w0, 1.0)), 0.0)
    gmin = np.min(gamma_B(problem, Y), axis=0)
    reports = []
    for b in range(Y0.shape[0]):
        rb = {key: float(v[b]) for key, v in ratios.items()}
        if held[b]:
            rb["theta_final"] = max(float(st.theta_B[-1, b]), 0.0) / TOL_THETA
            if lam > 0 and w0[b] > 0:
                rb["W_final"] = float(w_ratio[b]) / W_DECAY
        failed = max(rb.values()) > 1.0
        final = {"theta_B": float(st.theta_B[-1, b]), "W_ratio": float(w_ratio[b]), "t_hit_bound": float(t_hit[b]),
                 "gamma_B_min": float(gmin[b])}
        reports.append(TrajectoryReport(rb, bool(held[b]), failed, (not held[b]) and not failed, float(t[-1]),
                                        len(t), final, float(tight[b])))
    return reports


def check_unit_trajectory(
    problem: BlockProblem, y0: Array, a: float, rho: float, R: float, i: int, *, k: float | None = None,
    max_extensions: int = 6,
) -> TrajectoryReport:
    """Integrate [24] from ``y0 ∈ D_i(a, ρ)`` and test Theorem 5.2's claims, checking Lemma 1's ball.

    Criteria: ``V_i`` non-increasing; ``V̇_i ≤ −(κ_1 θ_B θ_i + λ||u_i||²)`` [34]
    and the sharper ``V̇_i ≤ −(κ_1 θ_B + λ||u_i||²)`` while ``θ_i > 0``;
    ``θ_i(t) ≤ max(0, θ_i(0) − (c_1 − kρ)∫θ_B)``; ``θ_B θ_i ≈ 0`` at the
    horizon (extended, doubling, until it is or ``max_extensions`` is spent);
    with ``λ > 0`` ``||u_i(t)||² ≤ ||u_i(0)||² exp(2k∫θ_Bθ_i − 2λt)`` and
    ``||u_i(T)|| ≤ W_DECAY·||u_i(0)||``.  Steps after the first exit from the
    ball ``||W|| ≤ R`` are not judged; a trajectory that left the ball
    without a prior violation is inconclusive.
    """
    k = lemma1_k(problem, R) if k is None else k
    lam = problem.lam
    if not admissible(a, rho, problem.c_1, k, R):
        raise ValueError(f"check_unit_trajectory: (a={a:g}, rho={rho:g}) is not admissible for k={k:g}, R={R:g}")
    T = unit_horizon(problem, y0, rho, k, i)
    ts, Ys = [np.zeros(1)], [np.asarray(y0, dtype=np.float64)[None]]
    t_now, y_now = 0.0, np.asarray(y0, dtype=np.float64)
    for _ in range(max_extensions + 1):
        t, Y = integrate(problem, y_now, t_now + T, t0=t_now)
        ts.append(t[1:])
        Ys.append(Y[1:])
        t_now, y_now = float(t[-1]), Y[-1]
        sn = unpack(y_now, problem)
        if float(sn.theta_B) * float(sn.theta[i]) <= TOL_THETA or float(sn.weight_norm_sq) > R * R:
            break
        T *= 2.0
    if lam > 0:
        t, Y = integrate(problem, y_now, t_now + math.log(2 / W_DECAY) / lam + 1.0, t0=t_now)
        ts.append(t[1:])
        Ys.append(Y[1:])
    return judge_unit_trajectory(problem, y0, a, rho, R, k, i, np.concatenate(ts), np.concatenate(Ys))


def unit_horizon(problem: BlockProblem, y0: Array, rho: float, k: float, i: int) -> float:
    """The first horizon of :func:`check_unit_trajectory`: twice the time ``θ_i``'s bound needs to reach 0 with
    ``θ_B`` frozen at ``θ_B(0)`` (plus 1; at most 1e4)."""
    st0 = unpack(y0, problem)
    thi0, tB0 = float(st0.theta[i]), float(st0.theta_B)
    delta = problem.c_1 - k * rho
    T = 2.0 * thi0 / max(delta * tB0, 1e-12) + 1.0 if delta > 0 else 50.0
    return min(T, 1e4)


def judge_unit_trajectory(
    problem: BlockProblem, y0: Array, a: float, rho: float, R: float, k: float, i: int, t: Array, Y: Array
) -> TrajectoryReport:
    """Theorem 5.2's criteria (see :func:`check_unit_trajectory`) on the states ``Y`` (J, D) at times ``t`` (J,)
    of a trajectory from ``y0`` (``t[0] = 0``); the integrals of ``θ_B`` and ``θ_Bθ_i`` are bounded by lower /
    upper Riemann sums on ``t`` (per-step monotone), so ``t`` must be fine.  (One trajectory of
    :func:`judge_unit_batch`.)"""
    return judge_unit_batch(problem, np.asarray(y0)[None], np.array([a]), np.array([rho]), np.array([R]),
                            np.array([k]), np.array([i]), t, np.asarray(Y)[:, None])[0]


def judge_unit_batch(
    problem: BlockProblem, Y0: Array, a: Array, rho: Array, R: Array, k: Array, units: Array, t: Array, Y: Array
) -> list[TrajectoryReport]:
    """:func:`judge_unit_trajectory` for ``B`` trajectories at once: starts ``Y0`` (B, D), their ``a``, ``ρ``,
    ``R``, ``k`` and unit index ``units`` (B,), common times ``t`` (J,) and states ``Y`` (J, B, D)."""
    c, lam = problem.c_1, problem.lam
    t = np.asarray(t, dtype=np.float64)
    tt = t[:, None]
    cols = np.arange(Y0.shape[0])
    st0 = unpack(Y0, problem)
    thi0 = np.asarray(st0.theta[cols, units])
    u0 = np.sum(st0.W1[cols, units] ** 2, axis=-1) + np.sum(st0.W2[cols, :, units] ** 2, axis=-1)
    delta = c - k * rho
    st = unpack(Y, problem)
    wsq = np.asarray(st.weight_norm_sq)
    pre = _pre_exit(wsq, R)
    th_i = st.theta[:, cols, units]  # (J, B)
    v_of = lambda W2: np.moveaxis(W2, -1, -2)[:, cols, units]  # noqa: E731  (J, B, p): column v_i of each W_2
    usq = np.sum(st.W1[:, cols, units] ** 2, axis=-1) + np.sum(v_of(st.W2) ** 2, axis=-1)
    V = 0.5 * usq + a * th_i  # V_i [33]
    ratios: dict[str, Array] = {}
    ratios["V_increase"] = _masked_max(np.diff(V, axis=0), pre[1:], 0.0) / (TOL_V * np.maximum(V[0], 1e-300))
    Yp = clip_gates(problem, Y)  # rates at Π_H of the integrator's state (faces overshot by ~ATOL)
    stp = unpack(Yp, problem)
    sd = unpack(projected_velocity(problem, Yp.reshape(-1, problem.D)).reshape(Yp.shape), problem)
    wdw = stp.W1[:, cols, units] * sd.W1[:, cols, units]
    vdv = v_of(stp.W2) * v_of(sd.W2)
    dth_i = sd.theta[:, cols, units]
    rate = np.sum(wdw, axis=-1) + np.sum(vdv, axis=-1) + a * dth_i  # V̇_i along [24]
    tp_i = stp.theta[:, cols, units]
    usq_p = np.sum(stp.W1[:, cols, units] ** 2, axis=-1) + np.sum(v_of(stp.W2) ** 2, axis=-1)
    k1 = kappa(a, rho, c, k)
    bound = -(k1 * stp.theta_B * tp_i + lam * usq_p)  # [34]
    scale = np.sum(np.abs(wdw), axis=-1) + np.sum(np.abs(vdv), axis=-1) + a * np.abs(dth_i) + np.abs(bound)
    ratios["Vdot_bound"] = _rate_ratios(rate, bound, scale, pre)[0]
    sharp = -(k1 * stp.theta_B * (tp_i > 0) + lam * usq_p)
    ratios["Vdot_sharp"], tight = _rate_ratios(rate, sharp, scale + np.abs(sharp), pre, stp.theta_B * tp_i > 0)
    I_B = _lower_sum(t, np.clip(st.theta_B, 0.0, None))
    lin = np.where(delta > 0, np.maximum(0.0, thi0 - delta * I_B), thi0)
    ratios["theta_linear"] = _masked_max(th_i - lin, pre, 0.0) / TOL_THETA
    if lam > 0:
        I_p = _upper_sum(t, np.clip(st.theta_B * th_i, 0.0, None))
        with np.errstate(divide="ignore"):
            logb = np.log(np.where(u0 > 0, u0, 1.0)) + 2 * k * I_p - 2 * lam * tt
            excess = np.log(np.maximum(usq, 1e-300)) - logb
        ratios["W_decay"] = np.where(u0 > 0, _masked_max(excess, pre, 0.0) / math.log1p(TOL_W), 0.0)
    held = np.asarray(pre.all(axis=0))
    prod_final = np.maximum(st.theta_B[-1], 0.0) * np.maximum(th_i[-1], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        u_ratio = np.where(u0 > 0, np.sqrt(usq[-1] / np.where(u0 > 0, u0, 1.0)), 0.0)
    w_max = np.sqrt(wsq.max(axis=0))
    reports = []
    for b in cols:
        rb = {key: float(v[b]) for key, v in ratios.items() if key != "W_decay" or u0[b] > 0}
        if held[b]:
            rb["product_final"] = float(prod_final[b]) / TOL_THETA
            if lam > 0 and u0[b] > 0:
                rb["W_final"] = float(u_ratio[b]) / W_DECAY
        failed = max(rb.values()) > 1.0
        final = {"theta_B": float(st.theta_B[-1, b]), "theta_i": float(th_i[-1, b]), "product": float(prod_final[b]),
                 "u_ratio": float(u_ratio[b]), "W_max": float(w_max[b])}
        reports.append(TrajectoryReport(rb, bool(held[b]), failed, (not held[b]) and not failed, float(t[-1]),
                                        len(t), final, float(tight[b])))
    return reports


# --------------------------------------------------------------------------------------------------
# Registered checks (group "dynamics")
# --------------------------------------------------------------------------------------------------

_METRIC = (
    f"max over criteria of excess/tolerance (<= 1 passes): ΔV ≤ {TOL_V:g}·V(0) per integrator step; "
    f"V̇ − bound ≤ {TOL_RATE:g}·scale; θ excess ≤ {TOL_THETA:g}; log weight-decay excess ≤ {TOL_W:g}; "
    f"final weights ≤ {W_DECAY:g}·initial"
)


def _summarise(name: str, reports: list[TrajectoryReport], extra: dict[str, Any]) -> CheckResult:
    failures = sum(r.failed for r in reports)
    inconclusive = sum(r.inconclusive for r in reports)
    keys = sorted({key for r in reports for key in r.ratios})
    per = {key: max((r.ratios.get(key, 0.0) for r in reports), default=0.0) for key in keys}
    details: dict[str, Any] = {
        "worst_ratio_per_criterion": per,
        "failed_criteria": sorted({key for r in reports if r.failed for key, v in r.ratios.items() if v > 1.0}),
        "ball_left": sum(not r.ball_held for r in reports),
        "tightest_vdot_relative_slack": max((r.tightness for r in reports), default=-math.inf),
        "horizon_range": [min((r.horizon for r in reports), default=0.0),
                          max((r.horizon for r in reports), default=0.0)],
        "median_steps": float(np.median([r.steps for r in reports])) if reports else 0.0,
        "integrator": {"reference": f"theory.ode.odeint({METHOD})", "rtol": RTOL, "atol": ATOL,
                       "fallbacks_to_raw_projected_DOP853": FALLBACKS["count"]},
    }
    details.update(extra)
    worst = max((r.worst for r in reports), default=0.0)
    return CheckResult(name, len(reports), failures, worst, inconclusive, 1.0, _METRIC, details=details)


def theorem51_check(
    rng: np.random.Generator, instances: int, progress: Callable[[], None], *, k_scale: float = 1.0,
    R_range: tuple[float, float] = (0.05, 2.0), aligned_frac: float = 0.5, name: str = "theorem5.1",
) -> CheckResult:
    """Theorem 5.1 on random blocks: starts inside ``D_B(a, ρ)``, integrated, every claim tested.

    ``k_scale < 1`` uses a deliberately wrong (too small) Lemma-1 constant: the
    negative control, whose "certified" regions reach useful weights and must
    produce failures.
    """
    reports: list[TrajectoryReport] = []
    lam0 = aligned_n = 0
    gamma_slack = math.inf  # [26]: inf_t γ_B ≥ c_B along every trajectory
    FALLBACKS["count"] = 0
    for _ in range(instances):
        P = random_problem(rng)
        R = _loguniform(rng, *R_range)
        k = lemma1_k(P, R) * k_scale
        a = _loguniform(rng, 0.05, 20.0)
        rho = float(rng.uniform(0.3, 0.99)) * float(rho_sup(a, P.c_B, k, R))
        aligned = bool(rng.uniform() < aligned_frac)
        y0 = sample_block_start(P, rng, a, rho, aligned=aligned)
        rep = check_block_trajectory(P, y0, a, rho, R, k=k)
        reports.append(rep)
        gamma_slack = min(gamma_slack, rep.final["gamma_B_min"] - P.c_B)
        lam0 += P.lam == 0
        aligned_n += aligned
        progress()
    extra = {"lambda_zero": lam0, "aligned_starts": aligned_n, "k_scale": k_scale,
             "min_over_trajectories_of_inf_gamma_B_minus_c_B": gamma_slack}
    return _summarise(name, reports, extra)


def theorem52_check(
    rng: np.random.Generator, instances: int, progress: Callable[[], None], *, k_scale: float = 1.0,
    R_range: tuple[float, float] = (2.0, 6.0), aligned_frac: float = 0.5,
    others_frac: tuple[float, float] = (0.02, 0.3), name: str = "theorem5.2",
) -> CheckResult:
    """Theorem 5.2 on random blocks: unit ``i`` starts inside ``D_i(a, ρ)``, the block inside the ball ``||W|| ≤ R``.

    Trajectories whose weights leave the ball (other units growing) before any
    violation are inconclusive.  ``k_scale < 1`` is the negative control.
    """
    reports: list[TrajectoryReport] = []
    lam0 = aligned_n = 0
    FALLBACKS["count"] = 0
    for _ in range(instances):
        P = random_problem(rng)
        i = int(rng.integers(P.n))
        R = _loguniform(rng, *R_range)
        k = lemma1_k(P, R) * k_scale
        a = _loguniform(rng, 0.05, 20.0)
        rho = float(rng.uniform(0.3, 0.99)) * float(rho_sup(a, P.c_1, k, R))
        aligned = bool(rng.uniform() < aligned_frac)
        y0 = sample_unit_start(P, rng, a, rho, R, i, aligned=aligned, others_frac=float(rng.uniform(*others_frac)))
        reports.append(check_unit_trajectory(P, y0, a, rho, R, i, k=k))
        lam0 += P.lam == 0
        aligned_n += aligned
        progress()
    return _summarise(name, reports, {"lambda_zero": lam0, "aligned_starts": aligned_n, "k_scale": k_scale})


register(
    "theorem5.1", instances=100, group="dynamics",
    description="Theorem 5.1 [31]-[32]: from random starts in D_B(a, rho) (k = Lemma-1 constant of §7, 2rho <= R^2) "
    "V_B never increases, V_B' <= -(kappa_B theta_B + lambda||W||^2), theta_B <= theta_B(0) - (c_B - k rho) t hits 0 "
    "in finite time, and with lambda > 0 ||W||^2 <= ||W(0)||^2 exp(2k int theta_B - 2 lambda t) -> 0.",
)(theorem51_check)

register(
    "theorem5.2", instances=100, group="dynamics",
    description="Theorem 5.2 [33]-[34]: from random starts with unit i in D_i(a, rho) and ||W|| <= R, V_i never "
    "increases, V_i' <= -(kappa_1 theta_B theta_i + lambda||u_i||^2), "
    "theta_i <= theta_i(0) - (c_1 - k rho) int theta_B, theta_B theta_i -> 0 and with lambda > 0 (w_i, v_i) -> 0; "
    "trajectories leaving Lemma 1's ball are inconclusive.",
)(theorem52_check)


def _vdot_points(
    problem: BlockProblem, rng: np.random.Generator, count: int, a: float, rho: float, R: float, unit: int | None
) -> Array:
    """``count`` states in ``D_B(a, ρ)`` (``unit=None``) or in ``D_i(a, ρ)`` with ``||W|| ≤ R``.

    Half with every weight along :func:`useful_direction`; a third pushed to the boundary ``V = ρ``.
    """
    pts = []
    for j in range(count):
        aligned = j % 2 == 0
        if unit is None:
            y = sample_block_start(problem, rng, a, rho, aligned=aligned)
        else:
            frac = float(rng.uniform(0, 0.9))
            y = sample_unit_start(problem, rng, a, rho, R, unit, aligned=aligned, others_frac=frac)
        if j % 3 == 0:  # push to the boundary V = ρ(1 − 1e-6) by scaling the weights of the relevant part
            st = unpack(y, problem)
            if unit is None:
                q = 0.5 * float(st.weight_norm_sq)
                target = rho * (1 - 1e-6) - a * float(st.theta_B)
                s = math.sqrt(max(target, 0.0) / q) if q > 0 else 1.0
                y = problem.pack(st.theta_B, st.theta, st.W1 * s, st.W2 * s)
            else:
                q = 0.5 * float(unit_weight_sq(problem, y, unit))
                target = rho * (1 - 1e-6) - a * float(st.theta[unit])
                s = math.sqrt(max(target, 0.0) / q) if q > 0 else 1.0
                W1, W2 = st.W1.copy(), st.W2.copy()
                W1[unit] *= s
                W2[:, unit] *= s
                if float(np.sum(W1**2) + np.sum(W2**2)) > R * R:
                    continue
                y = problem.pack(st.theta_B, st.theta, W1, W2)
        pts.append(y)
    return np.stack(pts)


def vdot_check(
    rng: np.random.Generator, instances: int, progress: Callable[[], None], *, unit: bool, k_scale: float = 1.0,
    points: int = 192, name: str | None = None,
) -> CheckResult:
    """The pointwise bound [32] (``unit=False``) or [34] (``unit=True``) at random points of the regions (exact)."""
    failures = 0
    worst = 0.0
    tight = -math.inf
    total = 0
    for _ in range(instances):
        P = random_problem(rng)
        R = _loguniform(rng, 0.05, 2.0) if not unit else _loguniform(rng, 0.5, 3.0)
        k = lemma1_k(P, R) * k_scale
        c = P.c_1 if unit else P.c_B
        a = _loguniform(rng, 0.05, 20.0)
        rho = float(rng.uniform(0.3, 0.999)) * float(rho_sup(a, c, k, R))
        i = int(rng.integers(P.n)) if unit else None
        Y = _vdot_points(P, rng, points, a, rho, R, i)
        total += len(Y)
        if i is None:
            rate = lyapunov_block_rate(P, Y, a)
            bound = block_rate_bound(P, Y, a, rho, k)
            sharp = block_rate_bound(P, Y, a, rho, k, sharp=True)
        else:
            rate = lyapunov_unit_rate(P, Y, a, i)
            bound = unit_rate_bound(P, Y, a, rho, k, i)
            sharp = unit_rate_bound(P, Y, a, rho, k, i, sharp=True)
        Yd = projected_velocity(P, Y)
        scale = np.sum(np.abs(Y[:, 1 + P.n:] * Yd[:, 1 + P.n:]), axis=-1) + a * np.max(np.abs(Yd[:, :1 + P.n]), -1)
        ratio = _rate_ratio(rate, bound, scale + np.abs(bound))[0]
        gate = Y[:, 0] if i is None else Y[:, 0] * Y[:, 1 + i]
        ratio_sharp, tt = _rate_ratio(rate, sharp, scale + np.abs(sharp), gate > 0)
        ratio = max(ratio, ratio_sharp)
        failures += ratio > 1.0
        worst = max(worst, ratio)
        tight = max(tight, tt)
        progress()
    label = name or ("vdot5.2" if unit else "vdot5.1")
    details = {"points": total, "tightest_relative_slack": tight, "k_scale": k_scale,
               "note": "both the stated bound and the sharp form (kappa·1[theta > 0] for the gate factor) are "
                       "tested; tightest_relative_slack = max (V' - sharp bound)/|sharp bound| over points "
                       "(<= 0 when it holds, near 0 when sharp; Lemma 1's k is conservative)"}
    metric = f"max over points of (V' - bound)/({TOL_RATE:g}·scale); <= 1 passes"
    return CheckResult(label, instances, failures, worst, 0, 1.0, metric, details=details)


register(
    "vdot5.1", instances=40, group="dynamics",
    description="The Lyapunov rate bound [32] V_B' <= -(kappa_B theta_B + lambda||W||^2) at random points of "
    "D_B(a, rho), a third on its boundary, half with every unit along the most useful direction (exact field).",
)(lambda rng, n, progress: vdot_check(rng, n, progress, unit=False))

register(
    "vdot5.2", instances=40, group="dynamics",
    description="The Lyapunov rate bound [34] V_i' <= -(kappa_1 theta_B theta_i + lambda||u_i||^2) at random points "
    "of D_i(a, rho) inside Lemma 1's ball ||W|| <= R (exact field).",
)(lambda rng, n, progress: vdot_check(rng, n, progress, unit=True))


__all__ = [
    "ATOL",
    "RTOL",
    "TrajectoryReport",
    "Witness",
    "admissible",
    "block_rate_bound",
    "block_witness",
    "certified_block",
    "certified_unit",
    "check_block_trajectory",
    "check_unit_trajectory",
    "clip_gates",
    "gamma_B",
    "gamma_lower_bounds",
    "hit_time_bound",
    "in_block_region",
    "in_unit_region",
    "integrate",
    "kappa",
    "lemma1_coeffs",
    "lyapunov_block",
    "lyapunov_block_rate",
    "lyapunov_unit",
    "lyapunov_unit_rate",
    "projected_velocity",
    "random_problem",
    "rho_max",
    "rho_sup",
    "sample_block_start",
    "sample_unit_start",
    "theorem51_check",
    "theorem52_check",
    "union_boundary",
    "union_margin",
    "union_margin_auto",
    "unit_rate_bound",
    "unit_weight_sq",
    "useful_direction",
    "vdot_check",
    "weight_sq",
]
