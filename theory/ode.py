"""Integrators for the projected ODE [22] (THEORY §6): one trajectory exactly, many at once fast.

The projected ODE is ``ẏ = v(y)`` on the weights and ``θ̇ = Π(θ, v)`` on the
gates, with ``Π`` the coordinate-wise projected field of [22]/[27]
(:func:`theory.projection.projected_field`): inside ``H`` the field is ``v``,
on the face ``θ_j = 0`` it is ``max(v_j, 0)``, on ``θ_j = 1`` it is
``min(v_j, 0)``.  ``fun(t, y)`` always returns the *unconstrained* velocity
``−∇L``; the integrators here add the projection and keep ``θ ∈ H``.

The field is discontinuous where a gate *hits* a face (``v_j`` jumps to 0) and
has a kink where a gate pinned at a face is *released* (``max(v_j, 0)``
crosses 0).  Both integrators treat the projected ODE as a hybrid system and
put those switching times at step boundaries:

* :func:`odeint` (one trajectory, the reference): :func:`scipy.integrate.solve_ivp`
  runs on segments between switches.  Inside a segment every gate is either
  *free* (velocity ``v_j``, evaluated at the state clipped into ``H``) or
  *pinned* at a face (velocity ``projected_field`` at that face); terminal
  events find the next hit (``θ_j`` crossing 0 or 1) or release (``v_j``
  changing sign at a face), the gate is set exactly onto its face or freed,
  and the solver restarts.  This is what makes implicit/stiff methods
  (``LSODA``, ``BDF``, ``Radau``) usable at all: on the raw projected field an
  implicit step across a face has no solution and the step size collapses.
* :func:`odeint_batch` (many trajectories, vectorised over a batch axis),
  two schemes, both explicit so that the projection stays coordinate-wise:

  - ``method="rk4"`` (default; also ``heun``, ``euler``, ``ssprk3``,
    ``rk38``): fixed step, shared by the batch.  Every stage evaluates
    ``fun`` at the stage state clipped into ``H`` (``Π_H``) and applies
    ``projected_field`` to the stage velocity with the face status of the
    step start; after the step ``Π_H`` is applied.  A trajectory in which a
    gate hits or leaves a face during a step is re-stepped: the switching
    time is located within the step (cubic Hermite interpolation of ``θ_j``
    for hits, linear in ``v_j`` for releases), the step is split there and
    the gate is put exactly on its face (or freed), so the order of the
    scheme survives switches (plain clipping costs ``O(dt²)`` per switch).
    Outputs land exactly on ``t_eval``; ``O(dt⁴)`` accuracy; stable for
    ``dt λ_max ≤ 2.78`` (the Jacobian of a gradient flow is symmetric, its
    spectrum real; :func:`stable_dt`).  The accurate choice.
  - ``method="rkc"``: adaptive second-order Runge–Kutta–Chebyshev (Sommeijer,
    Shampine & Verwer 1997) with a step size, a stage count and a
    spectral-radius estimate *per trajectory*.  Its ``s``-stage stability
    interval ``≈ 0.65 s²`` grows quadratically with ``s``: on a stiff
    gradient flow (the canonical block with ``N = 32`` samples has
    ``λ_max ≈ 50–130`` once the weights have fitted the data) it needs
    ``≈ T sqrt(λ_max / (0.65 h))`` evaluations instead of RK4's
    ``≈ 1.4 T λ_max``; trajectories whose block is pruned become non-stiff
    and take long steps.  Same face handling (switches cut the step).  The
    fast choice for basin maps; accuracy set by ``rtol``/``atol``.

  Switches are rare (a few per trajectory), so splitting costs next to
  nothing.  The batch is processed in chunks of columns (cache) and, with
  ``workers > 1``, in threads (numpy releases the GIL).

State arrays inside :func:`odeint_batch` are stored as (D, B) C-contiguous
blocks and handed to ``fun`` as their transposes, i.e. (B, D) arrays whose
``.T`` is contiguous: a field can read rows of ``Y.T`` without copying
(:func:`theory.block_model.field` does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp

from .projection import project, projected_field

Fun = Callable[[float, np.ndarray], np.ndarray]

#: Offset of the face-event levels in :func:`odeint` (a hit is "θ < −ε", a release "v pointing inward by > ε").
_EVENT_EPS = 1e-13

# --------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------


class FaceEvent:
    """Event "coordinate ``index`` reaches the face ``θ = face``" (``face`` 0 or 1).

    Callable as a solve_ivp event (``y[index] − face``).  The integrators
    recognise it: for a gate coordinate they record the exact times at which
    the projected trajectory hits that face (the switching times they locate
    anyway), not zero crossings of a raw state that sits on the face.
    """

    def __init__(self, index: int, face: float = 0.0, *, terminal: bool = False) -> None:
        if face not in (0.0, 1.0):
            raise ValueError(f"face must be 0 or 1, got {face!r}")
        self.index = int(index)
        self.face = float(face)
        self.terminal = bool(terminal)
        self.direction = -1.0 if face == 0.0 else 1.0

    def __call__(self, t: float, y: np.ndarray) -> float:
        return float(y[self.index] - self.face)

    def __repr__(self) -> str:
        return f"FaceEvent(index={self.index}, face={self.face:g}, terminal={self.terminal})"


def hits_zero(index: int, *, terminal: bool = False) -> FaceEvent:
    """Event factory: gate ``index`` (a state coordinate) hits ``θ = 0`` (the pruning face)."""
    return FaceEvent(index, 0.0, terminal=terminal)


def hits_one(index: int, *, terminal: bool = False) -> FaceEvent:
    """Event factory: gate ``index`` hits ``θ = 1``."""
    return FaceEvent(index, 1.0, terminal=terminal)


def _theta_indices(theta_slice: slice, D: int) -> range:
    if not isinstance(theta_slice, slice):
        raise ValueError(f"theta_slice must be a slice, got {type(theta_slice).__name__}")
    idx = range(D)[theta_slice]
    if idx.step != 1:
        raise ValueError(f"theta_slice must be a contiguous slice (step 1), got {theta_slice}")
    return idx


def _status_theta(status: np.ndarray) -> np.ndarray:
    """Surrogate ``θ`` encoding a face status for :func:`projected_field`: −1 -> 0, +1 -> 1, free -> ½."""
    return 0.5 + 0.5 * status


# --------------------------------------------------------------------------------------------------
# One trajectory: solve_ivp on segments between switches
# --------------------------------------------------------------------------------------------------


@dataclass
class OdeResult:
    """One trajectory of the projected ODE [22] (like solve_ivp's result, but ``y`` is (T, D)).

    ``y`` has ``θ`` clipped into ``H``; ``t_events``/``y_events`` hold one
    array per requested event; ``switches`` lists ``(t, index, kind)`` with
    kind ``"hit0"``, ``"hit1"`` or ``"release"``; ``segments`` is the number
    of solve_ivp calls.
    """

    t: np.ndarray
    y: np.ndarray
    success: bool
    message: str
    nfev: int
    t_events: list[np.ndarray]
    y_events: list[np.ndarray]
    theta_slice: slice
    status: int = 0
    njev: int = 0
    segments: int = 1
    switches: list[tuple[float, int, str]] = field(default_factory=list)

    @property
    def theta(self) -> np.ndarray:
        """The gate coordinates ``y[:, theta_slice]``: (T, K)."""
        return self.y[:, self.theta_slice]


class _CachedVelocity:
    """``fun`` at the clipped state, cached for the last ``(t, y)`` (events evaluate it again)."""

    def __init__(self, fun: Fun, idx: range) -> None:
        self.fun = fun
        self.sl = slice(idx.start, idx.stop)
        self.key: tuple[float, bytes] | None = None
        self.value: np.ndarray | None = None
        self.nfev = 0

    def __call__(self, t: float, y: np.ndarray) -> np.ndarray:
        key = (float(t), y.tobytes())
        if self.key != key or self.value is None:
            yc = np.array(y, dtype=np.float64)
            yc[self.sl] = project(yc[self.sl])
            v = np.asarray(self.fun(t, yc), dtype=np.float64)
            if v.shape != y.shape:
                raise ValueError(f"fun(t, y) must return shape {y.shape}, got {v.shape}")
            self.key, self.value = key, v
            self.nfev += 1
        return self.value


def odeint(
    fun: Fun,
    y0: Any,
    t_span: tuple[float, float],
    *,
    theta_slice: slice,
    t_eval: Any = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "LSODA",
    events: Sequence[Callable[..., float]] | None = None,
    face_atol: float = 0.0,
    max_step: float = math.inf,
    max_segments: int = 10_000,
) -> OdeResult:
    """One trajectory of the projected ODE [22] with :func:`scipy.integrate.solve_ivp`.

    ``fun(t, y)`` returns the unconstrained velocity (``−∇L``) for a state of
    shape (D,); ``theta_slice`` selects the gate coordinates, to which
    :func:`~theory.projection.projected_field` is applied.  The initial gates
    are projected into ``H`` (``Π_H``); a gate within ``face_atol`` of a
    face whose velocity points out of ``H`` starts pinned on it.  Hits and
    releases of faces are located by terminal events and the integration is
    restarted there (see the module doc), so the result is the solution of
    the projected ODE to the solver's tolerances even for stiff methods.

    ``events``: :class:`FaceEvent` objects (:func:`hits_zero`, :func:`hits_one`)
    on gate coordinates are reported at the exact switching times; any other
    callable ``event(t, y)`` (attributes ``terminal``/``direction`` as in
    solve_ivp) is passed to solve_ivp and sees the raw state, whose gates may
    overshoot a face by solver error only within the step that crosses it.
    A terminal event ends the integration.  ``y`` in the result is (T, D)
    with the gates clipped into ``H``.
    """
    y = np.array(y0, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y0 must be a 1-D state, got shape {y.shape}")
    D = y.shape[0]
    idx = _theta_indices(theta_slice, D)
    sl = slice(idx.start, idx.stop)
    t0, t1 = float(t_span[0]), float(t_span[1])
    if not t1 > t0:
        raise ValueError(f"t_span must be increasing (t0 < t1), got {t_span!r}")
    teval = None if t_eval is None else np.asarray(t_eval, dtype=np.float64)
    if teval is not None and (
        teval.ndim != 1 or np.any(np.diff(teval) <= 0) or teval[0] < t0 or teval[-1] > t1
    ):
        raise ValueError("t_eval must be increasing and lie within t_span")
    events = list(events or [])
    user_face = [
        i for i, e in enumerate(events) if isinstance(e, FaceEvent) and e.index in idx
    ]
    user_plain = [i for i in range(len(events)) if i not in user_face]

    vel = _CachedVelocity(fun, idx)
    y[sl] = project(y[sl])
    K = len(idx)
    status = np.zeros(K)
    v0 = vel(t0, y)[sl]
    status[(y[sl] <= face_atol) & (v0 <= 0)] = -1.0
    status[(y[sl] >= 1.0 - face_atol) & (v0 >= 0)] = 1.0
    y[sl][status == -1] = 0.0
    y[sl][status == 1] = 1.0

    ts: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    if teval is None or teval[0] == t0:
        ts.append(np.array([t0]))
        ys.append(y[None].copy())
    t_ev: list[list[float]] = [[] for _ in events]
    y_ev: list[list[np.ndarray]] = [[] for _ in events]
    switches: list[tuple[float, int, str]] = []
    njev = 0
    t = t0
    segments = 0
    stalled = 0
    success, message, stat = True, "The solver successfully reached the end of the integration interval.", 0

    while t < t1:
        segments += 1
        if segments > max_segments:
            success, message, stat = False, f"more than max_segments={max_segments} face switches", -1
            break
        st_theta = _status_theta(status)

        def rhs(tt: float, yy: np.ndarray, st_theta: np.ndarray = st_theta) -> np.ndarray:
            v = vel(tt, yy).copy()
            v[sl] = projected_field(st_theta, v[sl])
            return v

        internal: list[Callable[..., float]] = []
        meta: list[tuple[int, str]] = []
        for j in range(K):
            c = idx[j]
            # Event levels are offset by _EVENT_EPS so that a gate resting exactly on a face with zero velocity
            # (e.g. every θ_i once θ_B = 0) is not taken for a crossing (solve_ivp counts 0 -> 0 as one).
            if status[j] == 0:
                internal.append(_event(_coord_fn(c, -_EVENT_EPS), -1.0))
                meta.append((j, "hit0"))
                internal.append(_event(_coord_fn(c, 1.0 + _EVENT_EPS), 1.0))
                meta.append((j, "hit1"))
            else:  # pinned: released when v_j points back into H
                internal.append(_event(_velocity_fn(vel, c, float(status[j]) * _EVENT_EPS), -float(status[j])))
                meta.append((j, "release"))
        plain = [events[i] for i in user_plain]
        all_events = internal + plain
        seg_eval = None
        if teval is not None:
            seg_eval = teval[teval > t]  # t_eval[0] == t0 was recorded above
        sol = solve_ivp(
            rhs, (t, t1), y, method=method, t_eval=seg_eval, events=all_events or None,
            rtol=rtol, atol=atol, max_step=max_step,
        )
        njev += int(getattr(sol, "njev", 0) or 0)
        if sol.status == -1:
            success, message, stat = False, str(sol.message), -1
            break
        # outputs of this segment
        sol_t = np.asarray(sol.t, dtype=np.float64).reshape(-1)
        if sol_t.size:
            sol_y = np.asarray(sol.y, dtype=np.float64).reshape(D, -1).T
            # gates pinned in this segment sit exactly on their face (implicit solvers leave ~1e-30 noise)
            th_out = sol_y[:, sl]
            th_out[:, status == -1] = 0.0
            th_out[:, status == 1] = 1.0
            keep = sol_t > t if teval is None else np.ones(sol_t.size, dtype=bool)
            ts.append(sol_t[keep])
            ys.append(sol_y[keep])
        for k, i in enumerate(user_plain):
            te = sol.t_events[len(internal) + k]
            if te.size:
                t_ev[i].extend(te.tolist())
                y_ev[i].extend(list(sol.y_events[len(internal) + k]))
        if sol.status == 0:
            t = t1
            break
        # terminated by an event at t_end
        t_end = max(float(te[-1]) for te in sol.t_events if te.size)
        y_end: np.ndarray | None = None
        stop = False
        for e_i, te in enumerate(sol.t_events):
            if not te.size or te[-1] != t_end:
                continue
            y_end = np.array(sol.y_events[e_i][-1], dtype=np.float64)
            if e_i >= len(internal):
                stop = stop or bool(getattr(all_events[e_i], "terminal", False))
        assert y_end is not None
        y_end[sl][status == -1] = 0.0
        y_end[sl][status == 1] = 1.0
        fired = [meta[e_i] for e_i, te in enumerate(sol.t_events[: len(internal)]) if te.size and te[-1] == t_end]
        for j, kind in fired:
            switches.append((t_end, idx[j], kind))
            if kind == "hit0":
                status[j] = -1.0
            elif kind == "hit1":
                status[j] = 1.0
            else:
                status[j] = 0.0
            for i in user_face:
                ev = events[i]
                assert isinstance(ev, FaceEvent)
                if ev.index == idx[j] and kind == ("hit0" if ev.face == 0.0 else "hit1"):
                    t_ev[i].append(t_end)
                    y_ev[i].append(y_end.copy())
                    stop = stop or ev.terminal
        y = y_end
        y[sl] = project(y[sl])
        y[sl][status == -1] = 0.0
        y[sl][status == 1] = 1.0
        # the output at the switching time (solver step or t_eval point) holds the on-face value
        if ys and ts[-1].size and ts[-1][-1] == t_end:
            ys[-1] = ys[-1].copy()
            ys[-1][-1] = y
        stalled = stalled + 1 if t_end <= t else 0
        t = t_end
        if stalled > 4 * K + 4:
            success, message, stat = False, f"face switches without progress at t={t:g}", -1
            break
        if stop:
            stat, message = 1, "A termination event occurred."
            break

    tt = np.concatenate(ts) if ts else np.empty(0)
    yy = np.concatenate(ys) if ys else np.empty((0, D))
    if teval is None and t < t1 and (tt.size == 0 or tt[-1] != t):
        tt = np.append(tt, t)
        yy = np.vstack([yy, y[None]])
    yy[:, sl] = project(yy[:, sl])
    return OdeResult(
        t=tt,
        y=yy,
        success=success,
        message=message,
        nfev=vel.nfev,
        t_events=[np.asarray(te) for te in t_ev],
        y_events=[np.asarray(ye).reshape(-1, D) for ye in y_ev],
        theta_slice=sl,
        status=stat,
        njev=njev,
        segments=segments,
        switches=switches,
    )


def _coord_fn(c: int, level: float) -> Callable[[float, np.ndarray], float]:
    return lambda t, y: float(y[c] - level)


def _velocity_fn(vel: _CachedVelocity, c: int, level: float) -> Callable[[float, np.ndarray], float]:
    return lambda t, y: float(vel(t, y)[c] + level)


def _event(fn: Callable[[float, np.ndarray], float], direction: float) -> Callable[[float, np.ndarray], float]:
    def ev(t: float, y: np.ndarray) -> float:
        return float(fn(t, y))

    ev.terminal = True  # type: ignore[attr-defined]
    ev.direction = direction  # type: ignore[attr-defined]
    return ev


# --------------------------------------------------------------------------------------------------
# Many trajectories: fixed-step explicit Runge–Kutta, vectorised over the batch
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge–Kutta scheme: stage nodes ``c``, matrix ``a`` (lower triangular), weights ``b``."""

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    #: stability interval on the negative real axis (|dt λ| below this is stable)
    real_stability: float


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau("euler", 1, (0.0,), ((),), (1.0,), 2.0),
    "heun": Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5), 2.0),
    "ssprk3": Tableau(
        "ssprk3", 3, (0.0, 1.0, 0.5), ((), (1.0,), (0.25, 0.25)), (1 / 6, 1 / 6, 2 / 3), 2.5127
    ),
    "rk4": Tableau(
        "rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), 2.7853
    ),
    "rk38": Tableau(
        "rk38",
        4,
        (0.0, 1 / 3, 2 / 3, 1.0),
        ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        (1 / 8, 3 / 8, 3 / 8, 1 / 8),
        2.7853,
    ),
}


