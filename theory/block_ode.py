"""Compiled batch integrator for the canonical block's projected ODE [22]/[24] (THEORY §6–§7).

The same two schemes as :func:`theory.ode.odeint_batch` — adaptive
Runge–Kutta–Chebyshev (``"rkc"``) and the fixed-step explicit Runge–Kutta
tableaus (``"rk4"``, ...) — with the same face handling (stage velocities
projected with the face status of the step start, switches located within
the step — cubic Hermite for hits, linear in ``v`` for releases — and the step
cut there, gates put exactly onto their face or freed, ``Π_H`` after every
step), but the *whole per-trajectory step loop* compiled with numba: field
(:func:`theory.block_kernel.block_velocity`), stages, error control,
spectral-radius estimates, switch location and face-hit events.  Each
trajectory runs on its own (its own ``t``, ``h``, stage count), which is what
the numpy reference emulates with masks and stage groups; threads take
chunks of trajectories (the kernels release the GIL).

The numpy path of :mod:`theory.ode` stays the readable reference; the two
are tested against each other (endpoints, face-hit times, final vertex) in
``tests/test_block_ode.py``.  They agree to the integrators' tolerances, not
bit for bit: the compiled field sums in another order and uses
:func:`theory.jit.fast_tanh` (≤ 5 ulp), and the RKC spectral-radius start
vector is the same for every trajectory (numpy draws one per column), so an
adaptive step sequence may differ by an accepted/rejected step near the
error threshold.

:func:`odeint_block` is called by :func:`theory.ode.odeint_batch` (backend
``"auto"`` or ``"numba"``) when ``fun`` is :func:`theory.block_model.field`
of a :class:`~theory.block_model.BlockProblem`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .block_kernel import BlockData, block_velocity
from .block_model import BlockProblem
from .jit import njit

# --------------------------------------------------------------------------------------------------
# Small pieces shared by both schemes (one trajectory; gates are y[:K])
# --------------------------------------------------------------------------------------------------


@njit()
def _status(y: np.ndarray, v: np.ndarray, released: np.ndarray, face_atol: float, status: np.ndarray) -> None:
    """Face status of the gates: −1 pinned at 0, +1 pinned at 1, 0 free (``released`` gates are free)."""
    for j in range(status.size):
        s = 0.0
        if y[j] <= face_atol and v[j] <= 0.0:
            s = -1.0
        if y[j] >= 1.0 - face_atol and v[j] >= 0.0:
            s = 1.0
        if released[j]:
            s = 0.0
        status[j] = s


@njit()
def _project_gates(v: np.ndarray, status: np.ndarray, out: np.ndarray) -> None:
    """``out = v`` with the projected field [22]/[27] on the gates for the given face status (in place allowed)."""
    for d in range(v.size):
        out[d] = v[d]
    for j in range(status.size):
        if status[j] == -1.0:
            out[j] = max(v[j], 0.0)
        elif status[j] == 1.0:
            out[j] = min(v[j], 0.0)


@njit()
def _clip_gates(y: np.ndarray, K: int) -> None:
    for j in range(K):
        y[j] = min(max(y[j], 0.0), 1.0)


@njit()
def _hermite_crossing(th0: float, th1: float, d0: float, d1: float, level: float) -> float:
    """First ``s ∈ (0, 1]`` where the cubic Hermite interpolant hits ``level`` (bisection, 50 halvings)."""
    inner = 1.0 if th1 < level else -1.0
    lo = 0.0
    hi = 1.0
    for _ in range(50):
        s = 0.5 * (lo + hi)
        s2 = s * s
        s3 = s2 * s
        p = (2 * s3 - 3 * s2 + 1) * th0 + (s3 - 2 * s2 + s) * d0 + (3 * s2 - 2 * s3) * th1 + (s3 - s2) * d1
        if (p - level) * inner < 0:
            hi = s
        else:
            lo = s
    return hi


@njit()
def _switch_fraction(
    y0: np.ndarray, y1: np.ndarray, status: np.ndarray, v0: np.ndarray, v1: np.ndarray, released: np.ndarray,
    h: float, c_last: float, kind: np.ndarray, frac: np.ndarray,
) -> float:
    """Fraction ``τ`` of the step where the first gate switches (1: none) and ``kind`` per gate (1 hit 0, 2 hit 1,
    3 released, 0 none at ``τ``): one column of :func:`theory.ode._switch_fraction`."""
    K = status.size
    tau = 1.0
    for j in range(K):
        st = status[j]
        free = st == 0.0 and not released[j]
        t0 = y0[j]
        t1 = y1[j]
        hit0 = free and t1 < 0.0
        hit1 = free and t1 > 1.0
        rel = ((st == -1.0 and v1[j] > 0.0) or (st == 1.0 and v1[j] < 0.0)) and c_last > 0.0
        f0 = 1.0
        f1 = 1.0
        fr = 1.0
        if hit0:
            if c_last == 1.0:
                f0 = _hermite_crossing(t0, t1, h * v0[j], h * v1[j], 0.0)
            else:
                f0 = t0 / (t0 - t1)
        if hit1:
            if c_last == 1.0:
                f1 = _hermite_crossing(t0, t1, h * v0[j], h * v1[j], 1.0)
            else:
                f1 = (1.0 - t0) / (t1 - t0)
        if rel:
            fr = c_last * v0[j] / (v0[j] - v1[j])
        if f0 != f0 or f1 != f1 or fr != fr:
            fj = 0.0
        else:
            fj = min(min(f0, f1), fr)
            fj = min(max(fj, 0.0), 1.0)
        k = 0
        if hit0 and f0 <= fj:
            k = 1
        if hit1 and f1 <= fj:
            k = 2
        if rel and fr <= fj:
            k = 3
        kind[j] = k
        frac[j] = fj
        tau = min(tau, fj)
    for j in range(K):
        if frac[j] > tau:
            kind[j] = 0
    return tau


@njit()
def _record_event(hit_t: np.ndarray, b: int, ev_gate: np.ndarray, ev_kind: np.ndarray, kind: np.ndarray,
                  when: float) -> None:
    """First-hit times of the face events whose gate switched with the event's kind."""
    for ei in range(ev_gate.size):
        if kind[ev_gate[ei]] == ev_kind[ei] and hit_t[ei, b] != hit_t[ei, b]:
            hit_t[ei, b] = when


