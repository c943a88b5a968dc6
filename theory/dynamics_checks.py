"""Lemma 1/2 and integrator-agreement checks (THEORY §6-§7), group ``dynamics``.

* ``lemma1``: on random canonical blocks (§7) and random states in the ball
  ``||W_1||² + ||W_2||² ≤ R²`` (a third of them on the sphere, gates anywhere
  in ``H``), the ratios ``|g_i|/(||w_i|| ||v_i||)``, ``||h_i||/||v_i||``,
  ``||k_i||/||w_i||`` and ``|g_B|/Σ_i ||w_i|| ||v_i||`` never exceed §7's
  constant ``k = Σ_n ||x̂_n|| (||r_n|| + ¾ ||x̂_n|| R²)`` ([28]).  Violation:
  ``max ratio / k − 1``.
* ``lemma2``: along random rays ``W = s U`` with ``s -> 0`` the ratio
  ``|g_B| / ||W||²`` stays below ``k(R)/2`` and converges ([29]-[30]:
  ``g_B = O(||W||²)``).  Violation: excess over the bound, relative, or the
  relative change of the ratio between the two smallest scales.
* ``integrator-agreement``: the batched integrator (:func:`theory.ode.odeint_batch`,
  RK4, ``dt = 0.005``; its compiled backend when numba is installed) against the
  solve_ivp reference (:func:`theory.ode.odeint`,
  LSODA, rtol 1e-8) on random blocks: max |Δy| over the state and 41 times
  on ``[0, 4]``.  Tolerance ``1e-5`` (observed up to ~2e-6).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .block_model import BlockProblem, field, gradients, lemma1_constants, lemma1_k, unpack
from .checks import CheckResult, register
from .ode import odeint, odeint_batch

INTEGRATOR_TOL = 1e-5
INTEGRATOR_DT = 0.005


def _random_problem(rng: np.random.Generator) -> BlockProblem:
    m, n, p = (int(v) for v in rng.integers(1, 4, size=3))
    N = int(rng.integers(2, 17))
    return BlockProblem.random(
        rng, m=m, n=n, p=p, N=N, teacher_scale=float(rng.uniform(0.2, 2.0)), noise=float(rng.uniform(0.0, 0.5))
    )


def _ball_states(prob: BlockProblem, rng: np.random.Generator, R: float, B: int) -> np.ndarray:
    n = prob.n
    Y = np.empty((B, prob.D))
    Y[:, : 1 + n] = rng.uniform(size=(B, 1 + n))
    W = rng.standard_normal((B, prob.D - 1 - n))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    radius = R * rng.uniform(size=(B, 1)) ** (1.0 / W.shape[1])
    radius[: B // 3] = R
    Y[:, 1 + n :] = radius * W
    return Y


@register(
    "lemma1",
    instances=20,
    group="dynamics",
    description="Lemma 1 [28]: |g_i|, ||h_i||, ||k_i||, |g_B| within the §7 constant k on the ball ||W|| <= R",
)
def check_lemma1(rng: np.random.Generator, instances: int, progress: Callable[[], None]) -> CheckResult:
    worst = -np.inf
    failures = 0
    tightest: dict[str, float] = {}
    for _ in range(instances):
        prob = _random_problem(rng)
        R = float(rng.uniform(0.05, 4.0))
        k = lemma1_k(prob, R)
        Y = _ball_states(prob, rng, R, 400)
        s = unpack(Y, prob)
        gr = gradients(prob, Y)
        wn, vn = s.w_norms, s.v_norms
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = {
                "g_i": np.abs(gr.g) / (wn * vn),
                "h_i": np.linalg.norm(gr.h, axis=-1) / vn,
                "k_i": np.linalg.norm(gr.k, axis=-2) / wn,
                "g_B": np.abs(gr.g_B) / np.sum(wn * vn, axis=-1),
            }
        inst_worst = -np.inf
        for name, r in ratios.items():
            r = r[np.isfinite(r)]
            if r.size:
                rel = float(r.max() / k)
                tightest[name] = max(tightest.get(name, 0.0), rel)
                inst_worst = max(inst_worst, rel - 1.0)
        if inst_worst > 1e-10:
            failures += 1
        worst = max(worst, inst_worst)
        progress()
    return CheckResult(
        name="lemma1",
        instances=instances,
        failures=failures,
        worst_violation=max(worst, 0.0),
        tolerance=1e-10,
        metric="max over samples of ratio / k − 1 (k of §7)",
        description="Lemma 1 [28] on the canonical block",
        details={"largest ratio / k": tightest, "constants": "k = k_g; k_h = k_k, k_B are smaller (lemma1_constants)"},
    )


@register(
    "lemma2",
    instances=20,
    group="dynamics",
    description="Lemma 2 [29]-[30]: |g_B| / ||W||^2 bounded by k/2 and convergent as the weights shrink",
)
def check_lemma2(rng: np.random.Generator, instances: int, progress: Callable[[], None]) -> CheckResult:
    worst = 0.0
    failures = 0
    limits = []
    scales = 2.0 ** -np.arange(0, 26, 1.0)
    for _ in range(instances):
        prob = _random_problem(rng)
        n = prob.n
        viol = 0.0
        for _ray in range(5):
            U = rng.standard_normal(prob.D - 1 - n)
            U /= np.linalg.norm(U)
            Y = np.empty((scales.size, prob.D))
            Y[:, : 1 + n] = rng.uniform(size=1 + n)
            Y[:, 1 + n :] = scales[:, None] * U
            ratio = np.abs(gradients(prob, Y).g_B) / unpack(Y, prob).weight_norm_sq
            bound = 0.5 * lemma1_constants(prob, 1.0)["k_g"]  # all scales ≤ 1: k(R = 1)
            viol = max(viol, float(ratio.max() / bound - 1.0))
            # convergence of the ratio (leading term quadratic): relative change at the smallest scales
            change = abs(ratio[-1] - ratio[-2]) / (abs(ratio[-1]) + 1e-3 * bound)
            viol = max(viol, change - 1e-6)
            limits.append(float(ratio[-1] / bound))
        if viol > 0:
            failures += 1
        worst = max(worst, viol)
        progress()
    return CheckResult(
        name="lemma2",
        instances=instances,
        failures=failures,
        worst_violation=max(worst, 0.0),
        tolerance=0.0,
        metric="max(ratio/(k/2) − 1, relative change of |g_B|/||W||² at the smallest scales − 1e-6)",
        description="Lemma 2: g_B = O(||W||^2) along random rays (scales 1 .. 2^-25)",
        details={"limit ratio / (k/2): max": max(limits) if limits else None},
    )


@register(
    "integrator-agreement",
    instances=3,
    group="dynamics",
    description="odeint_batch (RK4, dt=0.005) vs the solve_ivp reference odeint (LSODA) on random canonical blocks",
)
def check_integrator_agreement(rng: np.random.Generator, instances: int, progress: Callable[[], None]) -> CheckResult:
    worst = 0.0
    failures = 0
    T = 4.0
    t = np.linspace(0.0, T, 41)
    switches = 0
    backend = ""
    for _ in range(instances):
        prob = BlockProblem.random(rng, m=2, n=3, p=2, N=12)
        B = 3
        th = rng.uniform(size=(B, 1 + prob.n))
        W = rng.standard_normal((B, prob.D - 1 - prob.n))
        W *= 2.0 * rng.uniform(0.2, 1.0, size=(B, 1)) / np.linalg.norm(W, axis=1, keepdims=True)
        Y0 = np.concatenate([th, W], axis=1)
        f = field(prob)
        refs = [odeint(f, y, (0.0, T), theta_slice=prob.theta_slice, t_eval=t) for y in Y0]
        switches += sum(len(r.switches) for r in refs)
        ref = np.stack([r.y for r in refs], axis=1)
        res = odeint_batch(f, Y0, t, theta_slice=prob.theta_slice, dt=INTEGRATOR_DT)
        backend = res.backend
        dev = float(np.abs(res.y - ref).max()) if all(r.success for r in refs) else float("inf")
        if not dev <= INTEGRATOR_TOL:
            failures += 1
        worst = max(worst, dev)
        progress()
    return CheckResult(
        name="integrator-agreement",
        instances=instances,
        failures=failures,
        worst_violation=worst,
        tolerance=INTEGRATOR_TOL,
        metric="max |y_batch − y_ref| over state and 41 times on [0, 4]",
        description="batched RK4 vs per-trajectory LSODA, both on the projected ODE [22]",
        details={"face switches in the references": switches, "dt": INTEGRATOR_DT, "backend": backend},
    )


__all__ = ["check_integrator_agreement", "check_lemma1", "check_lemma2"]
