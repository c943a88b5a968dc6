"""Cost of the non-finite guard (:mod:`pruning.guard`): one training step with and without it, ratios in one run.

Variants, each a full :func:`pruning.step.algorithm1_step` (forward, ``J``, backward, SGD on ``W``,
Adam + Π_H on ``Θ``) on a fixed mini-batch, interleaved (see ``_timing.py``):

* ``j-only`` — the check before this change: ``J`` finite, one host read per step;
* ``trainer`` — what the trainer does: :class:`pruning.guard.FiniteGuard` (``every = 0``) with
  :meth:`~pruning.guard.FiniteGuard.settle` every 10th step (``train.prune_every``'s default; the
  trainer settles before each ε-rule): ``J`` per step, the whole state every 10 steps;
* ``every-step`` — ``FiniteGuard(every=1)``: the state's flag (one fused ``max |x|`` over all
  parameters and floating buffers) after every update, read with the next ``J`` (no extra host read);
* ``grads-eager`` — checking the gradients before every update instead: a ``max |x|`` over every
  gradient and a second host read per step (it would still miss an update that overflows);
* ``old-draw`` — ``j-only`` with the gate draw as it was (``θ`` clamped, no NaN → 0 mapping), to
  show what making the draw safe costs.

Because the differences are a few per cent of a step, the script also times the one added operation on
its own, interleaved with ``j-only`` steps: ``state check`` = ``bool(finite_flag(state_tensors(model)))``,
reported as a fraction of a step (``every-step`` pays it on every step, ``trainer`` once per 10).

Printed: step-time ratios against ``j-only`` (paired median and quartiles, wall and CPU time), for a
tiny residual MLP (the worst case: the least compute per parameter), ResNet-1D on MNIST-1D shapes
(the embedded default) and ResNet-20 at 32×32.  ``python benchmarks/bench_guard.py --help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import _timing as T  # noqa: E402

import pruning.gates as gates_mod  # noqa: E402
from pruning.config import RunConfig  # noqa: E402
from pruning.guard import FiniteGuard, finite_flag, state_tensors  # noqa: E402
from pruning.models import build_model  # noqa: E402
from pruning.objective import Objective  # noqa: E402
from pruning.optim import make_optimizers  # noqa: E402
from pruning.step import algorithm1_step  # noqa: E402

ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {"arch": "residual_mlp", "kwargs": {"in_features": 64, "hidden": [12, 12, 12]}, "shape": (64,),
            "batch": 16},
    "resnet1d": {"arch": "resnet1d", "kwargs": {"length": 40, "in_channels": 1}, "shape": (1, 40), "batch": 128},
    "resnet20": {"arch": "resnet20", "kwargs": {}, "shape": (3, 32, 32), "batch": 32},
}
VARIANTS = ("j-only", "trainer", "every-step", "grads-eager", "old-draw")
TARGET = 1.02  # the trainer's guard may cost at most 2 % of a step
SETTLE_EVERY = 10


def _old_probability(theta: torch.Tensor) -> torch.Tensor:
    return theta.detach().clamp(0.0, 1.0)


class Step:
    """One ``algorithm1_step`` on a fixed mini-batch with the check of ``variant``."""

    def __init__(self, arch: dict[str, Any], variant: str, device: torch.device, seed: int = 0) -> None:
        cfg = RunConfig()
        torch.manual_seed(seed)
        self.model = build_model(arch["arch"], mode="combined", num_classes=10, **arch["kwargs"]).to(device)
        spec = self.model.spec()
        o = cfg.objective
        self.objective = Objective(spec, N=4000, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_,
                                   mode="combined", elementwise=o.elementwise)
        self.spec = spec
        self.opt_w, self.opt_t = make_optimizers(cfg, self.model.weight_parameters(), self.model.gate_parameters())
        for g in self.opt_w.param_groups:
            g["lr"] = 1e-3
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(arch["batch"], *arch["shape"], generator=g).to(device)
        self.y = torch.randint(0, 10, (arch["batch"],), generator=g).to(device)
        self.variant = variant
        self.guard = FiniteGuard(every=1 if variant == "every-step" else 0)
        self.k = 0
        self.model.train()

    def _grads_eager(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not bool(finite_flag(grads)):
            raise FloatingPointError("non-finite gradient")

    def __call__(self) -> None:
        v, model = self.variant, self.model
        saved = gates_mod._probability
        if v == "old-draw":
            gates_mod._probability = _old_probability
        try:
            algorithm1_step(
                model, self.objective, self.x, self.y, self.opt_w, self.opt_t, spec=self.spec,
                guard=self.guard if v in ("trainer", "every-step") else None,
                before_update=self._grads_eager if v == "grads-eager" else None,
            )
        finally:
            gates_mod._probability = saved
        self.k += 1
        if v == "trainer" and self.k % SETTLE_EVERY == 0:
            self.guard.settle()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    T.add_common_args(parser, threads=1, repeats=15, warmup=3)
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="architectures (default: all)")
    parser.add_argument("--inner", type=int, default=10, help="steps per variant per round (default 10)")
    args = parser.parse_args(argv)
    device = T.setup(args)
    env = T.environment(device)
    record: dict[str, Any] = {"environment": env, "target": TARGET, "archs": {}}
    if not args.json:
        print(f"non-finite guard: step time vs j-only ({T.env_line(env)})")
    for name in args.arch or list(ARCHS):
        arch = ARCHS[name]
        steps = {v: Step(arch, v, device, seed=args.seed) for v in VARIANTS}
        t = T.interleaved(steps, repeats=args.repeats, warmup=args.warmup, inner=args.inner, device=device)
        base_wall, base_cpu = t.wall["j-only"], t.cpu["j-only"]
        rows = {}
        for v in VARIANTS[1:]:
            rows[v] = {"wall": T.ratio_stats(t.wall[v], base_wall), "cpu": T.ratio_stats(t.cpu[v], base_cpu)}
        model = steps["j-only"].model
        parts = T.interleaved({"step": steps["j-only"], "check": lambda m=model: bool(finite_flag(state_tensors(m)))},
                              repeats=args.repeats, warmup=args.warmup, inner=args.inner, device=device)
        check = {"wall": T.ratio_stats(parts.wall["check"], parts.wall["step"]),
                 "cpu": T.ratio_stats(parts.cpu["check"], parts.cpu["step"]),
                 "ms": T.median(parts.wall["check"]) * 1e3}
        per_step = check["cpu"]["paired_median"] / SETTLE_EVERY
        rec = {"step_ms_j_only": T.median(base_wall) * 1e3, "ratios": rows, "state_check": check,
               "trainer_added_fraction": per_step, "verdict": T.verdict(1.0 + per_step, TARGET, "<=")}
        record["archs"][name] = rec
        if not args.json:
            print(f"\n{name} (batch {arch['batch']}): j-only step {T.fmt_ms(T.median(base_wall))}")
            for v, r in rows.items():
                w, c = r["wall"], r["cpu"]
                print(f"  {v:<12} wall {w['paired_median']:.3f} [{w['paired_q1']:.3f}, {w['paired_q3']:.3f}]   "
                      f"cpu {c['paired_median']:.3f} [{c['paired_q1']:.3f}, {c['paired_q3']:.3f}]")
            c = check["cpu"]
            print(f"  state check  {check['ms']:.2f} ms = {c['paired_median']:.4f} [{c['paired_q1']:.4f}, "
                  f"{c['paired_q3']:.4f}] of a step (CPU time)")
            print(f"  trainer: 1 + check/{SETTLE_EVERY} = {1.0 + per_step:.4f} of a j-only step "
                  f"[target <= {TARGET}: {rec['verdict']}]")
    if args.json:
        T.dump_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