# --------------------------------------------------------------------------------------------------
# Adaptive RKC2 (one trajectory)
# --------------------------------------------------------------------------------------------------


@njit()
def _power(
    Y: np.ndarray, F0: np.ndarray, status: np.ndarray, z: np.ndarray, iters: int, Yt: np.ndarray, Vt: np.ndarray,
    XhT: np.ndarray, RT: np.ndarray, params: np.ndarray, dims: np.ndarray, phi: np.ndarray, e: np.ndarray,
) -> float:
    """Warm-started nonlinear power iteration on the status-frozen projected field: ``1.2 ρ + 1e-8``."""
    D = Y.size
    ynorm = 0.0
    for d in range(D):
        ynorm += Y[d] * Y[d]
    eps = 1.4901161193847656e-08 * (1.0 + math.sqrt(ynorm))
    rho = 0.0
    for _ in range(iters):
        for j in range(status.size):
            if status[j] != 0.0:
                z[j] = 0.0
        zn = 0.0
        for d in range(D):
            zn += z[d] * z[d]
        zn = math.sqrt(zn)
        if zn == 0.0:
            zn = 1.0
        scale = eps / zn
        for d in range(D):
            Yt[d] = Y[d] + z[d] * scale
        block_velocity(Yt, Vt, XhT, RT, params, dims, phi, e)
        _project_gates(Vt, status, Vt)
        inv = 1.0 / eps
        rr = 0.0
        for d in range(D):
            z[d] = (Vt[d] - F0[d]) * inv
            rr += z[d] * z[d]
        rho = math.sqrt(rr)
    return 1.2 * rho + 1e-8


