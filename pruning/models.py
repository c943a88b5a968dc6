"""Gated residual networks (THEORY §1): one generic network, four architectures.

Read top to bottom:

1. :class:`WeightLayer` — one weight operation (linear / conv1d / conv2d),
   optionally followed by BatchNorm, an activation ``f`` and a unit gate
   ``ξ_1`` on its output channels: ``h = ξ_1 ⊙ f(BN(conv(x)))``.
2. Shortcuts — identity, :class:`ZeroPadShortcut` (option A: stride-2
   subsampling + zero channel padding) or a projection (a 1×1 conv + BN
   :class:`WeightLayer`).
3. :class:`ResidualBlock` — the paper's Figure 1:
   ``z = ξ_2 ⊙ g(S x + ξ_B · path(x))`` where ``path`` is ``M + 1`` weight
   layers, the first ``M`` of them unit-gated.  A pruned block has
   ``path = None`` and keeps its shortcut.  The gates of the path act
   through the parameters (``ξ_1`` on the next weight's input channels,
   ``ξ_B`` on the last BatchNorm's affine pair): the same function and
   gradients as multiplying the activations, at ``O(|W|)`` cost
   (:meth:`ResidualBlock.branch`).
4. :class:`GatedNetwork` — ``stem -> blocks -> head`` with the API the trainer
   uses: :meth:`~GatedNetwork.spec` (the current structure as a
   :class:`theory.NetworkSpec`), :meth:`~GatedNetwork.block_gates` (the θ
   tensors laid out for :class:`theory.ComplexityModel`),
   :meth:`~GatedNetwork.gate_parameters`, :meth:`~GatedNetwork.weight_parameters`
   and :meth:`~GatedNetwork.exact_gate_grads` (the unbiased estimator of §5).
   In train mode one ``bernoulli`` call draws every gate of a forward pass
   (:func:`pruning.gates.shared_sample`).
5. Builders — :func:`from_spec` instantiates any :class:`theory.NetworkSpec`;
   :func:`build_model` names ``residual_mlp``, ``resnet1d``,
   ``resnet20/56/110`` (CIFAR), ``resnet18/34/50/101/152`` and
   ``wide_resnet50_2/101_2`` (ImageNet, torchvision layout) and ``wrn`` (wide
   ResNets for CIFAR) and takes their specs from :mod:`theory.architectures`.
   Any other residual network: write its spec (a spec file,
   :func:`theory.spec.load_spec`) or convert a torch module
   (:func:`pruning.convert.gate`).

The spec is the single description of an architecture: the network is built
from it and ``model.spec()`` reads the same object back off the live tensors
(tested, also after compaction), so every FLOPs/parameter count comes from
the one complexity model.  Physical pruning lives in
:mod:`pruning.compaction`, the deterministic export in :mod:`pruning.export`;
both rely only on the generic structure defined here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from theory import architectures
from theory.complexity import BlockGates
from theory.spec import STEM_POOLS as STEM_POOL_GEOMETRY
from theory.spec import Block, Layer, NetworkSpec

from .gates import (
    ESTIMATORS,
    MODES,
    BlockGate,
    Gate,
    UnitGate,
    check_choice,
    gate_modules,
    has_block_gates,
    has_unit_gates,
    shared_sample,
)
from .syncbn import batch_norm as _batch_norm  # BN with a given affine pair (synchronised when train.sync_bn)

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
#: Constructor arguments of each activation: ReLU works in place (every activation here gets a fresh tensor: a
#: convolution, BatchNorm or block-sum output; :meth:`ResidualBlock.forward` guards the one exception).
ACTIVATION_KWARGS: dict[str, dict[str, Any]] = {"relu": {"inplace": True}, "tanh": {}}


def _out_of_place(act: nn.Module) -> nn.Module:
    """``act`` without writing into its input (an in-place ReLU becomes a plain one)."""
    return nn.ReLU() if isinstance(act, nn.ReLU) and act.inplace else act
ARCHS = ("residual_mlp", "resnet1d", "resnet20", "resnet56", "resnet110", "resnet50", "resnet18", "resnet34",
         "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2", "wrn")
#: Depth of each ImageNet-family arch of :data:`ARCHS` (``theory.architectures.resnet_imagenet``) and its ``widen``.
IMAGENET_ARCHS: dict[str, tuple[int, int]] = {
    "resnet18": (18, 1), "resnet34": (34, 1), "resnet50": (50, 1), "resnet101": (101, 1), "resnet152": (152, 1),
    "wide_resnet50_2": (50, 2), "wide_resnet101_2": (101, 2),
}

# ------------------------------------------------------------------------------------------------
# 1. One weight layer: op -> BN -> f -> ξ_1
# ------------------------------------------------------------------------------------------------


class WeightLayer(nn.Module):
    """``h = ξ ⊙ f(BN(op(x)))`` with every stage but ``op`` optional.

    ``kind``/``kernel``/``stride``/``out_size`` are the structural facts the
    spec needs; widths are read off the weight tensor, so they follow
    compaction automatically.
    """

    op: nn.Linear | nn.Conv1d | nn.Conv2d
    bn: nn.BatchNorm1d | nn.BatchNorm2d | None
    act: nn.Module | None
    gate: UnitGate | None

    def __init__(
        self,
        kind: str,
        in_width: int,
        out_width: int,
        *,
        kernel: int = 1,
        stride: int = 1,
        out_size: tuple[int, ...] = (),
        bias: bool = False,
        bn: bool = False,
        act: nn.Module | None = None,
        gate: UnitGate | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.kernel, self.stride, self.out_size = kind, kernel, stride, tuple(out_size)
        if kind == "linear":
            self.op = nn.Linear(in_width, out_width, bias=bias)
        elif kind == "conv1d":
            self.op = nn.Conv1d(in_width, out_width, kernel, stride=stride, padding=kernel // 2, bias=bias)
        elif kind == "conv2d":
            self.op = nn.Conv2d(in_width, out_width, kernel, stride=stride, padding=kernel // 2, bias=bias)
        else:
            raise ValueError(f"kind must be one of 'linear', 'conv1d', 'conv2d'; got {kind!r}")
        self.bn = None
        if bn:
            self.bn = nn.BatchNorm2d(out_width) if kind == "conv2d" else nn.BatchNorm1d(out_width)
        self.act = act
        self.gate = gate

    @property
    def in_width(self) -> int:
        return int(self.op.weight.shape[1])

    @property
    def out_width(self) -> int:
        return int(self.op.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        x = self.op(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        if self.gate is not None:
            x = self.gate(x)
        return x

    def forward_folded(self, x: Tensor, in_scale: Tensor | None, out_scale: Tensor | None) -> Tensor:
        """``f(BN(op(in_scale ⊙ x)))·out_scale`` with both scales folded into the parameters; no own gate.

        ``in_scale`` (the previous layer's unit-gate multiplier, one value per input channel) scales
        the weight's input channels: ``op(x; W·diag(s)) = op(s ⊙ x; W)`` because ``op`` is linear —
        also for a BatchNorm in train mode, whose batch statistics then are those of ``op(s ⊙ x)``.
        ``out_scale`` (a block-gate multiplier, a scalar; only without an activation) scales the
        BatchNorm's affine pair (``γ·s``, ``β·s``), or the weight and bias without BatchNorm.  Same
        values and gradients as the unfolded forward, at ``O(|W|)`` instead of ``O(batch · activations)``.
        """
        op, bn, act = self.op, self.bn, self.act
        w, b = op.weight, op.bias
        if in_scale is not None:
            if in_scale.dtype != w.dtype:
                in_scale = in_scale.to(w.dtype)
            w = w * in_scale.reshape((1, -1) + (1,) * (w.dim() - 2))
        if out_scale is not None:
            if act is not None:
                raise ValueError("out_scale folds only into a layer without activation")
            if out_scale.dtype != w.dtype:
                out_scale = out_scale.to(w.dtype)
            if bn is None:
                w = w * out_scale
                b = None if b is None else b * out_scale
        x = F.linear(x, w, b) if isinstance(op, nn.Linear) else op._conv_forward(x, w, b)
        if bn is not None:
            if out_scale is None:
                x = bn(x)
            else:
                gamma, beta = bn.weight, bn.bias
                x = _batch_norm(bn, x, out_scale.expand(x.shape[1]) if gamma is None else gamma * out_scale,
                                None if beta is None else beta * out_scale)
        if act is not None:
            x = act(x)
        return x

    def spec(self) -> Layer:
        return Layer(
            self.kind,  # type: ignore[arg-type]
            self.in_width,
            self.out_width,
            kernel=self.kernel,
            out_size=self.out_size,
            stride=self.stride,
            bias=self.op.bias is not None,
            bn=self.bn is not None,
            act=self.act is not None,
        )


# ------------------------------------------------------------------------------------------------
# 2. Shortcuts
# ------------------------------------------------------------------------------------------------


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of He et al.: subsample by ``stride``, zero-pad channels ``in -> out`` (both sides)."""

    def __init__(self, in_width: int, out_width: int, stride: int, spatial_dims: int) -> None:
        super().__init__()
        if out_width < in_width:
            raise ValueError(f"ZeroPadShortcut needs out_width >= in_width, got {in_width} -> {out_width}")
        self.in_width, self.out_width, self.stride, self.spatial_dims = in_width, out_width, stride, spatial_dims
        self.pad_front = (out_width - in_width) // 2
        self.pad_back = out_width - in_width - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * self.spatial_dims]
        return F.pad(x, (0, 0) * self.spatial_dims + (self.pad_front, self.pad_back))


