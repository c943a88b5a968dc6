"""Gate overhead: one training step of the gated network (combined mode, straight-through) vs the plain one.

Both variants run the body of one iteration of :meth:`pruning.train.Trainer.train_epoch` on the same
architecture and the same mini-batch: forward, ``J`` (:class:`pruning.objective.Objective`, with the
complexity term ``C(Θ)/N`` in combined mode), the ``E[F]`` bookkeeping of
:class:`pruning.objective.CostMeter`, backward, the SGD step on ``W`` and (gated only) the Adam step
on ``Θ`` followed by the projection Π_H.  The plain variant is ``mode="none"`` (no gates, no
complexity term).  Target: gated/plain step time ``<= 1.10`` on CPU.

Two more gated variants locate the overhead:

* ``gated-core`` — the same step without the cost bookkeeping (no ``C(Θ)`` in ``J``, no ``E[F]``);
* ``gated-fixed`` — the step with the fixes proposed for files this benchmark does not own, as a
  prototype: (a) ``C(Θ)`` and ``E[F]`` from one *compiled* evaluation of the complexity model's
  terms (about ten tensor operations instead of a Python loop over every term, without the
  per-call ``validate_gates`` that reads every ``θ`` back to the host), (b) the gates folded into
  the weights during training — ``ξ_1`` scales the *input channels of the consumer's weight*,
  ``ξ_B`` the affine pair of the path's last BatchNorm — which is exactly the same function and
  the same gradients (checked here) but costs ``O(|W|)`` instead of ``O(batch · activations)``
  per gate, (c) ``foreach`` Adam on ``Θ`` and a two-operation projection.

``--profile`` adds a :mod:`torch.profiler` table of the operators whose self time grows most from
plain to gated.  Run ``python benchmarks/bench_gate_overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402

from pruning.config import RunConfig  # noqa: E402
from pruning.gates import Gate  # noqa: E402
from pruning.models import GatedNetwork, ResidualBlock, build_model  # noqa: E402
from pruning.objective import CostMeter, Objective  # noqa: E402
from pruning.train import lr_at, make_optimizers  # noqa: E402
from theory.complexity import Coefficients, compile_terms  # noqa: E402
from theory.projection import project  # noqa: E402
from theory.spec import NetworkSpec  # noqa: E402

TARGET = 1.10
ARCHS: dict[str, dict[str, Any]] = {
    "resnet20": {"arch": "resnet20", "kwargs": {}, "shape": (3, 32, 32)},  # CIFAR size
    "resnet1d": {"arch": "resnet1d", "kwargs": {"length": 40, "in_channels": 1}, "shape": (1, 40)},  # MNIST-1D
}
PHASES = ("forward", "objective", "bookkeeping", "backward", "opt_weights", "opt_theta", "rest")


# --------------------------------------------------------------------------------------------------
# Prototype fix (a): C(Θ) and E[F] from one compiled evaluation of the complexity model's terms
# --------------------------------------------------------------------------------------------------


class CompiledCost:
    """``C(Θ)`` [11] and ``E[F]`` [9] of one structure as a handful of tensor operations.

    The terms of :func:`theory.complexity.compile_terms` are ``coef · [θ_B] · Π_g (|θ_g|₁ + o_g)``
    with at most two width factors.  Compiled once per structure: the gate vectors are
    concatenated, ``|θ_g|₁`` is one ``index_add``, every term's factors are gathered from one
    vector ``[|θ_g|₁…, θ_B…, 1, fixed widths…]`` and multiplied, and ``C`` and ``E[F]`` are two dot
    products of the same term values.  Same formula as :class:`theory.complexity.ComplexityModel`
    (checked against it by :func:`check_compiled_cost`); no ``validate_gates`` in the hot path (the
    projection Π_H keeps ``θ`` in ``[0, 1]``).  A proposal for ``theory/complexity.py``.
    """

    def __init__(self, spec: NetworkSpec, model: GatedNetwork, coeffs: Coefficients | None, *, elementwise: bool):
        gates = model.block_gates()
        vec_index: dict[tuple[str, int, int], int] = {}
        self._vec_refs: list[tuple[int, str, int]] = []  # (block, kind, j) to fetch live tensors
        for l, g in enumerate(gates):
            for j, t in enumerate(g.theta_1 or ()):
                if t is not None:
                    vec_index[("unit", l, j)] = len(self._vec_refs)
                    self._vec_refs.append((l, "unit", j))
            if g.theta_2 is not None:
                vec_index[("out", l, 0)] = len(self._vec_refs)
                self._vec_refs.append((l, "out", 0))
        self._blocks = [l for l, g in enumerate(gates) if g.theta_B is not None]
        block_index = {l: k for k, l in enumerate(self._blocks)}
        n_vec, n_blk = len(self._vec_refs), len(self._blocks)
        consts: list[float] = [1.0]  # index 0 of the constants: the neutral factor
        const_index: dict[float, int] = {1.0: 0}

        def const(v: float) -> int:
            if v not in const_index:
                const_index[v] = len(consts)
                consts.append(v)
            return n_vec + n_blk + const_index[v]

        rows: list[tuple[list[int], list[float], float, float]] = []
        for which, terms in (("C", compile_terms(spec, elementwise=elementwise)),
                             ("F", compile_terms(spec, elementwise=False))):
            for t in terms:
                if which == "C":
                    w_c = 0.0 if coeffs is None else coeffs.alpha_f * t.coef_f + coeffs.alpha_p * t.coef_p
                    w_f = 0.0
                else:
                    w_c, w_f = 0.0, t.coef_f
                if not (w_c or w_f):
                    continue
                idx = [n_vec + block_index[t.block] if t.block in block_index else const(1.0)]
                off = [0.0]
                for g, o in t.factors:
                    key = (g.kind, g.block, g.index if g.kind == "unit" else 0)
                    idx.append(vec_index[key] if key in vec_index else const(float(g.width)))
                    off.append(float(o))
                rows.append((idx, off, w_c, w_f))
        width = max(len(r[0]) for r in rows)
        self.idx = torch.tensor([r[0] + [const(1.0)] * (width - len(r[0])) for r in rows], dtype=torch.long)
        self.off = torch.tensor([r[1] + [0.0] * (width - len(r[1])) for r in rows], dtype=torch.float32)
        self.w_c = torch.tensor([r[2] for r in rows], dtype=torch.float32)
        self.w_f = torch.tensor([r[3] for r in rows], dtype=torch.float64)
        self.consts = torch.tensor(consts, dtype=torch.float32)
        beta = 0.0 if coeffs is None else coeffs.beta
        gated_alive = [l for l, b in enumerate(spec.blocks) if b.gated and b.alive]
        # β Σ θ_B over gated alive blocks (an ungated-but-gated-in-spec block contributes the constant β)
        self.beta_blocks = torch.tensor([l in gated_alive for l in self._blocks], dtype=torch.float32) * beta
        self.beta_const = beta * sum(1 for l in gated_alive if l not in block_index)
        lengths = []
        for l, kind, j in self._vec_refs:
            g = gates[l]
            t = g.theta_1[j] if kind == "unit" else g.theta_2  # type: ignore[index]
            lengths.append(int(t.shape[-1]))
        self.seg = torch.repeat_interleave(torch.arange(n_vec), torch.tensor(lengths, dtype=torch.long))
        self.n_vec = n_vec
        self._moved: torch.device | None = None

    def _to(self, device: torch.device) -> None:
        if self._moved != device:
            for name in ("idx", "off", "w_c", "w_f", "consts", "beta_blocks", "seg"):
                setattr(self, name, getattr(self, name).to(device))
            self._moved = device

    def __call__(self, model: GatedNetwork) -> tuple[Tensor, Tensor]:
        """``(C(Θ), E[F])``: ``C`` differentiable (float32), ``E[F]`` detached (float64)."""
        gates = model.block_gates()
        vecs = []
        for l, kind, j in self._vec_refs:
            g = gates[l]
            vecs.append(g.theta_1[j] if kind == "unit" else g.theta_2)  # type: ignore[index]
        ref = vecs[0] if vecs else gates[self._blocks[0]].theta_B
        self._to(ref.device)
        sums = torch.zeros(self.n_vec, device=ref.device, dtype=ref.dtype).index_add(0, self.seg, torch.cat(vecs))
        thb = torch.stack([gates[l].theta_B for l in self._blocks]) if self._blocks else sums.new_zeros(0)
        ext = torch.cat([sums, thb, self.consts])
        vals = (ext[self.idx] + self.off).prod(1)
        c = vals @ self.w_c + (thb * self.beta_blocks).sum() + self.beta_const
        with torch.no_grad():
            ef = vals.detach().double() @ self.w_f
        return c, ef


def check_compiled_cost(model: GatedNetwork, objective: Objective, meter: CostMeter) -> float:
    """Largest relative difference of ``C`` and ``E[F]`` between :class:`CompiledCost` and the loop, at random θ."""
    spec = model.spec()
    cc = CompiledCost(spec, model, objective.coeffs, elementwise=objective.elementwise)
    saved = [p.detach().clone() for p in model.gate_parameters()]
    worst = 0.0
    try:
        for _ in range(3):
            with torch.no_grad():
                for p in model.gate_parameters():
                    p.uniform_(0.0, 1.0)
            c_ref = float(objective.complexity(model, spec).detach())
            f_ref = float(meter.expected(model, spec)[0])
            c, f = (float(v.detach()) for v in cc(model))
            worst = max(worst, abs(c - c_ref) / abs(c_ref), abs(f - f_ref) / abs(f_ref))
    finally:
        with torch.no_grad():
            for p, s in zip(model.gate_parameters(), saved):
                p.copy_(s)
    return worst


# --------------------------------------------------------------------------------------------------
# Prototype fix (b): the gates folded into the weights during training
# --------------------------------------------------------------------------------------------------


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``bn(x)`` with a given affine pair (same running-statistics update as ``nn.BatchNorm*.forward``)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or bn.running_mean is None
    return F.batch_norm(
        x, bn.running_mean if not bn.training or bn.track_running_stats else None,
        bn.running_var if not bn.training or bn.track_running_stats else None,
        weight, bias, use_batch, factor, bn.eps,
    )


def _folded_branch(self: ResidualBlock, x: Tensor) -> Tensor:
    """``ξ_B · path(x)`` with ``ξ_1`` folded into the next weight's input channels and ``ξ_B`` into the
    last BatchNorm's affine pair (or the last weight and bias without BatchNorm)."""
    layers = self.layers()
    scale_in: Tensor | None = None
    for j, layer in enumerate(layers):
        op = layer.op
        w, b = op.weight, op.bias
        if scale_in is not None:
            w = w * scale_in.to(w.dtype).reshape((1, -1) + (1,) * (w.dim() - 2))
        last = j == len(layers) - 1
        m_B = self.block_gate.multiplier() if (last and self.block_gate is not None) else None
        if m_B is not None and layer.bn is None:
            w = w * m_B.to(w.dtype)
            b = None if b is None else b * m_B.to(b.dtype)
        x = F.linear(x, w, b) if isinstance(op, nn.Linear) else op._conv_forward(x, w, b)  # type: ignore[union-attr]
        if layer.bn is not None:
            bw, bb = layer.bn.weight, layer.bn.bias
            if m_B is not None:
                m = m_B.to(x.dtype)
                bw = m.expand(x.shape[1]) if bw is None else bw * m
                bb = None if bb is None else bb * m
            x = _batch_norm(layer.bn, x, bw, bb)
        if layer.act is not None:
            x = layer.act(x)
        scale_in = layer.gate.multiplier() if layer.gate is not None else None
    return x


