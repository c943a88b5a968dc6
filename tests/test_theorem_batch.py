"""Theorems 5.1/5.2 on many starts at once (theory/theorem_batch.py).

The batched checks use the criteria of theory/certificates.py (one implementation, vectorised over
trajectories: judge_block_batch / judge_unit_batch; the per-trajectory judges are its B = 1 case) on
trajectories integrated together by odeint_batch.  Tested: the vectorised judges equal the
per-trajectory ones, the batched checks pass on a few problems, and the negative control (a Lemma-1
constant 1000× too small, so the 'certified' region reaches useful weights) fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from theory import certificates as C
from theory import theorem_batch as TB
from theory.block_model import lemma1_k
from theory.checks import registry


def test_vectorised_judges_equal_the_per_trajectory_ones() -> None:
    """Columns do not interfere: judging B trajectories at once = judging each alone (exits, masks, finals)."""
    from theory.block_model import field
    from theory.ode import odeint_batch

    rng = np.random.default_rng(3)
    P = C.random_problem(rng, lam=0.2)
    B = 6
    R = np.geomspace(0.3, 2.0, B)
    k = np.array([lemma1_k(P, r) for r in R])
    a = np.geomspace(0.3, 5.0, B)
    rho = 0.8 * np.array([float(C.rho_sup(a[b], P.c_B, k[b], R[b])) for b in range(B)])
    Y0 = np.stack([C.sample_block_start(P, rng, a[b], rho[b], aligned=b % 2 == 0) for b in range(B)])
    R[-1] = 0.5 * np.linalg.norm(Y0[-1, P.theta_slice.stop:])  # one start outside its ball: judged up to the exit
    t = np.concatenate([[0.0], np.geomspace(1e-3, 20.0, 200)])
    Y = odeint_batch(field(P), Y0, t, theta_slice=P.theta_slice, method="rkc", rtol=1e-9, atol=1e-15).y
    reps = C.judge_block_batch(P, Y0, a, rho, R, k, t, Y)
    units = np.arange(B) % P.n
    ureps = C.judge_unit_batch(P, Y0, a, 0.01 * rho, 3 * R, k, units, t, Y)
    for b in range(B):
        one = C.judge_block_trajectory(P, Y0[b], float(a[b]), float(rho[b]), float(R[b]), float(k[b]), t, Y[:, b])
        assert one.ratios == pytest.approx(reps[b].ratios) and one.final == pytest.approx(reps[b].final)
        assert (one.ball_held, one.failed, one.inconclusive) == (reps[b].ball_held, reps[b].failed,
                                                                 reps[b].inconclusive)
        uone = C.judge_unit_trajectory(P, Y0[b], float(a[b]), 0.01 * float(rho[b]), 3 * float(R[b]), float(k[b]),
                                       int(units[b]), t, Y[:, b])
        assert uone.ratios == pytest.approx(ureps[b].ratios) and uone.final == pytest.approx(ureps[b].final)
    assert not reps[-1].ball_held and reps[0].ball_held


def test_batched_theorem_checks_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TB, "STARTS_PER_PROBLEM", 12)
    r51 = TB.theorem51_batch_check(np.random.default_rng(0), 24, lambda: None)
    assert r51.instances == 24 and r51.failures == 0 and r51.inconclusive == 0 and r51.passed, r51.record()
    assert r51.details["worst_ratio_per_criterion"]["Vdot_bound"] <= 1.0
    r52 = TB.theorem52_batch_check(np.random.default_rng(0), 24, lambda: None)
    assert r52.instances == 24 and r52.failures == 0 and r52.instances > r52.inconclusive, r52.record()
    for name in ("theorem5.1-batch", "theorem5.2-batch"):
        assert registry()[name].group == "dynamics" and registry()[name].default_instances >= 2500
    assert registry()["theorem5.1-batch"].default_instances + registry()["theorem5.2-batch"].default_instances >= 10_000


def test_batched_negative_control_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """k/1000: the 'certified' region reaches useful weights and the batched checker must report failures."""
    monkeypatch.setattr(TB, "STARTS_PER_PROBLEM", 6)
    res = TB.theorem51_batch_check(np.random.default_rng(0), 12, lambda: None, k_scale=1e-3, R_range=(2.0, 3.0),
                                   aligned_frac=1.0, name="negative-control")
    assert res.failures > 0 and not res.passed and res.worst_violation > 1.0