@njit()
def _rkc_step(
    Y0: np.ndarray, F0: np.ndarray, h: float, s: int, kk: int, MU: np.ndarray, NU: np.ndarray, MUT: np.ndarray,
    GAMT: np.ndarray, status: np.ndarray, Yn: np.ndarray, Vn: np.ndarray, Ybuf: np.ndarray, Vt: np.ndarray,
    XhT: np.ndarray, RT: np.ndarray, params: np.ndarray, dims: np.ndarray, phi: np.ndarray, e: np.ndarray,
) -> None:
    """One ``s``-stage RKC2 step of size ``h`` (coefficients: row ``kk`` of the tables): ``Yn`` (raw) and the raw
    velocity ``Vn`` there.  ``Ybuf`` (3, D) holds ``Y_{j−2}, Y_{j−1}, Y_j`` in rotation."""
    D = Y0.size
    i2, i1, i0 = 0, 1, 2  # rows of Y_{j-2}, Y_{j-1}, Y_j
    m1h = MUT[kk, 1] * h
    for d in range(D):
        Ybuf[i2, d] = Y0[d]
        Ybuf[i1, d] = Y0[d] + m1h * F0[d]
    for j in range(2, s + 1):
        block_velocity(Ybuf[i1], Vt, XhT, RT, params, dims, phi, e)
        _project_gates(Vt, status, Vt)
        mj, nj = MU[kk, j], NU[kk, j]
        c0 = 1.0 - mj - nj
        mh, gh = MUT[kk, j] * h, GAMT[kk, j] * h
        for d in range(D):
            Ybuf[i0, d] = c0 * Y0[d] + mj * Ybuf[i1, d] + nj * Ybuf[i2, d] + mh * Vt[d] + gh * F0[d]
        i2, i1, i0 = i1, i0, i2
    for d in range(D):
        Yn[d] = Ybuf[i1, d]
    block_velocity(Yn, Vn, XhT, RT, params, dims, phi, e)


