"""Theorem 3.1 checks (theory.determinism, THEORY §4 (a)–(e)), with negative controls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory.checks import CheckResult, registry, select
from theory.determinism import (
    TOL_FLAT,
    Instance,
    gradient_flow,
    random_instance,
    round_to_vertex,
    run_affine,
    run_faces,
    run_gradient_flow,
    run_multilinear,
    run_rounding,
    run_vertex_min,
)
from theory.objective import MAX_GATES, mask_matrix

seeds = st.integers(0, 2**32 - 1)

NAMES = (
    "determinism.multilinear",
    "determinism.affine-coordinate",
    "determinism.vertex-min",
    "determinism.rounding",
    "determinism.gradient-flow",
    "determinism.faces",
)


def _ok(res: CheckResult) -> None:
    assert res.failures == 0, res.record()
    assert res.inconclusive == 0, res.record()
    assert res.passed
    assert res.worst_violation <= res.tolerance


# --------------------------------------------------------------------------------------------------
# Each property on hypothesis-drawn random instances (one instance per example)
# --------------------------------------------------------------------------------------------------


@given(seeds)
def test_multilinear(seed: int) -> None:
    """(a) ∂²L/∂θ_j² ≡ 0 exactly (sympy), and the polynomial is the numeric L."""
    _ok(run_multilinear(np.random.default_rng(seed), 1, max_gates=6))


@given(seeds)
def test_affine_coordinate(seed: int) -> None:
    """(b) L affine along every coordinate with slope = analytic ∂L/∂θ_j."""
    _ok(run_affine(np.random.default_rng(seed), 1))


@given(seeds)
def test_vertex_min(seed: int) -> None:
    """(c) L-BFGS-B from random starts never beats the best vertex."""
    _ok(run_vertex_min(np.random.default_rng(seed), 1, max_gates=8, starts=2))


@given(seeds)
def test_rounding(seed: int) -> None:
    """(d) rounding never increases L and ends at a vertex."""
    _ok(run_rounding(np.random.default_rng(seed), 1))


@given(seeds)
def test_gradient_flow(seed: int) -> None:
    """(e) projected gradient flow ends at a vertex or on a flat face."""
    _ok(run_gradient_flow(np.random.default_rng(seed), 1))


@given(seeds)
def test_faces(seed: int) -> None:
    """Layer-only / unit-only objectives are the faces θ_1 ≡ 1 / θ_B ≡ 1."""
    _ok(run_faces(np.random.default_rng(seed), 1))


@given(seeds, st.integers(1, MAX_GATES))
def test_random_instance_respects_budget(seed: int, max_gates: int) -> None:
    inst = random_instance(np.random.default_rng(seed), max_gates=max_gates)
    assert 1 <= inst.K <= max_gates
    assert 1 <= len(inst.objective.spec.blocks) <= 3
    assert all(1 <= b.unit_widths[0] <= 3 for b in inst.objective.spec.blocks)
    V = inst.vertex_values()
    assert V.shape == (2**inst.K,) and np.isfinite(V).all()
    if inst.K <= 8:  # the point-mass shortcut equals L evaluated at the vertices
        np.testing.assert_allclose(V, inst.L(mask_matrix(inst.K)), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Negative controls: the checks can fail
# --------------------------------------------------------------------------------------------------


class Bump:
    """``A · (θ_j − c)²`` with its exact gradient: convex in one coordinate, not multilinear."""

    def __init__(self, A: float, j: int = 0, c: float = 0.5) -> None:
        self.A, self.j, self.c = A, j, c

    def __call__(self, theta: Any) -> Any:
        return self.A * (theta[..., self.j] - self.c) ** 2

    def grad(self, theta: np.ndarray) -> np.ndarray:
        g = np.zeros_like(theta)
        g[..., self.j] = 2 * self.A * (theta[..., self.j] - self.c)
        return g


def test_negative_multilinear() -> None:
    res = run_multilinear(np.random.default_rng(0), 3, perturb=lambda th: th[..., 0] ** 2, max_gates=5)
    assert res.failures == 3 and not res.passed


def test_negative_affine() -> None:
    """Even a 1e-4 θ_0² is caught at the 1e-10 relative tolerance."""
    res = run_affine(np.random.default_rng(0), 5, perturb=lambda th: 1e-4 * th[..., 0] ** 2)
    assert res.failures == 5 and not res.passed


def test_negative_vertex_min() -> None:
    """An interior dip A (θ_0 − ½)² = −A θ_0(1 − θ_0) + A/4 lets L-BFGS-B beat the best vertex."""
    res = run_vertex_min(np.random.default_rng(0), 3, perturb=Bump(1e4), max_gates=6, starts=1)
    assert res.failures == 3 and not res.passed


def test_negative_rounding() -> None:
    res = run_rounding(np.random.default_rng(0), 5, perturb=Bump(1e4))
    assert res.failures == 5 and not res.passed


def test_negative_gradient_flow() -> None:
    """A bowl in one coordinate (scaled to the instance) stops the flow inside H on a non-flat face."""
    rng = np.random.default_rng(1)
    caught = 0
    for _ in range(3):
        inst = random_instance(rng, max_gates=4)
        V = inst.vertex_values()
        bumped = inst.with_perturbation(Bump(4 * float(V.max() - V.min()) + 1e-3, j=int(rng.integers(inst.K))))
        end = gradient_flow(bumped, rng.uniform(0.05, 0.95, inst.K), max_steps=5000)
        assert end.converged
        caught += int(end.flatness > TOL_FLAT)
        j = bumped.perturb.j  # type: ignore[union-attr]
        assert 0.0 < float(end.theta[j]) < 1.0
    assert caught == 3


def test_negative_faces_and_rounding_helper() -> None:
    """round_to_vertex reports a positive step when L has an interior dip at θ_0 = ½."""
    inst = random_instance(np.random.default_rng(2)).with_perturbation(Bump(1e4))
    theta = np.full(inst.K, 0.5)
    vertex, step = round_to_vertex(inst, theta, np.arange(inst.K))
    assert set(np.unique(vertex)) <= {0.0, 1.0}
    assert step > 0


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def _appender(ticks: list[int]) -> Callable[[], None]:
    return lambda: ticks.append(1)


def test_registered_checks_run_and_report_progress() -> None:
    checks = registry()
    for name in NAMES:
        assert name in checks and checks[name].group == "determinism"
    assert {c.name for c in select("determinism")} >= set(NAMES)
    for name in NAMES:
        ticks: list[int] = []
        res = checks[name].fn(np.random.default_rng(7), 2, _appender(ticks))
        assert isinstance(res, CheckResult) and res.name == name
        assert len(ticks) == 2 and res.instances == 2
        _ok(res)
        rec = res.record()
        assert rec["passed"] and rec["metric"] and "K_range" in rec["details"]


def test_instance_gradient_matches_secants() -> None:
    inst: Instance = random_instance(np.random.default_rng(3))
    theta = np.random.default_rng(4).uniform(size=inst.K)
    g = inst.grad(theta)
    for j in range(inst.K):
        a, b = theta.copy(), theta.copy()
        a[j], b[j] = 0.0, 1.0
        assert g[j] == pytest.approx(float(inst.L(b)) - float(inst.L(a)), rel=1e-10, abs=1e-10 * inst.scale)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_gates"):
        random_instance(np.random.default_rng(0), max_gates=0)
