"""Structural description of a gated residual network (THEORY.md §1, §3).

A :class:`NetworkSpec` is the one object the complexity model consumes.  It is
built either from architecture hyper-parameters (:mod:`theory.architectures`)
or read off a live torch model (``pruning`` models expose ``.spec()``); tests
assert both give the same object.

The network is ``stem -> blocks -> head``.  A :class:`Block` is the seed's
Figure 1: an input of width ``m`` (the previous block's output), a *path* of
``M + 1`` weight layers whose first ``M`` outputs carry unit gates ``ξ_1``
(``M = 1`` for a basic block or the residual MLP of §1, ``M = 2`` for a
bottleneck), a skip path (identity, zero-padding or a projection layer) and an
output of width ``p`` that may carry output gates ``ξ_2``.  A block whose path
is empty has been replaced by its shortcut (pruned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

LayerKind = Literal["linear", "conv1d", "conv2d"]
ShortcutKind = Literal["identity", "zero_pad", "projection"]

_SPATIAL_DIMS = {"linear": 0, "conv1d": 1, "conv2d": 2}


@dataclass(frozen=True)
class Layer:
    """One weight operation: a fully-connected layer or a convolution.

    ``kernel`` is the side ``k`` of a square kernel (1 for ``linear``);
    ``out_size`` the spatial output size (``()`` for linear, ``(L_out,)`` for
    conv1d, ``(H_out, W_out)`` for conv2d).  ``bias`` adds a bias column, so a
    unit's fan-in is ``m + 1`` entries (§1's ``ẑ = [z; 1]``).  ``bn`` means
    the layer is followed by a BatchNorm with one affine pair per output
    channel; ``act`` that it is followed by an element-wise activation.
    """

    kind: LayerKind
    in_width: int
    out_width: int
    kernel: int = 1
    out_size: tuple[int, ...] = ()
    stride: int = 1
    bias: bool = False
    bn: bool = False
    act: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _SPATIAL_DIMS:
            raise ValueError(f"Layer.kind must be one of {sorted(_SPATIAL_DIMS)}, got {self.kind!r}")
        for name in ("in_width", "out_width", "kernel", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Layer.{name} must be a non-negative integer, got {value!r}")
        if self.kernel < 1 or self.stride < 1:
            raise ValueError(f"Layer.kernel and Layer.stride must be >= 1, got {self.kernel}, {self.stride}")
        dims = _SPATIAL_DIMS[self.kind]
        if len(self.out_size) != dims or any((not isinstance(s, int)) or s < 1 for s in self.out_size):
            raise ValueError(
                f"Layer.out_size must hold {dims} positive integers for a {self.kind} layer, got {self.out_size!r}"
            )
        if self.kind == "linear" and self.kernel != 1:
            raise ValueError(f"Layer.kernel must be 1 for a linear layer, got {self.kernel}")

    @property
    def positions(self) -> int:
        """Number of output positions (``H_out·W_out``, ``L_out`` or 1)."""
        return math.prod(self.out_size)

    @property
    def c(self) -> int:
        """MACs per weight entry: 1 (FC), ``k·L_out`` (1-D), ``k·k·H_out·W_out`` (2-D) (THEORY §3)."""
        return self.d * self.positions

    @property
    def d(self) -> int:
        """Parameters per weight entry: 1 (FC), ``k`` (1-D), ``k·k`` (2-D) (THEORY §3)."""
        return self.kernel ** _SPATIAL_DIMS[self.kind]

    def with_widths(self, in_width: int | None = None, out_width: int | None = None) -> Layer:
        return replace(
            self,
            in_width=self.in_width if in_width is None else in_width,
            out_width=self.out_width if out_width is None else out_width,
        )


@dataclass(frozen=True)
class Block:
    """One residual block of eq. [1] (seed Figure 1).

    ``path`` holds the ``M + 1`` weight layers of the nonlinear path; the
    outputs of ``path[:-1]`` carry unit gates ``ξ_1`` (one gate vector per
    inner layer), the whole path is multiplied by the block gate ``ξ_B``.  An
    empty path means the block was pruned and only the shortcut remains.
    ``gated`` says whether the block carries a gate ``ξ_B`` at all (ResNet
    stage-transition blocks are often kept ungated), ``out_gated`` whether the
    block output carries gates ``ξ_2``.  ``out_act`` is the activation ``g``
    after the addition; ``add`` whether the branch is added into a skip path.
    """

    in_width: int
    out_width: int
    path: tuple[Layer, ...]
    shortcut: ShortcutKind = "identity"
    shortcut_layer: Layer | None = None
    out_size: tuple[int, ...] = ()
    gated: bool = True
    out_gated: bool = False
    out_act: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        where = f"Block {self.name!r}" if self.name else "Block"
        for attr in ("in_width", "out_width"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}.{attr} must be a non-negative integer, got {value!r}")
        if self.shortcut not in ("identity", "zero_pad", "projection"):
            raise ValueError(f"{where}.shortcut must be identity, zero_pad or projection, got {self.shortcut!r}")
        if (self.shortcut == "projection") != (self.shortcut_layer is not None):
            raise ValueError(f"{where}.shortcut_layer must be given exactly when shortcut == 'projection'")
        if self.shortcut == "identity" and self.in_width != self.out_width:
            raise ValueError(
                f"{where}: identity shortcut needs in_width == out_width, got {self.in_width} != {self.out_width}"
            )
        if self.path:
            if self.path[0].in_width != self.in_width:
                raise ValueError(
                    f"{where}.path[0].in_width={self.path[0].in_width} does not match in_width={self.in_width}"
                )
            if self.path[-1].out_width != self.out_width:
                raise ValueError(
                    f"{where}.path[-1].out_width={self.path[-1].out_width} does not match "
                    f"out_width={self.out_width}"
                )
            for j, (a, b) in enumerate(zip(self.path[:-1], self.path[1:])):
                if a.out_width != b.in_width:
                    raise ValueError(
                        f"{where}.path[{j}].out_width={a.out_width} does not match "
                        f"path[{j + 1}].in_width={b.in_width}"
                    )
        if self.shortcut_layer is not None and (
            self.shortcut_layer.in_width != self.in_width or self.shortcut_layer.out_width != self.out_width
        ):
            raise ValueError(f"{where}.shortcut_layer widths do not match the block's in/out widths")

    @property
    def M(self) -> int:
        """Number of inner gated layers (``len(path) - 1``; 0 for a pruned block)."""
        return max(len(self.path) - 1, 0)

    @property
    def alive(self) -> bool:
        """False once the nonlinear path was removed (block replaced by its shortcut)."""
        return bool(self.path)

    @property
    def unit_widths(self) -> tuple[int, ...]:
        """Widths ``n`` of the ``M`` unit-gated inner layers."""
        return tuple(layer.out_width for layer in self.path[:-1])

    @property
    def positions(self) -> int:
        return math.prod(self.out_size)

    @property
    def depth(self) -> int:
        """Weight layers this block contributes to the network depth."""
        return len(self.path)


@dataclass(frozen=True)
class NetworkSpec:
    """A whole network: ``stem`` layers, residual ``blocks``, ``head`` layers.

    ``input_shape`` is the shape of one example (channels first).  The stem's
    last output width must equal the first block's input width; the head's
    first input width the last block's output width.
    """

    name: str
    input_shape: tuple[int, ...]
    stem: tuple[Layer, ...]
    blocks: tuple[Block, ...]
    head: tuple[Layer, ...]
    num_classes: int
    meta: tuple[tuple[str, object], ...] = field(default=())

    def __post_init__(self) -> None:
        widths = [layer for layer in self.stem]
        for a, b in zip(widths[:-1], widths[1:]):
            if a.out_width != b.in_width:
                raise ValueError(f"NetworkSpec {self.name!r}: stem widths do not chain ({a.out_width} -> {b.in_width})")
        prev = self.stem[-1].out_width if self.stem else (self.input_shape[0] if self.input_shape else 0)
        for l, block in enumerate(self.blocks):
            if block.in_width != prev:
                raise ValueError(
                    f"NetworkSpec {self.name!r}: blocks[{l}].in_width={block.in_width} does not match the "
                    f"preceding output width {prev}"
                )
            prev = block.out_width
        if self.head:
            if self.head[0].in_width != prev:
                raise ValueError(
                    f"NetworkSpec {self.name!r}: head[0].in_width={self.head[0].in_width} does not match the "
                    f"last block's output width {prev}"
                )
            for a, b in zip(self.head[:-1], self.head[1:]):
                if a.out_width != b.in_width:
                    raise ValueError(f"NetworkSpec {self.name!r}: head widths do not chain")

    @property
    def prunable_blocks(self) -> int:
        """``L_b`` of [13]: blocks that carry a block gate and still have a path."""
        return sum(1 for b in self.blocks if b.gated and b.alive)

    @property
    def depth(self) -> int:
        """Weight layers of the network (stem + alive block paths + head), the seed's "layers left"."""
        return len(self.stem) + sum(b.depth for b in self.blocks) + len(self.head)

    @property
    def blocks_alive(self) -> int:
        return sum(1 for b in self.blocks if b.alive)
