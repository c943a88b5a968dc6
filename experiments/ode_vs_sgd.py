"""Closing the loop: projected SGD on a real gated network tracks the projected ODE [22] (THEORY §5, §6).

One small gated residual MLP (:func:`pruning.models.build_model`, ``residual_mlp``, tanh, 2 blocks ×
2 units = 6 gates in combined mode) on a fixed synthetic data set (a few dozen points labelled by a
random tanh teacher), the trainer's objective ``J = mean ℓ + C/N + (λ/N)/2 ||W||²``
(:class:`pruning.objective.Objective`, cross-entropy).  From one initial state ``(W_0, Θ_0)``:

(a) the torch algorithm (Algorithm 1, §5): plain SGD with constant step ``η`` on both groups
    (the trainer's ``plain-sgd`` optimisers, :func:`pruning.optim.make_optimizers`), mini-batches
    drawn with replacement, one gate sample per forward pass, ``Θ ← Π_H(Θ − η Ĝ_Θ)``
    (:func:`theory.projection.project`); ``∂E/∂θ`` by the unbiased *exact-difference* estimator
    (``GatedNetwork.exact_gate_grads``) or by *straight-through*; the iterate ``k`` is recorded
    at ``t = k η``;
(b) the mean dynamics: the projected ODE [22] of the exact ``J`` (:class:`pruning.exact.ExactDynamics`,
    enumeration of the ``2^6`` masks, autograd gradient) integrated by :func:`theory.ode.odeint`
    to the horizon ``T``.

For each step ``η`` of a ladder and each SGD seed, the sup-deviations on ``[0, T]``
``sup_k ||Θ_k − Θ(kη)||_∞`` and ``sup_k ||W_k − W(kη)||_2`` are averaged over seeds (mean ± sd).
Stochastic approximation (Kushner–Yin): with the unbiased estimator they shrink as ``η → 0``
(like ``√η``); the straight-through estimator is biased (first-order Taylor of ``ℓ`` in the
gate), so its deviation levels off at the bias — it tracks a different ODE.

Usage::

    python experiments/ode_vs_sgd.py [--json] [--steps 4e-3 1e-3 2.5e-4] [--horizon T] [--seeds K]
                                     [--estimators exact-difference straight-through] [--out DIR]

``--out DIR`` writes ``DIR/ode_vs_sgd.json`` (atomically) and ``DIR/ode_vs_sgd.npz`` (the ODE
trajectory on a fine grid and the SGD trajectories of every run, subsampled, for
``paper_figures/ode_vs_sgd.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruning.config import from_dict
from pruning.exact import ExactDynamics, load_state, state_from_model, state_reader, torch_loss
from pruning.gates import fixed_gates
from pruning.models import GatedNetwork, build_model
from pruning.objective import Objective
from pruning.optim import make_optimizers
from pruning.step import algorithm1_step
from theory.atomic import atomic_write, atomic_write_text

DEFAULT_STEPS = (4e-3, 1e-3, 2.5e-4)
DEFAULT_HORIZON = 1.5
DEFAULT_SEEDS = 3
ESTIMATORS = ("exact-difference", "straight-through")
JSON_NAME = "ode_vs_sgd.json"
NPZ_NAME = "ode_vs_sgd.npz"


@dataclass(frozen=True)
class Problem:
    """The network, data, initial state and objective of the comparison.

    Teacher–student: the labels are the argmax of a *teacher* of the same architecture (all gates
    on) whose unit ``i`` of block ``l`` has its fan-out column ``v_i`` scaled by
    ``teacher_units[l][i]`` (0: the unit is useless) and whose head is scaled by ``teacher_head``.
    The student starts at the teacher's weights plus ``student_noise`` times an independent
    default initialisation (units the teacher does not use: the plain default initialisation),
    all gates at ``theta_init``.  The defaults make block 0's strong unit useful (its gates rise),
    its weak unit and the whole of block 1 not worth their cost (their gates head to 0).
    """

    in_features: int = 4
    hidden: tuple[int, ...] = (2, 2)
    num_classes: int = 3
    n_samples: int = 48
    batch_size: int = 8
    loss: str = "squared"
    gamma: float = 0.5  # pruning level of [13]
    rho: float = 1.0  # FLOPs share
    delta: float = 0.3  # layer emphasis
    lam: float = 1.0  # Gaussian prior precision: weight decay λ/N
    theta_init: float = 0.8
    teacher_units: tuple[tuple[float, ...], ...] = ((6.0, 1.0), (0.0, 0.0))
    teacher_head: float = 3.0
    teacher_fan_in: float = 3.0
    student_noise: float = 0.3
    data_seed: int = 0
    init_seed: int = 1
    elementwise: bool = False  # counting convention of C (both sides use the same)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["teacher_units"] = [list(u) for u in self.teacher_units]
        return d


# --------------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------------


def _build(p: Problem, estimator: str, seed: int) -> GatedNetwork:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(
            "residual_mlp", in_features=p.in_features, hidden=list(p.hidden), num_classes=p.num_classes,
            mode="combined", estimator=estimator, theta_init=p.theta_init, activation="tanh",
        ).double()


def make_teacher(p: Problem) -> GatedNetwork:
    """The teacher (float64; used with all gates at 1): fan-outs scaled by ``teacher_units``, fan-ins by
    ``teacher_fan_in``, head by ``teacher_head``."""
    if len(p.teacher_units) != len(p.hidden) or any(len(u) != n for u, n in zip(p.teacher_units, p.hidden)):
        raise ValueError(f"teacher_units must give one scale per unit of hidden={p.hidden}, got {p.teacher_units}")
    teacher = _build(p, "exact-difference", p.data_seed + 1000)
    with torch.no_grad():
        for block, scales in zip(teacher.blocks, p.teacher_units):
            block.path[1].op.weight.mul_(torch.as_tensor(scales, dtype=torch.float64)[None, :])
            block.path[0].op.weight.mul_(p.teacher_fan_in)
            block.path[0].op.bias.mul_(p.teacher_fan_in)
        teacher.head[0].op.weight.mul_(p.teacher_head)
        teacher.head[0].op.bias.mul_(p.teacher_head)
    return teacher


def make_data(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` standard-normal inputs and the teacher's targets: its outputs (squared loss, regression) or the
    argmax of its logits (cross-entropy labels)."""
    g = torch.Generator().manual_seed(p.data_seed)
    X = torch.randn(p.n_samples, p.in_features, generator=g, dtype=torch.float64)
    teacher = make_teacher(p)
    teacher.eval()
    with torch.no_grad(), fixed_gates(teacher.gates(), [1.0] * len(teacher.gates())):
        out = teacher(X)
    return (X, out.detach().clone()) if p.loss == "squared" else (X, out.argmax(1))