def stable_dt(lam_max: float, method: str = "rk4", safety: float = 0.9) -> float:
    """Largest fixed step with ``dt · lam_max ≤ safety ·`` (real stability interval of ``method``)."""
    tab = _tableau(method)
    if not lam_max > 0:
        raise ValueError(f"lam_max must be > 0, got {lam_max!r}")
    return safety * tab.real_stability / float(lam_max)


def _tableau(method: str) -> Tableau:
    try:
        return TABLEAUS[method]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(TABLEAUS)}, got {method!r}") from None


@dataclass
class BatchResult:
    """Many trajectories of the projected ODE [22] from :func:`odeint_batch`.

    ``y`` is (len(t), B, D) with the gates in ``H``; ``nfev`` counts
    trajectory evaluations of ``fun`` (a call on ``b`` states counts ``b``),
    ``ncalls`` the calls; ``wall_time`` in seconds; ``t_events`` is (E, B):
    for each :class:`FaceEvent` the first time the trajectory hits that face
    after ``t[0]`` (``nan`` if never); ``switches`` the number of face
    switches that were located and split; ``steps`` attempted steps (summed
    over trajectories); ``backend`` ``"numpy"`` or ``"numba"`` (the compiled
    kernels of :mod:`theory.block_ode`, whose ``ncalls`` equals ``nfev``: one
    call per trajectory evaluation); ``failed`` trajectories whose step size
    underflowed (their outputs past the failure are ``nan``); ``thread_cpu``
    (compiled backend) the CPU seconds of each worker thread, largest first —
    ``sum/max`` is the speed-up the threads give when each has a core.
    """

    t: np.ndarray
    y: np.ndarray
    nfev: int
    ncalls: int
    wall_time: float
    method: str
    dt: float
    theta_slice: slice
    t_events: np.ndarray
    switches: int = 0
    steps: int = 0
    backend: str = "numpy"
    failed: int = 0
    thread_cpu: tuple[float, ...] = ()

    @property
    def theta(self) -> np.ndarray:
        """The gate coordinates ``y[..., theta_slice]``: (len(t), B, K)."""
        return self.y[..., self.theta_slice]

    @property
    def trajectories_per_second(self) -> float:
        return self.y.shape[1] / self.wall_time if self.wall_time > 0 else math.inf


