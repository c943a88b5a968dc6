"""Algorithm 1 trainer: objective [2.2]/[13], schedules, physical pruning, checkpoints, bit-for-bit resume, NaN stop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pruning.checkpoint import CHECKPOINT
from pruning.config import RunConfig, load_config
from pruning.models import build_model
from pruning.objective import CostMeter, Objective
from pruning.optim import lr_at
from pruning.report import REPORT_JSON, REPORT_MD
from pruning.runlog import LOG_CSV, TIME_FIELDS
from pruning.train import Trainer, TrainingDiverged, load_run
from theory.complexity import ComplexityModel

# A tiny residual MLP on 256 scikit-learn digits; θ starts at 0.5 with a large step so that units and
# blocks are pruned in the first epoch and more units in the second (16 iterations of 16 samples each).
TINY = [
    "data.name=digits", "data.options.flatten=true", "data.train_subset=256", "data.test_subset=128",
    "model.arch=residual_mlp", "model.kwargs.hidden=[12, 12, 12]", "model.theta_init=0.5",
    "objective.gamma=0.01", "objective.delta=0.5", "objective.lambda=1.0",
    "optim.weights.lr=0.05", "optim.theta.lr=0.05",
    "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=128", "train.prune_every=3",
    "train.device=cpu", "train.progress=false", "train.threads=1", "export.enabled=false",
]


def tiny(*extra: str) -> RunConfig:
    return load_config(None, [*TINY, *extra])


@pytest.fixture(scope="module")
def mnist1d_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache folder for MNIST-1D, generated once per module."""
    return str(tmp_path_factory.mktemp("data"))


# --------------------------------------------------------------------------------------------------
# objective and schedule
# --------------------------------------------------------------------------------------------------


def test_objective_at_full_network_matches_13() -> None:
    """At θ ≡ 1, C/N = γ L_b (ρ + (1 − ρ) + δ) by [13]; mode "none" has no complexity term."""
    model = build_model("resnet1d", num_classes=10, stage_blocks=[1, 1], widths=[4, 8])
    spec = model.spec()
    N, gamma, rho, delta, lam = 500, 0.3, 0.25, 0.4, 7.0
    obj = Objective(spec, N=N, gamma=gamma, rho=rho, delta=delta, lam=lam, elementwise=True)
    c = obj.complexity(model)
    assert float(c.detach()) / N == pytest.approx(gamma * spec.prunable_blocks * (1 + delta), rel=1e-6)
    x, y = torch.randn(6, 1, 40), torch.randint(0, 10, (6,))
    model.eval()
    with torch.no_grad():
        terms = obj(model, model(x), y)
    sq = sum(float((p.detach().double() ** 2).sum()) for p in model.weight_parameters())
    assert float(terms.weight) == pytest.approx(0.5 * lam / N * sq, rel=1e-5)
    assert float(terms.total) == pytest.approx(float(terms.data + terms.complexity + terms.weight), rel=1e-6)
    none = Objective(spec, N=N, gamma=gamma, rho=rho, delta=delta, lam=lam, mode="none")
    assert float(none.complexity(model)) == 0.0 and none.coeffs is None


def test_complexity_gradient_is_the_analytic_12() -> None:
    """Autograd of C through the live θ equals the analytic γ_B, θ_B γ_1 of [12]/[18]."""
    model = build_model("residual_mlp", num_classes=3, in_features=5, hidden=[4, 3])
    with torch.no_grad():
        for p in model.gate_parameters():
            p.uniform_(0.2, 0.9)
    spec = model.spec()
    obj = Objective(spec, N=100, gamma=0.5, rho=0.3, delta=0.2, lam=0.0, elementwise=True)
    params = model.gate_parameters()
    grads = dict(zip(params, torch.autograd.grad(obj.complexity(model) / obj.N, params)))
    analytic = ComplexityModel(spec, elementwise=True).grad(
        [type(g)(*(None if v is None else (tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach())
                   for v in (g.theta_B, g.theta_1, g.theta_2))) for g in model.block_gates()], obj.coeffs)
    for bg, ag in zip(model.block_gates(), analytic):
        assert torch.allclose(grads[bg.theta_B] * obj.N, ag.theta_B.float(), rtol=1e-5)
        assert torch.allclose(grads[bg.theta_1[0]] * obj.N, ag.theta_1[0].float(), rtol=1e-5)


