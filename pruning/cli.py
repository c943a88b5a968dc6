"""Command line of the training toolkit: ``python -m pruning {train,sweep,evaluate,export,flops,calibrate} ...``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from theory.architectures import ARCHITECTURES, by_name
from theory.complexity import ComplexityModel


def _fmt(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def cmd_flops(args: argparse.Namespace) -> int:
    """Baseline FLOPs (conv + linear MACs) and parameters through the one complexity model (THEORY §3)."""
    if args.spec:
        from theory.spec import load_spec

        try:
            spec = load_spec(args.spec)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        label = spec.name
    else:
        spec = by_name(args.model)
        label = args.model
    model = ComplexityModel(spec, elementwise=False)
    flops, params = float(model.flops()), float(model.params())
    record = {
        "model": label,
        "flops": flops,
        "params": params,
        "layers": spec.depth,
        "prunable_blocks": spec.prunable_blocks,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
    }
    if args.per_layer:
        record["per_layer"] = {k: {"flops": f, "params": p} for k, (f, p) in model.per_layer().items()}
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"{label}: {_fmt(flops)} FLOPs (MACs), {_fmt(params)} parameters, {spec.depth} layers, "
          f"{spec.prunable_blocks} prunable blocks, input {tuple(spec.input_shape)}")
    if args.per_layer:
        print(f"{'layer':<28}{'FLOPs':>14}{'params':>12}")
        for name, (f, p) in model.per_layer().items():
            print(f"{name:<28}{_fmt(f):>14}{_fmt(p):>12}")
    return 0


def _default_out(args: argparse.Namespace, cfg_out: str) -> Path:
    if args.out:
        return Path(args.out)
    if cfg_out:
        return Path(cfg_out)
    stem = Path(args.config).stem if args.config else "default"
    return Path("runs") / stem


def _say(*lines: str, err: bool = False) -> None:
    """Print on rank 0 only (every process of a ``torchrun`` job runs this command line)."""
    from .distributed import env_world

    if env_world()[0] == 0:
        print(*lines, sep="\n", file=sys.stderr if err else sys.stdout, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    """Algorithm 1 (``pruning.train``) in a locked run folder (``pruning.rundir``).

    Exit 2 — nothing written — for a bad configuration, a refused run folder (not a run, in use,
    already holding a run) or a damaged checkpoint; exit 1 when training diverges or a process of a
    data-parallel run is lost; 128 + the signal number after a clean stop on SIGINT/SIGTERM (a
    checkpoint at the current step).  Under ``torchrun`` every process runs this; a job that
    ``torchrun --max-restarts`` restarted after a failure resumes from the run's last checkpoint by itself.
    """
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import ConfigError, load_config
    from .distributed import restart_count
    from .rundir import RunDirError

    base = None
    if args.resume and not args.config:
        if not args.out:
            print("error: --resume without --config needs --out DIR (the run to continue)", file=sys.stderr)
            return 2
        try:
            base = load_checkpoint(Path(args.out))["config"]
        except CheckpointError as exc:
            print(f"error: --resume: {exc}", file=sys.stderr)
            return 2
    overrides = list(args.set or ()) + (["train.audit=true"] if args.audit else [])
    try:
        cfg = load_config(args.config, overrides, base=base, check_files=not args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = _default_out(args, cfg.train.out_dir)
    restarts = restart_count()
    if restarts and not args.resume and not args.overwrite and (out / "checkpoint.pt").is_file():
        args.resume = True
        _say(f"torchrun restart {restarts}: resuming {out} from its last checkpoint")

    from .distributed import DistributedError, init_distributed
    from .interrupt import RunInterrupted
    from .train import Trainer, TrainingDiverged, shared_session

    argv = ["python", "-m", "pruning", *getattr(args, "argv", [])]  # the command line, for provenance.json
    try:
        dist = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    except (DistributedError, RuntimeError, ValueError) as exc:
        print(f"error: cannot join the torchrun process group: {exc}", file=sys.stderr)
        return 2
    try:
        with shared_session(out, dist, resume=args.resume, overwrite=args.overwrite, argv=argv) as session:
            try:
                trainer = Trainer(cfg, out, resume=args.resume, dist=dist)
            except ValueError as exc:  # configuration mismatch on resume, model/data problems, damaged checkpoint
                _say(f"error: {exc}", err=True)
                return 2
            session.start(device=trainer.device, export_dirs=[cfg.export.dir])
            try:
                report = trainer.fit()
            except TrainingDiverged as exc:  # every process stops at the same step (pruning.guard)
                _say(f"error: training diverged: {exc}", err=True)
                session.finish("diverged")
                return 1
            except RunInterrupted as stop:  # Ctrl-C / SIGTERM: checkpoint written at the current step
                _say(str(stop), err=True)
                session.finish("interrupted")
                return stop.exit_code
            except DistributedError as exc:  # another process died or the processes disagree
                print(f"error: {exc}", file=sys.stderr, flush=True)
                session.finish(f"failed ({type(exc).__name__})")
                return 1
            assert report is not None
            _say(
                f"done: test accuracy {report['test_accuracy'] * 100:.2f} %, fPR {report['fPR'] * 100:.1f} %, "
                f"pPR {report['pPR'] * 100:.1f} %, layers {report['layers_left']}/{report['baseline_layers']}, "
                f"expected-FLOPs cost {report['training_cost_ratio']:.3f} of baseline"
                + (f", measured training time {t:.3f} of dense steps" if (t := report.get("measured_train_time_ratio"))
                   else "") + f", {report['wall_clock_s']:.1f} s "
                f"-> {out}" + (f" ({report['processes']} processes)" if report.get("processes", 1) > 1 else "")
            )
            if report.get("audit"):
                from .report import audit_lines

                _say("\n".join(audit_lines(report["audit"])))
    except (RunDirError, CheckpointError) as exc:
        _say(f"error: {exc}", err=True)
        return 2
    finally:
        dist.close()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Mean-field accuracy and deterministic FLOPs/parameters of a run's latest checkpoint."""
    from .build import load_data
    from .checkpoint import CheckpointError, baseline_spec_of
    from .data import make_loader
    from .distributed import init_distributed
    from .evaluation import evaluate
    from .objective import CostMeter
    from .train import load_run

    dist = init_distributed(args.device)  # under torchrun: every process evaluates its part of each batch
    try:
        device = dist.device(args.device)
        try:
            cfg, model, ckpt = load_run(args.run, device=device)
        except CheckpointError as exc:
            _say(f"error: {exc}", err=True)
            return 2
        try:
            data = load_data(cfg)
        except ValueError as exc:  # data given in Python (data.name = "custom"), a dataset that is gone
            _say(f"error: {args.run}: {exc}", err=True)
            return 2
        split = data.test if args.split == "test" else data.train
        loader = make_loader(split, cfg.train.eval_batch_size, train=False, seed=cfg.train.seed, device=device,
                             rank=dist.rank, world_size=dist.world_size)
        loss, acc = evaluate(model, loader, device, all_reduce=dist.all_reduce_sum if dist.active else None)
    finally:
        dist.close()
    if not math.isfinite(loss):
        _say(f"error: {args.run}: the {args.split} loss of the checkpoint's network is not finite ({loss}); "
             "its outputs overflow", err=True)
        return 1
    spec = model.spec()
    meter = CostMeter(baseline_spec_of(ckpt, cfg))
    flops, params = meter.deterministic(spec)
    fpr, ppr = meter.ratios(spec)
    if dist.rank != 0:
        return 0
    record = {
        "run": str(args.run), "split": args.split, "epoch": ckpt["progress"]["epoch"], "loss": loss, "accuracy": acc,
        "flops": flops, "params": params, "fPR": fpr, "pPR": ppr, "layers": spec.depth,
        "blocks_alive": spec.blocks_alive, "baseline_flops": meter.F_tot, "baseline_params": meter.P_tot,
    }
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{args.run} (epoch {record['epoch']}), {args.split}: accuracy {acc * 100:.2f} %, loss {loss:.4f}; "
              f"{_fmt(flops)} FLOPs (fPR {fpr * 100:.1f} %), {_fmt(params)} parameters (pPR {ppr * 100:.1f} %), "
              f"{spec.depth} layers, {spec.blocks_alive} blocks")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The deterministic network of a run (θ folded into the weights), written by ``pruning.export``."""
    from .checkpoint import CheckpointError
    from .train import export_run, load_run

    try:
        cfg, model, ckpt = load_run(args.run)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / cfg.export.dir
    written = export_run(model, out, onnx=args.onnx or cfg.export.onnx, data=ckpt.get("data"))
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A grid of configuration values × seeds, one run folder each, then results.json/.md (``pruning.sweep``)."""
    from .sweep import main as sweep_main

    return sweep_main(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure per-layer step times on a device and write the latency model (``pruning.calibrate``).

    ``--model`` is an architecture name or a run configuration (``.toml``: its network, batch size
    and threads).  Exit 2 — nothing written — for a bad model/configuration or device.
    """
    from .config import ConfigError, load_config

    batch, threads = args.batch, args.threads
    try:
        if args.model.endswith(".toml"):
            from .build import build_network, load_data

            cfg = load_config(args.model)
            data = load_data(cfg)
            spec = build_network(cfg, data.num_classes, tuple(data.input_shape), device="meta").spec()
            batch = batch or cfg.train.batch_size
            threads = threads or cfg.train.threads
        else:
            spec = by_name(args.model)
    except (ConfigError, ValueError) as exc:
        print(f"error: --model {args.model}: {exc}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    from theory.latency import TARGETS

    from .calibrate import calibrate

    model = calibrate(spec, device=args.device, batch=batch or 128, threads=threads or 1, quick=args.quick,
                      log=(lambda s: None) if args.json else print, model_label=args.model)
    model.save(args.out)
    summary = {t: model.summary(t) for t in TARGETS}
    if args.json:
        print(json.dumps({"out": str(args.out), "entries": len(model.entries), "summary": summary,
                          "seconds": model.meta["calibration_seconds"]}, indent=2))
    else:
        for t in TARGETS:
            print(f"{t}: held-out relative RMS error mean {summary[t]['heldout_rel_rmse_mean']:.3f}, "
                  f"worst {summary[t]['heldout_rel_rmse_max']:.3f} over {len(model.entries)} layer kinds")
        print(f"latency model: {args.out} ({model.meta['calibration_seconds']} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pruning",
        description="Complexity-aware training that prunes units and layers while it trains (arXiv 2411.09127).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a network while pruning its units and blocks (Algorithm 1)")
    p.add_argument("--config", help="TOML configuration (default: the embedded default, MNIST-1D + ResNet-1D)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set objective.gamma=0.5 (repeatable)")
    p.add_argument("--out", help="run directory (default: train.out_dir or runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (mid-epoch ones at the exact batch; "
                        "also with another number of torchrun processes)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the run in --out over (removes that run's files; refuses a folder that is not a run)")
    p.add_argument("--audit", action="store_true",
                   help="pruning audit (train.audit=true): the ε-rule flags structures but keeps them training; "
                        "reports how many recover (premature-pruning rate) and how many were certified")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("sweep", help="train every point of a grid of configuration values × seeds, then aggregate",
                       description="Train the cartesian product of --grid × --seeds one run after the other, each in "
                                   "<out>/<setting>/seed<k>; rerun the same command to continue a stopped sweep. "
                                   "Writes <out>/results.json and results.md (mean ± sd over seeds).")
    p.add_argument("--config", help="TOML configuration (default: the embedded default)")
    p.add_argument("--grid", nargs="+", action="extend", metavar="FIELD=V1,V2",
                   help="values per field: gamma, rho, delta, lambda (objective.*) or any dotted configuration "
                        "field, e.g. --grid gamma=0.02,0.05 rho=0.2,0.8 optim.theta.lr=0.01,0.03")
    p.add_argument("--seeds", type=int, default=1, help="runs per setting, seeds train.seed + 0..N-1 (default 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run (repeatable)")
    p.add_argument("--out", help="sweep folder (default: runs/sweep_<config name>)")
    p.add_argument("--retry-failed", action="store_true", help="train again runs whose last attempt diverged")
    p.add_argument("--report-only", action="store_true", help="train nothing; aggregate the finished runs")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("evaluate", help="accuracy and FLOPs of a run's latest checkpoint (mean-field network)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="under torchrun every process evaluates its part of the split (cuda: one GPU per process)")
    p.add_argument("--json", action="store_true", help="print one JSON record")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("export", help="export a run's deterministic network (θ folded into the weights)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", help="export directory (default: <run>/<export.dir>)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (needs the onnx extra: pip install '.[onnx]'; else a notice)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("flops", help="baseline FLOPs (conv+linear MACs) and parameters of an architecture")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=sorted(ARCHITECTURES), help="architecture name")
    which.add_argument("--spec", metavar="FILE", help="a spec file (.toml or .json, format: theory/spec.py)")
    p.add_argument("--per-layer", action="store_true", help="also list FLOPs and parameters per layer")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    p.set_defaults(func=cmd_flops)
    p = sub.add_parser("calibrate", help="measure per-layer step times on a device and fit the latency model "
                                         "(objective.cost = \"latency\")")
    p.add_argument("--model", required=True,
                   help="architecture name or a run configuration (.toml: its network, batch size and threads)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", required=True, help="latency model file to write (JSON)")
    p.add_argument("--batch", type=int, default=0, help="batch size to time (default: the config's, else 128)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: the config's, else 1)")
    p.add_argument("--quick", action="store_true", help="fewer widths and repetitions (seconds; for tests)")
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of the per-layer table")
    p.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command line, for provenance.json
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
