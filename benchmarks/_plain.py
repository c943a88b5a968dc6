"""A hand-written plain torch network of a given structure, and its training step: the reference of the benchmarks.

:func:`plain_network` builds, from a :class:`theory.NetworkSpec` (the dense architecture, or the
widths a compacted network has left), the network a user would write by hand: ``nn.Conv*d`` /
``nn.Linear``, ``nn.BatchNorm*d``, ``nn.ReLU``, residual blocks ``relu(shortcut(x) + path(x))``
(identity, option-A zero padding or a 1×1 projection), global average pooling and the classifier —
no gates, no library module.  A pruned block (empty path) is its shortcut.

:class:`PlainStep` is one training step of it in plain torch: forward, ``F.cross_entropy``,
backward, ``torch.optim.SGD`` (momentum, ``weight_decay = λ/N``: the same ``(λ/N)/2 ||W||²`` prior the
library puts in its objective, here in the optimiser, torch's usual way; ``foreach``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from theory.spec import STEM_POOLS, Layer, NetworkSpec


def _layer(layer: Layer) -> nn.Sequential:
    mods: list[nn.Module] = []
    if layer.kind == "linear":
        mods.append(nn.Linear(layer.in_width, layer.out_width, bias=layer.bias))
    else:
        conv = nn.Conv2d if layer.kind == "conv2d" else nn.Conv1d
        mods.append(conv(layer.in_width, layer.out_width, layer.kernel, stride=layer.stride,
                         padding=layer.kernel // 2, bias=layer.bias))
    if layer.bn:
        mods.append(nn.BatchNorm2d(layer.out_width) if layer.kind == "conv2d" else nn.BatchNorm1d(layer.out_width))
    if layer.act:
        mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class _PadShortcut(nn.Module):
    def __init__(self, in_width: int, out_width: int, stride: int, dims: int) -> None:
        super().__init__()
        self.stride, self.dims = stride, dims
        self.front = (out_width - in_width) // 2
        self.back = out_width - in_width - self.front

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * self.dims]
        return F.pad(x, (0, 0) * self.dims + (self.front, self.back))


class _Block(nn.Module):
    def __init__(self, path: nn.Module | None, shortcut: nn.Module | None, out_act: bool) -> None:
        super().__init__()
        self.path, self.shortcut, self.out_act = path, shortcut, out_act

    def forward(self, x: Tensor) -> Tensor:
        s = x if self.shortcut is None else self.shortcut(x)
        if self.path is None:
            return torch.relu(s) if self.out_act else s
        z = self.path(x)
        z += s  # torchvision's BasicBlock: out += identity; relu(out) in place
        return torch.relu_(z) if self.out_act else z


class PlainNet(nn.Module):
    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.stem = nn.Sequential(*(_layer(layer) for layer in spec.stem))
        pool = dict(spec.meta).get("stem_pool")
        if pool is not None:
            k, st = STEM_POOLS[str(pool)]
            self.stem.append(nn.MaxPool2d(k, stride=st, padding=k // 2))
        size: tuple[int, ...] = spec.stem[-1].out_size if spec.stem else tuple(spec.input_shape[1:])
        if pool is not None and size:
            k, st = STEM_POOLS[str(pool)]
            size = tuple((s + 2 * (k // 2) - k) // st + 1 for s in size)
        blocks = []
        for b in spec.blocks:
            path = nn.Sequential(*(_layer(layer) for layer in b.path)) if b.path else None
            shortcut: nn.Module | None = None
            if b.shortcut == "zero_pad":
                dims = len(size)
                stride = size[0] // b.out_size[0] if size and b.out_size else 1  # also for a pruned block
                shortcut = _PadShortcut(b.in_width, b.out_width, stride, dims)
            elif b.shortcut == "projection":
                assert b.shortcut_layer is not None
                shortcut = _layer(b.shortcut_layer)
            blocks.append(_Block(path, shortcut, b.out_act))
            size = tuple(b.out_size) if b.out_size else size
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*(_layer(layer) for layer in spec.head))

    def forward(self, x: Tensor) -> Tensor:
        z = self.blocks(self.stem(x))
        if z.dim() > 2:
            z = z.flatten(2).mean(-1)
        return self.head(z)


def plain_network(spec: NetworkSpec) -> PlainNet:
    """The plain torch network of ``spec`` (see module doc), He-initialised convolutions like the library's."""
    net = PlainNet(spec)
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


class PlainStep:
    """One plain-torch training step of :func:`plain_network` ``(spec)`` on a fixed mini-batch."""

    def __init__(self, spec: NetworkSpec, x: Tensor, y: Tensor, *, lr: float, momentum: float, weight_decay: float,
                 nesterov: bool = False, channels_last: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = plain_network(spec).to(x.device)
        if channels_last and x.dim() == 4:
            self.model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.x, self.y = x, y
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   nesterov=nesterov, foreach=True)
        self.model.train()

    def __call__(self, *_: Any) -> None:
        out = self.model(self.x)
        loss = F.cross_entropy(out, self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


__all__ = ["PlainNet", "PlainStep", "plain_network"]
