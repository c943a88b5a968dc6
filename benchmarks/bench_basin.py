"""Basin-map throughput: many canonical-block trajectories (THEORY §7) batched vs one-by-one solve_ivp.

Integrates the projected ODE [22]/[24] of one canonical block (m = 2 inputs,
n = 4 units, p = 2 outputs, N = 32 samples, ``BlockProblem.random``) from
``--trajectories`` initial conditions (gates uniform in H, weights uniform in
the ball ||W|| ≤ R) over [0, T] with :func:`theory.ode.odeint_batch` (adaptive
RKC; the compiled kernels of :mod:`theory.block_ode` when numba is installed),
and in the same run:

* the first call (numba compilation, or loading the cached kernels);
* the scaling from 1 to 2 worker threads: ``--scaling`` trajectories, the two
  variants interleaved over ``--rounds`` rounds (median of the paired ratios);
* the numpy path of ``odeint_batch`` on ``--numpy`` of the trajectories (the
  readable reference; per-trajectory speed-up of the compiled path over it);
* a ``--subset`` of the same initial conditions one at a time with the
  solve_ivp reference :func:`theory.ode.odeint` (LSODA, rtol 1e-8, atol 1e-10):
  the per-trajectory speed-up and the deviation of the batched result (max
  |Δy| over state and output times, same final vertex of the gates).

Targets: ≥ 100× per trajectory over solve_ivp one by one; 10⁵ trajectories in
≤ 60 s on 2 cores; scaling 1 → 2 workers ≥ 1.7×.  Wall times on a shared
machine depend on the load: the load average and the process CPU time are
printed next to every time.

    python benchmarks/bench_basin.py                       # 10^5 trajectories, RKC, 2 threads
    python benchmarks/bench_basin.py --trajectories 5000 --subset 20 --scaling 2000 --numpy 500
    python benchmarks/bench_basin.py --method rk4 --dt 0.02
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from typing import Any

import numpy as np

from theory.block_model import BlockProblem, field
from theory.jit import NUMBA_VERSION
from theory.ode import backend_for, hits_zero, odeint, odeint_batch

print = functools.partial(print, flush=True)  # noqa: A001  (progress visible when redirected)


def initial_conditions(prob: BlockProblem, rng: np.random.Generator, B: int, R: float) -> np.ndarray:
    """Gates uniform in H; weights uniform in the ball ||W_1||² + ||W_2||² ≤ R²."""
    K = 1 + prob.n
    Y = np.empty((B, prob.D))
    Y[:, :K] = rng.uniform(size=(B, K))
    W = rng.standard_normal((B, prob.D - K))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    Y[:, K:] = W * (R * rng.uniform(size=(B, 1)) ** (1.0 / (prob.D - K)))
    return Y


def verdict(value: float, target: float, kind: str) -> str:
    """``met`` when ``value >= target`` (``kind=">="``) or ``value <= target`` (``"<="``), else ``MISSED``."""
    if not math.isfinite(value):
        return "n/a"
    ok = value >= target if kind == ">=" else value <= target
    return "met" if ok else "MISSED"


def load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trajectories", type=int, default=100_000, help="batched trajectories (default 1e5)")
    ap.add_argument("--subset", type=int, default=200, help="trajectories also run one by one with solve_ivp")
    ap.add_argument("--scaling", type=int, default=20_000,
                    help="trajectories per 1-vs-2-worker scaling run (0: skip; default 2e4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the scaling measurement")
    ap.add_argument("--numpy", type=int, default=2000,
                    help="trajectories also run with the numpy path of odeint_batch (0: skip; default 2000)")
    ap.add_argument("--backend", default="auto", choices=("auto", "numba", "numpy"), help="odeint_batch backend")
    ap.add_argument("--method", default="rkc", help="odeint_batch method: rkc (adaptive) or rk4/heun/... (fixed)")
    ap.add_argument("--dt", type=float, default=None, help="fixed step (rk4: 0.02) / initial step (rkc: 1e-3)")
    ap.add_argument("--rtol", type=float, default=1e-5, help="rkc local relative tolerance")
    ap.add_argument("--atol", type=float, default=1e-7, help="rkc local absolute tolerance")
    ap.add_argument("--workers", type=int, default=2, help="threads (the machine has 2 cores)")
    ap.add_argument("--chunk", type=int, default=None, help="trajectories per chunk (default: backend's)")
    ap.add_argument("--T", type=float, default=30.0, help="horizon")
    ap.add_argument("--R", type=float, default=2.0, help="radius of the initial weight ball")
    ap.add_argument("--outputs", type=int, default=7, help="output times (linspace(0, T, outputs))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON record at the end")
    args = ap.parse_args(argv)
    if args.trajectories < 1 or not 0 <= args.subset <= args.trajectories:
        ap.error("need --trajectories >= 1 and 0 <= --subset <= --trajectories")
    if args.scaling < 0 or args.numpy < 0 or args.rounds < 1:
        ap.error("need --scaling >= 0, --numpy >= 0, --rounds >= 1")

    rng = np.random.default_rng(args.seed)
    prob = BlockProblem.random(rng, m=2, n=4, p=2, N=32)
    B = args.trajectories
    Y0 = initial_conditions(prob, rng, B, args.R)
    t = np.linspace(0.0, args.T, args.outputs)
    f = field(prob)
    dt = args.dt if args.dt is not None else (1e-3 if args.method == "rkc" else 0.02)
    backend = backend_for(f, args.backend)
    rec: dict[str, Any] = {"trajectories": B, "method": args.method, "backend": backend, "numba": NUMBA_VERSION,
                           "cpu_count": os.cpu_count()}

    def run(Y: np.ndarray, workers: int, which: str = args.backend, chunk: int | None = args.chunk) -> Any:
        if chunk is None and which == "numpy" and args.method == "rkc":
            chunk = -(-Y.shape[0] // workers)  # one chunk per thread: large stage groups
        return odeint_batch(f, Y, t, theta_slice=prob.theta_slice, method=args.method, dt=dt, rtol=args.rtol,
                            atol=args.atol, workers=workers, chunk_size=chunk, events=[hits_zero(0)], backend=which)

    print(f"canonical block m={prob.m} n={prob.n} p={prob.p} N={prob.N} D={prob.D} lam={prob.lam} c_B={prob.c_B} "
          f"c_1={prob.c_1}; T={args.T}, ||W(0)|| <= {args.R}, {args.outputs} output times; method {args.method}"
          + (f", rtol {args.rtol:g}" if args.method == "rkc" else f", dt {dt:g}"))
    print(f"machine: {os.cpu_count()} cores, load average {load():.2f} (shared machine); backend {backend}"
          + (f" (numba {NUMBA_VERSION})" if backend == "numba" else ""))

    # 1. first call: compilation or cached kernels
    w0, c0 = time.perf_counter(), time.process_time()
    run(Y0[:2], 1)
    first = time.perf_counter() - w0
    rec["first_call_s"] = first
    print(f"first call (compiles the kernels, or loads them from numba's cache): {first:.2f} s wall, "
          f"{time.process_time() - c0:.2f} s CPU")

    # 2. the batched run
    load_before = load()
    c0 = time.process_time()
    res = run(Y0, args.workers)
    cpu = time.process_time() - c0
    per_batch = res.wall_time / B
    rec.update({"wall_s": res.wall_time, "cpu_s": cpu, "load_before": load_before, "load_after": load(),
                "evals_per_trajectory": res.nfev / B})
    print(f"batched ({args.method}, {backend}, workers={args.workers}): {B} trajectories in {res.wall_time:.1f} s "
          f"[target <= 60 s for 1e5: {verdict(res.wall_time * 1e5 / B, 60.0, '<=')}] = {B / res.wall_time:.0f} "
          f"trajectories/s; CPU {cpu:.1f} s ({cpu / B * 1e3:.3f} ms per trajectory, {cpu / max(res.nfev, 1) * 1e6:.2f} "
          f"us per field evaluation); load average {load_before:.2f} before, {load():.2f} after; "
          f"{res.nfev / B:.0f} field evaluations and {res.steps / B:.0f} steps per trajectory")
    thB = res.y[-1, :, 0]
    print(f"outcomes at T: block pruned (θ_B = 0) {np.mean(thB == 0):.1%}, kept (θ_B = 1) {np.mean(thB == 1):.1%}; "
          f"median time to prune {np.nanmedian(res.t_events[0]):.2f}; failed trajectories {res.failed}")

    # 3. scaling 1 -> 2 workers, interleaved
    if args.scaling:
        Ys = Y0[: min(args.scaling, B)]
        walls: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[float]] = {1: [], 2: []}
        balance: list[float] = []
        loads = []
        for r in range(args.rounds):
            for w in ((1, 2) if r % 2 == 0 else (2, 1)):
                c0 = time.process_time()
                rw = run(Ys, w)
                walls[w].append(rw.wall_time)
                cpus[w].append(time.process_time() - c0)
                if w == 2 and rw.thread_cpu:
                    balance.append(sum(rw.thread_cpu) / max(rw.thread_cpu))
                loads.append(load())
        paired = [a / b for a, b in zip(walls[1], walls[2])]
        scale = statistics.median(paired)
        util = statistics.median(c / w for c, w in zip(cpus[2], walls[2]))
        cpu_scale = statistics.median(balance) if balance else math.nan
        rec.update({"scaling": scale, "scaling_rounds": paired, "cpu_per_wall_2_workers": util,
                    "scaling_cpu_ratio": statistics.median(cpus[2]) / statistics.median(cpus[1]),
                    "scaling_at_equal_cpu_share": cpu_scale})
        print(f"scaling 1 -> 2 workers ({Ys.shape[0]} trajectories, {args.rounds} interleaved rounds): "
              f"{scale:.2f}x wall (paired rounds {', '.join(f'{p:.2f}' for p in paired)}) [target >= 1.7: "
              f"{verdict(scale, 1.7, '>=')}]; 1 worker {statistics.median(walls[1]):.1f} s, 2 workers "
              f"{statistics.median(walls[2]):.1f} s; load average {min(loads):.2f}-{max(loads):.2f}")
        print(f"  the same in CPU time: 2 workers use {rec['scaling_cpu_ratio']:.2f}x the CPU of 1 (1.00 = no "
              f"parallel overhead) and got {util:.2f} of the 2 cores; work / busiest thread = {cpu_scale:.2f}x "
              f"(the speed-up with a free core per worker)")

    # 4. the numpy path of odeint_batch (the readable reference) on a subset
    if args.numpy and backend == "numba":
        Yn = Y0[: min(args.numpy, B)]
        rn = run(Yn, args.workers, "numpy")
        per_np = rn.wall_time / Yn.shape[0]
        dev_np = float(np.abs(rn.y - res.y[:, : Yn.shape[0]]).max())
        rec.update({"numpy_ms_per_trajectory": per_np * 1e3, "speedup_vs_numpy": per_np / per_batch})
        print(f"numpy path ({Yn.shape[0]} trajectories, workers={args.workers}): {per_np * 1e3:.2f} ms per "
              f"trajectory; compiled is {per_np / per_batch:.0f}x faster per trajectory; max |Δy| between the two "
              f"{dev_np:.1e}")

    # 5. solve_ivp one by one
    if args.subset:
        t0, c0 = time.perf_counter(), time.process_time()
        refs = [
            odeint(f, y, (0.0, args.T), theta_slice=prob.theta_slice, t_eval=t, rtol=1e-8, atol=1e-10)
            for y in Y0[: args.subset]
        ]
        t_ref = time.perf_counter() - t0
        cpu_ref = (time.process_time() - c0) / args.subset
        per_ref = t_ref / args.subset
        ref = np.stack([r.y for r in refs], axis=1)
        dev = np.abs(res.y[:, : args.subset] - ref).max(axis=(0, 2))
        K = 1 + prob.n
        same_vertex = np.all(np.round(res.y[-1, : args.subset, :K]) == np.round(ref[-1, :, :K]), axis=1)
        speed = per_ref / per_batch
        rec.update({"solve_ivp_ms_per_trajectory": per_ref * 1e3, "speedup_vs_solve_ivp": speed,
                    "max_dev": float(dev.max()), "same_vertex": float(np.mean(same_vertex))})
        print(f"solve_ivp (LSODA, rtol 1e-8) one by one: {args.subset} trajectories in {t_ref:.1f} s = "
              f"{per_ref * 1e3:.1f} ms per trajectory ({np.mean([r.nfev for r in refs]):.0f} evaluations each); "
              f"failures {sum(not r.success for r in refs)}; load average {load():.2f}")
        print(f"SPEED-UP per trajectory: {speed:.0f}x (batched {per_batch * 1e3:.3f} ms) "
              f"[target >= 100x: {verdict(speed, 100.0, '>=')}]")
        rec["speedup_cpu_time"] = cpu_ref / (cpu / B)
        print(f"  in CPU time (insensitive to the load): {cpu_ref * 1e3:.1f} ms per solve_ivp trajectory vs "
              f"{cpu / B * 1e3:.3f} ms batched = {rec['speedup_cpu_time']:.0f}x on one core each (x the "
              f"workers' scaling on free cores)")
        q = np.quantile(dev, [0.5, 0.9, 0.99, 1.0])
        print(
            f"ACCURACY on the subset, max |Δy| over state and outputs: median {q[0]:.1e}, 90% {q[1]:.1e}, "
            f"99% {q[2]:.1e}, max {q[3]:.1e}; same final gate vertex {np.mean(same_vertex):.1%}, "
            f"same block outcome {np.mean((res.y[-1, :args.subset, 0] > 0.5) == (ref[-1, :, 0] > 0.5)):.1%}"
        )
    if args.json:
        print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
