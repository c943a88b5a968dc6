"""Pruning audit: was each structure the ε-rule removed inside a certified region of Theorem 5.1 / 5.2?

THEORY §6 certifies, for one block, the regions ``D_B = {½||W||² + a θ_B < ρ}`` and
``D_i = {½(||w_i||² + ||v_i||²) + a θ_i < ρ}`` with ``ρ < a c/((2+a)k)`` (``c = c_B`` resp. ``c_1``,
``k`` the Lemma-1 constant [28]) from which the structure provably converges to "pruned"; the
union over ``a > 0`` is :func:`theory.certificates.union_margin` (closed form: certified iff
``||u||/√2 + √(2θ) < √(c/k)``).  The ε-rule of Algorithm 1 (``θ < ε``) is the practical rule; this
module measures, during a real training run, how the two relate.

What is recorded, for every structure the ε-rule selects (the records of :class:`PruningAudit`):

* ``theta`` (``θ_i`` or ``θ_B``) and the block's ``theta_B``;
* **weight norms** — ``W`` means *every trainable parameter of the structure*, i.e. what SGD moves
  and weight decay shrinks, so that [24] (``ẇ = −θ_Bθ_i h_i − λ w_i``) holds for exactly these
  coordinates.  For a conv+BN layer: unit ``i``'s fan-in ``w_i`` = row ``i`` of the producing conv
  (+ its bias entry, if any) **and** the producer's BatchNorm affine pair ``(γ_i, β_i)``; fan-out
  ``v_i`` = column ``i`` of the consuming conv (its BN acts per *output* channel and is not part of
  unit ``i``).  A block's ``W`` is every parameter of its nonlinear path (all convs, biases and BN
  affine pairs, including the last BN whose ``β`` is the branch's bias).  ``q = ½||u||²`` is the
  weight part of the Lyapunov function (``½(||w_i||² + ||v_i||²)``, resp. ``½||W||²``).  With BN the
  conv weights are scale-invariant, so Lemma 1 holds for these coordinates only with a constant
  that involves ``1/√ε_BN`` (see the caveats);
* ``c`` — the effective regularisation **at that moment** from the complexity model
  (:meth:`theory.complexity.ComplexityModel.grad`): ``c_B := γ_B``, ``c_1 := γ_1`` (the theorems need
  lower bounds along the future trajectory; ``γ`` moves as ``Θ`` moves, see the caveats);
* ``k`` — an online estimate of the Lemma-1 constant of the structure's block (below);
* ``margin``/``a_star``/``certified`` — membership in the union over ``a > 0`` of the regions
  (no radius cap: the empirical ``k`` is measured at the current weights, Lemma 1's ball is not
  modelled).  A block that the rule selects because a whole inner layer fell below ``ε`` is also
  certified when every unit of that layer is (Theorem 5.2: "if every unit of a block converges, the
  whole block can go"); both flags are kept.

**Units.**  Everything is measured in the units of ``J = L/N`` (mean loss; ``c = γ/N``, gradients of
``J``); the certificate depends on ``c/k`` only, so the choice of units cancels.

**The Lemma-1 constant ``k``, estimated online** from what each training step already has (after
the backward pass, before the optimiser step).  Per alive block and iteration, the four empirical
ratios of [28]:

* ``|ĝ_i| / (||w_i|| ||v_i||)`` with ``ĝ_i = ∂J/∂θ_i − θ_B γ_1/N`` (the gate gradient minus the exact
  complexity part); straight-through: only on iterations whose sample has ``ξ_B = 1`` (then the
  straight-through gradient is the first-order estimate of ``g_i``; with ``ξ_B = 0`` it is 0);
  exact-difference: the estimate is ``θ_B g_i``, divided by ``θ_B``;
* ``||ĥ_i|| / ||v_i||`` and ``||k̂_i|| / ||w_i||`` with ``ĥ_i``, ``k̂_i`` the data gradients of the fan-in and
  fan-out coordinates (``∂J/∂w − (λ/N) w``) on iterations whose sample has ``ξ_B = ξ_i = 1`` (then the
  back-propagated gradient is the sample of ``h_i``, ``k_i``; otherwise it is 0);
* ``|ĝ_B| / (½||W||²)`` with ``ĝ_B = ∂J/∂θ_B − γ_B/N`` (the second form of [28], the one Theorem 5.1
  uses; the first form ``Σ_i ||w_i|| ||v_i||`` does not cover the last BN pair).

The maximum over the block's units of each ratio is kept for the last ``window`` iterations
(``train.audit_window``, default 100), observed every ``every`` iterations (``train.audit_every``,
default 4: a few per cent of an iteration's time on a CPU when done every iteration; 0 switches the
estimate off and leaves ``certified`` empty); the block's ``k̂`` is the maximum of the four over that
window (the running max), and ``k_global`` the maximum over blocks.  **Caveat:** Lemma 1's ``k`` is
a supremum over the whole ball of weights and over the data; the running max over the states
actually visited (and over mini-batches, not the full-data gradients the theorem bounds) is a
*lower bound* of it, so the certificate computed with ``k̂`` is **optimistic** (regions too large).
Mini-batch noise inflates the ratios (pushing the other way), but does not make the estimate an
upper bound.

**Audit mode** (``train.audit = true``, ``python -m pruning train ... --audit``): the structures the
ε-rule selects are *flagged, not removed*: they stay in the network, their gates are still sampled
from ``θ`` and everything keeps following the same projected-SGD dynamics (the counterfactual of not
pruning).  The ε-rule is evaluated on the *virtual* network in which flagged structures are gone:
a flagged block is never flagged again and its units are not flagged separately (as in
:func:`pruning.compaction.prune`, which removes a block's units with it); a block whose remaining
(unflagged) units of an inner layer are all below ``ε`` is flagged (reason ``"units"``).  After
every optimiser step the rule's score of each flagged structure is tracked (block:
``min(θ_B, min_j max_i θ_1,j,i)``, the rule selects the block iff it is ``< ε``; unit:
``min(θ_i, its block's score)``, as a unit of a block the rule selects goes with it).  At the end:
``recovered`` = score ``≥ ε`` at the end of the run, ``recovered_ever`` = the maximum score after the
flag ``≥ ε``; the premature-pruning rate of the ε-rule is ``recovered / flagged`` (units and blocks
separately), cross-tabulated with ``certified`` at flag time.  A certified structure that recovers
contradicts the theorem up to the estimate of ``k`` (and of ``c``, and the ODE-vs-SGD gap):
``certified_recovered`` counts them.  In normal mode the records of the removed structures are
written as well (outcome fields empty).

Outputs: ``audit.json`` (summary + records) and ``audit.csv`` (one row per structure) in the run
directory, written atomically (:mod:`theory.atomic`), and the ``"audit"`` section of the report.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from theory.atomic import atomic_write, atomic_write_text
from theory.certificates import admissible, rho_max, union_margin
from theory.complexity import BlockGates
from theory.spec import NetworkSpec

from .compaction import BlockGroup, UnitGroup, dependency_groups

AUDIT_JSON = "audit.json"
AUDIT_CSV = "audit.csv"
#: The four empirical Lemma-1 ratios kept per block and iteration (see the module doc).
K_COMPONENTS = ("g_i", "h_i", "k_i", "g_B")
_TINY = 1e-12

WEIGHT_CONVENTION = (
    "W = every trainable parameter of the structure: unit i: fan-in w_i = producing conv/linear row i (+ bias entry) "
    "and the producer's BN affine pair (gamma_i, beta_i); fan-out v_i = column i of the consuming conv/linear; block: "
    "all parameters of the nonlinear path (convs, biases, BN affine pairs)"
)
CAVEATS = (
    "k is the running max over the last `window` iterations of empirical Lemma-1 ratios at the visited states: a "
    "lower bound of the sup-based Lemma-1 constant, so the certificate is optimistic (regions too large)",
    "c_B, c_1 are the current gamma_B, gamma_1 at flag time, not lower bounds along the future trajectory "
    "(gamma_B falls as units are pruned; its floor is beta + the element-wise costs)",
    "with BatchNorm the conv weights are scale-invariant: Lemma 1 holds for these coordinates only with a constant "
    "involving 1/sqrt(eps_BN), which the visited states never probe",
    "the theorems are statements about the projected ODE [22]/[24] (gradient flow, mean gradients); training uses "
    "momentum SGD, Adam on theta, mini-batches and one gate sample per step",
    "straight-through gate gradients are first-order estimates of the exact differences g_i, g_B",
    "no radius cap (2 rho <= R^2): the ball of Lemma 1 is not modelled",
)


# --------------------------------------------------------------------------------------------------
# Certificates (the union over a > 0 of Theorems 5.1 / 5.2, from theory.certificates)
# --------------------------------------------------------------------------------------------------


def certify(theta: float, q: float, c: float, k: float) -> dict[str, Any]:
    """Membership of ``(θ, q = ½||u||²)`` in ``∪_{a>0} D(a, ρ)``, ``ρ < a c/((2+a)k)`` (Theorems 5.1/5.2).

    Uses :func:`theory.certificates.union_margin` (no radius cap).  Returns ``margin`` (``> 0`` iff
    certified), the maximising ``a_star``, ``q_max = margin + q`` (the largest certified ``q`` at this
    ``θ``; ``≤ 0``: none, whatever the weights), ``theta_max = c/(2k)`` (no ``a > 0`` certifies a state
    with ``θ ≥ c/(2k)``, even with zero weights) and, when certified, a witness ``(a, rho)`` checked with
    :func:`theory.certificates.admissible` and ``V = q + aθ < ρ``.  ``certified`` is ``None`` when
    ``k`` or ``c`` is not a finite positive number (nothing can be said).
    """
    out: dict[str, Any] = {"margin": None, "a_star": None, "q_max": None, "theta_max": None, "certified": None,
                           "witness_a": None, "witness_rho": None}
    if not (math.isfinite(k) and k > 0 and math.isfinite(c) and math.isfinite(q) and math.isfinite(theta)):
        return out
    if c <= 0:
        out["certified"] = False
        return out
    m, a = (float(v) for v in union_margin(theta, q, c, k, None))
    out.update(margin=m, a_star=a if math.isfinite(a) else math.inf, q_max=m + q, theta_max=c / (2.0 * k),
               certified=bool(m > 0))
    if m > 0:
        if not math.isfinite(a):  # θ = 0: any a with ρ_max(a) > q works
            a = 4.0 * q * k / max(c - q * k, _TINY) + 1.0
        V = q + a * theta
        rho = 0.5 * (V + float(rho_max(a, c, k)))
        if admissible(a, rho, c, k) and V < rho:
            out.update(witness_a=a, witness_rho=rho)
    return out


# --------------------------------------------------------------------------------------------------
# Norms of the structures' coordinates (see WEIGHT_CONVENTION)
# --------------------------------------------------------------------------------------------------


def _rows_sq(t: Tensor, dim: int) -> Tensor:
    """``Σ`` of squares of ``t`` over every axis except ``dim`` (one value per index along ``dim``)."""
    t = t.detach().float()
    if t.dim() == 1:
        return t * t
    return (t.movedim(dim, 0).flatten(1) ** 2).sum(1)


def _fan_in_tensors(ug: UnitGroup) -> list[Tensor]:
    op, bn = ug.producer.op, ug.producer.bn
    out = [op.weight] + ([op.bias] if op.bias is not None else [])
    if bn is not None:
        out += [p for p in (bn.weight, bn.bias) if p is not None]
    return out


def unit_norms_sq(ug: UnitGroup) -> tuple[Tensor, Tensor, Tensor]:
    """``(||w_i||², ||v_i||², ||(γ_i, β_i)||²)`` per unit of a group (BN pair 0 without BN)."""
    fan_in = _fan_in_tensors(ug)
    w_sq = sum(_rows_sq(p, 0) for p in fan_in)
    v_sq = _rows_sq(ug.consumer.op.weight, 1)
    bn = ug.producer.bn
    bn_sq = (sum(_rows_sq(p, 0) for p in (bn.weight, bn.bias) if p is not None) if bn is not None
             else torch.zeros_like(v_sq))
    return w_sq, v_sq, bn_sq  # type: ignore[return-value]


def _layer_params(layer: Any) -> list[Tensor]:
    """The trainable tensors of one path layer: op weight and bias, BN affine pair (not the gate's θ)."""
    out = [layer.op.weight] + ([layer.op.bias] if layer.op.bias is not None else [])
    if layer.bn is not None:
        out += [p for p in (layer.bn.weight, layer.bn.bias) if p is not None]
    return out


def _path_params(bg: BlockGroup) -> list[Tensor]:
    return [p for layer in bg.module.layers() for p in _layer_params(layer)]


def block_norms_sq(bg: BlockGroup) -> tuple[float, list[float]]:
    """``||W||²`` of the whole path and ``||W_j||²`` per path layer (weights, biases, BN affine pairs)."""
    per = [sum(float((p.detach().double() ** 2).sum()) for p in _layer_params(layer)) for layer in bg.module.layers()]
    return sum(per), per


# --------------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------------


def _unit_key(l: int, j: int, uid: int) -> str:
    return f"unit:{l}.{j}.{uid}"


def _block_key(l: int) -> str:
    return f"block:{l}"


class _ObserveLayout:
    """Flat index tensors of :meth:`PruningAudit.observe` for one plan (one structure).

    ``fan_in`` lists every unit group's fan-in tensors (producer weight rows, bias, BN pair),
    ``fan_out`` every consumer weight; ``fan_in_unit``/``fan_out_unit`` give, for each element of
    their flattened concatenation (logical row-major order, whatever the memory format), the global
    index of the unit it belongs to (a row of a fan-in tensor, a column of a consumer weight).
    ``unit_block`` maps units, ``param_block`` path parameters, to the position of their block.
    """

    def __init__(self, plan: list[tuple[BlockGroup, list[Tensor], list[Any]]]) -> None:
        self.blocks = [bg for bg, _, _ in plan]
        self.block_gates = [bg.gate for bg in self.blocks]
        self.params = [p for _, params, _ in plan for p in params]
        self.units = [u for _, _, units in plan for u in units]
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.device = dev
        self.fan_in = [p for _, fan_in, _ in self.units for p in fan_in]
        self.fan_out = [Q for _, _, Q in self.units]
        in_idx, out_idx, unit_block, sizes = [], [], [], []
        offset = 0
        for b, (_, _, units) in enumerate(plan):
            for ug, fan_in, Q in units:
                n = int(ug.gate.theta.shape[0])
                rows = torch.arange(offset, offset + n, dtype=torch.long)
                for p in fan_in:
                    in_idx.append(rows.repeat_interleave(p.numel() // n))
                per = Q.numel() // (Q.shape[0] * n)  # elements of one (output, input channel) kernel
                out_idx.append(rows.repeat_interleave(per).repeat(Q.shape[0]))
                unit_block.append(torch.full((n,), b, dtype=torch.long))
                sizes.append(n)
                offset += n
        self.n_units = offset
        def cat(xs: list[Tensor]) -> Tensor:
            return torch.cat(xs).to(dev) if xs else torch.zeros(0, dtype=torch.long, device=dev)

        self.fan_in_unit, self.fan_out_unit, self.unit_block = cat(in_idx), cat(out_idx), cat(unit_block)
        self.unit_group = cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
        # per block, the positions of its units in a per-unit vector extended by one -inf entry (padding)
        per_block: list[list[int]] = [[] for _ in plan]
        for u, b in enumerate(self.unit_block.tolist()):
            per_block[b].append(u)
        width = max((len(x) for x in per_block), default=0)
        self.block_units = torch.tensor([x + [offset] * (width - len(x)) for x in per_block], dtype=torch.long,
                                        device=dev).reshape(-1)
        self.block_width = width
        # every path parameter, flattened and concatenated: its elements' block
        self.param_elem_block = cat([torch.full((p.numel(),), b, dtype=torch.long)
                                     for b, (_, params, _) in enumerate(plan) for p in params])


class PruningAudit:
    """Online Lemma-1 estimate, per-structure records at flag/removal time, counterfactual tracking.

    ``objective`` is the run's :class:`pruning.objective.Objective` (coefficients, ``N``, ``λ/N``,
    complexity model); ``counterfactual=True`` is audit mode (flag, do not remove).  The trainer
    calls :meth:`observe` after each backward pass, :meth:`track` after each optimiser step (audit
    mode), :meth:`flag` at each ε-rule check (and, in normal mode, :meth:`confirm` with the
    :class:`pruning.compaction.PruneEvent`), :meth:`summary` at the end.
    """

    def __init__(self, objective: Any, *, eps: float, estimator: str, window: int = 100, every: int = 1,
                 counterfactual: bool = False) -> None:
        if window < 1 or every < 0:
            raise ValueError(f"window must be >= 1 and every >= 0, got {window}, {every}")
        self.objective = objective
        self.eps = float(eps)
        self.estimator = estimator
        self.window = int(window)  # iterations
        self.every = int(every)  # iterations between observations (the trainer's stride; 0 = none)
        self._maxlen = max(1, math.ceil(self.window / max(self.every, 1)))  # observations kept
        self.counterfactual = bool(counterfactual)
        self.records: list[dict[str, Any]] = []
        self._ratios: dict[int, deque[list[float]]] = {}
        self._index: dict[str, int] = {}
        # audit mode: positions never change (nothing is removed)
        self._unit_flags: dict[tuple[int, int], Tensor] = {}
        self._unit_max: dict[tuple[int, int], Tensor] = {}
        self._block_max: dict[int, Tensor] = {}
        self.observations = 0
        self._plan_key: tuple[Any, Any] | None = None
        self._plan_cache: list[tuple[BlockGroup, list[Tensor], list[Any]]] = []
        self._layout_key: tuple[Any, Any] | None = None
        self._layout_cache: _ObserveLayout

    # -- complexity gradients -----------------------------------------------------------------
    def gammas(self, model: Any, spec: NetworkSpec) -> tuple[list[float | None], list[list[float]]]:
        """``(γ_B/N per block, γ_1/N per block and inner layer)`` at the current ``θ`` (J units)."""
        coeffs = self.objective.current_coeffs()
        n_blocks = len(spec.blocks)
        if coeffs is None:
            return [None] * n_blocks, [[0.0] * b.M for b in spec.blocks]
        gates = [_numpy_gates(g) for g in model.block_gates()]
        grads = self.objective.complexity_model(spec).grad(gates, coeffs, check=False)
        N = float(self.objective.N)
        gB = [None if g.theta_B is None else float(g.theta_B) / N for g in grads]
        g1 = [[float(v) / N for v in g.gamma_1] for g in grads]
        return gB, g1

    # -- the online Lemma-1 estimate ----------------------------------------------------------
    def _plan(self, model: Any, spec: NetworkSpec) -> list[tuple[BlockGroup, list[Tensor], list[Any]]]:
        """Per alive block: its group, path parameters and ``(unit group, fan-in tensors, fan-out weight)``.

        Cached while the structure (``spec``, replaced by the trainer after every removal) is the same.
        """
        if self._plan_key is not None and self._plan_key[0] is model and self._plan_key[1] is spec:
            return self._plan_cache
        plan = []
        for bg in dependency_groups(model):
            units = [(ug, _fan_in_tensors(ug), ug.consumer.op.weight) for ug in bg.units if ug.gate is not None]
            plan.append((bg, _path_params(bg), units))
        self._plan_key, self._plan_cache = (model, spec), plan
        return plan

    def _layout(self, model: Any, spec: NetworkSpec) -> _ObserveLayout:
        """The flat index layout of :meth:`observe` for the current plan (built once per structure)."""
        plan = self._plan(model, spec)
        if self._layout_key is not None and self._layout_key[0] is model and self._layout_key[1] is spec:
            return self._layout_cache
        self._layout_key, self._layout_cache = (model, spec), _ObserveLayout(plan)
        return self._layout_cache

    @torch.no_grad()
    def observe(self, model: Any, spec: NetworkSpec) -> None:
        """Record the four Lemma-1 ratios of every alive block from the gradients of this iteration.

        Called after the backward pass and before the optimiser step; no host sync but one ``tolist``.
        Every unit of every block at once (:class:`_ObserveLayout`: the fan-in rows ``w_i`` and fan-out
        columns ``v_i`` of all unit groups as one flat vector each, reduced per unit with ``index_add_``
        and per block with ``scatter_reduce_``): a few dozen tensor operations whatever the depth.
        """
        if self.objective.coeffs is None:
            return
        lay = self._layout(model, spec)
        if not lay.blocks:
            return
        gB, g1 = self.gammas(model, spec)
        wd = float(self.objective.weight_decay)
        exact = self.estimator == "exact-difference"
        dev, nb = lay.device, len(lay.blocks)
        ninf = torch.full((nb,), -math.inf, device=dev)
        one = torch.ones((), device=dev)
        theta_B = torch.stack([one if g is None else g.theta.detach().reshape(()) for g in lay.block_gates])
        xi_B = torch.stack([one if g is None else (g.theta.new_ones(()) if g.last_sample is None
                                                     else g.last_sample.reshape(()))
                            for g in lay.block_gates])
        # ratio g_B (Lemma 1 [28], block part): |∂J/∂θ_B − γ_B/N| / (½||W||²), blocks with a gate gradient
        r3 = ninf
        ok_B = [g is not None and g.theta.grad is not None and gB[bg.block] is not None
                for g, bg in zip(lay.block_gates, lay.blocks)]
        if any(ok_B) and lay.params:
            flat = torch.cat([p.reshape(-1) for p in lay.params]).float()
            W_sq = torch.zeros(nb, device=dev).index_add_(0, lay.param_elem_block, flat.square())
            grad_B = torch.stack([g.theta.grad.reshape(()).float() if ok else one.float()
                                  for g, ok in zip(lay.block_gates, ok_B)])
            gam_B = torch.tensor([float(gB[bg.block]) if ok else 0.0 for bg, ok in zip(lay.blocks, ok_B)],
                                 device=dev)
            valid = torch.tensor(ok_B, device=dev) & (W_sq > _TINY)
            r3 = torch.where(valid, (grad_B - gam_B).abs() / (0.5 * W_sq), ninf)
        ra = rb = rc = ninf
        if lay.units:
            groups = lay.units
            unit_ok = [ug.gate.theta.grad is not None and all(p.grad is not None for p in fan_in) and Q.grad is not None
                       for ug, fan_in, Q in groups]
            if any(unit_ok):
                P = torch.cat([p.reshape(-1) for p in lay.fan_in]).float()
                G = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                               for p in lay.fan_in]).float().sub_(P, alpha=wd)  # the data part of the gradient
                Q = torch.cat([q.reshape(-1) for q in lay.fan_out]).float()
                K = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1)
                               for q in lay.fan_out]).float().sub_(Q, alpha=wd)
                nu = lay.n_units
                sq = torch.zeros(4, nu, device=dev)
                sq[0].index_add_(0, lay.fan_in_unit, P.square())
                sq[1].index_add_(0, lay.fan_out_unit, Q.square())
                sq[2].index_add_(0, lay.fan_in_unit, G.square())
                sq[3].index_add_(0, lay.fan_out_unit, K.square())
                w, v, h, k = sq.sqrt().unbind(0)
                tgrad = torch.cat([(ug.gate.theta.grad if ok else torch.zeros_like(ug.gate.theta)).reshape(-1)
                                   for (ug, _, _), ok in zip(groups, unit_ok)]).float()
                g1_units = torch.tensor([g1[ug.block][ug.layer] for ug, _, _ in groups], device=dev)[lay.unit_group]
                tB = theta_B[lay.unit_block]
                gi = tgrad - tB * g1_units
                live = torch.tensor(unit_ok, device=dev)[lay.unit_group]
                if exact:  # the estimate is θ_B g_i
                    ok_g = tB > 0
                    gi = gi / tB
                else:  # straight-through: g_i on samples with ξ_B = 1 (0 otherwise)
                    ok_g = xi_B[lay.unit_block] > 0.5
                xi = torch.cat([(ug.gate.last_sample if ug.gate.last_sample is not None
                                 else torch.ones_like(ug.gate.theta)).reshape(-1) for ug, _, _ in groups]).float()
                on = live & ((xi * xi_B[lay.unit_block]) > 0.5)
                wv = w * v
                per_unit = torch.stack([
                    torch.where(live & ok_g & (wv > _TINY), gi.abs() / wv, -math.inf),
                    torch.where(on & (v > _TINY), h / v, -math.inf),
                    torch.where(on & (w > _TINY), k / w, -math.inf),
                ])
                padded = torch.cat([per_unit, per_unit.new_full((3, 1), -math.inf)], 1)
                ra, rb, rc = padded[:, lay.block_units].reshape(3, nb, lay.block_width).amax(2).unbind(0)
        values = torch.stack([ra, rb, rc, r3], 1).cpu().tolist()
        for bg, vals in zip(lay.blocks, values):
            row = [x if x > -math.inf else math.nan for x in vals]  # -inf: nothing observed this time
            self._ratios.setdefault(bg.block, deque(maxlen=self._maxlen)).append(row)
        self.observations += 1

    def k_estimate(self, block: int) -> dict[str, Any]:
        """The block's running-max ``k̂`` and its four components over the window (NaN when unseen)."""
        rows = self._ratios.get(block)
        comps = {name: math.nan for name in K_COMPONENTS}
        if rows:
            arr = np.asarray(list(rows), dtype=np.float64)
            for i, name in enumerate(K_COMPONENTS):
                col = arr[:, i][np.isfinite(arr[:, i])]
                comps[name] = float(col.max()) if col.size else math.nan
        finite = [v for v in comps.values() if math.isfinite(v)]
        return {"k": max(finite) if finite else math.nan, "components": comps,
                "window_observations": len(rows) if rows else 0}

    def k_global(self) -> float:
        ks = [self.k_estimate(l)["k"] for l in self._ratios]
        ks = [k for k in ks if math.isfinite(k)]
        return max(ks) if ks else math.nan

    # -- the ε-rule: flag (and record) ----------------------------------------------------------
    def _unit_mask(self, l: int, j: int, n: int, device: torch.device) -> Tensor:
        return self._unit_flags.get((l, j), torch.zeros(n, dtype=torch.bool, device=device))

    @torch.no_grad()
    def selection(
        self, model: Any
    ) -> tuple[list[tuple[BlockGroup, str]], list[tuple[BlockGroup, UnitGroup, list[int]]]]:
        """What the ε-rule selects now: ``[(block group, reason)]`` and ``[(block group, unit group, positions)]``.

        The same rule as :func:`pruning.compaction.prune`, evaluated on the virtual network in
        which already flagged structures are gone (audit mode; in normal mode they are really gone).
        """
        eps = self.eps
        blocks: list[tuple[BlockGroup, str]] = []
        units: list[tuple[BlockGroup, UnitGroup, list[int]]] = []
        for bg in dependency_groups(model):
            l = bg.block
            if l in self._block_max:
                continue
            theta_B = None if bg.gate is None else float(bg.gate.theta.detach())
            dead = False
            for ug in bg.units:
                if ug.gate is None:
                    continue
                th = ug.gate.theta.detach()
                alive = ~self._unit_mask(l, ug.layer, th.numel(), th.device)
                if not bool((th[alive] >= eps).any()):
                    dead = True
            if (theta_B is not None and theta_B < eps) or dead:
                blocks.append((bg, "theta_B" if (theta_B is not None and theta_B < eps) else "units"))
                continue
            for ug in bg.units:
                if ug.gate is None:
                    continue
                th = ug.gate.theta.detach()
                sel = (th < eps) & ~self._unit_mask(l, ug.layer, th.numel(), th.device)
                pos = sel.nonzero().flatten().tolist()
                if pos:
                    units.append((bg, ug, pos))
        return blocks, units

    @torch.no_grad()
    def flag(self, model: Any, spec: NetworkSpec, *, step: int, epoch: int) -> list[dict[str, Any]]:
        """Evaluate the ε-rule and build one record per selected structure (before any removal).

        Audit mode: the records are kept and the structures marked as flagged.  Normal mode: returns
        candidates; :meth:`confirm` keeps those the :class:`~pruning.compaction.PruneEvent` removed.
        """
        blocks, units = self.selection(model)
        if not blocks and not units:
            return []
        gB, g1 = self.gammas(model, spec)
        k_glob = self.k_global()
        recs: list[dict[str, Any]] = []
        for bg, reason in blocks:
            recs.append(self._block_record(bg, reason, gB, g1, k_glob, step, epoch))
        for bg, ug, pos in units:
            recs += self._unit_records(bg, ug, pos, gB, g1, k_glob, step, epoch)
        if self.counterfactual:
            for rec in recs:
                self._add(rec)
            self._mark(model, blocks, units)
        return recs

    def confirm(self, candidates: list[dict[str, Any]], event: Any) -> None:
        """Normal mode: keep the candidate records of the structures ``event`` removed (warn on a mismatch)."""
        removed = {_block_key(b.block) for b in event.blocks}
        removed |= {_unit_key(u.block, u.layer, uid) for u in event.units for uid in u.unit_ids}
        by_key = {r["key"]: r for r in candidates}
        for key in sorted(removed - set(by_key)):
            warnings.warn(f"pruning audit: {key} was removed but not selected by the audit's ε-rule", stacklevel=2)
        for key, rec in by_key.items():
            if key in removed:
                self._add(rec)
            else:
                warnings.warn(f"pruning audit: {key} was selected but not removed", stacklevel=2)

    def _add(self, rec: dict[str, Any]) -> None:
        self._index[rec["key"]] = len(self.records)
        self.records.append(rec)

    def _mark(self, model: Any, blocks: list[tuple[BlockGroup, str]],
              units: list[tuple[BlockGroup, UnitGroup, list[int]]]) -> None:
        for bg, _ in blocks:
            self._block_max[bg.block] = _block_score(bg.module).clone()
        for _, ug, pos in units:
            th = ug.gate.theta.detach()  # type: ignore[union-attr]
            key = (ug.block, ug.layer)
            mask = self._unit_mask(ug.block, ug.layer, th.numel(), th.device).clone()
            mx = self._unit_max.get(key, torch.full_like(th, -math.inf)).clone()
            idx = torch.as_tensor(pos, device=th.device)
            mask[idx] = True
            mx[idx] = th[idx]
            self._unit_flags[key], self._unit_max[key] = mask, mx

    def _base(self, kind: str, l: int, name: str, step: int, epoch: int) -> dict[str, Any]:
        return {"kind": kind, "block": l, "block_name": name, "step": step, "epoch": epoch,
                "mode": "audit" if self.counterfactual else "normal"}

    def _k_fields(self, l: int, k_glob: float) -> dict[str, Any]:
        est = self.k_estimate(l)
        return {"k": est["k"], **{f"k_{n}": v for n, v in est["components"].items()},
                "k_window_observations": est["window_observations"], "k_global": k_glob}

    def _unit_records(self, bg: BlockGroup, ug: UnitGroup, pos: list[int], gB: list[float | None],
                      g1: list[list[float]], k_glob: float, step: int, epoch: int) -> list[dict[str, Any]]:
        gate = ug.gate
        assert gate is not None
        l = ug.block
        theta_B = float(bg.gate.theta.detach()) if bg.gate is not None else None
        w_sq, v_sq, bn_sq = (t.double().cpu() for t in unit_norms_sq(ug))
        th = gate.theta.detach().double().cpu()
        uids = gate.unit_ids.cpu()
        c = g1[l][ug.layer]
        kf = self._k_fields(l, k_glob)
        out = []
        for i in pos:
            q = 0.5 * float(w_sq[i] + v_sq[i])
            rec = self._base("unit", l, bg.module.name, step, epoch)
            rec.update(key=_unit_key(l, ug.layer, int(uids[i])), layer=ug.layer, unit_id=int(uids[i]), reason="theta",
                       theta=float(th[i]), theta_B=theta_B, fan_in_norm=math.sqrt(float(w_sq[i])),
                       fan_out_norm=math.sqrt(float(v_sq[i])), bn_affine_norm=math.sqrt(float(bn_sq[i])), q=q,
                       c=c, gamma_B=gB[l], **kf)
            cert = certify(float(th[i]), q, c, kf["k"])
            rec.update(cert)
            rec["certified_global_k"] = certify(float(th[i]), q, c, k_glob)["certified"]
            rec["certified_via_units"] = None
            out.append(rec)
        return out

    def _block_record(self, bg: BlockGroup, reason: str, gB: list[float | None], g1: list[list[float]],
                      k_glob: float, step: int, epoch: int) -> dict[str, Any]:
        l = bg.block
        theta_B = float(bg.gate.theta.detach()) if bg.gate is not None else None
        W_sq, per = block_norms_sq(bg)
        kf = self._k_fields(l, k_glob)
        rec = self._base("block", l, bg.module.name, step, epoch)
        rec.update(key=_block_key(l), layer=None, unit_id=None, reason=reason, theta=theta_B, theta_B=theta_B,
                   fan_in_norm=math.sqrt(per[0]), fan_out_norm=math.sqrt(per[-1]), bn_affine_norm=None, q=0.5 * W_sq,
                   c=gB[l], gamma_B=gB[l], **kf)
        c_B = gB[l]
        if theta_B is not None and c_B is not None:
            rec.update(certify(theta_B, 0.5 * W_sq, c_B, kf["k"]))
            rec["certified_global_k"] = certify(theta_B, 0.5 * W_sq, c_B, k_glob)["certified"]
        else:
            rec.update(certify(math.nan, math.nan, math.nan, math.nan))
            rec["certified_global_k"] = None
        via = None
        if reason == "units":  # every unit of a dead inner layer certified by Theorem 5.2
            for ug in bg.units:
                if ug.gate is None:
                    continue
                th = ug.gate.theta.detach()
                alive = ~self._unit_mask(l, ug.layer, th.numel(), th.device)
                if bool((th[alive] >= self.eps).any()):
                    continue
                w_sq, v_sq, _ = unit_norms_sq(ug)
                c1 = g1[l][ug.layer]
                certs = [certify(float(th[i]), 0.5 * float(w_sq[i] + v_sq[i]), c1, kf["k"])["certified"]
                         for i in alive.nonzero().flatten().tolist()]
                ok = None if any(c is None for c in certs) else all(certs)
                via = ok if via is None else (via and ok if ok is not None else None)
        rec["certified_via_units"] = via
        if via:
            rec["certified"] = True
        return rec

    # -- audit mode: follow the flagged structures --------------------------------------------
    @torch.no_grad()
    def track(self, model: Any) -> None:
        """After an optimiser step: the maximum of the ε-rule score of every flagged structure.

        A unit's score is ``min(θ_i, block score)``: a unit whose block the rule selects is removed
        with it, so it has not recovered however large its own ``θ_i`` (with ``θ_B → 0`` it freezes).
        """
        if not self._unit_max and not self._block_max:
            return
        blocks = model.block_list()
        for (l, j), mask in self._unit_flags.items():
            gate = blocks[l].unit_gates()[j]
            score = torch.minimum(gate.theta.detach(), _block_score(blocks[l]))
            mx = self._unit_max[(l, j)]
            self._unit_max[(l, j)] = torch.where(mask, torch.maximum(mx, score), mx)
        for l, mx in self._block_max.items():
            self._block_max[l] = torch.maximum(mx, _block_score(blocks[l]))

    # -- the end ------------------------------------------------------------------------------
    @torch.no_grad()
    def outcomes(self, model: Any) -> None:
        """Audit mode: fill ``theta_end``, ``score_end``, ``score_max_after``, ``recovered``, ``recovered_ever``."""
        if not self.counterfactual:
            return
        blocks = model.block_list()
        for rec in self.records:
            l = rec["block"]
            end: float | None
            if rec["kind"] == "unit":
                j, uid = rec["layer"], rec["unit_id"]
                gate = blocks[l].unit_gates()[j]
                pos = int((gate.unit_ids == uid).nonzero().flatten()[0])
                end = float(gate.theta.detach()[pos])
                score_end, mx = min(end, float(_block_score(blocks[l]))), float(self._unit_max[(l, j)][pos])
            else:
                block = blocks[l]
                end = float(block.block_gate.theta.detach()) if block.block_gate is not None else None
                score_end, mx = float(_block_score(block)), float(self._block_max[l])
            rec.update(theta_end=end, score_end=score_end, score_max_after=mx,
                       recovered=score_end >= self.eps, recovered_ever=mx >= self.eps)

    def summary(self, model: Any | None = None) -> dict[str, Any]:
        """Counts, certified fractions, premature-pruning rates and the cross-table (JSON-ready)."""
        if model is not None:
            self.outcomes(model)
        out: dict[str, Any] = {
            "mode": "audit" if self.counterfactual else "normal",
            "eps": self.eps,
            "window": self.window,
            "every": self.every,
            "observations": self.observations,
            "weight_convention": WEIGHT_CONVENTION,
            "c_convention": "c_B = gamma_B, c_1 = gamma_1 at flag time (complexity model), divided by N (J units)",
            "k_estimate": "running max over the last `window` iterations (observed every `every` iterations) of the "
                          "empirical Lemma-1 ratios |g_i|/(|w_i||v_i|), |h_i|/|v_i|, |k_i|/|w_i|, |g_B|/(|W|^2/2), "
                          "per block (module doc)",
            "caveats": list(CAVEATS),
        }
        for kind in ("unit", "block"):
            out[f"{kind}s"] = _counts([r for r in self.records if r["kind"] == kind], self.counterfactual)
        ks = {str(l): self.k_estimate(l) for l in sorted(self._ratios)}
        out["k_final"] = {l: {"k": v["k"], **v["components"]} for l, v in ks.items()}
        out["k_global_final"] = self.k_global()
        return _finite(out)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "records": copy.deepcopy(self.records),
            "ratios": {str(l): [list(r) for r in rows] for l, rows in self._ratios.items()},
            "unit_flags": {f"{l}.{j}": m.cpu().tolist() for (l, j), m in self._unit_flags.items()},
            "unit_max": {f"{l}.{j}": m.cpu().tolist() for (l, j), m in self._unit_max.items()},
            "block_max": {str(l): float(m) for l, m in self._block_max.items()},
            "observations": self.observations,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.records = copy.deepcopy(list(state["records"]))
        self._index = {r["key"]: i for i, r in enumerate(self.records)}
        self._ratios = {int(l): deque((list(r) for r in rows), maxlen=self._maxlen)
                        for l, rows in state["ratios"].items()}
        split = [((int(key.split(".")[0]), int(key.split(".")[1])), key) for key in state["unit_flags"]]
        self._unit_flags = {lj: torch.tensor(state["unit_flags"][key], dtype=torch.bool, device=device)
                            for lj, key in split}
        self._unit_max = {lj: torch.tensor(state["unit_max"][key], dtype=torch.float32, device=device)
                          for lj, key in split}
        self._block_max = {int(l): torch.tensor(v, dtype=torch.float32, device=device)
                           for l, v in state["block_max"].items()}
        self.observations = int(state["observations"])

    # -- files --------------------------------------------------------------------------------
    def write(self, out_dir: str | Path, summary: dict[str, Any]) -> dict[str, str]:
        """``audit.json`` (summary + records) and ``audit.csv`` (records), atomically; returns their paths."""
        out = Path(out_dir)
        jp, cp = out / AUDIT_JSON, out / AUDIT_CSV
        records = _finite(self.records)
        atomic_write_text(jp, json.dumps(_finite({"summary": summary, "records": records}), indent=1,
                                         default=_json_default, allow_nan=False) + "\n")
        cols: list[str] = []
        for r in self.records:
            cols += [k for k in r if k not in cols]

        def write(fh: Any) -> None:
            w = csv.DictWriter(fh, fieldnames=cols or ["key"])
            w.writeheader()
            for r in records:
                w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})

        atomic_write(cp, write)
        return {"json": str(jp), "csv": str(cp)}


