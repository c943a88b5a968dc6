"""Structural descriptions of the architectures the project trains (THEORY §1, §3).

Each builder returns the :class:`~theory.spec.NetworkSpec` that the matching
torch model in ``pruning.models`` produces from its ``.spec()`` method before
any pruning (tests assert equality), so FLOPs and parameter counts of every
architecture come from the one complexity model in :mod:`theory.complexity`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .spec import Block, Layer, LayerKind, NetworkSpec, ShortcutKind, conv_out


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


#: Blocks per stage of the ImageNet ResNets (He et al. 2016, Table 1) and whether they are bottlenecks.
IMAGENET_STAGES: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


def resnet_imagenet(
    depth: int,
    num_classes: int = 1000,
    image_size: int = 224,
    *,
    width: int = 64,
    widen: int = 1,
    in_channels: int = 3,
    name: str | None = None,
) -> NetworkSpec:
    """The ImageNet ResNets in torchvision's layout: ResNet-18/34 (basic blocks), -50/101/152 (bottlenecks).

    A 7×7/2 stem convolution + BN + ReLU, a 3×3/2 max-pool (``meta["stem_pool"]``), four stages of
    ``IMAGENET_STAGES[depth]`` blocks with ``width·(1, 2, 4, 8)`` planes, stride 2 in the first block
    of stages 2–4 — on the 3×3 convolution of a bottleneck (torchvision's "v1.5") — a projection
    shortcut (1×1 conv + BN) wherever the shape changes, global average pooling and a linear head.
    Basic blocks have ``M = 1`` (unit gates on conv1), bottlenecks ``M = 2`` (conv1, conv2) with
    inner width ``planes · widen`` and output ``4 · planes``; ``widen = 2`` is torchvision's
    ``wide_resnet50_2``/``wide_resnet101_2``.  Every block carries a block gate.

    >>> spec = resnet_imagenet(18)
    >>> len(spec.blocks), spec.blocks[2].shortcut, spec.blocks[2].path[0].stride
    (8, 'projection', 2)
    """
    if depth not in IMAGENET_STAGES:
        raise ValueError(f"depth must be one of {sorted(IMAGENET_STAGES)}, got {depth!r}")
    bottleneck, stages = IMAGENET_STAGES[depth]
    for key, value in (("num_classes", num_classes), ("image_size", image_size), ("width", width),
                       ("widen", widen), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if widen != 1 and not bottleneck:
        raise ValueError(f"widen applies to bottleneck blocks (depth 50, 101, 152), got depth {depth}")
    s = conv_out(image_size, 7, 2)
    stem = (Layer("conv2d", in_channels, width, kernel=7, out_size=(s, s), stride=2, bn=True, act=True),)
    size = conv_out(s, 3, 2)  # 3×3/2 max-pool
    expansion = 4 if bottleneck else 1
    blocks: list[Block] = []
    cin = width
    for stage, nb in enumerate(stages):
        planes = width * 2**stage
        cout = expansion * planes
        for b in range(nb):
            stride = 2 if (stage > 0 and b == 0) else 1
            in_size = (size, size)
            size = conv_out(size, 3, stride)
            hw = (size, size)
            path: tuple[Layer, ...]
            if bottleneck:
                mid = planes * widen
                path = (
                    Layer("conv2d", cin, mid, kernel=1, out_size=in_size, bn=True, act=True),
                    Layer("conv2d", mid, mid, kernel=3, out_size=hw, stride=stride, bn=True, act=True),
                    Layer("conv2d", mid, cout, kernel=1, out_size=hw, bn=True, act=False),
                )
            else:
                path = (
                    Layer("conv2d", cin, cout, kernel=3, out_size=hw, stride=stride, bn=True, act=True),
                    Layer("conv2d", cout, cout, kernel=3, out_size=hw, bn=True, act=False),
                )
            block_name = f"layer{stage + 1}.{b}"
            if stride != 1 or cin != cout:
                sc = Layer("conv2d", cin, cout, kernel=1, out_size=hw, stride=stride, bn=True, act=False)
                blocks.append(Block(cin, cout, path, "projection", sc, out_size=hw, name=block_name))
            else:
                blocks.append(Block(cin, cout, path, "identity", out_size=hw, name=block_name))
            cin = cout
    head = (Layer("linear", cin, num_classes, bias=True),)
    if name is None:
        name = f"wide_resnet{depth}_{widen}" if widen != 1 else f"resnet{depth}"
    return NetworkSpec(
        name, (in_channels, image_size, image_size), stem, tuple(blocks), head, num_classes,
        meta=(("stem_pool", "max3x3s2"),),
    )


def resnet50(num_classes: int = 1000, image_size: int = 224) -> NetworkSpec:
    """ImageNet ResNet-50 (torchvision v1.5: stride on the 3×3 conv), bottleneck blocks with ``M = 2``.

    Unit gates on conv1 and conv2 of every bottleneck; projection shortcuts
    (1×1 conv + BN) where the shape changes; a 3×3/2 max-pool after the stem
    (``meta["stem_pool"]``).  Counted as conv + linear MACs.  :func:`resnet_imagenet` with depth 50.
    """
    return resnet_imagenet(50, num_classes, image_size)


def wide_resnet_cifar(
    depth: int = 28, widen: int = 10, num_classes: int = 10, image_size: int = 32, in_channels: int = 3
) -> NetworkSpec:
    """Wide ResNet WRN-``depth``-``widen`` for 32×32 inputs (Zagoruyko & Komodakis 2016), post-activation form.

    ``depth = 6n + 4``: a 3×3 stem convolution with 16 channels, three stages of ``n`` basic blocks
    with ``16k, 32k, 64k`` channels (``k = widen``; stride 2 entering stages 2 and 3), a projection
    shortcut (1×1 conv + BN) where the shape changes, global average pooling, a linear head.  The
    blocks are written conv–BN–ReLU like every network here (the original orders BN–ReLU–conv and
    adds dropout), which leaves the convolutions and so the conv + linear MACs unchanged; only the
    BatchNorm parameters are placed differently.  WRN-28-10: 5.25 G MACs.

    >>> wide_resnet_cifar(16, 8).name
    'wrn-16-8'
    """
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
    for key, value in (("widen", widen), ("num_classes", num_classes), ("image_size", image_size),
                       ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    n = (depth - 4) // 6
    size = image_size
    stem = (Layer("conv2d", in_channels, 16, kernel=3, out_size=(size, size), bn=True, act=True),)
    blocks: list[Block] = []
    cin = 16
    for stage in range(3):
        cout = 16 * widen * 2**stage
        for b in range(n):
            stride = 2 if (stage > 0 and b == 0) else 1
            size = conv_out(size, 3, stride)
            hw = (size, size)
            path = (
                Layer("conv2d", cin, cout, kernel=3, out_size=hw, stride=stride, bn=True, act=True),
                Layer("conv2d", cout, cout, kernel=3, out_size=hw, bn=True, act=False),
            )
            block_name = f"stage{stage + 1}.{b}"
            if stride != 1 or cin != cout:
                sc = Layer("conv2d", cin, cout, kernel=1, out_size=hw, stride=stride, bn=True, act=False)
                blocks.append(Block(cin, cout, path, "projection", sc, out_size=hw, name=block_name))
            else:
                blocks.append(Block(cin, cout, path, "identity", out_size=hw, name=block_name))
            cin = cout
    head = (Layer("linear", cin, num_classes, bias=True),)
    return NetworkSpec(f"wrn-{depth}-{widen}", (in_channels, image_size, image_size), stem, tuple(blocks), head,
                       num_classes)


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
    "resnet18": lambda: resnet_imagenet(18),
    "resnet34": lambda: resnet_imagenet(34),
    "resnet101": lambda: resnet_imagenet(101),
    "resnet152": lambda: resnet_imagenet(152),
    "wide_resnet50_2": lambda: resnet_imagenet(50, widen=2),
    "wide_resnet101_2": lambda: resnet_imagenet(101, widen=2),
    "wrn-16-8": lambda: wide_resnet_cifar(16, 8),
    "wrn-28-10": lambda: wide_resnet_cifar(28, 10),
}


def by_name(name: str) -> NetworkSpec:
    """The spec of a named architecture; ``ValueError`` listing the names if unknown."""
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(ARCHITECTURES))}") from None
