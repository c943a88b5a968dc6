"""Exact mean dynamics of a real (small) gated network: the projected ODE [22] of a torch model (THEORY §2, §5, §6).

For a gated residual MLP built by :func:`pruning.models.build_model` (``arch="residual_mlp"``,
``activation="tanh"``: ``f = g = tanh`` as in :mod:`theory.objective`) on a small fixed data set
``(X, Y)`` of ``N`` samples, and the training objective of the trainer
(:class:`pruning.objective.Objective`, ``J = L / N``)::

    J(W, Θ) = E_D E_{Ξ~q_Θ} ℓ  +  C(Θ) / N  +  (λ/N)/2 ||W||²                       [2.2] / N

this module evaluates ``J`` *exactly* with the one implementation of the objective,
:class:`theory.objective.ExactObjective` (float64, enumeration of all ``2^K`` gate masks),
differentiates it with torch autograd (``∇_W J`` and ``∇_Θ J``), and exposes the mean dynamics of
projected SGD with step ``η`` on ``J``::

    Ẇ = −∇_W J(W, Θ),      Θ̇ = −∇_Θ J(W, Θ) + z,      t = k η                          [22]

on a flat state vector ``y = [W; Θ]`` (``theta_slice`` points at ``Θ``).  The minimal correction
``z`` of [27] is :func:`theory.projection.projected_field`; as for every field of
:mod:`theory.ode`, :meth:`ExactDynamics.fun` returns the *unprojected* velocity ``−∇J`` and the
integrator applies the projection on ``theta_slice`` (:meth:`ExactDynamics.projected_velocity` is
the projected field itself, for checks).

State layout (:class:`StateLayout`): the weight arrays of :class:`theory.objective.Weights` in the
order ``W1[0], W2[0], W1[1], W2[1], …, head`` (row-major; ``W1 = [weight | bias]`` of the first
linear layer of a block, ``W2`` the bias-free second one, ``head = [weight | bias]`` of the
classifier), then ``Θ`` in the order of :class:`theory.objective.GateLayout` (block by block:
``θ_B``, the unit gates, the output gates), which is also the order of
:meth:`pruning.models.GatedNetwork.gates`.  :func:`state_from_model` / :func:`load_state` move a
model's parameters to and from that vector.

The torch model's semantics and the exact objective agree by construction and by test
(``tests/test_exact.py``): for every gate mask ``ξ`` the model's forward loss with the gates fixed
to ``ξ`` equals :meth:`ExactObjective.sample_losses` row ``ξ``, so ``E`` is the
``P(ξ|Θ)``-weighted average of the model's losses over the ``2^K`` forced masks; the expectation
of the exact-difference estimator (:meth:`GatedNetwork.exact_gate_grads`) over its gate sample is
``∂E/∂θ``; the mean-field forward (eval mode) is *not* ``E`` (the network is nonlinear in ``ξ``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from theory.complexity import Coefficients
from theory.objective import ExactObjective, GateLayout, Weights
from theory.projection import project, projected_field

from .gates import has_block_gates, has_unit_gates
from .models import GatedNetwork
from .objective import Objective

#: Per-sample losses shared by the torch model and :class:`theory.objective.ExactObjective`.
LOSSES = ("cross_entropy", "squared")


def squared_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``ℓ = ½ ||y − ŷ||²`` (the squared loss of THEORY §7 / :mod:`theory.objective`)."""
    return 0.5 * F.mse_loss(output, target.to(output.dtype), reduction="sum") / output.shape[0]


