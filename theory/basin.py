"""Domains of attraction of the pruned sets in 2-D slices of the canonical block (THEORY §6–§7).

A *slice* fixes a problem (§7), a base state and a direction, and varies two
coordinates of the initial condition of the projected ODE [22]/[24]:

* ``layer``: ``θ_B`` (x) against the weight scale ``s = ||W||`` (y), with
  ``W = s·Ŵ`` along a fixed unit direction ``Ŵ`` (the block's fitted weights,
  normalised) and every ``θ_i = 1``;
* ``unit``: ``θ_i`` (x) against ``s = ||(w_i, v_i)||`` (y) of one unit ``i``
  along its fitted direction, the other units at their fitted weights,
  ``θ_B = 1`` and the other gates at 1.

Every start is integrated with :func:`theory.ode.odeint_batch` (adaptive
RKC, ``rtol = 1e-6``, ``atol = 1e-8``, with face handling; the compiled kernels
of :mod:`theory.block_ode` when numba is installed) in segments; after each
segment the trajectories that have *converged* are labelled and dropped
(:func:`classify`):

* ``block pruned`` — ``θ_B`` on the face 0 with outward velocity (``θ_B`` pinned; the
  weights then decay as ``e^{−λt}``: the set ``S_B`` of Theorem 5.1);
* ``all units pruned`` — every ``θ_i`` pinned at 0 (then ``g_B = 0`` and ``θ_B``
  follows to 0 at rate ``c_B``);
* ``some units pruned`` / ``survived`` — the max-norm of the projected
  velocity (without the decaying weights of pruned units) is below
  ``Tolerances.vel`` and some / no gate is pinned at 0;
* ``undecided`` — none of these by the horizon.

The *empirical basin of "pruned"* is {block pruned, all units pruned} for the
layer slice and {unit ``i`` pinned at 0, or the block pruned} (i.e.
``θ_B θ_i → 0``) for the unit slice.  The *certified region* is the union over
``a`` (and, for the layer, over the radius ``R``) of the Lyapunov regions of
Theorems 5.1/5.2 (:mod:`theory.certificates`; closed forms).  For the unit
slice the certificate needs Lemma 1's ball ``||W|| ≤ R`` along the
trajectory; ``R`` is fixed per slice (default ``1.25 ||W_fit||``, see
:func:`map_slice`) and the fraction of certified starts whose trajectories
stayed in the ball is reported (``certified_ball_held``).

Convergence: a "converged" label (survived / some units pruned) must be seen
at two consecutive segment ends; pinned labels are final at once.  Fixed-step
RK4 (``method="rk4"``) at ``dt = 2/λ_max`` (RK4 is stable to ``2.78/λ_max``)
gives the same labels as ``dt/2`` on the default slices (layer 400/400, unit
399/400 cells at 20×20; the one difference is a boundary cell) and as a
horizon of 200 instead of 100; the default RKC gives the same labels as that
RK4 on all 64×64 cells of both default slices, 1.6–1.9× faster.

:func:`map_slice` returns a :class:`BasinMap`; :meth:`BasinMap.areas` gives
the bookkeeping (certified vs empirical area fractions, the ``ε = 0.1``
strip ``{θ < ε}`` of the practical pruning rule relative to both).
``python -m theory basin`` (:func:`add_basin_parser`) maps one slice and
writes JSON + a figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .block_model import BlockProblem, lemma1_k, objective, objective_gradient, unpack, velocity
from .block_model import field as block_field
from .certificates import (
    lemma1_coeffs,
    union_boundary,
    union_margin,
    union_margin_auto,
    unit_weight_sq,
)
from .ode import backend_for
from .projection import projected_field

Array = np.ndarray

BLOCK_PRUNED, ALL_UNITS_PRUNED, SOME_UNITS_PRUNED, SURVIVED, UNDECIDED = 0, 1, 2, 3, -1
#: Label codes -> names (the ``labels`` arrays of :class:`BasinMap` hold the codes).
LABELS: dict[int, str] = {
    BLOCK_PRUNED: "block pruned",
    ALL_UNITS_PRUNED: "all units pruned",
    SOME_UNITS_PRUNED: "some units pruned",
    SURVIVED: "survived",
    UNDECIDED: "undecided",
}
#: The practical pruning threshold of the paper's Algorithm 1 (Table 1): a gate below ε is removed.
EPS = 0.1


# --------------------------------------------------------------------------------------------------
# The standard problem of the maps
# --------------------------------------------------------------------------------------------------


def slice_problem(
    seed: int = 0, *, n: int = 2, lam: float = 0.1, c_B: float = 4.0, c_1: float = 0.5
) -> BlockProblem:
    """The block used by the maps: ``m = 2, n = 2, p = 2, N = 32``, a 2-unit teacher (§7).

    With the defaults (seed 0) the block is clearly useful at its fitted
    weights (``g_B ≈ −41`` against ``γ_B = c_B + c_1|θ|₁ = 5``; ``g_i ≈ −16, −12``
    against ``c_1 = 0.5``), so it survives at large weights and is pruned at
    small ones: the informative picture.  ``n = 2`` (as many units as the
    teacher): with redundant units (``n = 4``) the flat directions of the
    fitted block converge at rate ``~λ`` and many starts are still undecided
    after ``t = 150``.
    """
    return BlockProblem.random(
        np.random.default_rng(seed), m=2, n=n, p=2, N=32, lam=lam, c_B=c_B, c_1=c_1,
        teacher_units=2, teacher_scale=1.5, noise=0.1,
    )


def fit_weights(problem: BlockProblem, seed: int = 0) -> tuple[Array, Array]:
    """Minimise ``L(W, Θ = 1)`` over the weights (L-BFGS from a small random start): ``(W1, W2)``.

    The fitted weights give the slice directions: a trained, useful block.
    """
    from scipy.optimize import minimize

    n, m1, p = problem.n, problem.m + 1, problem.p
    ones = np.ones(n)

    def fun(w: Array) -> tuple[float, Array]:
        y = problem.pack(1.0, ones, w[: n * m1].reshape(n, m1), w[n * m1:].reshape(p, n))
        return float(objective(problem, y)), objective_gradient(problem, y)[1 + n:]

    w0 = 0.5 * np.random.default_rng(seed + 100).standard_normal(n * m1 + p * n)
    res = minimize(fun, w0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10})
    return res.x[: n * m1].reshape(n, m1), res.x[n * m1:].reshape(p, n)


# --------------------------------------------------------------------------------------------------
# Classification of a (converged) state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerances:
    """Convergence test of :func:`classify`.

    ``face`` — a gate within ``face`` of 0 whose raw velocity points out of
    ``H`` counts as pinned (pruned); ``vel`` — a trajectory has converged when
    the max-norm of its projected velocity (without the weights of pruned
    units, which decay at rate ``λ``) is below ``vel``.
    """

    face: float = 1e-9
    vel: float = 1e-3


def classify(problem: BlockProblem, Y: Array, tol: Tolerances = Tolerances()) -> tuple[Array, Array]:
    """Labels of states ``Y`` (B, D) by the rules of the module doc, and the pinned-at-0 mask (B, 1+n) of the gates."""
    Y = np.asarray(Y, dtype=np.float64)
    sl = problem.theta_slice
    v = velocity(problem, Y)
    th = Y[:, sl]
    pinned0 = (th <= tol.face) & (v[:, sl] <= 0)
    vp = v.copy()
    vp[:, sl] = projected_field(th, v[:, sl])
    st = unpack(vp, problem)
    dead = pinned0[:, 1:]  # units pinned at 0: their weights decay as e^{-λt}
    W1d = np.where(dead[:, :, None], 0.0, st.W1)
    W2d = np.where(dead[:, None, :], 0.0, st.W2)
    speed = np.maximum.reduce([
        np.max(np.abs(vp[:, sl]), axis=1),
        np.max(np.abs(W1d), axis=(1, 2)),
        np.max(np.abs(W2d), axis=(1, 2)),
    ])
    labels = np.full(Y.shape[0], UNDECIDED, dtype=np.int8)
    converged = speed <= tol.vel
    n_dead = dead.sum(axis=1)
    labels[converged & (n_dead == 0)] = SURVIVED
    labels[converged & (n_dead > 0)] = SOME_UNITS_PRUNED
    labels[n_dead == problem.n] = ALL_UNITS_PRUNED
    labels[pinned0[:, 0]] = BLOCK_PRUNED
    return labels, pinned0


def integrate_until_decided(
    problem: BlockProblem,
    Y0: Array,
    *,
    horizon: float,
    dt: float,
    segment: float = 5.0,
    tol: Tolerances = Tolerances(),
    workers: int = 1,
    outputs_per_segment: int = 10,
    method: str = "rkc",
    rtol: float = 1e-6,
    atol: float = 1e-8,
) -> tuple[Array, Array, Array, Array, Array]:
    """Integrate all starts in segments, labelling and dropping converged ones.

    ``method``/``rtol``/``atol`` go to :func:`theory.ode.odeint_batch` (``dt`` is RK4's fixed step or
    RKC's initial step); ``workers`` threads.

    Returns ``(labels (B,), pinned-at-0 gates (B, 1+n), final states (B, D), decision times (B,),
    max ||W||² seen (B,))``; undecided trajectories carry the state at the horizon and time ``nan``.
    ``||W||²`` is sampled ``outputs_per_segment`` times per segment.
    """
    from .ode import odeint_batch

    Y = np.array(Y0, dtype=np.float64)
    B = Y.shape[0]
    labels = np.full(B, UNDECIDED, dtype=np.int8)
    pinned = np.zeros((B, problem.n + 1), dtype=bool)
    t_dec = np.full(B, np.nan)
    wmax = np.asarray(unpack(Y, problem).weight_norm_sq, dtype=np.float64).copy()
    active = np.arange(B)
    fun = block_field(problem)
    t = 0.0
    lab, pin = classify(problem, Y, tol)
    # a "converged" label (survived / some units pruned) must be seen at two consecutive checks
    prev = np.full(B, UNDECIDED, dtype=np.int8)
    while True:
        slow = (lab == SURVIVED) | (lab == SOME_UNITS_PRUNED)
        confirmed = slow & (prev[active] == lab)
        prev[active] = np.where(slow, lab, UNDECIDED)
        lab = np.where(slow & ~confirmed, UNDECIDED, lab).astype(np.int8)
        done = lab != UNDECIDED
        labels[active[done]] = lab[done]
        pinned[active[done]] = pin[done]
        t_dec[active[done]] = t
        active = active[~done]
        if active.size == 0 or t >= horizon - 1e-12:
            break
        T = min(segment, horizon - t)
        res = odeint_batch(fun, Y[active], np.linspace(t, t + T, outputs_per_segment + 1),
                           theta_slice=problem.theta_slice, dt=dt, method=method, rtol=rtol, atol=atol,
                           workers=workers)
        Y[active] = res.y[-1]
        wmax[active] = np.maximum(wmax[active], unpack(res.y, problem).weight_norm_sq.max(axis=0))
        t += T
        lab, pin = classify(problem, Y[active], tol)
    if active.size:
        pinned[active] = classify(problem, Y[active], tol)[1]
    return labels, pinned, Y, t_dec, wmax


def lambda_max(problem: BlockProblem, states: Array, iters: int = 40, eps: float = 1e-6) -> float:
    """Largest |eigenvalue| of the Jacobian of the raw field over ``states`` (power iteration, finite differences)."""
    rng = np.random.default_rng(0)
    S = np.atleast_2d(np.asarray(states, dtype=np.float64))
    V = rng.standard_normal(S.shape)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    f0 = velocity(problem, S)
    est = np.zeros(S.shape[0])
    for _ in range(iters):
        JV = (velocity(problem, S + eps * V) - f0) / eps
        est = np.linalg.norm(JV, axis=1)
        V = JV / np.maximum(est[:, None], 1e-300)
    return float(est.max())


# --------------------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------------------


def _axis(lo: float, hi: float, count: int, scale: str) -> Array:
    if scale == "linear":
        return np.linspace(lo, hi, count)
    if scale == "log":
        if not lo > 0:
            raise ValueError(f"a log axis needs a positive lower end, got {lo!r}")
        return np.geomspace(lo, hi, count)
    raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}")


def cell_widths(axis: Array) -> Array:
    """Widths of the cells around the grid points (midpoints between neighbours; half cells at the ends)."""
    a = np.asarray(axis, dtype=np.float64)
    mid = 0.5 * (a[1:] + a[:-1])
    edges = np.concatenate([[a[0]], mid, [a[-1]]])
    return np.diff(edges)


@dataclass
class BasinMap:
    """One mapped slice.

    ``x`` (nx,) gate axis (``θ_B`` or ``θ_i``), ``y`` (ny,) weight-norm axis;
    ``labels`` (ny, nx) codes of :data:`LABELS`; ``pruned`` (ny, nx) the
    empirical basin of "pruned"; ``certified`` (ny, nx) membership in the
    union of the Lyapunov regions; ``boundary`` (nx,) the largest certified
    norm at each ``x`` (closed form; 0 where nothing is certified);
    ``final`` (ny, nx, D) the states at decision (or horizon); ``t_decided``
    (ny, nx) decision times (``nan``: undecided); ``ball_held`` (ny, nx) for the
    unit slice whether ``||W(t)|| ≤ R`` held along the trajectory (sampled ten
    times per segment); ``meta`` everything needed to reproduce the map.
    Area fractions weight every grid point by its cell (so log-spaced grids
    give areas in the linear measure of the rectangle).
    """

    slice: str
    x: Array
    y: Array
    labels: Array
    pruned: Array
    certified: Array
    boundary: Array
    final: Array
    t_decided: Array
    meta: dict[str, Any]
    ball_held: Array | None = None
    eps: float = EPS
    x_label: str = ""
    y_label: str = ""
    boundary_fine: tuple[Array, Array] | None = None

    @property
    def weights(self) -> Array:
        """Cell areas (ny, nx) normalised to sum 1."""
        w = np.outer(cell_widths(self.y), cell_widths(self.x))
        return np.asarray(w / w.sum())

    def _frac(self, mask: Array, within: Array | None = None) -> float:
        w = self.weights
        if within is not None:
            w = np.where(within, w, 0.0)
        tot = float(w.sum())
        return float(np.where(mask, w, 0.0).sum() / tot) if tot > 0 else math.nan

    def certified_area(self, x_max: float | None = None) -> float:
        """Exact certified area fraction of ``{x ≤ x_max}`` (default: the whole rectangle), from the boundary curve."""
        if self.boundary_fine is not None:
            xs, bnd = self.boundary_fine
        else:
            xs, bnd = self.x, self.boundary
        y0, y1 = float(self.y[0]), float(self.y[-1])
        x_lo = float(self.x[0])
        x_hi = float(self.x[-1]) if x_max is None else min(float(x_max), float(self.x[-1]))
        if not x_hi > x_lo:
            return math.nan
        xk = np.union1d(np.linspace(x_lo, x_hi, 4001), xs[(xs >= x_lo) & (xs <= x_hi)])
        height = np.clip(np.interp(xk, xs, bnd), y0, y1) - y0
        return float(np.trapezoid(height, xk) / ((x_hi - x_lo) * (y1 - y0)))

    def areas(self) -> dict[str, float]:
        """Area bookkeeping (fractions of the slice rectangle unless stated).

        ``certified_area`` (exact, from the closed-form boundary), ``certified_grid``
        (grid cells), ``pruned`` / ``survived`` / ``undecided`` (grid),
        ``certified_pruned`` — fraction of the certified cells that are
        empirically pruned (Theorems 5.1/5.2 say 1), ``certified_over_pruned`` —
        certified area / empirical basin area (how conservative the
        certificate is), ``eps_strip`` — area of ``{x < ε}``,
        ``eps_strip_certified`` / ``eps_strip_pruned`` / ``eps_strip_recovers`` —
        fractions of the ε-strip that are certified, empirically pruned, and
        decided but *not* pruned (where the ε rule would cut a gate that
        recovers), ``pruned_beyond_eps`` — fraction of the empirical basin at
        ``x ≥ ε`` (starts that end pruned but that the ε rule does not catch at
        ``t = 0``).  For the unit slice, ``certified_ball_held`` is the fraction
        of certified cells whose trajectory stayed in Lemma 1's ball.
        """
        decided = self.labels != UNDECIDED
        strip = np.broadcast_to(self.x[None, :] < self.eps, self.labels.shape)
        pruned = self.pruned
        cert_area = self.certified_area()
        pruned_frac = self._frac(pruned)
        out = {
            "certified_area": cert_area,
            "certified_grid": self._frac(self.certified),
            "pruned": pruned_frac,
            "survived": self._frac(decided & ~pruned),
            "undecided": self._frac(~decided),
            "certified_pruned": self._frac(pruned, self.certified) if self.certified.any() else math.nan,
            "certified_over_pruned": cert_area / pruned_frac if pruned_frac > 0 else math.nan,
            "eps_strip": self._frac(strip),
            "eps_strip_certified": self.certified_area(self.eps) if self.x[0] < self.eps else math.nan,
            "eps_strip_pruned": self._frac(pruned, strip) if strip.any() else math.nan,
            "eps_strip_recovers": self._frac(decided & ~pruned, strip) if strip.any() else math.nan,
            "pruned_beyond_eps": self._frac(~strip, pruned) if pruned.any() else math.nan,
        }
        if self.ball_held is not None:
            held = self._frac(self.ball_held, self.certified) if self.certified.any() else math.nan
            out["certified_ball_held"] = held
        return out

    def to_json(self, *, include_final: bool = False) -> dict[str, Any]:
        """A JSON-ready record: axes, labels, masks, boundary, areas, metadata."""
        out: dict[str, Any] = {
            "slice": self.slice,
            "x_label": self.x_label,
            "y_label": self.y_label,
            "x": self.x.tolist(),
            "y": self.y.tolist(),
            "label_names": {str(k): v for k, v in LABELS.items()},
            "labels": self.labels.astype(int).tolist(),
            "pruned": self.pruned.astype(int).tolist(),
            "certified": self.certified.astype(int).tolist(),
            "boundary": _finite_list(self.boundary),
            "t_decided": _finite_list(self.t_decided),
            "eps": self.eps,
            "areas": _finite(self.areas()),
            "meta": self.meta,
        }
        if self.ball_held is not None:
            out["ball_held"] = self.ball_held.astype(int).tolist()
        if include_final:
            out["final"] = self.final.tolist()
        return out


def _finite(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in d.items()}


def _finite_list(a: Array) -> Any:
    return np.where(np.isfinite(a), a, np.nan).astype(object).tolist() if a.size else []


def critical_scale(problem: BlockProblem, W1: Array, W2: Array, theta: Array, *, s_hi: float = 10.0) -> float:
    """Smallest ``s`` with ``g_B(sW) + γ_B < 0`` along the direction ``W`` (bisection; ``inf`` if none below ``s_hi``).

    At ``θ_B = 0`` the face is sticky exactly while ``−(g_B + γ_B) ≤ 0``; below
    this scale a pruned block stays pruned.
    """
    from .block_model import gradients

    def f(s: float) -> float:
        y = problem.pack(0.0, theta, s * W1, s * W2)
        return float(gradients(problem, y).g_B) + problem.c_B + problem.c_1 * float(np.sum(theta))

    grid = np.linspace(0.0, s_hi, 401)
    vals = np.array([f(s) for s in grid])
    neg = np.nonzero(vals < 0)[0]
    if not neg.size:
        return math.inf
    lo, hi = float(grid[neg[0] - 1]), float(grid[neg[0]])
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if f(mid) < 0 else (mid, hi)
    return 0.5 * (lo + hi)


def map_slice(
    kind: str = "layer",
    *,
    resolution: int | tuple[int, int] = 32,
    horizon: float = 100.0,
    seed: int = 0,
    problem: BlockProblem | None = None,
    unit: int | None = None,
    x_range: tuple[float, float] = (0.0, 1.0),
    y_range: tuple[float, float] | None = None,
    x_scale: str = "linear",
    y_scale: str = "linear",
    dt: float | None = None,
    segment: float = 5.0,
    tol: Tolerances = Tolerances(),
    R: float | None = None,
    eps: float = EPS,
    workers: int = 1,
    method: str = "rkc",
) -> BasinMap:
    """Map the ``layer`` or ``unit`` slice (module doc) on a ``resolution`` grid (nx = ny, or a pair).

    ``problem`` defaults to :func:`slice_problem` ``(seed)``; directions come
    from :func:`fit_weights`.  ``y_range`` defaults to ``[0, 2.5 s_c]`` for the
    layer slice (``s_c`` = :func:`critical_scale`, where a pruned block would
    be re-activated) and ``[0, 1.5 ||u_fit||]`` for the unit slice.  ``unit``
    defaults to the unit with the most negative ``g_i`` at the fit (the most
    useful).  ``method`` is :func:`integrate_until_decided`'s (default RKC);
    ``dt`` (RK4's step, RKC's first step) defaults to ``2/λ_max`` (RK4 is
    stable to ``2.78/λ_max``; ``λ_max`` by power iteration over the top row of
    the slice and the fit).  ``R`` (unit slice) is Lemma 1's radius, default
    ``1.25 ||W_fit||``.  Log axes (``x_scale``/``y_scale="log"``) need
    positive ranges.
    """
    if kind not in ("layer", "unit"):
        raise ValueError(f"kind must be 'layer' or 'unit', got {kind!r}")
    t_start = time.perf_counter()
    P = slice_problem(seed) if problem is None else problem
    W1f, W2f = fit_weights(P, seed)
    n = P.n
    nx, ny = (resolution, resolution) if isinstance(resolution, int) else resolution
    if nx < 2 or ny < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution!r}")
    if not horizon > 0:
        raise ValueError(f"horizon must be > 0, got {horizon!r}")
    fit_state = P.pack(1.0, np.ones(n), W1f, W2f)
    fit_norm = float(np.sqrt(unpack(fit_state, P).weight_norm_sq))
    xs = _axis(x_range[0], x_range[1], nx, x_scale)
    xf = _axis(x_range[0], x_range[1], 20001, x_scale)
    meta: dict[str, Any] = {
        "slice": kind, "seed": seed, "horizon": horizon, "segment": segment, "resolution": [nx, ny],
        "x_scale": x_scale, "y_scale": y_scale,
        "problem": {"m": P.m, "n": n, "p": P.p, "N": P.N, "lam": P.lam, "c_B": P.c_B, "c_1": P.c_1},
        "tolerances": {"face": tol.face, "vel": tol.vel, "confirm": "converged labels seen at two consecutive checks"},
        "eps": eps, "integrator": f"theory.ode.odeint_batch({method})", "fit_norm": fit_norm,
    }
    if kind == "layer":
        Wd1, Wd2 = W1f / fit_norm, W2f / fit_norm
        s_c = critical_scale(P, Wd1, Wd2, np.ones(n), s_hi=2 * fit_norm)
        meta["critical_scale"] = s_c
        yr = y_range if y_range is not None else (0.0, 2.5 * s_c if math.isfinite(s_c) else 1.5 * fit_norm)
        ys = _axis(yr[0], yr[1], ny, y_scale)
        TB, S = np.meshgrid(xs, ys)
        Y0 = P.pack(TB, np.ones((ny, nx, n)), S[..., None, None] * Wd1, S[..., None, None] * Wd2).reshape(-1, P.D)
        k0, k2 = lemma1_coeffs(P)
        certified = union_margin_auto(TB, 0.5 * S**2, P.c_B, k0, k2)[0] > 0
        boundary = union_boundary(xs, P.c_B, k0=k0, k2=k2)
        fine = (xf, union_boundary(xf, P.c_B, k0=k0, k2=k2))
        x_label, y_label = r"$\theta_B(0)$", r"$\|W(0)\|$ along the fitted direction"
        meta.update({"k0": k0, "k2": k2, "certificate": "union over a > 0 and R of D_B(a, rho) (Theorem 5.1)"})
        i = -1
    else:
        if unit is None:
            from .block_model import gradients

            unit = int(np.argmin(gradients(P, fit_state).g))
        i = int(unit)
        u_fit = math.sqrt(float(unit_weight_sq(P, fit_state, i)))
        yr = y_range if y_range is not None else (0.0, 1.5 * u_fit)
        ys = _axis(yr[0], yr[1], ny, y_scale)
        TI, S = np.meshgrid(xs, ys)
        W1 = np.broadcast_to(W1f, (ny, nx, n, P.m + 1)).copy()
        W2 = np.broadcast_to(W2f, (ny, nx, P.p, n)).copy()
        W1[..., i, :] = S[..., None] * (W1f[i] / u_fit)
        W2[..., :, i] = S[..., None] * (W2f[:, i] / u_fit)
        theta = np.ones((ny, nx, n))
        theta[..., i] = TI
        Y0 = P.pack(np.ones((ny, nx)), theta, W1, W2).reshape(-1, P.D)
        R_use = 1.25 * fit_norm if R is None else float(R)
        k = lemma1_k(P, R_use)
        wsq0 = unpack(Y0, P).weight_norm_sq.reshape(ny, nx)
        certified = (union_margin(TI, 0.5 * S**2, P.c_1, k, R_use)[0] > 0) & (wsq0 <= R_use**2)
        boundary = union_boundary(xs, P.c_1, k=k, R=R_use)
        fine = (xf, union_boundary(xf, P.c_1, k=k, R=R_use))
        x_label = rf"$\theta_{{{i + 1}}}(0)$"
        y_label = rf"$\|(w_{{{i + 1}}}, v_{{{i + 1}}})(0)\|$ along its fitted direction"
        meta.update({"unit": i, "R": R_use, "k": k, "u_fit": u_fit,
                     "certificate": "union over a > 0 of D_i(a, rho) with Lemma 1's ball ||W|| <= R (Theorem 5.2)"})
    if dt is None:
        top = Y0.reshape(ny, nx, P.D)[-1, :: max(1, nx // 8)]
        dt = min(2.0 / lambda_max(P, np.concatenate([top, fit_state[None]])), 0.05)
    meta["dt"] = dt
    meta["backend"] = backend_for(block_field(P))
    meta["y_range"] = [float(ys[0]), float(ys[-1])]
    labels, pinned, final, t_dec, wmax = integrate_until_decided(
        P, Y0, horizon=horizon, dt=dt, segment=segment, tol=tol, workers=workers, method=method
    )
    labels = labels.reshape(ny, nx)
    pinned = pinned.reshape(ny, nx, n + 1)
    ball: Array | None = None
    if kind == "layer":
        pruned = (labels == BLOCK_PRUNED) | (labels == ALL_UNITS_PRUNED)
    else:
        pruned = (labels != UNDECIDED) & (pinned[..., 1 + i] | pinned[..., 0])
        pruned |= (labels == BLOCK_PRUNED) | (labels == ALL_UNITS_PRUNED)
        ball = wmax.reshape(ny, nx) <= meta["R"] ** 2
    meta["seconds"] = round(time.perf_counter() - t_start, 2)
    return BasinMap(kind, xs, ys, labels, pruned, certified, boundary, final.reshape(ny, nx, P.D),
                    t_dec.reshape(ny, nx), meta, ball, eps, x_label, y_label, fine)


# --------------------------------------------------------------------------------------------------
# Plotting (matplotlib imported lazily)
# --------------------------------------------------------------------------------------------------

#: Plot categories: (name, colour) per code of :func:`categories`.
CATEGORY_STYLE: dict[str, dict[int, tuple[str, str]]] = {
    "layer": {
        0: ("block pruned ($\\theta_B \\to 0$)", "#3b6fb6"),
        1: ("all units pruned", "#8fb3e0"),
        2: ("block kept, some units pruned", "#f2c078"),
        3: ("block kept, all units kept", "#e9e4d8"),
        4: ("undecided at horizon", "#ffffff"),
    },
    "unit": {
        0: ("block pruned", "#3b6fb6"),
        1: ("unit pruned ($\\theta_B\\theta_i \\to 0$)", "#8fb3e0"),
        2: ("unit kept", "#e9e4d8"),
        4: ("undecided at horizon", "#ffffff"),
    },
}


def categories(bm: BasinMap) -> Array:
    """Plot categories (ny, nx) of a map: see :data:`CATEGORY_STYLE`."""
    lab = bm.labels
    if bm.slice == "layer":
        cat = np.where(lab == UNDECIDED, 4, lab)
    else:
        cat = np.full(lab.shape, 2)
        cat[bm.pruned] = 1
        cat[lab == BLOCK_PRUNED] = 0
        cat[lab == UNDECIDED] = 4
    return np.asarray(cat)


def _edges(axis: Array, scale: str) -> Array:
    a = np.asarray(axis, dtype=np.float64)
    if scale == "log":
        la = np.log(a)
        mid = 0.5 * (la[1:] + la[:-1])
        return np.asarray(np.exp(np.concatenate([[la[0] - (mid[0] - la[0])], mid, [la[-1] + (la[-1] - mid[-1])]])))
    mid = 0.5 * (a[1:] + a[:-1])
    return np.concatenate([[a[0] - (mid[0] - a[0])], mid, [a[-1] + (a[-1] - mid[-1])]])


def plot_basin(bm: BasinMap, ax: Any = None, *, title: str | None = None, legend: bool = True) -> Any:
    """Draw a map: outcome categories, the certified region (hatched, closed-form boundary), the
    empirical boundary of "pruned" and the ε line.  Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    style = CATEGORY_STYLE[bm.slice]
    codes = sorted(style)
    cmap = ListedColormap([style[c][1] for c in codes])
    norm = BoundaryNorm([c - 0.5 for c in codes] + [codes[-1] + 0.5], cmap.N)
    cat = categories(bm)
    xs_scale, ys_scale = bm.meta.get("x_scale", "linear"), bm.meta.get("y_scale", "linear")
    ax.pcolormesh(_edges(bm.x, xs_scale), _edges(bm.y, ys_scale), cat, cmap=cmap, norm=norm, shading="flat")
    handles: list[Any] = [Patch(facecolor=style[c][1], edgecolor="0.5", label=style[c][0])
                          for c in codes if np.any(cat == c)]
    # empirical basin boundary
    if bm.pruned.any() and not bm.pruned.all():
        ax.contour(bm.x, bm.y, bm.pruned.astype(float), levels=[0.5], colors="k", linewidths=1.2)
        handles.append(plt.Line2D([], [], color="k", lw=1.2, label="empirical basin boundary"))
    # certified region (closed form)
    fine = bm.boundary_fine if bm.boundary_fine is not None else (bm.x, bm.boundary)
    xs, bnd = np.asarray(fine[0]), np.minimum(np.asarray(fine[1]), bm.y[-1])
    pos = bnd > max(float(bm.y[0]), 0.0)
    if pos.any():
        lo = np.full_like(bnd, max(float(bm.y[0]), 1e-300) if ys_scale == "log" else float(bm.y[0]))
        ax.fill_between(xs[pos], lo[pos], bnd[pos], facecolor="none", edgecolor="tab:red", hatch="////", lw=0.0)
        ax.plot(xs[pos], bnd[pos], color="tab:red", lw=1.5)
        cert = "Thm 5.1, union over a, R" if bm.slice == "layer" else "Thm 5.2, union over a"
        handles.append(Patch(facecolor="none", edgecolor="tab:red", hatch="////", label=f"certified ({cert})"))
    ax.axvline(bm.eps, color="tab:green", ls="--", lw=1.3)
    eps_label = f"pruning rule $\\theta < \\varepsilon = {bm.eps:g}$"
    handles.append(plt.Line2D([], [], color="tab:green", ls="--", lw=1.3, label=eps_label))
    ax.set_xscale(xs_scale)
    ax.set_yscale(ys_scale)
    ax.set_xlim(_edges(bm.x, xs_scale)[[0, -1]].clip(min=bm.x[0]))
    ax.set_ylim(_edges(bm.y, ys_scale)[[0, -1]].clip(min=bm.y[0]))
    ax.set_xlabel(bm.x_label)
    ax.set_ylabel(bm.y_label)
    if title is not None:
        ax.set_title(title)
    if legend:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.9)
    return ax


