"""The exact objective of a small gated residual MLP: THEORY §1–§2, eqs. [1], [2.2], [9]–[12], [19]–[21].

For the network of :func:`theory.architectures.residual_mlp` (identity skips,
``f = tanh``, ``g`` = ``tanh`` or identity, a linear classifier head)

    z^0 = x,   z^l = ξ_2^l ⊙ g( z^{l-1} + ξ_B^l W_2^l (ξ_1^l ⊙ f(W_1^l ẑ^{l-1})) ),   logits = W_head ẑ^L     [1]

and data ``X`` (``N × m``), ``Y``, this module computes

    E(W, Θ) = N · mean_n Σ_ξ P(ξ | Θ) ℓ(y_n, NN(x_n; W, ξ))                  (the data term of [2.2])
    L(W, Θ) = E(W, Θ) + (λ/2) ||W||² + C(Θ)                                       [2.2], C from [11]

*exactly*, by enumerating all ``2^K`` gate masks ``ξ ∈ {0,1}^K``.  The two
factors are exposed separately so that the symbolic layer and the Theorem 3.1
checks can reuse them::

    E = mask_probabilities(θ, masks) @ mask_losses          P(ξ|Θ) = Π_j θ_j^{ξ_j} (1 − θ_j)^{1 − ξ_j}

``mask_losses[k] = Σ_n ℓ_n(ξ_k)`` is one batched forward pass of all masks
× all samples.  ``∂E/∂θ_j`` is the difference of conditional expectations
``E[ℓ | ξ_j = 1] − E[ℓ | ξ_j = 0]`` ([19]–[21]; for a unit gate it equals
``θ_B (E[ℓ | ξ_B=1, ξ_i=1] − E[ℓ | ξ_B=1, ξ_i=0]) = θ_B g_i`` because the
unit is irrelevant when its block is off), computed in closed form; ``∇_Θ C``
is the effective regularisation ``γ_B, θ_B γ_1`` of [12]/[18] from
:class:`theory.complexity.ComplexityModel`.

Gates.  A block's gates are laid out as :class:`~theory.complexity.BlockGates`
(``theta_B`` scalar, ``theta_1`` a 1-tuple holding the unit-gate vector,
``theta_2`` the optional output gates); an entry ``None`` is "not gated"
(fixed at 1), which gives the layer-only (``theta_1=None``) and unit-only
(``theta_B=None``) modes.  A :class:`GateLayout` fixes which gates are
present and their order in the flat vector ``θ ∈ [0, 1]^K``: block by block,
``θ_B``, then the unit gates, then the output gates.

Backends.  Every function runs on numpy float64 arrays and on float64 torch
tensors (torch is imported lazily, only when a torch tensor is passed; ``import
theory`` never imports torch), so torch autograd through :meth:`ExactObjective.evaluate`
gives ``∂L/∂W`` and ``∂L/∂Θ`` from this one implementation.
:func:`mask_probabilities` also accepts numpy object arrays of sympy symbols.

Losses: ``"squared"``: ``ℓ = ½ ||y − ŷ||²`` with ``Y`` of shape ``N × classes``
(the convention of §7); ``"cross_entropy"``: ``ℓ = −Σ_c y_c log softmax(ŷ)_c``
with ``Y`` integer labels of shape ``(N,)`` (or rows of class probabilities).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .complexity import BlockGates, Coefficients, ComplexityModel, GateGrads, validate_gates
from .latency import LatencyCosts
from .spec import NetworkSpec

Array = Any  # numpy.ndarray, torch.Tensor, or a numpy object array of sympy expressions

#: The exact objective enumerates ``2^K`` masks; it refuses layouts with more gates than this.
MAX_GATES = 16

LossKind = Literal["squared", "cross_entropy"]
OutActivation = Literal["tanh", "identity"]
_LOSSES = ("squared", "cross_entropy")
_ACTIVATIONS = ("tanh", "identity")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _any_torch(*xs: Any) -> bool:
    return any(_is_torch(x) for x in xs)


def _to_backend(x: Any, torch_mode: bool) -> Array:
    """``x`` as float64 numpy array, or as float64 torch tensor when ``torch_mode``."""
    if torch_mode:
        import torch

        if _is_torch(x):
            return x
        return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64)
    return np.asarray(x, dtype=float)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


# --------------------------------------------------------------------------------------------------
# Masks and their probabilities
# --------------------------------------------------------------------------------------------------


def mask_matrix(K: int) -> np.ndarray:
    """All ``2^K`` gate masks as a ``(2^K, K)`` float 0/1 matrix.

    Row ``k`` is the binary expansion of ``k`` with gate 0 the most significant
    bit, so ``v.reshape((2,) * K)`` puts gate ``j`` on axis ``j``.
    """
    if not isinstance(K, (int, np.integer)) or K < 0:
        raise ValueError(f"K must be a non-negative integer, got {K!r}")
    if K > MAX_GATES:
        raise ValueError(f"K={K} gates exceed MAX_GATES={MAX_GATES} (2^K masks are enumerated)")
    k = np.arange(2**K)[:, None]
    shifts = np.arange(K - 1, -1, -1)[None, :]
    return ((k >> shifts) & 1).astype(float)


def _factors(theta: Array, masks: Array) -> Array:
    """``θ_j^{ξ_j} (1 − θ_j)^{1 − ξ_j}`` for every mask and gate: shape ``batch + (2^K, K)``."""
    t = theta[..., None, :]
    return masks * t + (1 - masks) * (1 - t)


def mask_probabilities(theta: Array, masks: Array | None = None) -> Array:
    """``P(ξ | Θ) = Π_j θ_j^{ξ_j} (1 − θ_j)^{1 − ξ_j}`` for every mask (the polynomial weights of §4).

    ``theta`` has shape ``batch + (K,)`` (numpy, torch, or numpy object array
    of sympy symbols); the result has shape ``batch + (2^K,)`` and sums to 1.
    """
    if masks is None:
        masks = mask_matrix(int(theta.shape[-1]))
    masks = _masks_like(theta, masks)
    return _factors(theta, masks).prod(-1)


def _masks_like(theta: Array, masks: Array) -> Array:
    """Masks in the backend of ``theta``: torch tensor, integer array for symbolic (object) ``theta``."""
    if _is_torch(theta) and not _is_torch(masks):
        return _to_backend(masks, True)
    if isinstance(theta, np.ndarray) and theta.dtype == object and not _is_torch(masks):
        return np.asarray(masks).astype(int)
    return masks


def expectation_gradient(theta: Array, values: Array, masks: Array | None = None) -> Array:
    """``∂/∂θ_j Σ_ξ P(ξ|Θ) v(ξ) = E[v | ξ_j = 1] − E[v | ξ_j = 0]`` for every ``j`` ([19]–[21]).

    Written as ``Σ_ξ (2ξ_j − 1) Π_{k≠j} θ_k^{ξ_k}(1 − θ_k)^{1−ξ_k} v(ξ)``: no
    division by ``θ_j``, exact on the faces of ``H``.  ``theta``: ``(K,)``;
    ``values``: ``(2^K,)``; returns ``(K,)`` in the backend of the inputs.
    """
    K = int(theta.shape[-1])
    if masks is None:
        masks = mask_matrix(K)
    torch_mode = _any_torch(theta, values)
    if torch_mode:
        import torch

        masks = _to_backend(masks, True)
        values = _to_backend(values, True)
    else:
        masks = _masks_like(theta, masks)
    F = _factors(theta, masks)
    parts = []
    for j in range(K):
        others = F[..., :j].prod(-1) * F[..., j + 1 :].prod(-1)
        parts.append(((2 * masks[:, j] - 1) * others * values).sum(-1))
    if torch_mode:
        return torch.stack(parts, dim=-1) if parts else theta * 0
    if isinstance(theta, np.ndarray) and theta.dtype == object:
        return np.array(parts, dtype=object)
    return np.stack(parts, axis=-1) if parts else np.zeros_like(theta, dtype=float)


# --------------------------------------------------------------------------------------------------
# Gate layout: BlockGates <-> flat θ
# --------------------------------------------------------------------------------------------------


_Ranges = tuple[int | None, tuple[int, int] | None, tuple[int, int] | None]  # (θ_B index, θ_1 range, θ_2 range)


@dataclass(frozen=True)
class GateLayout:
    """Which gates of a residual-MLP spec are free parameters, and their order in the flat ``θ``.

    ``block[l]``: block ``l`` has a gate ``θ_B``; ``units[l]``: its unit gates
    ``θ_1`` are present; ``outputs[l]``: its output gates ``θ_2`` are present
    (needs ``spec.blocks[l].out_gated``).  Absent gates are fixed at 1.
    """

    spec: NetworkSpec
    block: tuple[bool, ...]
    units: tuple[bool, ...]
    outputs: tuple[bool, ...]
    _slots: tuple[tuple[int, str, int], ...] = field(init=False, repr=False, compare=False)
    _ranges: tuple[_Ranges, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        L = len(self.spec.blocks)
        for name in ("block", "units", "outputs"):
            if len(getattr(self, name)) != L:
                raise ValueError(f"GateLayout.{name} must have one flag per block ({L}), got {getattr(self, name)}")
        for l, b in enumerate(self.spec.blocks):
            if self.block[l] and not (b.gated and b.alive):
                raise ValueError(f"GateLayout.block[{l}]: block {l} carries no block gate")
            if self.units[l] and b.M != 1:
                raise ValueError(f"GateLayout.units[{l}]: block {l} must have exactly one unit-gated layer")
            if self.outputs[l] and not b.out_gated:
                raise ValueError(f"GateLayout.outputs[{l}]: block {l} carries no output gates (out_gated=False)")
        slots: list[tuple[int, str, int]] = []
        ranges: list[_Ranges] = []
        for l, b in enumerate(self.spec.blocks):
            iB = None
            r1 = r2 = None
            if self.block[l]:
                iB = len(slots)
                slots.append((l, "B", 0))
            if self.units[l]:
                start = len(slots)
                slots += [(l, "1", i) for i in range(b.unit_widths[0])]
                r1 = (start, len(slots))
            if self.outputs[l]:
                start = len(slots)
                slots += [(l, "2", i) for i in range(b.out_width)]
                r2 = (start, len(slots))
            ranges.append((iB, r1, r2))
        object.__setattr__(self, "_slots", tuple(slots))
        object.__setattr__(self, "_ranges", tuple(ranges))

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def for_spec(cls, spec: NetworkSpec, *, block: bool = True, units: bool = True, outputs: bool = True) -> GateLayout:
        """Every gate of ``spec`` of the selected kinds (``block=False``: unit-only, ``units=False``: layer-only)."""
        return cls(
            spec,
            tuple(block and b.gated and b.alive for b in spec.blocks),
            tuple(units and b.alive and b.M == 1 for b in spec.blocks),
            tuple(outputs and b.out_gated for b in spec.blocks),
        )

    @classmethod
    def of(cls, spec: NetworkSpec, gates: Sequence[BlockGates]) -> GateLayout:
        """The layout whose present gates are the non-``None`` entries of ``gates``."""
        if len(gates) != len(spec.blocks):
            raise ValueError(f"gates must have one entry per block ({len(spec.blocks)}), got {len(gates)}")
        units = []
        for l, g in enumerate(gates):
            if g.theta_1 is not None and len(g.theta_1) != 1:
                raise ValueError(f"gates[{l}].theta_1 must be a 1-tuple (one unit-gated layer), got {len(g.theta_1)}")
            units.append(g.theta_1 is not None and g.theta_1[0] is not None)
        return cls(
            spec,
            tuple(g.theta_B is not None for g in gates),
            tuple(units),
            tuple(g.theta_2 is not None for g in gates),
        )

    # -- structure -------------------------------------------------------------------------------
    @property
    def K(self) -> int:
        """Number of free gates."""
        return len(self._slots)

    @property
    def slots(self) -> tuple[tuple[int, str, int], ...]:
        """``(block, kind, unit)`` for every flat coordinate; kind is ``"B"``, ``"1"`` or ``"2"``."""
        return self._slots

    @property
    def names(self) -> tuple[str, ...]:
        """Readable coordinate names: ``theta_B[l]``, ``theta_1[l][i]``, ``theta_2[l][i]``."""
        return tuple(f"theta_B[{l}]" if k == "B" else f"theta_{k}[{l}][{i}]" for l, k, i in self.slots)

    def block_index(self, l: int) -> int | None:
        """Flat index of ``θ_B^l`` (``None`` if absent)."""
        return self._ranges[l][0]

    def unit_indices(self, l: int) -> range:
        """Flat indices of ``θ_1^l`` (empty if absent)."""
        r = self._ranges[l][1]
        return range(0) if r is None else range(*r)

    def output_indices(self, l: int) -> range:
        """Flat indices of ``θ_2^l`` (empty if absent)."""
        r = self._ranges[l][2]
        return range(0) if r is None else range(*r)

    # -- conversions -----------------------------------------------------------------------------
    def unflatten(self, theta: Array) -> list[BlockGates]:
        """Flat ``θ`` (shape ``batch + (K,)``) -> one :class:`BlockGates` per block (batch axes kept)."""
        if int(theta.shape[-1]) != self.K:
            raise ValueError(f"theta must have {self.K} entries in its last axis, got shape {tuple(theta.shape)}")
        out = []
        for iB, r1, r2 in self._ranges:
            out.append(
                BlockGates(
                    None if iB is None else theta[..., iB],
                    None if r1 is None else (theta[..., r1[0] : r1[1]],),
                    None if r2 is None else theta[..., r2[0] : r2[1]],
                )
            )
        return out

    def flatten(self, gates: Sequence[BlockGates]) -> Array:
        """:class:`BlockGates` per block -> flat ``θ`` (numpy or torch); ``ValueError`` if presence differs."""
        other = GateLayout.of(self.spec, gates)
        if other != self:
            raise ValueError(
                "gates do not match the objective's gate layout: expected present "
                f"block={self.block}, units={self.units}, outputs={self.outputs}; got "
                f"block={other.block}, units={other.units}, outputs={other.outputs}"
            )
        parts: list[Any] = []
        for g in gates:
            if g.theta_B is not None:
                parts.append(g.theta_B)
            if g.theta_1 is not None and g.theta_1[0] is not None:
                parts.append(g.theta_1[0])
            if g.theta_2 is not None:
                parts.append(g.theta_2)
        return _concat_vectors(parts)

    def flatten_grads(self, grads: Sequence[GateGrads]) -> Array:
        """:meth:`ComplexityModel.grad` output -> flat ``∇_Θ C`` in this layout's order."""
        parts: list[Any] = []
        for l, gg in enumerate(grads):
            if self.block[l]:
                parts.append(gg.theta_B)
            if self.units[l]:
                parts.append(gg.theta_1[0])
            if self.outputs[l]:
                parts.append(gg.theta_2)
        return _concat_vectors(parts)


