"""The training objective of Algorithm 1, in one place: ``J = L / N`` of [2.2].

THEORY §2: the objective over the whole data set is

    L(W, Θ) = N · E_D E_{Ξ~q_Θ} ℓ  +  (λ/2) ||W||²  +  C(Θ),        Θ ∈ H = [0,1]^K      [2.2]

and implementations minimise ``J = L / N``:

    J = mean_batch ℓ(y, NN(x; W, Ξ))  +  C(Θ) / N  +  (λ/N)/2 · ||W||²

* the first term, on one mini-batch and one gate sample ``Ξ ~ q_Θ`` drawn by
  the model's forward pass, is ``L̂/N`` of [16]; its gradient with respect to
  ``W`` is back-propagation through the sampled dropout network [17], with
  respect to ``Θ`` the straight-through estimate of ``∂E/∂θ`` ([18], [21]);
* ``C(Θ) = Σ_l α_f E[F_l] + α_p E[P_l] + β θ_B^l`` is the expected complexity
  [11], evaluated by the one complexity model (:mod:`theory.complexity`, in
  its compiled form :meth:`~theory.complexity.ComplexityModel.compile`: the
  same terms in a few tensor operations) on the *current* (compacted)
  structure and the live ``θ`` tensors, so that autograd gives the exact
  ``∇_Θ C`` of [12]/[18];
* ``(α_f, α_p, β)`` come from the user parameters ``(γ, ρ, δ)`` by [13]
  (:func:`theory.complexity.coefficients_for`) on the *baseline* structure,
  fixed for the whole run: pruning changes ``C``, not its prices;
* ``λ`` is the precision of the Gaussian weight prior (paper, Table 1:
  ``λ = 128`` ImageNet, 30 CIFAR-10, 37.5 CIFAR-100), i.e. weight decay
  ``λ/N`` on every weight parameter (the optimiser itself applies none).

Mode ``"none"`` (plain training of the same network, the baseline) has no
complexity term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from theory.complexity import (
    Coefficients,
    CompiledComplexity,
    ComplexityModel,
    coefficients_for,
    latency_coefficients_for,
)
from theory.latency import LatencyCosts
from theory.spec import NetworkSpec


@dataclass
class ObjectiveTerms:
    """The value of ``J`` and its three parts (tensors; ``total`` carries the graph)."""

    total: torch.Tensor
    data: torch.Tensor
    complexity: torch.Tensor  # C(Θ)/N
    weight: torch.Tensor  # (λ/N)/2 ||W||²


class ModelCache:
    """The :class:`ComplexityModel` of the latest structure, rebuilt only when the structure changes.

    :meth:`compiled` gives the model's :class:`theory.complexity.CompiledComplexity` evaluations
    (cached with it): the per-step hot path of ``C(Θ)`` and ``E[F]``.
    """

    def __init__(self, *, elementwise: bool, latency: LatencyCosts | None = None) -> None:
        self.elementwise = elementwise
        self.latency = latency
        self._spec: NetworkSpec | None = None
        self._model: ComplexityModel | None = None
        self._compiled: dict[tuple[Coefficients | None, tuple[str, ...] | str], CompiledComplexity] = {}
        self._deterministic: tuple[float, float] | None = None

    def __call__(self, spec: NetworkSpec) -> ComplexityModel:
        if self._model is None or (spec is not self._spec and spec != self._spec):
            self._model = ComplexityModel(spec, elementwise=self.elementwise, latency=self.latency)
            self._spec = spec
            self._compiled = {}
            self._deterministic = None
        return self._model

    def deterministic(self, spec: NetworkSpec) -> tuple[float, float]:
        """FLOPs and parameters of ``spec`` with every surviving gate 1 ([9], [10]), computed once per structure."""
        model = self(spec)
        if self._deterministic is None:
            self._deterministic = (float(model.flops()), float(model.params()))
        return self._deterministic

    def compiled(
        self, spec: NetworkSpec, coeffs: Coefficients | None, what: str | tuple[str, ...]
    ) -> CompiledComplexity:
        """``ComplexityModel(spec).compile(coeffs, what)``, built once per structure."""
        model = self(spec)
        fn = self._compiled.get((coeffs, what))
        if fn is None:
            fn = self._compiled[(coeffs, what)] = model.compile(coeffs, what)
        return fn


class Objective:
    """``J(W, Θ) = mean ℓ + C(Θ)/N + (λ/N)/2 ||W||²`` for one run (THEORY §2, [2.2], [11], [13], [17], [18]).

    ``baseline_spec`` fixes the coefficients of [13]; :meth:`complexity`
    evaluates ``C`` on ``model.spec()`` (the compacted structure) with
    ``model.block_gates()`` and rebuilds its :class:`ComplexityModel` only
    when the structure changed (after a pruning step).  ``latency`` (``objective.cost =
    "latency"``): ``C = α_t E[T] + β Σ θ_B`` with the measured step time ``E[T]`` of
    :mod:`theory.latency` in place of the FLOPs/parameters mix (``rho``, ``elementwise`` unused).
    """

    def __init__(
        self,
        baseline_spec: NetworkSpec,
        *,
        N: int,
        gamma: float,
        rho: float,
        delta: float,
        lam: float,
        mode: str = "combined",
        elementwise: bool = True,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        latency: LatencyCosts | None = None,
    ) -> None:
        if N < 1:
            raise ValueError(f"N must be a positive sample count, got {N}")
        self.N = int(N)
        self.lam = float(lam)
        self.weight_decay = self.lam / self.N
        self.mode = mode
        self.elementwise = elementwise
        self.loss = loss if loss is not None else F.cross_entropy
        self.latency = latency
        self.coeffs: Coefficients | None
        if mode == "none":
            self.coeffs = None
        elif latency is not None:  # C = α_t E[T] + β Σ θ_B (theory.complexity, "Measured latency")
            self.coeffs = latency_coefficients_for(baseline_spec, gamma, delta, N=self.N, latency=latency)
        else:
            self.coeffs = coefficients_for(baseline_spec, gamma, rho, delta, N=self.N, elementwise=elementwise)
        self.complexity_model = ModelCache(elementwise=elementwise, latency=latency)
        #: ``γ_k / γ`` of a budget controller (:mod:`pruning.budget`, a 0-d tensor), ``None`` = 1: by [13] the
        #: coefficients are linear in γ, so ``C`` priced at ``γ_k`` is this factor times ``C`` at ``γ``
        self.gamma_factor: torch.Tensor | None = None

    def current_coeffs(self) -> Coefficients | None:
        """``(α_f, α_p, β, α_t)`` at the current price: ``coeffs`` times ``gamma_factor`` (a host read when set)."""
        if self.coeffs is None or self.gamma_factor is None:
            return self.coeffs
        u = float(self.gamma_factor)
        c = self.coeffs
        return Coefficients(c.alpha_f * u, c.alpha_p * u, c.beta * u, c.alpha_t * u)

    def complexity(self, model: Any, spec: NetworkSpec | None = None) -> torch.Tensor:
        """``C(Θ)`` of [11] on the live gates (a differentiable tensor; 0 in mode ``"none"``), at the current price.

        ``spec`` is ``model.spec()`` (pass it when the caller caches it between pruning steps).
        """
        if self.coeffs is None:
            return torch.zeros((), device=_device_of(model))
        fn = self.complexity_model.compiled(model.spec() if spec is None else spec, self.coeffs, "complexity")
        # the compiled form of ComplexityModel.complexity (same terms, a few tensor operations); the
        # gates come from the model's own spec and are projected onto H after every step, so the
        # range check is skipped (it would force a device sync on every iteration)
        value = fn(model.block_gates())
        if not torch.is_tensor(value):  # no gate at all left: C is a constant
            value = torch.tensor(float(value), device=_device_of(model))
        if self.gamma_factor is not None:
            value = value * self.gamma_factor.to(value.dtype)
        return value

    # -- J ---------------------------------------------------------------------------------------
    def weight_term(self, weights: Iterable[torch.Tensor]) -> torch.Tensor:
        """``(λ/N)/2 ||W||²`` over the weight parameters (the Gaussian prior of [2.2])."""
        params = list(weights)
        if not params or self.weight_decay == 0.0:
            dev = params[0].device if params else None
            return torch.zeros((), device=dev)
        return 0.5 * self.weight_decay * _SquaredNorm.apply(*params)

    def add_weight_grad(self, weights: Iterable[torch.Tensor]) -> None:
        """``∇W += (λ/N) W``: the gradient of :meth:`weight_term`, added in place to every ``.grad``.

        One ``foreach`` kernel over all weights (what autograd through :meth:`weight_term` adds, without a
        product and a sum per tensor); for callers of ``J(..., weight_grad=False)``.
        """
        if self.weight_decay == 0.0:
            return
        params = [p for p in weights]
        with torch.no_grad():
            missing = [p for p in params if p.grad is None]
            for p in missing:  # a weight the loss did not reach: its gradient is the decay alone
                p.grad = torch.zeros_like(p)
            torch._foreach_add_([p.grad for p in params], params, alpha=self.weight_decay)

    def __call__(
        self, model: Any, output: torch.Tensor, target: torch.Tensor, *, spec: NetworkSpec | None = None,
        weight_grad: bool = True,
    ) -> ObjectiveTerms:
        """``J`` for one mini-batch whose network ``output`` came from one forward pass (one gate sample).

        ``weight_grad=False``: the weight term enters ``J``'s value but not its graph; the caller adds its
        gradient after the backward pass with :meth:`add_weight_grad` (:func:`pruning.step.algorithm1_step`
        does: the same gradient, one ``foreach`` kernel instead of autograd through every weight tensor).
        """
        data = self.loss(_at_least_float32(output), target)
        comp = self.complexity(model, spec) / self.N
        if weight_grad:
            weight = self.weight_term(model.weight_parameters())
        else:
            with torch.no_grad():
                weight = self.weight_term(model.weight_parameters())
        return ObjectiveTerms(total=data + comp + weight, data=data, complexity=comp, weight=weight)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision values (bf16 autocast) are promoted to float32; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _SquaredNorm(torch.autograd.Function):
    """``Σ_p ||p||²`` (at least float32) of many tensors: one ``foreach`` norm forward, one ``foreach`` product back.

    The same value and gradient (``2 g p``) as ``Σ_p p.pow(2).sum()``, without two operations per
    tensor in each direction (a network has dozens of weight tensors; this runs every step).
    """

    @staticmethod
    def forward(ctx: Any, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*params)
        return _at_least_float32(torch.stack(torch._foreach_norm(params))).square().sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = ctx.saved_tensors
        return tuple(torch._foreach_mul(params, 2.0 * grad))


class CostMeter:
    """Reported costs (THEORY §3, "two uses of one model"): conv + linear MACs, parameters incl. BN pairs.

    ``baseline`` holds ``F_tot``, ``P_tot`` of the starting architecture; the
    pruning ratios ``fPR = 1 − F/F_tot``, ``pPR = 1 − P/P_tot`` refer to it.
    """

    def __init__(self, baseline_spec: NetworkSpec) -> None:
        base = ComplexityModel(baseline_spec, elementwise=False)
        self.baseline_spec = baseline_spec
        self.F_tot = float(base.flops())
        self.P_tot = float(base.params())
        self.model_for = ModelCache(elementwise=False)

    @torch.no_grad()
    def expected(self, model: Any, spec: NetworkSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[F]``, ``E[P]`` ([9], [10]) of the surviving network at the current ``θ`` (float64 tensors)."""
        fn = self.model_for.compiled(model.spec() if spec is None else spec, None, ("flops", "params"))
        dev = _device_of(model)
        ef, ep = fn(model.block_gates(), dtype=torch.float64)
        return _as_tensor(ef, dev), _as_tensor(ep, dev)

    @torch.no_grad()
    def expected_flops(self, model: Any, spec: NetworkSpec) -> torch.Tensor:
        """``E[F]`` alone (the per-iteration training cost of Figure 4), compiled, in float64."""
        fn = self.model_for.compiled(spec, None, "flops")
        return _as_tensor(fn(model.block_gates(), dtype=torch.float64), _device_of(model))

    def deterministic(self, spec: NetworkSpec) -> tuple[float, float]:
        """FLOPs and parameters of the deterministic network ``spec`` (all surviving gates 1; cached per structure)."""
        return self.model_for.deterministic(spec)

    def ratios(self, spec: NetworkSpec) -> tuple[float, float]:
        """``(fPR, pPR)`` of ``spec`` relative to the baseline."""
        f, p = self.deterministic(spec)
        return 1.0 - f / self.F_tot, 1.0 - p / self.P_tot


def _as_tensor(x: Any, device: torch.device | None) -> torch.Tensor:
    return x.detach().double() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64, device=device)


def _device_of(model: Any) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


__all__ = ["CostMeter", "ModelCache", "Objective", "ObjectiveTerms"]
