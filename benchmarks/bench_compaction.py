"""Compaction: a compacted network trains as fast as plain torch at the same widths; its speed-up vs FLOPs.

For each architecture a combined-mode network is built and its gates are set by hand: in every
unit-gated layer a fraction ``f`` of the units gets ``θ < ε`` (the rest ``θ ∈ [ε, 1]``), and
``--blocks`` randomly chosen blocks get ``θ_B < ε``.  :func:`pruning.compaction.prune` removes those
units and blocks physically, :func:`pruning.export.export_deterministic` folds the surviving ``θ``
into the weights; the dense baseline is the same network exported without pruning.  All variants
(dense and one compact network per fraction) are timed interleaved in one run: eval mode,
``torch.inference_mode()``, one batch of ``--batch`` inputs.

**Library vs plain at the same widths (target ``<= 1.03``).**  Per fraction, one training step of
the compacted gated network through the library (:class:`_steps.LibraryStep`: what the trainer runs
after a compaction — surviving gates sampled, ``C(Θ)/N``, ``E[F]``, audit, both optimisers, Π_H) is
timed against a hand-written plain torch network built at the same (pruned) widths
(:func:`_plain.plain_network` of the compacted spec, ``torch.optim.SGD`` with ``weight_decay``),
interleaved, ``--train-batch`` inputs, ``--train-threads`` threads.  This is the physical limit of the
kernels: narrow convolutions do not get cheaper in proportion to their FLOPs (which is why the
older target "speed-up ≥ 0.8 × FLOPs ratio" measured the kernels, not the library).

**Reported (no target): inference speed-up and FLOPs ratio.**  Printed per fraction: the FLOPs ratio
``F_dense / F_compact`` from the one complexity model (:class:`theory.complexity.ComplexityModel`,
conv + linear multiply-accumulates), the achieved inference speed-up ``t_dense / t_compact`` (exported
networks, ``--threads`` threads) and the efficiency ``speed-up / FLOPs ratio``.

``--channels-last auto`` (default) applies ``train.channels_last = "auto"``'s rule to every network.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402
from _steps import ARCHS, LibraryStep, plain_step  # noqa: E402

from pruning.compaction import prune  # noqa: E402
from pruning.export import export_deterministic  # noqa: E402
from pruning.models import GatedNetwork, WeightLayer, build_model  # noqa: E402
from pruning.runtime import resolve_channels_last  # noqa: E402
from theory.complexity import ComplexityModel  # noqa: E402

TARGET = 1.03  # compacted library step / plain torch step at the same widths
INPUT = {"resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "resnet110": (3, 32, 32), "resnet1d": (1, 40)}


def gated_network(arch: str, fraction: float, n_blocks: int, eps: float, seed: int) -> GatedNetwork:
    """A combined-mode ``arch`` whose gates mark ``fraction`` of every gated layer's units and ``n_blocks``
    blocks for removal (``θ < ε``); every other gate is drawn from ``[ε, 1]``."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"length": 40, "in_channels": 1} if arch == "resnet1d" else {}
    model = build_model(arch, mode="combined", num_classes=10, **kwargs)
    return mark_for_pruning(model, fraction, n_blocks, eps, seed)


def mark_for_pruning(model: GatedNetwork, fraction: float, n_blocks: int, eps: float, seed: int) -> GatedNetwork:
    """Set the gates of ``model`` in place: ``fraction`` of every gated layer's units and ``n_blocks`` random
    blocks get ``θ < ε``, every other gate ``θ ∈ [ε, 1]`` (seeded); returns ``model``."""
    g = torch.Generator().manual_seed(seed + 1)
    blocks = model.block_list()
    dead = set(torch.randperm(len(blocks), generator=g)[:n_blocks].tolist())
    with torch.no_grad():
        for l, block in enumerate(blocks):
            for gate in block.unit_gates():
                if gate is None:
                    continue
                n = gate.n
                theta = eps + (1.0 - eps) * torch.rand(n, generator=g)
                k = min(int(round(fraction * n)), n - 1)
                idx = torch.randperm(n, generator=g)[:k]
                theta[idx] = 0.9 * eps * torch.rand(k, generator=g)
                gate.theta.copy_(theta)
            if block.block_gate is not None:
                keep_B = float(eps + (1 - eps) * torch.rand(1, generator=g))
                block.block_gate.theta.fill_(0.5 * eps if l in dead else keep_B)
    return model


