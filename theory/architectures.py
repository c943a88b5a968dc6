"""Structural descriptions of the architectures the project trains (THEORY.md §1, §3).

Each builder returns the :class:`~theory.spec.NetworkSpec` that the matching
torch model in ``pruning.models`` produces from its ``.spec()`` method before
any pruning (tests assert equality), so FLOPs and parameter counts of every
architecture come from the one complexity model in :mod:`theory.complexity`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .spec import Block, Layer, LayerKind, NetworkSpec, ShortcutKind


def _conv(dim: int, cin: int, cout: int, k: int, size: tuple[int, ...], stride: int = 1, act: bool = True) -> Layer:
    kind: LayerKind = "conv2d" if dim == 2 else "conv1d"
    return Layer(kind, cin, cout, kernel=k, out_size=size, stride=stride, bias=False, bn=True, act=act)


def _basic_block(dim: int, cin: int, cout: int, size: tuple[int, ...], stride: int, name: str) -> Block:
    """conv(k3)-BN-ReLU (gated units) -> conv(k3)-BN, option-A shortcut, ReLU after the addition."""
    path = (
        _conv(dim, cin, cout, 3, size, stride=stride, act=True),
        _conv(dim, cout, cout, 3, size, act=False),
    )
    shortcut: ShortcutKind = "identity" if (cin == cout and stride == 1) else "zero_pad"
    return Block(cin, cout, path, shortcut=shortcut, out_size=size, name=name)


def _basic_resnet(
    name: str,
    dim: int,
    in_channels: int,
    in_size: tuple[int, ...],
    stage_blocks: Sequence[int],
    widths: Sequence[int],
    num_classes: int,
    stem_kernel: int,
) -> NetworkSpec:
    stem = (_conv(dim, in_channels, widths[0], stem_kernel, in_size),)
    blocks: list[Block] = []
    cin, size = widths[0], in_size
    for s, (nb, w) in enumerate(zip(stage_blocks, widths)):
        for b in range(nb):
            stride = 2 if (s > 0 and b == 0) else 1
            if stride == 2:
                size = tuple((x + 1) // 2 for x in size)
            blocks.append(_basic_block(dim, cin, w, size, stride, f"stage{s + 1}.{b}"))
            cin = w
    head = (Layer("linear", cin, num_classes, bias=True),)
    return NetworkSpec(name, (in_channels, *in_size), stem, tuple(blocks), head, num_classes)


def resnet_cifar(
    depth: int, num_classes: int = 10, width: int = 16, image_size: int = 32, in_channels: int = 3
) -> NetworkSpec:
    """CIFAR ResNet-(6n+2) of He et al. (2016): basic blocks, option-A shortcuts, 32×32 inputs.

    ``depth`` 20, 32, 44, 56, 110, ... (``(depth - 2) % 6 == 0``).
    """
    if width < 1 or image_size < 1 or in_channels < 1:
        raise ValueError(
            f"width, image_size and in_channels must be positive, got {width}, {image_size}, {in_channels}"
        )
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {depth!r}")
    n = (depth - 2) // 6
    return _basic_resnet(
        f"resnet{depth}",
        2,
        in_channels,
        (image_size, image_size),
        (n, n, n),
        (width, 2 * width, 4 * width),
        num_classes,
        stem_kernel=3,
    )


def resnet1d(
    stage_blocks: Sequence[int] = (3, 3, 3),
    widths: Sequence[int] = (16, 32, 64),
    length: int = 40,
    in_channels: int = 1,
    num_classes: int = 10,
) -> NetworkSpec:
    """A 1-D analogue of the CIFAR ResNets for sequence data such as MNIST-1D (length 40)."""
    if len(stage_blocks) != len(widths) or not stage_blocks:
        raise ValueError(f"stage_blocks and widths must have the same non-zero length, got {stage_blocks}, {widths}")
    if any(w < 1 for w in widths) or any(b < 1 for b in stage_blocks) or length < 1:
        raise ValueError(f"widths, stage_blocks and length must be positive, got {widths}, {stage_blocks}, {length}")
    depth = 2 + 2 * sum(stage_blocks)
    return _basic_resnet(
        f"resnet1d-{depth}", 1, in_channels, (length,), stage_blocks, widths, num_classes, stem_kernel=3
    )


def resnet50(num_classes: int = 1000, image_size: int = 224) -> NetworkSpec:
    """ImageNet ResNet-50 (torchvision v1.5: stride on the 3×3 conv), bottleneck blocks with ``M = 2``.

    Unit gates on conv1 and conv2 of every bottleneck; projection shortcuts
    (1×1 conv + BN) where the shape changes; a 3×3/2 max-pool after the stem
    (``meta["stem_pool"]``).  Counted as conv + linear MACs.
    """
    s = image_size
    stem_size = (s + 1) // 2
    stem = (Layer("conv2d", 3, 64, kernel=7, out_size=(stem_size, stem_size), stride=2, bn=True, act=True),)
    size = (stem_size + 1) // 2  # 3×3/2 max-pool
    blocks: list[Block] = []
    cin = 64
    for stage, (nb, mid) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        cout = 4 * mid
        for b in range(nb):
            stride = 2 if (stage > 0 and b == 0) else 1
            in_size = size
            if stride == 2:
                size = (size + 1) // 2
            hw = (size, size)
            path = (
                Layer("conv2d", cin, mid, kernel=1, out_size=(in_size, in_size), bn=True, act=True),
                Layer("conv2d", mid, mid, kernel=3, out_size=hw, stride=stride, bn=True, act=True),
                Layer("conv2d", mid, cout, kernel=1, out_size=hw, bn=True, act=False),
            )
            if b == 0:
                sc = Layer("conv2d", cin, cout, kernel=1, out_size=hw, stride=stride, bn=True, act=False)
                block = Block(cin, cout, path, "projection", sc, out_size=hw, name=f"layer{stage + 1}.{b}")
            else:
                block = Block(cin, cout, path, "identity", out_size=hw, name=f"layer{stage + 1}.{b}")
            blocks.append(block)
            cin = cout
    head = (Layer("linear", cin, num_classes, bias=True),)
    return NetworkSpec(
        "resnet50", (3, image_size, image_size), stem, tuple(blocks), head, num_classes,
        meta=(("stem_pool", "max3x3s2"),),
    )


def residual_mlp(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    out_gated: bool = False,
) -> NetworkSpec:
    """The gated residual MLP of §1: blocks ``z -> ξ_2 ⊙ g(z + ξ_B W_2 (ξ_1 ⊙ f(W_1 ẑ)))``.

    One block per entry of ``hidden`` (its unit count ``n``); every block keeps
    the width ``in_features`` (identity skip), ``W_1`` carries the bias column,
    ``W_2`` none; the head is the linear classifier ``z^L = S^L ẑ^{L-1}``.
    ``out_gated`` adds the optional output gates ``ξ_2``.
    """
    if in_features < 1 or num_classes < 1 or any(n < 1 for n in hidden):
        raise ValueError(
            f"in_features, num_classes and hidden widths must be positive, got {in_features}, {num_classes}, {hidden}"
        )
    m = in_features
    blocks = tuple(
        Block(
            m,
            m,
            (Layer("linear", m, n, bias=True, act=True), Layer("linear", n, m, bias=False)),
            shortcut="identity",
            out_gated=out_gated,
            name=f"block{l}",
        )
        for l, n in enumerate(hidden)
    )
    head = (Layer("linear", m, num_classes, bias=True),)
    return NetworkSpec(f"residual-mlp-{len(hidden)}", (m,), (), blocks, head, num_classes)


#: Named architectures for command lines (``python -m pruning flops --model NAME``).
ARCHITECTURES: dict[str, Callable[[], NetworkSpec]] = {
    "resnet20": lambda: resnet_cifar(20),
    "resnet56": lambda: resnet_cifar(56),
    "resnet110": lambda: resnet_cifar(110),
    "resnet110-c100": lambda: resnet_cifar(110, num_classes=100),
    "resnet50": resnet50,
    "resnet1d": resnet1d,
}


def by_name(name: str) -> NetworkSpec:
    """The spec of a named architecture; ``ValueError`` listing the names if unknown."""
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(ARCHITECTURES))}") from None