def make_model(p: Problem, estimator: str) -> GatedNetwork:
    """The student at the common initial state ``(W_0, Θ_0)`` (float64): teacher + noise, see :class:`Problem`."""
    student = _build(p, estimator, p.init_seed)
    teacher = make_teacher(p)
    with torch.no_grad():
        for ws, wt in zip(student.weight_parameters(), teacher.weight_parameters()):
            ws.mul_(p.student_noise).add_(wt)
        if p.student_noise > 0:
            for block, scales in zip(student.blocks, p.teacher_units):  # units the teacher does not use
                for i, s in enumerate(scales):
                    if s == 0.0:
                        block.path[1].op.weight[:, i] /= p.student_noise
    return student


def make_objective(p: Problem, model: GatedNetwork) -> Objective:
    """The trainer's ``J`` (coefficients of [13] on the baseline structure, ``N = n_samples``)."""
    return Objective(
        model.spec(), N=p.n_samples, gamma=p.gamma, rho=p.rho, delta=p.delta, lam=p.lam, mode="combined",
        elementwise=p.elementwise, loss=torch_loss(p.loss),
    )


def make_dynamics(p: Problem) -> tuple[ExactDynamics, np.ndarray]:
    """The exact mean dynamics of the problem and the common initial state ``y_0``."""
    model = make_model(p, "exact-difference")
    X, Y = make_data(p)
    dyn = ExactDynamics(model, X, Y, make_objective(p, model), loss=p.loss)
    return dyn, state_from_model(model)


# --------------------------------------------------------------------------------------------------
# (a) the torch algorithm
# --------------------------------------------------------------------------------------------------


