"""Physical removal of pruned units and blocks (THEORY §5, Algorithm 1 step 4).

A unit is removed for good when ``θ_1,i < ε``; a block when ``θ_B < ε`` or
when all units of any of its inner gated layers are below ``ε`` (the block is
replaced by its shortcut, which is never pruned).  Removal is physical: new,
smaller ``nn.Parameter`` objects replace the old ones, so every later
iteration is cheaper, and the optimiser state of the surviving entries is
carried over.

The removal is driven by an explicit dependency structure (Torch-Pruning
style) built from the generic structure of :mod:`pruning.models`, never by
index juggling inside a model:

* :class:`UnitGroup` — the unit-gated output channels of inner layer ``j`` of
  a block, with every coupled tensor and the dimension along which it is
  indexed by those channels (:class:`Dep`): the producer's weight (dim 0) and
  bias, its BatchNorm affine pair and running statistics, the gate's ``θ`` and
  ``unit_ids``, and the consumer's weight (dim 1).
* :class:`BlockGroup` — the whole nonlinear path of a block with its block
  gate; removing it drops all those parameters.

:func:`prune` evaluates the ε rule on every group, slices each coupled tensor
once (all its dimensions together), replaces parameters in the model and in
the optimisers (``param_groups`` updated in place; SGD ``momentum_buffer``,
Adam ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` sliced, ``step`` kept) and
returns a :class:`PruneEvent` describing what left the network.

A note on BatchNorm.  The theory's ``W_2`` has no bias, so a block whose units
are all off contributes exactly 0.  With BatchNorm the path of such a block
still outputs a constant in eval mode, and replacing the block by its shortcut
drops it (:func:`dropped_constant`).  When the *last* inner layer ``j = M − 1``
is dead, the next (last) layer sees 0 and the constant is the last BN's shift
``β − γμ/σ``.  When an earlier layer dies — the first of an ``M = 2`` bottleneck —
the layers after it see constants: layer ``j + 1`` outputs ``s = BN(b)``
(its shift, plus its bias if any), its activation and mean-field gate give
``h = θ ⊙ f(s)``, and the last layer outputs ``γ (W̄ h + b − μ)/σ + β`` with
``W̄`` the weight summed over its kernel — so the dropped constant is the last
shift *plus* ``γ W̄ h / σ``, which the last BN shift alone misses.  Its norm (per
channel; exact for 1×1 last layers as in bottlenecks, the interior value
otherwise) is recorded in :attr:`BlockRemoval.bn_shift_norm` for the audit.
In train mode BatchNorm would normalise a constant away (only ``β`` remains);
the record is the eval-mode constant, what evaluation and export see.  Output gates
``ξ_2`` of the residual MLP are never removed (the identity skips tie those
features through the whole network).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from theory.spec import NetworkSpec

from .gates import BlockGate, UnitGate
from .models import GatedNetwork, ResidualBlock, WeightLayer

# ------------------------------------------------------------------------------------------------
# The dependency structure
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dep:
    """A tensor ``getattr(module, name)`` indexed along ``dim`` by the units of a group."""

    module: nn.Module
    name: str
    dim: int
    label: str

    def tensor(self) -> Tensor:
        return getattr(self.module, self.name)


@dataclass(frozen=True)
class UnitGroup:
    """Inner layer ``layer`` of block ``block``: its output channels and every tensor coupled to them."""

    block: int
    layer: int
    gate: UnitGate | None
    producer: WeightLayer
    consumer: WeightLayer
    deps: tuple[Dep, ...]

    @property
    def width(self) -> int:
        return self.producer.out_width

    def fan_in_norms(self) -> Tensor:
        """``||w_i||`` per unit: the producer's weight row incl. its bias entry (§1's fan-in)."""
        w = self.producer.op.weight.detach().flatten(1)
        sq = (w * w).sum(1)
        if self.producer.op.bias is not None:
            sq = sq + self.producer.op.bias.detach() ** 2
        return sq.sqrt()

    def fan_out_norms(self) -> Tensor:
        """``||v_i||`` per unit: the consumer's weight column (no bias column, §1)."""
        w = self.consumer.op.weight.detach().transpose(0, 1).flatten(1)
        return (w * w).sum(1).sqrt()