# ------------------------------------------------------------------------------------------------
# 3. Residual block (paper, Figure 1)
# ------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``z = ξ_2 ⊙ g( S x + ξ_B · path(x) )``; ``path`` is ``None`` once the block was pruned."""

    path: nn.ModuleList | None
    block_gate: BlockGate | None
    shortcut: nn.Module
    out_act: nn.Module | None
    out_gate: UnitGate | None
    #: Apply ``ξ_1``/``ξ_B`` through the parameters (see :meth:`branch`); set per network with
    #: :attr:`GatedNetwork.fold_gates`.
    fold_gates: bool = True

    def __init__(
        self,
        in_width: int,
        out_width: int,
        path: Sequence[WeightLayer],
        shortcut: nn.Module,
        *,
        shortcut_kind: str,
        out_size: tuple[int, ...] = (),
        name: str = "",
        block_gate: BlockGate | None = None,
        out_act: nn.Module | None = None,
        out_gate: UnitGate | None = None,
        out_gated: bool = False,
        gated: bool = True,
    ) -> None:
        super().__init__()
        self.in_width, self.out_width = in_width, out_width
        self.shortcut_kind, self.out_size, self.name = shortcut_kind, tuple(out_size), name
        self.path = nn.ModuleList(path)
        self.block_gate = block_gate
        self.shortcut = shortcut
        self.out_act = out_act
        self.out_gate = out_gate
        self.out_gated = out_gated  # structural: the spec's out_gated (gates present only in unit modes)
        self.gated = gated  # structural: the spec's gated, a block with ξ_B (present only in block modes)

    @property
    def alive(self) -> bool:
        return self.path is not None

    def layers(self) -> list[WeightLayer]:
        """The path's weight layers (``[]`` for a pruned block)."""
        return [] if self.path is None else [cast(WeightLayer, m) for m in self.path]

    def branch(self, x: Tensor) -> Tensor:
        """``ξ_B · path(x)`` (the nonlinear path with its block gate).

        With :attr:`fold_gates` (the default) the gates act through the parameters
        (:meth:`WeightLayer.forward_folded`): each ``ξ_1`` scales the input channels of the next
        layer's weight — exact, as that layer's operation is linear — and ``ξ_B`` the affine pair of
        the path's last BatchNorm (or its weight and bias without BatchNorm).  The same function
        and the same gradients (straight-through and fixed gates alike; tested) as multiplying the
        activations, which ``fold_gates = False`` does.
        """
        layers = self.layers()
        gate_B = self.block_gate
        if not self.fold_gates:
            for layer in layers:
                x = layer(x)
            return x if gate_B is None else gate_B(x)
        scale: Tensor | None = None
        last = len(layers) - 1
        for j, layer in enumerate(layers):
            gate = layer.gate
            out_scale = None
            if j == last and gate_B is not None and gate is None and layer.act is None:
                out_scale = gate_B.multiplier()
                gate_B = None  # folded
            x = layer.forward_folded(x, scale, out_scale)
            scale = None
            if gate is not None:
                if j == last:
                    x = gate(x)
                else:
                    scale = gate.multiplier()
        return x if gate_B is None else gate_B(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.path is not None:
            z = self.branch(x)  # a fresh tensor: the sum and ReLU write into it (as torchvision's blocks do)
            s = self.shortcut(x)
            if s.dtype == z.dtype and s.shape == z.shape:
                z += s  # the same value as s + z (IEEE addition commutes)
            else:
                z = s + z
        else:
            z = self.shortcut(x)  # possibly x itself: no in-place activation on it
        if self.out_act is not None:
            z = self.out_act(z) if z is not x else _out_of_place(self.out_act)(z)
        if self.out_gate is not None:
            z = self.out_gate(z)
        return z

    def unit_gates(self) -> list[UnitGate | None]:
        """The ``M`` inner-layer unit gates (``None`` entries where ungated); ``[]`` for a pruned block."""
        return [layer.gate for layer in self.layers()[:-1]]

    def remove_path(self) -> None:
        """Replace the block by its shortcut (drops the path and the block gate)."""
        self.path = None
        self.block_gate = None

    def spec(self) -> Block:
        shortcut_layer = self.shortcut.spec() if isinstance(self.shortcut, WeightLayer) else None
        return Block(
            self.in_width,
            self.out_width,
            tuple(layer.spec() for layer in self.layers()),
            shortcut=self.shortcut_kind,  # type: ignore[arg-type]
            shortcut_layer=shortcut_layer,
            out_size=self.out_size,
            gated=self.gated,
            out_gated=self.out_gated,
            out_act=self.out_act is not None,
            name=self.name,
        )


# ------------------------------------------------------------------------------------------------
# 4. The network
# ------------------------------------------------------------------------------------------------


class GatedNetwork(nn.Module):
    """``stem -> blocks -> head`` with Bernoulli gates; the trainer's whole interface (see module doc)."""

    #: The activation ``f``/``g`` of the layers (a key of :data:`ACTIVATIONS`; set by :func:`from_spec`).
    activation: str = "relu"

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        stem: Sequence[WeightLayer],
        blocks: Sequence[ResidualBlock],
        head: Sequence[WeightLayer],
        num_classes: int,
        *,
        mode: str,
        estimator: str,
        stem_pool: nn.Module | None = None,
        meta: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        super().__init__()
        self.name, self.input_shape, self.num_classes = name, tuple(input_shape), num_classes
        self.meta = tuple(meta)
        self.mode = check_choice("mode", mode, MODES)
        self._estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.stem = nn.ModuleList(stem)
        self.stem_pool = stem_pool if stem_pool is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.ModuleList(head)

    def block_list(self) -> list[ResidualBlock]:
        return [cast(ResidualBlock, b) for b in self.blocks]

    def stem_layers(self) -> list[WeightLayer]:
        return [cast(WeightLayer, m) for m in self.stem]

    def head_layers(self) -> list[WeightLayer]:
        return [cast(WeightLayer, m) for m in self.head]

    # -- estimator (propagated to every gate) ------------------------------------------------
    @property
    def estimator(self) -> str:
        return self._estimator

    @estimator.setter
    def estimator(self, value: str) -> None:
        self._estimator = check_choice("estimator", value, ESTIMATORS)
        for g in gate_modules(self):
            g.estimator = value

    # -- gate folding (propagated to every block) ---------------------------------------------
    @property
    def fold_gates(self) -> bool:
        """Whether the blocks apply ``ξ_1``/``ξ_B`` through the parameters (:meth:`ResidualBlock.branch`)."""
        return all(b.fold_gates for b in self.block_list())

    @fold_gates.setter
    def fold_gates(self, value: bool) -> None:
        for b in self.block_list():
            b.fold_gates = bool(value)

    # -- forward ------------------------------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        for layer in self.stem:
            x = layer(x)
        return self.stem_pool(x)

    def forward_head(self, z: Tensor) -> Tensor:
        if z.dim() > 2:  # global average pooling over the spatial axes
            z = z.flatten(2).mean(-1)
        for layer in self.head:
            z = layer(z)
        return z

    def forward_from(self, l: int, z: Tensor) -> Tensor:
        """Logits from the input ``z`` of block ``l`` (``l = len(blocks)``: just the head)."""
        for block in self.block_list()[l:]:
            z = block(z)
        return self.forward_head(z)

    def forward(self, x: Tensor) -> Tensor:
        """Logits; in train mode every sampling gate's ``ξ`` comes from one shared draw (:func:`shared_sample`)."""
        with shared_sample(self.sampling_order()) if self.training else nullcontext():
            z = self.forward_stem(x)
            for block in self.blocks:
                z = block(z)
            return self.forward_head(z)

    # -- structure ----------------------------------------------------------------------------
    def spec(self) -> NetworkSpec:
        """The current structure (pruned blocks have ``path=()``; widths follow compaction)."""
        return NetworkSpec(
            self.name,
            self.input_shape,
            tuple(layer.spec() for layer in self.stem_layers()),
            tuple(block.spec() for block in self.block_list()),
            tuple(layer.spec() for layer in self.head_layers()),
            self.num_classes,
            meta=self.meta,
        )

    # -- per-structure lists, cached between structure changes -------------------------------------
    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per structure: kept until any module anywhere registers a parameter,
        buffer or submodule (compaction, export, conversion, ``load_state_dict(assign=True)`` all do;
        see :data:`_GENERATION`) or :meth:`structure_changed` is called."""
        cache = self.__dict__.get("_structure_cache")
        if cache is None or cache[0] != _GENERATION[0]:
            cache = (_GENERATION[0], {})
            self.__dict__["_structure_cache"] = cache  # a plain attribute (hot path, not a module state)
        value = cache[1].get(key)
        if value is None:
            value = cache[1][key] = build()
        return value

    def structure_changed(self) -> None:
        """Drop the cached per-structure lists (:meth:`gates`, :meth:`weight_parameters`, ...).

        Not needed after the library's own changes (they register new parameters or submodules, which
        invalidates every cache); call it after editing ``_parameters``/``_modules`` dictionaries directly.
        """
        self.__dict__.pop("_structure_cache", None)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_structure_cache", None)  # copies and pickles rebuild their own
        return state

    def _gate_table(self) -> list[tuple[BlockGate | None, tuple[UnitGate | None, ...], UnitGate | None]]:
        """Per block: the block gate (alive blocks only), the ``M`` inner layers' unit gates, the output gate.

        Read straight from the module dictionaries (what attribute access would return, without
        ``nn.Module.__getattr__``): :meth:`gates`, :meth:`block_gates` and friends run several
        times per training step.
        """
        return cast(list[Any], self._cached("gate_table", self._build_gate_table))

    def _build_gate_table(self) -> list[tuple[BlockGate | None, tuple[UnitGate | None, ...], UnitGate | None]]:
        out: list[Any] = []
        for block in self.blocks._modules.values():
            path = _submodule(block, "path")
            out_gate = _submodule(block, "out_gate")
            if path is None:
                out.append((None, (), out_gate))
                continue
            layers = list(path._modules.values())
            units = tuple(_submodule(layer, "gate") for layer in layers[:-1])
            out.append((_submodule(block, "block_gate"), units, out_gate))
        return out

    def block_gates(self) -> list[BlockGates]:
        """θ tensors (autograd-connected) aligned with ``spec().blocks`` for :class:`theory.ComplexityModel`.

        ``theta_B``: the 0-d block-gate θ, ``None`` in unit/none mode or for a pruned block;
        ``theta_1``: one θ vector per inner gated layer, ``None`` in layer/none mode or for a pruned
        block; ``theta_2``: the output-gate θ of a residual MLP block with ``out_gated``, else ``None``.
        (Built once per structure; a new list each call.)
        """
        return list(self._cached("block_gates", self._build_block_gates))

    def _build_block_gates(self) -> list[BlockGates]:
        out = []
        for gate_B, units, out_gate in self._gate_table():
            theta_1 = None
            if any(g is not None for g in units):
                theta_1 = tuple(None if g is None else _theta(g) for g in units)
            out.append(BlockGates(None if gate_B is None else _theta(gate_B), theta_1,
                                  None if out_gate is None else _theta(out_gate)))
        return out

    def gates(self) -> list[Gate]:
        """Every gate module, block by block: ``ξ_B``, the ``ξ_1`` vectors, ``ξ_2`` (a new list each call)."""
        return list(self._cached("gates", self._build_gates))

    def _build_gates(self) -> list[Gate]:
        out: list[Gate] = []
        for gate_B, units, out_gate in self._gate_table():
            if gate_B is not None:
                out.append(gate_B)
            out.extend(g for g in units if g is not None)
            if out_gate is not None:
                out.append(out_gate)
        return out

    def sampling_order(self) -> list[Gate]:
        """Every gate in the order a forward pass uses it: per block the ``ξ_1`` vectors, ``ξ_B``, ``ξ_2``.

        The shared draw of :meth:`forward` follows it, so its samples are those that one draw per
        gate in forward order would give (one uniform number per gate, in sequence).
        """
        return list(self._cached("sampling_order", self._build_sampling_order))

    def _build_sampling_order(self) -> list[Gate]:
        out: list[Gate] = []
        for gate_B, units, out_gate in self._gate_table():
            out.extend(g for g in units if g is not None)
            if gate_B is not None:
                out.append(gate_B)
            if out_gate is not None:
                out.append(out_gate)
        return out

    def gate_parameters(self) -> list[nn.Parameter]:
        """The θ parameters (one per gate module), in :meth:`gates` order (a new list each call)."""
        return list(self._cached("gate_parameters", lambda: [_theta(g) for g in self._build_gates()]))

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (weights, biases, BN affine pairs), in module order (a new list each call)."""
        return list(self._cached("weight_parameters", self._build_weight_parameters))

    def _build_weight_parameters(self) -> list[nn.Parameter]:
        gate_ids = {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in gate_ids]

    # -- the exact-difference estimator of §5 -------------------------------------------------
    @torch.no_grad()
    def exact_gate_grads(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
    ) -> dict[nn.Parameter, Tensor]:
        """Unbiased estimate of ``∂E/∂θ`` (``E`` = mean loss) for every gate, eqs. [19]–[21].

        One sample ``Ξ ~ q_Θ`` is drawn for all gates; then, on the same data,

        * ``∂E/∂θ_B  ≈ ℓ(ξ_B=1, Ξ) − ℓ(ξ_B=0, Ξ)``,
        * ``∂E/∂θ_1,i ≈ θ_B ( ℓ(ξ_B=1, ξ_i=1, Ξ) − ℓ(ξ_B=1, ξ_i=0, Ξ) )`` (``θ_B ≡ 1`` without block gate),
        * ``∂E/∂θ_2,i ≈ ℓ(ξ_2,i=1, Ξ) − ℓ(ξ_2,i=0, Ξ)`` (output gates, outside the branch),

        every other gate at its sample.  Each difference is two forward passes with one gate forced;
        the prefix up to the gate's block is computed once and shared, and ``ℓ(ξ_i = sample)`` is
        shared by all units of a block, so a block costs ``2 + Σ_j n_j`` suffix passes.  BatchNorm
        follows ``self.training`` (batch statistics in train mode); running statistics are restored
        afterwards, so the estimate has no side effect.  Returns ``{θ parameter: estimate}`` (same
        shape, dtype and device); the caller adds ``∇C`` and writes ``.grad``.
        """
        gates = self.gates()
        if not gates:
            return {}
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved_buffers = [[b.clone() for b in m.buffers(recurse=False)] for m in norms]
        previous = [g.fixed for g in gates]
        samples = {g: g.draw() for g in gates}
        raw: dict[Gate, Tensor] = {}
        try:
            for g in gates:
                g.fix(samples[g])
            inputs = []
            z = self.forward_stem(x)
            for block in self.blocks:
                inputs.append(z)
                z = block(z)

            def loss_from(l: int) -> Tensor:
                loss = loss_fn(self.forward_from(l, inputs[l]), y).detach().double()
                return loss.mean() if loss.dim() else loss  # a per-sample loss is averaged

            def flips(g: Gate, l: int, base: Tensor) -> Tensor:
                """``ℓ(ξ_i=1) − ℓ(ξ_i=0)`` per unit of gate ``g``; ``base`` is the loss at the sample."""
                s = samples[g]
                diffs = []
                for i, si in enumerate(s.tolist()):
                    flipped = s.clone()
                    flipped[i] = 1.0 - si
                    g.fix(flipped)
                    li = loss_from(l)
                    diffs.append(base - li if si > 0.5 else li - base)
                g.fix(s)
                return torch.stack(diffs)

            for l, block in enumerate(self.block_list()):
                bg = block.block_gate if block.alive else None
                units = [g for g in block.unit_gates() if g is not None]
                base_on: Tensor | None = None
                theta_B: Tensor | float = 1.0
                if bg is not None:
                    bg.fix(1.0)
                    base_on = loss_from(l)
                    bg.fix(0.0)
                    raw[bg] = base_on - loss_from(l)
                    bg.fix(1.0)
                    theta_B = bg.theta.detach().double().clamp(0.0, 1.0)
                if units:
                    base = base_on if base_on is not None else loss_from(l)
                    for g in units:
                        raw[g] = theta_B * flips(g, l, base)
                if bg is not None:
                    bg.fix(samples[bg])
                if block.out_gate is not None:
                    raw[block.out_gate] = flips(block.out_gate, l, loss_from(l))
        finally:
            for g, v in zip(gates, previous):
                g.fix(v)
            for m, bufs in zip(norms, saved_buffers):
                for b, s in zip(m.buffers(recurse=False), bufs):
                    b.copy_(s)
        return {g.theta: raw[g].reshape(g.theta.shape).to(g.theta) for g in gates}


