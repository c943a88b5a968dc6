"""The optimisers of Algorithm 1 and the learning-rate schedule of the weights (THEORY §5, [14]–[15]).

SGD with momentum on ``W`` and Adam on ``Θ`` (paper, Table 1), or plain SGD with a constant step on
both (the setting of the ODE comparison).  The projection ``Π_H`` of [15] is applied by the step
(:func:`pruning.step.algorithm1_step`), not by the optimiser.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import RunConfig


def make_optimizers(
    cfg: RunConfig, weights: list[nn.Parameter], gates: list[nn.Parameter]
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """SGD(+momentum) on ``W`` and Adam on ``Θ`` (paper, Table 1), or plain SGD on both (``plain-sgd``).

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


__all__ = ["lr_at", "make_optimizers"]