def _concat_vectors(parts: list[Any]) -> Array:
    """Concatenate scalars and vectors into one flat vector (torch if any part is a tensor)."""
    if any(_is_torch(p) for p in parts):
        import torch

        return torch.cat([_to_backend(p, True).reshape(-1) for p in parts]) if parts else torch.zeros(0)
    if any(isinstance(p, np.ndarray) and p.dtype == object for p in parts):
        flat: list[Any] = []
        for p in parts:
            flat += list(np.asarray(p, dtype=object).reshape(-1))
        return np.array(flat, dtype=object)
    if not parts:
        return np.zeros(0)
    return np.concatenate([np.asarray(p, dtype=float).reshape(-1) for p in parts])


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """Weights of a residual MLP: per block ``W1`` (``n × (m+1)``, last column the bias), ``W2`` (``m × n``),
    and the head (``classes × (m+1)``, last column the bias), eq. [1]."""

    W1: tuple[Array, ...]
    W2: tuple[Array, ...]
    head: Array

    def sq_norm(self) -> Any:
        """``||W||²``: the sum of squares of every entry (biases included), the Gaussian prior of [2.2]."""
        total: Any = (self.head**2).sum()
        for a, b in zip(self.W1, self.W2):
            total = total + (a**2).sum() + (b**2).sum()
        return total

    def arrays(self) -> list[Array]:
        """All weight arrays: ``W1[0], W2[0], W1[1], W2[1], ..., head``."""
        out: list[Array] = []
        for a, b in zip(self.W1, self.W2):
            out += [a, b]
        return [*out, self.head]

    def to_torch(self, *, requires_grad: bool = False) -> Weights:
        """A float64 torch copy (leaf tensors, optionally requiring gradients)."""
        import torch

        def conv(x: Array) -> Any:
            t = torch.tensor(np.asarray(x.detach() if _is_torch(x) else x, dtype=float), dtype=torch.float64)
            return t.requires_grad_(requires_grad)

        return Weights(tuple(conv(a) for a in self.W1), tuple(conv(b) for b in self.W2), conv(self.head))

    @classmethod
    def random(cls, spec: NetworkSpec, rng: np.random.Generator, scale: float = 1.0) -> Weights:
        """I.i.d. ``N(0, scale² / fan_in)`` weights fitting ``spec`` (numpy)."""
        _check_spec(spec)
        m = spec.blocks[0].in_width if spec.blocks else spec.head[0].in_width
        W1, W2 = [], []
        for b in spec.blocks:
            n = b.unit_widths[0]
            W1.append(rng.normal(0.0, scale / math.sqrt(m + 1), (n, m + 1)))
            W2.append(rng.normal(0.0, scale / math.sqrt(n), (m, n)))
        head = rng.normal(0.0, scale / math.sqrt(m + 1), (spec.num_classes, m + 1))
        return cls(tuple(W1), tuple(W2), head)


