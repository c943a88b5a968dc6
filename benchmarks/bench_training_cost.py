"""Pruning-run wall clock vs a baseline run of the same length, against the cumulative training-FLOPs ratio.

Two runs of the embedded default configuration (:class:`pruning.config.RunConfig`: MNIST-1D,
ResNet-1D, Algorithm 1) with the same ``--set`` overrides and the same number of epochs: one in
``model.mode = "combined"`` (prunes units and blocks while it trains), one in ``model.mode = "none"``
(plain training of the same network, the baseline).  Both run in this process through the
trainer's Python API (:class:`pruning.train.Trainer`), *interleaved epoch by epoch*
(``fit(stop_after=k)``) so that both see the same machine load; each trainer's RNG state is saved
and restored around its epochs, so each run is the run it would be on its own.

Reported: the wall-clock ratio (pruning / baseline) of the training loop (``Progress.train_time_s``:
iterations + pruning, without evaluation and checkpoints; the whole ``fit`` time is printed too),
against the training-cost ratio of the run's report (``training_cost_ratio``: cumulative ``E[F]·|B|``
over the baseline network's cost for the same samples, the paper's Figure 4) and against the ratio of the
FLOPs actually executed (``training_cost_ratio_dense``: the surviving network with every gate 1 — a
gated network computes a unit whether its sample is 0 or 1).  FLOPs come from the one complexity
model.  Per-epoch rows show how the time ratio follows the compaction.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402

from pruning.config import load_config  # noqa: E402
from pruning.runtime import capture_rng, restore_rng  # noqa: E402
from pruning.train import Trainer  # noqa: E402


def make_trainer(mode: str, args: argparse.Namespace, out: Path, device: str) -> Trainer:
    overrides = [
        f"model.mode={mode}", f"train.epochs={args.epochs}", "train.progress=false", "export.enabled=false",
        f"train.device={device}", f"train.threads={args.threads}", f"data.root={str(out / 'data')!r}",
        f"train.seed={args.seed}",
        *(args.set or []),
    ]
    cfg = load_config(args.config, overrides)
    return Trainer(cfg, out / mode)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="TOML configuration (default: the embedded default)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of both runs (default 10; the embedded default configuration has 30)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra configuration override (repeatable)")
    p.add_argument("--out", default=None, help="run directories (default: a temporary directory, removed)")
    T.add_common_args(p, threads=1, repeats=1, warmup=0)
    args = p.parse_args(argv)
    device = T.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = T.environment(device)
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_training_cost_")
        out = Path(tmp.name)
    else:
        out = Path(args.out)
    try:
        trainers: dict[str, Trainer] = {}
        rng: dict[str, dict[str, Any]] = {}
        for mode in ("combined", "none"):
            trainers[mode] = make_trainer(mode, args, out, device.type)
            rng[mode] = capture_rng()
        fit_s = {m: 0.0 for m in trainers}
        reports: dict[str, dict[str, Any]] = {}
        warnings: list[str] = []
        for epoch in range(1, args.epochs + 1):
            order = list(trainers) if epoch % 2 else list(trainers)[::-1]
            for mode in order:
                restore_rng(rng[mode])
                T.sync(device)
                t0 = time.perf_counter()
                try:
                    rep = trainers[mode].fit(stop_after=epoch)
                except Exception as exc:  # noqa: BLE001 - the report writer failed after the last epoch
                    if trainers[mode].progress.epoch < args.epochs:
                        raise
                    rep = None
                    warnings.append(f"{mode}: report not written ({type(exc).__name__}: {exc}); numbers from the log")
                T.sync(device)
                fit_s[mode] += time.perf_counter() - t0
                rng[mode] = capture_rng()
                if rep is not None:
                    reports[mode] = rep
        logs = {m: trainers[m].progress.log for m in trainers}
        train_s = {m: trainers[m].progress.train_time_s for m in trainers}
    finally:
        if tmp is not None:
            tmp.cleanup()

    # the report's training_cost_ratio(_dense) are read off the last log record; use the log itself so that
    # the numbers do not depend on the report writer
    last = {m: logs[m][-1] for m in logs}
    wall_ratio = train_s["combined"] / train_s["none"]
    fit_ratio = fit_s["combined"] / fit_s["none"]
    cost_ratio = last["combined"]["cum_train_flops"] / last["none"]["cum_train_flops"]
    dense_ratio = last["combined"]["cum_train_flops_dense"] / last["none"]["cum_train_flops_dense"]
    epochs = []
    prev_c = prev_b = 0.0
    for rc, rb in zip(logs["combined"], logs["none"]):
        dc, db = rc["cum_train_flops"] - prev_c, rb["cum_train_flops"] - prev_b
        prev_c, prev_b = rc["cum_train_flops"], rb["cum_train_flops"]
        epochs.append({"epoch": rc["epoch"], "time_ratio": rc["epoch_time_s"] / rb["epoch_time_s"],
                       "flops_ratio": dc / db if db else float("nan"), "units": rc["units"], "layers": rc["layers"],
                       "fPR": rc["fPR"], "test_acc": rc["test_acc"], "baseline_test_acc": rb["test_acc"]})
    env_end = T.environment(device)
    record = {
        "benchmark": "training_cost", "env": env, "loadavg_end": env_end["loadavg"], "epochs": args.epochs,
        "overrides": args.set or [], "config": args.config,
        "train_time_s": train_s, "fit_time_s": fit_s,
        "wall_clock_ratio": wall_ratio, "fit_wall_clock_ratio": fit_ratio,
        "training_cost_ratio": cost_ratio,
        "train_cost_ratio_log": {m: last[m]["train_cost_ratio"] for m in last},
        "report_training_cost_ratio": {m: r.get("training_cost_ratio") for m, r in reports.items()},
        "executed_flops_ratio": dense_ratio,
        "wall_over_flops": wall_ratio / cost_ratio, "wall_over_executed_flops": wall_ratio / dense_ratio,
        "final": {m: {k: last[m][k] for k in ("test_acc", "fPR", "pPR", "layers", "blocks_alive", "units",
                                              "prune_events")} for m in last},
        "warnings": warnings,
        "per_epoch": epochs,
    }
    if args.json:
        T.dump_json(record)
        return 0
    print(f"training cost: {T.env_line(env)}")
    print(f"  {args.epochs} epochs of the {'embedded default' if args.config is None else args.config} "
          f"configuration{' with ' + ' '.join(args.set) if args.set else ''}, combined vs none, interleaved by epoch")
    print(f"  {'epoch':>5}{'units':>7}{'layers':>7}{'fPR':>7}{'FLOPs ratio':>13}{'time ratio':>12}"
          f"{'acc prune':>11}{'acc base':>10}")
    for e in epochs:
        print(f"  {e['epoch']:>5}{e['units']:>7}{e['layers']:>7}{e['fPR'] * 100:>6.1f}%{e['flops_ratio']:>13.3f}"
              f"{e['time_ratio']:>12.3f}{e['test_acc'] * 100:>10.2f}%{e['baseline_test_acc'] * 100:>9.2f}%")
    print(f"  training loop wall clock: pruning {train_s['combined']:.1f} s, baseline {train_s['none']:.1f} s "
          f"(whole fit incl. evaluation/checkpoints: {fit_s['combined']:.1f} s vs {fit_s['none']:.1f} s, "
          f"ratio {fit_ratio:.3f})")
    for w in warnings:
        print(f"  warning: {w}")
    print(f"  wall-clock ratio (pruning/baseline): {wall_ratio:.3f}")
    print(f"  training-cost ratio (cumulative E[F] FLOPs, report): {cost_ratio:.3f}   "
          f"executed-FLOPs ratio (surviving network, gates 1): {dense_ratio:.3f}")
    print(f"  wall-clock ratio / training-cost ratio: {wall_ratio / cost_ratio:.3f}   "
          f"wall-clock ratio / executed-FLOPs ratio: {wall_ratio / dense_ratio:.3f}   "
          f"(1.0 = time saved in proportion to FLOPs; load average at end "
          f"{' '.join(f'{v:.2f}' for v in env_end['loadavg'])}; shared machine: noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
