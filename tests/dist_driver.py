"""Worker side of the multi-process tests (tests/test_distributed.py); run by ``torchrun`` or as a subprocess.

``python tests/dist_driver.py scenarios ROOT`` (under ``torchrun --nproc_per_node=2``) runs, in one
process group, the data-parallel scenarios the tests check afterwards (each process writes what it
saw to ``ROOT/<scenario>/rank<r>.json``; the runs themselves write only from rank 0):

* ``combined`` — a combined-mode run that prunes, with ``sync_check_every = 1`` (parameter digests of
  both processes compared after every step and every prune event) and mid-epoch checkpoints;
* ``stop`` — the same run where only rank 1 receives SIGTERM (at its 11th step): both must stop
  after the same step, with one checkpoint;
* ``exact`` — the exact-difference estimator in audit mode, with digests compared after every step;
* ``none`` — gates off (mode "none", no BatchNorm), for the comparison with one process;
* ``syncbn`` / ``nosync`` — a BatchNorm network (gates off) with and without ``train.sync_bn``;
* ``mismatch`` — rank 1's θ (then a weight) is perturbed: the lock-step checks must stop both;
* ``evaluate`` — ``python -m pruning evaluate`` of the ``combined`` run, sharded.

``python tests/dist_driver.py cli [--kill-at K] [--kill-rank R] [--fault KILL|TERM] -- ARGS...``
runs ``python -m pruning ARGS`` with a fault injected before the K-th training step of process R
(SIGKILL: a crash; SIGTERM: a scheduler's stop); under ``torchrun --max-restarts`` only the first
attempt is hit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

# The tiny run of tests/test_train.py: residual MLP on 256 digits, 16 iterations of 16 samples per epoch,
# pruning units and blocks in both epochs.
TINY = [
    "data.name=digits", "data.options.flatten=true", "data.train_subset=256", "data.test_subset=128",
    "model.arch=residual_mlp", "model.kwargs.hidden=[12, 12, 12]", "model.theta_init=0.5",
    "objective.gamma=0.01", "objective.delta=0.5", "objective.lambda=1.0",
    "optim.weights.lr=0.05", "optim.theta.lr=0.05",
    "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=128", "train.prune_every=3",
    "train.device=cpu", "train.progress=false", "train.threads=1", "train.tensorboard=false",
    "export.enabled=false",
]
COMBINED = [*TINY, "train.checkpoint_every=4"]
NONE = [*TINY, "model.mode=none"]
# the exact-difference estimator (its estimates are averaged outside autograd) in audit mode (flag, keep, and the
# end-of-run prune with a sharded evaluation), 4 steps
EXACT_AUDIT = [*TINY, "model.estimator=\"exact-difference\"", "model.kwargs.hidden=[4, 4]", "train.epochs=1",
               "data.train_subset=64", "train.audit=true", "train.sync_check_every=1"]


def bn_run(root: str, sync: bool) -> list[str]:
    """A ResNet-1D (BatchNorm) on 64 MNIST-1D sequences, gates off: one epoch of 4 steps of 16."""
    return [
        "data.name=mnist1d", f"data.root=\"{root}\"", "data.train_subset=64", "data.test_subset=64",
        "model.arch=resnet1d", "model.kwargs={stage_blocks = [1, 1], widths = [6, 8]}", "model.mode=none",
        "objective.lambda=1.0", "optim.weights.lr=0.05", "train.epochs=1", "train.batch_size=16",
        "train.eval_batch_size=64", "train.device=cpu", "train.progress=false", "train.threads=1",
        "train.tensorboard=false", "export.enabled=false", f"train.sync_bn={'true' if sync else 'false'}",
    ]


def inject_fault(at_call: int, rank: int, sig: int) -> None:
    """Send ``sig`` to this process before its ``at_call``-th training step (process ``rank`` only)."""
    import pruning.train as tr

    me = int(os.environ.get("RANK", "0"))
    if me != rank or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    original = tr.algorithm1_step
    calls = [0]

    def step(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at_call:
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    tr.algorithm1_step = step  # type: ignore[assignment]


def _write(root: Path, name: str, rank: int, record: dict[str, Any]) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps(record))


def scenarios(root: Path) -> None:
    import torch

    import pruning.report as report_module
    import pruning.train as tr
    from pruning import cli
    from pruning.config import load_config
    from pruning.distributed import RankDisagreement, check_in_sync, init_distributed, state_digest
    from pruning.interrupt import RunInterrupted

    ctx = init_distributed("cpu")
    r = ctx.rank
    assert ctx.world_size == 2, ctx

    writes = {"checkpoint": 0, "report": 0}
    save, write_report = tr.save_checkpoint, report_module.write_report

    def counted_save(*args: Any, **kwargs: Any) -> Any:
        writes["checkpoint"] += 1
        return save(*args, **kwargs)

    def counted_report(*args: Any, **kwargs: Any) -> Any:
        writes["report"] += 1
        return write_report(*args, **kwargs)

    tr.save_checkpoint = counted_save  # type: ignore[assignment]
    report_module.write_report = counted_report  # type: ignore[assignment]
    trainer = tr.Trainer(load_config(None, [*COMBINED, "train.sync_check_every=1"]), root / "combined", dist=ctx)
    report = trainer.fit()
    tr.save_checkpoint, report_module.write_report = save, write_report  # type: ignore[assignment]
    _write(root, "combined", r, {"digest": state_digest(trainer.model.named_parameters()),
                                 "events": len(trainer.progress.events), "samples": trainer.progress.samples,
                                 "report_returned": report is not None, "writes": writes})

    trainer = tr.Trainer(load_config(None, EXACT_AUDIT), root / "exact", dist=ctx)
    theta0 = [t.detach().clone() for t in trainer.model.gate_parameters()]
    report = trainer.fit()
    _write(root, "exact", r, {"digest": state_digest(trainer.model.named_parameters()),
                              "theta_moved": any(not torch.equal(a, b) for a, b in
                                                 zip(theta0, trainer.model.gate_parameters())),
                              "end_of_run_prune": (report or {}).get("audit", {}).get("end_of_run_prune")})

    original = tr.algorithm1_step
    inject_fault(11, rank=1, sig=signal.SIGTERM)
    trainer = tr.Trainer(load_config(None, COMBINED), root / "stop", dist=ctx)
    try:
        trainer.fit()
        stopped: dict[str, Any] = {"stopped": False}
    except RunInterrupted as stop:
        stopped = {"stopped": True, "epoch": stop.epoch, "iteration": stop.iteration, "exit_code": stop.exit_code,
                   "message": str(stop), "step": trainer.progress.global_step}
    tr.algorithm1_step = original  # type: ignore[assignment]
    _write(root, "stop", r, stopped)

    # a NaN input batch on process 1 only: both processes stop at the same step, the last checkpoint intact
    def nan_on_rank1(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if r == 1 and calls[0] == 6:
            args = (*args[:2], args[2] * float("nan"), *args[3:])
        return original(*args, **kwargs)

    calls = [0]
    tr.algorithm1_step = nan_on_rank1  # type: ignore[assignment]
    trainer = tr.Trainer(load_config(None, COMBINED), root / "nan", dist=ctx)
    try:
        trainer.fit()
        diverged: dict[str, Any] = {"diverged": False}
    except tr.TrainingDiverged as exc:
        diverged = {"diverged": True, "message": str(exc), "step": trainer.progress.global_step}
    tr.algorithm1_step = original  # type: ignore[assignment]
    _write(root, "nan", r, diverged)

    for name, overrides in (("none", NONE), ("syncbn", bn_run(str(root / "data"), True)),
                            ("nosync", bn_run(str(root / "data"), False))):
        trainer = tr.Trainer(load_config(None, overrides), root / name, dist=ctx)
        trainer.fit()
        _write(root, name, r, {"digest": state_digest(trainer.model.named_parameters())})

    trainer = tr.Trainer(load_config(None, COMBINED), root / "mismatch", dist=ctx)
    errors: dict[str, str] = {}
    with torch.no_grad():
        if r == 1:
            trainer.model.gate_parameters()[0].view(-1)[0] += 1e-6
    try:
        trainer._prune(1)
    except RankDisagreement as exc:
        errors["theta"] = str(exc)
    with torch.no_grad():
        if r == 1:
            trainer.model.gate_parameters()[0].view(-1)[0] -= 1e-6
            trainer.model.weight_parameters()[0].view(-1)[0] += 1e-6
    try:
        check_in_sync(ctx, trainer.model, "after the perturbation")
    except RankDisagreement as exc:
        errors["weights"] = str(exc)
    _write(root, "mismatch", r, errors)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["evaluate", "--run", str(root / "combined"), "--json"])
    _write(root, "evaluate", r, {"code": code, "stdout": out.getvalue()})
    ctx.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("scenarios")
    p.add_argument("root")
    p = sub.add_parser("cli")
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument("--fault", choices=("KILL", "TERM", "INT"), default="KILL")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.what == "scenarios":
        scenarios(Path(args.root))
        return 0
    from pruning import cli

    if args.kill_at:
        inject_fault(args.kill_at, args.kill_rank, getattr(signal, f"SIG{args.fault}"))
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
