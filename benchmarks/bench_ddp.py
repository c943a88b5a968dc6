"""Data-parallel scaling: training samples per second of N processes against 1 process, one invocation.

Target: **≥ 1.6** for 2 processes × 1 thread against 1 process × 1 thread on CPU (a 2-core machine);
on a GPU machine, N GPUs against 1.

``python benchmarks/bench_ddp.py`` starts itself once under ``torchrun --standalone
--nproc_per_node=N`` (default 2).  In that one job every process builds a data-parallel
:class:`pruning.train.Trainer` (DDP, its part of every global batch) and rank 0 also builds a
single-process trainer of the same configuration (the whole global batch).  The two variants then
alternate, interleaved (order reversed every round), each timing one training epoch
(:meth:`Trainer.train_epoch`: gate sampling, forward, objective, backward with the gradient
all-reduce, both optimisers, the ε-rule in lock-step, the per-step stop-flag exchange); while the
single process trains, the other processes wait in a barrier (idle, not spinning).  Samples per
second = global batch × iterations / wall time; the ratio is reported per round (paired) and as the
ratio of medians.  A CPU-time view is printed beside it (1-process CPU seconds over the busiest DDP
process's CPU seconds, all threads): on a machine shared with other jobs the processes do not get
a core each, and that view shows what the implementation would give if they did.
``--find-unused`` adds a third variant with ``find_unused_parameters=True`` to show what that
setting would cost (it is not needed: every parameter gets a gradient every step).

Workloads (``--workload``; ``--config``/``--set`` then adjust it as for ``python -m pruning train``):

* ``cifar-resnet20`` (default) — ``experiments/configs/cifar10_resnet56.toml`` with ResNet-20, global
  batch 64, float32 (no bf16/channels-last on CPU), on CIFAR-10-format files of random images written
  to a temporary folder (the layout ``pruning.data`` reads; timing does not depend on the pixels):
  the compute-per-sample balance of the full-scale runs this is for;
* ``default`` — the embedded default configuration (MNIST-1D, ResNet-1D, global batch 128): a tiny
  network whose fixed per-step work (optimisers, θ, complexity bookkeeping, small-batch convolution
  overhead) is a large share of a step, so halving the batch per process cannot halve the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.6
REPO = Path(__file__).resolve().parents[1]
WORKLOADS: dict[str, tuple[str | None, list[str]]] = {
    "cifar-resnet20": (str(REPO / "experiments" / "configs" / "cifar10_resnet56.toml"), [
        "model.arch=resnet20", "train.batch_size=64", "train.amp_bf16=false", "train.channels_last=false",
        "data.options={normalize = true, augment = true}"]),
    "default": (None, []),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel variant (default 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="cpu (gloo, 1 thread per process; default) or cuda (NCCL, one GPU per process)")
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="cifar-resnet20",
                   help="what to train (default cifar-resnet20; see the module doc)")
    p.add_argument("--config", help="TOML configuration replacing the workload's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="configuration override")
    p.add_argument("--steps", type=int, default=8, help="iterations per timed epoch (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--find-unused", action="store_true",
                   help="also time DDP with find_unused_parameters=True (a third variant)")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the job is stopped (default 1800)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the torchrun side: folder for data and runs
    return p


def launch(args: argparse.Namespace) -> int:
    """Start this script under torchrun (one job) and relay rank 0's report."""
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", tmp, *sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            return proc.returncode
        result = Path(tmp) / "result.json"
        record = json.loads(result.read_text())
    if args.json:
        from _timing import dump_json

        dump_json(record)
    else:
        print(render(record))
    return 0


def render(r: dict[str, Any]) -> str:
    from _timing import env_line

    n = r["nproc"]
    lines = [
        f"bench_ddp: {r['arch']} on {r['data']} ({r['mode']} mode), global batch {r['batch']}, "
        f"{r['steps']} iterations per timed epoch, {r['rounds']} interleaved rounds",
        env_line(r["env"]),
    ]
    for name, sps in r["samples_per_s"].items():
        lines.append(f"  {name:<34} {sorted(sps)[len(sps) // 2]:9.1f} samples/s  (rounds: "
                     f"{', '.join(f'{v:.1f}' for v in sps)})")
    s = r["scaling"]
    lines.append(f"scaling {n} vs 1 processes: paired median {s['paired_median']:.3f} (IQR {s['paired_q1']:.3f}–"
                 f"{s['paired_q3']:.3f}), ratio of medians {s['ratio_of_medians']:.3f} "
                 f"[target ≥ {TARGET}: {r['verdict']}]  (ideal {n}.0)")
    c = r["cpu_scaling"]
    lines.append(f"CPU-time view (1-process CPU s / busiest DDP process's CPU s per epoch): paired median "
                 f"{c['paired_median']:.3f} — the scaling if every process had a core of its own and waiting "
                 f"for the others cost nothing; wall-clock is the headline")
    if "find_unused" in r:
        f = r["find_unused"]
        fc = r["find_unused_cpu"]
        lines.append(f"find_unused_parameters=True / False (both {n} processes): throughput paired median "
                     f"{f['paired_median']:.3f}, CPU-time view {fc['paired_median']:.3f} "
                     f"(not needed: every parameter gets a gradient every step)")
    lines.append(f"load average before/after: {' '.join(f'{v:.2f}' for v in r['env']['loadavg'])} / "
                 f"{' '.join(f'{v:.2f}' for v in r['loadavg_after'])}")
    return "\n".join(lines)