@dataclass(frozen=True)
class BlockGroup:
    """The nonlinear path of block ``block`` with its block gate: removed as a whole."""

    block: int
    module: ResidualBlock
    gate: BlockGate | None
    units: tuple[UnitGroup, ...]


def _layer_deps(prefix: str, layer: WeightLayer, dim_in_channels: bool) -> list[Dep]:
    """Deps of ``layer`` indexed by its output channels (producer) or input channels (consumer)."""
    if dim_in_channels:
        return [Dep(layer.op, "weight", 1, f"{prefix}.op.weight")]
    deps = [Dep(layer.op, "weight", 0, f"{prefix}.op.weight")]
    if layer.op.bias is not None:
        deps.append(Dep(layer.op, "bias", 0, f"{prefix}.op.bias"))
    if layer.bn is not None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(layer.bn, name, None) is not None:
                deps.append(Dep(layer.bn, name, 0, f"{prefix}.bn.{name}"))
    if layer.gate is not None:
        deps.append(Dep(layer.gate, "theta", 0, f"{prefix}.gate.theta"))
        deps.append(Dep(layer.gate, "unit_ids", 0, f"{prefix}.gate.unit_ids"))
    return deps


def dependency_groups(model: GatedNetwork) -> list[BlockGroup]:
    """The dependency structure of ``model``: one :class:`BlockGroup` per alive block, with its unit groups."""
    groups = []
    for l, block in enumerate(model.block_list()):
        if not block.alive:
            continue
        path = block.layers()
        units = []
        for j in range(len(path) - 1):
            producer, consumer = path[j], path[j + 1]
            deps = _layer_deps(f"blocks.{l}.path.{j}", producer, False)
            deps += _layer_deps(f"blocks.{l}.path.{j + 1}", consumer, True)
            units.append(UnitGroup(l, j, producer.gate, producer, consumer, tuple(deps)))
        groups.append(BlockGroup(l, block, block.block_gate, tuple(units)))
    return groups


# ------------------------------------------------------------------------------------------------
# What a prune step removed
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitRemoval:
    """Units removed from inner layer ``layer`` of block ``block`` (indices before this prune)."""

    block: int
    block_name: str
    layer: int
    indices: tuple[int, ...]
    unit_ids: tuple[int, ...]  # indices in the network as constructed
    thetas: tuple[float, ...]
    theta_B: float | None
    fan_in_norms: tuple[float, ...]
    fan_out_norms: tuple[float, ...]
    bn_affine: tuple[tuple[float, float], ...] | None  # (γ_i, β_i) of the producer's BatchNorm


@dataclass(frozen=True)
class BlockRemoval:
    """Block ``block`` replaced by its shortcut.  ``reason``: ``"theta_B"`` or ``"units"``."""

    block: int
    block_name: str
    reason: str
    theta_B: float | None
    thetas: tuple[tuple[float, ...], ...]  # θ_1 of every inner layer (empty where ungated)
    layer_norms: tuple[float, ...]  # ||W|| of each path layer (weight + bias)
    fan_in_norm: float  # ||W_1||
    fan_out_norm: float  # ||W_{M+1}||
    weight_norm: float  # sqrt(Σ ||W_j||²), the ||W|| of Theorem 5.1
    bn_shift_norm: float | None  # ||c||: the eval-mode constant the dead path outputs (dropped_constant)


