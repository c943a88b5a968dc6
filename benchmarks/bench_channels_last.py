"""Channels-last on/off: the training step of a dense and a compacted ResNet-20 in both memory formats.

Backs the rule of ``train.channels_last = "auto"`` (:func:`pruning.runtime.resolve_channels_last`:
on for networks with 2-D convolutions on the CPU).  Four variants, interleaved in one run: the library's
training step (:class:`_steps.LibraryStep`: gated forward/backward, ``C(Θ)/N``, ``E[F]``, audit, both
optimisers) of the dense combined-mode network and of the same network after compaction
(``--fraction`` of every gated layer's units and ``--blocks`` blocks removed, as in
``bench_compaction.py``), each with ``channels_last`` on and off.  Printed: step times, the ratio
on/off per network (wall and CPU time) and whether the measurement agrees with what ``auto`` picks on
this device (target: ratio ``< 1`` wherever ``auto`` turns it on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402
from _steps import ARCHS, LibraryStep  # noqa: E402
from bench_compaction import gated_network  # noqa: E402

from pruning.compaction import prune  # noqa: E402
from pruning.runtime import resolve_channels_last  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet20", choices=("resnet20", "resnet56", "resnet110"))
    p.add_argument("--batch", type=int, default=128, help="mini-batch at 32x32 (default 128)")
    p.add_argument("--fraction", type=float, default=0.5, help="units removed per gated layer (default 0.5)")
    p.add_argument("--blocks", type=int, default=2, help="blocks removed (default 2)")
    p.add_argument("--inner", type=int, default=4, help="steps per variant per round (default 4)")
    p.add_argument("--N", type=int, default=50000, help="training-set size N (default 50000, CIFAR)")
    T.add_common_args(p, threads=1, repeats=7, warmup=1)
    args = p.parse_args(argv)
    device = T.setup(args)
    env = T.environment(device)
    arch = ARCHS[args.arch]
    steps: dict[str, Any] = {}
    nets = {"dense": lambda: gated_network(args.arch, 0.0, 0, 0.1, args.seed)}

    def compact() -> Any:
        m = gated_network(args.arch, args.fraction, args.blocks, 0.1, args.seed)
        prune(m, 0.1)
        return m

    nets["compact"] = compact
    for name, build in nets.items():
        for cl in (True, False):
            steps[f"{name}-{'on' if cl else 'off'}"] = LibraryStep(arch, "combined", args.batch, device, N=args.N,
                                                                 seed=args.seed, channels_last=cl, model=build())
    auto = resolve_channels_last("auto", device, steps["dense-on"].spec)
    t = T.interleaved(steps, repeats=args.repeats, warmup=args.warmup, inner=args.inner, device=device)
    rows = []
    for name in nets:
        w = T.ratio_stats(t.wall[f"{name}-on"], t.wall[f"{name}-off"])
        c = T.ratio_stats(t.cpu[f"{name}-on"], t.cpu[f"{name}-off"])
        rows.append({"network": name, "on_s": T.median(t.wall[f"{name}-on"]), "off_s": T.median(t.wall[f"{name}-off"]),
                     "ratio": w["paired_median"], "ratio_q1": w["paired_q1"], "ratio_q3": w["paired_q3"],
                     "ratio_cpu": c["paired_median"], "layers": steps[f"{name}-on"].spec.depth})
    env_end = T.environment(device)
    record = {"benchmark": "channels_last", "arch": args.arch, "batch": args.batch, "auto": auto, "env": env,
              "loadavg_end": env_end["loadavg"], "rows": rows}
    if args.json:
        T.dump_json(record)
        return 0
    print(f"channels-last: {T.env_line(env)}")
    print(f"\n== {args.arch}, batch {args.batch}, training step (library), {args.repeats} rounds x {args.inner} "
          "steps ==")
    print(f"  {'network':<9}{'layers':>7}{'on':>11}{'off':>11}{'on/off':>8}{'IQR':>14}{'(cpu t)':>9}")
    for r in rows:
        print(f"  {r['network']:<9}{r['layers']:>7}{T.fmt_ms(r['on_s']):>11}{T.fmt_ms(r['off_s']):>11}"
              f"{r['ratio']:>8.3f}{r['ratio_q1']:>7.3f}-{r['ratio_q3']:<6.3f}{r['ratio_cpu']:>9.3f}")
    print(f"  train.channels_last = \"auto\" picks {'on' if auto else 'off'} for this network on {device.type}")
    for r in rows:
        faster = r["ratio"] < 1.0
        print(f"  channels-last {args.arch} {r['network']} on/off {r['ratio']:.3f} (CPU time {r['ratio_cpu']:.3f}): "
              f"{'faster' if faster else 'slower'} on  [auto agrees: {'met' if faster == auto else 'MISSED'}]")
    print(f"  (load average at start {' '.join(f'{v:.2f}' for v in env['loadavg'])}, at end "
          f"{' '.join(f'{v:.2f}' for v in env_end['loadavg'])}; shared machine: noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
