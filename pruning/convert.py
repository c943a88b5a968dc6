"""Your residual network, gated: convert a plain torch ResNet into a :class:`~pruning.models.GatedNetwork`.

:func:`gate` takes the user's own ``nn.Module`` and an example input (the Torch-Pruning way) and
returns the gated network of THEORY §1 with the same weights: every block ``z = g(S x + path(x))``
becomes ``z = g(S x + ξ_B · path(x))`` with unit gates ``ξ_1`` on the inner layers of the path.
Two kinds of module are understood:

* **torchvision-style ResNets** — ``conv1, bn1, relu, maxpool, layer1 … layerN, avgpool, fc`` with
  BasicBlock (``conv1, bn1, conv2, bn2``) or Bottleneck (``… conv3, bn3``) blocks and
  ``downsample = Sequential(conv, bn)`` (or ``None``), the layout and state-dict keys of
  ``torchvision.models.resnet*``/``wide_resnet*`` (stride on conv1 or conv2 alike: ResNet v1 and v1.5).
  The common CIFAR variants with ``shortcut`` for ``downsample``, ``linear`` for ``fc``, no max-pool,
  functional ReLU/pooling and a parameter-free option-A shortcut (subsample + zero channel padding,
  e.g. a lambda layer, as in the CIFAR ResNet-20/56/110 of the paper) are read the same way;
* **networks of this project** — a :class:`~pruning.models.GatedNetwork` (to change its gating
  ``mode``) or an exported :class:`~pruning.export.DeterministicNetwork`.

The structure is read from the module's attributes, the spatial sizes from one forward pass of the
example input (forward hooks); the network is built from its :class:`theory.NetworkSpec` with
:func:`pruning.models.from_spec` — so ``net.spec()`` is that spec and every FLOPs count comes from
the one complexity model — and the weights, biases and BatchNorm statistics are copied over (start
from trained weights if you have them).  With ``check=True`` (default) the converted network in eval
mode with every ``θ = 1`` must reproduce the module's output on the example input; a module whose
``forward`` does not follow the layout is refused rather than silently changed.  What cannot be
mapped is refused with a :class:`ConversionError` naming the module: grouped or depthwise and dilated
convolutions, non-square kernels or strides, padding other than ``kernel // 2``, BatchNorm without
affine pair or running statistics, unknown children and block types.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from theory.spec import Block, Layer, NetworkSpec

from .gates import ESTIMATORS, MODES, Gate, check_choice
from .models import BN_META, GatedNetwork, WeightLayer, from_spec

_DEFAULT_BN = {"eps": 1e-5, "momentum": 0.1}
_STEM_CHILDREN = {"conv1", "bn1", "relu", "maxpool", "avgpool", "fc", "linear"}
_BLOCK_CHILDREN = {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample", "shortcut"}


class ConversionError(ValueError):
    """A module :func:`gate` cannot map; the message names the module (its path in the network)."""


def gate(
    module: nn.Module,
    example_input: Tensor,
    *,
    mode: str = "combined",
    estimator: str = "straight-through",
    theta_init: float = 1.0,
    name: str | None = None,
    check: bool = True,
) -> GatedNetwork:
    """The gated network of ``module`` (weights copied; ``module`` itself is left as it was).

    ``example_input``: one batch ``(N, C, H, W)`` (any values; only shapes matter, and the output
    check).  ``mode``/``estimator``/``theta_init``: as :func:`pruning.models.build_model`.
    ``name``: the spec's name (default: the module's class name in lower case).  ``check``: compare
    the outputs of the converted network (eval mode, ``θ = 1``) with the module's on
    ``example_input`` and refuse on a mismatch.  Raises :class:`ConversionError` naming what cannot
    be mapped.

    >>> import torch
    >>> from pruning.models import build_model
    >>> plain = build_model("resnet20", mode="none", num_classes=10, width=4, image_size=8)
    >>> net = gate(plain, torch.randn(2, 3, 8, 8), mode="combined")
    >>> net.spec() == plain.spec(), len(net.gates())
    (True, 18)

    With torchvision: ``gate(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32))``.
    """
    check_choice("mode", mode, MODES)
    check_choice("estimator", estimator, ESTIMATORS)
    if not (isinstance(theta_init, (int, float)) and 0.0 <= float(theta_init) <= 1.0):
        raise ValueError(f"theta_init must lie in [0, 1], got {theta_init!r}")
    if not isinstance(module, nn.Module):
        raise ConversionError(f"expected a torch nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ConversionError("example_input must be a batch tensor (N, C, ...) with at least one example")
    ref = next(module.parameters(), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (example_input.device, torch.float32)
    x = example_input.to(device=device, dtype=dtype)
    with _eval(module), torch.no_grad():
        activation = "relu"
        if _is_project_network(module):
            spec, pairs, out_scales = _read_project(module)
            activation = str(getattr(module, "activation", "relu"))
        else:
            spec, pairs = _read_resnet(module, x)
            out_scales = {}
        if name is not None:
            spec = dataclasses.replace(spec, name=str(name))
        with torch.device(device):
            net = from_spec(spec, mode=mode, estimator=estimator, theta_init=1.0, activation=activation)
        net.to(dtype=dtype)
        net.eval()
        for src, dst in pairs:
            _copy_into(net, src, dst)
        for block_index, scale in out_scales.items():
            out_gate = net.block_list()[block_index].out_gate
            if out_gate is None:
                raise ConversionError(
                    f"blocks.{block_index}.out_gate: the module scales this block's output (a folded θ_2), which "
                    f"needs output gates: convert with mode 'combined' or 'unit' (got {mode!r})"
                )
            out_gate.theta.copy_(scale.to(out_gate.theta))
        if check:
            with _gates_at_one(module):
                _check_outputs(module, net, x)
        if theta_init != 1.0:
            for g in net.gates():
                if not any(g is net.block_list()[i].out_gate for i in out_scales):
                    g.theta.fill_(float(theta_init))
    net.train(module.training)
    return net


# --------------------------------------------------------------------------------------------------
# torchvision-style ResNets
# --------------------------------------------------------------------------------------------------


def _read_resnet(module: nn.Module, x: Tensor) -> tuple[NetworkSpec, list[tuple[nn.Module, str]]]:
    """The spec of a torchvision-style ResNet and the (source, target path) pairs to copy."""
    children = dict(module.named_children())
    stages = sorted((k for k in children if re.fullmatch(r"layer\d+", k)), key=lambda k: int(k[5:]))
    if "conv1" not in children or not stages:
        raise ConversionError(
            f"cannot convert {type(module).__name__}: expected a torchvision-style ResNet (conv1, bn1, relu, maxpool, "
            "layer1 … layerN, avgpool, fc) or a network of this project (GatedNetwork, DeterministicNetwork)"
        )
    if [int(k[5:]) for k in stages] != list(range(1, len(stages) + 1)):
        raise ConversionError(f"{type(module).__name__}: the stages must be layer1 … layerN, found {', '.join(stages)}")
    for k, child in children.items():
        if k not in _STEM_CHILDREN and k not in stages:
            raise ConversionError(f"{k} ({type(child).__name__}): not part of the ResNet layout (conv1, bn1, relu, "
                                  "maxpool, layer1 … layerN, avgpool, fc); remove it or convert without it")
    head_name = "fc" if "fc" in children else "linear" if "linear" in children else None
    if head_name is None or not isinstance(children[head_name], nn.Linear):
        raise ConversionError(f"{type(module).__name__}: expected the classifier fc = nn.Linear (or linear)")
    if "bn1" not in children:
        raise ConversionError("bn1: missing (the stem must be conv1 -> bn1 -> relu)")
    _check_act(children.get("relu"), "relu")
    pool = children.get("maxpool")
    stem_pool: str | None = None
    if pool is not None and not isinstance(pool, nn.Identity):
        if not (isinstance(pool, nn.MaxPool2d) and _pair(pool.kernel_size) == (3, 3) and _pair(pool.stride) == (2, 2)
                and _pair(pool.padding) == (1, 1) and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode):
            raise ConversionError(f"maxpool ({pool!r}): only MaxPool2d(kernel_size=3, stride=2, padding=1) or "
                                  "nn.Identity can be mapped")
        stem_pool = "max3x3s2"
    avg = children.get("avgpool")
    if avg is not None and not (isinstance(avg, nn.AdaptiveAvgPool2d) and _pair(avg.output_size) == (1, 1)):
        raise ConversionError(f"avgpool ({avg!r}): only global average pooling AdaptiveAvgPool2d((1, 1)) can be mapped")

    sizes = _output_sizes(module, x)
    pairs: list[tuple[nn.Module, str]] = []
    bns: list[tuple[str, nn.Module]] = []

    def layer(conv_name: str, bn_name: str | None, act: bool, target: str) -> Layer:
        conv = _check_conv(module.get_submodule(conv_name), conv_name)
        out_size = sizes[conv_name]
        bn = None
        if bn_name is not None:
            bn = _check_bn(module.get_submodule(bn_name), bn_name, conv.out_channels)
            bns.append((bn_name, bn))
            pairs.append((bn, f"{target}.bn"))
        pairs.append((conv, f"{target}.op"))
        return Layer("conv2d", conv.in_channels, conv.out_channels, kernel=conv.kernel_size[0], out_size=out_size,
                     stride=conv.stride[0], bias=conv.bias is not None, bn=bn is not None, act=act)

    stem = (layer("conv1", "bn1", True, "stem.0"),)
    blocks: list[Block] = []
    for stage in stages:
        seq = children[stage]
        if not isinstance(seq, nn.Sequential):
            raise ConversionError(f"{stage} ({type(seq).__name__}): expected an nn.Sequential of residual blocks")
        for j, blk in enumerate(seq):
            where = f"{stage}.{j}"
            blocks.append(_read_block(module, blk, where, len(blocks), layer, sizes))
    fc = children[head_name]
    pairs.append((fc, "head.0.op"))
    head = (Layer("linear", fc.in_features, fc.out_features, bias=fc.bias is not None),)
    meta: list[tuple[str, object]] = [] if stem_pool is None else [("stem_pool", stem_pool)]
    meta += _bn_meta(bns)
    spec = NetworkSpec(type(module).__name__.lower(), tuple(x.shape[1:]), stem, tuple(blocks), head, fc.out_features,
                       meta=tuple(meta))
    return spec, pairs


def _read_block(module: nn.Module, blk: nn.Module, where: str, index: int, layer: Any,
                sizes: dict[str, tuple[int, ...]]) -> Block:
    kids = dict(blk.named_children())
    unknown = [k for k in kids if k not in _BLOCK_CHILDREN]
    if unknown or not {"conv1", "bn1", "conv2", "bn2"} <= set(kids):
        extra = f"; unknown children: {', '.join(f'{where}.{k}' for k in unknown)}" if unknown else ""
        raise ConversionError(
            f"{where} ({type(blk).__name__}): not a residual block this converter knows (BasicBlock: conv1, bn1, "
            f"conv2, bn2[, downsample]; Bottleneck: conv1, bn1, conv2, bn2, conv3, bn3[, downsample]){extra}"
        )
    _check_act(kids.get("relu"), f"{where}.relu")
    bottleneck = "conv3" in kids
    if bottleneck != ("bn3" in kids):
        raise ConversionError(f"{where}: conv3 and bn3 come together in a bottleneck block")
    target = f"blocks.{index}"
    names = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    path = tuple(
        layer(f"{where}.{c}", f"{where}.bn{c[-1]}", i < len(names) - 1, f"{target}.path.{i}")
        for i, c in enumerate(names)
    )
    in_width, out_width = path[0].in_width, path[-1].out_width
    ds_name = "downsample" if "downsample" in kids else "shortcut"
    ds = kids.get(ds_name)
    if ds is None or (isinstance(ds, nn.Sequential) and len(ds) == 0):
        if in_width != out_width or any(layer_.stride != 1 for layer_ in path):
            raise ConversionError(f"{where}: changes shape ({in_width} -> {out_width} channels, strides "
                                  f"{[layer_.stride for layer_ in path]}) but has no {ds_name} to match it")
        return Block(in_width, out_width, path, "identity", out_size=path[-1].out_size, name=where)
    if next(ds.parameters(), None) is None and not isinstance(ds, nn.Sequential):
        # a parameter-free shortcut (e.g. a lambda layer): option A of He et al. where the shape changes —
        # subsample by the stride, zero-pad the channels on both sides — verified by the output check
        if in_width == out_width and all(layer_.stride == 1 for layer_ in path):
            return Block(in_width, out_width, path, "identity", out_size=path[-1].out_size, name=where)
        if out_width < in_width:
            raise ConversionError(f"{where}.{ds_name} ({type(ds).__name__}): a parameter-free shortcut can only "
                                  f"widen (zero padding), not {in_width} -> {out_width} channels")
        return Block(in_width, out_width, path, "zero_pad", out_size=path[-1].out_size, name=where)
    if not (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
            and isinstance(ds[1], nn.modules.batchnorm._BatchNorm)):
        raise ConversionError(f"{where}.{ds_name} ({type(ds).__name__}): only Sequential(Conv2d, BatchNorm2d) "
                              "(a projection shortcut), a parameter-free zero-padding shortcut or None can be mapped")
    sc = layer(f"{where}.{ds_name}.0", f"{where}.{ds_name}.1", False, f"{target}.shortcut")
    if sc.out_size != path[-1].out_size:
        raise ConversionError(f"{where}.{ds_name}: output size {sc.out_size} differs from the path's "
                              f"{path[-1].out_size}")
    return Block(in_width, out_width, path, "projection", sc, out_size=path[-1].out_size, name=where)


def _output_sizes(module: nn.Module, x: Tensor) -> dict[str, tuple[int, ...]]:
    """Spatial output size of every Conv2d, by name, from one forward pass of ``x`` (hooks)."""
    sizes: dict[str, tuple[int, ...]] = {}
    handles = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.Conv2d):
            def hook(_m: nn.Module, _i: Any, out: Tensor, mod_name: str = mod_name) -> None:
                sizes[mod_name] = tuple(int(s) for s in out.shape[2:])
            handles.append(mod.register_forward_hook(hook))
    try:
        module(x)
    except Exception as exc:
        raise ConversionError(f"{type(module).__name__} failed on example_input of shape {tuple(x.shape)}: "
                              f"{type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return sizes


def _pair(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_conv(conv: nn.Module, where: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise ConversionError(f"{where} ({type(conv).__name__}): expected nn.Conv2d")
    k, s = conv.kernel_size, conv.stride
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        raise ConversionError(f"{where}: {kind} convolution (groups={conv.groups}) cannot be gated unit by unit; "
                              "only groups=1 is supported")
    if _pair(conv.dilation) != (1, 1):
        raise ConversionError(f"{where}: dilated convolution (dilation={conv.dilation}) is not supported")
    if k[0] != k[1]:
        raise ConversionError(f"{where}: non-square kernel {tuple(k)} is not supported (the complexity model counts "
                              "square k×k kernels)")
    if s[0] != s[1]:
        raise ConversionError(f"{where}: non-square stride {tuple(s)} is not supported")
    if isinstance(conv.padding, str) or _pair(conv.padding) != (k[0] // 2, k[0] // 2):
        raise ConversionError(f"{where}: padding {conv.padding!r} is not supported; the gated layers pad "
                              f"kernel // 2 = {k[0] // 2}")
    if conv.padding_mode != "zeros":
        raise ConversionError(f"{where}: padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
    return conv


def _check_bn(bn: nn.Module, where: str, channels: int) -> nn.Module:
    if not isinstance(bn, nn.BatchNorm2d):
        raise ConversionError(f"{where} ({type(bn).__name__}): expected nn.BatchNorm2d after the convolution")
    if not bn.affine:
        raise ConversionError(f"{where}: BatchNorm without affine pair (affine=False) is not supported: the block "
                              "gate folds into the last BatchNorm's γ, β")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ConversionError(f"{where}: BatchNorm without running statistics (track_running_stats=False) is not "
                              "supported")
    if bn.num_features != channels:
        raise ConversionError(f"{where}: {bn.num_features} features after a convolution with {channels} outputs")
    if bn.momentum is None:
        raise ConversionError(f"{where}: BatchNorm momentum=None (cumulative average) is not supported")
    return bn


def _check_act(act: nn.Module | None, where: str) -> None:
    if act is not None and not isinstance(act, nn.ReLU):
        raise ConversionError(f"{where} ({type(act).__name__}): only ReLU activations can be mapped")


def _bn_meta(bns: list[tuple[str, nn.Module]]) -> list[tuple[str, object]]:
    """``spec.meta`` entries for a non-default BatchNorm eps/momentum shared by every BatchNorm."""
    meta: list[tuple[str, object]] = []
    for key in ("eps", "momentum"):
        first_name, first = bns[0]
        value = float(getattr(first, key))
        for bn_name, bn in bns:
            if float(getattr(bn, key)) != value:
                raise ConversionError(f"{bn_name}: BatchNorm {key}={getattr(bn, key)} differs from {first_name}'s "
                                      f"{value}; the gated network uses one {key} for every BatchNorm")
        if value != _DEFAULT_BN[key]:
            meta.append((f"bn_{key}", value))
    assert all(k in BN_META for k, _ in meta)
    return meta


# --------------------------------------------------------------------------------------------------
# Networks of this project
# --------------------------------------------------------------------------------------------------


def _is_project_network(module: nn.Module) -> bool:
    from .export import DeterministicNetwork

    return isinstance(module, (GatedNetwork, DeterministicNetwork))


def _read_project(module: nn.Module) -> tuple[NetworkSpec, list[tuple[nn.Module, str]], dict[int, Tensor]]:
    """The spec of a GatedNetwork/DeterministicNetwork, the weight layers to copy and folded output scales."""
    from .export import ChannelScale

    spec = module.spec()  # type: ignore[operator]
    dead = [b.name or str(i) for i, b in enumerate(spec.blocks) if not b.alive]
    if dead:
        raise ConversionError(f"blocks {', '.join(dead)}: pruned (no path); a pruned network cannot be rebuilt from "
                              "its spec — continue its run (--resume) or convert it before pruning")
    pairs: list[tuple[nn.Module, str]] = []
    for name, m in module.named_modules():
        if isinstance(m, WeightLayer):
            pairs.append((m.op, f"{name}.op"))
            if m.bn is not None:
                pairs.append((m.bn, f"{name}.bn"))
    scales: dict[int, Tensor] = {}
    for i, block in enumerate(module.blocks):  # type: ignore[union-attr, arg-type]
        out_gate = getattr(block, "out_gate", None)
        if isinstance(out_gate, ChannelScale):
            scales[i] = out_gate.scale.detach().clone()
    return spec, pairs, scales


# --------------------------------------------------------------------------------------------------
# Copying and checking
# --------------------------------------------------------------------------------------------------


def _copy_into(net: GatedNetwork, src: nn.Module, dst_path: str) -> None:
    """Copy the parameters and buffers of ``src`` into ``net``'s module at ``dst_path`` (same names and shapes)."""
    dst = net.get_submodule(dst_path)
    for kind in ("_parameters", "_buffers"):
        s, d = getattr(src, kind), getattr(dst, kind)
        for key, tensor in d.items():
            if tensor is None:
                continue
            value = s.get(key)
            if value is None or value.shape != tensor.shape:
                got = None if value is None else tuple(value.shape)
                raise ConversionError(f"{dst_path}.{key}: no matching tensor in the source module (shape "
                                      f"{tuple(tensor.shape)} wanted, {got} found)")
            tensor.copy_(value)