def torch_loss(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The batch-mean torch loss matching ``ExactObjective(loss=kind)`` (targets: labels, resp. ``N × classes``)."""
    if kind == "cross_entropy":
        return F.cross_entropy
    if kind == "squared":
        return squared_loss
    raise ValueError(f"loss must be one of {', '.join(repr(k) for k in LOSSES)}; got {kind!r}")


# --------------------------------------------------------------------------------------------------
# The model's weights as theory.objective.Weights
# --------------------------------------------------------------------------------------------------


def check_model(model: GatedNetwork) -> None:
    """``ValueError`` unless ``model`` is an unpruned tanh residual MLP (the network of :mod:`theory.objective`)."""
    if not isinstance(model, GatedNetwork):
        raise ValueError(f"model must be a GatedNetwork, got {type(model).__name__}")
    why = None
    if len(model.stem) or len(model.head) != 1 or model.head[0].op.bias is None:
        why = "it must have no stem and a linear head with bias (arch 'residual_mlp')"
    for l, block in enumerate(model.blocks):
        if why:
            break
        if not block.alive:
            why = f"block {l} was pruned (the exact objective needs every block)"
        elif not isinstance(block.out_act, nn.Tanh) or not isinstance(block.path[0].act, nn.Tanh):
            why = f"block {l} must use tanh (build_model(..., activation='tanh'): f = g = tanh)"
        elif block.path[0].bn is not None or block.path[1].bn is not None or block.path[1].act is not None:
            why = f"block {l} is not a plain fully-connected residual-MLP block"
    if why:
        raise ValueError(f"model is not supported by the exact objective: {why}")


def model_weight_tensors(model: GatedNetwork) -> list[tuple[Tensor, Tensor | None]]:
    """``(weight, bias)`` parameter pairs in the order of :meth:`Weights.arrays` (``W1[0], W2[0], …, head``)."""
    out: list[tuple[Tensor, Tensor | None]] = []
    for block in model.blocks:
        first, second = block.path[0].op, block.path[1].op
        out += [(first.weight, first.bias), (second.weight, None)]
    head = model.head[0].op
    out.append((head.weight, head.bias))
    return out


def weights_of(model: GatedNetwork) -> Weights:
    """The model's weights as float64 :class:`Weights` (torch tensors, autograd-connected to the parameters)."""
    arrays = []
    for w, b in model_weight_tensors(model):
        a = w.double() if b is None else torch.cat([w.double(), b.double()[:, None]], dim=1)
        arrays.append(a)
    L = len(model.blocks)
    return Weights(tuple(arrays[0 : 2 * L : 2]), tuple(arrays[1 : 2 * L : 2]), arrays[-1])


def layout_of(model: GatedNetwork) -> GateLayout:
    """The :class:`GateLayout` of the model's gates (mode combined/layer/unit/none), order of ``model.gates()``."""
    spec = model.spec()
    units = has_unit_gates(model.mode)
    layout = GateLayout.for_spec(spec, block=has_block_gates(model.mode), units=units, outputs=units)
    K = sum(int(p.numel()) for p in model.gate_parameters())
    if layout.K != K:
        raise ValueError(f"model carries {K} gate parameters but its gate layout has {layout.K} gates")
    return layout


# --------------------------------------------------------------------------------------------------
# Flat state y = [W; Θ]
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateLayout:
    """Flatten/unflatten ``(W, Θ) ↔ y``: ``shapes`` of the :class:`Weights` arrays, then ``K`` gates."""

    shapes: tuple[tuple[int, int], ...]
    K: int

    @classmethod
    def of(cls, weights: Weights, K: int) -> StateLayout:
        return cls(tuple(tuple(int(s) for s in a.shape) for a in weights.arrays()), int(K))  # type: ignore[misc]

    @property
    def n_weights(self) -> int:
        return sum(r * c for r, c in self.shapes)

    @property
    def D(self) -> int:
        """Length of the state vector."""
        return self.n_weights + self.K

    @property
    def theta_slice(self) -> slice:
        """The ``Θ`` coordinates of ``y`` (for :mod:`theory.ode`)."""
        return slice(self.n_weights, self.D)

    @property
    def weight_slice(self) -> slice:
        return slice(0, self.n_weights)

    def flatten(self, weights: Weights, theta: Any) -> np.ndarray:
        """``(W, Θ) -> y`` (float64 numpy)."""
        parts = [_np(a).reshape(-1) for a in weights.arrays()] + [_np(theta).reshape(-1)]
        y = np.concatenate(parts)
        if y.shape != (self.D,):
            raise ValueError(f"(W, Θ) do not fit the state layout: {y.shape[0]} entries, expected {self.D}")
        return y

    def unflatten(self, y: Any, *, requires_grad: bool = False) -> tuple[Weights, Tensor]:
        """``y -> (W, Θ)`` as float64 torch leaf tensors (optionally requiring gradients)."""
        t = torch.as_tensor(np.asarray(y, dtype=np.float64) if not torch.is_tensor(y) else y, dtype=torch.float64)
        if t.shape != (self.D,):
            raise ValueError(f"state y must have shape ({self.D},), got {tuple(t.shape)}")
        arrays, at = [], 0
        for r, c in self.shapes:
            arrays.append(t[at : at + r * c].reshape(r, c).detach().clone().requires_grad_(requires_grad))
            at += r * c
        theta = t[at:].detach().clone().requires_grad_(requires_grad)
        L = (len(arrays) - 1) // 2
        return Weights(tuple(arrays[0 : 2 * L : 2]), tuple(arrays[1 : 2 * L : 2]), arrays[-1]), theta


def _np(x: Any) -> np.ndarray:
    return (x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)).copy()


