"""Gate overhead: one training step of the gated network (combined mode, straight-through) vs the plain one.

Both variants run the body of one iteration of :meth:`pruning.train.Trainer.train_epoch` on the same
architecture and the same mini-batch, through the library itself: the ``E[F]`` bookkeeping of
:class:`pruning.objective.CostMeter`, then :func:`pruning.step.algorithm1_step` — forward, ``J``
(:class:`pruning.objective.Objective`, with the complexity term ``C(Θ)/N`` in combined mode),
backward, the SGD step on ``W`` and (gated only) the Adam step on ``Θ`` followed by the projection
Π_H — then the epoch sums.  The plain variant is ``mode="none"`` (no gates, no complexity term).
Target: gated/plain step time ``<= 1.10`` on CPU.

Two more gated variants locate the overhead:

* ``gated-core`` — the same step without the cost bookkeeping (no ``C(Θ)`` in ``J``, no ``E[F]``);
* ``gated-unfolded`` — ``model.fold_gates = False``: the gates multiply the activations instead of
  acting through the parameters (``ξ_1`` on the next weight's input channels, ``ξ_B`` on the last
  BatchNorm's affine pair; :meth:`pruning.models.ResidualBlock.branch`) — what folding saves;

Checks printed with the breakdown: the compiled ``C(Θ)``/``E[F]`` (:meth:`theory.complexity.
ComplexityModel.compile`, what the objective uses) against the term loop of ``ComplexityModel``,
and the folded forward/gradients against the unfolded ones on the same gate sample.

``--profile`` adds a :mod:`torch.profiler` table of the operators whose self time grows most from
plain to gated.  Run ``python benchmarks/bench_gate_overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402

from pruning.config import RunConfig  # noqa: E402
from pruning.models import GatedNetwork, build_model  # noqa: E402
from pruning.objective import CostMeter, Objective, ObjectiveTerms  # noqa: E402
from pruning.optim import lr_at, make_optimizers  # noqa: E402
from pruning.step import algorithm1_step  # noqa: E402

TARGET = 1.10
ARCHS: dict[str, dict[str, Any]] = {
    "resnet20": {"arch": "resnet20", "kwargs": {}, "shape": (3, 32, 32)},  # CIFAR size
    "resnet1d": {"arch": "resnet1d", "kwargs": {"length": 40, "in_channels": 1}, "shape": (1, 40)},  # MNIST-1D
}
PHASES = ("bookkeeping", "forward", "objective", "backward", "optimisers", "rest")


# --------------------------------------------------------------------------------------------------
# Checks: the library's fast paths against their references
# --------------------------------------------------------------------------------------------------


def check_compiled_cost(model: GatedNetwork, objective: Objective, meter: CostMeter) -> float:
    """Largest relative difference of ``C`` and ``E[F]`` between the compiled evaluation (what
    :class:`Objective` and :class:`CostMeter` use) and :class:`theory.complexity.ComplexityModel`'s
    term loop, at random θ."""
    spec = model.spec()
    saved = [p.detach().clone() for p in model.gate_parameters()]
    worst = 0.0
    try:
        for _ in range(3):
            with torch.no_grad():
                for p in model.gate_parameters():
                    p.uniform_(0.0, 1.0)
            assert objective.coeffs is not None
            with torch.no_grad():
                gates = model.block_gates()
                c_ref = float(objective.complexity_model(spec).complexity(gates, objective.coeffs))
                f_ref = float(meter.model_for(spec).flops(gates))
                c = float(objective.complexity(model, spec))
                f = float(meter.expected_flops(model, spec))
            worst = max(worst, abs(c - c_ref) / abs(c_ref), abs(f - f_ref) / abs(f_ref))
    finally:
        with torch.no_grad():
            for p, s in zip(model.gate_parameters(), saved):
                p.copy_(s)
    return worst


def check_folded(arch: dict[str, Any], device: torch.device, batch: int = 4) -> float:
    """Largest relative difference of output and every gradient (``W``, ``θ``) between the folded
    (default) and the unfolded forward pass on the same gate sample (same seed: one shared draw)."""
    torch.manual_seed(1)
    ref = build_model(arch["arch"], mode="combined", num_classes=10, theta_init=0.7, **arch["kwargs"]).to(device)
    fol = copy.deepcopy(ref)
    ref.fold_gates = False
    x = torch.randn(batch, *arch["shape"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    results = []
    for model in (fol, ref):
        model.train()
        torch.manual_seed(2)
        out = model(x)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad.detach().clone() for p in model.parameters()]))
    (o1, g1), (o2, g2) = results
    worst = float((o1 - o2).abs().max() / o1.abs().max().clamp_min(1e-12))
    for a, b in zip(g1, g2):
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    return worst


# --------------------------------------------------------------------------------------------------
# One trainer step
# --------------------------------------------------------------------------------------------------


class _Marked:
    """The objective, marking the end of the forward pass and of ``J`` (phase breakdown only)."""

    def __init__(self, objective: Objective, mark: Callable[[str], None]) -> None:
        self.objective, self.mark = objective, mark

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)

    def __call__(self, *args: Any, **kwargs: Any) -> ObjectiveTerms:
        self.mark("forward")
        terms = self.objective(*args, **kwargs)
        self.mark("objective")
        return terms


class Step:
    """The body of one iteration of ``Trainer.train_epoch`` on a fixed mini-batch.

    ``bookkeeping=False`` drops ``C(Θ)`` from ``J`` and the ``E[F]`` meter; ``fold=False`` makes the
    gates multiply the activations.
    """

    def __init__(self, arch: dict[str, Any], mode: str, batch: int, device: torch.device, *, N: int,
                 bookkeeping: bool = True, fold: bool = True, seed: int = 0) -> None:
        cfg = RunConfig()
        torch.manual_seed(seed)
        self.model = build_model(arch["arch"], mode=mode, num_classes=10, **arch["kwargs"]).to(device)
        self.model.fold_gates = fold
        self.spec = self.model.spec()
        o = cfg.objective
        self.objective = Objective(self.spec, N=N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_,
                                   mode=mode if bookkeeping else "none", elementwise=o.elementwise)
        self.meter = CostMeter(self.spec)
        self.opt_w, self.opt_t = make_optimizers(cfg, self.model.weight_parameters(), self.model.gate_parameters())
        self.step_fn = algorithm1_step
        self.cfg, self.bookkeeping, self.device = cfg, bookkeeping, device
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, *arch["shape"], generator=g).to(device)
        self.y = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.cum = torch.zeros(1, dtype=torch.float64, device=device)
        self.global_step = 0
        self.model.train()

    def __call__(self, marks: list[tuple[str, float, float]] | None = None) -> None:
        dev = self.device

        def mark(name: str) -> None:
            if marks is not None:
                T.sync(dev)
                marks.append((name, time.perf_counter(), time.thread_time()))

        model, x, y = self.model, self.x, self.y
        mark("start")
        lr = lr_at(self.cfg, self.global_step, 100)
        for g in self.opt_w.param_groups:
            g["lr"] = lr
        ef = self.meter.expected_flops(model, self.spec) if self.bookkeeping else torch.zeros((), device=dev)
        mark("bookkeeping")
        objective: Any = self.objective if marks is None else _Marked(self.objective, mark)
        terms, out = self.step_fn(model, objective, x, y, self.opt_w, self.opt_t, spec=self.spec,
                                  before_update=None if marks is None else (lambda: mark("backward")))
        mark("optimisers")
        b = int(y.shape[0])
        self.cum += ef * b
        with torch.no_grad():
            self.sums += torch.stack([
                terms.data.detach().double() * b, terms.total.detach().double() * b,
                terms.complexity.detach().double() * b, (out.argmax(1) == y).sum().double(),
            ])
        self.global_step += 1
        mark("rest")


def phase_times(step: Step, n: int) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU seconds of each phase over ``n`` instrumented steps."""
    wall: dict[str, list[float]] = {p: [] for p in PHASES}
    cpu: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(n):
        marks: list[tuple[str, float, float]] = []
        step(marks)
        for (_, w0, c0), (name, w1, c1) in zip(marks[:-1], marks[1:]):
            wall[name].append(w1 - w0)
            cpu[name].append(c1 - c0)
    return {"wall": {p: T.median(v) for p, v in wall.items()}, "cpu": {p: T.median(v) for p, v in cpu.items()}}