def end_of_run_prune(model: Any, eps: float, evaluate_fn: Callable[[Any], tuple[float, float]],
                     ratios_fn: Callable[[NetworkSpec], tuple[float, float]]) -> dict[str, Any]:
    """Audit mode: the ε-rule applied once at the end, on a copy (the trained network is left as is).

    ``evaluate_fn(model) -> (test_loss, test_acc)`` (mean field), ``ratios_fn(spec) -> (fPR, pPR)``.
    """
    from .compaction import prune

    pruned = copy.deepcopy(model)
    event = prune(pruned, eps, [])
    loss, acc = evaluate_fn(pruned)
    fpr, ppr = ratios_fn(pruned.spec())
    return {"test_loss": loss, "test_accuracy": acc, "fPR": fpr, "pPR": ppr, "units_removed": event.num_units,
            "blocks_removed": event.num_blocks, "blocks_alive": pruned.spec().blocks_alive}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _counts(recs: list[dict[str, Any]], counterfactual: bool) -> dict[str, Any]:
    n = len(recs)
    cert = [r for r in recs if r.get("certified") is True]
    unknown = sum(r.get("certified") is None for r in recs)
    out: dict[str, Any] = {
        "flagged": n,
        "certified": len(cert),
        "certified_unknown": unknown,
        "certified_fraction": len(cert) / n if n else None,
        "certified_global_k": sum(r.get("certified_global_k") is True for r in recs),
        # θ < c/(2k): certifiable at all (with small enough weights); and the medians behind the verdict
        "theta_certifiable": sum(r.get("theta_max") is not None and r.get("theta") is not None
                                 and r["theta"] < r["theta_max"] for r in recs),
        "median_theta": _median([r.get("theta") for r in recs]),
        "median_theta_max": _median([r.get("theta_max") for r in recs]),
        "median_q": _median([r.get("q") for r in recs]),
        "median_c_over_k": _median([r["c"] / r["k"] if r.get("c") is not None and r.get("k") else None
                                    for r in recs]),
    }
    if not counterfactual:
        return out

    def tab(rs: list[dict[str, Any]]) -> dict[str, Any]:
        m = len(rs)
        rec_end = sum(bool(r.get("recovered")) for r in rs)
        rec_ever = sum(bool(r.get("recovered_ever")) for r in rs)
        return {"flagged": m, "recovered": rec_end, "recovered_ever": rec_ever,
                "premature_rate": rec_end / m if m else None, "premature_rate_ever": rec_ever / m if m else None}

    out.update(tab(recs))
    out["by_certified"] = {"certified": tab(cert),
                           "not_certified": tab([r for r in recs if r.get("certified") is False]),
                           "unknown": tab([r for r in recs if r.get("certified") is None])}
    out["certified_recovered"] = out["by_certified"]["certified"]["recovered"]
    out["certified_recovered_ever"] = out["by_certified"]["certified"]["recovered_ever"]
    return out