@dataclass
class PruneEvent:
    """The result of :func:`prune`."""

    eps: float
    step: int | None
    units: list[UnitRemoval] = field(default_factory=list)
    blocks: list[BlockRemoval] = field(default_factory=list)
    spec_before: NetworkSpec | None = None
    spec_after: NetworkSpec | None = None

    @property
    def empty(self) -> bool:
        return not self.units and not self.blocks

    @property
    def num_units(self) -> int:
        """Units removed from surviving blocks (units of removed blocks are counted in ``blocks``)."""
        return sum(len(u.indices) for u in self.units)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (specs reduced to per-block widths)."""

        def widths(spec: NetworkSpec | None) -> list[list[int]] | None:
            return None if spec is None else [list(b.unit_widths) if b.alive else [] for b in spec.blocks]

        return {
            "eps": self.eps,
            "step": self.step,
            "units": [asdict(u) for u in self.units],
            "blocks": [asdict(b) for b in self.blocks],
            "unit_widths_before": widths(self.spec_before),
            "unit_widths_after": widths(self.spec_after),
        }


# ------------------------------------------------------------------------------------------------
# Tensor surgery with optimiser-state carry-over
# ------------------------------------------------------------------------------------------------


def _slice(t: Tensor, keep: dict[int, Tensor]) -> Tensor:
    for dim, idx in sorted(keep.items()):
        t = t.index_select(dim, idx.to(t.device))
    return t


def _replace_in_optimizers(
    optimizers: Sequence[torch.optim.Optimizer], old: nn.Parameter, new: nn.Parameter | None, keep: dict[int, Tensor]
) -> None:
    """Swap ``old`` for ``new`` (or drop it if ``new`` is None) in every optimiser, slicing its state."""
    for opt in optimizers:
        for group in opt.param_groups:
            params = group["params"]
            for k, p in enumerate(params):
                if p is old:
                    if new is None:
                        del params[k]
                    else:
                        params[k] = new
                    break
        state = opt.state.pop(old, None)
        if state is not None and new is not None:
            carried = {}
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step" and value.shape == old.shape:
                    carried[key] = _slice(value, keep).clone()
                else:
                    carried[key] = value
            opt.state[new] = carried


def _sync_widths(module: nn.Module) -> None:
    """Bring the width attributes of a torch layer in line with its (sliced) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]


def _apply_slices(
    slices: dict[tuple[int, str], tuple[nn.Module, str, dict[int, Tensor]]],
    optimizers: Sequence[torch.optim.Optimizer],
) -> None:
    for module, name, keep in slices.values():
        old = getattr(module, name)
        data = _slice(old.detach(), keep).clone()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(data, requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = _slice(old.grad, keep).clone()
            _replace_in_optimizers(optimizers, old, new, keep)
            setattr(module, name, new)
        else:
            module._buffers[name] = data
        _sync_widths(module)


def _norm(*tensors: Tensor | None) -> float:
    return math.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in tensors if t is not None))


def _eval_affine(layer: WeightLayer, v: Tensor, *, gated: bool = True) -> Tensor:
    """Per-channel output of ``layer`` in eval mode for a spatially constant input ``v`` (one value per channel).

    ``op`` becomes ``W̄ v + b`` (``W̄`` summed over the kernel: exact away from zero-padded borders,
    exact everywhere for 1×1 kernels and for ``v = 0``), then BN with running statistics, the
    activation and the mean-field gate ``θ``.
    """
    w = layer.op.weight.detach().double()
    w_bar = w.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w
    x = w_bar @ v
    if layer.op.bias is not None:
        x = x + layer.op.bias.detach().double()
    bn = layer.bn
    if bn is not None:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("BatchNorm without running statistics")
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(x)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(x)
        x = gamma * (x - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) + beta
    if layer.act is not None:
        x = layer.act(x)
    if gated and layer.gate is not None:
        x = x * layer.gate.theta.detach().double()
    return x


def dropped_constant(path: Sequence[WeightLayer], dead: int | None = None) -> Tensor | None:
    """The eval-mode constant (per output channel) a block's path outputs once inner layer ``dead`` is all off.

    Layer ``dead``'s gated output is 0; the layers after it map constants to constants
    (:func:`_eval_affine`).  ``dead = None`` (a block removed for ``θ_B``, no dead layer): the last inner
    layer is taken as off, i.e. the last BN's shift ``β − γμ/σ`` (plus bias) — what remains when all
    units of the block are off.  ``None`` when the path has no BatchNorm after the dead layer and no
    bias (the constant is exactly 0 then, nothing is dropped) or no path.
    """
    if not path:
        return None
    start = (len(path) - 2 if dead is None else dead) + 1
    tail = list(path[max(start, 0):])
    if not any(layer.bn is not None or layer.op.bias is not None for layer in tail):
        return None
    v = torch.zeros(tail[0].op.weight.shape[1], dtype=torch.float64, device=tail[0].op.weight.device)
    for layer in tail[:-1]:
        v = _eval_affine(layer, v)
    return _eval_affine(tail[-1], v, gated=False)  # the path's output, before ξ_B


