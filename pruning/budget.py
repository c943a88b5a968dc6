"""Your budget: γ adapted during training so that the network ends at a stated FLOPs (or parameter) reduction.

The user states ``objective.target_fpr = T`` (or ``target_ppr``; a *fraction* in (0, 1): 0.5 means
"remove 50 % of the FLOPs") instead of guessing the pruning level γ of [13].  Training then solves,
in the spirit of constrained L0 methods, the constrained problem

    min_{W, Θ}  J(W, Θ)    subject to    ratio(Θ) = T,
    ratio(Θ) = ½ (1 − E[F](s(Θ)) / F_tot) + ½ (1 − F(survivors) / F_tot)                        [9]
               (parameters: E[P], P, P_tot of [10] with ``target_ppr``)

with ``E[F]``, ``E[P]`` the expected FLOPs and parameters of [9], [10] (conv + linear MACs, parameters
incl. BatchNorm pairs: the reporting convention of THEORY §3, evaluated by the one complexity model
:mod:`theory.complexity` through :class:`pruning.objective.CostMeter`), ``F_tot``, ``P_tot`` the
baseline totals, ``F(survivors)`` the cost of the structures the ε-rule has kept so far (all gates 1:
the reported fPR of the network as it is now), and ``s`` the *sharpening* of every gate (next
paragraph).  The price of complexity
plays the role of the Lagrange multiplier: by [13] the coefficients ``(α_f, α_p, β)`` are linear in
γ, so

    C_γ(Θ) = (γ / γ_0) · C_{γ_0}(Θ)                                                            [11], [13]

and a controller only has to choose the scalar ``γ_k ≥ 0`` of iteration ``k``; the objective of every
step stays ``J = mean ℓ + γ_k/γ_0 · C_{γ_0}(Θ)/N + (λ/N)/2 ||W||²`` — the same multilinear function
of Θ (THEORY §3, Theorem 3.1), multiplied by a constant within the step.  Nothing else of Algorithm 1
changes (estimators, projection Π_H [15], ε-rule).

What is measured.  The reported ``fPR = 1 − F(final)/F_tot`` counts every structure that survived the
ε-rule at its full cost, however small its θ.  The plain expected cost ``E[F](Θ)`` counts a unit at
θ = 0.6 as 60 % alive, and at moderate γ many θ's hover in (ε, 1) for the whole run: controlling
``1 − E[F](Θ)/F_tot`` to 50 % on the default configuration left the reported fPR at 19 % after 27
of 30 epochs (γ already down to 0.005).  The
deterministic fPR of the survivors, on the other hand, only moves when the ε-rule fires — late, in
jumps of a whole block — so controlling it alone overshoots (with ``s`` below at θ_s = 0.2, nearly the
survivors' fPR, the targets 30/50/70 % ended at 37.7/62.8/81.8 %).  The controller therefore averages
the survivors' ratio with [9]/[10] evaluated at the sharpened gates

    s(θ) = clip((θ − ε) / (θ_s − ε), 0, 1)          0 at the ε-rule, 1 from θ_s = 0.5 on

— a structure at θ ≥ θ_s counts as kept, one on its way to ε counts partly (the measurement moves
smoothly as θ falls, before the ε-rule fires), one removed counts 0.  ``s`` is monotone, so [9]/[10]
at ``s(Θ)`` is the expected cost of the network whose gates are ``s(Θ)``: the complexity model is
used as it is.  (The sharpened ratio alone, θ_s = 0.5: 18.7/53.0/73.0 % for 30/50/70 %.)

The controller (a projected PI controller, i.e. dual ascent on γ with a proportional term), in units
of the *training progress* ``τ = k / K`` (``K`` iterations in the run, so that the same gains serve a
30-epoch and a 200-epoch run):

    r(τ)  = T · (1 − (1 − min(τ / τ_r, 1))³)                            reference: the target reached at τ_r
    e_k   = r(τ_k) − ratio(Θ_k)                                         > 0: not pruned enough yet
    I_k   = clip(I_{k−1} + k_I · e_k / K,  0, u_max)                    integral (dual ascent), anti-windup
    γ_k   = γ_0 · clip(I_k + k_P · e_k,  0, u_max)                      γ_k ≥ 0 always

* ``γ_0`` = ``objective.gamma``: the controller's scale (gains are multiples of it); ``I_0 = 0``, so the
  run starts at γ = 0 and the price rises only as far as the budget needs.
* The reference ramps up over the first ``τ_r`` of training (cubic, fast at first, gentle at the end,
  as in gradual magnitude pruning) instead of stepping to ``T``: structures removed by the ε-rule never
  come back, so the controller must approach the target from below rather than overshoot it.
* Data-parallel runs: ``ratio(Θ)`` is a function of θ, bit-identical on every process, so every
  process computes the same γ; nothing is communicated.
* The state (``I``, the last γ and measurement) is part of the checkpoint (:meth:`state_dict`),
  so a resumed run continues bit for bit.  The update uses 0-d float64 tensors on the run's
  device: no host synchronisation per step.

The constants (:class:`BudgetGains`) were tuned on the default configuration and are the same for
every target.  Final fPR for the targets 30/50/70 % (one run each, seed 0): plain expected ratio —
50 % only, 19 % after 27 epochs; sharpened ratio alone (θ_s = 0.5; k_P = 4, k_I = 20) 18.7/53.0/73.0;
the same at θ_s = 0.2: 37.7/62.8/81.8; the mean of both readings (k_P = 6, k_I = 10, the defaults)
32.4/50.1/74.2; with weight ¾ on the sharpened reading 34.1/49.7/66.3.  A
whole residual block leaves in one ε-step, and on the default network one block is 5–19 % of the
FLOPs, so the final fPR can land past the target by up to a block's share when a block at θ_B near ε
falls through late (70 % → 74.2 % on the default configuration).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from theory.complexity import BlockGates, ComplexityModel
from theory.spec import NetworkSpec

#: The measured quantity of each target field: ``objective.target_fpr`` → "fPR", ``target_ppr`` → "pPR".
KINDS = {"fpr": "fPR", "ppr": "pPR"}


@dataclass(frozen=True)
class BudgetGains:
    """Constants of the controller (see the module doc): ``τ_r``, ``k_P``, ``k_I``, ``u_max``, ``θ_s``, the mix."""

    ramp: float = 0.6  # τ_r: fraction of the training iterations over which the reference reaches T
    kp: float = 6.0  # proportional gain (multiples of γ_0 per unit of error)
    ki: float = 10.0  # integral gain (multiples of γ_0 per unit of error per unit of training progress)
    max_factor: float = 50.0  # u_max: γ never exceeds 50 γ_0 (an unreachable target cannot run away)
    sure: float = 0.5  # θ_s: a structure whose θ is at least this counts as kept in the measurement
    mix: float = 0.5  # weight of the sharpened measurement; 1 − mix: the deterministic ratio of the survivors

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"BudgetGains.{name} must be a finite number >= 0, got {v!r}")
        if not 0 < self.ramp <= 1:
            raise ValueError(f"BudgetGains.ramp must lie in (0, 1], got {self.ramp!r}")
        if not 0 < self.sure <= 1:
            raise ValueError(f"BudgetGains.sure must lie in (0, 1], got {self.sure!r}")


class BudgetController:
    """γ_k for a FLOPs (``kind="fpr"``) or parameter (``"ppr"``) reduction ``target`` in ``total_steps`` iterations.

    >>> ctl = BudgetController(0.5, "fpr", total_steps=100, gamma=0.05)
    >>> float(ctl.update(torch.tensor(0.0, dtype=torch.float64), step=0))  # θ = 1: nothing pruned yet
    0.0
    >>> g = ctl.update(torch.tensor(0.0, dtype=torch.float64), step=10)    # below the reference: γ rises
    >>> 0 < ctl.gamma < 0.05 * 50
    True
    """

    def __init__(self, target: float, kind: str, *, total_steps: int, gamma: float, eps: float = 0.1,
                 gains: BudgetGains | None = None, device: torch.device | str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target < 1):
            raise ValueError(f"target must be a fraction in (0, 1) (0.5 = 50 %), got {target!r}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma (the controller's scale) must be > 0, got {gamma!r}")
        self.target = float(target)
        self.kind = kind
        self.total_steps = int(total_steps)
        self.gamma0 = float(gamma)
        self.eps = float(eps)
        self.gains = gains if gains is not None else BudgetGains()
        if not 0 < self.eps < self.gains.sure:
            raise ValueError(f"eps must lie in (0, gains.sure = {self.gains.sure}), got {eps!r}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        z = torch.zeros((), dtype=torch.float64, device=dev)
        self.integral = z.clone()  # I_k (multiples of γ_0)
        self.factor = z.clone()  # u_k = γ_k / γ_0: the multiplier of C_{γ_0} in this step's objective
        self.measured = z.clone()  # ratio(Θ_k) of the last update
        self.last_step = 0  # the iteration of the last update (its reference is reference(last_step))

    # -- the law ---------------------------------------------------------------------------------
    def reference(self, step: int) -> float:
        """``r(τ) = T (1 − (1 − min(τ/τ_r, 1))³)`` at ``τ = step / total_steps``."""
        u = min(step / (self.gains.ramp * self.total_steps), 1.0)
        return self.target * (1.0 - (1.0 - u) ** 3)

    def update(self, measured: torch.Tensor, step: int) -> torch.Tensor:
        """One controller step from ``ratio(Θ_k)`` (``measured``, a 0-d tensor); returns ``u_k = γ_k/γ_0`` (0-d)."""
        g = self.gains
        e = self.reference(step) - measured.detach().to(self.integral)
        self.integral = (self.integral + (g.ki / self.total_steps) * e).clamp(0.0, g.max_factor)
        self.factor = (self.integral + g.kp * e).clamp(0.0, g.max_factor)
        self.measured = measured.detach().to(self.integral)
        self.last_step = int(step)
        return self.factor

    def control(self, meter: Any, model: Any, spec: NetworkSpec, step: int) -> torch.Tensor:
        """:meth:`measure` then :meth:`update`: ``u_k = γ_k/γ_0`` of iteration ``step`` (the trainer's one call)."""
        return self.update(self.measure(meter, model, spec), step)

    def measure(self, meter: Any, model: Any, spec: NetworkSpec) -> torch.Tensor:
        """``ratio(Θ)``: ``mix`` × sharpened expected ratio + (1 − ``mix``) × survivors' ratio (0-d float64).

        ``meter`` is the run's :class:`pruning.objective.CostMeter` (its compiled [9]/[10] and baseline totals).
        """
        what = "flops" if self.kind == "fpr" else "params"
        fn = meter.model_for.compiled(spec, None, what)
        value = fn(sharpen(model.block_gates(), self.eps, self.gains.sure), dtype=torch.float64)
        if not torch.is_tensor(value):  # no gate left: a constant
            value = torch.tensor(float(value), dtype=torch.float64, device=self.integral.device)
        total = meter.F_tot if self.kind == "fpr" else meter.P_tot
        det = meter.deterministic(spec)[0 if self.kind == "fpr" else 1]
        w = self.gains.mix
        return w * (1.0 - value.detach() / total) + (1.0 - w) * (1.0 - det / total)

    # -- reporting -------------------------------------------------------------------------------
    @property
    def gamma(self) -> float:
        """γ of the last update (a host read)."""
        return self.gamma0 * float(self.factor)

    def record(self) -> dict[str, float]:
        """The epoch log's columns: γ, the reference r and the measured expected ratio at the last update."""
        return {"gamma": self.gamma, "budget_reference": self.reference(self.last_step),
                f"budget_measured_{KINDS[self.kind]}": float(self.measured)}

    # -- checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (floats: float64 values round-trip exactly)."""
        return {"target": self.target, "kind": self.kind, "total_steps": self.total_steps, "gamma0": self.gamma0,
                "eps": self.eps,
                "gains": asdict(self.gains), "integral": float(self.integral), "factor": float(self.factor),
                "measured": float(self.measured), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the target, kind, length and scale must be this controller's."""
        for key in ("target", "kind", "total_steps", "gamma0", "eps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"budget controller state: {key} = {state[key]!r}, this run has "
                                 f"{getattr(self, key)!r}")
        self.gains = BudgetGains(**state["gains"])
        dev = self.integral.device
        self.integral = torch.tensor(float(state["integral"]), dtype=torch.float64, device=dev)
        self.factor = torch.tensor(float(state["factor"]), dtype=torch.float64, device=dev)
        self.measured = torch.tensor(float(state["measured"]), dtype=torch.float64, device=dev)
        self.last_step = int(state["last_step"])


def _sharp(t: Any, eps: float, sure: float) -> Any:
    return None if t is None else ((t.detach() - eps) / (sure - eps)).clamp(0.0, 1.0)


def sharpen(gates: list[BlockGates], eps: float, sure: float) -> list[BlockGates]:
    """``s(θ) = clip((θ − ε)/(θ_s − ε), 0, 1)`` on every gate (detached): 0 at the ε-rule, 1 from ``θ_s`` on."""
    return [BlockGates(_sharp(g.theta_B, eps, sure),
                       None if g.theta_1 is None else tuple(_sharp(t, eps, sure) for t in g.theta_1),
                       _sharp(g.theta_2, eps, sure)) for g in gates]


def target_of(objective_cfg: Any) -> tuple[str, float] | None:
    """``("fpr", T)``, ``("ppr", T)`` or ``None`` from an ``[objective]`` section."""
    for kind in KINDS:
        value = getattr(objective_cfg, f"target_{kind}", None)
        if value is not None:
            return kind, float(value)
    return None


def max_reduction(meter: Any, model: Any, kind: str) -> float:
    """The largest ``fPR`` (``pPR``) the gates of ``model`` can reach: every gate at 0 (stem and head stay).

    Evaluated by the complexity model on ``model.spec()`` (elementwise terms off, the reporting convention)
    relative to the baseline totals of ``meter`` (:class:`pruning.objective.CostMeter`).
    """
    cm = ComplexityModel(model.spec(), elementwise=False)
    zero = sharpen(model.block_gates(), 1.0, 2.0)  # every θ ≤ 1 maps to 0: the same gates, all at 0
    if kind == "fpr":
        return 1.0 - float(cm.flops(zero)) / meter.F_tot
    return 1.0 - float(cm.params(zero)) / meter.P_tot


def make_budget(cfg: Any, meter: Any, model: Any, *, total_steps: int, device: torch.device
                ) -> BudgetController | None:
    """The run's controller (``None`` without a target); a target the network cannot reach is a ConfigError.

    ``meter``: the run's :class:`pruning.objective.CostMeter`; ``total_steps``: the iterations of the run.
    """
    from .config import ConfigError

    found = target_of(cfg.objective)
    if found is None:
        return None
    kind, target = found
    reach = max_reduction(meter, model, kind)
    if target >= reach:
        raise ConfigError([f"objective.target_{kind}: {target:g} cannot be reached: with every gate of this "
                           f"network ({cfg.model.mode} mode) at 0 the {KINDS[kind]} is {reach:.4f} (the stem, the "
                           f"classifier and ungated parts stay); choose a target below it"])
    return BudgetController(target, kind, total_steps=total_steps, gamma=cfg.objective.gamma, eps=cfg.train.eps,
                            device=device)


__all__ = ["KINDS", "BudgetController", "BudgetGains", "make_budget", "max_reduction", "sharpen", "target_of"]
