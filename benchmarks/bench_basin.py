"""Basin-map throughput: many canonical-block trajectories (THEORY.md §7) batched vs one-by-one solve_ivp.

Integrates the projected ODE [22]/[24] of one canonical block (m = 2 inputs,
n = 4 units, p = 2 outputs, N = 32 samples, ``BlockProblem.random``) from
``--trajectories`` initial conditions (gates uniform in H, weights uniform in
the ball ||W|| ≤ R) over [0, T] with :func:`theory.ode.odeint_batch`, and a
``--subset`` of the same initial conditions one at a time with the solve_ivp
reference :func:`theory.ode.odeint` (LSODA, rtol 1e-8, atol 1e-10).  Prints
trajectories per second, the per-trajectory speed-up and the deviation of the
batched result from the reference on the subset (max |Δy| over state and
output times, and whether the final vertex of the gates agrees).

    python benchmarks/bench_basin.py                       # 10^5 trajectories, RKC, 2 threads
    python benchmarks/bench_basin.py --trajectories 5000 --subset 20
    python benchmarks/bench_basin.py --method rk4 --dt 0.02
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np

from theory.block_model import BlockProblem, field
from theory.ode import hits_zero, odeint, odeint_batch

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trajectories", type=int, default=100_000, help="batched trajectories (default 1e5)")
    ap.add_argument("--subset", type=int, default=200, help="trajectories also run one by one with solve_ivp")
    ap.add_argument("--method", default="rkc", help="odeint_batch method: rkc (adaptive) or rk4/heun/... (fixed)")
    ap.add_argument("--dt", type=float, default=None, help="fixed step (rk4: 0.02) / initial step (rkc: 1e-3)")
    ap.add_argument("--rtol", type=float, default=1e-5, help="rkc local relative tolerance")
    ap.add_argument("--atol", type=float, default=1e-7, help="rkc local absolute tolerance")
    ap.add_argument("--workers", type=int, default=2, help="threads (the machine has 2 cores)")
    ap.add_argument("--chunk", type=int, default=None, help="trajectories per chunk (default: method's)")
    ap.add_argument("--T", type=float, default=30.0, help="horizon")
    ap.add_argument("--R", type=float, default=2.0, help="radius of the initial weight ball")
    ap.add_argument("--outputs", type=int, default=7, help="output times (linspace(0, T, outputs))")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.trajectories < 1 or args.subset < 0 or args.subset > args.trajectories:
        ap.error("need --trajectories >= 1 and 0 <= --subset <= --trajectories")

    rng = np.random.default_rng(args.seed)
    prob = BlockProblem.random(rng, m=2, n=4, p=2, N=32)
    Y0 = initial_conditions(prob, rng, args.trajectories, args.R)
    t = np.linspace(0.0, args.T, args.outputs)
    f = field(prob)
    dt = args.dt if args.dt is not None else (1e-3 if args.method == "rkc" else 0.02)
    chunk = args.chunk
    if chunk is None and args.method == "rkc":
        chunk = -(-args.trajectories // args.workers)  # one chunk per thread: large stage groups
    print(
        f"canonical block m={prob.m} n={prob.n} p={prob.p} N={prob.N} D={prob.D} lam={prob.lam} c_B={prob.c_B} "
        f"c_1={prob.c_1}; T={args.T}, ||W(0)|| <= {args.R}, {args.outputs} output times"
    )
    print(f"machine: {os.cpu_count()} cores, load average before run {os.getloadavg()[0]:.2f} (shared machine)")

    res = odeint_batch(
        f, Y0, t, theta_slice=prob.theta_slice, method=args.method, dt=dt, rtol=args.rtol, atol=args.atol,
        workers=args.workers, chunk_size=chunk, events=[hits_zero(0)],
    )
    B = args.trajectories
    per_batch = res.wall_time / B
    extra = f", rtol={args.rtol:g}" if args.method == "rkc" else ""
    print(
        f"batched ({args.method}, dt={dt:g}{extra}, workers={args.workers}): {B} trajectories in {res.wall_time:.1f} s "
        f"= {B / res.wall_time:.0f} trajectories/s; {res.nfev / B:.0f} field evaluations per trajectory, "
        f"{res.wall_time / max(res.nfev, 1) * 1e6:.2f} us per evaluation"
    )
    thB = res.y[-1, :, 0]
    print(
        f"outcomes at T: block pruned (θ_B = 0) {np.mean(thB == 0):.1%}, kept (θ_B = 1) {np.mean(thB == 1):.1%}; "
        f"median time to prune {np.nanmedian(res.t_events[0]):.2f}"
    )
    print(f"load average after batched run {os.getloadavg()[0]:.2f}")

    if args.subset:
        t0 = time.perf_counter()
        refs = [
            odeint(f, y, (0.0, args.T), theta_slice=prob.theta_slice, t_eval=t, rtol=1e-8, atol=1e-10)
            for y in Y0[: args.subset]
        ]
        t_ref = time.perf_counter() - t0
        per_ref = t_ref / args.subset
        ref = np.stack([r.y for r in refs], axis=1)
        dev = np.abs(res.y[:, : args.subset] - ref).max(axis=(0, 2))
        same_vertex = np.all(np.round(res.y[-1, : args.subset, :5]) == np.round(ref[-1, :, :5]), axis=1)
        print(
            f"solve_ivp (LSODA, rtol 1e-8) one by one: {args.subset} trajectories in {t_ref:.1f} s = "
            f"{per_ref * 1e3:.1f} ms per trajectory ({np.mean([r.nfev for r in refs]):.0f} evaluations each); "
            f"failures {sum(not r.success for r in refs)}"
        )
        print(f"SPEED-UP per trajectory: {per_ref / per_batch:.0f}x  (batched {per_batch * 1e3:.3f} ms)")
        q = np.quantile(dev, [0.5, 0.9, 0.99, 1.0])
        print(
            f"ACCURACY on the subset, max |Δy| over state and outputs: median {q[0]:.1e}, 90% {q[1]:.1e}, "
            f"99% {q[2]:.1e}, max {q[3]:.1e}; same final gate vertex {np.mean(same_vertex):.1%}, "
            f"same block outcome {np.mean((res.y[-1, :args.subset, 0] > 0.5) == (ref[-1, :, 0] > 0.5)):.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