@njit()
def _rkc_range(
    lo: int, hi: int, Y0: np.ndarray, t_eval: np.ndarray, out: np.ndarray, hit_t: np.ndarray, ev_gate: np.ndarray,
    ev_kind: np.ndarray, XhT: np.ndarray, RT: np.ndarray, params: np.ndarray, dims: np.ndarray, stage_grid: np.ndarray,
    betas: np.ndarray, MU: np.ndarray, NU: np.ndarray, MUT: np.ndarray, GAMT: np.ndarray, rtol: float, atol: float,
    face_atol: float, h0: float, rho_every: int, zpert: np.ndarray, stats: np.ndarray,
) -> None:
    """Trajectories ``lo..hi-1``: adaptive RKC2 with face handling (the logic of ``theory.ode._RKCBatch``, one
    trajectory at a time)."""
    D = Y0.shape[1]
    n = dims[1]
    K = 1 + n
    N = XhT.shape[1]
    phi = np.empty((n, N))
    e = np.empty((RT.shape[0], N))
    Y = np.empty(D)
    V = np.empty(D)
    F0 = np.empty(D)
    Yn = np.empty(D)
    Vn = np.empty(D)
    Fn = np.empty(D)
    A1 = np.empty(D)
    Ybuf = np.empty((3, D))
    Vt = np.empty(D)
    z = np.empty(D)
    status = np.zeros(K)
    released = np.zeros(K, dtype=np.bool_)
    pend_kind = np.zeros(K, dtype=np.int64)
    kind = np.zeros(K, dtype=np.int64)
    frac = np.zeros(K)
    n_out = t_eval.size
    n_grid = stage_grid.size
    t_abs = 1.0
    for k in range(n_out):
        t_abs = max(t_abs, abs(t_eval[k]))
    h_min = 1e-12 * t_abs
    for b in range(lo, hi):
        for d in range(D):
            Y[d] = Y0[b, d]
        for j in range(K):
            released[j] = False
            pend_kind[j] = 0
        nfev = 0
        steps = 0
        switches = 0
        rejected = 0
        block_velocity(Y, V, XhT, RT, params, dims, phi, e)
        nfev += 1
        _status(Y, V, released, face_atol, status)
        _project_gates(V, status, F0)
        h = h0
        for d in range(D):
            z[d] = F0[d] + 1e-3 * zpert[d] * (1.0 + abs(F0[d]))
        rho = _power(Y, F0, status, z, np.int64(4), A1, Vt, XhT, RT, params, dims, phi, e)
        nfev += 4
        since_rho = 0
        t = t_eval[0]
        nxt = 1
        ok = True
        pending = False
        zero_commits = 0
        while nxt < n_out:
            if since_rho >= rho_every:
                rho = _power(Y, F0, status, z, np.int64(1), A1, Vt, XhT, RT, params, dims, phi, e)
                nfev += 1
                since_rho = 0
            t_next = t_eval[nxt]
            h_try = min(h, t_next - t)
            clamped = h_try >= t_next - t
            hr = h_try * rho
            kk = 0  # the smallest stage count s with β(s) ≥ h ρ
            while kk < n_grid and betas[kk] < hr:
                kk += 1
            if kk >= n_grid:
                kk = n_grid - 1
                h_try = 0.95 * betas[n_grid - 1] / rho
                clamped = False
            s = stage_grid[kk]
            hc = h_try
            _rkc_step(Y, F0, hc, s, kk, MU, NU, MUT, GAMT, status, Yn, Vn, Ybuf, Vt, XhT, RT, params, dims, phi, e)
            nfev += s
            steps += 1
            _project_gates(Vn, status, Fn)
            acc2 = 0.0
            for d in range(D):
                est = 0.8 * (Y[d] - Yn[d]) + (0.4 * hc) * (F0[d] + Fn[d])
                sc = atol + rtol * max(abs(Y[d]), abs(Yn[d]))
                acc2 += (est / sc) ** 2
            err = math.sqrt(acc2 / D)
            if not math.isfinite(err):
                err = 1e10
            acc = err <= 1.0
            fac = 0.8 * max(err, 1e-10) ** (-1.0 / 3.0)
            tau = _switch_fraction(Y, Yn, status, V, Vn, released, hc, 1.0, kind, frac)
            # a pending switch is due only if this step is the full cut step (not one shortened by an output time)
            pending = pending and hc >= h * (1.0 - 1e-12)
            cut = acc and tau < 1.0 and not (pending and tau >= 0.5)
            commit = acc and not cut
            tiny = cut and tau * hc <= h_min
            if tiny and zero_commits > 0:  # a switch applied without advancing may not be applied again
                cut = False
                tiny = False
                commit = True
                pending = False
            if cut and not tiny:  # retry with the step ending at the switching time
                h = tau * hc
                pending = True
                for j in range(K):
                    pend_kind[j] = kind[j]
            if commit and not tiny:
                zero_commits = 0
            if tiny:  # apply the switch now, without advancing
                zero_commits += 1
                for d in range(D):
                    Yn[d] = Y[d]
                    Vn[d] = V[d]
                hc = 0.0
                clamped = False
                for j in range(K):
                    pend_kind[j] = kind[j]
                pending = True
                commit = True
            if not acc:
                rejected += 1
                h = hc * min(max(fac, 0.1), 1.0)
                pending = False
                for j in range(K):
                    pend_kind[j] = 0
                if h < h_min:
                    ok = False
                    break
            if not commit:
                continue
            # commit: pinned gates stay on their face, switching gates are put onto it (or freed)
            any_switch = False
            for j in range(K):
                th = Yn[j]
                if status[j] == -1.0:
                    th = 0.0
                elif status[j] == 1.0:
                    th = 1.0
                pk = pend_kind[j] if pending else 0
                if pk == 1:
                    th = 0.0
                elif pk == 2:
                    th = 1.0
                Yn[j] = min(max(th, 0.0), 1.0)
                released[j] = pk == 3
                kind[j] = pk
                if pk != 0:
                    switches += 1
                    any_switch = True
            t_new = t + hc
            if clamped:
                t_new = t_eval[nxt]
            if any_switch:
                _record_event(hit_t, b, ev_gate, ev_kind, kind, t_new)
            _status(Yn, Vn, released, face_atol, status)
            for d in range(D):
                Y[d] = Yn[d]
                V[d] = Vn[d]
            _project_gates(V, status, F0)
            t = t_new
            grow = min(max(fac, 0.2), 5.0)
            h_new = hc * grow
            if clamped and grow > 1.0:
                h_new = max(h_new, h)
            if hc > 0.0:
                h = h_new
            pending = False
            for j in range(K):
                pend_kind[j] = 0
            since_rho += 1
            if any_switch:
                since_rho = 1 << 30  # re-estimate ρ after a switch
            if clamped:
                for d in range(D):
                    out[nxt, b, d] = Y[d]
                nxt += 1
        if not ok:  # step size underflow: no outputs past the failure
            for k in range(nxt, n_out):
                for d in range(D):
                    out[k, b, d] = np.nan
        stats[b, 0] = nfev
        stats[b, 1] = steps
        stats[b, 2] = switches
        stats[b, 3] = rejected
        stats[b, 4] = 1 if ok else 0


