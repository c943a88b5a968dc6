"""Gated residual networks (THEORY.md §1): one generic network, four architectures.

Read top to bottom:

1. :class:`WeightLayer` — one weight operation (linear / conv1d / conv2d),
   optionally followed by BatchNorm, an activation ``f`` and a unit gate
   ``ξ_1`` on its output channels: ``h = ξ_1 ⊙ f(BN(conv(x)))``.
2. Shortcuts — identity, :class:`ZeroPadShortcut` (option A: stride-2
   subsampling + zero channel padding) or a projection (a 1×1 conv + BN
   :class:`WeightLayer`).
3. :class:`ResidualBlock` — the seed's Figure 1:
   ``z = ξ_2 ⊙ g(S x + ξ_B · path(x))`` where ``path`` is ``M + 1`` weight
   layers, the first ``M`` of them unit-gated.  A pruned block has
   ``path = None`` and keeps its shortcut.
4. :class:`GatedNetwork` — ``stem -> blocks -> head`` with the API the trainer
   uses: :meth:`~GatedNetwork.spec` (the current structure as a
   :class:`theory.NetworkSpec`), :meth:`~GatedNetwork.block_gates` (the θ
   tensors laid out for :class:`theory.ComplexityModel`),
   :meth:`~GatedNetwork.gate_parameters`, :meth:`~GatedNetwork.weight_parameters`
   and :meth:`~GatedNetwork.exact_gate_grads` (the unbiased estimator of §5).
5. Builders — :func:`build_model` for ``residual_mlp``, ``resnet1d``,
   ``resnet20/56/110`` (CIFAR) and ``resnet50`` (ImageNet bottleneck).

At construction ``model.spec()`` equals the matching builder of
:mod:`theory.architectures` exactly (tested), so every FLOPs/parameter count
comes from the one complexity model.  Physical pruning lives in
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

from theory.complexity import BlockGates
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
)

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
ARCHS = ("residual_mlp", "resnet1d", "resnet20", "resnet56", "resnet110", "resnet50")

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
# 3. Residual block (seed Figure 1)
# ------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``z = ξ_2 ⊙ g( S x + ξ_B · path(x) )``; ``path`` is ``None`` once the block was pruned."""

    path: nn.ModuleList | None
    block_gate: BlockGate | None
    shortcut: nn.Module
    out_act: nn.Module | None
    out_gate: UnitGate | None

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

    @property
    def alive(self) -> bool:
        return self.path is not None

    def layers(self) -> list[WeightLayer]:
        """The path's weight layers (``[]`` for a pruned block)."""
        return [] if self.path is None else [cast(WeightLayer, m) for m in self.path]

    def branch(self, x: Tensor) -> Tensor:
        """``ξ_B · path(x)`` (the nonlinear path with its block gate)."""
        for layer in self.layers():
            x = layer(x)
        if self.block_gate is not None:
            x = self.block_gate(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        z = self.shortcut(x)
        if self.path is not None:
            z = z + self.branch(x)
        if self.out_act is not None:
            z = self.out_act(z)
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
            gated=True,
            out_gated=self.out_gated,
            out_act=self.out_act is not None,
            name=self.name,
        )


# ------------------------------------------------------------------------------------------------
# 4. The network
# ------------------------------------------------------------------------------------------------