class _BernoulliST(torch.autograd.Function):
    """``ξ ~ Bernoulli(θ)`` forward, identity backward: the straight-through multiplier as one autograd node
    (instead of ``θ + (ξ − θ).detach()``, three operations and a node, after a separate draw)."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor) -> Tensor:  # noqa: ARG004 - autograd.Function signature
        return torch.bernoulli(theta.clamp(0.0, 1.0))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: ARG004
        return grad


def _fast_multiplier(self: Gate) -> Tensor:
    """:meth:`pruning.gates.Gate.multiplier` with the straight-through sample drawn by :class:`_BernoulliST`
    (or taken from the network-wide draw of :func:`_presample`)."""
    if self._fixed is not None:
        return self._fixed
    if not self.training:
        return self.theta
    pre = self.__dict__.pop("_presampled", None)
    if pre is not None:
        self.last_sample = pre.detach()
        return pre
    if self.estimator != "straight-through":
        xi = self.draw()
        self.last_sample = xi
        return xi
    xi = _BernoulliST.apply(self.theta)
    self.last_sample = xi.detach()
    return xi


def _presample(gates: list[Gate]) -> Callable[[nn.Module, Any], None]:
    """A forward pre-hook drawing every straight-through gate of the network with one ``bernoulli`` call."""

    def hook(model: nn.Module, args: Any) -> None:  # noqa: ARG001
        if not model.training:
            return
        live = [g for g in gates if g._fixed is None and g.estimator == "straight-through"]
        if not live:
            return
        thetas = [g.theta.reshape(-1) for g in live]
        xi = _BernoulliST.apply(torch.cat(thetas))
        for g, sample in zip(live, xi.split([t.numel() for t in thetas])):
            g._presampled = sample.view(g.theta.shape)

    return hook


def fold_gates(model: GatedNetwork) -> GatedNetwork:
    """Patch ``model`` in place: every alive block runs :func:`_folded_branch`, every gate
    :func:`_fast_multiplier`, and one pre-hook draws all gate samples at once (:func:`_presample`;
    the gate list is fixed here, a real implementation refreshes it after each pruning step)."""
    for block in model.block_list():
        if block.alive:
            block.branch = types.MethodType(_folded_branch, block)  # type: ignore[method-assign]
    gates = model.gates()
    for gate in gates:
        gate.multiplier = types.MethodType(_fast_multiplier, gate)  # type: ignore[method-assign]
    model.register_forward_pre_hook(_presample(gates))
    return model


def check_folded(arch: dict[str, Any], device: torch.device, batch: int = 4) -> float:
    """Largest relative difference of output and every gradient (``W``, ``θ``) between the prototype and the
    original forward pass on the same gate sample (the original replays the prototype's samples)."""
    torch.manual_seed(1)
    ref = build_model(arch["arch"], mode="combined", num_classes=10, theta_init=0.7, **arch["kwargs"]).to(device)
    fol = fold_gates(copy.deepcopy(ref))
    x = torch.randn(batch, *arch["shape"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    results = []
    for model in (fol, ref):
        model.train()
        if model is ref:  # replay the samples the prototype drew
            for g_ref, g_fol in zip(ref.gates(), fol.gates()):
                sample = g_fol.last_sample
                g_ref.draw = lambda s=sample: s.clone()  # type: ignore[method-assign]
        out = model(x)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), [p.grad.detach().clone() for p in model.parameters()]))
    (o1, g1), (o2, g2) = results
    worst = float((o1 - o2).abs().max() / o1.abs().max().clamp_min(1e-12))
    for a, b in zip(g1, g2):
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    return worst