def _check_spec(spec: NetworkSpec) -> None:
    """``ValueError`` unless ``spec`` is a residual MLP of §1 as built by :func:`residual_mlp`."""
    if not isinstance(spec, NetworkSpec):
        raise ValueError(f"spec must be a NetworkSpec, got {type(spec).__name__}")
    why = None
    if spec.stem:
        why = "it has stem layers"
    elif len(spec.head) != 1 or spec.head[0].kind != "linear" or not spec.head[0].bias:
        why = "its head must be one linear layer with bias"
    else:
        for l, b in enumerate(spec.blocks):
            p = b.path
            if (
                len(p) != 2
                or any(layer.kind != "linear" for layer in p)
                or not p[0].bias
                or p[1].bias
                or b.shortcut != "identity"
            ):
                why = f"block {l} is not a fully-connected identity-skip block (W_1 with bias, W_2 without)"
                break
    if why:
        raise ValueError(f"spec must be a residual MLP (theory.architectures.residual_mlp): {why}")


def validate_weights(spec: NetworkSpec, weights: Weights) -> None:
    """``ValueError`` naming the offending array if ``weights`` does not fit ``spec``."""
    if not isinstance(weights, Weights):
        raise ValueError(f"weights must be a Weights, got {type(weights).__name__}")
    L = len(spec.blocks)
    if len(weights.W1) != L or len(weights.W2) != L:
        raise ValueError(f"weights.W1 and weights.W2 must hold one matrix per block ({L}), got "
                         f"{len(weights.W1)} and {len(weights.W2)}")
    m = spec.head[0].in_width
    expected: list[tuple[str, Array, tuple[int, int]]] = []
    for l, b in enumerate(spec.blocks):
        n = b.unit_widths[0]
        expected += [(f"weights.W1[{l}]", weights.W1[l], (n, m + 1)), (f"weights.W2[{l}]", weights.W2[l], (m, n))]
    expected.append(("weights.head", weights.head, (spec.num_classes, m + 1)))
    for name, arr, shape in expected:
        if not hasattr(arr, "shape") or _shape(arr) != shape:
            got = _shape(arr) if hasattr(arr, "shape") else type(arr).__name__
            raise ValueError(f"{name} must have shape {shape}, got {got}")
        if _is_torch(arr):
            import torch

            if arr.dtype != torch.float64:
                raise ValueError(f"{name} must be a float64 tensor, got {arr.dtype}")
            finite = bool(torch.isfinite(arr.detach()).all())
        else:
            finite = bool(np.isfinite(np.asarray(arr, dtype=float)).all())
        if not finite:
            raise ValueError(f"{name} must be finite")


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveResult:
    """``L = E + weight_decay + C`` ([2.2]) and its gradient in ``Θ``.

    ``grad = ∂L/∂θ`` (flat, in :attr:`layout` order) ``= grad_E + grad_C``:
    the exact difference of conditional expectations [19]–[21] plus the
    effective regularisation [12]/[18].  ``None`` when not requested.  Values
    are numpy floats/arrays or torch tensors, following the inputs.
    """

    E: Any
    C: Any
    weight_decay: Any
    L: Any
    grad: Any
    grad_E: Any
    grad_C: Any
    layout: GateLayout

    def grad_gates(self) -> list[BlockGates]:
        """``∂L/∂Θ`` laid out as :class:`BlockGates` (one per block)."""
        if self.grad is None:
            raise ValueError("the gradient was not computed (evaluate(..., grad=False))")
        return self.layout.unflatten(self.grad)


