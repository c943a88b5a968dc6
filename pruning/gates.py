"""Bernoulli gates: the ``ξ`` of eq. [1] as torch modules (THEORY §1, §5).

Every gate is a Bernoulli random variable ``ξ ~ Bernoulli(θ)`` with a learned
probability ``θ ∈ [0, 1]`` stored as a float32 :class:`torch.nn.Parameter`.
Two kinds:

* :class:`UnitGate` — one gate per output channel / feature of a layer
  (``ξ_1``; also used for the optional output gates ``ξ_2`` of the residual
  MLP).  It multiplies axis 1 of its input: ``h = ξ ⊙ f(BN(conv(x)))``.
* :class:`BlockGate` — one scalar gate ``ξ_B`` multiplying a whole residual
  branch before it is added to the skip path.

Behaviour (one code path for every architecture):

* **train mode** — one Bernoulli sample per forward pass, shared by the whole
  mini-batch (eq. [16]: one gate sample ``Ξ_k`` per step);
* **eval mode** — mean field: ``ξ`` is replaced by ``θ`` (§5, "evaluation
  before convergence");
* **fixed** — :meth:`Gate.fix` pins ``ξ`` to a given value in either mode
  (used by the exact-difference estimator to force one gate on/off while the
  others keep one shared sample).

Gradient estimators of ``∂E/∂θ`` (§5, [19]–[21]):

* ``"straight-through"`` (default, first-order Taylor): the forward pass uses
  the sample ``ξ`` and the backward pass treats the gate as a multiplier,
  ``ξ_st = θ + (ξ − θ).detach()``, so back-propagation yields ``∂L̂/∂ξ`` at the
  sample as the gradient of ``θ`` (one autograd node, :class:`StraightThrough`:
  forward ``ξ``, backward the identity).
* ``"exact-difference"`` (unbiased): the forward pass uses the detached sample
  (``θ`` receives no autograd gradient); the estimate of ``∂E/∂θ`` comes from
  :meth:`pruning.models.GatedNetwork.exact_gate_grads` (two forward passes per
  gate, the gate forced on and off).

Sampling.  :meth:`Gate.draw` is the one sampler.  A network draws the samples of
all its gates with one ``bernoulli`` call per forward pass
(:func:`shared_sample`, used by :class:`pruning.models.GatedNetwork`): the same
distribution (independent ``Bernoulli(θ_i)``), one random-number kernel
instead of one per gate; a gate used outside such a pass draws its own.
Samples come from torch's global generator, or from the generator set with
:func:`sampling_generator` (the trainer gives every step of every process its
own stream, derived from the seed, the process's rank and the step).

``θ`` is initialised to ``theta_init`` (default 1.0: the starting network is
the full deterministic network; the paper's Table 1 value of the initial ``θ``
is not taken over).  Keeping ``θ`` inside ``[0, 1]`` is the trainer's job
(projection Π_H of [15], :func:`theory.projection.project`); the sampler
clamps defensively.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

#: Which gates a network carries (THEORY §4: layer-only and unit-only are faces of the hypercube).
MODES = ("combined", "layer", "unit", "none")
#: Estimators of ``∂E/∂θ`` (THEORY §5).
ESTIMATORS = ("straight-through", "exact-difference")

#: The generator every gate sample is drawn from (``None``: torch's global generator); see :func:`sampling_generator`.
_GENERATOR: list[torch.Generator | None] = [None]


@contextmanager
def sampling_generator(generator: torch.Generator | None) -> Iterator[None]:
    """Draw every gate sample inside the block from ``generator`` (on the gates' device)."""
    previous = _GENERATOR[0]
    _GENERATOR[0] = generator
    try:
        yield
    finally:
        _GENERATOR[0] = previous


def check_choice(field: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; else ``ValueError`` naming the field and the choices."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def has_block_gates(mode: str) -> bool:
    """``mode`` carries block gates ``ξ_B`` ("combined", "layer")."""
    return check_choice("mode", mode, MODES) in ("combined", "layer")


def has_unit_gates(mode: str) -> bool:
    """``mode`` carries unit gates ``ξ_1`` (and ``ξ_2`` where present) ("combined", "unit")."""
    return check_choice("mode", mode, MODES) in ("combined", "unit")


def _probability(theta: Tensor) -> Tensor:
    """``θ`` clamped to ``[0, 1]`` for ``bernoulli``, a NaN read as 0 (detached).

    ``θ`` is finite after every projected step unless the step diverged; the draw must not fail then,
    because the divergence is reported by :mod:`pruning.guard` in the same step, after the forward pass.
    """
    return theta.detach().nan_to_num(0.0).clamp(0.0, 1.0)


class StraightThrough(torch.autograd.Function):
    """``ξ_st``: the value ``ξ`` in the forward pass, the identity to ``θ`` in the backward pass.

    The same as ``θ + (ξ − θ).detach()`` (exactly: ``ξ`` itself is returned, and ``∂ξ_st/∂θ = 1``),
    in one autograd node instead of three operations.
    """

    @staticmethod
    def forward(ctx: Any, theta: Tensor, xi: Tensor) -> Tensor:  # noqa: ARG004 - Function signature
        return xi.view_as(xi)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad, None


class Gate(nn.Module):
    """Base class: ``θ`` parameter, sampling, mean field, straight-through, fixing."""

    def __init__(self, shape: tuple[int, ...], *, estimator: str = "straight-through", theta_init: float = 1.0):
        super().__init__()
        if not (isinstance(theta_init, (int, float)) and 0.0 <= float(theta_init) <= 1.0):
            raise ValueError(f"theta_init must lie in [0, 1], got {theta_init!r}")
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.theta = nn.Parameter(torch.full(shape, float(theta_init), dtype=torch.float32))
        self._fixed: Tensor | None = None
        # this forward pass's (sample, straight-through multiplier or None), drawn by shared_sample
        self._presampled: tuple[Tensor, Tensor | None] | None = None
        self.last_sample: Tensor | None = None

    # -- sampling ------------------------------------------------------------------------------
    def draw(self) -> Tensor:
        """One sample ``ξ ~ Bernoulli(θ)`` (detached, float32, shape of ``θ``)."""
        with torch.no_grad():
            return torch.bernoulli(_probability(self.theta), generator=_GENERATOR[0])

    def fix(self, value: Tensor | float | None) -> None:
        """Pin ``ξ`` to ``value`` (broadcast to ``θ``'s shape) in every mode; ``None`` releases it."""
        if value is None:
            self._fixed = None
            return
        v = torch.as_tensor(value, dtype=self.theta.dtype, device=self.theta.device)
        self._fixed = v.expand_as(self.theta).detach().clone()

    @property
    def fixed(self) -> Tensor | None:
        return self._fixed

    def multiplier(self) -> Tensor:
        """The value multiplying the activation in this forward pass (see module doc)."""
        if self._fixed is not None:
            return self._fixed
        if not self.training:
            return self.theta  # mean field
        state = self.__dict__  # plain attributes, written without nn.Module.__setattr__ (hot path)
        pre = state.get("_presampled")
        if pre is not None:
            state["_presampled"] = None  # one use: a second call in the same pass draws afresh
            state["last_sample"] = pre[0]
            return pre[0] if pre[1] is None else pre[1]
        xi = self.draw()
        state["last_sample"] = xi
        if self.estimator == "straight-through":
            return StraightThrough.apply(self.theta, xi)
        return xi

    def extra_repr(self) -> str:
        return f"shape={tuple(self.theta.shape)}, estimator={self.estimator!r}"


class UnitGate(Gate):
    """``n`` gates on axis 1 (channels / features) of the input: ``h ↦ ξ ⊙ h``."""

    unit_ids: Tensor

    def __init__(self, n: int, *, estimator: str = "straight-through", theta_init: float = 1.0):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"a UnitGate needs n >= 1 units, got {n!r}")
        super().__init__((n,), estimator=estimator, theta_init=theta_init)
        # Original unit indices (at construction), sliced along with θ by compaction: audit trail.
        self.register_buffer("unit_ids", torch.arange(n))

    @property
    def n(self) -> int:
        return int(self.theta.shape[0])

    def forward(self, h: Tensor) -> Tensor:
        m = self.multiplier().to(h.dtype)
        return h * m.reshape((1, -1) + (1,) * (h.dim() - 2))


class BlockGate(Gate):
    """A scalar gate on a residual branch: ``b ↦ ξ_B · b``."""

    def __init__(self, *, estimator: str = "straight-through", theta_init: float = 1.0):
        super().__init__((), estimator=estimator, theta_init=theta_init)

    def forward(self, b: Tensor) -> Tensor:
        return b * self.multiplier().to(b.dtype)


def gate_modules(module: nn.Module) -> list[Gate]:
    """All gate modules inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, Gate)]


@contextmanager
def shared_sample(gates: Sequence[Gate]) -> Iterator[None]:
    """Draw the samples of every sampling gate (train mode, not fixed) with one ``bernoulli`` call.

    Inside the block each such gate's next :meth:`Gate.multiplier` uses its share of that draw (the
    same law as :meth:`Gate.draw`: independent ``Bernoulli(θ_i)``, ``θ`` clamped to ``[0, 1]``);
    unused shares are discarded on exit.  A no-op when no gate samples.
    """
    live = [g for g in gates if g.training and g._fixed is None]
    if not live:
        yield
        return
    try:
        thetas = [g.theta for g in live]
        sizes = [t.numel() for t in thetas]
        st = any(g.estimator == "straight-through" for g in live)
        flat_parts = [t if t.dim() == 1 else t.reshape(-1) for t in thetas]
        flat = torch.cat(flat_parts) if len(flat_parts) > 1 else flat_parts[0]
        if not st:
            flat = flat.detach()
        with torch.no_grad():
            xi = torch.bernoulli(_probability(flat), generator=_GENERATOR[0])
        samples = xi.split(sizes)
        # straight-through: one autograd node for every gate (the identity to the concatenated θ)
        multipliers = StraightThrough.apply(flat, xi).split(sizes) if st else samples
        for g, t, sample, mult in zip(live, thetas, samples, multipliers):
            if t.dim() != 1:
                sample, mult = sample.view(t.shape), mult.view(t.shape)
            # a plain attribute, written without nn.Module.__setattr__ (hot path)
            g.__dict__["_presampled"] = (sample, mult if g.estimator == "straight-through" else None)
        yield
    finally:
        for g in live:
            g.__dict__["_presampled"] = None


@contextmanager
def fixed_gates(gates: Iterable[Gate], values: Iterable[Tensor | float | None]) -> Iterator[None]:
    """Temporarily pin each gate to its value; restores the previous pins on exit."""
    gates = list(gates)
    previous = [g.fixed for g in gates]
    try:
        for g, v in zip(gates, values):
            g.fix(v)
        yield
    finally:
        for g, v in zip(gates, previous):
            g.fix(v)


__all__ = [
    "ESTIMATORS",
    "MODES",
    "BlockGate",
    "Gate",
    "StraightThrough",
    "UnitGate",
    "check_choice",
    "fixed_gates",
    "gate_modules",
    "has_block_gates",
    "has_unit_gates",
    "sampling_generator",
    "shared_sample",
]