def test_cost_meter_ratios() -> None:
    model = build_model("resnet1d", num_classes=10, stage_blocks=[1, 1], widths=[4, 8])
    meter = CostMeter(model.spec())
    assert meter.ratios(model.spec()) == (0.0, 0.0)
    ef, ep = meter.expected(model)
    assert float(ef) == pytest.approx(meter.F_tot) and float(ep) == pytest.approx(meter.P_tot)


def test_learning_rate_schedules() -> None:
    cos = load_config(None, ["train.epochs=10", "optim.weights.lr=0.1", "optim.weights.lr_min=0.001"])
    assert lr_at(cos, 0, 5) == pytest.approx(0.1)
    assert lr_at(cos, 25, 5) == pytest.approx(0.0505)
    assert lr_at(cos, 50, 5) == pytest.approx(0.001)
    rs = load_config(None, ["train.epochs=10", "optim.weights.schedule=\"cosine-restarts\"",
                            "optim.weights.restarts=[4]"])
    assert lr_at(rs, 19, 5) < 0.01 and lr_at(rs, 20, 5) == pytest.approx(0.1)
    st = load_config(None, ["train.epochs=10", "optim.weights.schedule=\"step\"", "optim.weights.milestones=[3, 6]"])
    assert [round(lr_at(st, e * 5, 5), 6) for e in (0, 2, 3, 6, 9)] == [0.1, 0.1, 0.01, 0.001, 0.001]
    plain = load_config(None, ["optim.kind=\"plain-sgd\"", "optim.weights.lr=0.02"])
    assert lr_at(plain, 0, 5) == lr_at(plain, 99, 5) == 0.02
    warm = load_config(None, ["train.epochs=10", "optim.weights.warmup_epochs=2"])
    assert lr_at(warm, 0, 5) == pytest.approx(0.1 / 10, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# training runs
# --------------------------------------------------------------------------------------------------


def test_short_run_prunes_physically_and_reports(tmp_path: Path) -> None:
    cfg = tiny("export.enabled=true", "train.tensorboard=true")
    trainer = Trainer(cfg, tmp_path)
    base = trainer.baseline_spec
    n_params0 = sum(p.numel() for p in trainer.model.parameters())
    report = trainer.fit()
    assert report is not None
    spec = trainer.model.spec()
    widths0 = [w for b in base.blocks for w in b.unit_widths]
    widths = [w for b in spec.blocks for w in b.unit_widths]
    assert sum(widths) < sum(widths0), "no unit left the tensors"
    assert sum(p.numel() for p in trainer.model.parameters()) < n_params0
    assert trainer.progress.events, "no prune event recorded"
    # the live tensors have the widths the spec claims
    for block, bspec in zip(trainer.model.blocks, spec.blocks):
        if block.alive:
            assert block.path[0].op.weight.shape[0] == bspec.unit_widths[0]
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    for key in ("test_accuracy", "fPR", "pPR", "layers_left", "blocks_alive", "units_left", "training_cost_ratio",
                "wall_clock_s", "config", "exports"):
        assert key in data, key
    assert data["fPR"] > 0 and data["pPR"] > 0
    assert data["layers_left"] == spec.depth
    assert 0 < data["training_cost_ratio"] < 1
    assert [r["left"] for r in data["units_left"] if r["block_alive"]] == [
        b.unit_widths[0] for b in spec.blocks if b.alive]
    assert (tmp_path / REPORT_MD).read_text().startswith("# Run report")
    assert all(Path(p).is_file() for p in data["exports"].values())
    log = (tmp_path / LOG_CSV).read_text().splitlines()
    assert len(log) == 3 and "theta_frac_lt_half" in log[0] and "cum_train_flops" in log[0]
    rec = trainer.progress.log[-1]
    assert rec["expected_flops"] <= rec["flops"] + 1e-6 and rec["layers"] == spec.depth
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_loads_weights_only_and_rebuilds(tmp_path: Path) -> None:
    cfg = tiny()
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    for key in ("model", "structure", "optim_w", "optim_theta", "rng", "progress", "config", "scheduler"):
        assert key in ckpt, key
    assert ckpt["progress"]["epoch"] == 2 and len(ckpt["progress"]["log"]) == 2
    _, model, _ = load_run(tmp_path)
    assert model.spec() == trainer.model.spec()
    ref = trainer.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def _state(trainer: Trainer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "spec": trainer.model.spec(),
        "optim_w": trainer.opt_w.state_dict(),
        "optim_t": trainer.opt_t.state_dict() if trainer.opt_t is not None else None,
        "log": [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in trainer.progress.log],
        "events": trainer.progress.events,
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("arch", ["residual_mlp", "resnet1d"])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path: Path, arch: str, mnist1d_root: str) -> None:
    extra: list[str] = []
    if arch == "resnet1d":  # convolutions + BatchNorm running statistics + zero-pad shortcuts
        extra = ["data.name=mnist1d", f"data.root=\"{mnist1d_root}\"", "data.options={}", "model.arch=resnet1d",
                 "model.kwargs={stage_blocks = [1, 1], widths = [6, 8]}", "data.train_subset=192",
                 "objective.gamma=0.03"]  # prunes in both epochs with the per-step gate streams
    cfg = tiny(*extra)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    a = _state(straight)
    assert {e["epoch"] for e in a["events"]} == {1, 2}, "the test needs pruning in both epochs"

    first = Trainer(cfg, tmp_path / "resumed")
    assert first.fit(stop_after=1) is None
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["progress"]["epoch"] == 1
    del first
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it starts in
    resumed = Trainer(cfg, tmp_path / "resumed", resume=True)
    assert resumed.progress.epoch == 1
    resumed.fit()
    b = _state(resumed)
    _assert_same(a, b)
    assert (tmp_path / "straight" / LOG_CSV).read_text().count("\n") == (
        tmp_path / "resumed" / LOG_CSV).read_text().count("\n") == 3


def test_resume_rejects_a_different_configuration(tmp_path: Path) -> None:
    Trainer(tiny("train.epochs=1"), tmp_path).fit()
    with pytest.raises(ValueError, match="objective.gamma"):
        Trainer(tiny("train.epochs=1", "objective.gamma=2.0"), tmp_path, resume=True)


def test_nan_stops_with_message_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny("train.timing_steps=0")  # the count below is of the run's objective calls: no dense reference steps
    calls = {"n": 0}
    original = Objective.__call__

    def poisoned(self: Objective, *args: Any, **kwargs: Any) -> Any:
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 16 + 3:  # epoch 2 (16 iterations per epoch), iteration 3
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(Objective, "__call__", poisoned)
    trainer = Trainer(cfg, tmp_path)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, iteration 3/16") as info:
        trainer.fit()
    assert "last good checkpoint" in str(info.value)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / REPORT_JSON).exists()
    assert (tmp_path / LOG_CSV).read_text().count("\n") == 2


def test_exact_difference_estimator_and_layer_mode(tmp_path: Path) -> None:
    cfg = tiny("model.estimator=\"exact-difference\"", "model.kwargs.hidden=[4, 4]", "train.epochs=1",
               "data.train_subset=96")
    trainer = Trainer(cfg, tmp_path / "exact")
    thetas0 = [p.detach().clone() for p in trainer.model.gate_parameters()]
    trainer.fit()
    assert trainer.progress.log[-1]["train_loss"] < 10
    moved = trainer.model.spec() != trainer.baseline_spec or any(
        not torch.equal(a, b) for a, b in zip(thetas0, trainer.model.gate_parameters()))
    assert moved
    layer = Trainer(tiny("model.mode=layer", "train.epochs=1"), tmp_path / "layer")
    layer.fit()
    assert all(g.theta_1 is None for g in layer.model.block_gates())
    none = Trainer(tiny("model.mode=none", "train.epochs=1", "optim.kind=\"plain-sgd\""), tmp_path / "none")
    none.fit()
    assert none.opt_t is None and none.progress.log[-1]["fPR"] == 0.0
