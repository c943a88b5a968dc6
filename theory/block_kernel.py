"""The velocity of the canonical block (THEORY §7, [24]) for ONE state, compiled (numba).

The same closed forms as :func:`theory.block_model.gradients` /
:func:`theory.block_model.velocity` (the readable numpy reference; see that
module's doc for the formulas), written as loops over the samples that LLVM
vectorises: every work array is (units or outputs, N) with the samples
contiguous, and ``tanh`` is :func:`theory.jit.fast_tanh`.  The kernel is
written for small blocks — inputs ``m + 1 ≤ 4``, outputs ``p ≤ 2`` (the maps,
the benchmark, the checks), zero-padded to exactly 4 and 2 — so that every
sum over the samples of one unit is a single pass with its accumulators in
registers; larger blocks are integrated by the numpy path.  The gates are read
through ``Π_H`` (clipped into ``[0, 1]``), exactly as the integrators of
:mod:`theory.ode` evaluate the field at ``Π_H(y)``.

:class:`BlockData` holds the problem's arrays in the layout the kernel wants;
:func:`block_velocity` is the kernel (called from the compiled integrators of
:mod:`theory.block_ode`), :func:`velocity_batch` a compiled loop over states
for tests and measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .block_model import BlockProblem
from .jit import fast_tanh, njit

#: The kernel handles blocks with ``m + 1 ≤ FUSED_M1`` inputs and ``p ≤ FUSED_P`` outputs (zero-padded to these);
#: :func:`theory.ode.odeint_batch` integrates larger blocks with its numpy path.
FUSED_M1 = 4
FUSED_P = 2


@dataclass(frozen=True)
class BlockData:
    """A :class:`~theory.block_model.BlockProblem` laid out for the kernel.

    ``XhT`` (max(m+1, 4), N) = ``x̂ᵀ`` and ``RT`` (max(p, 2), N) = ``rᵀ`` (skip-path
    residuals), zero-padded to at least :data:`FUSED_M1` / :data:`FUSED_P` rows
    (a zero input row adds nothing to ``w_i · x̂_n``, a zero output row has
    ``r = 0`` and ``v = 0``, so the padding changes no sum); ``params`` =
    ``[λ, c_B, c_1]``; ``dims`` = ``[m+1, n, p]``.
    """

    XhT: np.ndarray
    RT: np.ndarray
    params: np.ndarray
    dims: np.ndarray

    @classmethod
    def of(cls, problem: BlockProblem) -> BlockData:
        m1, p, N = problem.m + 1, problem.p, problem.N
        XhT = np.zeros((max(m1, FUSED_M1), N))
        XhT[:m1] = problem.Xh.T
        RT = np.zeros((max(p, FUSED_P), N))
        RT[:p] = problem.R.T
        return cls(XhT, RT, np.array([problem.lam, problem.c_B, problem.c_1], dtype=np.float64),
                   np.array([m1, problem.n, p], dtype=np.int64))

    @property
    def n(self) -> int:
        return int(self.dims[1])

    def work(self) -> tuple[np.ndarray, np.ndarray]:
        """Work arrays of :func:`block_velocity`: ``phi`` (n, N), ``e`` (2, N)."""
        N = self.XhT.shape[1]
        return np.empty((self.n, N)), np.empty((self.RT.shape[0], N))


@njit()
def block_velocity(
    y: np.ndarray, out: np.ndarray, XhT: np.ndarray, RT: np.ndarray, params: np.ndarray, dims: np.ndarray,
    phi: np.ndarray, e: np.ndarray,
) -> None:
    """``out = −∇L`` at ``Π_H(y)`` for one state ``y`` (D,) of the canonical block ([24], §7 closed forms).

    Arrays as in :class:`BlockData` (``m + 1 ≤ 4`` inputs and ``p ≤ 2`` outputs, zero-padded to 4
    and 2); ``phi`` (n, N) and ``e`` (2, N) are work arrays (overwritten).  Every sum over the
    samples of one unit is a single pass (eight accumulators).
    """
    m1, n, p = dims[0], dims[1], dims[2]
    N = XhT.shape[1]
    lam, c_B, c_1 = params[0], params[1], params[2]
    o1 = 1 + n
    o2 = o1 + n * m1
    tB = min(max(y[0], 0.0), 1.0)
    # φ_ni = tanh(w_i · x̂_n)
    for i in range(n):
        b = o1 + i * m1
        w0 = y[b]
        w1 = y[b + 1] if m1 > 1 else 0.0
        w2 = y[b + 2] if m1 > 2 else 0.0
        w3 = y[b + 3] if m1 > 3 else 0.0
        for nn in range(N):
            phi[i, nn] = fast_tanh(w0 * XhT[0, nn] + w1 * XhT[1, nn] + w2 * XhT[2, nn] + w3 * XhT[3, nn])
    # e_n = r_n − Σ_i θ_i φ_ni v_i
    for nn in range(N):
        e[0, nn] = RT[0, nn]
        e[1, nn] = RT[1, nn]
    sum_th = 0.0
    for i in range(n):
        th = min(max(y[1 + i], 0.0), 1.0)
        sum_th += th
        t0 = th * y[o2 + i]
        t1 = th * y[o2 + n + i] if p > 1 else 0.0
        for nn in range(N):
            f = phi[i, nn]
            e[0, nn] -= t0 * f
            e[1, nn] -= t1 * f
    # gain = Σ_n [½||a_n||² − r_n·a_n],  a_n = r_n − e_n
    gain = 0.0
    for nn in range(N):
        a0 = RT[0, nn] - e[0, nn]
        a1 = RT[1, nn] - e[1, nn]
        gain += a0 * (0.5 * a0 - RT[0, nn]) + a1 * (0.5 * a1 - RT[1, nn])
    var = 0.0
    for i in range(n):
        th = min(max(y[1 + i], 0.0), 1.0)
        v0 = y[o2 + i]
        v1 = y[o2 + n + i] if p > 1 else 0.0
        vv = v0 * v0 + v1 * v1
        coef = (1.0 - th) * vv
        tt = tB * th
        # s_i = Σ_n φ², Σ_n φ q (q_n = v_i · e_n);  with θ_B θ_i ≠ 0 also Σ_n x̂_n G_n and Σ_n φ e_n
        s = 0.0
        pq = 0.0
        h0 = h1 = h2 = h3 = 0.0
        k0 = k1 = 0.0
        if tt == 0.0:  # the weights of this unit only decay: ẇ = −λw, v̇ = −λv
            for nn in range(N):
                f = phi[i, nn]
                s += f * f
                pq += f * (v0 * e[0, nn] + v1 * e[1, nn])
        else:
            for nn in range(N):
                f = phi[i, nn]
                f2 = f * f
                E0 = e[0, nn]
                E1 = e[1, nn]
                q = v0 * E0 + v1 * E1
                s += f2
                pq += f * q
                g = (1.0 - f2) * (q - coef * f)  # G_ni = f'(q − (1 − θ_i) φ ||v_i||²)
                h0 += XhT[0, nn] * g
                h1 += XhT[1, nn] * g
                h2 += XhT[2, nn] * g
                h3 += XhT[3, nn] * g
                k0 += f * E0
                k1 += f * E1
        var += th * (1.0 - th) * s * vv
        # ∂L/∂θ_i = θ_B (g_i + c_1),  g_i = −Σ_n φ q + (½ − θ_i) s_i ||v_i||²
        out[1 + i] = -tB * (-pq + (0.5 - th) * s * vv + c_1)
        # ẇ_i = θ_B θ_i Σ_n G_n x̂_n − λ w_i
        b = o1 + i * m1
        out[b] = tt * h0 - lam * y[b]
        if m1 > 1:
            out[b + 1] = tt * h1 - lam * y[b + 1]
        if m1 > 2:
            out[b + 2] = tt * h2 - lam * y[b + 2]
        if m1 > 3:
            out[b + 3] = tt * h3 - lam * y[b + 3]
        # v̇_ci = θ_B θ_i (Σ_n φ e_nc − (1 − θ_i) s_i v_ci) − λ v_ci
        out[o2 + i] = (k0 - (1.0 - th) * s * v0) * tt - lam * v0
        if p > 1:
            out[o2 + n + i] = (k1 - (1.0 - th) * s * v1) * tt - lam * v1
    # ∂L/∂θ_B = g_B + γ_B,  g_B = gain + ½ Σ_i θ_i (1 − θ_i) s_i ||v_i||²,  γ_B = c_B + c_1 |θ|₁
    out[0] = -(gain + 0.5 * var + c_B + c_1 * sum_th)


@njit()
def _velocity_rows(Y: np.ndarray, out: np.ndarray, XhT: np.ndarray, RT: np.ndarray, params: np.ndarray,
                   dims: np.ndarray) -> None:
    N = XhT.shape[1]
    phi = np.empty((dims[1], N))
    e = np.empty((RT.shape[0], N))
    for b in range(Y.shape[0]):
        block_velocity(Y[b], out[b], XhT, RT, params, dims, phi, e)


def velocity_batch(problem: BlockProblem | BlockData, Y: np.ndarray, *, workers: int = 1) -> np.ndarray:
    """``−∇L`` at ``Π_H`` of every row of ``Y`` (B, D) with the compiled kernel (``workers`` threads).

    Compare :func:`theory.block_model.velocity`, which does not clip the gates (pass states with
    gates in ``H`` to compare).
    """
    data = problem if isinstance(problem, BlockData) else BlockData.of(problem)
    Ya = np.ascontiguousarray(np.atleast_2d(np.asarray(Y, dtype=np.float64)))
    out = np.empty_like(Ya)
    bounds = np.linspace(0, Ya.shape[0], max(1, min(workers, Ya.shape[0] // 1024)) + 1).astype(int)

    def run(a: int, b: int) -> None:
        _velocity_rows(Ya[a:b], out[a:b], data.XhT, data.RT, data.params, data.dims)

    if bounds.size == 2:
        run(0, Ya.shape[0])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=bounds.size - 1) as pool:
            list(pool.map(lambda ab: run(*ab), zip(bounds[:-1], bounds[1:])))
    return out


__all__ = ["FUSED_M1", "FUSED_P", "BlockData", "block_velocity", "velocity_batch"]
