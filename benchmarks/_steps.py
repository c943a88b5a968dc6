"""The two training steps the benchmarks compare: the library's (what the trainer runs) and plain torch's.

* :class:`LibraryStep` — the body of one iteration of :meth:`pruning.train.Trainer.train_epoch` on a
  fixed mini-batch, through the library itself: learning rate of the step, the ``E[F]`` bookkeeping
  of :class:`pruning.objective.CostMeter`, the per-step gate generator, then
  :func:`pruning.step.algorithm1_step` — forward, ``J`` (:class:`pruning.objective.Objective`,
  with ``C(Θ)/N`` in the gated modes), backward, the audit's Lemma-1 observation every
  ``train.audit_every`` steps (:meth:`pruning.audit.PruningAudit.observe`), SGD on ``W``, Adam +
  Π_H on ``Θ`` — then the epoch sums.  ``mode="none"`` is the library's plain network.
* :class:`PlainStep` (:mod:`_plain`) — a hand-written torch network of the same structure, trained by
  ``F.cross_entropy`` + ``torch.optim.SGD(momentum, weight_decay=λ/N)``: the reference.

Both take ``channels_last`` (4-D inputs and 2-D convolutions in the channels-last layout).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import _timing as T
import torch
from _plain import PlainStep

from pruning.audit import PruningAudit
from pruning.config import RunConfig
from pruning.gates import sampling_generator
from pruning.models import GatedNetwork, build_model
from pruning.objective import CostMeter, Objective, ObjectiveTerms
from pruning.optim import lr_at, make_optimizers
from pruning.step import algorithm1_step

#: Architectures at the benchmarks' input sizes: MNIST-1D (the embedded default) and CIFAR.
ARCHS: dict[str, dict[str, Any]] = {
    "resnet1d": {"arch": "resnet1d", "kwargs": {"length": 40, "in_channels": 1}, "shape": (1, 40)},
    "resnet20": {"arch": "resnet20", "kwargs": {}, "shape": (3, 32, 32)},
    "resnet56": {"arch": "resnet56", "kwargs": {}, "shape": (3, 32, 32)},
    "resnet110": {"arch": "resnet110", "kwargs": {}, "shape": (3, 32, 32)},
}


def batch_of(arch: dict[str, Any], batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A fixed random mini-batch ``(x, y)`` of ``arch``'s input shape (10 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *arch["shape"], generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


class _Marked:
    """The objective, marking the end of the forward pass and of ``J`` (phase breakdown only)."""

    def __init__(self, objective: Objective, mark: Callable[[str], None]) -> None:
        self.objective, self.mark = objective, mark

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)

    def __call__(self, *args: Any, **kwargs: Any) -> ObjectiveTerms:
        self.mark("forward")
        terms = self.objective(*args, **kwargs)
        self.mark("objective")
        return terms


class LibraryStep:
    """One trainer iteration on a fixed mini-batch (see module doc).

    ``model``: a prebuilt (e.g. compacted) network, else ``build_model(arch, mode)``.
    ``bookkeeping=False`` drops ``C(Θ)`` from ``J``, the ``E[F]`` meter and the audit; ``fold=False``
    makes the gates multiply the activations.
    """

    def __init__(self, arch: dict[str, Any], mode: str, batch: int, device: torch.device, *, N: int,
                 bookkeeping: bool = True, fold: bool = True, seed: int = 0, channels_last: bool = False,
                 model: GatedNetwork | None = None) -> None:
        cfg = RunConfig()
        torch.manual_seed(seed)
        if model is None:
            model = build_model(arch["arch"], mode=mode, num_classes=10, **arch["kwargs"])
        self.model = model.to(device)
        self.model.fold_gates = fold
        self.spec = self.model.spec()
        o, t = cfg.objective, cfg.train
        self.objective = Objective(self.spec, N=N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_,
                                   mode=mode if bookkeeping else "none", elementwise=o.elementwise)
        self.meter = CostMeter(self.spec)
        self.audit = PruningAudit(self.objective, eps=t.eps, estimator=self.model.estimator, window=t.audit_window,
                                  every=t.audit_every)
        self.every = t.audit_every if bookkeeping and mode != "none" else 0
        self.x, self.y = batch_of(arch, batch, device, seed)
        if channels_last and self.x.dim() == 4:
            self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.opt_w, self.opt_t = make_optimizers(cfg, self.model.weight_parameters(), self.model.gate_parameters())
        self.cfg, self.bookkeeping, self.device = cfg, bookkeeping, device
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.cum = torch.zeros(1, dtype=torch.float64, device=device)
        self.gen = torch.Generator(device=device)
        self.global_step = 0
        self.model.train()

    def __call__(self, marks: list[tuple[str, float, float]] | None = None) -> None:
        dev = self.device

        def mark(name: str) -> None:
            if marks is not None:
                T.sync(dev)
                marks.append((name, time.perf_counter(), time.thread_time()))

        model, x, y, step = self.model, self.x, self.y, self.global_step
        mark("start")
        lr = lr_at(self.cfg, step, 100)
        for g in self.opt_w.param_groups:
            g["lr"] = lr
        ef = self.meter.expected_flops(model, self.spec) if self.bookkeeping else torch.zeros((), device=dev)
        mark("bookkeeping")
        objective: Any = self.objective if marks is None else _Marked(self.objective, mark)
        observe = self.every and step % self.every == 0

        def before_update() -> None:
            if observe:
                self.audit.observe(model, self.spec)
            mark("backward")

        with sampling_generator(self.gen.manual_seed(step)):
            terms, out = algorithm1_step(model, objective, x, y, self.opt_w, self.opt_t, spec=self.spec,
                                         before_update=before_update if observe or marks is not None else None)
        mark("optimisers")
        b = int(y.shape[0])
        self.cum += ef * b
        with torch.no_grad():
            self.sums += torch.stack([
                terms.data.detach().double() * b, terms.total.detach().double() * b,
                terms.complexity.detach().double() * b, (out.argmax(1) == y).sum().double(),
                torch.full((), float(b), dtype=torch.float64, device=dev),
            ])
        self.global_step += 1
        mark("rest")


def plain_step(spec: Any, arch: dict[str, Any], batch: int, device: torch.device, *, N: int, seed: int = 0,
               channels_last: bool = False) -> PlainStep:
    """:class:`PlainStep` of ``spec`` on the same mini-batch as :class:`LibraryStep`, the run's SGD settings."""
    cfg = RunConfig()
    w = cfg.optim.weights
    x, y = batch_of(arch, batch, device, seed)
    return PlainStep(spec, x, y, lr=w.lr, momentum=w.momentum, weight_decay=cfg.objective.lambda_ / N,
                     nesterov=w.nesterov, channels_last=channels_last, seed=seed)


__all__ = ["ARCHS", "LibraryStep", "PlainStep", "batch_of", "plain_step"]