def _hermite_crossing(
    th0: np.ndarray, th1: np.ndarray, d0: np.ndarray, d1: np.ndarray, level: float
) -> np.ndarray:
    """First ``s ∈ (0, 1]`` where the cubic Hermite interpolant (values ``th0, th1``, slopes ``d0, d1``) hits ``level``.

    The interpolant is ``O(h⁴)`` accurate, so hit times are located to
    ``O(h⁴)``.  Bisection on the sign change (``th0`` on the inner side or on
    the face itself, ``th1`` beyond it), which also handles a gate that
    starts on the face, leaves it and returns within the step (its trivial
    root ``s = 0`` is not the crossing).
    """
    inner = np.where(th1 < level, 1.0, -1.0)  # sign of (p − level) before the crossing
    lo = np.zeros_like(th0)
    hi = np.ones_like(th0)
    for _ in range(50):
        s = 0.5 * (lo + hi)
        s2 = s * s
        s3 = s2 * s
        p = (2 * s3 - 3 * s2 + 1) * th0 + (s3 - 2 * s2 + s) * d0 + (3 * s2 - 2 * s3) * th1 + (s3 - s2) * d1
        crossed = (p - level) * inner < 0
        hi = np.where(crossed, s, hi)
        lo = np.where(crossed, lo, s)
    return hi