def _check_outputs(module: nn.Module, net: GatedNetwork, x: Tensor) -> None:
    want = module(x)
    got = net(x)
    if not isinstance(want, Tensor) or want.shape != got.shape:
        raise ConversionError(f"{type(module).__name__} returns {getattr(want, 'shape', type(want).__name__)}, the "
                              f"converted network {tuple(got.shape)}: its forward does not follow the ResNet layout")
    err = float((want - got).abs().max())
    scale = float(want.abs().max()) + 1.0
    tol = (1e-4 if want.dtype in (torch.float32, torch.float64) else 1e-2) * scale
    if not err <= tol:
        raise ConversionError(
            f"the converted network differs from {type(module).__name__} on example_input (max |Δ| = {err:.3g}, "
            f"allowed {tol:.3g}): its forward does not follow the layout conv1 -> bn1 -> relu -> maxpool -> "
            "layer1 … layerN -> avgpool -> fc with blocks relu(bn(conv(...)) + shortcut); nothing was converted"
        )


@contextmanager
def _gates_at_one(module: nn.Module) -> Iterator[None]:
    """Every gate of ``module`` (a gated source network) pinned to ``ξ = 1`` for the duration."""
    gates = [m for m in module.modules() if isinstance(m, Gate)]
    previous = [g.fixed for g in gates]
    for g in gates:
        g.fix(1.0)
    try:
        yield
    finally:
        for g, v in zip(gates, previous):
            g.fix(v)


@contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the duration (every submodule's training flag restored afterwards)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


__all__ = ["ConversionError", "gate"]