def save_figure(fig: Any, out: Path, stem: str, *, pdf: bool = True, dpi: int = 150) -> list[Path]:
    """Write ``stem.png`` (and ``stem.pdf``) into ``out`` atomically; returns the paths."""
    from .atomic import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf") if pdf else ("png",):
        path = out / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Command line: python -m theory basin
# --------------------------------------------------------------------------------------------------

_AREA_ROWS = [
    ("certified_area", "certified region (exact area)"),
    ("certified_grid", "certified region (grid cells)"),
    ("pruned", "empirical basin of 'pruned'"),
    ("survived", "survived"),
    ("undecided", "undecided at horizon"),
    ("certified_pruned", "certified cells that are pruned (theory: 1)"),
    ("certified_over_pruned", "certified area / empirical basin"),
    ("eps_strip", "strip {x < eps}"),
    ("eps_strip_certified", "  ... of it certified"),
    ("eps_strip_pruned", "  ... of it empirically pruned"),
    ("eps_strip_recovers", "  ... of it recovering (eps rule cuts it)"),
    ("pruned_beyond_eps", "basin share at x >= eps"),
    ("certified_ball_held", "certified cells whose ball ||W|| <= R held"),
]


def format_areas(bm: BasinMap) -> str:
    """The area table printed by ``python -m theory basin``."""
    areas = bm.areas()
    lines = [f"{bm.slice} slice, seed {bm.meta['seed']}, {bm.labels.shape[1]}x{bm.labels.shape[0]} grid, "
             f"horizon {bm.meta['horizon']:g}, dt {bm.meta['dt']:.3g}, {bm.meta['seconds']:.1f} s"]
    for key, name in _AREA_ROWS:
        if key in areas:
            v = areas[key]
            lines.append(f"  {name:<46s} {v:10.4g}" if math.isfinite(v) else f"  {name:<46s} {'—':>10s}")
    return "\n".join(lines)