def state_from_model(model: GatedNetwork) -> np.ndarray:
    """The model's ``(W, Θ)`` as the flat float64 state ``y`` of :class:`StateLayout`."""
    check_model(model)
    w = weights_of(model)
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.gate_parameters()])
    return StateLayout.of(w, theta.numel()).flatten(w, theta)


def state_reader(model: GatedNetwork) -> Callable[[], np.ndarray]:
    """A cheap ``() -> y`` equal to :func:`state_from_model` (parameter lists resolved once; for recording)."""
    check_model(model)
    pairs = model_weight_tensors(model)
    gates = model.gate_parameters()

    @torch.no_grad()
    def read() -> np.ndarray:
        parts = [w.reshape(-1) if b is None else torch.cat([w, b[:, None]], dim=1).reshape(-1) for w, b in pairs]
        parts += [q.reshape(-1) for q in gates]
        return torch.cat(parts).double().numpy().copy()

    return read


@torch.no_grad()
def load_state(model: GatedNetwork, y: Any) -> None:
    """Write the flat state ``y`` into the model's parameters (inverse of :func:`state_from_model`)."""
    check_model(model)
    gates = model.gate_parameters()
    layout = StateLayout.of(weights_of(model), sum(int(p.numel()) for p in gates))
    weights, theta = layout.unflatten(y)
    for (w, b), a in zip(model_weight_tensors(model), weights.arrays()):
        if b is None:
            w.copy_(a)
        else:
            w.copy_(a[:, :-1])
            b.copy_(a[:, -1])
    at = 0
    for p in gates:
        p.copy_(theta[at : at + p.numel()].reshape(p.shape))
        at += p.numel()


# --------------------------------------------------------------------------------------------------
# The exact objective and its projected gradient flow
# --------------------------------------------------------------------------------------------------


