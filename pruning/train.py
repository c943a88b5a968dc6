"""Algorithm 1 of the seed: training that prunes units and residual blocks while it trains (THEORY §5).

Per iteration ``k`` (one mini-batch, one gate sample ``Ξ_k ~ q_Θ`` drawn by the forward pass):

1. forward, ``J = mean ℓ + C(Θ)/N + (λ/N)/2 ||W||²`` (:class:`pruning.objective.Objective`, [2.2], [16]);
2. backward: ``∇_W J`` by back-propagation through the sampled network [17]; ``∇_Θ J`` by the
   straight-through estimator plus the exact ``∇_Θ C / N`` [18] — or, with
   ``estimator = "exact-difference"``, the unbiased difference estimate of [19]–[21]
   (``model.exact_gate_grads``) plus ``∇_Θ C / N`` by autograd;
3. ``W ← SGD step`` (momentum 0.9, cosine schedule; [14]) and ``Θ ← Π_H(Adam step)`` ([15],
   :func:`theory.projection.project`, in place) — or plain SGD with a constant step on both
   (``optim.kind = "plain-sgd"``, the setting of the ODE comparison);
4. every ``prune_every`` iterations (and at each epoch end) the ε-rule: units with ``θ_1 < ε`` and
   blocks with ``θ_B < ε`` (or all units ``< ε``) leave the tensors for good
   (:func:`pruning.compaction.prune`, optimiser state carried), so later iterations are cheaper.
   :mod:`pruning.audit` records each selected structure (θ, weight norms, ``c``, an online Lemma-1
   ``k``, certified by Theorem 5.1/5.2?); with ``train.audit`` they are flagged and kept instead.

Bookkeeping: the training cost of an iteration is ``E[F]`` ([9], conv + linear MACs) of the
surviving network at the current ``θ`` times the batch size; its running sum is the seed's
Figure 4, reported relative to the baseline network's cost for the same number of samples.
Every epoch ends with a mean-field evaluation, one log record (CSV, optional TensorBoard) and an
atomic checkpoint holding the model state *and* its structure, optimiser states, RNG states and
the log, so that ``resume`` continues the run bit-for-bit on CPU.  The structure of a compacted
model is recovered from its own state: each unit gate carries the original indices of its
surviving units (``unit_ids`` buffer) and a pruned block has no path parameters, so a model built
from the configuration is brought to the same structure by forcing those gates to 0 and running
the same pruning rule.

The trainer is assembled from parts with one job each, imported here:

* :mod:`pruning.build` — config → data splits and gated network;
* :mod:`pruning.optim` — the optimisers and the learning-rate schedule;
* :mod:`pruning.step` — steps 1–3 of one iteration (:func:`~pruning.step.algorithm1_step`);
* :mod:`pruning.checkpoint` — checkpoint contents, atomic save, safe load, structure replay;
* :mod:`pruning.evaluation` — the mean-field evaluation;
* :mod:`pruning.runlog` — ``log.csv``, TensorBoard and the console;
* :mod:`pruning.runtime` — devices, seeds, RNG state, autocast;
* :mod:`pruning.guard` — no NaN/Inf objective, weight, ``θ`` or BN statistic passes a step, nothing
  non-finite is checkpointed or exported (:class:`TrainingDiverged` names epoch and iteration);
* :mod:`pruning.rundir` — the run folder: checks, lock, orphaned temporary files, ``--overwrite``,
  ``provenance.json`` and ``train.log`` (:func:`train` and the command line open a
  :class:`~pruning.rundir.RunSession`; a bare :class:`Trainer` does not).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from theory.atomic import atomic_write_text

from .audit import PruningAudit, end_of_run_prune
from .build import build_network, check_fits, load_data
from .checkpoint import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    CheckpointError,
    check_resume_config,
    load_checkpoint,
    restore_model,
    save_checkpoint,
    structure_of,
)
from .config import RunConfig, from_dict, to_toml
from .data import make_loader
from .evaluation import evaluate, theta_stats
from .guard import FiniteGuard, NonFiniteState, NonFiniteUpdate, require_finite
from .models import GatedNetwork
from .objective import CostMeter, Objective
from .optim import lr_at, make_optimizers
from .rundir import CONFIG_ECHO, RunSession
from .runlog import RunLog
from .runtime import capture_rng, resolve_device, restore_rng, seed_everything, to_device
from .step import NonFiniteObjective, algorithm1_step


class TrainingDiverged(RuntimeError):
    """The objective, the weights/θ or the test loss became NaN/Inf; the message names the epoch and iteration.

    The last good checkpoint is kept; nothing non-finite is written (:mod:`pruning.guard`).
    """


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Counters carried across epochs (and checkpoints)."""

    epoch: int = 0  # completed epochs
    global_step: int = 0
    samples: int = 0
    cum_flops: float = 0.0  # Σ_k E[F](θ_k) |B_k|  (seed Figure 4)
    cum_flops_dense: float = 0.0  # Σ_k F(surviving network, all gates 1) |B_k|
    train_time_s: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def _event_record(event: Any, epoch: int, step: int) -> dict[str, Any] | None:
    """A :class:`pruning.compaction.PruneEvent` as primitives (``None`` when it removed nothing)."""
    if event.empty:
        return None
    return {"epoch": epoch, **_primitive(event.to_dict()), "step": step}