def fuse_bn(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it (exact in eval mode): the export-time
    fix proposed for ``pruning/export.py``.  Applied to dense and compact networks alike."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for layer in net.modules():
        if isinstance(layer, WeightLayer) and layer.bn is not None and isinstance(layer.op, (nn.Conv1d, nn.Conv2d)):
            layer.op = fuse_conv_bn_eval(layer.op, layer.bn)
            layer.bn = None
    return net


def flops(net: nn.Module, elementwise: bool = False) -> float:
    return float(ComplexityModel(net.spec(), elementwise=elementwise).flops())  # type: ignore[operator]


def params(net: nn.Module) -> float:
    return float(ComplexityModel(net.spec()).params())  # type: ignore[operator]


def _op_class(key: str) -> str:
    if "conv" in key:
        return "conv"
    if key in ("aten::addmm", "aten::mm", "aten::linear"):
        return "linear"
    return "other"


def profile_split(nets: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Median self CPU seconds per forward by operator class (conv / linear / other), torch.profiler,
    one forward per variant per round, variants interleaved like the timing itself."""
    from torch.profiler import profile

    per: dict[str, dict[str, list[float]]] = {k: {"conv": [], "linear": [], "other": []} for k in nets}
    with torch.inference_mode():
        for r in range(rounds):
            for name in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
                with profile() as prof:
                    nets[name](x)
                acc = {"conv": 0.0, "linear": 0.0, "other": 0.0}
                for e in prof.key_averages():
                    if e.key.startswith("aten::"):
                        acc[_op_class(e.key)] += e.self_cpu_time_total / 1e6
                for k, v in acc.items():
                    per[name][k].append(v)
    return {name: {k: T.median(v) for k, v in d.items()} for name, d in per.items()}


def run_train(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Training step of each compacted gated network vs plain torch at the same widths (interleaved)."""
    if args.train_threads:
        torch.set_num_threads(args.train_threads)
    steps: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for f in args.fractions:
        model = gated_network(arch, f, args.blocks, args.eps, args.seed)
        prune(model, args.eps)
        spec = model.spec()
        cl = resolve_channels_last(args.channels_last if args.channels_last == "auto" else args.channels_last == "on",
                                   device, spec)
        tag = f"{int(round(f * 100))}%"
        kw: dict[str, Any] = {"N": args.N, "seed": args.seed, "channels_last": cl}
        steps[f"library-{tag}"] = LibraryStep(ARCHS[arch], "combined", args.train_batch, device, model=model, **kw)
        steps[f"torch-{tag}"] = plain_step(spec, ARCHS[arch], args.train_batch, device, **kw)
        info[tag] = {"flops_ratio": flops(gated_network(arch, 0.0, 0, args.eps, args.seed)) / flops(model),
                     "layers": spec.depth, "channels_last": cl}
    t = T.interleaved(steps, repeats=args.train_repeats, warmup=1, inner=args.train_inner, device=device)
    rows = []
    for tag, d in info.items():
        r = T.ratio_stats(t.wall[f"library-{tag}"], t.wall[f"torch-{tag}"])
        c = T.ratio_stats(t.cpu[f"library-{tag}"], t.cpu[f"torch-{tag}"])
        rows.append({"variant": f"compact-{tag}", **d, "ratio": r["paired_median"], "ratio_q1": r["paired_q1"],
                     "ratio_q3": r["paired_q3"], "ratio_cpu": c["paired_median"],
                     "library_step_s": T.median(t.wall[f"library-{tag}"]),
                     "torch_step_s": T.median(t.wall[f"torch-{tag}"])})
    if args.threads:
        torch.set_num_threads(args.threads)
    return {"arch": arch, "batch": args.train_batch, "threads": args.train_threads or torch.get_num_threads(),
            "repeats": args.train_repeats, "inner": args.train_inner, "cpu_clock": t.cpu_clock, "rows": rows}


def report_train(rec: dict[str, Any], cpu: bool) -> None:
    print(f"\n== {rec['arch']}: training step, compacted library network / plain torch at the same widths "
          f"(batch {rec['batch']}, {rec['threads']} thread(s), {rec['repeats']} rounds x {rec['inner']}) ==")
    print(f"  {'variant':<14}{'FLOPs ratio':>12}{'layers':>8}{'ch-last':>8}{'library':>11}{'torch':>11}"
          f"{'ratio':>8}{'IQR':>14}{'(cpu t)':>9}")
    for r in rec["rows"]:
        print(f"  {r['variant']:<14}{r['flops_ratio']:>12.2f}{r['layers']:>8}{'on' if r['channels_last'] else 'off':>8}"
              f"{T.fmt_ms(r['library_step_s']):>11}{T.fmt_ms(r['torch_step_s']):>11}{r['ratio']:>8.3f}"
              f"{r['ratio_q1']:>7.3f}-{r['ratio_q3']:<6.3f}{r['ratio_cpu']:>9.3f}")
    for r in rec["rows"]:
        line = (f"  library vs plain {rec['arch']} {r['variant']} (step time ratio, wall): {r['ratio']:.3f}  "
                f"[target <= {TARGET}: {T.verdict(r['ratio'], TARGET, '<=')}]")
        if cpu:
            line += f"; CPU time {r['ratio_cpu']:.3f} [{T.verdict(r['ratio_cpu'], TARGET, '<=')}]"
        print(line)


def run_arch(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    eps = args.eps
    nets: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    dense_src = gated_network(arch, 0.0, 0, eps, args.seed)
    nets["dense"] = export_deterministic(dense_src).to(device)
    for f in args.fractions:
        model = gated_network(arch, f, args.blocks, eps, args.seed)
        compact = copy.deepcopy(model)
        event = prune(compact, eps)
        name = f"compact-{int(round(f * 100))}%"
        nets[name] = export_deterministic(compact).to(device)
        info[name] = {"fraction": f, "units_removed": event.num_units, "blocks_removed": event.num_blocks,
                      "layers": compact.spec().depth}
    f_dense, p_dense = flops(nets["dense"]), params(nets["dense"])
    fe_dense = flops(nets["dense"], elementwise=True)
    counts = {k: (flops(v), flops(v, elementwise=True), params(v)) for k, v in nets.items()}
    if args.fuse_bn:
        nets = {k: fuse_bn(v) for k, v in nets.items()}
    cl = resolve_channels_last(args.channels_last if args.channels_last == "auto" else args.channels_last == "on",
                               device, nets["dense"].spec())  # type: ignore[operator]
    if cl:
        for n in nets.values():
            n.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, *INPUT[arch], device=device)
    if cl and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)

    def runner(net: nn.Module) -> Any:
        def call() -> None:
            with torch.inference_mode():
                net(x)
        return call

    t = T.interleaved({k: runner(v) for k, v in nets.items()}, repeats=args.repeats, warmup=args.warmup,
                      inner=args.inner, device=device)
    rows = []
    for name in nets:
        if name == "dense":
            continue
        sp = T.ratio_stats(t.wall["dense"], t.wall[name])
        f_c, fe_c, p_c = counts[name]
        fr = f_dense / f_c
        speedup = sp["paired_median"]
        rows.append({
            "variant": name, **info[name],
            "flops": f_c, "flops_ratio": fr,
            "flops_ratio_elementwise": fe_dense / fe_c,
            "params_ratio": p_dense / p_c,
            "speedup": speedup, "speedup_q1": sp["paired_q1"], "speedup_q3": sp["paired_q3"],
            "speedup_cpu_time": T.ratio_stats(t.cpu["dense"], t.cpu[name])["paired_median"],
            "efficiency": speedup / fr,
            "median_s": T.median(t.wall[name]),
        })
    if args.profile:
        split = profile_split(nets, x, max(3, args.repeats // 2))
        for r in rows:
            d, c = split["dense"], split[r["variant"]]
            r["profile_s"] = c
            r["conv_speedup"] = d["conv"] / c["conv"] if c["conv"] else float("nan")
            r["other_share"] = c["other"] / max(sum(c.values()), 1e-12)
        for r in rows:
            r["dense_other_share"] = split["dense"]["other"] / max(sum(split["dense"].values()), 1e-12)
    return {"arch": arch, "batch": args.batch, "eps": eps, "blocks": args.blocks, "dense_flops": f_dense,
            "fuse_bn": args.fuse_bn, "channels_last": cl,
            "dense_median_s": T.median(t.wall["dense"]), "cpu_clock": t.cpu_clock, "rows": rows}


def report(rec: dict[str, Any]) -> None:
    extra = "".join(f", {k.replace('_', '-')}" for k in ("fuse_bn", "channels_last") if rec[k])
    print(f"\n== {rec['arch']}{extra}, batch {rec['batch']}, {rec['blocks']} block(s) pruned per variant "
          f"(dense: {rec['dense_flops'] / 1e6:.1f} MMAC/sample, {T.fmt_ms(rec['dense_median_s'])}/batch) ==")
    print(f"  {'variant':<14}{'units-':>7}{'blocks-':>8}{'FLOPs ratio':>12}{'(elem.)':>9}{'params':>8}"
          f"{'speed-up':>10}{'IQR':>14}{'(cpu t)':>9}{'effic.':>8}")
    for r in rec["rows"]:
        print(f"  {r['variant']:<14}{r['units_removed']:>7}{r['blocks_removed']:>8}{r['flops_ratio']:>12.2f}"
              f"{r['flops_ratio_elementwise']:>9.2f}{r['params_ratio']:>8.2f}{r['speedup']:>10.2f}"
              f"{r['speedup_q1']:>7.2f}-{r['speedup_q3']:<6.2f}{r['speedup_cpu_time']:>9.2f}{r['efficiency']:>8.2f}")
    if rec["rows"] and "conv_speedup" in rec["rows"][0]:
        print(f"  torch.profiler (self CPU time by operator class; dense: non-conv share "
              f"{rec['rows'][0]['dense_other_share'] * 100:.0f}%):")
        for r in rec["rows"]:
            print(f"    {r['variant']:<14} conv-only speed-up {r['conv_speedup']:.2f} vs FLOPs ratio "
                  f"{r['flops_ratio']:.2f}; non-conv ops (BN, ReLU, add, pad, pool) {r['other_share'] * 100:.0f}% "
                  f"of the compact forward")
    for r in rec["rows"]:
        print(f"  inference {rec['arch']} {r['variant']}: speed-up {r['speedup']:.2f} at FLOPs ratio "
              f"{r['flops_ratio']:.2f} (efficiency {r['efficiency']:.3f}; reported, no target)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["resnet20"], choices=sorted(INPUT))
    p.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7],
                   help="fraction of units per gated layer with θ < ε (default 0.3 0.5 0.7)")
    p.add_argument("--blocks", type=int, default=2, help="blocks with θ_B < ε in each compact variant (default 2)")
    p.add_argument("--eps", type=float, default=0.1, help="pruning threshold ε (default 0.1)")
    p.add_argument("--batch", type=int, default=256, help="inference batch (default 256)")
    p.add_argument("--inner", type=int, default=1, help="forward passes per variant per round (default 1)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory format (default auto: train.channels_last's rule, on for 2-D nets on CPU)")
    p.add_argument("--train-batch", type=int, default=128, help="training-step batch (default 128)")
    p.add_argument("--train-threads", type=int, default=1, help="threads of the training-step section (default 1)")
    p.add_argument("--train-repeats", type=int, default=7, help="rounds of the training-step section (default 7)")
    p.add_argument("--train-inner", type=int, default=4,
                   help="steps per variant per round (default 4 = train.audit_every)")
    p.add_argument("--N", type=int, default=50000, help="training-set size N of J = L/N (default 50000, CIFAR)")
    p.add_argument("--skip-inference", action="store_true", help="only the training-step section")
    p.add_argument("--skip-train", action="store_true", help="only the inference section")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold eval BatchNorm into the convolutions of every exported network (proposed export fix)")
    p.add_argument("--profile", action="store_true",
                   help="add a torch.profiler split of the forward time: conv vs other operators")
    T.add_common_args(p, threads=2, repeats=7, warmup=2)
    args = p.parse_args(argv)
    if not all(0.0 <= f < 1.0 for f in args.fractions):
        p.error("--fractions must lie in [0, 1)")
    device = T.setup(args)
    env = T.environment(device)
    train = [] if args.skip_train else [run_train(a, args, device) for a in args.arch]
    results = [] if args.skip_inference else [run_arch(a, args, device) for a in args.arch]
    env_end = T.environment(device)
    record = {"benchmark": "compaction", "target": f"compacted library step / plain torch step <= {TARGET}",
              "env": env, "loadavg_end": env_end["loadavg"], "train": train, "results": results}
    if args.json:
        T.dump_json(record)
        return 0
    print(f"compaction: {T.env_line(env)}")
    for rec in train:
        report_train(rec, device.type == "cpu")
    for rec in results:
        report(rec)
    if train:
        worst = max(r["ratio"] for rec in train for r in rec["rows"])
        worst_cpu = max(r["ratio_cpu"] for rec in train for r in rec["rows"])
        print(f"\nworst library / plain-torch step ratio at the same widths: wall {worst:.3f} "
              f"[target <= {TARGET}: {T.verdict(worst, TARGET, '<=')}], CPU time {worst_cpu:.3f} "
              f"[{T.verdict(worst_cpu, TARGET, '<=')}]")
    print(f"(load average at start {' '.join(f'{v:.2f}' for v in env['loadavg'])}, at end "
          f"{' '.join(f'{v:.2f}' for v in env_end['loadavg'])}; shared machine: noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
