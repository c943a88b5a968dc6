"""Gate overhead: one training step of the gated network (combined mode, straight-through) vs plain torch.

``gated`` is the body of one iteration of :meth:`pruning.train.Trainer.train_epoch` through the
library itself (:class:`_steps.LibraryStep`: the ``E[F]`` bookkeeping of
:class:`pruning.objective.CostMeter`, :func:`pruning.step.algorithm1_step` — forward, ``J`` with
``C(Θ)/N``, backward, the audit's Lemma-1 observation every ``train.audit_every`` = 4 steps, SGD on
``W``, Adam + Π_H on ``Θ`` — then the epoch sums); ``torch`` is a hand-written torch network of the
same architecture trained by ``F.cross_entropy`` + ``torch.optim.SGD(momentum, weight_decay=λ/N)``
(:mod:`_plain`).  Targets (gated / torch step time, CPU, one thread): **≤ 1.05** on ResNet-1D at
MNIST-1D size (batch 128), **≤ 1.02** on ResNet-20 and ResNet-56 at 32×32 (batch 128).
``--inner`` defaults to 4 steps per variant per round, so every round holds one audit observation.

Diagnostic variants locate the overhead (ratios to ``torch``):

* ``plain`` — the library's ``mode="none"`` network through the same step (no gates, no ``C``);
* ``gated-core`` — gated without the bookkeeping (no ``C(Θ)`` in ``J``, no ``E[F]``, no audit);
* ``gated-unfolded`` — ``model.fold_gates = False``: the gates multiply the activations instead of
  acting through the parameters (:meth:`pruning.models.ResidualBlock.branch`) — what folding saves.

Checks printed with the breakdown: the compiled ``C(Θ)``/``E[F]`` (:meth:`theory.complexity.
ComplexityModel.compile`, what the objective uses) against the term loop of ``ComplexityModel``,
and the folded forward/gradients against the unfolded ones on the same gate sample.
``--channels-last auto`` (default) applies ``train.channels_last = "auto"``'s rule to every variant.

``--profile`` adds a :mod:`torch.profiler` table of the operators whose self time grows most from
torch to gated.  Run ``python benchmarks/bench_gate_overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402
from _steps import ARCHS, LibraryStep, plain_step  # noqa: E402

from pruning.models import GatedNetwork, build_model  # noqa: E402
from pruning.objective import CostMeter, Objective  # noqa: E402
from pruning.runtime import resolve_channels_last  # noqa: E402

#: gated step / plain torch step, per architecture: the tiny 1-D net (fixed per-step costs weigh most) and CIFAR.
TARGETS = {"resnet1d": 1.05, "resnet20": 1.02, "resnet56": 1.02}
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


def phase_times(step: LibraryStep, n: int) -> dict[str, dict[str, float]]:
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


def profile_diff(steps: dict[str, Any], n: int, top: int) -> list[dict[str, Any]]:
    """Operators whose self CPU time per step grows most from ``torch`` to ``gated`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    per: dict[str, dict[str, tuple[float, float]]] = {}
    for name in ("torch", "gated"):
        with profile(activities=acts) as prof:
            for _ in range(n):
                steps[name]()
        per[name] = {e.key: (e.self_cpu_time_total / n, e.count / n) for e in prof.key_averages()}
    rows = []
    for key in set(per["plain"]) | set(per["gated"]):
        a, b = per["torch"].get(key, (0.0, 0.0)), per["gated"].get(key, (0.0, 0.0))
        rows.append({"op": key, "extra_self_us": b[0] - a[0], "plain_us": a[0], "gated_us": b[0],
                     "plain_calls": a[1], "gated_calls": b[1]})
    rows.sort(key=lambda r: -r["extra_self_us"])
    return rows[:top]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def run_arch(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    arch = ARCHS[name]
    spec = build_model(arch["arch"], mode="none", num_classes=10, **arch["kwargs"]).spec()
    cl = args.channels_last
    cl_on = resolve_channels_last(cl if cl == "auto" else cl == "on", device, spec)
    kw: dict[str, Any] = {"N": args.N, "seed": args.seed, "channels_last": cl_on}
    builders: dict[str, Callable[[], Any]] = {
        "torch": lambda: plain_step(spec, arch, batch, device, **kw),
        "gated": lambda: LibraryStep(arch, "combined", batch, device, **kw),
        "plain": lambda: LibraryStep(arch, "none", batch, device, **kw),
        "gated-core": lambda: LibraryStep(arch, "combined", batch, device, bookkeeping=False, **kw),
        "gated-unfolded": lambda: LibraryStep(arch, "combined", batch, device, fold=False, **kw),
    }
    if args.no_diagnostics:
        builders = {k: v for k, v in builders.items() if k in ("torch", "gated")}
    steps = {k: b() for k, b in builders.items()}
    t = T.interleaved(steps, repeats=args.repeats, warmup=args.warmup, inner=args.inner, device=device)
    rec: dict[str, Any] = {
        "arch": name, "batch": batch, "repeats": args.repeats, "inner": args.inner, "channels_last": cl_on,
        "target": TARGETS[name],
        "median_step_wall_s": {k: T.median(v) for k, v in t.wall.items()},
        "median_step_cpu_s": {k: T.median(v) for k, v in t.cpu.items()},
        "cpu_clock": t.cpu_clock,
        "ratios_wall": {k: T.ratio_stats(t.wall[k], t.wall["torch"]) for k in steps if k != "torch"},
        "ratios_cpu": {k: T.ratio_stats(t.cpu[k], t.cpu["torch"]) for k in steps if k != "torch"},
    }
    rec["ratio"] = rec["ratios_wall"]["gated"]["paired_median"]
    rec["ratio_cpu"] = rec["ratios_cpu"]["gated"]["paired_median"]
    if "plain" in steps:
        rec["gated_vs_library_plain"] = {
            "wall": T.ratio_stats(t.wall["gated"], t.wall["plain"]),
            "cpu": T.ratio_stats(t.cpu["gated"], t.cpu["plain"]),
        }
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
    target = rec["target"]
    print(f"\n== {rec['arch']}, batch {rec['batch']}, channels_last {'on' if rec['channels_last'] else 'off'} "
          f"({rec['repeats']} rounds x {rec['inner']} steps) ==")
    print("  median step (wall): " + ", ".join(f"{k} {T.fmt_ms(v)}" for k, v in rec["median_step_wall_s"].items()))
    if cpu_ok:
        print(f"  median step (cpu, {rec['cpu_clock']}): "
              + ", ".join(f"{k} {T.fmt_ms(v)}" for k, v in rec["median_step_cpu_s"].items()))
    v = rec["ratio"]
    print(f"  gate overhead {rec['arch']} (gated step / plain torch step, wall): {v:.3f}  [target <= {target:.2f}: "
          f"{T.verdict(v, target, '<=')}]  (paired IQR {rec['ratios_wall']['gated']['paired_q1']:.3f}-"
          f"{rec['ratios_wall']['gated']['paired_q3']:.3f})")
    if cpu_ok:
        c = rec["ratio_cpu"]
        print(f"  gate overhead {rec['arch']} (gated / plain torch, CPU time):      {c:.3f}  [target <= {target:.2f}: "
              f"{T.verdict(c, target, '<=')}]  (IQR {rec['ratios_cpu']['gated']['paired_q1']:.3f}-"
              f"{rec['ratios_cpu']['gated']['paired_q3']:.3f})")
    what = {"plain": "the library's mode='none' network and step",
            "gated-core": "gated without C(θ)/E[F]/audit bookkeeping",
            "gated-unfolded": "gates multiplying the activations"}
    for k, label in what.items():
        if k in rec["ratios_wall"]:
            line = f"  {k + ' / torch':<24} wall {_ratio_text(rec['ratios_wall'][k])}"
            if cpu_ok:
                line += f", cpu {_ratio_text(rec['ratios_cpu'][k])}"
            print(f"{line}  [{label}]")
    if "gated_vs_library_plain" in rec:
        r = rec["gated_vs_library_plain"]
        print(f"  {'gated / plain (library)':<24} wall {_ratio_text(r['wall'])}"
              + (f", cpu {_ratio_text(r['cpu'])}" if cpu_ok else ""))
    if "phases_s" in rec:
        clock = "cpu" if cpu_ok else "wall"
        p, g = rec["phases_s"]["plain"][clock], rec["phases_s"]["gated"][clock]
        print(f"  {'phase (' + clock + ')':<14}{'plain':>11}{'gated':>11}{'extra':>11}   (library steps)")
        for ph in PHASES:
            print(f"  {ph:<14}{p[ph] * 1e3:>9.2f}ms{g[ph] * 1e3:>9.2f}ms{(g[ph] - p[ph]) * 1e3:>+9.2f}ms")
        c = rec["checks"]
        print(f"  checks: compiled C/E[F] vs ComplexityModel loop, max rel diff {c['compiled_cost_max_rel_diff']:.1e}; "
              f"folded vs unfolded gates forward/grads max rel diff {c['folded_gates_max_rel_diff']:.1e}")
    if "profile_top_extra_ops" in rec:
        print("  torch.profiler: ops with the largest extra self CPU time per step (gated - torch)")
        for row in rec["profile_top_extra_ops"]:
            print(f"    {row['op'][:48]:<48} {row['extra_self_us']:>9.0f} us  calls {row['plain_calls']:>5.0f} -> "
                  f"{row['gated_calls']:>5.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["resnet1d", "resnet20", "resnet56"], choices=sorted(ARCHS))
    p.add_argument("--batch-cifar", type=int, default=128, help="mini-batch of resnet20/56 at 32x32 (default 128)")
    p.add_argument("--batch-1d", type=int, default=128, help="mini-batch of resnet1d at length 40 (default 128)")
    p.add_argument("--inner", type=int, default=4,
                   help="steps per variant per round (default 4 = train.audit_every: one audit observation per round)")
    p.add_argument("--N", type=int, default=4000, help="training-set size N of J = L/N (default 4000, MNIST-1D)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory format of every variant (default auto: train.channels_last's rule)")
    p.add_argument("--no-diagnostics", action="store_true", help="time torch and gated only (no breakdown)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of the extra operators")
    p.add_argument("--profile-top", type=int, default=15)
    T.add_common_args(p, threads=1, repeats=9, warmup=1)
    args = p.parse_args(argv)
    device = T.setup(args)
    env = T.environment(device)
    results = []
    for name in args.arch:
        batch = args.batch_1d if name == "resnet1d" else args.batch_cifar
        results.append(run_arch(name, batch, args, device))
    env_end = T.environment(device)
    record = {"benchmark": "gate_overhead", "target": {k: f"gated/torch <= {v}" for k, v in TARGETS.items()},
              "env": env, "loadavg_end": env_end["loadavg"], "results": results}
    if args.json:
        T.dump_json(record)
        return 0
    print(f"gate overhead: {T.env_line(env)}")
    for rec in results:
        report(rec, device)
    print("\nsummary (gated step / plain torch step of the same network):")
    for rec in results:
        line = f"  {rec['arch']:<9} wall {rec['ratio']:.3f}"
        if device.type == "cpu":
            line += f", cpu {rec['ratio_cpu']:.3f}"
        print(f"{line}  [target <= {rec['target']:.2f}: {T.verdict(rec['ratio'], rec['target'], '<=')} (wall), "
              f"{T.verdict(rec['ratio_cpu'], rec['target'], '<=')} (cpu)]")
    print(f"  (load average at start {' '.join(f'{v:.2f}' for v in env['loadavg'])}, at end "
          f"{' '.join(f'{v:.2f}' for v in env_end['loadavg'])}; shared machine: noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
