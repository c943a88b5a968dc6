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
"""

from __future__ import annotations

import csv
import io
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from theory.atomic import atomic_write, atomic_write_text
from theory.projection import project

from .audit import PruningAudit, end_of_run_prune
from .config import RunConfig, from_dict, to_toml
from .data import DataSplits, InMemoryDataset, load_dataset, make_loader
from .models import GatedNetwork, build_model
from .objective import CostMeter, Objective, ObjectiveTerms

CHECKPOINT = "checkpoint.pt"
LOG_CSV = "log.csv"
CONFIG_ECHO = "config.toml"
CHECKPOINT_VERSION = 1

#: Log columns that measure time; everything else must agree between a resumed and an uninterrupted run.
TIME_FIELDS = ("epoch_time_s", "wall_time_s")


class TrainingDiverged(RuntimeError):
    """The objective became NaN/Inf; the message names the epoch and iteration; the last checkpoint is kept."""


# --------------------------------------------------------------------------------------------------
# Devices, seeds, RNG state
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else CPU; ``"cuda"`` without a GPU falls back to CPU with a warning."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        import warnings

        warnings.warn("train.device = 'cuda' but no CUDA device is available; using the CPU", stacklevel=2)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global RNG is what third-party code uses
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Torch (CPU + CUDA), numpy and python RNG states as tensors/primitives (``weights_only`` loadable)."""
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_state[0]),
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# --------------------------------------------------------------------------------------------------
# Data and model from a configuration
# --------------------------------------------------------------------------------------------------


def load_data(cfg: RunConfig) -> DataSplits:
    """``load_dataset`` plus the optional deterministic subsets (first ``k`` examples) of ``[data]``."""
    d = cfg.data
    splits = load_dataset(d.name, d.root, **d.options)
    train, test = splits.train, splits.test
    if d.train_subset and d.train_subset < len(train):
        train = _first(train, d.train_subset)
    if d.test_subset and d.test_subset < len(test):
        test = _first(test, d.test_subset)
    return DataSplits(train, test, splits.num_classes, splits.input_shape, splits.name, splits.classes)


def _first(ds: Any, k: int) -> Any:
    if isinstance(ds, InMemoryDataset):
        return ds.subset(range(k))
    return torch.utils.data.Subset(ds, range(k))


def model_kwargs(cfg: RunConfig, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``[model.kwargs]`` with the shape arguments the data determine filled in when not given."""
    kw = dict(cfg.model.kwargs)
    arch = cfg.model.arch
    if arch == "resnet1d" and len(input_shape) == 2:
        kw.setdefault("in_channels", int(input_shape[0]))
        kw.setdefault("length", int(input_shape[1]))
    elif arch == "residual_mlp":
        kw.setdefault("in_features", int(math.prod(input_shape)))
        kw.setdefault("hidden", [64, 64, 64])
    elif arch in ("resnet20", "resnet56", "resnet110") and len(input_shape) == 3:
        kw.setdefault("in_channels", int(input_shape[0]))
        kw.setdefault("image_size", int(input_shape[-1]))
    elif arch == "resnet50" and len(input_shape) == 3:
        kw.setdefault("image_size", int(input_shape[-1]))
    for key in ("hidden", "stage_blocks", "widths"):
        if key in kw:
            kw[key] = [int(v) for v in kw[key]]
    return kw


def build_network(
    cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...], *, device: str | None = None
) -> GatedNetwork:
    """``build_model`` from ``[model]`` (``device="meta"``: structure only, no memory)."""
    m = cfg.model
    return build_model(
        m.arch,
        mode=m.mode,
        num_classes=num_classes,
        estimator=m.estimator,
        theta_init=m.theta_init,
        device=device,
        **model_kwargs(cfg, input_shape),
    )


# --------------------------------------------------------------------------------------------------
# Optimisers and the learning-rate schedule
# --------------------------------------------------------------------------------------------------


def make_optimizers(
    cfg: RunConfig, weights: list[nn.Parameter], gates: list[nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """SGD(+momentum) on ``W`` and Adam on ``Θ`` (seed Table 1), or plain SGD on both (``plain-sgd``).

    Weight decay is 0 here: the Gaussian prior ``(λ/N)/2 ||W||²`` is part of the objective.
    """
    o = cfg.optim
    if o.kind == "plain-sgd":
        opt_w = torch.optim.SGD(weights, lr=o.weights.lr, momentum=0.0, foreach=True)
        opt_t = torch.optim.SGD(gates, lr=o.theta.lr, momentum=0.0, foreach=True) if gates else None
        return opt_w, opt_t
    w = o.weights
    opt_w = torch.optim.SGD(weights, lr=w.lr, momentum=w.momentum, nesterov=w.nesterov, foreach=True)
    opt_t = _adam(gates, lr=o.theta.lr, betas=(o.theta.betas[0], o.theta.betas[1])) if gates else None
    return opt_w, opt_t


def _adam(params: list[nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one call for all θ tensors), else ``foreach``.

    Torch's default on CPU is a Python loop over the parameters: dozens of small θ tensors.
    """
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, foreach=True, **kwargs)