# --------------------------------------------------------------------------------------------------
# Fixed-step explicit Runge–Kutta (one trajectory)
# --------------------------------------------------------------------------------------------------


@njit()
def _rk_stages(
    Y: np.ndarray, h: float, status: np.ndarray, V0: np.ndarray, A: np.ndarray, Bw: np.ndarray, Ks: np.ndarray,
    Ys: np.ndarray, Ynew: np.ndarray, v_first: np.ndarray, v_last: np.ndarray,
    XhT: np.ndarray, RT: np.ndarray, params: np.ndarray, dims: np.ndarray, phi: np.ndarray, e: np.ndarray,
) -> int:
    """One explicit RK step with frozen face status -> ``Ynew`` (raw), raw gate velocities of the first and last
    stage; returns the number of field evaluations."""
    S = Bw.size
    D = Y.size
    K = status.size
    for s in range(S):
        Ks_s = Ks[s]
        if s == 0:
            for d in range(D):
                Ks_s[d] = V0[d]
        else:
            for d in range(D):
                Ys[d] = Y[d]
            for j in range(s):
                a = A[s, j]
                if a != 0.0:
                    ah = a * h
                    Kj = Ks[j]
                    for d in range(D):
                        Ys[d] += ah * Kj[d]
            block_velocity(Ys, Ks_s, XhT, RT, params, dims, phi, e)
        if s == 0:
            for j in range(K):
                v_first[j] = Ks_s[j]
        if s == S - 1:
            for j in range(K):
                v_last[j] = Ks_s[j]
        _project_gates(Ks_s, status, Ks_s)
    for d in range(D):
        Ynew[d] = Y[d]
    for j in range(S):
        bh = Bw[j] * h
        Kj = Ks[j]
        for d in range(D):
            Ynew[d] += bh * Kj[d]
    return S - 1


@njit()
def _rk_range(
    lo: int, hi: int, Y0: np.ndarray, out: np.ndarray, hit_t: np.ndarray, ev_gate: np.ndarray, ev_kind: np.ndarray,
    XhT: np.ndarray, RT: np.ndarray, params: np.ndarray, dims: np.ndarray, g_t0: np.ndarray, g_h: np.ndarray,
    g_k: np.ndarray, A: np.ndarray, Bw: np.ndarray, c_last: float, face_atol: float, split: bool, stats: np.ndarray,
) -> None:
    """Trajectories ``lo..hi-1``: fixed steps on the grid ``(g_t0, g_h, g_k)`` with face handling (the logic of
    ``theory.ode._BatchStepper``, one trajectory at a time)."""
    D = Y0.shape[1]
    n = dims[1]
    K = 1 + n
    N = XhT.shape[1]
    S = Bw.size
    phi = np.empty((n, N))
    e = np.empty((RT.shape[0], N))
    Y = np.empty(D)
    V0 = np.empty(D)
    Ks = np.empty((S, D))
    Ys = np.empty(D)
    Ynew = np.empty(D)
    Yr = np.empty(D)
    Yp = np.empty(D)
    v_first = np.empty(K)
    v_last = np.empty(K)
    status = np.zeros(K)
    released = np.zeros(K, dtype=np.bool_)
    kind = np.zeros(K, dtype=np.int64)
    frac = np.zeros(K)
    max_splits = 2 * K + 4
    for b in range(lo, hi):
        for d in range(D):
            Y[d] = Y0[b, d]
        nfev = 0
        steps = 0
        switches = 0
        for jj in range(g_t0.size):
            for si in range(g_k[jj]):
                t = g_t0[jj] + si * g_h[jj]
                h = g_h[jj]
                steps += 1
                block_velocity(Y, V0, XhT, RT, params, dims, phi, e)
                nfev += 1
                for j in range(K):
                    released[j] = False
                _status(Y, V0, released, face_atol, status)
                nfev += _rk_stages(Y, h, status, V0, A, Bw, Ks, Ys, Ynew, v_first, v_last, XhT, RT, params, dims,
                                   phi, e)
                if not split:  # plain clipping; hits located linearly within the step
                    _record_linear(hit_t, b, ev_gate, ev_kind, Y, Ynew, t, h, 0.0)
                else:
                    tau = _switch_fraction(Y, Ynew, status, v_first, v_last, released, h, c_last, kind, frac)
                    if tau < 1.0:  # re-step, splitting at every switch
                        for d in range(D):
                            Yr[d] = Y[d]
                        remaining = h
                        elapsed = 0.0
                        for it in range(max_splits + 1):
                            block_velocity(Yr, V0, XhT, RT, params, dims, phi, e)
                            nfev += 1
                            _status(Yr, V0, released, face_atol, status)
                            ha = remaining
                            nfev += _rk_stages(Yr, ha, status, V0, A, Bw, Ks, Ys, Ynew, v_first, v_last,
                                               XhT, RT, params, dims, phi, e)
                            if it == max_splits:  # give up splitting: accept with plain clipping
                                tau = 1.0
                                for j in range(K):
                                    kind[j] = 0
                            else:
                                tau = _switch_fraction(Yr, Ynew, status, v_first, v_last, released, ha, c_last, kind,
                                                       frac)
                            if tau >= 1.0:
                                _record_linear(hit_t, b, ev_gate, ev_kind, Yr, Ynew, t, ha, elapsed)
                                break
                            hp = ha * tau
                            nfev += _rk_stages(Yr, hp, status, V0, A, Bw, Ks, Ys, Yp, v_first, v_last,
                                               XhT, RT, params, dims, phi, e)
                            for j in range(K):
                                th = Yp[j]
                                if kind[j] == 1:
                                    th = 0.0
                                elif kind[j] == 2:
                                    th = 1.0
                                Yp[j] = min(max(th, 0.0), 1.0)
                                if kind[j] == 3:
                                    released[j] = True
                                if kind[j] != 0:
                                    switches += 1
                            _record_event(hit_t, b, ev_gate, ev_kind, kind, t + elapsed + hp)
                            for d in range(D):
                                Yr[d] = Yp[d]
                            elapsed += hp
                            remaining -= hp
                _clip_gates(Ynew, K)
                for d in range(D):
                    Y[d] = Ynew[d]
            for d in range(D):
                out[jj + 1, b, d] = Y[d]
        stats[b, 0] = nfev
        stats[b, 1] = steps
        stats[b, 2] = switches
        stats[b, 3] = 0
        stats[b, 4] = 1