# --------------------------------------------------------------------------------------------------
# One trainer step
# --------------------------------------------------------------------------------------------------


class Step:
    """The body of one iteration of ``Trainer.train_epoch`` on a fixed mini-batch.

    ``bookkeeping=False`` drops ``C(Θ)`` from ``J`` and the ``E[F]`` meter; ``fixed=True`` uses the
    prototype fixes (compiled cost, folded gates, foreach Adam, two-operation projection).
    """

    def __init__(self, arch: dict[str, Any], mode: str, batch: int, device: torch.device, *, N: int,
                 bookkeeping: bool = True, fixed: bool = False, seed: int = 0) -> None:
        cfg = RunConfig()
        torch.manual_seed(seed)
        self.model = build_model(arch["arch"], mode=mode, num_classes=10, **arch["kwargs"]).to(device)
        if fixed:
            fold_gates(self.model)
        self.spec = self.model.spec()
        o = cfg.objective
        self.objective = Objective(self.spec, N=N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_,
                                   mode=mode if bookkeeping else "none", elementwise=o.elementwise)
        self.meter = CostMeter(self.spec)
        self.opt_w, self.opt_t = make_optimizers(cfg, self.model.weight_parameters(), self.model.gate_parameters())
        if fixed and self.opt_t is not None:
            self.opt_t = _fast_adam(self.model.gate_parameters(), cfg.optim.theta.lr, cfg.optim.theta.betas)
        full = Objective(self.spec, N=N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_, mode=mode,
                         elementwise=o.elementwise)
        self.compiled = CompiledCost(self.spec, self.model, full.coeffs, elementwise=o.elementwise) if fixed else None
        self.cfg, self.bookkeeping, self.fixed, self.device = cfg, bookkeeping, fixed, device
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, *arch["shape"], generator=g).to(device)
        self.y = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.N = N
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.cum = torch.zeros(1, dtype=torch.float64, device=device)
        self.global_step = 0
        self.model.train()

    def __call__(self, marks: list[tuple[str, float, float]] | None = None) -> None:
        dev = self.device

        def mark(name: str) -> None:
            if marks is not None:
                T.sync(dev)
                marks.append((name, time.perf_counter(), time.thread_time()))

        model, x, y = self.model, self.x, self.y
        mark("start")
        lr = lr_at(self.cfg, self.global_step, 100)
        for g in self.opt_w.param_groups:
            g["lr"] = lr
        out = model(x)
        mark("forward")
        if self.compiled is not None:
            c, ef = self.compiled(model)
            data, comp = F.cross_entropy(out.float(), y), c / self.N
            terms_total = data + comp
            if self.objective.weight_decay:
                terms_total = terms_total + self.objective.weight_term(model.weight_parameters())
        else:
            terms = self.objective(model, out, y, spec=self.spec)
            terms_total, data, comp = terms.total, terms.data, terms.complexity
        mark("objective")
        if not bool(torch.isfinite(terms_total.detach())):
            raise RuntimeError("non-finite objective")
        self.opt_w.zero_grad(set_to_none=True)
        if self.opt_t is not None:
            self.opt_t.zero_grad(set_to_none=True)
        if self.compiled is None:
            ef = self.meter.expected_flops(model, self.spec) if self.bookkeeping else torch.zeros((), device=dev)
        mark("bookkeeping")
        terms_total.backward()
        mark("backward")
        self.opt_w.step()
        mark("opt_weights")
        if self.opt_t is not None:
            self.opt_t.step()
            with torch.no_grad():
                if self.fixed:
                    params = self.model.gate_parameters()
                    torch._foreach_clamp_min_(params, 0.0)
                    torch._foreach_clamp_max_(params, 1.0)
                else:
                    for q in model.gate_parameters():
                        q.copy_(project(q))
        mark("opt_theta")
        b = int(y.shape[0])
        self.cum += ef * b
        with torch.no_grad():
            self.sums += torch.stack([
                data.detach().double() * b, terms_total.detach().double() * b,
                comp.detach().double() * b, (out.argmax(1) == y).sum().double(),
            ])
        self.global_step += 1
        mark("rest")