def lr_at(cfg: RunConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of the weights at iteration ``step`` (0-based; a pure function of the step).

    ``cosine``: ``lr_min + ½(lr − lr_min)(1 + cos(π t/T))`` over all iterations; ``cosine-restarts``:
    the same within each segment delimited by ``restarts`` (epochs); ``step``: ``lr · decay^k`` after
    the ``k``-th milestone epoch; ``constant`` (and ``plain-sgd``): ``lr``.  ``warmup_epochs`` ramps
    linearly from ``lr/steps`` to the scheduled value.
    """
    w = cfg.optim.weights
    if cfg.optim.kind == "plain-sgd" or w.schedule == "constant":
        lr = w.lr
    else:
        spe = max(steps_per_epoch, 1)
        total = cfg.train.epochs * spe
        if w.schedule == "step":
            epoch = step // spe
            lr = w.lr * w.decay ** sum(1 for m in w.milestones if epoch >= m)
        else:
            bounds = [0] + ([r * spe for r in w.restarts] if w.schedule == "cosine-restarts" else []) + [total]
            k = max(i for i in range(len(bounds) - 1) if step >= bounds[i]) if step < total else len(bounds) - 2
            start, end = bounds[k], bounds[k + 1]
            t = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
            lr = w.lr_min + 0.5 * (w.lr - w.lr_min) * (1.0 + math.cos(math.pi * t))
    warm = w.warmup_epochs * steps_per_epoch
    if warm and step < warm and cfg.optim.kind != "plain-sgd":
        lr = lr * (step + 1) / warm
    return lr


# --------------------------------------------------------------------------------------------------
# Structure: recorded in the state itself, replayed onto a freshly built model
# --------------------------------------------------------------------------------------------------


def structure_of(model: GatedNetwork) -> dict[str, Any]:
    """The surviving structure as primitives: per block alive flag and the original ids of kept units."""
    blocks = []
    for block in model.blocks:
        units = []
        for g in block.unit_gates():
            units.append(None if g is None else [int(i) for i in g.unit_ids.tolist()])
        blocks.append({"name": block.name, "alive": bool(block.alive), "unit_ids": units})
    return {"blocks": blocks, "depth": model.spec().depth}


def apply_structure(model: GatedNetwork, structure: dict[str, Any], eps: float) -> None:
    """Bring a freshly built ``model`` to a recorded structure with the pruning rule itself.

    Gates of removed units and blocks are set to 0, all others to 1, and
    :func:`pruning.compaction.prune` removes exactly those structures (parameters
    are overwritten by the checkpoint's state afterwards).
    """
    from .compaction import prune

    if len(structure["blocks"]) != len(model.blocks):
        raise ValueError(
            f"checkpoint structure has {len(structure['blocks'])} blocks, the model {len(model.blocks)}"
        )
    with torch.no_grad():
        for block, rec in zip(model.blocks, structure["blocks"]):
            if not block.alive:
                continue
            units = block.unit_gates()
            if not rec["alive"]:
                if block.block_gate is not None:
                    block.block_gate.theta.fill_(0.0)
                for g in units:
                    if g is not None:
                        g.theta.fill_(0.0)
                continue
            for g, kept in zip(units, rec["unit_ids"]):
                if g is None or kept is None:
                    continue
                keep = torch.zeros_like(g.theta)
                keep[torch.as_tensor(kept, dtype=torch.long)] = 1.0
                g.theta.copy_(keep)
    prune(model, eps, [])


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def autocast_ctx(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device, *, amp_bf16: bool = False,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Mean-field evaluation (every gate replaced by its θ, §5): mean cross-entropy and accuracy."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = _to_device(x, y, device, channels_last)
            with autocast_ctx(device, amp_bf16):
                out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out.float(), y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            count += int(y.shape[0])
    finally:
        model.train(was_training)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool) -> Any:
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def theta_stats(values: list[torch.Tensor], prefix: str) -> dict[str, float]:
    """min/mean/max and the fraction below 0.5 of a set of gate parameters (NaN when there are none)."""
    if not values:
        return {f"{prefix}_min": math.nan, f"{prefix}_mean": math.nan, f"{prefix}_max": math.nan,
                f"{prefix}_frac_lt_half": math.nan}
    v = torch.cat([t.detach().reshape(-1).float().cpu() for t in values])
    return {
        f"{prefix}_min": float(v.min()),
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_max": float(v.max()),
        f"{prefix}_frac_lt_half": float((v < 0.5).float().mean()),
    }


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


class NonFiniteObjective(FloatingPointError):
    """The objective of one step was NaN/Inf (raised before any parameter changed)."""

    def __init__(self, terms: ObjectiveTerms) -> None:
        super().__init__("non-finite objective")
        self.terms = terms


def algorithm1_step(
    model: GatedNetwork,
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    opt_w: torch.optim.Optimizer,
    opt_t: torch.optim.Optimizer | None,
    *,
    spec: Any = None,
    amp: bool = False,
    before_update: Callable[[], object] | None = None,
) -> tuple[ObjectiveTerms, torch.Tensor]:
    """Steps 1–3 of Algorithm 1 on one mini-batch (the ε-rule, step 4, is the caller's).

    Forward with one gate sample (``model`` in train mode), ``J`` of [16] via
    ``objective``; back-propagation gives ``Ĝ_W`` [17] and, for ``θ``, the
    straight-through estimate plus ``∇C/N`` [18] — with the exact-difference
    estimator the unbiased estimate [19]–[21] of ``model.exact_gate_grads`` is
    added to ``∇C/N`` instead; ``before_update()`` sees the gradients; then the
    weight step, the ``θ`` step and ``Θ ← Π_H(Θ)`` [14]–[15].  Raises
    :class:`NonFiniteObjective` before touching any parameter if ``J`` is not
    finite.  Returns the objective terms and the network output.
    """
    dev = x.device
    with autocast_ctx(dev, amp):
        out = model(x)
    terms = objective(model, out, y, spec=spec)
    if not bool(torch.isfinite(terms.total.detach())):
        raise NonFiniteObjective(terms)
    opt_w.zero_grad(set_to_none=True)
    if opt_t is not None:
        opt_t.zero_grad(set_to_none=True)
    terms.total.backward()
    if opt_t is not None and model.estimator == "exact-difference":
        with autocast_ctx(dev, amp):
            est = model.exact_gate_grads(objective.loss, x, y)
        for q in model.gate_parameters():
            e = est[q].to(q.dtype)
            q.grad = e if q.grad is None else q.grad + e  # ∇C/N came from backward
    if before_update is not None:
        before_update()
    opt_w.step()
    if opt_t is not None:
        opt_t.step()
        with torch.no_grad():
            for q in model.gate_parameters():
                q.copy_(project(q))  # Π_H, eq. [15]
    return terms, out


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
            path = self.out / CHECKPOINT
            if not path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {path}")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            _check_resume_config(from_dict(ckpt["config"]), cfg)
        seed_everything(t.seed)
        self.data = load_data(cfg)
        self.N = len(self.data.train)
        self.model = build_network(cfg, self.data.num_classes, tuple(self.data.input_shape))
        self.baseline_spec = self.model.spec()
        o = cfg.objective
        self.objective = Objective(
            self.baseline_spec, N=self.N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_,
            mode=cfg.model.mode, elementwise=o.elementwise,
        )
        self.meter = CostMeter(self.baseline_spec)
        self.progress = Progress()
        # pruning audit (pruning.audit): records of what the ε-rule selects; with train.audit, flag, do not remove
        self.audit = PruningAudit(self.objective, eps=t.eps, estimator=cfg.model.estimator, window=t.audit_window,
                                  every=t.audit_every, counterfactual=t.audit)
        if ckpt is not None:
            apply_structure(self.model, ckpt["structure"], t.eps)
            self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.opt_w, self.opt_t = make_optimizers(cfg, self.model.weight_parameters(), self.model.gate_parameters())
        if ckpt is not None:
            self._load_optimizers(ckpt)
            self.progress = Progress(**ckpt["progress"])
            if ckpt.get("audit") is not None:
                self.audit.load_state_dict(ckpt["audit"], self.device)
            restore_rng(ckpt["rng"])
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
        self.writer: Any = None

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
        path = self.out / CHECKPOINT
        buf = io.BytesIO()
        torch.save(self.checkpoint_dict(), buf)
        atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=True)
        return path

    # -- logging ------------------------------------------------------------------------------
    def write_csv(self) -> None:
        rows = self.progress.log
        if not rows:
            return
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]

        def write(fh: Any) -> None:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})

        atomic_write(self.out / LOG_CSV, write)

    def _tb(self) -> Any:
        if self.writer is None and self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.progress.global_step or None)
        return self.writer

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
        bar = _progress_bar(spe, f"epoch {epoch + 1}/{t.epochs}", enabled=t.progress)
        try:
            for i, (x, y) in enumerate(self.loader.iter_epoch(epoch)):
                x, y = _to_device(x, y, dev, t.channels_last)
                lr = lr_at(cfg, p.global_step, spe)
                for g in self.opt_w.param_groups:
                    g["lr"] = lr
                ef = self.meter.expected_flops(model, self.spec)  # E[F] at the θ of this sample (Figure 4)
                observe = t.audit_every and p.global_step % t.audit_every == 0
                try:
                    terms, out = algorithm1_step(
                        model, self.objective, x, y, self.opt_w, self.opt_t, spec=self.spec, amp=amp,
                        before_update=(lambda: self.audit.observe(model, self.spec)) if observe else None,
                    )
                except NonFiniteObjective as err:
                    j, d, c = (float(v.detach()) for v in (err.terms.total, err.terms.data, err.terms.complexity))
                    raise TrainingDiverged(
                        f"non-finite objective J={j:g} (mean loss {d:g}, C/N {c:g}) "
                        f"at epoch {epoch + 1}, iteration {i + 1}/{spe} "
                        f"(global step {p.global_step + 1}); stopping. "
                        + (f"The last good checkpoint ({self.out / CHECKPOINT}, after epoch {p.epoch}) is kept."
                           if p.epoch > 0 else "No checkpoint was written yet (the first epoch did not finish).")
                    ) from None
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
                    self._prune(epoch + 1)
                if bar is not None:
                    bar.update(1)
                if p.global_step % t.log_every == 0:
                    loss_now = float(terms.data.detach())
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_now:.3f}", layers=self.spec.depth, lr=f"{lr:.3g}")
                    if self._tb() is not None:
                        self.writer.add_scalar("iter/train_loss", loss_now, p.global_step)
                        self.writer.add_scalar("iter/J", float(terms.total.detach()), p.global_step)
                        self.writer.add_scalar("iter/lr", lr, p.global_step)
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
                p.log.append(rec)
                self.write_csv()
                if self._tb() is not None:
                    for k, v in rec.items():
                        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                            self.writer.add_scalar(f"epoch/{k}", v, p.epoch)
                    self.writer.flush()
                self.save_checkpoint()
                if t.progress:
                    _echo(rec)
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
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

    written = save_export(export_deterministic(model), out_dir)
    return {str(k): str(v) for k, v in written.items()}


def _check_resume_config(saved: RunConfig, given: RunConfig) -> None:
    """A resumed run must use the configuration it started with (display-only train keys may differ)."""
    free = {"progress", "tensorboard", "log_every", "out_dir", "device"}
    a, b = saved.to_dict(), given.to_dict()
    a["train"] = {k: v for k, v in a["train"].items() if k not in free}
    b["train"] = {k: v for k, v in b["train"].items() if k not in free}
    if a != b:
        diffs = [f"{s}.{k}" for s in a for k in set(a[s]) | set(b[s]) if a[s].get(k) != b[s].get(k)]
        raise ValueError(f"--resume: the configuration differs from the checkpoint's in {', '.join(sorted(diffs))}")


def _progress_bar(total: int, desc: str, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _echo(rec: dict[str, Any]) -> None:
    from tqdm import tqdm

    tqdm.write(
        f"epoch {rec['epoch']:>3}  loss {rec['train_loss']:.4f}  test {rec['test_acc'] * 100:5.2f}%  "
        f"layers {rec['layers']}  blocks {rec['blocks_alive']}  units {rec['units']}  "
        f"fPR {rec['fPR'] * 100:5.1f}%  pPR {rec['pPR'] * 100:5.1f}%  cost {rec['train_cost_ratio']:.3f}  "
        f"θ<½ {rec['theta_frac_lt_half']:.2f}  {rec['epoch_time_s']:.1f}s"
    )


# --------------------------------------------------------------------------------------------------
# Loading a finished (or interrupted) run
# --------------------------------------------------------------------------------------------------


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run(run_dir: str | Path, *, device: str = "cpu") -> tuple[RunConfig, GatedNetwork, dict[str, Any]]:
    """The configuration, the model (compacted structure, trained state) and the raw checkpoint of a run."""
    ckpt = load_checkpoint(run_dir)
    cfg = from_dict(ckpt["config"])
    seed_everything(cfg.train.seed)
    model = build_network(cfg, int(ckpt["data"]["num_classes"]), tuple(ckpt["data"]["input_shape"]))
    apply_structure(model, ckpt["structure"], cfg.train.eps)
    model.load_state_dict(ckpt["model"])
    model.to(resolve_device(device))
    model.eval()
    return cfg, model, ckpt


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a training run to the end; returns the report."""
    report = Trainer(cfg, out_dir, resume=resume).fit()
    assert report is not None
    return report


__all__ = [
    "CHECKPOINT",
    "LOG_CSV",
    "TIME_FIELDS",
    "Trainer",
    "TrainingDiverged",
    "apply_structure",
    "build_network",
    "capture_rng",
    "evaluate",
    "export_run",
    "load_checkpoint",
    "load_data",
    "load_run",
    "lr_at",
    "make_optimizers",
    "model_kwargs",
    "resolve_device",
    "restore_rng",
    "seed_everything",
    "structure_of",
    "train",
]

