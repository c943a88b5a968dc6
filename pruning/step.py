"""One iteration of Algorithm 1: steps 1–3 on one mini-batch (THEORY §5, [14]–[21]).

The ε-rule (step 4) is the caller's (:meth:`pruning.train.Trainer`, :func:`pruning.compaction.prune`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from theory.projection import project_

from .guard import FiniteGuard
from .models import GatedNetwork
from .objective import Objective, ObjectiveTerms
from .runtime import autocast_ctx


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
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    average: Callable[[list[torch.Tensor]], object] | None = None,
    guard: FiniteGuard | None = None,
    where: Any = None,
) -> tuple[ObjectiveTerms, torch.Tensor]:
    """Steps 1–3 of Algorithm 1 on one mini-batch (the ε-rule, step 4, is the caller's).

    Forward with one gate sample (``model`` in train mode), ``J`` of [16] via
    ``objective``; back-propagation gives ``Ĝ_W`` [17] and, for ``θ``, the
    straight-through estimate plus ``∇C/N`` [18] — with the exact-difference
    estimator the unbiased estimate [19]–[21] of ``model.exact_gate_grads`` is
    added to ``∇C/N`` instead; ``before_update()`` sees the gradients; then the
    weight step, the ``θ`` step and ``Θ ← Π_H(Θ)`` [14]–[15].  Raises
    :class:`NonFiniteObjective` before touching any parameter if ``J`` is not
    finite.  With a ``guard`` (:class:`pruning.guard.FiniteGuard`) the same host
    read also checks the previous step's update (raising
    :class:`pruning.guard.NonFiniteUpdate`), and this step's update is armed
    under the tag ``where``.  Returns the objective terms and the network output.

    Data-parallel runs (:mod:`pruning.distributed`): ``forward`` is the
    ``DistributedDataParallel`` wrapper of ``model`` (its backward averages
    ``∇W`` and ``∇Θ`` over the processes), and ``average`` averages a list of
    tensors over the processes in place — the exact-difference estimates, which
    do not pass through autograd.
    """
    dev = x.device
    with autocast_ctx(dev, amp):
        out = (model if forward is None else forward)(x)
    terms = objective(model, out, y, spec=spec, weight_grad=False)  # ∇ of (λ/N)/2 ||W||²: after backward
    if guard is not None:
        guard.check(terms)  # this J and the previous update: one host read
    elif not bool(torch.isfinite(terms.total.detach())):
        raise NonFiniteObjective(terms)
    opt_w.zero_grad(set_to_none=True)
    if opt_t is not None:
        opt_t.zero_grad(set_to_none=True)
    terms.total.backward()
    objective.add_weight_grad(model.weight_parameters())  # (λ/N) W, one foreach kernel (same gradient as autograd)
    if opt_t is not None and model.estimator == "exact-difference":
        with autocast_ctx(dev, amp):
            est = model.exact_gate_grads(objective.loss, x, y)
        if average is not None:
            average([est[q] for q in model.gate_parameters()])
        for q in model.gate_parameters():
            e = est[q].to(q.dtype)
            q.grad = e if q.grad is None else q.grad + e  # ∇C/N came from backward
    if before_update is not None:
        before_update()
    opt_w.step()
    if opt_t is not None:
        opt_t.step()
        with torch.no_grad():
            project_(model.gate_parameters())  # Π_H, eq. [15]: one foreach clip over every θ
    if guard is not None:
        guard.arm(model, where)
    return terms, out


__all__ = ["NonFiniteObjective", "algorithm1_step"]