class ExactDynamics:
    """``J(W, Θ)`` of a torch model's architecture on ``(X, Y)``, exact, its gradient, and the ODE [22].

    ``objective``: the trainer's :class:`pruning.objective.Objective` (its ``N`` must be ``len(X)``;
    ``λ``, the coefficients ``(α_f, α_p, β)`` of [13] and the counting convention are taken from it,
    so the torch ``J`` and the exact ``J`` are the same function); ``loss``: ``"cross_entropy"``
    (``Y`` integer labels) or ``"squared"`` (``Y`` of shape ``N × classes``), matching
    ``objective.loss`` (see :func:`torch_loss`).  The model's parameters are not touched; its
    structure fixes the architecture and the state layout.
    """

    def __init__(self, model: GatedNetwork, X: Any, Y: Any, objective: Objective, *, loss: str = "cross_entropy"):
        check_model(model)
        torch_loss(loss)  # validates the name
        self.loss = loss
        self.spec = model.spec()
        self.gate_layout = layout_of(model)
        Xa = np.asarray(X.detach().cpu() if torch.is_tensor(X) else X, dtype=np.float64)
        if objective.N != Xa.shape[0]:
            raise ValueError(f"objective.N = {objective.N} must be the number of samples len(X) = {Xa.shape[0]} "
                             "(J = L / N over this fixed data set)")
        coeffs = objective.coeffs if objective.coeffs is not None else Coefficients(0.0, 0.0, 0.0)
        Ya = Y.detach().cpu().numpy() if torch.is_tensor(Y) else np.asarray(Y)
        self.exact = ExactObjective(
            self.spec, Xa, Ya, loss=loss, g="tanh", lam=objective.lam, coeffs=coeffs, layout=self.gate_layout,
            elementwise=objective.elementwise,
        )
        self.N = int(Xa.shape[0])
        self.layout = StateLayout.of(weights_of(model), self.gate_layout.K)
        self.nfev = 0

    # -- layout --------------------------------------------------------------------------------
    @property
    def D(self) -> int:
        return self.layout.D

    @property
    def K(self) -> int:
        return self.layout.K

    @property
    def theta_slice(self) -> slice:
        return self.layout.theta_slice

    @property
    def weight_slice(self) -> slice:
        return self.layout.weight_slice

    # -- J and ∇J --------------------------------------------------------------------------------
    def _J(self, weights: Weights, theta: Tensor) -> Tensor:
        return self.exact.evaluate(weights, theta, grad=False).L / self.N

    def value(self, y: Any) -> float:
        """``J(W, Θ) = L / N`` at the state ``y`` (``Θ`` evaluated at ``Π_H(Θ)``, see :meth:`value_and_grad`)."""
        ya = np.array(y, dtype=np.float64)
        ya[self.theta_slice] = project(ya[self.theta_slice])
        weights, theta = self.layout.unflatten(ya)
        with torch.no_grad():
            return float(self._J(weights, theta))

    def value_and_grad(self, y: Any) -> tuple[float, np.ndarray]:
        """``J`` and ``∇J = (∇_W J, ∇_Θ J)`` by autograd through the exact objective (flat, like ``y``).

        ``Θ`` is evaluated at ``Π_H(Θ)`` (an integrator may step a rounding error outside ``H``; the
        multilinear ``J`` is then continued by its value on the nearest face).
        """
        ya = np.array(y, dtype=np.float64)
        ya[self.theta_slice] = project(ya[self.theta_slice])
        weights, theta = self.layout.unflatten(ya, requires_grad=True)
        J = self._J(weights, theta)
        grads = torch.autograd.grad(J, [*weights.arrays(), theta])
        self.nfev += 1
        return float(J.detach()), np.concatenate([g.detach().numpy().reshape(-1) for g in grads])

    def grad(self, y: Any) -> np.ndarray:
        return self.value_and_grad(y)[1]

    def velocity(self, y: Any) -> np.ndarray:
        """The unprojected velocity ``−∇J(y)``; ``y`` of shape ``(D,)`` or ``(B, D)``."""
        ya = np.asarray(y, dtype=np.float64)
        if ya.ndim == 1:
            return -self.grad(ya)
        return np.stack([-self.grad(row) for row in ya.reshape(-1, self.D)]).reshape(ya.shape)

    def fun(self, t: float, y: Any) -> np.ndarray:
        """``fun(t, y)`` for :func:`theory.ode.odeint` / ``odeint_batch`` (with ``theta_slice``): ``−∇J``."""
        return self.velocity(y)

    def projected_velocity(self, y: Any, *, atol: float = 0.0) -> np.ndarray:
        """The right-hand side of [22]: ``−∇J`` with ``Θ`` components projected (:func:`projected_field`)."""
        ya = np.asarray(y, dtype=np.float64)
        v = self.velocity(ya)
        v[..., self.theta_slice] = projected_field(ya[..., self.theta_slice], v[..., self.theta_slice], atol=atol)
        return v

    # -- mask-by-mask view (for checks) ------------------------------------------------------------
    def mask_probabilities(self, y: Any) -> np.ndarray:
        """``P(ξ_k | Θ)`` of every mask ``k`` (rows of ``self.exact.masks``)."""
        return np.asarray(self.exact.mask_probs(np.asarray(y, dtype=np.float64)[self.theta_slice]))

    def mask_sample_losses(self, y: Any) -> np.ndarray:
        """``ℓ(y_n, NN(x_n; W, ξ_k))``, shape ``(2^K, N)``: the data term of ``J`` is ``P @ losses.mean(1)``."""
        weights, _ = self.layout.unflatten(y)
        with torch.no_grad():
            return self.exact.sample_losses(weights).numpy()


def masks_as_gate_values(model: GatedNetwork, mask: Sequence[float]) -> list[Tensor]:
    """Split one flat gate mask (length ``K``, order of ``model.gates()``) into one tensor per gate module."""
    out, at = [], 0
    for g in model.gates():
        n = int(g.theta.numel())
        out.append(torch.as_tensor(np.asarray(mask[at : at + n], dtype=np.float64)).reshape(g.theta.shape))
        at += n
    if at != len(mask):
        raise ValueError(f"mask has {len(mask)} entries, the model {at} gates")
    return out


__all__ = [
    "LOSSES",
    "ExactDynamics",
    "StateLayout",
    "check_model",
    "layout_of",
    "load_state",
    "masks_as_gate_values",
    "model_weight_tensors",
    "squared_loss",
    "state_from_model",
    "state_reader",
    "torch_loss",
    "weights_of",
]