def _primitive(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _primitive(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_primitive(v) for v in x]
    return x


class Trainer:
    """One run of Algorithm 1 in ``out_dir`` (see the module doc).  ``resume=True`` continues a checkpoint."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        t = cfg.train
        self.device = resolve_device(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        ckpt: dict[str, Any] | None = None
        if resume:
            ckpt = load_checkpoint(self.out / CHECKPOINT)  # CheckpointError: missing, damaged or foreign
            check_resume_config(from_dict(ckpt["config"]), cfg)
        seed_everything(t.seed)
        self.data = load_data(cfg)
        self.N = len(self.data.train)
        check_fits(cfg, self.data.num_classes, tuple(self.data.input_shape))  # ConfigError naming the field
        self.model = build_network(cfg, self.data.num_classes, tuple(self.data.input_shape))
        self.baseline_spec = self.model.spec()
        o = cfg.objective
        self.objective = Objective(
            self.baseline_spec, N=self.N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_,
            mode=cfg.model.mode, elementwise=o.elementwise,
        )
        self.meter = CostMeter(self.baseline_spec)
        self.progress = Progress()
        self.guard = FiniteGuard()  # no NaN/Inf weight, θ or BN statistic passes a step (pruning.guard)
        # pruning audit (pruning.audit): records of what the ε-rule selects; with train.audit, flag, do not remove
        self.audit = PruningAudit(self.objective, eps=t.eps, estimator=cfg.model.estimator, window=t.audit_window,
                                  every=t.audit_every, counterfactual=t.audit)
        if ckpt is not None:
            restore_model(self.model, ckpt, t.eps, self.out)
        self.model.to(self.device)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.opt_w, self.opt_t = make_optimizers(cfg, self.model.weight_parameters(), self.model.gate_parameters())
        if ckpt is not None:
            try:
                self._load_optimizers(ckpt)
                self.progress = Progress(**ckpt["progress"])
                if ckpt.get("audit") is not None:
                    self.audit.load_state_dict(ckpt["audit"], self.device)
                restore_rng(ckpt["rng"])
            except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
                raise CheckpointError(f"{self.out / CHECKPOINT}: the checkpoint's optimiser, progress or RNG "
                                      f"state does not fit ({type(exc).__name__}: {str(exc)[:200]})") from None
        self.loader = make_loader(
            self.data.train, t.batch_size, train=True, seed=t.seed, num_workers=cfg.data.num_workers,
            device=self.device,
        )
        self.test_loader = make_loader(
            self.data.test, t.eval_batch_size, train=False, seed=t.seed, num_workers=cfg.data.num_workers,
            device=self.device,
        )
        self.spec = self.model.spec()
        self._det_flops = self.meter.deterministic(self.spec)[0]
        self.log = RunLog(self.out, tensorboard=t.tensorboard, progress=t.progress,
                          purge_step=self.progress.global_step)

    # -- checkpoints --------------------------------------------------------------------------
    def _param_names(self, opt: torch.optim.Optimizer | None) -> list[list[str]]:
        if opt is None:
            return []
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]

    def _load_optimizers(self, ckpt: dict[str, Any]) -> None:
        named = dict(self.model.named_parameters())
        for attr, key in (("opt_w", "optim_w"), ("opt_t", "optim_theta")):
            opt = getattr(self, attr)
            saved = ckpt[key]
            if opt is None or saved is None:
                continue
            groups = ckpt["param_names"][key]
            for g, names in zip(opt.param_groups, groups):
                g["params"] = [named[n] for n in names]
            opt.load_state_dict(saved)

    def checkpoint_dict(self) -> dict[str, Any]:
        p = self.progress
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "structure": structure_of(self.model),
            "optim_w": self.opt_w.state_dict(),
            "optim_theta": None if self.opt_t is None else self.opt_t.state_dict(),
            "param_names": {"optim_w": self._param_names(self.opt_w), "optim_theta": self._param_names(self.opt_t)},
            "scheduler": {"global_step": p.global_step, "steps_per_epoch": len(self.loader),
                          "lr": lr_at(self.cfg, p.global_step, len(self.loader))},
            "progress": {
                "epoch": p.epoch, "global_step": p.global_step, "samples": p.samples, "cum_flops": p.cum_flops,
                "cum_flops_dense": p.cum_flops_dense, "train_time_s": p.train_time_s, "log": p.log,
                "events": p.events,
            },
            "rng": capture_rng(),
            "audit": self.audit.state_dict(),
            "loader": {"next_epoch": p.epoch, "seed": self.cfg.train.seed},
            "data": {"num_classes": self.data.num_classes, "input_shape": list(self.data.input_shape), "N": self.N},
        }

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.out / CHECKPOINT, self.checkpoint_dict())

    def _diverged(self, what: str, epoch: int, iteration: int, spe: int, step: int) -> TrainingDiverged:
        """The error that stops a run: what went non-finite, where, and which checkpoint is kept."""
        p = self.progress
        kept = (f"The last good checkpoint ({self.out / CHECKPOINT}, after epoch {p.epoch}) is kept."
                if p.epoch > 0 else "No checkpoint was written yet (the first epoch did not finish).")
        return TrainingDiverged(
            f"{what} at epoch {epoch}, iteration {iteration}/{spe} (global step {step}); stopping. {kept}"
        )

    # -- one epoch ----------------------------------------------------------------------------
    def _prune(self, epoch: int) -> bool:
        from .compaction import prune

        opts = [o for o in (self.opt_w, self.opt_t) if o is not None]
        flagged = self.audit.flag(self.model, self.spec, step=self.progress.global_step, epoch=epoch)
        if self.cfg.train.audit:  # audit mode: flagged structures stay and keep training
            return False
        event = prune(self.model, self.cfg.train.eps, opts, step=self.progress.global_step)
        self.audit.confirm(flagged, event)
        rec = _event_record(event, epoch, self.progress.global_step)
        if rec is None:
            return False
        self.progress.events.append(rec)
        if self.cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.spec = self.model.spec()
        self._det_flops = self.meter.deterministic(self.spec)[0]
        return True

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data (epoch ``epoch``, 0-based); returns mean training statistics."""
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        model, dev = self.model, self.device
        spe = len(self.loader)
        amp = t.amp_bf16
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # data loss, J, C/N, correct
        cum = torch.zeros(1, dtype=torch.float64, device=dev)
        count = 0
        lr = lr_at(cfg, p.global_step, spe)
        bar = self.log.bar(spe, f"epoch {epoch + 1}/{t.epochs}")
        try:
            for i, (x, y) in enumerate(self.loader.iter_epoch(epoch)):
                x, y = to_device(x, y, dev, t.channels_last)
                lr = lr_at(cfg, p.global_step, spe)
                for g in self.opt_w.param_groups:
                    g["lr"] = lr
                ef = self.meter.expected_flops(model, self.spec)  # E[F] at the θ of this sample (Figure 4)
                observe = t.audit_every and p.global_step % t.audit_every == 0
                try:
                    terms, out = algorithm1_step(
                        model, self.objective, x, y, self.opt_w, self.opt_t, spec=self.spec, amp=amp,
                        before_update=(lambda: self.audit.observe(model, self.spec)) if observe else None,
                        guard=self.guard, where=(epoch + 1, i + 1, spe, p.global_step + 1),
                    )
                except NonFiniteObjective as err:
                    j, d, c = (float(v.detach()) for v in (err.terms.total, err.terms.data, err.terms.complexity))
                    raise self._diverged(f"non-finite objective J={j:g} (mean loss {d:g}, C/N {c:g})",
                                         epoch + 1, i + 1, spe, p.global_step + 1) from None
                if t.audit:
                    self.audit.track(model)
                b = int(y.shape[0])
                cum += ef * b
                p.cum_flops_dense += self._det_flops * b
                p.samples += b
                count += b
                with torch.no_grad():
                    sums += torch.stack([
                        terms.data.detach().double() * b, terms.total.detach().double() * b,
                        terms.complexity.detach().double() * b, (out.argmax(1) == y).sum().double(),
                    ])
                p.global_step += 1
                if p.global_step % t.prune_every == 0:
                    self.guard.settle()  # nothing non-finite is pruned
                    self._prune(epoch + 1)
                if bar is not None:
                    bar.update(1)
                if p.global_step % t.log_every == 0:
                    loss_now = float(terms.data.detach())
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_now:.3f}", layers=self.spec.depth, lr=f"{lr:.3g}")
                    self.log.iteration(p.global_step, {"train_loss": loss_now, "J": float(terms.total.detach()),
                                                       "lr": lr})
            self.guard.settle()
        except NonFiniteUpdate as err:
            e, it, n, step = err.where
            raise self._diverged(
                f"non-finite weights, θ or BatchNorm statistics after the update (first: {err.name}; "
                f"optim.weights.lr = {cfg.optim.weights.lr:g} may be too large)", e, it, n, step,
            ) from None
        finally:
            if bar is not None:
                bar.close()
        p.cum_flops += float(cum)
        s = (sums / max(count, 1)).tolist()
        return {"train_loss": s[0], "train_J": s[1], "train_complexity": s[2], "train_acc": s[3], "lr": lr}

    def epoch_record(self, epoch: int, train_stats: dict[str, float], epoch_time: float) -> dict[str, Any]:
        p, spec, meter = self.progress, self.spec, self.meter
        test_loss, test_acc = evaluate(self.model, self.test_loader, self.device, amp_bf16=self.cfg.train.amp_bf16,
                                       channels_last=self.cfg.train.channels_last)
        gates = self.model.block_gates()
        block_thetas = [g.theta_B for g in gates if g.theta_B is not None]
        unit_thetas = [t for g in gates if g.theta_1 is not None for t in g.theta_1 if t is not None]
        ef, ep = (float(v) for v in meter.expected(self.model, spec))
        flops, params = meter.deterministic(spec)
        baseline_cum = meter.F_tot * p.samples
        rec: dict[str, Any] = {
            "epoch": epoch,
            "step": p.global_step,
            "lr": train_stats["lr"],
            "train_loss": train_stats["train_loss"],
            "train_J": train_stats["train_J"],
            "train_complexity": train_stats["train_complexity"],
            "train_acc": train_stats["train_acc"],
            "test_loss": test_loss,
            "test_acc": test_acc,
            **theta_stats(unit_thetas + block_thetas, "theta"),
            **theta_stats(unit_thetas, "theta_unit"),
            **theta_stats(block_thetas, "theta_block"),
            "expected_flops": ef,
            "expected_params": ep,
            "flops": flops,
            "params": params,
            "fPR": 1.0 - flops / meter.F_tot,
            "pPR": 1.0 - params / meter.P_tot,
            "layers": spec.depth,
            "blocks_alive": spec.blocks_alive,
            "units": sum(sum(b.unit_widths) for b in spec.blocks),
            "cum_train_flops": p.cum_flops,
            "cum_train_flops_dense": p.cum_flops_dense,
            "cum_baseline_flops": baseline_cum,
            "train_cost_ratio": p.cum_flops / baseline_cum if baseline_cum else math.nan,
            "prune_events": len(p.events),
            "epoch_time_s": epoch_time,
            "wall_time_s": p.train_time_s,
        }
        return rec

    # -- the run --------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict[str, Any] | None:
        """Train the remaining epochs; checkpoint and log each; write report and export at the end.

        ``stop_after`` ends the run (without report) once that many epochs are complete, as if it had
        been interrupted there; ``resume`` continues it.
        """
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / CONFIG_ECHO, to_toml(cfg))
        last = t.epochs if stop_after is None else min(stop_after, t.epochs)
        try:
            for epoch in range(p.epoch, last):
                start = time.perf_counter()
                stats = self.train_epoch(epoch)
                self._prune(epoch + 1)
                p.train_time_s += time.perf_counter() - start
                p.epoch = epoch + 1
                rec = self.epoch_record(epoch + 1, stats, time.perf_counter() - start)
                end = (epoch + 1, len(self.loader), len(self.loader), p.global_step)  # where a failure is reported
                p.log.append(rec)
                failure = None
                if not math.isfinite(rec["test_loss"]):
                    failure = (f"non-finite test loss ({rec['test_loss']}: the mean-field network's outputs overflow) "
                               "in the end-of-epoch evaluation")
                else:
                    try:
                        self.save_checkpoint()  # refuses NaN/Inf tensors (the last barrier; the guard settled above)
                    except NonFiniteState as err:
                        failure = f"non-finite state at the epoch's end ({err})"
                if failure is not None:
                    p.epoch, p.log = epoch, p.log[:-1]  # this epoch did not complete: no checkpoint, no report
                    raise self._diverged(failure, *end)
                self.log.epoch(p.log, p.epoch)
        finally:
            self.log.close()
        if p.epoch < t.epochs:
            return None
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Export the deterministic network and write report.json / report.md (THEORY §5)."""
        from .report import build_report, write_report

        exports: dict[str, str] = {}
        if self.cfg.export.enabled:
            exports = export_run(self.model, self.out / self.cfg.export.dir)
        audit = self.audit.summary(self.model)
        if self.cfg.train.audit:
            t = self.cfg.train
            audit["end_of_run_prune"] = end_of_run_prune(
                self.model, t.eps,
                lambda m: evaluate(m, self.test_loader, self.device, amp_bf16=t.amp_bf16,
                                   channels_last=t.channels_last),
                self.meter.ratios,
            )
        audit["files"] = self.audit.write(self.out, audit)
        report = build_report(
            config=self.cfg.to_dict(),
            log=self.progress.log,
            spec=self.spec,
            baseline_spec=self.baseline_spec,
            events=self.progress.events,
            wall_clock_s=self.progress.train_time_s,
            exports=exports,
            out_dir=str(self.out),
            device=str(self.device),
            audit=audit,
        )
        write_report(self.out, report)
        return report


def export_run(model: GatedNetwork, out_dir: Path) -> dict[str, str]:
    """``export_deterministic`` + ``save_export``; returns the written paths by kind."""
    from .export import export_deterministic, save_export

    require_finite(model, "an export")
    written = save_export(export_deterministic(model), out_dir)
    return {str(k): str(v) for k, v in written.items()}



def load_run(run_dir: str | Path, *, device: str = "cpu") -> tuple[RunConfig, GatedNetwork, dict[str, Any]]:
    """The configuration, the model (compacted structure, trained state) and the raw checkpoint of a run."""
    ckpt = load_checkpoint(run_dir)  # CheckpointError: missing, damaged or foreign
    cfg = from_dict(ckpt["config"])
    seed_everything(cfg.train.seed)
    try:
        model = build_network(cfg, int(ckpt["data"]["num_classes"]), tuple(ckpt["data"]["input_shape"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{run_dir}: the checkpoint's data record does not build its network ({exc})") from None
    restore_model(model, ckpt, cfg.train.eps, run_dir)
    model.to(resolve_device(device))
    model.eval()
    return cfg, model, ckpt


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume, or start over) a training run to the end in its locked folder; returns the report.

    The folder rules of :class:`pruning.rundir.RunSession` apply (:class:`pruning.rundir.RunDirError`).
    """
    with RunSession(out_dir, resume=resume, overwrite=overwrite) as session:
        trainer = Trainer(cfg, out_dir, resume=resume)
        session.start(device=trainer.device, export_dirs=[cfg.export.dir])
        report = trainer.fit()
    assert report is not None
    return report


__all__ = ["CONFIG_ECHO", "Progress", "Trainer", "TrainingDiverged", "export_run", "load_run", "train"]