def profile_diff(steps: dict[str, Step], n: int, top: int) -> list[dict[str, Any]]:
    """Operators whose self CPU time per step grows most from ``plain`` to ``gated`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    per: dict[str, dict[str, tuple[float, float]]] = {}
    for name in ("plain", "gated"):
        with profile(activities=acts) as prof:
            for _ in range(n):
                steps[name]()
        per[name] = {e.key: (e.self_cpu_time_total / n, e.count / n) for e in prof.key_averages()}
    rows = []
    for key in set(per["plain"]) | set(per["gated"]):
        a, b = per["plain"].get(key, (0.0, 0.0)), per["gated"].get(key, (0.0, 0.0))
        rows.append({"op": key, "extra_self_us": b[0] - a[0], "plain_us": a[0], "gated_us": b[0],
                     "plain_calls": a[1], "gated_calls": b[1]})
    rows.sort(key=lambda r: -r["extra_self_us"])
    return rows[:top]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def run_arch(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    arch = ARCHS[name]
    builders: dict[str, Callable[[], Step]] = {
        "plain": lambda: Step(arch, "none", batch, device, N=args.N, seed=args.seed),
        "gated": lambda: Step(arch, "combined", batch, device, N=args.N, seed=args.seed),
        "gated-core": lambda: Step(arch, "combined", batch, device, N=args.N, bookkeeping=False, seed=args.seed),
        "gated-unfolded": lambda: Step(arch, "combined", batch, device, N=args.N, fold=False, seed=args.seed),
    }
    if args.no_diagnostics:
        builders = {k: v for k, v in builders.items() if k in ("plain", "gated")}
    steps = {k: b() for k, b in builders.items()}
    t = T.interleaved(steps, repeats=args.repeats, warmup=args.warmup, inner=args.inner, device=device)
    rec: dict[str, Any] = {
        "arch": name, "batch": batch, "repeats": args.repeats, "inner": args.inner,
        "median_step_wall_s": {k: T.median(v) for k, v in t.wall.items()},
        "median_step_cpu_s": {k: T.median(v) for k, v in t.cpu.items()},
        "cpu_clock": t.cpu_clock,
        "ratios_wall": {k: T.ratio_stats(t.wall[k], t.wall["plain"]) for k in steps if k != "plain"},
        "ratios_cpu": {k: T.ratio_stats(t.cpu[k], t.cpu["plain"]) for k in steps if k != "plain"},
    }
    rec["ratio"] = rec["ratios_wall"]["gated"]["paired_median"]
    if not args.no_diagnostics:
        rec["phases_s"] = {k: phase_times(steps[k], max(3, args.repeats // 2)) for k in ("plain", "gated")}
        g = steps["gated"]
        rec["checks"] = {
            "compiled_cost_max_rel_diff": check_compiled_cost(g.model, g.objective, g.meter),
            "folded_gates_max_rel_diff": check_folded(arch, device),
        }
    if args.profile:
        rec["profile_top_extra_ops"] = profile_diff(steps, n=max(2, args.repeats // 3), top=args.profile_top)
    return rec


def _ratio_text(r: dict[str, float]) -> str:
    return f"{r['paired_median']:.3f} (IQR {r['paired_q1']:.3f}-{r['paired_q3']:.3f})"


def report(rec: dict[str, Any], device: torch.device) -> None:
    cpu_ok = device.type == "cpu"
    print(f"\n== {rec['arch']}, batch {rec['batch']} ({rec['repeats']} rounds x {rec['inner']} steps) ==")
    print("  median step (wall): " + ", ".join(f"{k} {T.fmt_ms(v)}" for k, v in rec["median_step_wall_s"].items()))
    if cpu_ok:
        print(f"  median step (cpu, {rec['cpu_clock']}): "
              + ", ".join(f"{k} {T.fmt_ms(v)}" for k, v in rec["median_step_cpu_s"].items()))
    v = rec["ratio"]
    print(f"  gate overhead ratio (gated/plain step time): {v:.3f}  [target <= {TARGET:.2f}: "
          f"{T.verdict(v, TARGET, '<=')}]  (paired IQR {rec['ratios_wall']['gated']['paired_q1']:.3f}-"
          f"{rec['ratios_wall']['gated']['paired_q3']:.3f})")
    if cpu_ok:
        c = rec["ratios_cpu"]["gated"]["paired_median"]
        print(f"  gate overhead ratio, CPU time (robust to load):  {c:.3f}  [target <= {TARGET:.2f}: "
              f"{T.verdict(c, TARGET, '<=')}]")
    what = {"gated-core": "without C(θ)/E[F] bookkeeping", "gated-unfolded": "gates multiplying the activations"}
    for k, label in what.items():
        if k in rec["ratios_wall"]:
            line = f"  {k + ' / plain':<24} wall {_ratio_text(rec['ratios_wall'][k])}"
            if cpu_ok:
                line += f", cpu {_ratio_text(rec['ratios_cpu'][k])}"
            print(f"{line}  [{label}]")
    if "phases_s" in rec:
        clock = "cpu" if cpu_ok else "wall"
        p, g = rec["phases_s"]["plain"][clock], rec["phases_s"]["gated"][clock]
        print(f"  {'phase (' + clock + ')':<14}{'plain':>11}{'gated':>11}{'extra':>11}")
        for ph in PHASES:
            print(f"  {ph:<14}{p[ph] * 1e3:>9.2f}ms{g[ph] * 1e3:>9.2f}ms{(g[ph] - p[ph]) * 1e3:>+9.2f}ms")
        c = rec["checks"]
        print(f"  checks: compiled C/E[F] vs ComplexityModel loop, max rel diff {c['compiled_cost_max_rel_diff']:.1e}; "
              f"folded vs unfolded gates forward/grads max rel diff {c['folded_gates_max_rel_diff']:.1e}")
    if "profile_top_extra_ops" in rec:
        print("  torch.profiler: ops with the largest extra self CPU time per step (gated - plain)")
        for row in rec["profile_top_extra_ops"]:
            print(f"    {row['op'][:48]:<48} {row['extra_self_us']:>9.0f} us  calls {row['plain_calls']:>5.0f} -> "
                  f"{row['gated_calls']:>5.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["resnet20", "resnet1d"], choices=sorted(ARCHS))
    p.add_argument("--batch-cifar", type=int, default=32, help="mini-batch of resnet20 at 32x32 (default 32)")
    p.add_argument("--batch-1d", type=int, default=128, help="mini-batch of resnet1d at length 40 (default 128)")
    p.add_argument("--inner", type=int, default=2, help="steps per variant per round (default 2)")
    p.add_argument("--N", type=int, default=4000, help="training-set size N of J = L/N (default 4000, MNIST-1D)")
    p.add_argument("--no-diagnostics", action="store_true", help="time plain and gated only (no breakdown)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of the extra operators")
    p.add_argument("--profile-top", type=int, default=15)
    T.add_common_args(p, threads=1, repeats=9, warmup=2)
    args = p.parse_args(argv)
    device = T.setup(args)
    env = T.environment(device)
    results = []
    for name in args.arch:
        batch = args.batch_cifar if name == "resnet20" else args.batch_1d
        results.append(run_arch(name, batch, args, device))
    env_end = T.environment(device)
    record = {"benchmark": "gate_overhead", "target": f"gated/plain <= {TARGET}", "env": env,
              "loadavg_end": env_end["loadavg"], "results": results}
    if args.json:
        T.dump_json(record)
        return 0
    print(f"gate overhead: {T.env_line(env)}")
    for rec in results:
        report(rec, device)
    worst = max(r["ratio"] for r in results)
    print(f"\nworst gate overhead ratio: {worst:.3f}  [target <= {TARGET:.2f}: {T.verdict(worst, TARGET, '<=')}]"
          f"  (load average at end {' '.join(f'{v:.2f}' for v in env_end['loadavg'])}; shared machine: noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
