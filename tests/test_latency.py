"""Measured latency cost (theory.latency, pruning.calibrate, objective.cost = "latency"): file, exactness, theorem."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from pruning.cli import main
from pruning.config import ConfigError, load_config
from theory import determinism
from theory.architectures import residual_mlp, resnet1d
from theory.complexity import (
    BlockGates,
    ComplexityModel,
    latency_coefficients_for,
)
from theory.latency import LatencyCosts, LatencyError, elementwise_key, fit_affine, layer_key, load


def _random_costs(spec, seed: int = 0) -> LatencyCosts:
    return determinism.random_latency_costs(np.random.default_rng(seed), spec)


# --------------------------------------------------------------------------------------------------
# calibration file
# --------------------------------------------------------------------------------------------------


def test_calibrate_quick_writes_a_valid_model(tmp_path: Path) -> None:
    from pruning.calibrate import calibrate

    spec = resnet1d(stage_blocks=[1, 1], widths=[4, 8], length=8)
    model = calibrate(spec, batch=4, threads=1, quick=True, rounds=1, iters=1)
    out = tmp_path / "lat.json"
    model.save(out)
    raw = json.loads(out.read_text())
    assert raw["format"] == "latency-model" and raw["version"] == 1
    assert raw["threads"] == 1 and raw["device"] == "cpu" and raw["torch"] and raw["batch"] == 4
    back = load(out)
    assert set(back.entries) == set(model.entries)
    for key, per_target in back.entries.items():
        for target in ("train", "inference"):
            f = per_target[target]
            assert f.n_heldout >= 1 and np.isfinite(f.heldout_rel_rmse), (key, target)
            assert all(c >= 0 for c in f.coef)
    for target in ("train", "inference"):
        assert np.isfinite(raw["summary"][target]["heldout_rel_rmse_max"])
        # the file covers the network it was calibrated for: E[T] of the full network is positive
        assert float(ComplexityModel(spec, latency=back.costs(target)).latency()) > 0


def test_calibrate_cli_refuses_unknown_model_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "lat.json"
    assert main(["calibrate", "--model", "resnet_nope", "--out", str(out), "--quick"]) == 2
    assert "resnet_nope" in capsys.readouterr().err and not out.exists()


def test_fit_recovers_an_affine_law_and_reports_heldout_error() -> None:
    n_in, n_out = np.meshgrid([2, 4, 8, 6, 3], [1, 4, 16, 10, 5])
    n_in, n_out = n_in.ravel(), n_out.ravel()
    t = 1e-5 + 2e-8 * n_in * n_out + 3e-7 * n_out + 1e-7 * n_in
    held = (n_in == 6) | (n_out == 10)
    f = fit_affine(n_in, n_out, t, held)
    assert np.allclose(f.coef, (1e-5, 2e-8, 3e-7, 1e-7), rtol=1e-6)
    assert f.heldout_rel_rmse < 1e-8 and f.n_heldout == int(held.sum())
    noisy = fit_affine(n_in, n_out, t * (1 + 0.1 * np.sin(n_in * n_out)), held)
    assert noisy.heldout_rel_rmse > 1e-3  # the held-out error sees the misfit


def test_damaged_file_names_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "latency-model", "version": 1,
                               "entries": {"k": {"train": {"coef": [1, -2, 0, 0]}}}}))
    with pytest.raises(LatencyError, match=r"bad\.json.*entries\.k\.train\.coef"):
        load(bad)
    with pytest.raises(LatencyError, match="not found"):
        load(tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------------
# exact expectation, gradient, Theorem 3.1
# --------------------------------------------------------------------------------------------------


def _brute_force_latency(spec, costs: LatencyCosts, theta_B, theta_1, theta_2) -> float:
    """Σ_ξ P(ξ|Θ) T(ξ), T written out layer by layer for a residual MLP (independent of compile_terms)."""
    gates = [("B", l, 0) for l in range(len(spec.blocks))]
    gates += [("1", l, i) for l, b in enumerate(spec.blocks) for i in range(b.unit_widths[0])]
    gates += [("2", l, i) for l, b in enumerate(spec.blocks) for i in range(b.out_width)]
    probs = {("B", l, 0): theta_B[l] for l in range(len(spec.blocks))}
    probs.update({("1", l, i): theta_1[l][i] for _, l, i in [g for g in gates if g[0] == "1"]})
    probs.update({("2", l, i): theta_2[l][i] for _, l, i in [g for g in gates if g[0] == "2"]})
    total = 0.0
    for xi in itertools.product((0, 1), repeat=len(gates)):
        mask = dict(zip(gates, xi))
        p = float(np.prod([probs[g] if v else 1 - probs[g] for g, v in mask.items()]))
        T = 0.0
        n_prev = spec.input_shape[0]
        for l, b in enumerate(spec.blocks):
            xB = mask["B", l, 0]
            n_hidden = sum(mask["1", l, i] for i in range(b.unit_widths[0]))
            n_out = sum(mask["2", l, i] for i in range(b.out_width))
            for layer, (ni, no) in zip(b.path, [(n_prev, n_hidden), (n_hidden, n_out)]):
                a, bb, c, d = costs.layer(layer)
                T += xB * (a + bb * ni * no + c * no + d * ni)
            a, _, c, _ = costs.elementwise("add", b)
            T += xB * (a + c * n_out)
            if b.out_act:
                a, _, c, _ = costs.elementwise("act", b)
                T += a + c * n_out
            n_prev = n_out
        for layer in spec.head:
            a, bb, c, d = costs.layer(layer)
            T += a + bb * n_prev * layer.out_width + c * layer.out_width + d * n_prev
        total += p * T
    return total


def test_latency_expectation_equals_enumeration_over_all_masks() -> None:
    """Output gates θ_2 of block 0 are the input widths of block 1 (a shared stream): still exact."""
    spec = residual_mlp(2, [2, 1], 2, out_gated=True)
    costs = _random_costs(spec, 3)
    rng = np.random.default_rng(1)
    tB = rng.uniform(0, 1, 2)
    t1 = [rng.uniform(0, 1, b.unit_widths[0]) for b in spec.blocks]
    t2 = [rng.uniform(0, 1, b.out_width) for b in spec.blocks]
    gates = [BlockGates(np.array(tB[l]), (t1[l],), t2[l]) for l in range(2)]
    model = ComplexityModel(spec, latency=costs)
    exact = _brute_force_latency(spec, costs, tB, t1, t2)
    assert float(model.latency(gates)) == pytest.approx(exact, rel=1e-12)
    compiled = model.compile(None, "latency")
    assert float(compiled(gates)) == pytest.approx(exact, rel=1e-12)


def test_latency_gradient_matches_autograd_and_differences() -> None:
    torch = pytest.importorskip("torch")
    spec = resnet1d(stage_blocks=[1, 1], widths=[3, 4], length=6)
    costs = _random_costs(spec, 5)
    coeffs = latency_coefficients_for(spec, 0.3, 0.2, N=100, latency=costs)
    assert coeffs.alpha_f == coeffs.alpha_p == 0 and coeffs.alpha_t > 0
    assert coeffs.beta == pytest.approx(0.3 * 0.2 * 100)
    model = ComplexityModel(spec, latency=costs)
    rng = np.random.default_rng(2)
    np_gates = [BlockGates(np.array(rng.uniform()), tuple(rng.uniform(0, 1, n) for n in b.unit_widths), None)
                for b in spec.blocks]
    tg = [BlockGates(torch.tensor(g.theta_B, dtype=torch.float64, requires_grad=True),
                     tuple(torch.tensor(t, requires_grad=True) for t in g.theta_1), None) for g in np_gates]
    value = model.compile(coeffs, "complexity")(tg)
    value.backward()
    assert float(value.detach()) == pytest.approx(float(model.complexity(np_gates, coeffs)), rel=1e-12)
    grads = model.grad(np_gates, coeffs)
    h = 1e-6
    for l, (g, tgl, gr) in enumerate(zip(np_gates, tg, grads)):
        assert float(tgl.theta_B.grad) == pytest.approx(float(gr.theta_B), rel=1e-9)
        up = [BlockGates(np.array(x.theta_B + (h if k == l else 0)), x.theta_1, None) for k, x in enumerate(np_gates)]
        dn = [BlockGates(np.array(x.theta_B - (h if k == l else 0)), x.theta_1, None) for k, x in enumerate(np_gates)]
        fd = (model.complexity(up, coeffs, check=False) - model.complexity(dn, coeffs, check=False)) / (2 * h)
        assert float(gr.theta_B) == pytest.approx(float(fd), rel=1e-6)
        for j in range(len(g.theta_1)):
            assert np.allclose(tgl.theta_1[j].grad.numpy(), gr.theta_1[j], rtol=1e-9)


@pytest.mark.parametrize("run", [determinism.run_multilinear, determinism.run_affine, determinism.run_vertex_min,
                                 determinism.run_rounding])
def test_theorem_3_1_checks_hold_for_the_latency_cost(run) -> None:
    res = run(np.random.default_rng(11), 3, cost="latency", max_gates=5)
    assert res.failures == 0, res.details


def test_width_floor_breaks_the_affine_check() -> None:
    """The non-affine feature the model refuses: t ∝ max(n, n₀) on one gate is not affine in θ (negative control)."""
    def floor(theta):
        return 5.0 * np.maximum(theta[..., 0], 0.5)

    res = determinism.run_affine(np.random.default_rng(11), 3, cost="latency", max_gates=6, perturb=floor)
    assert res.failures > 0


# --------------------------------------------------------------------------------------------------
# configuration and training
# --------------------------------------------------------------------------------------------------


def test_config_latency_needs_an_existing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="objective.latency_model"):
        load_config(None, ["objective.cost=latency"])
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=r"objective.latency_model: .*missing\.json.*not found"):
        load_config(None, ["objective.cost=latency", f"objective.latency_model={missing}"])
    with pytest.raises(ConfigError, match="did you mean|objective.cost"):
        load_config(None, ["objective.cost=latncy"])


def test_tiny_train_with_latency_cost(tmp_path: Path) -> None:
    from pruning.train import Trainer

    spec = residual_mlp(64, [12, 12, 12], 10)
    costs = _random_costs(spec, 7)
    entries = {k: {"train": {"coef": list(v)}, "inference": {"coef": list(v)}} for k, v in costs.coef.items()}
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"format": "latency-model", "version": 1, "entries": entries}))
    cfg = load_config(None, [
        "data.name=digits", "data.options.flatten=true", "data.train_subset=96", "data.test_subset=32",
        "model.arch=residual_mlp", "model.kwargs.hidden=[12, 12, 12]", "model.theta_init=0.5",
        "objective.gamma=1.0", "objective.cost=latency", f"objective.latency_model={path}",
        "optim.theta.lr=0.1", "train.epochs=1", "train.batch_size=16", "train.prune_every=2",
        "train.device=cpu", "train.progress=false", "train.threads=1", "export.enabled=false",
        "train.tensorboard=false",
    ])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.objective.coeffs is not None and trainer.objective.coeffs.alpha_t > 0
    base_width = sum(w for b in trainer.baseline_spec.blocks for w in b.unit_widths)
    report = trainer.fit()
    assert report is not None and np.isfinite(report["test_accuracy"])
    assert sum(w for b in trainer.model.spec().blocks for w in b.unit_widths) < base_width  # the latency price prunes
    # a latency file calibrated for another network is refused, naming the field and the missing key
    other = {k: v for k, v in entries.items() if not k.startswith("linear")}
    path.write_text(json.dumps({"format": "latency-model", "version": 1, "entries": other}))
    with pytest.raises(ConfigError, match="objective.latency_model: .*no 'inference' entry"):
        Trainer(cfg, tmp_path / "run2")


def test_keys_are_stable() -> None:
    spec = resnet1d(stage_blocks=[1], widths=[4], length=8)
    assert layer_key(spec.blocks[0].path[0]) == "conv1d:k3:s1:out8:bn1:act1:bias0"
    assert elementwise_key("add", spec.blocks[0]) == "add:out8"
