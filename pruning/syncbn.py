"""Synchronised BatchNorm (``train.sync_bn``): batch statistics over the *global* batch of a data-parallel run.

Without it every process normalises with the statistics of its own part of the batch, so a run on
``N`` processes is not the run on one process with the same global batch (the gradients differ by
more than rounding).  With it, each BatchNorm in train mode gathers the per-process counts, means
and variances (one differentiable ``all_gather``; its backward sends every process the gradient
contributions of the others) and combines them exactly (the parallel form of the variance):

    μ = Σ_r n_r μ_r / n,        σ² = Σ_r n_r (σ_r² + (μ_r − μ)²) / n,        n = Σ_r n_r.

Torch's ``nn.SyncBatchNorm`` has no CPU kernel; this one is plain autograd around one
``all_gather`` (:class:`AllGatherRows`), so it runs on CPU (gloo) and CUDA (NCCL) alike.
:func:`convert` marks the BatchNorm modules of a network in place (their class becomes a
``Synced*`` subclass: same parameters, buffers and state-dict keys, so checkpoints, compaction and
export see ordinary BatchNorm); :func:`revert` undoes it.  Evaluation (eval mode) and
single-process runs use the ordinary computation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Marker base of the synchronised BatchNorm classes (see the module doc)."""

    process_group: Any = None

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        return batch_norm(self, input, self.weight, self.bias)


class SyncedBatchNorm1d(SyncedBatchNorm, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(SyncedBatchNorm, nn.BatchNorm2d):
    pass


_SYNCED: dict[type, type] = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d}
_PLAIN: dict[type, type] = {v: k for k, v in _SYNCED.items()}


def convert(model: nn.Module, process_group: Any = None) -> int:
    """Make every ``BatchNorm1d``/``BatchNorm2d`` of ``model`` synchronised (in place); returns how many."""
    n = 0
    for m in model.modules():
        cls = _SYNCED.get(type(m))
        if cls is not None:
            m.__class__ = cls
            m.process_group = process_group
            n += 1
    return n


def revert(model: nn.Module) -> None:
    """Undo :func:`convert` (plain BatchNorm classes again)."""
    for m in model.modules():
        cls = _PLAIN.get(type(m))
        if cls is not None:
            m.__class__ = cls
            m.__dict__.pop("process_group", None)


class AllGatherRows(torch.autograd.Function):
    """``x`` (1-D) of every process stacked by rank; backward: each process gets the sum over processes of
    the gradients of its row (every process's loss depends on every row)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        rows = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, x.contiguous(), group=group)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total[ctx.rank], None


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-average factor of this step (``num_batches_tracked`` advanced), as torch's BatchNorm does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``bn(x)`` with the affine pair ``(weight, bias)``; global-batch statistics when ``bn`` is synchronised.

    Ordinary BatchNorm semantics otherwise: batch statistics in train mode, running statistics in
    eval mode, running statistics and ``num_batches_tracked`` updated the same way.
    """
    bn._check_input_dim(x)
    factor = _momentum(bn)
    group = getattr(bn, "process_group", None) or (dist.group.WORLD if dist.is_initialized() else None)
    synced = (isinstance(bn, SyncedBatchNorm) and bn.training and dist.is_available() and dist.is_initialized()
              and dist.get_world_size(group) > 1)
    if not synced:
        use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                            weight, bias, use_batch, factor, bn.eps)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    n_local = x.numel() // c
    mean = xf.mean(dims)
    var = xf.var(dims, unbiased=False) if n_local else torch.zeros_like(mean)
    count = torch.full((1,), float(n_local), device=x.device)
    rows = AllGatherRows.apply(torch.cat([mean, var, count]), group)  # (world, 2C + 1)
    counts = rows[:, 2 * c :].detach()
    n = counts.sum()
    mu = (counts * rows[:, :c]).sum(0) / n
    var_g = (counts * (rows[:, c : 2 * c] + (rows[:, :c] - mu) ** 2)).sum(0) / n
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            unbiased = var_g * (n / (n - 1)) if float(n) > 1 else var_g
            bn.running_mean.mul_(1.0 - factor).add_(mu.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    shape = (1, c) + (1,) * (x.dim() - 2)
    y = (xf - mu.view(shape)) * torch.rsqrt(var_g.view(shape) + bn.eps)
    if weight is not None:
        y = y * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    return y.to(x.dtype)


__all__ = [
    "AllGatherRows", "SyncedBatchNorm", "SyncedBatchNorm1d", "SyncedBatchNorm2d", "batch_norm", "convert", "revert",
]