def sgd_trajectory(
    p: Problem, y0: np.ndarray, eta: float, horizon: float, estimator: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(t_k = kη, y_k)`` for ``k = 0 .. round(T/η)``: projected plain SGD from ``y0`` (all iterates)."""
    model = make_model(p, estimator)
    load_state(model, y0)
    objective = make_objective(p, model)
    X, Y = make_data(p)
    cfg = from_dict({"optim": {"kind": "plain-sgd", "weights": {"lr": eta}, "theta": {"lr": eta}}})
    opt_w, opt_t = make_optimizers(cfg, model.weight_parameters(), model.gate_parameters())
    assert opt_t is not None
    n = int(round(horizon / eta))
    spec = model.spec()
    read = state_reader(model)
    states = np.empty((n + 1, y0.shape[0]))
    states[0] = read()
    model.train()
    g = torch.Generator().manual_seed(10_007 * seed + 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for k in range(n):
            idx = torch.randint(p.n_samples, (p.batch_size,), generator=g)  # with replacement
            algorithm1_step(model, objective, X[idx], Y[idx], opt_w, opt_t, spec=spec)
            states[k + 1] = read()
    return eta * np.arange(n + 1), states


# --------------------------------------------------------------------------------------------------
# (b) the ODE
# --------------------------------------------------------------------------------------------------


def ode_solution(
    dyn: ExactDynamics, y0: np.ndarray, t_eval: np.ndarray, *, rtol: float = 1e-8, atol: float = 1e-10
) -> Any:
    """The projected ODE [22] of ``J`` from ``y0``, states at ``t_eval``: :func:`theory.ode.odeint`'s result
    (``.y`` of shape ``(len(t_eval), D)``, ``.switches`` the face hits/releases of the gates)."""
    from theory.ode import odeint

    t_eval = np.asarray(t_eval, dtype=float)
    sol = odeint(dyn.fun, y0, (0.0, float(t_eval[-1])), theta_slice=dyn.theta_slice, t_eval=t_eval,
                 rtol=rtol, atol=atol)
    if not sol.success or sol.y.shape != (t_eval.shape[0], y0.shape[0]):
        raise RuntimeError(f"theory.ode.odeint failed: {sol.message} (states of shape {sol.y.shape})")
    return sol


# --------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------


def sup_deviation(sgd: np.ndarray, ode: np.ndarray, dyn: ExactDynamics) -> tuple[float, float]:
    """``(sup_k ||Θ_k − Θ(kη)||_∞, sup_k ||W_k − W(kη)||_2)`` over the recorded iterates."""
    d = sgd - ode
    return (float(np.abs(d[:, dyn.theta_slice]).max()), float(np.linalg.norm(d[:, dyn.weight_slice], axis=1).max()))


def _mean_sd(x: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


@dataclass
class Comparison:
    """Records and trajectories of one run of the experiment."""

    problem: Problem
    horizon: float
    steps: list[float]
    seeds: int
    estimators: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    ode_t: np.ndarray | None = None
    ode_y: np.ndarray | None = None
    sgd: dict[tuple[str, float, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    theta_slice: slice = field(default_factory=lambda: slice(0, 0))
    theta_names: tuple[str, ...] = ()
    ode_switches: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def monotone(self, estimator: str) -> bool:
        """Mean sup-deviation of θ strictly decreasing along the ladder (steps sorted from large to small)."""
        recs = sorted((r for r in self.records if r["estimator"] == estimator), key=lambda r: -r["eta"])
        devs = [r["sup_dev_theta_mean"] for r in recs]
        return bool(len(devs) >= 2 and all(a > b for a, b in zip(devs, devs[1:])))

    def summary(self, estimator: str) -> dict[str, Any]:
        """Along the ladder: monotone?, shrink factors ``dev(η_min)/dev(η_max)`` and the ``η → 0`` intercepts
        ``b`` of a least-squares fit ``dev(η) ≈ b + c √η`` (the estimator's bias; ≈ 0 when unbiased)."""
        recs = sorted((r for r in self.records if r["estimator"] == estimator), key=lambda r: -r["eta"])
        out: dict[str, Any] = {"monotone_shrinking": self.monotone(estimator)}
        for key, name in (("sup_dev_theta_mean", "theta"), ("sup_dev_w_mean", "w")):
            dev = np.array([r[key] for r in recs])
            out[f"shrink_factor_{name}"] = float(dev[-1] / dev[0]) if len(dev) >= 2 and dev[0] > 0 else math.nan
            if len(dev) >= 2:
                A = np.stack([np.ones(len(dev)), np.sqrt([r["eta"] for r in recs])], axis=1)
                out[f"bias_{name}"] = float(np.linalg.lstsq(A, dev, rcond=None)[0][0])
            else:
                out[f"bias_{name}"] = math.nan
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": "ode_vs_sgd",
            "problem": self.problem.to_dict(),
            "horizon": self.horizon,
            "steps": self.steps,
            "seeds": self.seeds,
            "estimators": self.estimators,
            "deviation_norms": {"theta": "sup_k max_j |θ_j,k − θ_j(kη)|", "weights": "sup_k ||W_k − W(kη)||_2"},
            "records": self.records,
            "monotone_shrinking": {e: self.monotone(e) for e in self.estimators},
            "summary": {e: self.summary(e) for e in self.estimators},
            "ode_final_theta": None if self.ode_y is None else self.ode_y[-1, self.theta_slice].tolist(),
            "ode_switches": self.ode_switches,
            "theta_names": list(self.theta_names),
            "timings_s": self.timings,
        }


def compare(
    problem: Problem | None = None,
    *,
    steps: Sequence[float] = DEFAULT_STEPS,
    horizon: float = DEFAULT_HORIZON,
    seeds: int = DEFAULT_SEEDS,
    estimators: Sequence[str] = ESTIMATORS,
    rtol: float = 1e-8,
    atol: float = 1e-10,
) -> Comparison:
    """Run (a) for every ``(estimator, η, seed)`` and (b) once; the per-``(η, estimator)`` records."""
    p = problem if problem is not None else Problem()
    steps = [float(s) for s in steps]
    if not steps or any(not (s > 0 and math.isfinite(s)) for s in steps) or not horizon > 0 or seeds < 1:
        raise ValueError(f"need positive steps, horizon > 0 and seeds >= 1; got {steps}, {horizon}, {seeds}")
    for e in estimators:
        if e not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {e!r}")
    torch.set_num_threads(1)
    res = Comparison(p, float(horizon), steps, int(seeds), list(estimators))
    dyn, y0 = make_dynamics(p)
    res.theta_slice, res.theta_names = dyn.theta_slice, dyn.gate_layout.names
    grids = {eta: eta * np.arange(int(round(horizon / eta)) + 1) for eta in steps}
    t_all = np.unique(np.round(np.concatenate(list(grids.values())), 12))
    start = time.perf_counter()
    sol = ode_solution(dyn, y0, t_all, rtol=rtol, atol=atol)
    ode_all = sol.y
    res.timings["ode"] = time.perf_counter() - start
    res.timings["ode_nfev"] = float(dyn.nfev)
    res.ode_switches = [
        {"t": float(t), "gate": res.theta_names[int(i) - dyn.theta_slice.start], "kind": str(kind)}
        for t, i, kind in sol.switches
    ]
    thin = max(1, t_all.size // 2000)
    res.ode_t, res.ode_y = t_all[::thin], ode_all[::thin]
    for est in estimators:
        for eta in steps:
            start = time.perf_counter()
            dev_t, dev_w = [], []
            ode = ode_all[np.searchsorted(t_all, np.round(grids[eta], 12))]
            for s in range(seeds):
                t, ys = sgd_trajectory(p, y0, eta, horizon, est, s)
                a, b = sup_deviation(ys, ode, dyn)
                dev_t.append(a)
                dev_w.append(b)
                keep = np.unique(np.linspace(0, t.size - 1, min(t.size, 500)).round().astype(int))
                res.sgd[(est, eta, s)] = (t[keep], ys[keep])
            mt, st = _mean_sd(dev_t)
            mw, sw = _mean_sd(dev_w)
            elapsed = time.perf_counter() - start
            res.timings[f"sgd[{est},{eta:g}]"] = elapsed
            res.records.append({
                "eta": eta, "estimator": est, "n_iter": int(grids[eta].size - 1), "seeds": int(seeds),
                "sup_dev_theta_mean": mt, "sup_dev_theta_sd": st, "sup_dev_w_mean": mw, "sup_dev_w_sd": sw,
                "sup_dev_theta": dev_t, "sup_dev_w": dev_w, "time_s": elapsed,
            })
    return res


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def save(res: Comparison, out: str | Path) -> tuple[Path, Path]:
    """``ode_vs_sgd.json`` and ``ode_vs_sgd.npz`` in ``out`` (both written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "ode_t": np.asarray(res.ode_t), "ode_theta": np.asarray(res.ode_y)[:, res.theta_slice],
        "ode_w": np.asarray(res.ode_y)[:, : res.theta_slice.start],
        "steps": np.asarray(res.steps), "theta_names": np.asarray(res.theta_names),
        "estimators": np.asarray(res.estimators), "seeds": np.asarray(res.seeds),
        "horizon": np.asarray(res.horizon),
    }
    for est in res.estimators:
        recs = [r for r in res.records if r["estimator"] == est]
        arrays[f"dev|{est}"] = np.asarray([
            [r["eta"], r["sup_dev_theta_mean"], r["sup_dev_theta_sd"], r["sup_dev_w_mean"], r["sup_dev_w_sd"]]
            for r in recs
        ])
    for (est, eta, s), (t, ys) in res.sgd.items():
        key = f"{est}|{eta:g}|{s}"
        arrays[f"sgd_t|{key}"] = t
        arrays[f"sgd_theta|{key}"] = ys[:, res.theta_slice]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    npz = out / NPZ_NAME
    atomic_write(npz, lambda fh: fh.write(buf.getvalue()), binary=True)
    js = out / JSON_NAME
    atomic_write_text(js, json.dumps(res.to_dict(), indent=2) + "\n")
    return js, npz


def table(res: Comparison) -> str:
    lines = [
        f"ODE [22] vs projected SGD: {len(res.theta_names)} gates, horizon T = {res.horizon:g}, "
        f"{res.seeds} seed(s); sup-deviation on [0, T] (mean ± sd over seeds)",
        f"{'estimator':<18} {'eta':>9} {'iters':>7} {'sup|θ−θ_ode|∞':>20} {'sup‖W−W_ode‖₂':>20} {'time':>7}",
    ]
    for r in res.records:
        lines.append(
            f"{r['estimator']:<18} {r['eta']:>9.3g} {r['n_iter']:>7d} "
            f"{r['sup_dev_theta_mean']:>11.4f} ± {r['sup_dev_theta_sd']:<6.4f} "
            f"{r['sup_dev_w_mean']:>11.4f} ± {r['sup_dev_w_sd']:<6.4f} {r['time_s']:>6.1f}s"
        )
    for e in res.estimators:
        sm = res.summary(e)
        lines.append(
            f"{e}: monotone shrinking {sm['monotone_shrinking']}; dev(η_min)/dev(η_max) "
            f"θ {sm['shrink_factor_theta']:.2f}, W {sm['shrink_factor_w']:.2f}; "
            f"η→0 intercept of a fit b + c√η (bias): θ {sm['bias_theta']:.4f}, "
            f"W {sm['bias_w']:.4f}"
        )
    if res.ode_y is not None:
        final = ", ".join(f"{n}={v:.3f}" for n, v in zip(res.theta_names, res.ode_y[-1, res.theta_slice]))
        lines.append(f"ODE θ(T): {final}")
    if res.ode_switches:
        lines.append("ODE face switches: " + ", ".join(f"{s['gate']} {s['kind']} at t={s['t']:.3f}"
                                                       for s in res.ode_switches))
    lines.append(f"ODE solve {res.timings.get('ode', math.nan):.1f}s ({int(res.timings.get('ode_nfev', 0))} field "
                 "evaluations)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=float, nargs="+", default=list(DEFAULT_STEPS), help="SGD step sizes η")
    ap.add_argument("--horizon", type=float, default=DEFAULT_HORIZON, help="ODE time horizon T (SGD: T/η steps)")
    ap.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="SGD seeds per η")
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    ap.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    ap.add_argument("--out", type=Path, default=None, help="write ode_vs_sgd.json and ode_vs_sgd.npz here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.horizon <= 0 or any(s <= 0 for s in args.steps):
        ap.error("--seeds must be >= 1, --horizon and --steps positive")
    res = compare(steps=args.steps, horizon=args.horizon, seeds=args.seeds, estimators=args.estimators)
    print(json.dumps(res.to_dict(), indent=2) if args.json else table(res))
    if args.out is not None:
        js, npz = save(res, args.out)
        if not args.json:
            print(f"wrote {js} and {npz}")
    return 0


__all__ = [
    "DEFAULT_HORIZON",
    "DEFAULT_SEEDS",
    "DEFAULT_STEPS",
    "ESTIMATORS",
    "Comparison",
    "Problem",
    "compare",
    "make_data",
    "make_dynamics",
    "make_model",
    "make_objective",
    "ode_solution",
    "save",
    "sgd_trajectory",
    "sup_deviation",
    "table",
]

if __name__ == "__main__":
    raise SystemExit(main())
