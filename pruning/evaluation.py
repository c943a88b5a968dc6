"""Evaluation of a gated network: the mean-field network of THEORY §5 and summary statistics of Θ."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .runtime import autocast_ctx, to_device


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device, *, amp_bf16: bool = False,
    channels_last: bool = False, all_reduce: Callable[[torch.Tensor], object] | None = None,
) -> tuple[float, float]:
    """Mean-field evaluation (every gate replaced by its θ, §5): mean cross-entropy and accuracy.

    Sharded (a data-parallel run, each process's loader holding its part of every batch):
    ``all_reduce`` sums the loss sum, correct count and sample count over the processes in place,
    so that every process returns the statistics of the whole split.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = to_device(x, y, device, channels_last)
            with autocast_ctx(device, amp_bf16):
                out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out.float(), y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            count += int(y.shape[0])
    finally:
        model.train(was_training)
    if all_reduce is not None:
        totals = torch.tensor([loss_sum, float(correct), float(count)], dtype=torch.float64, device=device)
        all_reduce(totals)
        loss_sum, correct, count = float(totals[0]), int(totals[1]), int(totals[2])
    return loss_sum / max(count, 1), correct / max(count, 1)


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


__all__ = ["evaluate", "theta_stats"]