def worker(args: argparse.Namespace) -> None:
    import functools

    import torch
    from _timing import environment, ratio_stats, verdict

    import pruning.train as tr
    from pruning.config import load_config
    from pruning.distributed import DistContext, init_distributed, wrap_ddp

    root = Path(args.worker)
    ctx = init_distributed(args.device)
    config, workload = WORKLOADS[args.workload]
    config = args.config or config
    overrides = [*workload, f"data.root=\"{root / 'data'}\"", "train.progress=false", "train.tensorboard=false",
                 f"train.device=\"{args.device}\"", "train.threads=1", "export.enabled=false", *args.set]
    cfg = load_config(config, overrides)
    batch = cfg.train.batch_size
    cfg = load_config(config, [*overrides, f"data.train_subset={batch * args.steps}",
                               f"train.epochs={args.rounds + 1}"])
    if ctx.rank == 0:  # the data are written (CIFAR-format files) or cached (MNIST-1D) once
        if cfg.data.name == "cifar10":
            sys.path.insert(0, str(REPO / "tests"))
            from fakedata import write_cifar10

            write_cifar10(root / "data", n_per_batch=-(-batch * args.steps // 5), n_test=16)
        tr.Trainer(cfg, root / "warm", dist=DistContext())
    ctx.barrier()
    variants: dict[str, Any] = {f"{ctx.world_size} processes x 1 thread (DDP)": tr.Trainer(cfg, root / "ddp", dist=ctx)}
    one_name = "1 process x 1 thread"
    variants[one_name] = tr.Trainer(cfg, root / "one", dist=DistContext()) if ctx.rank == 0 else None
    if args.find_unused:
        original = tr.wrap_ddp
        tr.wrap_ddp = functools.partial(wrap_ddp, find_unused=True)  # type: ignore[assignment]
        variants[f"{ctx.world_size} processes, find_unused_parameters"] = tr.Trainer(cfg, root / "fu", dist=ctx)
        tr.wrap_ddp = original  # type: ignore[assignment]
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(dev)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}

    def run(name: str, epoch: int) -> tuple[float, float]:
        """Wall seconds of one epoch, and the largest CPU seconds (all threads) a process spent on it."""
        trainer = variants[name]
        ctx.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if trainer is not None:
            trainer.train_epoch(epoch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        c1 = time.process_time() - c0
        ctx.barrier()
        wall = time.perf_counter() - t0
        return wall, max(ctx.gather_objects(c1 if trainer is not None else 0.0))

    for name in names:  # warm-up epoch 0
        run(name, 0)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, busiest = run(name, r + 1)
            times[name].append(wall)
            cpu[name].append(busiest)
    if ctx.rank == 0:
        samples = batch * args.steps
        sps = {n: [samples / t for t in ts] for n, ts in times.items()}
        ddp = names[0]
        scaling = ratio_stats(sps[ddp], sps[one_name])
        cpu_scaling = ratio_stats(cpu[one_name], cpu[ddp])
        record: dict[str, Any] = {
            "nproc": ctx.world_size, "workload": args.workload, "arch": cfg.model.arch, "data": cfg.data.name,
            "mode": cfg.model.mode,
            "batch": batch, "steps": args.steps, "rounds": args.rounds, "env": env,
            "samples_per_s": sps, "seconds": times, "cpu_seconds": cpu, "scaling": scaling,
            "cpu_scaling": cpu_scaling, "target": TARGET,
            "verdict": verdict(scaling["paired_median"], TARGET, ">="),
            "loadavg_after": environment(dev)["loadavg"],
        }
        if args.find_unused:
            record["find_unused"] = ratio_stats(sps[names[2]], sps[ddp])
            record["find_unused_cpu"] = ratio_stats(cpu[ddp], cpu[names[2]])
        (root / "result.json").write_text(json.dumps(record))
    ctx.close()


def main() -> int:
    args = _parser().parse_args()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