def _bn_shift_norm(path: Sequence[WeightLayer], dead: int | None) -> float | None:
    c = dropped_constant(path, dead)
    return None if c is None else _norm(c)


# ------------------------------------------------------------------------------------------------
# prune
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def prune(
    model: GatedNetwork,
    eps: float,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    *,
    step: int | None = None,
) -> PruneEvent:
    """Remove every unit with ``θ_1,i < eps`` and every block with ``θ_B < eps`` or a dead inner layer.

    New parameters replace the old ones in ``model`` and in each optimiser's ``param_groups`` (in
    place); the per-parameter optimiser state of the surviving entries is carried over exactly.
    Returns the :class:`PruneEvent` (``event.empty`` when nothing was removed).
    """
    if not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1], got {eps!r}")
    event = PruneEvent(eps=float(eps), step=step, spec_before=model.spec())
    slices: dict[tuple[int, str], tuple[nn.Module, str, dict[int, Tensor]]] = {}
    dead_blocks: list[BlockGroup] = []
    for bgroup in dependency_groups(model):
        block = bgroup.module
        theta_B = None if bgroup.gate is None else float(bgroup.gate.theta.detach())
        unit_thetas = [None if u.gate is None else u.gate.theta.detach() for u in bgroup.units]
        dead = [j for j, t in enumerate(unit_thetas) if t is not None and bool((t < eps).all())]
        dead_layer = bool(dead)
        if (theta_B is not None and theta_B < eps) or dead_layer:
            path = block.layers()
            norms = tuple(_norm(layer.op.weight, layer.op.bias) for layer in path)
            event.blocks.append(
                BlockRemoval(
                    block=bgroup.block,
                    block_name=block.name,
                    reason="theta_B" if (theta_B is not None and theta_B < eps) else "units",
                    theta_B=theta_B,
                    thetas=tuple(() if t is None else tuple(t.tolist()) for t in unit_thetas),
                    layer_norms=norms,
                    fan_in_norm=norms[0],
                    fan_out_norm=norms[-1],
                    weight_norm=math.sqrt(sum(n * n for n in norms)),
                    bn_shift_norm=_bn_shift_norm(path, dead[-1] if dead else None),
                )
            )
            dead_blocks.append(bgroup)
            continue
        for ugroup, theta in zip(bgroup.units, unit_thetas):
            gate = ugroup.gate
            if theta is None or gate is None:
                continue
            removed = (theta < eps).nonzero().flatten()
            if removed.numel() == 0:
                continue
            keep = (theta >= eps).nonzero().flatten()
            idx = removed.tolist()
            bn = ugroup.producer.bn
            event.units.append(
                UnitRemoval(
                    block=bgroup.block,
                    block_name=block.name,
                    layer=ugroup.layer,
                    indices=tuple(idx),
                    unit_ids=tuple(gate.unit_ids[removed].tolist()),
                    thetas=tuple(theta[removed].tolist()),
                    theta_B=theta_B,
                    fan_in_norms=tuple(ugroup.fan_in_norms()[removed].tolist()),
                    fan_out_norms=tuple(ugroup.fan_out_norms()[removed].tolist()),
                    bn_affine=None
                    if bn is None or bn.weight is None
                    else tuple(zip(bn.weight.detach()[removed].tolist(), bn.bias.detach()[removed].tolist())),
                )
            )
            for dep in ugroup.deps:
                entry = slices.setdefault((id(dep.module), dep.name), (dep.module, dep.name, {}))
                entry[2][dep.dim] = keep
    _apply_slices(slices, optimizers)
    for bgroup in dead_blocks:
        dropped = [p for layer in bgroup.module.layers() for p in layer.parameters()]
        if bgroup.gate is not None:
            dropped.append(bgroup.gate.theta)
        for p in dropped:
            _replace_in_optimizers(optimizers, p, None, {})
        bgroup.module.remove_path()
    event.spec_after = model.spec()
    return event


__all__ = [
    "BlockGroup",
    "BlockRemoval",
    "Dep",
    "PruneEvent",
    "UnitGroup",
    "UnitRemoval",
    "dependency_groups",
    "dropped_constant",
    "prune",
]
