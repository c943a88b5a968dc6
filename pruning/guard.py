"""The non-finite guard: no NaN/Inf weight, ``θ``, BatchNorm statistic or objective passes training.

A step can go wrong in two places.  The objective ``J`` of a mini-batch can be non-finite (checked
before the backward pass, :class:`pruning.step.NonFiniteObjective`), and a finite ``J`` can still
give an update that makes parameters non-finite: with ``optim.weights.lr = 1e3`` ``J`` stays finite
while ``W`` and ``θ`` overflow.  :class:`FiniteGuard` closes the second gap without a host read of
its own on most steps, because the next step's ``J`` already is a check of the last update:

* ``J`` holds ``(λ/N)/2 ||W||²`` and ``C(Θ)/N``, and a NaN/Inf weight reaches the network output, so a
  non-finite ``W`` or ``θ`` after update ``k`` makes ``J`` of step ``k + 1`` non-finite; the gate sample
  of that step cannot fail on a NaN ``θ`` (the draw reads NaN as 0, :mod:`pruning.gates`) and
  :meth:`FiniteGuard.check` then names the first non-finite tensor and update ``k``
  (:class:`NonFiniteUpdate`);
* what ``J`` does not see — BatchNorm running statistics, and the last update before the loop leaves
  the step sequence — :meth:`FiniteGuard.settle` checks with one fused ``max |x|`` over every
  parameter and floating buffer (``torch._foreach_norm(ord=inf)``: no overflow, NaN/Inf propagate).
  The trainer settles before each ε-rule (every ``train.prune_every`` iterations, a point that
  synchronises anyway) and at every epoch end, so nothing non-finite is pruned, evaluated,
  checkpointed or exported;
* ``every = k`` also computes that flag after every ``k``-th update and reads it with the next ``J``
  (same single host read); ``benchmarks/bench_guard.py`` measures what that costs (the trainer keeps
  ``every = 0``).

Everything here is a function of local tensors: under data parallelism each rank computes its own
:meth:`FiniteGuard.flags`, and ``reduce`` (the trainer passes
:meth:`pruning.distributed.DistContext.all_true`) combines them in :meth:`FiniteGuard.decide`, so
that every process stops at the same step.
:func:`first_nonfinite` names the first non-finite tensor of a (nested) state for error messages and
for the last barrier before a checkpoint or an export is written (:func:`require_finite`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class NonFiniteUpdate(FloatingPointError):
    """An update left a parameter or buffer non-finite; ``where`` is the caller's tag of that step."""

    def __init__(self, where: Any, name: str | None) -> None:
        super().__init__(f"non-finite {name or 'state'} after the update of step {where!r}")
        self.where = where
        self.name = name


class NonFiniteState(FloatingPointError):
    """A state about to be written (checkpoint, export) holds NaN/Inf; nothing was written."""

    def __init__(self, what: str, name: str) -> None:
        super().__init__(f"refusing to write {what}: {name} holds NaN/Inf values")
        self.what = what
        self.name = name


def require_finite(state: Any, what: str) -> None:
    """Raise :class:`NonFiniteState` naming the first non-finite tensor of ``state`` (see :func:`first_nonfinite`)."""
    name = first_nonfinite(state)
    if name is not None:
        raise NonFiniteState(what, name)


def state_tensors(model: nn.Module) -> list[Tensor]:
    """Every parameter and floating-point buffer of ``model`` (what an update or a forward pass can spoil)."""
    out = [p for p in model.parameters()]
    out += [b for b in model.buffers() if b.is_floating_point()]
    return out


def finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """0-d bool tensor: every entry of ``tensors`` is finite.  No host synchronisation.

    One fused ``max |x|`` per dtype group (``torch._foreach_norm`` with ``ord = inf``), stacked and
    tested: a maximum of absolute values is finite iff every value is (no overflow, unlike a 2-norm).
    """
    live = [t.detach() for t in tensors if t.numel()]
    if not live:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(live, math.inf)
    return torch.stack(list(norms)).isfinite().all()


def first_nonfinite(state: Any, prefix: str = "") -> str | None:
    """The dotted name of the first floating tensor with a NaN/Inf entry in a nested state (``None``: all finite).

    ``state``: a module (its named parameters and buffers), a tensor, or dicts/lists/tuples of them.
    """
    if isinstance(state, nn.Module):
        for name, t in [*state.named_parameters(), *state.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
                return name
        return None
    if torch.is_tensor(state):
        if state.is_floating_point() or state.is_complex():
            return None if bool(torch.isfinite(state).all()) else (prefix or "tensor")
        return None
    items: Iterable[tuple[Any, Any]]
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


class FiniteGuard:
    """Finiteness of ``J`` and of the state after each update (see the module doc).

    Per step: ``check(terms)`` before the backward pass (one host read: this ``J``, and the pending
    flag of the previous update when ``every`` computed one), then ``arm(model, where)`` after the
    update.  ``settle()`` checks the whole state now.  A failure raises :class:`NonFiniteUpdate` (an
    update tagged ``where`` left the state non-finite) or :class:`pruning.step.NonFiniteObjective`.
    """

    def __init__(self, every: int = 0, *, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.every = every
        self.reduce = reduce  # flags of every process combined (data-parallel runs: all processes stop together)
        self._pending: Tensor | None = None
        self._where: Any = None
        self._model: nn.Module | None = None
        self._armed = 0

    def arm(self, model: nn.Module, where: Any = None) -> None:
        """After the update tagged ``where`` of ``model`` (with ``every``: the state's flag, no host read)."""
        self._where, self._model = where, model
        self._armed += 1
        if self.every and self._armed % self.every == 0:
            self._pending = finite_flag(state_tensors(model))

    def flags(self, total: Tensor | None = None) -> Tensor:
        """Local ``(2,)`` bool tensor ``[J finite, previous update finite]`` (distributed callers may all-reduce it)."""
        parts = [p for p in (None if total is None else torch.isfinite(total.detach()).all(), self._pending)
                 if p is not None]
        if not parts:
            return torch.ones(2, dtype=torch.bool)
        dev = parts[0].device
        one = torch.ones((), dtype=torch.bool, device=dev)
        ok_j = one if total is None else parts[0]
        ok_u = one if self._pending is None else self._pending.to(dev)
        return torch.stack([ok_j, ok_u])

    def decide(self, flags: Tensor, terms: Any = None) -> None:
        """Raise for the first failure ``flags`` records (an update before the objective); clears the pending flag.

        A non-finite ``J`` right after an update whose state is non-finite is reported as that update's.
        """
        if self.reduce is not None:
            flags = self.reduce(flags)
        ok_j, ok_u = (bool(v) for v in flags.tolist())
        self._pending = None
        if ok_j and ok_u:
            return
        name = None if self._model is None or self._armed == 0 else first_nonfinite(self._model)
        if not ok_u or name is not None:
            raise NonFiniteUpdate(self._where, name)
        from .step import NonFiniteObjective

        raise NonFiniteObjective(terms)

    def check(self, terms: Any) -> None:
        """``decide(flags(terms.total), terms)``: the step's one host read."""
        self.decide(self.flags(terms.total), terms)

    def settle(self) -> None:
        """Check the whole state now (parameters and floating buffers), if an update happened since the last time."""
        if self._model is None or self._armed == 0:
            return
        self._pending = finite_flag(state_tensors(self._model))
        self.decide(self.flags(None))
        self._armed = 0


__all__ = [
    "FiniteGuard",
    "NonFiniteState",
    "NonFiniteUpdate",
    "finite_flag",
    "first_nonfinite",
    "require_finite",
    "state_tensors",
]