class GatedNetwork(nn.Module):
    """``stem -> blocks -> head`` with Bernoulli gates; the trainer's whole interface (see module doc)."""

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
    ) -> None:
        super().__init__()
        self.name, self.input_shape, self.num_classes = name, tuple(input_shape), num_classes
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
        )

    def block_gates(self) -> list[BlockGates]:
        """θ tensors (autograd-connected) aligned with ``spec().blocks`` for :class:`theory.ComplexityModel`.

        ``theta_B``: the 0-d block-gate θ, ``None`` in unit/none mode or for a pruned block;
        ``theta_1``: one θ vector per inner gated layer, ``None`` in layer/none mode or for a pruned
        block; ``theta_2``: the output-gate θ of a residual MLP block with ``out_gated``, else ``None``.
        """
        out = []
        for block in self.block_list():
            theta_B = block.block_gate.theta if (block.alive and block.block_gate is not None) else None
            units = block.unit_gates()
            theta_1 = None
            if any(g is not None for g in units):
                theta_1 = tuple(None if g is None else g.theta for g in units)
            theta_2 = block.out_gate.theta if block.out_gate is not None else None
            out.append(BlockGates(theta_B, theta_1, theta_2))
        return out

    def gates(self) -> list[Gate]:
        """Every gate module, block by block: ``ξ_B``, the ``ξ_1`` vectors, ``ξ_2``."""
        out: list[Gate] = []
        for block in self.block_list():
            if block.alive and block.block_gate is not None:
                out.append(block.block_gate)
            out.extend(g for g in block.unit_gates() if g is not None)
            if block.out_gate is not None:
                out.append(block.out_gate)
        return out

    def gate_parameters(self) -> list[nn.Parameter]:
        """The θ parameters (one per gate module), in :meth:`gates` order."""
        return [g.theta for g in self.gates()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (weights, biases, BN affine pairs), in module order."""
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


# ------------------------------------------------------------------------------------------------
# 5. Builders
# ------------------------------------------------------------------------------------------------


def _unit_gate(n: int, mode: str, estimator: str, theta_init: float) -> UnitGate | None:
    return UnitGate(n, estimator=estimator, theta_init=theta_init) if has_unit_gates(mode) else None


def _block_gate(mode: str, estimator: str, theta_init: float) -> BlockGate | None:
    return BlockGate(estimator=estimator, theta_init=theta_init) if has_block_gates(mode) else None


def _init_resnet(model: nn.Module) -> None:
    """He initialisation of the convolutions (torchvision convention); BN γ=1, β=0; no zero-init of
    the last BN γ (a branch born with zero weights would be pruned at once, Lemma 2)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _basic_resnet(
    name: str,
    dim: int,
    in_channels: int,
    in_size: tuple[int, ...],
    stage_blocks: Sequence[int],
    widths: Sequence[int],
    num_classes: int,
    *,
    mode: str,
    estimator: str,
    theta_init: float,
) -> GatedNetwork:
    """Basic-block ResNet (CIFAR / 1-D): conv3-BN-ReLU-ξ_1 -> conv3-BN -> ·ξ_B -> + option-A shortcut -> ReLU."""
    kind = "conv2d" if dim == 2 else "conv1d"

    def conv(cin: int, cout: int, size: tuple[int, ...], stride: int = 1, act: bool = True, gate=None) -> WeightLayer:
        return WeightLayer(
            kind, cin, cout, kernel=3, stride=stride, out_size=size, bn=True, act=nn.ReLU() if act else None, gate=gate
        )

    stem = [conv(in_channels, widths[0], in_size)]
    blocks = []
    cin, size = widths[0], in_size
    for s, (nb, w) in enumerate(zip(stage_blocks, widths)):
        for b in range(nb):
            stride = 2 if (s > 0 and b == 0) else 1
            if stride == 2:
                size = tuple((x + 1) // 2 for x in size)
            path = [
                conv(cin, w, size, stride=stride, gate=_unit_gate(w, mode, estimator, theta_init)),
                conv(w, w, size, act=False),
            ]
            identity = cin == w and stride == 1
            shortcut = nn.Identity() if identity else ZeroPadShortcut(cin, w, stride, dim)
            blocks.append(
                ResidualBlock(
                    cin,
                    w,
                    path,
                    shortcut,
                    shortcut_kind="identity" if identity else "zero_pad",
                    out_size=size,
                    name=f"stage{s + 1}.{b}",
                    block_gate=_block_gate(mode, estimator, theta_init),
                    out_act=nn.ReLU(),
                )
            )
            cin = w
    head = [WeightLayer("linear", cin, num_classes, bias=True)]
    model = GatedNetwork(
        name, (in_channels, *in_size), stem, blocks, head, num_classes, mode=mode, estimator=estimator
    )
    _init_resnet(model)
    return model


def resnet_cifar_model(
    depth: int, *, num_classes: int = 10, width: int = 16, image_size: int = 32, in_channels: int = 3, **gate_kw: Any
) -> GatedNetwork:
    """CIFAR ResNet-(6n+2) (He et al. 2016), option-A shortcuts; matches :func:`theory.resnet_cifar`."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {depth!r}")
    n = (depth - 2) // 6
    return _basic_resnet(
        f"resnet{depth}", 2, in_channels, (image_size, image_size), (n, n, n), (width, 2 * width, 4 * width),
        num_classes, **gate_kw,
    )


def resnet1d_model(
    stage_blocks: Sequence[int] = (3, 3, 3),
    widths: Sequence[int] = (16, 32, 64),
    length: int = 40,
    in_channels: int = 1,
    *,
    num_classes: int = 10,
    **gate_kw: Any,
) -> GatedNetwork:
    """1-D basic-block ResNet (e.g. MNIST-1D, length 40); matches :func:`theory.resnet1d`."""
    if len(stage_blocks) != len(widths) or not stage_blocks:
        raise ValueError(f"stage_blocks and widths must have the same non-zero length, got {stage_blocks}, {widths}")
    if any(w < 1 for w in widths) or any(b < 1 for b in stage_blocks) or length < 1:
        raise ValueError(f"widths, stage_blocks and length must be positive, got {widths}, {stage_blocks}, {length}")
    depth = 2 + 2 * sum(stage_blocks)
    return _basic_resnet(
        f"resnet1d-{depth}", 1, in_channels, (length,), tuple(stage_blocks), tuple(widths), num_classes, **gate_kw
    )


def resnet50_model(
    *, num_classes: int = 1000, image_size: int = 224, mode: str, estimator: str, theta_init: float
) -> GatedNetwork:
    """ImageNet ResNet-50 v1.5 (stride on the 3×3 conv), ``M = 2`` unit-gate vectors per bottleneck
    (outputs of conv1 and conv2), projection shortcuts (1×1 conv + BN) in each stage's first block;
    matches :func:`theory.resnet50`."""
    s = image_size
    stem_size = (s + 1) // 2
    stem = [
        WeightLayer("conv2d", 3, 64, kernel=7, stride=2, out_size=(stem_size, stem_size), bn=True, act=nn.ReLU())
    ]
    # the stem conv uses padding 3 (kernel // 2) like torchvision; 3×3/2 max-pool, padding 1
    size = (stem_size + 1) // 2
    blocks = []
    cin = 64
    for stage, (nb, mid) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        cout = 4 * mid
        for b in range(nb):
            stride = 2 if (stage > 0 and b == 0) else 1
            in_size = size
            if stride == 2:
                size = (size + 1) // 2
            hw = (size, size)
            path = [
                WeightLayer("conv2d", cin, mid, kernel=1, out_size=(in_size, in_size), bn=True, act=nn.ReLU(),
                            gate=_unit_gate(mid, mode, estimator, theta_init)),
                WeightLayer("conv2d", mid, mid, kernel=3, stride=stride, out_size=hw, bn=True, act=nn.ReLU(),
                            gate=_unit_gate(mid, mode, estimator, theta_init)),
                WeightLayer("conv2d", mid, cout, kernel=1, out_size=hw, bn=True),
            ]
            shortcut: nn.Module
            if b == 0:
                shortcut = WeightLayer("conv2d", cin, cout, kernel=1, stride=stride, out_size=hw, bn=True)
                kind = "projection"
            else:
                shortcut, kind = nn.Identity(), "identity"
            blocks.append(
                ResidualBlock(
                    cin, cout, path, shortcut, shortcut_kind=kind, out_size=hw, name=f"layer{stage + 1}.{b}",
                    block_gate=_block_gate(mode, estimator, theta_init), out_act=nn.ReLU(),
                )
            )
            cin = cout
    head = [WeightLayer("linear", cin, num_classes, bias=True)]
    model = GatedNetwork(
        "resnet50", (3, s, s), stem, blocks, head, num_classes, mode=mode, estimator=estimator,
        stem_pool=nn.MaxPool2d(3, stride=2, padding=1),
    )
    _init_resnet(model)
    return model


def residual_mlp_model(
    in_features: int,
    hidden: Sequence[int],
    *,
    num_classes: int,
    out_gated: bool = False,
    activation: str = "relu",
    mode: str,
    estimator: str,
    theta_init: float,
) -> GatedNetwork:
    """The gated residual MLP of §1: ``z -> ξ_2 ⊙ g(z + ξ_B W_2 (ξ_1 ⊙ f(W_1 ẑ)))``, ``f = g = activation``.

    ``W_1`` carries the bias, ``W_2`` none (a block with all units off contributes exactly 0);
    identity skips; the head is the linear classifier.  ``out_gated`` adds output gates ``ξ_2``
    (present in combined/unit mode; never removed by compaction).  Matches :func:`theory.residual_mlp`.
    """
    check_choice("activation", activation, tuple(ACTIVATIONS))
    if in_features < 1 or num_classes < 1 or not hidden or any(n < 1 for n in hidden):
        raise ValueError(
            f"in_features, num_classes and hidden widths must be positive, got {in_features}, {num_classes}, {hidden}"
        )
    act = ACTIVATIONS[activation]
    m = in_features
    blocks = []
    for l, n in enumerate(hidden):
        path = [
            WeightLayer("linear", m, n, bias=True, act=act(), gate=_unit_gate(n, mode, estimator, theta_init)),
            WeightLayer("linear", n, m, bias=False),
        ]
        blocks.append(
            ResidualBlock(
                m, m, path, nn.Identity(), shortcut_kind="identity", name=f"block{l}",
                block_gate=_block_gate(mode, estimator, theta_init), out_act=act(),
                out_gate=_unit_gate(m, mode, estimator, theta_init) if out_gated else None, out_gated=out_gated,
            )
        )
    head = [WeightLayer("linear", m, num_classes, bias=True)]
    return GatedNetwork(
        f"residual-mlp-{len(hidden)}", (m,), [], blocks, head, num_classes, mode=mode, estimator=estimator
    )


_ARCH_KWARGS: dict[str, tuple[str, ...]] = {
    "residual_mlp": ("in_features", "hidden", "out_gated", "activation"),
    "resnet1d": ("stage_blocks", "widths", "length", "in_channels"),
    "resnet20": ("width", "image_size", "in_channels"),
    "resnet56": ("width", "image_size", "in_channels"),
    "resnet110": ("width", "image_size", "in_channels"),
    "resnet50": ("image_size",),
}


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
    """Build a gated network.

    ``arch``: ``residual_mlp`` (``in_features``, ``hidden: list[int]``, ``out_gated=False``,
    ``activation="relu"|"tanh"``), ``resnet1d`` (``stage_blocks``, ``widths``, ``length``,
    ``in_channels``), ``resnet20``/``resnet56``/``resnet110`` (``width=16``, ``image_size=32``,
    ``in_channels=3``), ``resnet50`` (``image_size=224``).  ``mode``: combined | layer | unit | none.
    ``estimator``: straight-through | exact-difference.  ``device="meta"`` builds without memory.
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
    gate_kw: dict[str, Any] = dict(mode=mode, estimator=estimator, theta_init=float(theta_init))
    with torch.device(device) if device is not None else nullcontext():
        if arch == "residual_mlp":
            if "in_features" not in arch_kwargs or "hidden" not in arch_kwargs:
                raise ValueError("arch 'residual_mlp' needs in_features and hidden")
            return residual_mlp_model(num_classes=num_classes, **gate_kw, **arch_kwargs)
        if arch == "resnet1d":
            return resnet1d_model(num_classes=num_classes, **gate_kw, **arch_kwargs)
        if arch == "resnet50":
            return resnet50_model(num_classes=num_classes, **gate_kw, **arch_kwargs)
        return resnet_cifar_model(int(arch[len("resnet"):]), num_classes=num_classes, **gate_kw, **arch_kwargs)


__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "GatedNetwork",
    "ResidualBlock",
    "WeightLayer",
    "ZeroPadShortcut",
    "build_model",
    "residual_mlp_model",
    "resnet1d_model",
    "resnet50_model",
    "resnet_cifar_model",
]