def _median(values: list[Any]) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.median(v)) if v else None


def _numpy_gates(g: BlockGates) -> BlockGates:
    def np_(t: Any) -> Any:
        return None if t is None else t.detach().double().cpu().numpy()

    return BlockGates(np_(g.theta_B), None if g.theta_1 is None else tuple(np_(t) for t in g.theta_1),
                      np_(g.theta_2))


def _block_score(block: Any) -> Tensor:
    """``min(θ_B, min_j max_i θ_1,j,i)``: the ε-rule selects the block iff this is ``< ε``."""
    vals = []
    if block.block_gate is not None:
        vals.append(block.block_gate.theta.detach().float().reshape(()))
    for g in block.unit_gates():
        if g is not None:
            vals.append(g.theta.detach().float().max())
    return torch.stack(vals).min() if vals else torch.tensor(math.inf)


def _finite(x: Any) -> Any:
    """A copy with every non-finite float replaced by ``None`` (strict JSON; ``a_star = ∞`` at ``θ = 0``)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


__all__ = [
    "AUDIT_CSV",
    "AUDIT_JSON",
    "CAVEATS",
    "K_COMPONENTS",
    "WEIGHT_CONVENTION",
    "PruningAudit",
    "block_norms_sq",
    "certify",
    "end_of_run_prune",
    "unit_norms_sq",
]