def cost_spec(spec: NetworkSpec, g: str) -> NetworkSpec:
    """``spec`` as the complexity model [9] must count it when every block's output activation is ``g``.

    ``c_g`` (the output activation, THEORY §3) is a cost only if there is an activation: for
    ``g = "identity"`` each block gets ``out_act = False``; otherwise ``spec`` is returned unchanged.
    """
    if g != "identity" or not any(b.out_act for b in spec.blocks):
        return spec
    return dataclasses.replace(spec, blocks=tuple(dataclasses.replace(b, out_act=False) for b in spec.blocks))


class ExactObjective:
    """``L(W, Θ) = E(W, Θ) + (λ/2)||W||² + C(Θ)`` of [2.2] for a residual-MLP spec on fixed data.

    ``X``: ``N × m`` inputs; ``Y``: targets (see module doc); ``loss``:
    ``"squared"`` or ``"cross_entropy"``; ``g``: output activation
    ``"tanh"`` or ``"identity"`` (``f = tanh``); ``lam``: ``λ ≥ 0``;
    ``coeffs``: ``(α_f, α_p, β)`` of [11] (default all 0: no complexity
    term); ``layout``: which gates are free (default every gate of ``spec``);
    ``elementwise``: counting convention of the complexity model.  The output activation's cost
    ``c_g`` of [9] is charged only where ``g`` is applied: with ``g = "identity"`` the complexity model
    sees every block with ``out_act = False`` (:func:`cost_spec`).  ``latency``: a measured latency model
    (:mod:`theory.latency`) whose ``E[T]`` enters ``C`` with ``coeffs.alpha_t``.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        X: Array,
        Y: Array,
        *,
        loss: LossKind = "squared",
        g: OutActivation = "tanh",
        lam: float = 0.0,
        coeffs: Coefficients | None = None,
        layout: GateLayout | None = None,
        elementwise: bool = False,
        latency: LatencyCosts | None = None,
    ) -> None:
        _check_spec(spec)
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
        if g not in _ACTIVATIONS:
            raise ValueError(f"g must be one of {_ACTIVATIONS}, got {g!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if coeffs is not None and not isinstance(coeffs, Coefficients):
            raise ValueError(f"coeffs must be a Coefficients, got {type(coeffs).__name__}")
        self.spec = spec
        self.loss: LossKind = loss
        self.g: OutActivation = g
        self.lam = float(lam)
        self.coeffs = coeffs if coeffs is not None else Coefficients(0.0, 0.0, 0.0)
        self.layout = layout if layout is not None else GateLayout.for_spec(spec)
        if not isinstance(self.layout, GateLayout) or self.layout.spec != spec:
            raise ValueError("layout must be a GateLayout of the same spec")
        if self.layout.K > MAX_GATES:
            raise ValueError(
                f"layout: K={self.layout.K} gates exceed MAX_GATES={MAX_GATES}; the exact objective enumerates "
                "2^K gate masks (fix some gate kinds at 1 or use a smaller network)"
            )
        self.model = ComplexityModel(cost_spec(spec, g), elementwise=elementwise, latency=latency)
        self.masks = mask_matrix(self.layout.K)
        self.X, self.T = self._check_data(X, Y)
        self._torch_cache: dict[str, Any] = {}

    # -- data ------------------------------------------------------------------------------------
    def _check_data(self, X: Array, Y: Array) -> tuple[np.ndarray, np.ndarray]:
        m, C = self.spec.head[0].in_width, self.spec.num_classes
        Xa = np.asarray(X.detach() if _is_torch(X) else X, dtype=float)
        if Xa.ndim != 2 or Xa.shape[1] != m or Xa.shape[0] < 1:
            raise ValueError(f"X must have shape (N, {m}) with N >= 1, got {Xa.shape}")
        if not np.isfinite(Xa).all():
            raise ValueError("X must be finite")
        N = Xa.shape[0]
        Ya = np.asarray(Y.detach() if _is_torch(Y) else Y)
        if self.loss == "squared":
            if Ya.shape != (N, C):
                raise ValueError(f"Y must have shape (N, classes) = {(N, C)} for the squared loss, got {Ya.shape}")
            T = Ya.astype(float)
            if not np.isfinite(T).all():
                raise ValueError("Y must be finite")
        elif Ya.ndim == 1:
            if Ya.shape != (N,) or not np.issubdtype(Ya.dtype, np.integer) or Ya.min() < 0 or Ya.max() >= C:
                raise ValueError(f"Y must hold N={N} integer labels in [0, {C}) for the cross-entropy loss, got "
                                 f"shape {Ya.shape}, dtype {Ya.dtype}")
            T = np.eye(C)[Ya]
        else:
            T = Ya.astype(float)
            if T.shape != (N, C) or (T < 0).any() or not np.allclose(T.sum(1), 1.0):
                raise ValueError(f"Y must be labels (N,) or class-probability rows (N, {C}) for cross-entropy")
        return Xa, T

    @property
    def N(self) -> int:
        return int(self.X.shape[0])

    @property
    def K(self) -> int:
        return self.layout.K

    def _data(self, torch_mode: bool) -> tuple[Array, Array, Array]:
        if not torch_mode:
            return self.X, self.T, self.masks
        if not self._torch_cache:
            self._torch_cache = {k: _to_backend(v, True) for k, v in (("X", self.X), ("T", self.T), ("M", self.masks))}
        c = self._torch_cache
        return c["X"], c["T"], c["M"]

    # -- gates -----------------------------------------------------------------------------------
    def theta(self, gates: Array | Sequence[BlockGates]) -> Array:
        """Normalise ``gates`` (flat ``θ`` of shape ``(K,)`` or :class:`BlockGates` per block) to flat ``θ``.

        ``ValueError`` naming the argument if the layout, shape or range ``[0, 1]`` is wrong.
        """
        if isinstance(gates, (list, tuple)) and all(isinstance(g, BlockGates) for g in gates) and gates:
            validate_gates(self.spec, gates)
            return self.layout.flatten(gates)
        theta: Any = gates if _is_torch(gates) else np.asarray(gates, dtype=float)
        if theta.ndim != 1 or int(theta.shape[0]) != self.K:
            raise ValueError(f"theta must have shape ({self.K},), got {tuple(theta.shape)}")
        if _is_torch(theta):
            import torch

            if theta.dtype != torch.float64:
                raise ValueError(f"theta must be a float64 tensor, got {theta.dtype}")
            lo, hi = (float(theta.detach().min()), float(theta.detach().max())) if self.K else (0.0, 0.0)
        else:
            lo, hi = (float(theta.min()), float(theta.max())) if self.K else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"theta must lie in [0, 1] (Θ ∈ H), got values in [{lo:g}, {hi:g}]")
        return theta

    # -- forward over all masks ------------------------------------------------------------------
    def sample_losses(self, weights: Weights) -> Array:
        """``ℓ(y_n, NN(x_n; W, ξ_k))`` for every mask ``k`` and sample ``n``: shape ``(2^K, N)``, eq. [1]."""
        validate_weights(self.spec, weights)
        torch_mode = _any_torch(*weights.arrays())
        X, T, masks = self._data(torch_mode)
        tanh: Callable[[Any], Any]
        ones: Callable[[Any], Any]
        cat: Callable[[list[Any]], Any]
        if torch_mode:
            import torch

            tanh = torch.tanh
            ones = lambda shape: torch.ones(shape, dtype=torch.float64)
            cat = lambda xs: torch.cat(xs, dim=-1)
            weights = Weights(*(_to_backend_tuple(weights, True)))
        else:
            tanh = np.tanh
            ones = lambda shape: np.ones(shape)
            cat = lambda xs: np.concatenate(xs, axis=-1)
        xi = self.layout.unflatten(masks)
        z: Any = X[None, :, :]  # (1 or 2^K, N, m)

        def hat(z: Any) -> Any:
            return cat([z, ones((*z.shape[:-1], 1))])

        for l, gl in enumerate(xi):
            h = tanh(hat(z) @ weights.W1[l].T)  # f = tanh, f(0) = 0
            t1 = None if gl.theta_1 is None else gl.theta_1[0]
            if t1 is not None:
                h = h * t1[:, None, :]
            branch = h @ weights.W2[l].T
            if gl.theta_B is not None:
                branch = branch * gl.theta_B[:, None, None]
            u = z + branch  # identity skip S ẑ = z
            z = tanh(u) if self.g == "tanh" else u
            if gl.theta_2 is not None:
                z = z * gl.theta_2[:, None, :]
        logits = hat(z) @ weights.head.T  # (·, N, classes)
        if self.loss == "squared":
            losses = 0.5 * ((T[None] - logits) ** 2).sum(-1)
        else:
            if torch_mode:
                lse = torch.logsumexp(logits, dim=-1)
            else:
                top = logits.max(-1, keepdims=True)
                lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
            losses = lse * T.sum(-1) - (T * logits).sum(-1)
        if int(losses.shape[0]) != int(masks.shape[0]):  # defensive: broadcast to one row per mask
            losses = losses * ones((int(masks.shape[0]), 1))
        return losses

    def mask_losses(self, weights: Weights) -> Array:
        """``Σ_n ℓ_n(ξ_k)`` for every mask: ``(2^K,)``, so that ``E = mask_probs(θ) @ mask_losses`` ([2.2])."""
        return self.sample_losses(weights).sum(-1)

    def mask_probs(self, theta: Array | Sequence[BlockGates]) -> Array:
        """``P(ξ_k | Θ)`` for every mask: ``(2^K,)`` (see :func:`mask_probabilities`)."""
        th = self.theta(theta)
        return mask_probabilities(th, self._data(_is_torch(th))[2])

    def expected_loss(self, weights: Weights, theta: Array | Sequence[BlockGates]) -> Any:
        """``E(W, Θ) = N · mean_n E_Ξ ℓ``, the data term of [2.2], exact."""
        th = self.theta(theta)
        ml = self.mask_losses(weights)
        if _any_torch(th, ml):
            th, ml = _to_backend(th, True), _to_backend(ml, True)
        return mask_probabilities(th, self._data(_is_torch(th))[2]) @ ml

    def _align(self, ml: Array, theta: Any) -> Array:
        return _to_backend(ml, True) if (_is_torch(theta) and not _is_torch(ml)) else ml

    def grad_expected_loss(
        self, weights: Weights | None, theta: Array | Sequence[BlockGates], mask_losses: Array | None = None
    ) -> Array:
        """``∂E/∂θ_j = E[ℓ | ξ_j = 1] − E[ℓ | ξ_j = 0]`` (×N), [19]–[21]; pass ``mask_losses`` to reuse them."""
        th = self.theta(theta)
        if mask_losses is None:
            if weights is None:
                raise ValueError("weights or mask_losses must be given")
            mask_losses = self.mask_losses(weights)
        return expectation_gradient(th, mask_losses, self._data(_any_torch(th, mask_losses))[2])

    def conditional_loss(
        self, weights: Weights | None, theta: Array, fixed: dict[int, int], mask_losses: Array | None = None
    ) -> Any:
        """``E[Σ_n ℓ_n | ξ_j = s_j for j in fixed]`` = ``E`` with those ``θ_j`` set to ``s_j ∈ {0, 1}``."""
        th = self.theta(theta)
        if mask_losses is None:
            if weights is None:
                raise ValueError("weights or mask_losses must be given")
            mask_losses = self.mask_losses(weights)
        sel = np.zeros(self.K)
        val = np.zeros(self.K)
        for j, s in fixed.items():
            if s not in (0, 1) or not 0 <= j < self.K:
                raise ValueError(f"fixed must map gate indices in [0, {self.K}) to 0/1, got {j}: {s}")
            sel[j], val[j] = 1.0, float(s)
        if _is_torch(th):
            sel, val = _to_backend(sel, True), _to_backend(val, True)
        th2 = th * (1 - sel) + val
        return mask_probabilities(th2, self._data(_is_torch(th2))[2]) @ self._align(mask_losses, th2)

    def block_unit_differences(self, weights: Weights, theta: Array, l: int) -> tuple[Any, Array]:
        """``(g_B, g)`` of [19]–[21] for block ``l``: ``g_B = E[ℓ|ξ_B=1] − E[ℓ|ξ_B=0]``,
        ``g_i = E[ℓ|ξ_B=1, ξ_i=1] − E[ℓ|ξ_B=1, ξ_i=0]`` (needs θ_B and θ_1 of block ``l`` in the layout).

        Then ``∂E/∂θ_B = g_B`` and ``∂E/∂θ_1,i = θ_B g_i``.
        """
        iB = self.layout.block_index(l)
        units = self.layout.unit_indices(l)
        if iB is None or not len(units):
            raise ValueError(f"l: block {l} must have both a block gate and unit gates in the layout")
        ml = self.mask_losses(weights)
        th = self.theta(theta)
        gB = self.conditional_loss(None, th, {iB: 1}, ml) - self.conditional_loss(None, th, {iB: 0}, ml)
        gi = [
            self.conditional_loss(None, th, {iB: 1, j: 1}, ml) - self.conditional_loss(None, th, {iB: 1, j: 0}, ml)
            for j in units
        ]
        return gB, _concat_vectors([_as_1d(v) for v in gi])

    # -- complexity ------------------------------------------------------------------------------
    def complexity(self, theta: Array | Sequence[BlockGates]) -> Any:
        """``C(Θ)`` of [11] (constants of stem/head included), from :class:`ComplexityModel`."""
        return self.model.complexity(self.layout.unflatten(self.theta(theta)), self.coeffs)

    def grad_complexity(self, theta: Array | Sequence[BlockGates]) -> Array:
        """``∇_Θ C``: ``γ_B`` for ``θ_B``, ``θ_B γ_1`` for ``θ_1,i`` ([12], [18]), flat."""
        th = self.theta(theta)
        return self.layout.flatten_grads(self.model.grad(self.layout.unflatten(th), self.coeffs))

    # -- everything ------------------------------------------------------------------------------
    def evaluate(self, weights: Weights, theta: Array | Sequence[BlockGates], *, grad: bool = True) -> ObjectiveResult:
        """``L(W, Θ) = E + (λ/2)||W||² + C`` ([2.2]) and, if ``grad``, the exact ``∂L/∂Θ``.

        With torch tensors (weights and/or θ, float64) the values are tensors
        and ``L`` can be back-propagated to the weights and to ``θ``.
        """
        th = self.theta(theta)
        ml = self.mask_losses(weights)
        torch_mode = _any_torch(th, ml)
        if torch_mode:
            th, ml = _to_backend(th, True), _to_backend(ml, True)
        masks = self._data(torch_mode)[2]
        E = mask_probabilities(th, masks) @ ml
        C = self.model.complexity(self.layout.unflatten(th), self.coeffs)
        if torch_mode:
            C = _to_backend(C, True)
        wd = 0.5 * self.lam * weights.sq_norm()
        L = E + wd + C
        gE = gC = gL = None
        if grad:
            gE = expectation_gradient(th, ml, masks)
            gC = self.layout.flatten_grads(self.model.grad(self.layout.unflatten(th), self.coeffs))
            if torch_mode:
                gC = _to_backend(gC, True)
            gL = gE + gC
        return ObjectiveResult(E, C, wd, L, gL, gE, gC, self.layout)

    def __call__(self, weights: Weights, theta: Array | Sequence[BlockGates]) -> Any:
        """``L(W, Θ)`` only (no gradient)."""
        return self.evaluate(weights, theta, grad=False).L


def _as_1d(v: Any) -> Any:
    return v.reshape(1) if hasattr(v, "reshape") else np.asarray([v])


def _to_backend_tuple(w: Weights, torch_mode: bool) -> tuple[tuple[Array, ...], tuple[Array, ...], Array]:
    return (
        tuple(_to_backend(a, torch_mode) for a in w.W1),
        tuple(_to_backend(b, torch_mode) for b in w.W2),
        _to_backend(w.head, torch_mode),
    )


def objective(
    spec: NetworkSpec,
    weights: Weights,
    gates: Array | Sequence[BlockGates],
    X: Array,
    Y: Array,
    **kwargs: Any,
) -> ObjectiveResult:
    """One-shot :meth:`ExactObjective.evaluate`; the layout is read off ``gates`` when they are :class:`BlockGates`."""
    if isinstance(gates, (list, tuple)) and gates and isinstance(gates[0], BlockGates) and "layout" not in kwargs:
        kwargs["layout"] = GateLayout.of(spec, gates)
    return ExactObjective(spec, X, Y, **kwargs).evaluate(weights, gates)


__all__ = [
    "MAX_GATES",
    "ExactObjective",
    "GateLayout",
    "LossKind",
    "ObjectiveResult",
    "OutActivation",
    "Weights",
    "cost_spec",
    "expectation_gradient",
    "mask_matrix",
    "mask_probabilities",
    "objective",
    "validate_weights",
]
