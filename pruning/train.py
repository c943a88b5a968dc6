"""Algorithm 1 of the paper: training that prunes units and residual blocks while it trains (THEORY §5).

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
surviving network at the current ``θ`` times the batch size; its running sum is the paper's
Figure 4, reported relative to the baseline network's cost for the same number of samples.
Every epoch ends with a mean-field evaluation, one log record (CSV, optional TensorBoard) and an
atomic checkpoint holding the model state *and* its structure, optimiser states, RNG states and
the log, so that ``resume`` continues the run bit-for-bit on CPU.  The structure of a compacted
model is recovered from its own state: each unit gate carries the original indices of its
surviving units (``unit_ids`` buffer) and a pruned block has no path parameters, so a model built
from the configuration is brought to the same structure by forcing those gates to 0 and running
the same pruning rule.

Long runs: ``train.checkpoint_every`` adds mid-epoch checkpoints (position and running sums of the
epoch: ``resume`` continues at the exact batch); SIGINT/SIGTERM stop at a step boundary with one.
Under ``torchrun`` every process trains on its part of each global batch through a DDP wrapper
(:attr:`Trainer.forward`, rebuilt after each compaction) with its own gate samples (a stream per
seed, rank and step), prunes in lock-step, and only rank 0 writes.

The trainer is assembled from parts with one job each, imported here:

* :mod:`pruning.build` — config → data splits and gated network;
* :mod:`pruning.optim` — the optimisers and the learning-rate schedule;
* :mod:`pruning.step` — steps 1–3 of one iteration (:func:`~pruning.step.algorithm1_step`);
* :mod:`pruning.checkpoint` — checkpoint contents, atomic save, safe load, structure replay;
* :mod:`pruning.evaluation` — the mean-field evaluation;
* :mod:`pruning.runlog` — ``log.csv``, TensorBoard and the console;
* :mod:`pruning.runtime` — devices, seeds, RNG state, autocast;
* :mod:`pruning.distributed` — process group, DDP wrapper, cross-process agreement;
* :mod:`pruning.interrupt` — clean stops on SIGINT/SIGTERM;
* :mod:`pruning.syncbn` — BatchNorm statistics over the global batch (``train.sync_bn``).
* :mod:`pruning.guard` — no NaN/Inf objective, weight, ``θ`` or BN statistic passes a step, nothing
  non-finite is checkpointed or exported (:class:`TrainingDiverged` names epoch and iteration);
* :mod:`pruning.rundir` — the run folder: checks, lock, orphaned temporary files, ``--overwrite``,
  ``provenance.json`` and ``train.log`` (:func:`train` and the command line open a
  :class:`~pruning.rundir.RunSession`; a bare :class:`Trainer` does not).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from theory.atomic import atomic_write_text

from .audit import PruningAudit, end_of_run_prune
from .budget import make_budget
from .build import (
    build_network,
    check_fits,
    check_network_fits,
    config_for_data,
    data_record,
    latency_costs,
    load_data,
)
from .checkpoint import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    CheckpointError,
    check_resume_config,
    epoch_sums_row,
    load_checkpoint,
    network_from_checkpoint,
    network_record,
    restore_model,
    save_checkpoint,
    structure_of,
)
from .config import RunConfig, from_dict, to_toml
from .data import DataSplits, make_loader
from .distributed import (
    DistContext,
    PeerLost,
    agree,
    check_in_sync,
    first_line,
    init_distributed,
    is_comm_failure,
    prune_decision,
    sync_buffers,
    under_torchrun,
    wrap_ddp,
)
from .evaluation import evaluate, theta_stats
from .gates import sampling_generator
from .guard import FiniteGuard, NonFiniteState, NonFiniteUpdate, require_finite
from .interrupt import RunInterrupted, StopSignals
from .models import GatedNetwork
from .objective import CostMeter, Objective
from .optim import lr_at, make_optimizers
from .rundir import CONFIG_ECHO, RunDirError, RunSession
from .runlog import RunLog
from .runtime import (
    capture_rng,
    gate_seed,
    resolve_channels_last,
    resolve_device,
    restore_rng,
    seed_everything,
    to_device,
)
from .step import NonFiniteObjective, algorithm1_step
from .timing import RunTimer, inference_speedup
from .userdata import from_datasets


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
    cum_flops: float = 0.0  # Σ_k E[F](θ_k) |B_k|  (paper, Figure 4)
    cum_flops_dense: float = 0.0  # Σ_k F(surviving network, all gates 1) |B_k|
    train_time_s: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    # inside the epoch in progress (all 0 at epoch boundaries): batches done, each process's running sums
    # (data loss·b, J·b, C/N·b, correct, b), Σ E[F]·|B| so far, seconds so far
    batch: int = 0
    epoch_sums: list[list[float]] = field(default_factory=list)
    epoch_cum_flops: float = 0.0
    epoch_time_s: float = 0.0


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


EPOCH_SUMS = 5  # data loss·b, J·b, C/N·b, correct, b (one process's part of every batch)


class Trainer:
    """One run of Algorithm 1 in ``out_dir`` (see the module doc).  ``resume=True`` continues a checkpoint.

    The network is built from ``cfg.model`` — or given: ``model`` (a :class:`GatedNetwork` from
    :func:`pruning.convert.gate`, :func:`pruning.models.from_spec` or ``build_model``) is trained and
    pruned in place; its gating must be ``cfg.model``'s (mode, estimator), its classes and input shape
    the data's, and the run records ``model.arch = "custom"`` with the network's spec in every
    checkpoint, so ``load_run``, ``evaluate``, ``export`` and ``resume`` rebuild it from there.

    The data are ``cfg.data``'s — or given: ``data`` (a :class:`~pruning.data.DataSplits`, e.g. from
    :func:`pruning.userdata.from_datasets`, or a pair ``(train, test)`` of torch Datasets) is trained on
    with the same loaders (order a function of ``(seed, epoch)``, sharded over processes); the run records
    ``data.name = "custom"`` with the data's shape, classes and preprocessing, and a resume passes them again.

    ``dist``: this process's place in a data-parallel run (default: joined from the ``torchrun``
    environment; one process without it).

    >>> from pruning.config import load_config
    >>> cfg = load_config(None, ["data.train_subset=64", "data.test_subset=32", "train.epochs=1",
    ...                          "train.progress=false", "train.tensorboard=false", "export.enabled=false"])
    >>> report = Trainer(cfg, tmp_dir).fit()                                      # doctest: +SKIP
    >>> report["fPR"], report["test_accuracy"]                                    # doctest: +SKIP
    """

    def __init__(
        self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, model: GatedNetwork | None = None,
        dist: DistContext | None = None, data: DataSplits | tuple[Any, Any] | None = None,
    ) -> None:
        if model is not None:
            if resume:
                raise ValueError("resume rebuilds the network from its checkpoint; do not pass model= as well")
            cfg = _config_for_model(cfg, model)
        if data is not None:
            data = data if isinstance(data, DataSplits) else from_datasets(*data)
            cfg = config_for_data(cfg)
        self.cfg = cfg
        self.out = Path(out_dir)
        t = cfg.train
        self.dist = dist if dist is not None else init_distributed(t.device, t.dist_timeout_s)
        world = self.dist.world_size
        if t.batch_size % world:
            raise ValueError(f"train.batch_size = {t.batch_size} (the global batch) does not divide by the world "
                             f"size {world} (processes); use a multiple of {world}")
        self.device = self.dist.device(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        ckpt: dict[str, Any] | None = None
        if resume:
            ckpt = load_checkpoint(self.out / CHECKPOINT)  # CheckpointError: missing, damaged or foreign
            check_resume_config(from_dict(ckpt["config"]), cfg)
        seed_everything(t.seed)
        self.data = load_data(cfg, data)
        self.N = len(self.data.train)
        if ckpt is not None:
            try:
                self.model = network_from_checkpoint(ckpt, cfg)
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{self.out / CHECKPOINT}: the checkpoint's network record does not build "
                                      f"a network ({exc})") from None
        elif model is not None:
            check_network_fits(model.spec(), self.data.num_classes, tuple(self.data.input_shape), "the given network")
            self.model = model
        else:
            check_fits(cfg, self.data.num_classes, tuple(self.data.input_shape))  # ConfigError naming the field
            self.model = build_network(cfg, self.data.num_classes, tuple(self.data.input_shape))
        self.baseline_spec = self.model.spec()
        o = cfg.objective
        self.objective = Objective(
            self.baseline_spec, N=self.N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_,
            mode=cfg.model.mode, elementwise=o.elementwise, latency=latency_costs(cfg, self.baseline_spec),
        )
        self.meter = CostMeter(self.baseline_spec)
        self.progress = Progress()
        # no NaN/Inf weight, θ or BN statistic passes a step (pruning.guard); all processes decide together
        self.guard = FiniteGuard(reduce=self.dist.all_true if self.dist.active else None)
        # pruning audit (pruning.audit): records of what the ε-rule selects; with train.audit, flag, do not remove
        self.audit = PruningAudit(self.objective, eps=t.eps, estimator=cfg.model.estimator, window=t.audit_window,
                                  every=t.audit_every, counterfactual=t.audit)
        if ckpt is not None:
            restore_model(self.model, ckpt, t.eps, self.out)
        self.model.to(self.device)
        self.channels_last = resolve_channels_last(t.channels_last, self.device, self.model.spec())
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if t.sync_bn and self.dist.active:
            from .syncbn import convert

            convert(self.model)
        self.opt_w, self.opt_t = make_optimizers(cfg, self.model.weight_parameters(), self.model.gate_parameters())
        self._saved_at: tuple[int, int] | None = None  # (epoch, batch) of the last checkpoint
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
            self._saved_at = (self.progress.epoch, self.progress.batch)
        shard = {"rank": self.dist.rank, "world_size": world}
        self.loader = make_loader(
            self.data.train, t.batch_size, train=True, seed=t.seed, num_workers=cfg.data.num_workers,
            device=self.device, **shard,
        )
        self.test_loader = make_loader(
            self.data.test, t.eval_batch_size, train=False, seed=t.seed, num_workers=cfg.data.num_workers,
            device=self.device, **shard,
        )
        self.spec = self.model.spec()
        self._det_flops = self.meter.deterministic(self.spec)[0]
        # objective.target_fpr / target_ppr: γ_k ≥ 0 adapted each step (pruning.budget); its state is checkpointed
        self.budget = make_budget(cfg, self.meter, self.model, total_steps=t.epochs * len(self.loader),
                                  device=self.device)
        if self.budget is not None:
            try:
                if ckpt is not None:
                    self.budget.load_state_dict(ckpt["budget"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{self.out / CHECKPOINT}: the checkpoint's budget controller state does not "
                                      f"fit ({type(exc).__name__}: {str(exc)[:200]})") from None
            self.objective.gamma_factor = self.budget.factor
        #: what a training step runs forward through: the network, or its DDP wrapper (rebuilt after compaction)
        self.forward: torch.nn.Module = wrap_ddp(self.model, self.dist, self.device)
        self._gate_rng = torch.Generator(device=self.device)
        self.timer = RunTimer(self, None if ckpt is None else ckpt.get("timing"))  # measured step times
        self.stops = StopSignals()
        self._epoch_sums, self._epoch_cum = self._restore_epoch_sums()
        self._epoch_t0 = time.perf_counter() - self.progress.epoch_time_s
        self.log = RunLog(self.out, tensorboard=t.tensorboard, progress=t.progress,
                          purge_step=self.progress.global_step, writer=self.dist.is_writer)

    def _restore_epoch_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's running sums of the epoch in progress (:func:`~pruning.checkpoint.epoch_sums_row`)."""
        p, d = self.progress, self.dist
        row = epoch_sums_row(p.epoch_sums, d.rank, d.world_size) if p.batch else None
        sums = torch.tensor(row or [0.0] * EPOCH_SUMS, dtype=torch.float64, device=self.device)
        return sums, torch.tensor([p.epoch_cum_flops if p.batch else 0.0], dtype=torch.float64, device=self.device)

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
        """The checkpoint's contents (in a data-parallel run a collective: every process takes part)."""
        p = self.progress
        inside = p.batch > 0
        rows = self.dist.gather_rows(self._epoch_sums).tolist() if inside else []
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
                "events": p.events, "batch": p.batch, "epoch_sums": rows,
                "epoch_cum_flops": float(self._epoch_cum) if inside else 0.0,
                "epoch_time_s": time.perf_counter() - self._epoch_t0 if inside else 0.0,
            },
            "timing": self.timer.state(),  # measured step times (pruning.timing): differ between runs
            "rng": capture_rng(),
            "audit": self.audit.state_dict(),
            "budget": None if self.budget is None else self.budget.state_dict(),
            "loader": {"next_epoch": p.epoch, "seed": self.cfg.train.seed, "batch": p.batch,
                       "world_size": self.dist.world_size},
            "data": data_record(self.data),
            "network": network_record(self.baseline_spec, self.model),
        }

    def save_checkpoint(self) -> Path:
        """Write the checkpoint (rank 0; every process must call it) at the current step."""
        state = self.checkpoint_dict()
        path = self.out / CHECKPOINT
        if self.dist.is_writer:
            save_checkpoint(path, state)
        self._saved_at = (self.progress.epoch, self.progress.batch)
        return path

    def _last_checkpoint(self) -> str:
        if self._saved_at is None:
            return "No checkpoint was written yet."
        e, b = self._saved_at
        where = f"epoch {e + 1}, iteration {b}" if b else f"after epoch {e}"
        return f"The last good checkpoint ({self.out / CHECKPOINT}, {where}) is kept."

    def resume_hint(self) -> str:
        """The command that continues this run."""
        if self.dist.active or under_torchrun():
            return (f"torchrun --standalone --nproc_per_node={self.dist.world_size} -m pruning train "
                    f"--out {self.out} --resume")
        return f"python -m pruning train --out {self.out} --resume"

    def _diverged(self, what: str, epoch: int, iteration: int, spe: int, step: int) -> TrainingDiverged:
        """The error that stops a run: what went non-finite, where, and which checkpoint is kept."""
        return TrainingDiverged(f"{what} at epoch {epoch}, iteration {iteration}/{spe} (global step {step}); "
                                f"stopping. {self._last_checkpoint()}")

    # -- one epoch ----------------------------------------------------------------------------
    def _prune(self, epoch: int) -> bool:
        from .compaction import prune

        opts = [o for o in (self.opt_w, self.opt_t) if o is not None]
        step, eps = self.progress.global_step, self.cfg.train.eps
        thetas = self.model.gate_parameters()
        if self.dist.active and thetas:  # lock-step: every process decides on rank 0's θ, bit for bit
            agree(self.dist, prune_decision(thetas, eps), f"pruning decision at step {step}")
        flagged = self.audit.flag(self.model, self.spec, step=step, epoch=epoch)
        if self.cfg.train.audit:  # audit mode: flagged structures stay and keep training
            return False
        event = prune(self.model, eps, opts, step=step)
        self.audit.confirm(flagged, event)
        rec = _event_record(event, epoch, step)
        if rec is None:
            return False
        self.progress.events.append(rec)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.spec = self.model.spec()
        self._det_flops = self.meter.deterministic(self.spec)[0]
        self.forward = wrap_ddp(self.model, self.dist, self.device, previous=self.forward)  # new parameters
        self.timer.structure_changed(step)
        if self.cfg.train.sync_check_every:
            self._sync_check("prune")
        return True

    def _sync_check(self, where: str) -> None:
        """Parameter digests of every process compared (``train.sync_check_every``); a line in ``sync_check.csv``."""
        step = self.progress.global_step
        digests = check_in_sync(self.dist, self.model, f"step {step} (after {where})")
        self.log.sync_check(step, where, digests)

    def _gates_at(self, step: int) -> torch.Generator:
        """The generator of the gate samples of iteration ``step`` on this process (:func:`gate_seed`)."""
        return self._gate_rng.manual_seed(gate_seed(self.cfg.train.seed, self.dist.rank, step))

    def _after_step(self, epoch: int, spe: int) -> None:
        """Mid-epoch checkpoint (``train.checkpoint_every``), cross-process check, clean stop on a signal."""
        t, p = self.cfg.train, self.progress
        if t.sync_check_every and p.global_step % t.sync_check_every == 0:
            self._sync_check("step")
        saved = False
        if t.checkpoint_every and p.global_step % t.checkpoint_every == 0 and p.batch < spe:
            self.save_checkpoint()
            saved = True
        signum = self.stops.agreed(self.dist)
        if signum:
            if not saved:
                self.save_checkpoint()
            self.dist.barrier()  # every process leaves once the checkpoint is on disk
            raise RunInterrupted(signum, epoch + 1, p.batch, self.resume_hint())

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data (epoch ``epoch``, 0-based); returns mean training statistics.

        Starts at batch ``progress.batch`` (non-zero after resuming from a mid-epoch checkpoint).
        In a data-parallel run this process trains on its part of every global batch; the
        returned statistics are those of the whole batches (summed over the processes).
        """
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        model, dev, world = self.model, self.device, self.dist.world_size
        spe = len(self.loader)
        amp = t.amp_bf16
        model.train()
        start = p.batch
        if start == 0:
            self._epoch_sums.zero_()
            self._epoch_cum.zero_()
        sums, cum = self._epoch_sums, self._epoch_cum
        average = self.dist.average if self.dist.active else None
        # the rate of the epoch's last step so far (a resume at the end of an epoch runs no step of it)
        lr = lr_at(cfg, p.global_step - 1 if start else p.global_step, spe)
        bar = self.log.bar(spe, f"epoch {epoch + 1}/{t.epochs}")
        if bar is not None and start:
            bar.update(start)
        try:
            for i, (x, y) in enumerate(self.loader.iter_epoch(epoch, start), start=start):
                x, y = to_device(x, y, dev, self.channels_last)
                self.timer.before_step(x, y)
                lr = lr_at(cfg, p.global_step, spe)
                for g in self.opt_w.param_groups:
                    g["lr"] = lr
                ef = self.meter.expected_flops(model, self.spec)  # E[F] at the θ of this sample (Figure 4)
                if self.budget is not None:  # γ_k from the cost at θ_k (pruning.budget)
                    self.objective.gamma_factor = self.budget.control(self.meter, model, self.spec, p.global_step)
                observe = t.audit_every and p.global_step % t.audit_every == 0
                try:
                    with sampling_generator(self._gates_at(p.global_step)):
                        terms, out = algorithm1_step(
                            model, self.objective, x, y, self.opt_w, self.opt_t, spec=self.spec, amp=amp,
                            before_update=(lambda: self.audit.observe(model, self.spec)) if observe else None,
                            forward=self.forward, average=average,
                            guard=self.guard, where=(epoch + 1, i + 1, spe, p.global_step + 1),
                        )
                except NonFiniteObjective as err:
                    j, d, c = (float(v.detach()) for v in (err.terms.total, err.terms.data, err.terms.complexity))
                    what = (f"non-finite objective J={j:g} (mean loss {d:g}, C/N {c:g})" if not math.isfinite(j)
                            else "non-finite objective in another process")
                    raise self._diverged(what, epoch + 1, i + 1, spe, p.global_step + 1) from None
                if t.audit:
                    self.audit.track(model)
                b_mine = int(y.shape[0])
                b = b_mine * world  # the global batch (equal parts)
                cum += ef * b
                p.cum_flops_dense += self._det_flops * b
                p.samples += b
                with torch.no_grad():
                    sums += torch.stack([
                        terms.data.detach().double() * b_mine, terms.total.detach().double() * b_mine,
                        terms.complexity.detach().double() * b_mine, (out.argmax(1) == y).sum().double(),
                        torch.full((), float(b_mine), dtype=torch.float64, device=dev),
                    ])
                p.global_step += 1
                p.batch = i + 1
                self.timer.after_step(x, y)
                if p.global_step % t.prune_every == 0:
                    self.guard.settle()  # nothing non-finite is pruned
                    self._prune(epoch + 1)
                if bar is not None:
                    bar.update(1)
                if p.global_step % t.log_every == 0 and (t.progress or t.tensorboard):
                    mean = self.dist.all_reduce_sum(torch.stack([terms.data.detach(), terms.total.detach()]).double())
                    loss_now, j_now = (float(v) / world for v in mean)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_now:.3f}", layers=self.spec.depth, lr=f"{lr:.3g}")
                    self.log.iteration(p.global_step, {"train_loss": loss_now, "J": j_now, "lr": lr,
                                                       **({} if self.budget is None else {"gamma": self.budget.gamma})})
                self._after_step(epoch, spe)
            self.guard.settle()
        except NonFiniteUpdate as err:
            e, it, n, step = err.where
            raise self._diverged(
                f"non-finite weights, θ or BatchNorm statistics after the update "
                f"(first: {err.name or 'in another process'}; "
                f"optim.weights.lr = {cfg.optim.weights.lr:g} may be too large)", e, it, n, step,
            ) from None
        finally:
            if bar is not None:
                bar.close()
        totals = self.dist.all_reduce_sum(sums.clone())
        p.cum_flops += float(cum)
        p.batch = 0
        s = (totals[:4] / max(float(totals[4]), 1.0)).tolist()
        return {"train_loss": s[0], "train_J": s[1], "train_complexity": s[2], "train_acc": s[3], "lr": lr}

    def epoch_record(self, epoch: int, train_stats: dict[str, float], epoch_time: float) -> dict[str, Any]:
        p, spec, meter = self.progress, self.spec, self.meter
        test_loss, test_acc = self.evaluate(self.model)
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
            **({} if self.budget is None else self.budget.record()),
        }
        return rec

    def evaluate(self, model: torch.nn.Module) -> tuple[float, float]:
        """Mean-field test loss and accuracy; sharded over the processes (rank 0's BatchNorm statistics)."""
        t = self.cfg.train
        sync_buffers(model, self.dist)
        return evaluate(model, self.test_loader, self.device, amp_bf16=t.amp_bf16, channels_last=self.channels_last,
                        all_reduce=self.dist.all_reduce_sum if self.dist.active else None)

    # -- the run --------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        """The run folder and its configuration echo: the one place where a run's start writes files (rank 0)."""
        if self.dist.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / CONFIG_ECHO, to_toml(self.cfg))

    def fit(self, stop_after: int | None = None) -> dict[str, Any] | None:
        """Train the remaining epochs; checkpoint and log each; write report and export at the end.

        ``stop_after`` ends the run (without report) once that many epochs are complete, as if it had
        been interrupted there; ``resume`` continues it.  SIGINT/SIGTERM stop it at the end of the
        current step with a checkpoint (:class:`~pruning.interrupt.RunInterrupted`); in a
        data-parallel run a process that is lost raises :class:`~pruning.distributed.PeerLost`.
        """
        t, p = self.cfg.train, self.progress
        self.prepare_run_dir()
        last = t.epochs if stop_after is None else min(stop_after, t.epochs)
        try:
            with self.stops:
                for epoch in range(p.epoch, last):
                    self._epoch_t0 = time.perf_counter() - (p.epoch_time_s if p.batch else 0.0)
                    stats = self.train_epoch(epoch)
                    self._prune(epoch + 1)
                    p.train_time_s += time.perf_counter() - self._epoch_t0
                    p.epoch = epoch + 1
                    rec = self.epoch_record(epoch + 1, stats, time.perf_counter() - self._epoch_t0)
                    end = (epoch + 1, len(self.loader), len(self.loader), p.global_step)  # where a failure is reported
                    p.log.append(rec)
                    failure = None
                    if not math.isfinite(rec["test_loss"]):  # all-reduced: every process sees the same
                        failure = (f"non-finite test loss ({rec['test_loss']}: the mean-field network's outputs "
                                   "overflow) in the end-of-epoch evaluation")
                    else:
                        try:
                            self.save_checkpoint()  # refuses NaN/Inf tensors (the last barrier; the guard settled)
                        except NonFiniteState as err:
                            failure = f"non-finite state at the epoch's end ({err})"
                    if failure is not None:
                        p.epoch, p.log = epoch, p.log[:-1]  # this epoch did not complete: no checkpoint, no report
                        raise self._diverged(failure, *end)
                    self.log.epoch(p.log, p.epoch)
        except RuntimeError as err:
            if self.dist.active and not isinstance(err, TrainingDiverged) and is_comm_failure(err):
                raise PeerLost(
                    f"rank {self.dist.rank} of {self.dist.world_size}: lost contact with another process at epoch "
                    f"{p.epoch + 1}, iteration {p.batch + 1} ({first_line(err)}); stopping. "
                    f"{self._last_checkpoint()} Resume with: {self.resume_hint()}"
                ) from None
            raise
        finally:
            self.log.close()
        if p.epoch < t.epochs:
            return None
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Export the deterministic network and write report.json / report.md (THEORY §5)."""
        from .report import build_report, write_report
        from .syncbn import revert

        revert(self.model)  # training is over: plain BatchNorm for the export
        writer = self.dist.is_writer
        exports: dict[str, str] = {}
        if self.cfg.export.enabled and writer:
            exports = export_run(self.model, self.out / self.cfg.export.dir, onnx=self.cfg.export.onnx,
                                 data=data_record(self.data))
        audit = self.audit.summary(self.model)
        if self.cfg.train.audit:
            audit["end_of_run_prune"] = end_of_run_prune(self.model, self.cfg.train.eps, self.evaluate,
                                                         self.meter.ratios)
        audit["files"] = self.audit.write(self.out, audit) if writer else {}
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
            processes=self.dist.world_size,
            samples=self.progress.samples,
            timing=self.timer.summary(self.progress.train_time_s),
            inference=inference_speedup(self, self.cfg.train.timing_steps),
        )
        if writer:
            write_report(self.out, report)
        return report


def _config_for_model(cfg: RunConfig, model: GatedNetwork) -> RunConfig:
    """``cfg`` with ``model.arch = "custom"`` for a network given in Python; its gating must be ``cfg``'s."""
    if not isinstance(model, GatedNetwork):
        raise TypeError(f"model must be a GatedNetwork (pruning.gate, from_spec or build_model), got "
                        f"{type(model).__name__}")
    m = cfg.model
    for key, have in (("mode", model.mode), ("estimator", model.estimator)):
        if getattr(m, key) != have:
            raise ValueError(f"model.{key} = {getattr(m, key)!r} but the given network was built with {key} "
                             f"{have!r}; set model.{key} = {have!r} or build the network with {getattr(m, key)!r}")
    return replace(cfg, model=replace(m, arch="custom", kwargs={}, spec=""))


