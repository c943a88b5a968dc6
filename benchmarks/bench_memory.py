"""Peak memory of one training step before and after compaction, against the reductions the spec predicts.

A combined-mode network gets its gates set as in ``bench_compaction.py`` (``--fraction`` of every
gated layer's units and ``--blocks`` blocks with ``θ < ε``).  The *before* network trains as it
is; the *after* network is the same one after :func:`pruning.compaction.prune` (optimiser states
carried).  Each runs the trainer's step (``bench_gate_overhead.Step``: forward, ``J``, ``E[F]``,
backward, SGD on ``W``, Adam + Π_H on ``Θ``) a few times first, so that the optimiser states
exist; then one step is measured:

* **resident** — bytes of every tensor alive between steps: parameters, buffers, optimiser states,
  the mini-batch (counted by storage, each once; gradients are dropped before the measured step);
* **transient peak** — the highest amount allocated *during* the step above what was allocated at
  its start (activations saved for backward, gradients, temporaries).  On CPU from the allocation
  events of :mod:`torch.profiler` (``profile_memory=True``: every allocation and free, replayed in
  time order); on CUDA from ``torch.cuda.max_memory_allocated``;
* **peak** = resident + transient peak;
* on Linux also the rise of the process's peak RSS during the step (``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``), a coarse cross-check (the C allocator keeps freed memory).

Compared with the parameter ratio (:meth:`theory.complexity.ComplexityModel.params`) and the
activation ratio of the spec (elements of every conv/linear, BatchNorm and activation output and of
every block sum, per sample).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402
from bench_compaction import mark_for_pruning  # noqa: E402
from bench_gate_overhead import ARCHS, Step  # noqa: E402

from pruning.compaction import prune  # noqa: E402
from theory.complexity import ComplexityModel  # noqa: E402
from theory.spec import NetworkSpec  # noqa: E402

MiB = 1024.0**2


# --------------------------------------------------------------------------------------------------
# What the spec predicts
# --------------------------------------------------------------------------------------------------


def activation_elements(spec: NetworkSpec) -> int:
    """Per-sample elements of every layer output (conv/linear, BN, activation) and every block sum."""
    total = 0
    layers = list(spec.stem) + list(spec.head)
    for block in spec.blocks:
        layers += list(block.path)
        if block.shortcut_layer is not None:
            layers.append(block.shortcut_layer)
        total += block.out_width * block.positions * (1 + int(block.out_act))
    for layer in layers:
        total += layer.out_width * layer.positions * (1 + int(layer.bn) + int(layer.act))
    return total


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def resident_bytes(step: Step, *, batch: bool = True) -> int:
    """Bytes of the storages alive between steps: parameters (+ grads), buffers, optimiser states, batch."""
    tensors: list[torch.Tensor] = []
    model = step.model
    for p in model.parameters():
        tensors.append(p)
        if p.grad is not None:
            tensors.append(p.grad)
    tensors += list(model.buffers())
    for opt in (step.opt_w, step.opt_t):
        if opt is None:
            continue
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
    if batch:
        tensors += [step.x, step.y]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def transient_peak_profiler(step: Step, device: torch.device) -> int:
    """Highest net allocation during one step, replaying torch.profiler's allocation events in time order."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        step()
    want = "CUDA" if device.type == "cuda" else "CPU"
    events = []
    for e in prof.profiler.kineto_results.events():  # type: ignore[union-attr]
        if e.name() == "[memory]" and str(e.device_type()).endswith(want):
            events.append((e.start_ns(), e.nbytes()))
    events.sort()
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def transient_peak_cuda(step: Step, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_rise(step: Step) -> int | None:
    """Rise of the peak RSS during one step (bytes), or ``None`` where ``/proc`` cannot reset it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    step()
    hwm = _status_kb("VmHWM")
    if before is None or hwm is None:
        return None
    return max(hwm - before, 0) * 1024


def _no_grads(step: Step) -> Step:
    """Drop the gradients left by the previous step (the step itself drops them before backward), so that
    every gradient is counted once, as a transient allocation of the measured step."""
    step.opt_w.zero_grad(set_to_none=True)
    if step.opt_t is not None:
        step.opt_t.zero_grad(set_to_none=True)
    return step


def measure(step: Step, device: torch.device, rounds: int) -> dict[str, Any]:
    resident = resident_bytes(_no_grads(step))
    resident_model = resident_bytes(step, batch=False)
    if device.type == "cuda":
        transients = [transient_peak_cuda(_no_grads(step), device) for _ in range(rounds)]
        method = "torch.cuda.max_memory_allocated"
    else:
        transients = [transient_peak_profiler(_no_grads(step), device) for _ in range(rounds)]
        method = "torch.profiler allocation events"
    rss = [rss_rise(_no_grads(step)) for _ in range(rounds)] if device.type == "cpu" else []
    rss_vals = [r for r in rss if r is not None]
    transient = int(T.median(transients))
    return {"resident": resident, "resident_model": resident_model, "transient": transient,
            "peak": resident + transient, "method": method,
            "rss_rise": int(T.median(rss_vals)) if rss_vals else None}


def run_arch(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    arch = ARCHS[name]
    steps = {}
    for which in ("before", "after"):
        step = Step(arch, "combined", batch, device, N=args.N, seed=args.seed)
        mark_for_pruning(step.model, args.fraction, args.blocks, args.eps, args.seed)
        if which == "after":
            opts = [o for o in (step.opt_w, step.opt_t) if o is not None]
            event = prune(step.model, args.eps, opts)
            step.spec = step.model.spec()
        for _ in range(args.warmup):
            step()
        steps[which] = step
    meas = {k: measure(s, device, args.repeats) for k, s in steps.items()}
    specs = {k: s.spec for k, s in steps.items()}
    params = {k: float(ComplexityModel(sp).params()) for k, sp in specs.items()}  # type: ignore[operator]
    acts = {k: activation_elements(sp) for k, sp in specs.items()}
    b, a = meas["before"], meas["after"]
    return {
        "arch": name, "batch": batch, "fraction": args.fraction, "blocks": args.blocks,
        "units_removed": event.num_units, "blocks_removed": event.num_blocks,
        "measured": meas,
        "peak_ratio": b["peak"] / a["peak"],
        "transient_ratio": b["transient"] / a["transient"] if a["transient"] else float("nan"),
        "resident_ratio": b["resident"] / a["resident"],
        "resident_model_ratio": b["resident_model"] / a["resident_model"],
        "rss_ratio": (b["rss_rise"] / a["rss_rise"]) if (b["rss_rise"] and a["rss_rise"]) else None,
        "expected_params_ratio": params["before"] / params["after"],
        "expected_activation_ratio": acts["before"] / acts["after"],
        "spec_params": params, "spec_activation_elements_per_sample": acts,
    }


def report(rec: dict[str, Any]) -> None:
    m = rec["measured"]
    print(f"\n== {rec['arch']}, batch {rec['batch']}: {rec['fraction'] * 100:.0f}% of units per gated layer and "
          f"{rec['blocks']} block(s) marked; prune removed {rec['units_removed']} units, {rec['blocks_removed']} "
          f"block(s) ==")
    print(f"  {'':<26}{'before':>12}{'after':>12}{'ratio':>9}   expected from the spec")
    print(f"  {'resident (W, opt, batch)':<26}{m['before']['resident'] / MiB:>9.2f}MiB"
          f"{m['after']['resident'] / MiB:>9.2f}MiB{rec['resident_ratio']:>9.2f}")
    print(f"  {'  of which model + opt':<26}{m['before']['resident_model'] / MiB:>9.2f}MiB"
          f"{m['after']['resident_model'] / MiB:>9.2f}MiB{rec['resident_model_ratio']:>9.2f}   params ratio "
          f"{rec['expected_params_ratio']:.2f}")
    print(f"  {'transient peak (step)':<26}{m['before']['transient'] / MiB:>9.2f}MiB"
          f"{m['after']['transient'] / MiB:>9.2f}MiB{rec['transient_ratio']:>9.2f}   activation ratio "
          f"{rec['expected_activation_ratio']:.2f}")
    print(f"  {'peak':<26}{m['before']['peak'] / MiB:>9.2f}MiB{m['after']['peak'] / MiB:>9.2f}MiB"
          f"{rec['peak_ratio']:>9.2f}")
    if rec["rss_ratio"] is not None:
        print(f"  {'peak-RSS rise (coarse)':<26}{m['before']['rss_rise'] / MiB:>9.2f}MiB"
              f"{m['after']['rss_rise'] / MiB:>9.2f}MiB{rec['rss_ratio']:>9.2f}")
    print(f"  peak memory ratio (before/after compaction): {rec['peak_ratio']:.2f}  [transient "
          f"{rec['transient_ratio']:.2f} vs activation ratio {rec['expected_activation_ratio']:.2f}; resident "
          f"model+optimiser {rec['resident_model_ratio']:.2f} vs params ratio {rec['expected_params_ratio']:.2f}; "
          f"method: {m['before']['method']}]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["resnet20", "resnet1d"], choices=sorted(ARCHS))
    p.add_argument("--batch-cifar", type=int, default=64, help="mini-batch of resnet20 at 32x32 (default 64)")
    p.add_argument("--batch-1d", type=int, default=128, help="mini-batch of resnet1d at length 40 (default 128)")
    p.add_argument("--fraction", type=float, default=0.5, help="fraction of units per gated layer with θ < ε")
    p.add_argument("--blocks", type=int, default=2, help="blocks with θ_B < ε (default 2)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--N", type=int, default=4000, help="training-set size N of J = L/N (default 4000)")
    T.add_common_args(p, threads=1, repeats=3, warmup=2)
    args = p.parse_args(argv)
    device = T.setup(args)
    env = T.environment(device)
    results = []
    for name in args.arch:
        batch = args.batch_cifar if name == "resnet20" else args.batch_1d
        results.append(run_arch(name, batch, args, device))
    record = {"benchmark": "memory", "env": env, "results": results}
    if args.json:
        T.dump_json(record)
        return 0
    print(f"training-step memory: {T.env_line(env)}")
    for rec in results:
        report(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