@njit()
def _record_linear(
    hit_t: np.ndarray, b: int, ev_gate: np.ndarray, ev_kind: np.ndarray, y0: np.ndarray, y1: np.ndarray, t: float,
    h: float, offset: float,
) -> None:
    """First-hit times from a step without splitting (linear interpolation of the gate within the step)."""
    for ei in range(ev_gate.size):
        j = ev_gate[ei]
        a = y0[j]
        c = y1[j]
        if ev_kind[ei] == 1:
            hit = a > 0.0 and c <= 0.0
            f = a / (a - c)
        else:
            hit = a < 1.0 and c >= 1.0
            f = (1.0 - a) / (c - a)
        if hit and hit_t[ei, b] != hit_t[ei, b]:
            if f != f:
                f = 0.0
            hit_t[ei, b] = t + offset + h * f


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RKCTables:
    """RKC2 coefficients of the stage grid as arrays (rows: stage counts; columns: stage index ``j``)."""

    stage_grid: np.ndarray
    betas: np.ndarray
    mu: np.ndarray
    nu: np.ndarray
    mu_t: np.ndarray
    gamma_t: np.ndarray


_TABLES: dict[int, RKCTables] = {}


def rkc_tables(max_stages: int) -> RKCTables:
    """The coefficient tables of :data:`theory.ode.RKC_STAGES` up to ``max_stages`` (cached)."""
    from .ode import RKC_STAGES, rkc_coefficients

    if max_stages not in _TABLES:
        grid = np.array([s for s in RKC_STAGES if s <= max_stages] or [2], dtype=np.int64)
        smax = int(grid.max())
        arrs = [np.zeros((grid.size, smax + 1)) for _ in range(4)]
        betas = np.empty(grid.size)
        for r, s in enumerate(grid):
            co = rkc_coefficients(int(s))
            betas[r] = co.beta
            for arr, vals in zip(arrs, (co.mu, co.nu, co.mu_t, co.gamma_t)):
                arr[r, : len(vals)] = vals
        _TABLES[max_stages] = RKCTables(grid, betas, *arrs)
    return _TABLES[max_stages]