def export_run(
    model: GatedNetwork, out_dir: Path, *, onnx: bool = False, data: dict[str, Any] | None = None
) -> dict[str, str]:
    """``export_deterministic`` + ``save_export`` (``onnx``: also ``model.onnx``); the written paths by kind.

    ``data``: the checkpoint's data record (:func:`pruning.build.data_record`): classes and preprocessing
    for the export's ``metadata.json``.

    >>> paths = export_run(model, Path("runs/x/export"))                         # doctest: +SKIP
    >>> torch.export.load(paths["program"]).module()(x)                          # doctest: +SKIP
    """
    from .export import export_deterministic, save_export

    require_finite(model, "an export")
    written = save_export(export_deterministic(model), out_dir, onnx=onnx, data=data)
    return {str(k): str(v) for k, v in written.items()}



def load_run(
    run_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[RunConfig, GatedNetwork, dict[str, Any]]:
    """The configuration, the model (compacted structure, trained state, eval mode) and the raw checkpoint.

    Works for every network — built-in, from a spec file or given in Python — as the checkpoint
    carries the network's spec (:func:`pruning.checkpoint.network_from_checkpoint`).  A missing,
    damaged or foreign checkpoint raises :class:`pruning.checkpoint.CheckpointError` naming the file.

    >>> cfg, model, ckpt = load_run("runs/default")                               # doctest: +SKIP
    >>> model.spec().depth, ckpt["progress"]["epoch"]                             # doctest: +SKIP
    """
    ckpt = load_checkpoint(run_dir)  # CheckpointError: missing, damaged or foreign
    cfg = from_dict(ckpt["config"])
    seed_everything(cfg.train.seed)
    try:
        model = network_from_checkpoint(ckpt, cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{run_dir}: the checkpoint's network record does not build a network ({exc})") from None
    restore_model(model, ckpt, cfg.train.eps, run_dir)
    model.to(device if isinstance(device, torch.device) else resolve_device(device))
    model.eval()
    return cfg, model, ckpt


class _Follower:
    """The run-folder session of a process that does not write (rank > 0): nothing to start or record."""

    def start(self, **_: Any) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


@contextmanager
def shared_session(
    out_dir: str | Path, dist: DistContext, *, resume: bool, overwrite: bool, argv: list[str] | None = None
) -> Iterator[RunSession | _Follower]:
    """The run folder's :class:`~pruning.rundir.RunSession`, held by the writing process (rank 0) alone.

    The other processes learn whether rank 0 could take the folder (one flag over the process group)
    and refuse with it, so a refused folder stops every process before anything is built.
    """
    if not dist.is_writer:
        if dist.any_flag(0):
            raise RunDirError(f"{out_dir}: the run folder was refused (rank 0 says why)")
        yield _Follower()
        return
    session = RunSession(out_dir, resume=resume, overwrite=overwrite, argv=argv)
    try:
        session.__enter__()
    except BaseException:
        dist.any_flag(1)
        raise
    dist.any_flag(0)
    try:
        yield session
    except BaseException as exc:  # leaving records the outcome and releases the lock
        session.__exit__(type(exc), exc, exc.__traceback__)
        raise
    session.__exit__(None, None, None)


def train(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
    model: GatedNetwork | None = None, argv: list[str] | None = None, dist: DistContext | None = None,
    data: DataSplits | tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or start over) a training run to the end in its locked folder; returns the report.

    ``model``: train this network instead of building ``cfg.model``; ``data``: train on these data
    (:func:`pruning.userdata.from_datasets`) instead of ``cfg.data`` (see :class:`Trainer`).  The folder
    rules of :class:`pruning.rundir.RunSession` apply (:class:`pruning.rundir.RunDirError`); only the
    writing process (rank 0) holds the folder.  Under ``torchrun`` every process calls this; the
    process group is joined here unless ``dist`` is given, and closed again.  ``argv``: the command
    line recorded in ``provenance.json`` (default ``sys.argv``).

    >>> report = train(load_config("experiments/configs/default.toml"), "runs/default")  # doctest: +SKIP
    >>> report["fPR"], report["test_accuracy"]                                    # doctest: +SKIP
    """
    own = dist is None
    if dist is None:
        dist = init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        with shared_session(out_dir, dist, resume=resume, overwrite=overwrite, argv=argv) as session:
            trainer = Trainer(cfg, out_dir, resume=resume, model=model, dist=dist, data=data)
            session.start(device=trainer.device, export_dirs=[cfg.export.dir])
            report = trainer.fit()
    finally:
        if own:
            dist.close()
    assert report is not None
    return report


__all__ = ["CONFIG_ECHO", "Progress", "RunInterrupted", "Trainer", "TrainingDiverged", "export_run", "load_run",
           "train"]