def write_outputs(bm: BasinMap, out: str | Path, *, pdf: bool = True) -> list[Path]:
    """Write ``basin_<slice>.json`` (axes, labels, masks, areas, meta), ``.npz`` (final states), ``.png``/``.pdf``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"basin_{bm.slice}"
    atomic_write_text(out / f"{stem}.json", json.dumps(bm.to_json(), indent=1) + "\n")
    with atomic_path(out / f"{stem}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, x=bm.x, y=bm.y, labels=bm.labels, final=bm.final, t_decided=bm.t_decided)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    a = bm.areas()
    plot_basin(bm, ax, title=f"{bm.slice} slice: pruned {a['pruned']:.1%} of the slice, "
                             f"certified {a['certified_area']:.2g}")
    paths = [out / f"{stem}.json", out / f"{stem}.npz", *save_figure(fig, out, stem, pdf=pdf)]
    plt.close(fig)
    return paths


def cmd_basin(args: argparse.Namespace) -> int:
    """Handler of ``python -m theory basin``."""
    if args.slice == "volume":
        return _cmd_volume(args)
    try:
        bm = map_slice(args.slice, resolution=32 if args.resolution is None else args.resolution,
                       horizon=args.horizon, seed=args.seed, workers=args.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_outputs(bm, args.out) if args.out else []
    if args.json:
        print(json.dumps({"slice": bm.slice, "areas": _finite(bm.areas()), "meta": bm.meta,
                          "files": [str(p) for p in paths]}, indent=2))
    else:
        print(format_areas(bm))
        for p in paths:
            print(f"wrote {p}")
    return 0


def _cmd_volume(args: argparse.Namespace) -> int:
    """``python -m theory basin --slice volume``: map the 3-D box (:mod:`theory.basin_volume`)."""
    from .basin_volume import format_volumes, map_volume, write_volume_outputs

    res = 24 if args.resolution is None else args.resolution
    try:
        if args.depth < 2:
            raise ValueError(f"--depth must be >= 2, got {args.depth}")
        bv = map_volume(resolution=(res, res, args.depth), horizon=args.horizon, seed=args.seed,
                        workers=args.workers)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_volume_outputs(bv, args.out) if args.out else []
    if args.json:
        rec = bv.to_json()
        print(json.dumps({"slice": "volume", "volumes": rec["volumes"],
                          "layer_pruned_fraction": rec["layer_pruned_fraction"], "meta": bv.meta,
                          "files": [str(p) for p in paths]}, indent=2))
    else:
        print(format_volumes(bv))
        for p in paths:
            print(f"wrote {p}")
    return 0


def add_basin_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``basin`` sub-command to ``python -m theory``'s sub-parsers (handler: :func:`cmd_basin`)."""
    b = subparsers.add_parser(
        "basin", help="map a 2-D slice or a 3-D box of initial conditions: certified region vs empirical basin",
        description="Map the domain of attraction of the pruned set of the canonical block (THEORY §7): layer "
        "slice theta_B x ||W||, unit slice theta_i x ||(w_i, v_i)||, or the 3-D box theta_B x ||W|| x theta_units "
        "(--slice volume).  Prints the area (volume) fractions of the certified region (Theorems 5.1/5.2, union over "
        "a) and of the empirical basin, and where the eps = 0.1 rule lies; with --out writes "
        "basin_<slice>.json/.npz/.png/.pdf.",
    )
    b.add_argument("--slice", choices=("layer", "unit", "volume"), default="layer",
                   help="layer or unit slice, or the 3-D volume theta_B x ||W|| x theta_units (default layer)")
    b.add_argument("--resolution", type=int, default=None,
                   help="grid points per axis (default 32 for a slice, 96 for print; 24 on the volume's theta_B "
                   "and ||W|| axes)")
    b.add_argument("--depth", type=int, default=12, help="volume: grid points on the theta_units axis (default 12)")
    b.add_argument("--horizon", type=float, default=100.0, help="integration horizon (default 100)")
    b.add_argument("--seed", type=int, default=0, help="problem seed (default 0)")
    b.add_argument("--workers", type=int, default=1,
                   help="threads for the batched integrator (default 1; the compiled kernels scale to 2 on 2 cores)")
    b.add_argument("--out", default=None, help="directory for JSON, NPZ and figure")
    b.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    b.set_defaults(func=cmd_basin)
    return b


def basin_cli(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``basin_cli(["--slice", "unit", "--out", "DIR"])``."""
    parser = argparse.ArgumentParser(prog="basin")
    sub = parser.add_subparsers(dest="command")
    add_basin_parser(sub)
    args = parser.parse_args(["basin", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


__all__ = [
    "ALL_UNITS_PRUNED",
    "BLOCK_PRUNED",
    "EPS",
    "LABELS",
    "SOME_UNITS_PRUNED",
    "SURVIVED",
    "UNDECIDED",
    "BasinMap",
    "Tolerances",
    "add_basin_parser",
    "basin_cli",
    "categories",
    "cell_widths",
    "classify",
    "cmd_basin",
    "critical_scale",
    "fit_weights",
    "format_areas",
    "integrate_until_decided",
    "lambda_max",
    "map_slice",
    "plot_basin",
    "save_figure",
    "slice_problem",
    "write_outputs",
]
