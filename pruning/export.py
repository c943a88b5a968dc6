"""The final deterministic network (THEORY.md §5, last paragraph).

:func:`export_deterministic` turns a (compacted) gated network into a plain
torch module without gate modules, with the surviving ``θ`` folded into the
adjacent weights:

* a unit gate ``θ_1`` on the output of layer ``j`` multiplies that layer's
  (post-activation) output channels, which only feed the linear operation of
  layer ``j + 1``: fold it into the *input* channels of that weight
  (``W_{j+1}[:, i] ← θ_i W_{j+1}[:, i]``);
* a block gate ``θ_B`` multiplies the whole branch: fold it into the affine
  pair of the last BatchNorm of the path (eval-mode BN is affine, so scaling
  ``γ`` and ``β`` scales its output), or into ``W_2`` (and its bias) when the
  last layer has no BatchNorm;
* output gates ``θ_2`` (residual MLP only) act on a feature that also flows
  through the identity skip, so no weight can absorb them; they become a
  constant per-feature scale (:class:`ChannelScale`, a buffer, no parameter).

The result equals the mean-field model (eval mode, every ``ξ`` replaced by
``θ``) up to float rounding (tested).  :func:`save_export` writes its state
dict, its spec and a ``torch.export`` program, each atomically.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from theory.atomic import atomic_path, atomic_write_text
from theory.spec import NetworkSpec

from .models import GatedNetwork, ResidualBlock, WeightLayer


class ChannelScale(nn.Module):
    """``z ↦ s ⊙ z`` along axis 1 with a constant (buffer) ``s``: a folded output gate ``θ_2``."""

    scale: Tensor

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, z: Tensor) -> Tensor:
        return z * self.scale.reshape((1, -1) + (1,) * (z.dim() - 2))


class DeterministicNetwork(nn.Module):
    """``stem -> blocks -> head`` of a gated network with every gate folded away (eval mode)."""

    def __init__(self, model: GatedNetwork) -> None:
        super().__init__()
        self.name, self.input_shape, self.num_classes = model.name, model.input_shape, model.num_classes
        self.meta = model.meta
        self.stem, self.stem_pool = model.stem, model.stem_pool
        self.blocks, self.head = model.blocks, model.head

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.stem:
            x = layer(x)
        z = self.stem_pool(x)
        for block in self.blocks:
            z = block(z)
        if z.dim() > 2:
            z = z.flatten(2).mean(-1)
        for layer in self.head:
            z = layer(z)
        return z

    def spec(self) -> NetworkSpec:
        return NetworkSpec(
            self.name,
            self.input_shape,
            tuple(cast(WeightLayer, layer).spec() for layer in self.stem),
            tuple(cast(ResidualBlock, block).spec() for block in self.blocks),
            tuple(cast(WeightLayer, layer).spec() for layer in self.head),
            self.num_classes,
            meta=self.meta,
        )


def _scale_input_channels(layer: WeightLayer, theta: Tensor) -> None:
    w = layer.op.weight
    w.mul_(theta.to(w).reshape((1, -1) + (1,) * (w.dim() - 2)))


def _scale_output(layer: WeightLayer, theta_B: Tensor) -> None:
    tensors = [layer.bn.weight, layer.bn.bias] if layer.bn is not None else [layer.op.weight, layer.op.bias]
    for t in tensors:
        if t is not None:
            t.mul_(theta_B.to(t))


@torch.no_grad()
def export_deterministic(model: GatedNetwork, *, eps: float | None = None) -> DeterministicNetwork:
    """The final deterministic network: surviving ``θ`` folded into the weights, no gate modules.

    ``model`` is not modified.  With ``eps`` the copy is first compacted by
    :func:`pruning.compaction.prune` (structures with ``θ < eps`` removed).
    The returned module is in eval mode; its ``spec()`` is the exported structure.
    """
    net = copy.deepcopy(model)
    if eps is not None:
        from .compaction import prune

        prune(net, eps)
    for block in net.block_list():
        if block.alive:
            path = block.layers()
            for layer, nxt in zip(path[:-1], path[1:]):
                if layer.gate is not None:
                    _scale_input_channels(nxt, layer.gate.theta.detach())
                    layer.gate = None
            if block.block_gate is not None:
                _scale_output(path[-1], block.block_gate.theta.detach())
                block.block_gate = None
        if block.out_gate is not None:
            block.out_gate = ChannelScale(block.out_gate.theta.detach())  # type: ignore[assignment]
    for layer in net.stem_layers() + net.head_layers():
        layer.gate = None
    out = DeterministicNetwork(net).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def save_export(
    module: nn.Module, path_dir: str | os.PathLike[str], example_input: Tensor | None = None
) -> dict[str, Path]:
    """Write ``state_dict.pt``, ``model.pt2`` (a ``torch.export`` program, dynamic batch size) and
    ``spec.json`` (when the module has ``spec()``) into ``path_dir``, each atomically (temp file +
    ``os.replace``).  ``example_input`` defaults to zeros of shape ``(2, *module.input_shape)``.
    Load the program with ``torch.export.load(path).module()``.  Returns the written paths.
    """
    out_dir = Path(path_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    if example_input is None:
        shape = getattr(module, "input_shape", None)
        if shape is None:
            raise ValueError("example_input is required for a module without input_shape")
        ref = next(module.parameters(), None)
        example_input = torch.zeros(2, *shape, device=None if ref is None else ref.device)
    paths = {"state_dict": out_dir / "state_dict.pt", "program": out_dir / "model.pt2"}
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with atomic_path(paths["state_dict"]) as tmp:
        torch.save(state, tmp)
    try:
        program = torch.export.export(
            module, (example_input,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        )
    except Exception:  # a model torch.export cannot make batch-dynamic: fall back to the example's shape
        program = torch.export.export(module, (example_input,))
    with atomic_path(paths["program"]) as tmp:
        torch.export.save(program, tmp)
    spec_fn = getattr(module, "spec", None)
    if callable(spec_fn):
        paths["spec"] = out_dir / "spec.json"
        atomic_write_text(paths["spec"], json.dumps(asdict(spec_fn()), indent=1))
    return paths


__all__ = ["ChannelScale", "DeterministicNetwork", "export_deterministic", "save_export"]