#: Structure generation: bumped whenever any module registers a parameter, a buffer or a submodule
#: (torch's global registration hooks: ``module.x = nn.Parameter(...)``, ``block.path = None``,
#: ``add_module``, ...).  :meth:`GatedNetwork._cached` lists stay valid while it is unchanged.
_GENERATION = [0]


def _bump_generation(*_: Any) -> None:
    _GENERATION[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
nn.modules.module.register_module_module_registration_hook(_bump_generation)
nn.modules.module.register_module_buffer_registration_hook(_bump_generation)


def _submodule(module: Any, name: str) -> Any:
    """``getattr(module, name)`` for a submodule slot (a module or ``None``), without ``nn.Module.__getattr__``."""
    d = module.__dict__
    return d[name] if name in d else d["_modules"].get(name)


def _theta(gate: Gate) -> nn.Parameter:
    """``gate.theta`` without ``nn.Module.__getattr__``."""
    return gate._parameters["theta"]  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# 5. Builders
# ------------------------------------------------------------------------------------------------


def _unit_gate(n: int, mode: str, estimator: str, theta_init: float) -> UnitGate | None:
    return UnitGate(n, estimator=estimator, theta_init=theta_init) if has_unit_gates(mode) else None


def _block_gate(mode: str, estimator: str, theta_init: float) -> BlockGate | None:
    return BlockGate(estimator=estimator, theta_init=theta_init) if has_block_gates(mode) else None


def _init_convs(model: nn.Module) -> None:
    """He initialisation of the convolutions (torchvision convention); BN γ=1, β=0; no zero-init of
    the last BN γ (a branch born with zero weights would be pruned at once, Lemma 2)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


#: The torch module of each stem pooling a spec may name (geometry: :data:`theory.spec.STEM_POOLS`).
STEM_POOLS: dict[str, Callable[[], nn.Module]] = {
    name: (lambda k=k, st=st: nn.MaxPool2d(k, stride=st, padding=k // 2))
    for name, (k, st) in STEM_POOL_GEOMETRY.items()
}
#: ``spec.meta`` keys that set every BatchNorm's ``eps``/``momentum`` (absent: torch's defaults 1e-5, 0.1).
BN_META = ("bn_eps", "bn_momentum")


def from_spec(
    spec: NetworkSpec,
    *,
    mode: str,
    estimator: str,
    theta_init: float,
    activation: str = "relu",
) -> GatedNetwork:
    """The torch network a :class:`theory.NetworkSpec` describes, with gates for ``mode``.

    The spec (from :mod:`theory.architectures`) is the single description of
    an architecture: every :class:`~theory.spec.Layer` becomes a
    :class:`WeightLayer` (``act`` → ``activation``), the outputs of the first
    ``M`` path layers of a block get unit gates ``ξ_1``, gated blocks a block
    gate ``ξ_B``, ``out_gated`` blocks output gates ``ξ_2``; shortcuts follow
    ``shortcut`` (identity, option-A zero padding, projection layer).  The
    spec's ``meta`` may name a stem pooling (``stem_pool``) and the BatchNorm
    ``bn_eps``/``bn_momentum``.  ``model.spec()`` returns ``spec`` again.

    >>> from theory.architectures import resnet_cifar
    >>> spec = resnet_cifar(20, width=4, image_size=8)
    >>> net = from_spec(spec, mode="combined", estimator="straight-through", theta_init=1.0)
    >>> net.spec() == spec, len(net.gates())
    (True, 18)
    """
    check_choice("activation", activation, tuple(ACTIVATIONS))
    act_cls, act_kwargs = ACTIVATIONS[activation], ACTIVATION_KWARGS[activation]

    def act() -> nn.Module:
        return act_cls(**act_kwargs)

    def weight_layer(layer: Layer, gate: UnitGate | None = None) -> WeightLayer:
        return WeightLayer(
            layer.kind, layer.in_width, layer.out_width, kernel=layer.kernel, stride=layer.stride,
            out_size=layer.out_size, bias=layer.bias, bn=layer.bn, act=act() if layer.act else None, gate=gate,
        )

    blocks = []
    for b in spec.blocks:
        if not b.alive:
            raise ValueError(f"from_spec builds unpruned networks; block {b.name!r} has an empty path")
        path = [weight_layer(layer, _unit_gate(layer.out_width, mode, estimator, theta_init)) for layer in b.path[:-1]]
        path.append(weight_layer(b.path[-1]))
        shortcut: nn.Module
        if b.shortcut == "identity":
            shortcut = nn.Identity()
        elif b.shortcut == "zero_pad":
            spatial = {"conv1d": 1, "conv2d": 2}.get(b.path[0].kind, 0)
            shortcut = ZeroPadShortcut(b.in_width, b.out_width, max(layer.stride for layer in b.path), spatial)
        else:
            assert b.shortcut_layer is not None  # guaranteed by Block validation
            shortcut = weight_layer(b.shortcut_layer)
        blocks.append(
            ResidualBlock(
                b.in_width, b.out_width, path, shortcut, shortcut_kind=b.shortcut, out_size=b.out_size, name=b.name,
                block_gate=_block_gate(mode, estimator, theta_init) if b.gated else None,
                out_act=act() if b.out_act else None,
                out_gate=_unit_gate(b.out_width, mode, estimator, theta_init) if b.out_gated else None,
                out_gated=b.out_gated, gated=b.gated,
            )
        )
    meta = dict(spec.meta)
    pool = meta.get("stem_pool")
    if pool is not None and pool not in STEM_POOLS:
        raise ValueError(f"spec.meta stem_pool must be one of {sorted(STEM_POOLS)}, got {pool!r}")
    model = GatedNetwork(
        spec.name, spec.input_shape, [weight_layer(layer) for layer in spec.stem], blocks,
        [weight_layer(layer) for layer in spec.head], spec.num_classes, mode=mode, estimator=estimator,
        stem_pool=STEM_POOLS[str(pool)]() if pool is not None else None, meta=spec.meta,
    )
    bn_settings = {key[3:]: meta[key] for key in BN_META if key in meta}
    for key, value in bn_settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"spec.meta bn_{key} must be a number in (0, 1), got {value!r}")
    if bn_settings:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for key, value in bn_settings.items():
                    setattr(m, key, float(value))
    model.activation = activation
    _init_convs(model)
    return model


def _arch_spec(arch: str, num_classes: int, kw: dict[str, Any]) -> NetworkSpec:
    """The :mod:`theory.architectures` spec of a named architecture (``kw`` without torch-only options)."""
    if arch == "residual_mlp":
        if "in_features" not in kw or "hidden" not in kw:
            raise ValueError("arch 'residual_mlp' needs in_features and hidden")
        return architectures.residual_mlp(
            kw["in_features"], list(kw["hidden"]), num_classes, out_gated=bool(kw.get("out_gated", False))
        )
    if arch == "resnet1d":
        return architectures.resnet1d(num_classes=num_classes, **kw)
    if arch in IMAGENET_ARCHS:
        depth, widen = IMAGENET_ARCHS[arch]
        if widen != 1:
            kw = {**kw, "widen": widen}
        return architectures.resnet_imagenet(depth, num_classes, name=arch if widen != 1 else None, **kw)
    if arch == "wrn":
        return architectures.wide_resnet_cifar(num_classes=num_classes, **kw)
    return architectures.resnet_cifar(int(arch[len("resnet"):]), num_classes=num_classes, **kw)


_ARCH_KWARGS: dict[str, tuple[str, ...]] = {
    "residual_mlp": ("in_features", "hidden", "out_gated", "activation"),
    "resnet1d": ("stage_blocks", "widths", "length", "in_channels"),
    "resnet20": ("width", "image_size", "in_channels"),
    "resnet56": ("width", "image_size", "in_channels"),
    "resnet110": ("width", "image_size", "in_channels"),
    "resnet18": ("image_size", "in_channels", "width"),
    "resnet34": ("image_size", "in_channels", "width"),
    "resnet50": ("image_size", "in_channels", "width", "widen"),
    "resnet101": ("image_size", "in_channels", "width", "widen"),
    "resnet152": ("image_size", "in_channels", "width", "widen"),
    "wide_resnet50_2": ("image_size", "in_channels", "width"),
    "wide_resnet101_2": ("image_size", "in_channels", "width"),
    "wrn": ("depth", "widen", "image_size", "in_channels"),
}
_TORCH_ONLY_KWARGS = ("activation",)


def build_model(
    arch: str,
    *,
    mode: str = "combined",
    num_classes: int,
    estimator: str = "straight-through",
    theta_init: float = 1.0,
    device: torch.device | str | None = None,
    **arch_kwargs: Any,
) -> GatedNetwork:
    """Build a gated network by name (its spec from :mod:`theory.architectures`, then :func:`from_spec`).

    ``arch``: ``residual_mlp`` (``in_features``, ``hidden: list[int]``, ``out_gated=False``,
    ``activation="relu"|"tanh"``), ``resnet1d`` (``stage_blocks``, ``widths``, ``length``,
    ``in_channels``), ``resnet20``/``resnet56``/``resnet110`` (``width=16``, ``image_size=32``,
    ``in_channels=3``), ``resnet18``/``resnet34``/``resnet50``/``resnet101``/``resnet152`` and
    ``wide_resnet50_2``/``wide_resnet101_2`` (torchvision layout; ``image_size=224``,
    ``in_channels=3``, ``width=64`` planes in the first stage, ``widen=1`` bottleneck width factor),
    ``wrn`` (WRN-``depth``-``widen`` for CIFAR; ``depth=28``, ``widen=10``, ``image_size=32``,
    ``in_channels=3``).  ``mode``: combined | layer | unit | none.  ``estimator``:
    straight-through | exact-difference.  ``device="meta"`` builds without memory.

    >>> net = build_model("resnet18", num_classes=10, image_size=32, width=8)
    >>> net.spec().depth, net.spec().prunable_blocks
    (18, 8)
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    check_choice("arch", arch, ARCHS)
    check_choice("mode", mode, MODES)
    check_choice("estimator", estimator, ESTIMATORS)
    unknown = sorted(set(arch_kwargs) - set(_ARCH_KWARGS[arch]))
    if unknown:
        raise ValueError(
            f"unknown keyword(s) {', '.join(unknown)} for arch {arch!r}; allowed: {', '.join(_ARCH_KWARGS[arch])}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not (isinstance(theta_init, (int, float)) and 0.0 <= theta_init <= 1.0 and math.isfinite(theta_init)):
        raise ValueError(f"theta_init must lie in [0, 1], got {theta_init!r}")
    spec_kw = {k: v for k, v in arch_kwargs.items() if k not in _TORCH_ONLY_KWARGS}
    spec = _arch_spec(arch, num_classes, spec_kw)
    activation = str(arch_kwargs.get("activation", "relu"))
    with torch.device(device) if device is not None else nullcontext():
        return from_spec(spec, mode=mode, estimator=estimator, theta_init=float(theta_init), activation=activation)


__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "GatedNetwork",
    "ResidualBlock",
    "WeightLayer",
    "ZeroPadShortcut",
    "build_model",
    "from_spec",
]
