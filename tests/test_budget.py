"""Your budget (pruning.budget): the γ controller on a toy plant, γ ≥ 0, state round-trip, config checks, a tiny run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.budget import BudgetController, BudgetGains, max_reduction
from pruning.checkpoint import CHECKPOINT, CheckpointError
from pruning.config import ConfigError, load_config
from pruning.models import build_model
from pruning.objective import CostMeter, Objective
from pruning.report import REPORT_JSON, REPORT_MD
from pruning.runlog import LOG_CSV, TIME_FIELDS
from pruning.train import Trainer

F64 = torch.float64


def _toy_run(target: float, *, scale: float, lag: float, steps: int = 1000, run: int | None = None,
             ctl: BudgetController | None = None) -> tuple[BudgetController, list[float], list[float]]:
    """A first-order plant: the ratio relaxes (rate ``lag`` per step) towards ``1 − exp(−γ/scale)``.

    ``run`` iterations (default ``steps``, the run length the controller is told) are simulated.
    """
    ctl = ctl or BudgetController(target, "fpr", total_steps=steps, gamma=0.05)
    m = torch.zeros((), dtype=F64)
    gammas, ms = [], []
    for k in range(steps if run is None else run):
        u = ctl.update(m, k)
        gammas.append(0.05 * float(u))
        m = m + lag * ((1.0 - torch.exp(-0.05 * u / scale)) - m)
        ms.append(float(m))
    return ctl, gammas, ms


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_controller_reaches_the_target_of_a_toy_plant(target: float) -> None:
    _, gammas, ms = _toy_run(target, scale=0.03, lag=0.02)
    # within the run: from below (removals are irreversible), close to the target at the end
    assert target - 0.035 < ms[-1] <= target, (target, ms[-1])
    assert max(ms) <= target + 1e-9 and min(gammas) >= 0.0
    # longer than the run (reference held at T): the integral removes the rest of the error
    _, gammas, ms = _toy_run(target, scale=0.03, lag=0.02, run=4000)
    assert abs(ms[-1] - target) < 0.003, (target, ms[-1])
    # the γ the plant needs at equilibrium: −scale · log(1 − T)
    assert gammas[-1] == pytest.approx(-0.03 * math.log(1 - target), rel=0.03)


@settings(max_examples=25, deadline=None)
@given(target=st.floats(0.05, 0.9), scale=st.floats(0.005, 0.2), lag=st.floats(0.005, 0.2),
       noise=st.lists(st.floats(-1.0, 1.0), min_size=50, max_size=50))
def test_gamma_is_never_negative(target: float, scale: float, lag: float, noise: list[float]) -> None:
    ctl = BudgetController(target, "fpr", total_steps=50, gamma=0.05)
    for k, z in enumerate(noise):  # arbitrary measurements, also far above the target
        u = ctl.update(torch.tensor(min(max(target + z, 0.0), 1.0), dtype=F64), k)
        assert float(u) >= 0.0 and ctl.gamma >= 0.0 and float(ctl.integral) >= 0.0
        assert float(u) <= BudgetGains().max_factor


def test_overshoot_drives_gamma_to_zero() -> None:
    ctl = BudgetController(0.3, "fpr", total_steps=100, gamma=0.05)
    for k in range(100):
        ctl.update(torch.tensor(0.8, dtype=F64), k)
    assert ctl.gamma == 0.0 and float(ctl.integral) == 0.0


def test_state_round_trip_continues_bit_for_bit() -> None:
    a, _, _ = _toy_run(0.5, scale=0.03, lag=0.02, steps=400)
    state = json.loads(json.dumps(a.state_dict()))  # plain floats, as in the checkpoint
    b = BudgetController(0.5, "fpr", total_steps=400, gamma=0.05)
    b.load_state_dict(state)
    for attr in ("integral", "factor", "measured"):
        assert torch.equal(getattr(a, attr), getattr(b, attr)), attr
    assert b.last_step == a.last_step and b.record() == a.record()
    m = torch.tensor(0.41, dtype=F64)
    assert torch.equal(a.update(m, 400), b.update(m, 400))
    with pytest.raises(ValueError, match="target"):
        BudgetController(0.3, "fpr", total_steps=400, gamma=0.05).load_state_dict(state)


def test_controller_rejects_bad_arguments() -> None:
    for kwargs, word in (({"target": 50.0}, "fraction"), ({"target": 0.0}, "fraction"), ({"kind": "flops"}, "kind"),
                         ({"total_steps": 0}, "total_steps"), ({"gamma": 0.0}, "gamma")):
        args = {"target": 0.5, "kind": "fpr", "total_steps": 10, "gamma": 0.05, **kwargs}
        with pytest.raises(ValueError, match=word):
            BudgetController(args.pop("target"), args.pop("kind"), **args)
    with pytest.raises(ValueError, match="ramp"):
        BudgetGains(ramp=0.0)


# --------------------------------------------------------------------------------------------------
# configuration and objective
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sets", "words"), [
    (["objective.target_fpr=50"], ["objective.target_fpr", "fraction", "write 0.5"]),
    (["objective.target_ppr=0"], ["objective.target_ppr", "fraction"]),
    (["objective.target_fpr=1.0"], ["objective.target_fpr", "fraction"]),
    (["objective.target_fpr=0.5", "objective.target_ppr=0.5"], ["objective.target_ppr", "not both"]),
    (["objective.target_fpr=0.5", "model.mode=none"], ["objective.target_fpr", "model.mode"]),
    (["objective.target_fpr=\"half\""], ["objective.target_fpr", "number"]),
    (["objective.target_frp=0.5"], ["objective.target_frp", "did you mean 'target_fpr'"]),
])
def test_config_validation(sets: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_defaults_have_no_target() -> None:
    o = load_config(None, []).objective
    assert o.target_fpr is None and o.target_ppr is None
    assert load_config(None, ["objective.target_ppr=0.4"]).objective.target_ppr == 0.4


def test_gamma_factor_scales_the_complexity_term_only() -> None:
    torch.manual_seed(0)
    model = build_model("residual_mlp", in_features=6, hidden=[5, 5], num_classes=3, mode="combined", theta_init=0.7)
    obj = Objective(model.spec(), N=100, gamma=0.05, rho=0.5, delta=0.5, lam=1.0)
    c1 = obj.complexity(model)
    obj.gamma_factor = torch.tensor(0.3, dtype=F64)
    c2 = obj.complexity(model)
    assert c2.dtype == c1.dtype and float(c2) == pytest.approx(0.3 * float(c1), rel=1e-6)
    cur = obj.current_coeffs()
    assert cur is not None and obj.coeffs is not None
    assert cur.alpha_f == pytest.approx(0.3 * obj.coeffs.alpha_f) and cur.beta == pytest.approx(0.3 * obj.coeffs.beta)
    obj.gamma_factor = torch.zeros((), dtype=F64)  # γ = 0: no pressure on θ at all
    c0 = obj.complexity(model)
    grads = torch.autograd.grad(c0, model.gate_parameters(), allow_unused=True)
    assert float(c0) == 0.0 and all(g is None or not g.any() for g in grads)


def test_measurement_counts_sharpened_gates() -> None:
    """½ (1 − E[F](s(Θ))/F_tot) + ½ fPR(survivors): θ ≥ 0.5 counts as kept, θ ≤ ε as removed (THEORY [9])."""
    torch.manual_seed(0)
    model = build_model("residual_mlp", in_features=6, hidden=[5, 5, 5], num_classes=3, mode="combined")
    spec, meter = model.spec(), CostMeter(model.spec())
    ctl = BudgetController(0.5, "fpr", total_steps=10, gamma=0.05, eps=0.1)
    gate_B = model.gate_parameters()[0]  # the first block's θ_B
    assert gate_B.dim() == 0
    expected_at = {}
    for theta_B, s in ((1.0, 1.0), (0.7, 1.0), (0.5, 1.0), (0.3, 0.5), (0.1, 0.0), (0.05, 0.0)):
        with torch.no_grad():
            gate_B.fill_(theta_B)
        got = float(ctl.measure(meter, model, spec))
        with torch.no_grad():
            gate_B.fill_(s)
        ef = float(meter.expected(model, spec)[0])
        # half the sharpened ratio + half the deterministic one (0 here: the ε-rule has not run)
        assert got == pytest.approx(0.5 * (1.0 - ef / meter.F_tot), abs=1e-6), theta_B  # θ is float32
        expected_at[theta_B] = got
    assert expected_at[1.0] == 0.0 and 0 < expected_at[0.3] < expected_at[0.1] == expected_at[0.05]
    ppr = BudgetController(0.5, "ppr", total_steps=10, gamma=0.05)
    with torch.no_grad():
        gate_B.fill_(0.05)
    got = float(ppr.measure(meter, model, spec))
    with torch.no_grad():
        gate_B.fill_(0.0)
    assert got == pytest.approx(0.5 * (1.0 - float(meter.expected(model, spec)[1]) / meter.P_tot), abs=1e-12)
    assert got > 0


def test_max_reduction_by_mode() -> None:
    spec_of = {}
    for mode in ("combined", "layer", "unit"):
        torch.manual_seed(0)
        m = build_model("residual_mlp", in_features=6, hidden=[5, 5, 5], num_classes=3, mode=mode)
        spec_of[mode] = max_reduction(CostMeter(m.spec()), m, "fpr")
    assert 0 < spec_of["layer"] <= spec_of["combined"] < 1 and 0 < spec_of["unit"] <= spec_of["combined"]


# --------------------------------------------------------------------------------------------------
# a tiny run with a target
# --------------------------------------------------------------------------------------------------

TINY = [
    "data.name=digits", "data.options.flatten=true", "data.train_subset=128", "data.test_subset=64",
    "model.arch=residual_mlp", "model.kwargs.hidden=[12, 12, 12]",
    "objective.gamma=0.05", "objective.lambda=1.0", "objective.target_fpr=0.4",
    "optim.weights.lr=0.05", "optim.theta.lr=0.05",
    "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=128", "train.prune_every=3",
    "train.device=cpu", "train.progress=false", "train.threads=1", "train.tensorboard=false", "export.enabled=false",
]


def test_tiny_run_records_the_gamma_trajectory_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    cfg = load_config(None, TINY)
    straight = Trainer(cfg, tmp_path / "straight")
    report = straight.fit()
    assert report is not None
    budget = json.loads((tmp_path / "straight" / REPORT_JSON).read_text())["budget"]
    assert budget["kind"] == "fPR" and budget["target"] == 0.4 and budget["achieved"] == report["fPR"]
    assert [r["epoch"] for r in budget["trajectory"]] == [1, 2]
    assert all(r["gamma"] >= 0 for r in budget["trajectory"]) and budget["max_gamma"] > 0
    assert budget["final_gamma"] == budget["trajectory"][-1]["gamma"]
    rows = list(csv.DictReader((tmp_path / "straight" / LOG_CSV).open()))
    assert [float(r["gamma"]) for r in rows] == [r["gamma"] for r in budget["trajectory"]]
    assert {"budget_reference", "budget_measured_fPR"} <= set(rows[0])
    assert "Budget: target fPR 40.0 %" in (tmp_path / "straight" / REPORT_MD).read_text()
    ckpt = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    assert ckpt["budget"]["last_step"] == straight.progress.global_step - 1

    first = Trainer(cfg, tmp_path / "resumed")
    assert first.fit(stop_after=1) is None
    del first
    resumed = Trainer(cfg, tmp_path / "resumed", resume=True)
    assert resumed.budget is not None and resumed.objective.gamma_factor is resumed.budget.factor
    resumed.fit()
    assert resumed.budget.state_dict() == straight.budget.state_dict()  # type: ignore[union-attr]
    strip = [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in resumed.progress.log]
    assert strip == [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in straight.progress.log]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k

    ckpt["budget"] = {**ckpt["budget"], "target": 0.7}  # a damaged controller state is named
    torch.save(ckpt, tmp_path / "resumed" / CHECKPOINT)
    with pytest.raises(CheckpointError, match="budget controller"):
        Trainer(cfg, tmp_path / "resumed", resume=True)


def test_unreachable_target_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "objective.target_fpr=0.999", "model.mode=layer"])
    with pytest.raises(ConfigError, match="objective.target_fpr: 0.999 cannot be reached"):
        Trainer(cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_docstring_example() -> None:
    import doctest

    import pruning.budget

    result = doctest.testmod(pruning.budget)
    assert result.failed == 0 and result.attempted > 0