#: Start vector perturbation of the RKC spectral-radius estimate (the same for every trajectory).
_ZPERT_SEED = 12345


def odeint_block(
    problem: BlockProblem,
    Y0: np.ndarray,
    t_eval: np.ndarray,
    *,
    method: str,
    dt: float,
    rtol: float,
    atol: float,
    events: Sequence[Any],
    face_atol: float,
    split_switches: bool,
    workers: int,
    max_stages: int,
    out: np.ndarray,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], float]:
    """Integrate ``Y0`` (B, D; gates already in ``H``) with the compiled kernels; writes ``out`` (T, B, D).

    Returns ``(out, hit_t (E, B), stats, wall seconds)``; ``stats`` sums ``nfev``, ``steps``, ``switches``,
    ``rejected``, counts ``failed`` trajectories and gives the CPU seconds of each worker thread
    (``thread_cpu``, largest first).  Arguments are those of :func:`theory.ode.odeint_batch`
    (validated there); ``events`` are :class:`theory.ode.FaceEvent` objects on gate coordinates; ``workers``
    threads take chunks of ``chunk`` trajectories (default ``min(256, B/(8·workers))``: small chunks balance
    trajectories of very different cost).
    """
    from .ode import TABLEAUS, _step_grid

    data = BlockData.of(problem)
    Y0c = np.ascontiguousarray(Y0, dtype=np.float64)
    B, D = Y0c.shape
    teval = np.ascontiguousarray(t_eval, dtype=np.float64)
    ev_gate = np.array([e.index for e in events], dtype=np.int64)
    ev_kind = np.array([1 if e.face == 0.0 else 2 for e in events], dtype=np.int64)
    hit_t = np.full((len(events), B), np.nan)
    stats = np.zeros((B, 5), dtype=np.int64)
    out[0] = Y0c
    if method == "rkc":
        tab = rkc_tables(max_stages)
        zpert = np.random.default_rng(_ZPERT_SEED).standard_normal(D)

        def run(lo: int, hi: int) -> None:
            _rkc_range(lo, hi, Y0c, teval, out, hit_t, ev_gate, ev_kind, data.XhT, data.RT, data.params, data.dims,
                       tab.stage_grid, tab.betas, tab.mu, tab.nu, tab.mu_t, tab.gamma_t, float(rtol), float(atol),
                       float(face_atol), float(dt), 25, zpert, stats)
    else:
        tb = TABLEAUS[method]
        S = len(tb.c)
        A = np.zeros((S, S))
        for s, row in enumerate(tb.a):
            A[s, : len(row)] = row
        Bw = np.array(tb.b, dtype=np.float64)
        grid = _step_grid(teval, dt)
        g_t0 = np.array([g[0] for g in grid], dtype=np.float64)
        g_h = np.array([g[1] for g in grid], dtype=np.float64)
        g_k = np.array([g[2] for g in grid], dtype=np.int64)

        def run(lo: int, hi: int) -> None:
            _rk_range(lo, hi, Y0c, out, hit_t, ev_gate, ev_kind, data.XhT, data.RT, data.params, data.dims,
                      g_t0, g_h, g_k, A, Bw, float(tb.c[-1]), float(face_atol), bool(split_switches), stats)

    thread_cpu: dict[int, float] = {}

    def timed(ab: tuple[int, int]) -> None:
        c0 = time.thread_time()
        run(*ab)
        key = threading.get_ident()
        thread_cpu[key] = thread_cpu.get(key, 0.0) + time.thread_time() - c0

    t0 = time.perf_counter()
    if chunk is None:
        chunk = max(1, min(256, math.ceil(B / (8 * workers))))
    bounds = [(a, min(a + chunk, B)) for a in range(0, B, chunk)]
    if workers == 1 or len(bounds) == 1:
        for ab in bounds:
            timed(ab)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(timed, bounds))
    wall = time.perf_counter() - t0
    tot = stats.sum(axis=0)
    summary: dict[str, Any] = {"nfev": int(tot[0]), "steps": int(tot[1]), "switches": int(tot[2]),
                               "rejected": int(tot[3]), "failed": int(B - tot[4]),
                               "thread_cpu": tuple(sorted(thread_cpu.values(), reverse=True))}
    return out, hit_t, summary, wall


__all__ = ["RKCTables", "odeint_block", "rkc_tables"]