def _fast_adam(params: list[nn.Parameter], lr: float, betas: list[float]) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one call for all θ tensors), else ``foreach``."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=(betas[0], betas[1]), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=(betas[0], betas[1]), foreach=True)


def phase_times(step: Step, n: int) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU seconds of each phase over ``n`` instrumented steps."""
    wall: dict[str, list[float]] = {p: [] for p in PHASES}
    cpu: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(n):
        marks: list[tuple[str, float, float]] = []
        step(marks)
        for (_, w0, c0), (name, w1, c1) in zip(marks[:-1], marks[1:]):
            wall[name].append(w1 - w0)
            cpu[name].append(c1 - c0)
    return {"wall": {p: T.median(v) for p, v in wall.items()}, "cpu": {p: T.median(v) for p, v in cpu.items()}}


def profile_diff(steps: dict[str, Step], n: int, top: int) -> list[dict[str, Any]]:
    """Operators whose self CPU time per step grows most from ``plain`` to ``gated`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    per: dict[str, dict[str, tuple[float, float]]] = {}
    for name in ("plain", "gated"):
        with profile(activities=acts) as prof:
            for _ in range(n):
                steps[name]()
        per[name] = {e.key: (e.self_cpu_time_total / n, e.count / n) for e in prof.key_averages()}
    rows = []
    for key in set(per["plain"]) | set(per["gated"]):
        a, b = per["plain"].get(key, (0.0, 0.0)), per["gated"].get(key, (0.0, 0.0))
        rows.append({"op": key, "extra_self_us": b[0] - a[0], "plain_us": a[0], "gated_us": b[0],
                     "plain_calls": a[1], "gated_calls": b[1]})
    rows.sort(key=lambda r: -r["extra_self_us"])
    return rows[:top]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def run_arch(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    arch = ARCHS[name]
    builders: dict[str, Callable[[], Step]] = {
        "plain": lambda: Step(arch, "none", batch, device, N=args.N, seed=args.seed),
        "gated": lambda: Step(arch, "combined", batch, device, N=args.N, seed=args.seed),
        "gated-core": lambda: Step(arch, "combined", batch, device, N=args.N, bookkeeping=False, seed=args.seed),
        "gated-fixed": lambda: Step(arch, "combined", batch, device, N=args.N, fixed=True, seed=args.seed),
    }
    if args.no_diagnostics:
        builders = {k: v for k, v in builders.items() if k in ("plain", "gated")}
    steps = {k: b() for k, b in builders.items()}
    t = T.interleaved(steps, repeats=args.repeats, warmup=args.warmup, inner=args.inner, device=device)
    rec: dict[str, Any] = {
        "arch": name, "batch": batch, "repeats": args.repeats, "inner": args.inner,
        "median_step_wall_s": {k: T.median(v) for k, v in t.wall.items()},
        "median_step_cpu_s": {k: T.median(v) for k, v in t.cpu.items()},
        "cpu_clock": t.cpu_clock,
        "ratios_wall": {k: T.ratio_stats(t.wall[k], t.wall["plain"]) for k in steps if k != "plain"},
        "ratios_cpu": {k: T.ratio_stats(t.cpu[k], t.cpu["plain"]) for k in steps if k != "plain"},
    }
    rec["ratio"] = rec["ratios_wall"]["gated"]["paired_median"]
    if not args.no_diagnostics:
        rec["phases_s"] = {k: phase_times(steps[k], max(3, args.repeats // 2)) for k in ("plain", "gated")}
        g = steps["gated"]
        rec["checks"] = {
            "compiled_cost_max_rel_diff": check_compiled_cost(g.model, g.objective, g.meter),
            "folded_gates_max_rel_diff": check_folded(arch, device),
        }
    if args.profile:
        rec["profile_top_extra_ops"] = profile_diff(steps, n=max(2, args.repeats // 3), top=args.profile_top)
    return rec


def _ratio_text(r: dict[str, float]) -> str:
    return f"{r['paired_median']:.3f} (IQR {r['paired_q1']:.3f}-{r['paired_q3']:.3f})"


def report(rec: dict[str, Any], device: torch.device) -> None:
    cpu_ok = device.type == "cpu"
    print(f"\n== {rec['arch']}, batch {rec['batch']} ({rec['repeats']} rounds x {rec['inner']} steps) ==")
    print("  median step (wall): " + ", ".join(f"{k} {T.fmt_ms(v)}" for k, v in rec["median_step_wall_s"].items()))
    if cpu_ok:
        print(f"  median step (cpu, {rec['cpu_clock']}): "
              + ", ".join(f"{k} {T.fmt_ms(v)}" for k, v in rec["median_step_cpu_s"].items()))
    v = rec["ratio"]
    print(f"  gate overhead ratio (gated/plain step time): {v:.3f}  [target <= {TARGET:.2f}: "
          f"{T.verdict(v, TARGET, '<=')}]  (paired IQR {rec['ratios_wall']['gated']['paired_q1']:.3f}-"
          f"{rec['ratios_wall']['gated']['paired_q3']:.3f})")
    if cpu_ok:
        c = rec["ratios_cpu"]["gated"]["paired_median"]
        print(f"  gate overhead ratio, CPU time (robust to load):  {c:.3f}  [target <= {TARGET:.2f}: "
              f"{T.verdict(c, TARGET, '<=')}]")
    what = {"gated-core": "without C(θ)/E[F] bookkeeping", "gated-fixed": "with the prototype fixes"}
    for k, label in what.items():
        if k in rec["ratios_wall"]:
            line = f"  {k + ' / plain':<20} wall {_ratio_text(rec['ratios_wall'][k])}"
            if cpu_ok:
                line += f", cpu {_ratio_text(rec['ratios_cpu'][k])}"
            print(f"{line}  [{label}]")
    if "phases_s" in rec:
        clock = "cpu" if cpu_ok else "wall"
        p, g = rec["phases_s"]["plain"][clock], rec["phases_s"]["gated"][clock]
        print(f"  {'phase (' + clock + ')':<14}{'plain':>11}{'gated':>11}{'extra':>11}")
        for ph in PHASES:
            print(f"  {ph:<14}{p[ph] * 1e3:>9.2f}ms{g[ph] * 1e3:>9.2f}ms{(g[ph] - p[ph]) * 1e3:>+9.2f}ms")
        c = rec["checks"]
        print(f"  checks: compiled cost vs ComplexityModel max rel diff {c['compiled_cost_max_rel_diff']:.1e}; "
              f"folded gates vs gated forward/grads max rel diff {c['folded_gates_max_rel_diff']:.1e}")
    if "profile_top_extra_ops" in rec:
        print("  torch.profiler: ops with the largest extra self CPU time per step (gated - plain)")
        for row in rec["profile_top_extra_ops"]:
            print(f"    {row['op'][:48]:<48} {row['extra_self_us']:>9.0f} us  calls {row['plain_calls']:>5.0f} -> "
                  f"{row['gated_calls']:>5.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["resnet20", "resnet1d"], choices=sorted(ARCHS))
    p.add_argument("--batch-cifar", type=int, default=32, help="mini-batch of resnet20 at 32x32 (default 32)")
    p.add_argument("--batch-1d", type=int, default=128, help="mini-batch of resnet1d at length 40 (default 128)")
    p.add_argument("--inner", type=int, default=2, help="steps per variant per round (default 2)")
    p.add_argument("--N", type=int, default=4000, help="training-set size N of J = L/N (default 4000, MNIST-1D)")
    p.add_argument("--no-diagnostics", action="store_true", help="time plain and gated only (no breakdown)")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of the extra operators")
    p.add_argument("--profile-top", type=int, default=15)
    T.add_common_args(p, threads=1, repeats=9, warmup=2)
    args = p.parse_args(argv)
    device = T.setup(args)
    env = T.environment(device)
    results = []
    for name in args.arch:
        batch = args.batch_cifar if name == "resnet20" else args.batch_1d
        results.append(run_arch(name, batch, args, device))
    env_end = T.environment(device)
    record = {"benchmark": "gate_overhead", "target": f"gated/plain <= {TARGET}", "env": env,
              "loadavg_end": env_end["loadavg"], "results": results}
    if args.json:
        T.dump_json(record)
        return 0
    print(f"gate overhead: {T.env_line(env)}")
    for rec in results:
        report(rec, device)
    worst = max(r["ratio"] for r in results)
    print(f"\nworst gate overhead ratio: {worst:.3f}  [target <= {TARGET:.2f}: {T.verdict(worst, TARGET, '<=')}]"
          f"  (load average at end {' '.join(f'{v:.2f}' for v in env_end['loadavg'])}; shared machine: noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