def _switch_fraction(
    theta0: np.ndarray,
    theta1: np.ndarray,
    status: np.ndarray,
    v0: np.ndarray,
    v1: np.ndarray,
    released: np.ndarray,
    h: np.ndarray | None = None,
    c_last: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Where in a step (fraction ``τ`` per column, 1 if nowhere) the first gate switches, and which.

    ``theta0``/``theta1``: gates (K, b) at the start and at the (unclipped) end
    of a step of sizes ``h`` (b,) taken with frozen face ``status``;
    ``v0``/``v1``: raw velocities of the gates at the start and at the last
    stage (node ``c_last``).  Free gates *hit* a face where ``θ`` crosses 0
    or 1 (located on the cubic Hermite interpolant when ``h`` is given and
    ``c_last == 1``, else linearly), pinned gates are *released* where ``v``
    turns inward (linear interpolation).  Gates in ``released`` (freed earlier
    in this step) are not checked.  Returns ``(τ, kind)``, kind (K, b):
    1 = hits 0, 2 = hits 1, 3 = released, 0 = no switch at ``τ``.
    """
    free = (status == 0) & ~released
    hit0 = free & (theta1 < 0)
    hit1 = free & (theta1 > 1)
    rel = (((status == -1) & (v1 > 0)) | ((status == 1) & (v1 < 0))) & (c_last > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f0 = np.where(hit0, theta0 / (theta0 - theta1), 1.0)
        f1 = np.where(hit1, (1 - theta0) / (theta1 - theta0), 1.0)
        fr = np.where(rel, c_last * v0 / (v0 - v1), 1.0)
    if h is not None and c_last == 1.0:
        hh = np.broadcast_to(h, theta0.shape)
        for mask, f, level in ((hit0, f0, 0.0), (hit1, f1, 1.0)):
            if np.any(mask):  # refine only the (few) crossing entries
                hm = hh[mask]
                f[mask] = _hermite_crossing(theta0[mask], theta1[mask], hm * v0[mask], hm * v1[mask], level)
    frac = np.minimum(np.minimum(f0, f1), fr)
    frac = np.nan_to_num(frac, nan=0.0).clip(0.0, 1.0)
    kind = np.zeros(frac.shape, dtype=np.int8)
    kind[hit0 & (f0 <= frac)] = 1
    kind[hit1 & (f1 <= frac)] = 2
    kind[rel & (fr <= frac)] = 3
    tau = frac.min(axis=0) if frac.shape[0] else np.ones(theta0.shape[1])
    kind[frac > tau[None, :]] = 0
    return tau, kind


class _BatchStepper:
    """Explicit RK steps with face handling for one chunk of columns (states stored (D, b))."""

    def __init__(
        self,
        fun: Fun,
        tab: Tableau,
        sl: slice,
        face_atol: float,
        events: list[FaceEvent],
        split: bool,
    ) -> None:
        self.fun = fun
        self.tab = tab
        self.sl = sl
        self.face_atol = face_atol
        self.events = events
        self.split = split
        self.nfev = 0
        self.ncalls = 0
        self.switches = 0

    def _eval(self, t: float, Y: np.ndarray) -> np.ndarray:
        """Raw velocity (D, b) at ``Π_H(Y)``."""
        Yc = Y.copy()
        Yc[self.sl] = project(Yc[self.sl])
        V = self.fun(t, Yc.T)
        self.nfev += Y.shape[1]
        self.ncalls += 1
        return np.asarray(V).T

    def stages(
        self, t: float, Y: np.ndarray, h: np.ndarray, st_theta: np.ndarray, V0: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One RK step of sizes ``h`` (b,) from ``Y`` with frozen face status -> (Y_new raw, v_θ first, v_θ last)."""
        tab = self.tab
        sl = self.sl
        Ks: list[np.ndarray] = []
        v_first = v_last = np.empty(0)
        for s in range(len(tab.c)):
            if s == 0:
                V = self._eval(t, Y) if V0 is None else V0.copy()
            else:
                Ys = Y.copy()
                for j, a in enumerate(tab.a[s]):
                    if a:
                        Ys += (a * h) * Ks[j]
                V = self._eval(t + tab.c[s] * float(np.mean(h)), Ys)
            if s == 0:
                v_first = V[sl].copy()
            if s == len(tab.c) - 1:
                v_last = V[sl].copy()
            V[sl] = projected_field(st_theta, V[sl])
            Ks.append(V)
        Ynew = Y.copy()
        for j, b in enumerate(tab.b):
            Ynew += (b * h) * Ks[j]
        return Ynew, v_first, v_last

    def status(self, theta: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Face status: −1 pinned at 0, +1 pinned at 1, 0 free (gate at a face with v pointing inward is free)."""
        st = np.zeros_like(theta)
        st[(theta <= self.face_atol) & (v <= 0)] = -1.0
        st[(theta >= 1.0 - self.face_atol) & (v >= 0)] = 1.0
        return st

    def step(self, t: float, Y: np.ndarray, h: float, hit_t: np.ndarray) -> np.ndarray:
        """Advance all columns of ``Y`` (D, b; gates in H) by ``h``; records first face hits in ``hit_t``."""
        sl = self.sl
        b = Y.shape[1]
        V0 = self._eval(t, Y)
        theta0 = Y[sl]
        status = self.status(theta0, V0[sl])
        hvec = np.full(b, h)
        Ynew, v_first, v_last = self.stages(t, Y, hvec, _status_theta(status), V0)
        if not self.split:
            self._record_hits_linear(t, h, theta0, Ynew[sl], hit_t, np.arange(b))
            Ynew[sl] = project(Ynew[sl])
            return Ynew
        no_release = np.zeros_like(status, dtype=bool)
        tau, _ = _switch_fraction(theta0, Ynew[sl], status, v_first, v_last, no_release, hvec, self.tab.c[-1])
        bad = np.flatnonzero(tau < 1.0)
        if bad.size:
            Ynew[:, bad] = self._resolve(t, Y[:, bad], h, hit_t, bad)
        Ynew[sl] = project(Ynew[sl])
        return Ynew

    def _resolve(self, t: float, Y: np.ndarray, h: float, hit_t: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Step the columns ``cols`` (whose step has a switch) by ``h``, splitting at every switch."""
        sl = self.sl
        Y = Y.copy()
        b = Y.shape[1]
        remaining = np.full(b, h)
        released = np.zeros((sl.stop - sl.start, b), dtype=bool)
        elapsed = np.zeros(b)
        active = np.arange(b)
        max_splits = 2 * (sl.stop - sl.start) + 4
        for it in range(max_splits + 1):
            if active.size == 0:
                break
            Ya = Y[:, active]
            V0 = self._eval(t, Ya)
            status = self.status(Ya[sl], V0[sl])
            status[released[:, active]] = 0.0
            ha = remaining[active]
            Yn, v_first, v_last = self.stages(t, Ya, ha, _status_theta(status), V0)
            if it == max_splits:  # give up splitting: accept with plain clipping
                tau = np.ones(active.size)
                kind = np.zeros_like(status, dtype=np.int8)
            else:
                tau, kind = _switch_fraction(
                    Ya[sl], Yn[sl], status, v_first, v_last, released[:, active], ha, self.tab.c[-1]
                )
            done = tau >= 1.0
            if np.any(done):
                cols_done = active[done]
                self._record_hits_linear(
                    t, ha[done], Ya[sl][:, done], Yn[sl][:, done], hit_t, cols[cols_done], offset=elapsed[cols_done]
                )
                Y[:, cols_done] = Yn[:, done]
            part = np.flatnonzero(~done)
            if part.size:
                cols_p = active[part]
                hp = ha[part] * tau[part]
                Yp, _, _ = self.stages(t, Ya[:, part], hp, _status_theta(status[:, part]), V0[:, part])
                kp = kind[:, part]
                th = Yp[sl]
                th[kp == 1] = 0.0
                th[kp == 2] = 1.0
                Yp[sl] = project(th)
                rel = kp == 3
                released[:, cols_p] |= rel
                self.switches += int(np.count_nonzero(kp))
                for e_i, ev in enumerate(self.events):
                    j = ev.index - sl.start
                    if 0 <= j < kp.shape[0]:
                        hit = kp[j] == (1 if ev.face == 0.0 else 2)
                        tgt = cols[cols_p[hit]]
                        when = t + elapsed[cols_p[hit]] + hp[hit]
                        cur = hit_t[e_i, tgt]
                        hit_t[e_i, tgt] = np.where(np.isnan(cur), when, cur)
                Y[:, cols_p] = Yp
                elapsed[cols_p] += hp
                remaining[cols_p] -= hp
            active = active[~done]
        return Y

    def _record_hits_linear(
        self,
        t: float,
        h: Any,
        theta0: np.ndarray,
        theta1: np.ndarray,
        hit_t: np.ndarray,
        cols: np.ndarray,
        offset: Any = 0.0,
    ) -> None:
        """First-hit times from a step without splitting (linear interpolation within the step)."""
        sl = self.sl
        for e_i, ev in enumerate(self.events):
            j = ev.index - sl.start
            if not (0 <= j < theta0.shape[0]):
                continue
            if ev.face == 0.0:
                hit = (theta0[j] > 0) & (theta1[j] <= 0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    frac = np.where(hit, theta0[j] / (theta0[j] - theta1[j]), 0.0)
            else:
                hit = (theta0[j] < 1) & (theta1[j] >= 1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    frac = np.where(hit, (1 - theta0[j]) / (theta1[j] - theta0[j]), 0.0)
            if not np.any(hit):
                continue
            when = t + np.broadcast_to(offset, hit.shape) + np.broadcast_to(h, hit.shape) * np.nan_to_num(frac)
            tgt = cols[hit]
            cur = hit_t[e_i, tgt]
            hit_t[e_i, tgt] = np.where(np.isnan(cur), when[hit], cur)


# --------------------------------------------------------------------------------------------------
# Many trajectories, adaptive: Runge–Kutta–Chebyshev (RKC2) with per-trajectory step control
# --------------------------------------------------------------------------------------------------

#: Damping of the RKC2 stability polynomial (Sommeijer, Shampine & Verwer 1997).
RKC_DAMPING = 2.0 / 13.0
#: Stage counts used by the adaptive batch integrator (trajectories are grouped by stage count).
RKC_STAGES = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)


@dataclass(frozen=True)
class RKCCoefficients:
    """Coefficients of the ``s``-stage second-order RKC method (Sommeijer, Shampine & Verwer 1997).

    ``Y_1 = y + mu_t[1] h F(y)``; for ``j ≥ 2``:
    ``Y_j = (1 − mu_j − nu_j) y + mu_j Y_{j−1} + nu_j Y_{j−2} + mu_t_j h F(Y_{j−1}) + gamma_t_j h F(y)``;
    ``y_new = Y_s``.  Its stability polynomial is ``a_s + b_s T_s(w0 + w1 z)``, stable on
    ``[−beta, 0]`` with ``beta ≈ 0.653 s²``.
    """

    s: int
    mu: tuple[float, ...]
    nu: tuple[float, ...]
    mu_t: tuple[float, ...]
    gamma_t: tuple[float, ...]
    c: tuple[float, ...]
    beta: float


_RKC_CACHE: dict[int, RKCCoefficients] = {}


def rkc_coefficients(s: int) -> RKCCoefficients:
    """Coefficients of the damped (``ε = 2/13``) second-order RKC method with ``s ≥ 2`` stages."""
    if s in _RKC_CACHE:
        return _RKC_CACHE[s]
    if s < 2:
        raise ValueError(f"RKC needs s >= 2 stages, got {s}")
    w0 = 1.0 + RKC_DAMPING / s**2
    T = np.zeros(s + 1)
    dT = np.zeros(s + 1)
    d2T = np.zeros(s + 1)
    T[0], T[1], dT[1] = 1.0, w0, 1.0
    for j in range(2, s + 1):
        T[j] = 2 * w0 * T[j - 1] - T[j - 2]
        dT[j] = 2 * T[j - 1] + 2 * w0 * dT[j - 1] - dT[j - 2]
        d2T[j] = 4 * dT[j - 1] + 2 * w0 * d2T[j - 1] - d2T[j - 2]
    w1 = dT[s] / d2T[s]
    b = np.zeros(s + 1)
    b[2:] = d2T[2:] / dT[2:] ** 2
    b[0] = b[1] = b[2]
    a = 1.0 - b * T
    mu = np.zeros(s + 1)
    nu = np.zeros(s + 1)
    mu_t = np.zeros(s + 1)
    gamma_t = np.zeros(s + 1)
    mu_t[1] = b[1] * w1
    for j in range(2, s + 1):
        mu[j] = 2 * b[j] * w0 / b[j - 1]
        nu[j] = -b[j] / b[j - 2]
        mu_t[j] = 2 * b[j] * w1 / b[j - 1]
        gamma_t[j] = -a[j - 1] * mu_t[j]
    c = np.zeros(s + 1)
    c[2:] = dT[s] * d2T[2:] / (d2T[s] * dT[2:])
    c[1] = c[2] / dT[2]
    coef = RKCCoefficients(
        s, tuple(mu), tuple(nu), tuple(mu_t), tuple(gamma_t), tuple(c), float((1.0 + w0) / w1)
    )
    _RKC_CACHE[s] = coef
    return coef


class _RKCBatch:
    """Adaptive RKC2 for one chunk of trajectories (states stored (D, b)), each with its own ``t`` and ``h``.

    Per trajectory: a spectral-radius estimate ``ρ`` of the Jacobian of the
    (status-frozen) projected field by warm-started nonlinear power
    iteration; the stage count is the smallest ``s`` in :data:`RKC_STAGES`
    with ``h ρ ≤ β(s)``; the RKC local error estimate
    ``0.8 (y_n − y_{n+1}) + 0.4 h (F_n + F_{n+1})`` (RMS-norm with
    ``atol + rtol |y|``) drives the step size.  Each sweep advances every
    unfinished trajectory by one attempted step, grouped by stage count.
    Steps stop exactly on output times; face switches cut the step at the
    switching time (then the gate is put onto its face or freed) exactly as
    in the fixed-step scheme.
    """

    def __init__(
        self,
        fun: Fun,
        sl: slice,
        rtol: float,
        atol: float,
        face_atol: float,
        events: list[FaceEvent],
        max_stages: int,
        rho_every: int,
    ) -> None:
        self.fun = fun
        self.sl = sl
        self.rtol = rtol
        self.atol = atol
        self.face_atol = face_atol
        self.events = events
        self.stage_grid = np.array([s for s in RKC_STAGES if s <= max_stages] or [2])
        self.betas = np.array([rkc_coefficients(int(s)).beta for s in self.stage_grid])
        self.rho_every = rho_every
        self.sub_chunk = 1024
        self.nfev = 0
        self.ncalls = 0
        self.switches = 0
        self.steps = 0
        self.rejected = 0
        self.switch_kinds = np.zeros(4, dtype=np.int64)

    def _eval(self, t: float, Y: np.ndarray) -> np.ndarray:
        """Raw velocity (D, b) at ``Π_H(Y)``, evaluated ``sub`` columns at a time (cache-sized, contiguous)."""
        D, b = Y.shape
        out = np.empty((D, b))
        sub = self.sub_chunk
        for a in range(0, b, sub):
            e = min(a + sub, b)
            Yc = np.ascontiguousarray(Y[:, a:e]) if (a or e < b) else Y.copy()
            Yc[self.sl] = project(Yc[self.sl])
            out[:, a:e] = np.asarray(self.fun(t, Yc.T)).T
            self.ncalls += 1
        self.nfev += b
        return out

    def _status(self, theta: np.ndarray, v: np.ndarray, released: np.ndarray) -> np.ndarray:
        st = np.zeros_like(theta)
        st[(theta <= self.face_atol) & (v <= 0)] = -1.0
        st[(theta >= 1.0 - self.face_atol) & (v >= 0)] = 1.0
        st[released] = 0.0
        return st

    def _project_velocity(self, V: np.ndarray, status: np.ndarray) -> np.ndarray:
        F = V.copy()
        F[self.sl] = projected_field(_status_theta(status), V[self.sl])
        return F

    def _power(
        self, t: float, Y: np.ndarray, F0: np.ndarray, status: np.ndarray, z: np.ndarray, iters: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``ρ`` (b,) and the iterate ``z`` after ``iters`` nonlinear power iterations on the projected field."""
        sl = self.sl
        ynorm = np.sqrt(np.einsum("db,db->b", Y, Y))
        eps = math.sqrt(np.finfo(float).eps) * (1.0 + ynorm)
        rho = np.zeros(Y.shape[1])
        for _ in range(iters):
            z[sl][status != 0] = 0.0
            zn = np.sqrt(np.einsum("db,db->b", z, z))
            zn[zn == 0] = 1.0
            Vp = self._eval(t, Y + z * (eps / zn))
            Fp = self._project_velocity(Vp, status)
            z = (Fp - F0) * (1.0 / eps)
            rho = np.sqrt(np.einsum("db,db->b", z, z))
        return 1.2 * rho + 1e-8, z

    def _step(
        self, t: float, Y0: np.ndarray, F0: np.ndarray, h: np.ndarray, s: int, st_theta: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One RKC step of sizes ``h`` (b,) with ``s`` stages -> (y_new raw, raw velocity at y_new)."""
        co = rkc_coefficients(s)
        sl = self.sl
        hb = h[None, :]
        hF0 = hb * F0
        Yjm2 = Y0
        Yjm1 = Y0 + co.mu_t[1] * hF0
        for j in range(2, s + 1):
            V = self._eval(t, Yjm1)
            V[sl] = projected_field(st_theta, V[sl])
            Yj = (1.0 - co.mu[j] - co.nu[j]) * Y0
            Yj += co.mu[j] * Yjm1
            Yj += co.nu[j] * Yjm2
            V *= co.mu_t[j] * hb
            Yj += V
            Yj += co.gamma_t[j] * hF0
            Yjm2, Yjm1 = Yjm1, Yj
        return Yjm1, self._eval(t, Yjm1)

    def run(self, Y: np.ndarray, t_eval: np.ndarray, h0: float, out: np.ndarray, hit_t: np.ndarray) -> np.ndarray:
        """Integrate the chunk; writes ``out[k, :, :]`` (its columns) and ``hit_t``; returns per-column success."""
        sl = self.sl
        D, b = Y.shape
        K = sl.stop - sl.start
        n_out = t_eval.size
        t = np.full(b, float(t_eval[0]))
        nxt = np.ones(b, dtype=np.int64)
        ok = np.ones(b, dtype=bool)
        released = np.zeros((K, b), dtype=bool)
        pending = np.zeros(b, dtype=bool)
        pend_kind = np.zeros((K, b), dtype=np.int8)
        V = self._eval(t[0], Y)
        status = self._status(Y[sl], V[sl], released)
        F0 = self._project_velocity(V, status)
        h = np.full(b, float(h0))
        self.zero_commits = np.zeros(b, dtype=np.int64)
        rng = np.random.default_rng(12345)
        z = F0 + 1e-3 * rng.standard_normal((D, b)) * (1.0 + np.abs(F0))
        rho, z = self._power(t[0], Y, F0, status, z, 4)
        since_rho = np.zeros(b, dtype=np.int64)
        h_min = 1e-12 * max(1.0, float(np.max(np.abs(t_eval))))
        for _sweep in range(10_000_000):
            act = np.flatnonzero((nxt < n_out) & ok)
            if act.size == 0:
                break
            # spectral radius refresh (warm-started, one iteration) where due
            due = act[since_rho[act] >= self.rho_every]
            if due.size:
                r, zz = self._power(t[0], Y[:, due], F0[:, due], status[:, due], z[:, due], 1)
                rho[due], z[:, due] = r, zz
                since_rho[due] = 0
            t_next = t_eval[nxt[act]]
            h_try = np.minimum(h[act], t_next - t[act])
            clamped = h_try >= t_next - t[act]
            hr = h_try * rho[act]
            k = np.searchsorted(self.betas, hr)  # smallest s with β(s) ≥ h ρ
            too_stiff = k >= self.betas.size
            if np.any(too_stiff):
                k[too_stiff] = self.betas.size - 1
                h_try[too_stiff] = 0.95 * self.betas[-1] / rho[act][too_stiff]
                clamped[too_stiff] = False
            for kk in np.unique(k):
                sel = k == kk
                cols = act[sel]
                hc = h_try[sel]
                self._sweep_group(
                    cols, hc, clamped[sel], int(self.stage_grid[kk]), t, Y, V, F0, status, released, pending,
                    pend_kind, h, nxt, t_eval, out, hit_t, since_rho, ok, h_min,
                )
        for col in np.flatnonzero(~ok):  # failed (step size underflow): no outputs past the failure
            out[nxt[col]:, col] = np.nan
        return ok

    def _sweep_group(
        self,
        cols: np.ndarray,
        hc: np.ndarray,
        clamped: np.ndarray,
        s: int,
        t: np.ndarray,
        Y: np.ndarray,
        V: np.ndarray,
        F0: np.ndarray,
        status: np.ndarray,
        released: np.ndarray,
        pending: np.ndarray,
        pend_kind: np.ndarray,
        h: np.ndarray,
        nxt: np.ndarray,
        t_eval: np.ndarray,
        out: np.ndarray,
        hit_t: np.ndarray,
        since_rho: np.ndarray,
        ok: np.ndarray,
        h_min: float,
    ) -> None:
        sl = self.sl
        Y0 = Y[:, cols]
        F0g = F0[:, cols]
        stg = status[:, cols]
        Yn, Vn = self._step(float(t[cols[0]]), Y0, F0g, hc, s, _status_theta(stg))
        self.steps += cols.size
        Fn = self._project_velocity(Vn, stg)
        est = 0.8 * (Y0 - Yn) + (0.4 * hc)[None, :] * (F0g + Fn)
        sc = self.atol + self.rtol * np.maximum(np.abs(Y0), np.abs(Yn))
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.sqrt(np.mean((est / sc) ** 2, axis=0))
        err = np.where(np.isfinite(err), err, 1e10)
        acc = err <= 1.0
        with np.errstate(divide="ignore"):
            fac = 0.8 * np.maximum(err, 1e-10) ** (-1.0 / 3.0)
        # face switches inside accepted steps
        tau, kind = _switch_fraction(Y0[sl], Yn[sl], stg, V[sl][:, cols], Vn[sl], released[:, cols], hc)
        # a pending switch is due only if this step is the full cut step (not one shortened by an output time)
        pend = pending[cols] & (hc >= h[cols] * (1.0 - 1e-12))
        pending[cols] = pend
        cut = acc & (tau < 1.0) & ~(pend & (tau >= 0.5))
        commit = acc & ~cut
        tiny = cut & (tau * hc <= h_min)
        # a column that already applied a switch without advancing may not do so again: take the step as is
        again = tiny & (self.zero_commits[cols] > 0)
        if np.any(again):
            cut = cut & ~again
            tiny = tiny & ~again
            commit = commit | again
            pending[cols[again]] = False
        # cut: retry with the step ending at the switching time (or apply the switch now if that is ~0)
        if np.any(cut & ~tiny):
            c = cut & ~tiny
            h[cols[c]] = tau[c] * hc[c]
            pending[cols[c]] = True
            pend_kind[:, cols[c]] = kind[:, c]
        self.zero_commits[cols[commit & ~tiny]] = 0
        self.zero_commits[cols[tiny]] += 1
        if np.any(tiny):
            Yn[:, tiny] = Y0[:, tiny]
            Vn[:, tiny] = V[:, cols[tiny]]
            hc = np.where(tiny, 0.0, hc)
            clamped = clamped & ~tiny
            pend_kind[:, cols[tiny]] = kind[:, tiny]
            pending[cols[tiny]] = True
            commit = commit | tiny
        # rejected: shrink
        rej = ~acc
        if np.any(rej):
            self.rejected += int(np.count_nonzero(rej))
            h[cols[rej]] = hc[rej] * np.clip(fac[rej], 0.1, 1.0)
            pending[cols[rej]] = False
            pend_kind[:, cols[rej]] = 0
            bad = cols[rej][h[cols[rej]] < h_min]
            ok[bad] = False
        if not np.any(commit):
            return
        cc = cols[commit]
        Ync = Yn[:, commit]
        th = Ync[sl]
        # gates pinned during the step stay exactly on their face (the RKC recursion may round them off it)
        st_c = stg[:, commit]
        th[st_c == -1] = 0.0
        th[st_c == 1] = 1.0
        pk = np.where(pending[cc][None, :], pend_kind[:, cc], 0)
        th[pk == 1] = 0.0
        th[pk == 2] = 1.0
        Ync[sl] = project(th)
        rel_next = pk == 3
        n_sw = int(np.count_nonzero(pk))
        self.switches += n_sw
        self.switch_kinds += np.bincount(pk.ravel(), minlength=4)[:4]
        t_new = t[cc] + hc[commit]
        cl = clamped[commit]
        t_new[cl] = t_eval[nxt[cc[cl]]]
        if n_sw and self.events:
            for e_i, ev in enumerate(self.events):
                j = ev.index - sl.start
                hit = pk[j] == (1 if ev.face == 0.0 else 2)
                if np.any(hit):
                    tgt = cc[hit]
                    cur = hit_t[e_i, tgt]
                    hit_t[e_i, tgt] = np.where(np.isnan(cur), t_new[hit], cur)
        Vc = Vn[:, commit]
        st_new = self._status(Ync[sl], Vc[sl], rel_next)
        Y[:, cc] = Ync
        V[:, cc] = Vc
        status[:, cc] = st_new
        F0[:, cc] = self._project_velocity(Vc, st_new)
        released[:, cc] = rel_next
        t[cc] = t_new
        grow = np.clip(fac[commit], 0.2, 5.0)
        h_new = hc[commit] * grow
        h_new = np.where(cl & (grow > 1.0), np.maximum(h_new, h[cc]), h_new)
        h[cc] = np.where(hc[commit] > 0, h_new, h[cc])
        pending[cc] = False
        pend_kind[:, cc] = 0
        since_rho[cc] += 1
        since_rho[cc[np.any(pk != 0, axis=0)]] = 10**9  # re-estimate ρ after a switch
        # outputs
        rec = cl
        if np.any(rec):
            cr = cc[rec]
            out[nxt[cr], cr] = Ync[:, rec].T
            nxt[cr] += 1


def _step_grid(t_eval: np.ndarray, dt: float) -> list[tuple[float, float, int]]:
    """For each output interval: (start, step size, number of steps) with steps ≤ dt landing on t_eval."""
    grid = []
    for a, b in zip(t_eval[:-1], t_eval[1:]):
        k = max(1, math.ceil((b - a) / dt - 1e-9))
        grid.append((float(a), (float(b) - float(a)) / k, k))
    return grid


def odeint_batch(
    fun: Fun,
    y0: Any,
    t_eval: Any,
    *,
    theta_slice: slice,
    dt: float = 0.01,
    method: str = "rk4",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    events: Sequence[FaceEvent] | None = None,
    face_atol: float = 0.0,
    split_switches: bool = True,
    chunk_size: int | None = None,
    workers: int = 1,
    max_stages: int = 64,
    out: np.ndarray | None = None,
    backend: str = "auto",
) -> BatchResult:
    """Integrate many trajectories of the projected ODE [22] at once.

    ``y0`` is (B, D) (or (D,) for one trajectory); ``fun(t, Y)`` takes and
    returns (B', D) arrays (B' columns of the batch at a time).  ``t_eval``
    (increasing; ``t_eval[0]`` is the start time) are the output times.

    ``method``: a fixed-step explicit Runge–Kutta scheme of :data:`TABLEAUS`
    (``"rk4"`` default; each interval between outputs is cut into equal
    steps no longer than ``dt``, so outputs land on steps; ``rtol``/``atol``
    unused), or ``"rkc"``: adaptive second-order Runge–Kutta–Chebyshev with a
    step size and stage count per trajectory (``dt`` is the initial step;
    ``rtol``/``atol`` the local error tolerances; ``max_stages`` caps the
    stage count; the field must be autonomous, as each trajectory keeps its
    own time).  Use RK4 for accuracy at a known stable step, RKC for speed on
    stiff gradient flows (real spectra up to ``|λ| ≈ 0.65 s² / dt``).

    Face handling as described in the module doc (fixed-step only:
    ``split_switches=False`` just clips after each step — faster, ``O(dt²)``
    error per switch).  ``events``: :class:`FaceEvent` objects on gate
    coordinates; ``BatchResult.t_events[e, b]`` is the first time trajectory
    ``b`` hits that face (``nan`` if never; terminal flags are ignored).
    ``chunk_size`` trajectories are integrated together (default 512 for
    fixed-step, keeping the field's work arrays in cache; 8192 for RKC,
    whose sweeps group trajectories by stage count; the compiled backend
    integrates one trajectory at a time and hands threads chunks of at most
    256), ``workers`` threads run chunks in parallel.  ``out`` may supply the (len(t_eval), B, D) output.

    ``backend``: ``"auto"`` (default) runs the compiled kernels of
    :mod:`theory.block_ode` (numba; whole step loop compiled, one trajectory
    per loop, ``workers`` threads over chunks of trajectories) when ``fun`` is
    :func:`theory.block_model.field` of a canonical block with ``m + 1 ≤ 4``
    inputs and ``p ≤ 2`` outputs and numba is installed, else this module's
    numpy implementation (with a one-line notice when only numba was missing); ``"numpy"`` forces the numpy
    reference; ``"numba"`` requires the compiled kernels (``ValueError`` if
    they cannot be used).  Both backends implement the same scheme and agree
    to the integrators' tolerances (``tests/test_block_ode.py``).
    """
    adaptive = method == "rkc"
    tab = None if adaptive else _tableau(method)
    Y0 = np.array(y0, dtype=np.float64)
    if Y0.ndim == 1:
        Y0 = Y0[None]
    if Y0.ndim != 2:
        raise ValueError(f"y0 must have shape (B, D) or (D,), got {Y0.shape}")
    B, D = Y0.shape
    idx = _theta_indices(theta_slice, D)
    sl = slice(idx.start, idx.stop)
    teval = np.asarray(t_eval, dtype=np.float64)
    if teval.ndim != 1 or teval.size < 1 or np.any(np.diff(teval) <= 0):
        raise ValueError("t_eval must be a non-empty increasing 1-D array (t_eval[0] is the start time)")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be > 0, got {dt!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got {rtol!r}, {atol!r}")
    user_chunk = chunk_size
    if chunk_size is None:
        chunk_size = 8192 if adaptive else 512
    if chunk_size < 1 or workers < 1:
        raise ValueError(f"chunk_size and workers must be >= 1, got {chunk_size}, {workers}")
    evs = list(events or [])
    for e in evs:
        if not isinstance(e, FaceEvent) or e.index not in idx:
            raise ValueError(
                f"odeint_batch events must be FaceEvents (hits_zero/hits_one) on gate coordinates, got {e!r}"
            )
    if out is None:
        out = np.empty((teval.size, B, D))
    elif out.shape != (teval.size, B, D):
        raise ValueError(f"out must have shape {(teval.size, B, D)}, got {out.shape}")
    if backend not in ("auto", "numpy", "numba"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'numba', got {backend!r}")
    if backend != "numpy":
        use, why = _compiled_usable(fun)
        if use:
            return _odeint_compiled(fun, Y0, teval, sl, method, dt, rtol, atol, evs, face_atol, split_switches,
                                    workers, max_stages, out, user_chunk)
        if backend == "numba":
            raise ValueError(f"backend='numba' cannot be used: {why}")
        if why == _NO_NUMBA:
            from .jit import fallback_notice

            fallback_notice()
    hit_t = np.full((len(evs), B), np.nan)
    grid = _step_grid(teval, dt)
    steps_fixed = sum(k for _, _, k in grid)

    def run_chunk(a: int, b: int) -> tuple[int, int, int, int, int]:
        Y = np.ascontiguousarray(Y0[a:b].T)
        Y[sl] = project(Y[sl])
        out[0, a:b] = Y.T
        cols_hit = hit_t[:, a:b]  # view: chunks write disjoint columns
        if adaptive:
            rkc = _RKCBatch(fun, sl, rtol, atol, face_atol, evs, max_stages, rho_every=25)
            ok = rkc.run(Y, teval, dt, out[:, a:b], cols_hit)
            return rkc.nfev, rkc.ncalls, rkc.switches, rkc.steps, int(np.count_nonzero(~ok))
        assert tab is not None
        stepper = _BatchStepper(fun, tab, sl, face_atol, evs, split_switches)
        for j, (t_start, h, k) in enumerate(grid):
            for s in range(k):
                Y = stepper.step(t_start + s * h, Y, h, cols_hit)
            out[j + 1, a:b] = Y.T
        return stepper.nfev, stepper.ncalls, stepper.switches, steps_fixed * (b - a), 0

    t_wall = time.perf_counter()
    bounds = [(a, min(a + chunk_size, B)) for a in range(0, B, chunk_size)]
    if workers == 1 or len(bounds) == 1:
        stats = [run_chunk(a, b) for a, b in bounds]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            stats = list(pool.map(lambda ab: run_chunk(*ab), bounds))
    wall = time.perf_counter() - t_wall
    return BatchResult(
        t=teval.copy(),
        y=out,
        nfev=sum(s[0] for s in stats),
        ncalls=sum(s[1] for s in stats),
        wall_time=wall,
        method=method,
        dt=dt,
        theta_slice=sl,
        t_events=hit_t,
        switches=sum(s[2] for s in stats),
        steps=sum(s[3] for s in stats),
        failed=sum(s[4] for s in stats),
    )


_NO_NUMBA = "numba is not installed"


def backend_for(fun: Fun, backend: str = "auto") -> str:
    """The backend :func:`odeint_batch` would use for ``fun``: ``"numba"`` or ``"numpy"``."""
    if backend == "numpy":
        return "numpy"
    return "numba" if _compiled_usable(fun)[0] else "numpy"


def _compiled_usable(fun: Fun) -> tuple[bool, str]:
    """Whether :mod:`theory.block_ode` can integrate ``fun``, and if not why."""
    from .jit import NUMBA_AVAILABLE, disabled_by_env

    problem = getattr(fun, "problem", None)
    from .block_model import BlockProblem

    if not isinstance(problem, BlockProblem):
        return False, "fun is not theory.block_model.field(problem) of a canonical block"
    if not NUMBA_AVAILABLE:
        return False, _NO_NUMBA
    if disabled_by_env():
        return False, "THEORY_NO_NUMBA is set"
    from .block_kernel import FUSED_M1, FUSED_P

    if problem.m + 1 > FUSED_M1 or problem.p > FUSED_P:
        return False, (f"the compiled kernel takes blocks with m + 1 <= {FUSED_M1} inputs and p <= {FUSED_P} "
                       f"outputs, got m = {problem.m}, p = {problem.p}")
    return True, ""


def _odeint_compiled(
    fun: Fun, Y0: np.ndarray, teval: np.ndarray, sl: slice, method: str, dt: float, rtol: float, atol: float,
    evs: list[FaceEvent], face_atol: float, split_switches: bool, workers: int, max_stages: int, out: np.ndarray,
    chunk: int | None,
) -> BatchResult:
    from .block_ode import odeint_block

    problem = fun.problem  # type: ignore[attr-defined]
    if sl != problem.theta_slice:
        raise ValueError(f"theta_slice must be the block's gates {problem.theta_slice}, got {sl}")
    Y = np.array(Y0, dtype=np.float64)
    Y[:, sl] = project(Y[:, sl])
    target = out if out.flags.c_contiguous else np.empty(out.shape)
    _, hit_t, st, wall = odeint_block(
        problem, Y, teval, method=method, dt=dt, rtol=rtol, atol=atol, events=evs, face_atol=face_atol,
        split_switches=split_switches, workers=workers, max_stages=max_stages, out=target, chunk=chunk,
    )
    if target is not out:
        out[...] = target
    return BatchResult(
        t=teval.copy(), y=out, nfev=st["nfev"], ncalls=st["nfev"], wall_time=wall, method=method, dt=dt,
        theta_slice=sl, t_events=hit_t, switches=st["switches"], steps=st["steps"], backend="numba",
        failed=st["failed"], thread_cpu=st["thread_cpu"],
    )


__all__ = [
    "RKC_DAMPING",
    "RKC_STAGES",
    "TABLEAUS",
    "BatchResult",
    "FaceEvent",
    "OdeResult",
    "RKCCoefficients",
    "Tableau",
    "backend_for",
    "hits_one",
    "hits_zero",
    "odeint",
    "odeint_batch",
    "rkc_coefficients",
    "stable_dt",
]
