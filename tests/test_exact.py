"""Exact mean dynamics of a real gated network (pruning/exact.py) and the ODE-vs-SGD experiment.

* the exact ``J`` of :class:`theory.objective.ExactObjective` is the ``P(ξ|Θ)``-weighted average of
  the torch model's forward losses over all ``2^K`` forced gate masks (plus the same ``C/N`` and
  weight decay as the trainer's :class:`pruning.objective.Objective`), for both losses;
* its autograd gradient equals the expectation of the trainer's stochastic gradients (exact
  enumeration of the gate sample): exact-difference estimator for ``Θ``, back-propagation through
  the sampled network for ``W``; and central finite differences;
* the projected field [22] is zero at a face the unprojected velocity points out of, unchanged at
  the opposite face;
* a tiny ``experiments/ode_vs_sgd.py`` run returns the record structure, and the deviation shrinks
  with the step.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pruning.exact import (
    ExactDynamics,
    StateLayout,
    load_state,
    masks_as_gate_values,
    state_from_model,
    state_reader,
    torch_loss,
    weights_of,
)
from pruning.gates import fixed_gates
from pruning.models import build_model
from pruning.objective import Objective

ROOT = Path(__file__).resolve().parents[1]


def _experiment():
    name = "ode_vs_sgd_experiment"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "ode_vs_sgd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _setup(loss: str = "cross_entropy", *, gamma: float = 0.4, theta: np.ndarray | None = None, seed: int = 0,
           elementwise: bool = False):
    """A 2-block × 2-unit tanh residual MLP (6 gates), 20 samples, random θ in (0, 1), float64."""
    torch.manual_seed(seed)
    m, c, N = 3, 3, 20
    model = build_model("residual_mlp", in_features=m, hidden=[2, 2], num_classes=c, mode="combined",
                        estimator="exact-difference", theta_init=0.5, activation="tanh").double()
    with torch.no_grad():
        for w in model.weight_parameters():
            w.mul_(2.0)
        for q in model.gate_parameters():
            q.copy_(torch.rand(q.shape, dtype=torch.float64) * 0.8 + 0.1)
    X = torch.randn(N, m, dtype=torch.float64)
    Y = torch.randint(0, c, (N,)) if loss == "cross_entropy" else torch.randn(N, c, dtype=torch.float64)
    obj = Objective(model.spec(), N=N, gamma=gamma, rho=0.6, delta=0.2, lam=2.0, elementwise=elementwise,
                    loss=torch_loss(loss))
    dyn = ExactDynamics(model, X, Y, obj, loss=loss)
    y = state_from_model(model)
    if theta is not None:
        y[dyn.theta_slice] = theta
        load_state(model, y)
    return model, obj, dyn, X, Y, y


# --------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------


def test_state_roundtrip_and_layout():
    model, _, dyn, *_ , y = _setup()
    assert dyn.K == 6 and dyn.D == y.shape[0] and dyn.theta_slice == slice(dyn.D - 6, dyn.D)
    assert dyn.gate_layout.names[0] == "theta_B[0]" and dyn.gate_layout.names[3] == "theta_B[1]"
    np.testing.assert_array_equal(state_reader(model)(), y)
    z = y + np.linspace(0.0, 0.01, y.size)
    load_state(model, z)
    np.testing.assert_array_equal(state_from_model(model), z)
    w, th = dyn.layout.unflatten(z)
    np.testing.assert_array_equal(StateLayout.of(w, 6).flatten(w, th), z)
    np.testing.assert_array_equal(th.numpy(), torch.cat([q.detach().reshape(-1) for q in model.gate_parameters()]))
    with pytest.raises(ValueError, match="shape"):
        dyn.layout.unflatten(z[:-1])


def test_rejects_unsupported_models():
    relu = build_model("residual_mlp", in_features=3, hidden=[2], num_classes=2, mode="combined",
                       estimator="exact-difference").double()
    obj = Objective(relu.spec(), N=4, gamma=0.1, rho=0.5, delta=0.0, lam=0.0, elementwise=False)
    with pytest.raises(ValueError, match="tanh"):
        ExactDynamics(relu, np.zeros((4, 3)), np.zeros(4, dtype=int), obj)
    model, *_ = _setup()
    with pytest.raises(ValueError, match="objective.N"):
        ExactDynamics(model, np.zeros((5, 3)), np.zeros(5, dtype=int), Objective(
            model.spec(), N=4, gamma=0.1, rho=0.5, delta=0.0, lam=0.0))


# --------------------------------------------------------------------------------------------------
# J: exact expectation = mask average of the model's losses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "elementwise"), [("cross_entropy", False), ("squared", True)])
def test_exact_J_is_mask_average_of_model_losses(loss, elementwise):
    model, obj, dyn, X, Y, y = _setup(loss, elementwise=elementwise)
    masks = dyn.exact.masks
    assert masks.shape == (64, 6)
    model.train()  # a fixed gate is honoured in train and eval mode alike
    per_mask = []
    with torch.no_grad():
        for mask in masks:
            with fixed_gates(model.gates(), masks_as_gate_values(model, mask)):
                per_mask.append(float(obj.loss(model(X), Y)))
    per_mask = np.array(per_mask)
    np.testing.assert_allclose(per_mask, dyn.mask_sample_losses(y).mean(1), rtol=0, atol=1e-12)
    P = dyn.mask_probabilities(y)
    theta = y[dyn.theta_slice]
    P_direct = np.prod(np.where(masks == 1, theta, 1 - theta), axis=1)
    np.testing.assert_allclose(P, P_direct, rtol=1e-12)
    # the trainer's J for one forward pass = that mask's loss + C/N + weight decay; average over masks
    with torch.no_grad(), fixed_gates(model.gates(), masks_as_gate_values(model, masks[0])):
        terms = obj(model, model(X), Y)
    J_model = P @ per_mask + float(terms.complexity) + float(terms.weight)
    assert dyn.value(y) == pytest.approx(J_model, rel=1e-12)
    J_exact = float(dyn.exact.evaluate(weights_of(model), theta).L.detach()) / dyn.N
    assert dyn.value(y) == pytest.approx(J_exact, rel=1e-13)


# --------------------------------------------------------------------------------------------------
# ∇J: autograd = expectation of the stochastic gradients = finite differences
# --------------------------------------------------------------------------------------------------


def test_gradient_equals_expected_stochastic_gradients():
    model, obj, dyn, X, Y, y = _setup("cross_entropy")
    _, grad = dyn.value_and_grad(y)
    masks, P = dyn.exact.masks, dyn.mask_probabilities(y)
    gates, params = model.gates(), model.gate_parameters()
    weights = model.weight_parameters()
    exp_theta = np.zeros(dyn.K)
    exp_w = [torch.zeros_like(w) for w in weights]
    model.train()
    try:
        for mask, p in zip(masks, P):
            values = masks_as_gate_values(model, mask)
            for g, v in zip(gates, values):  # the estimator's gate sample Ξ = this mask
                g.draw = (lambda v=v: v.clone())
            est = model.exact_gate_grads(obj.loss, X, Y)
            exp_theta += p * torch.cat([est[q].reshape(-1) for q in params]).numpy()
            with fixed_gates(gates, values):
                gw = torch.autograd.grad(obj.loss(model(X), Y), weights)
            for acc, g in zip(exp_w, gw):
                acc += p * g
    finally:
        for g in gates:
            del g.draw
    cgrads = torch.autograd.grad(obj.complexity(model) / obj.N, params)  # ∇C/N, as the trainer's backward gives it
    exp_theta += torch.cat([g.reshape(-1) for g in cgrads]).double().numpy()
    np.testing.assert_allclose(grad[dyn.theta_slice], exp_theta, rtol=1e-6, atol=1e-9)
    holder = copy.deepcopy(model)  # lay the expected weight gradients out like the state vector
    with torch.no_grad():
        for w, g in zip(holder.weight_parameters(), exp_w):
            w.copy_(g)
    expected_w = state_from_model(holder)[dyn.weight_slice] + obj.weight_decay * y[dyn.weight_slice]
    np.testing.assert_allclose(grad[dyn.weight_slice], expected_w, rtol=1e-9, atol=1e-12)


def test_gradient_matches_finite_differences():
    _, _, dyn, *_, y = _setup("squared")
    grad = dyn.grad(y)
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(dyn.theta_slice.start, 8, replace=False), np.arange(dyn.D - 6, dyn.D)])
    h = 1e-6
    for i in idx:
        e = np.zeros(dyn.D)
        e[i] = h
        fd = (dyn.value(y + e) - dyn.value(y - e)) / (2 * h)
        assert fd == pytest.approx(grad[i], rel=1e-6, abs=1e-8)


# --------------------------------------------------------------------------------------------------
# the projected field [22] at the faces of H
# --------------------------------------------------------------------------------------------------


def test_projected_field_at_faces():
    _, _, dyn, *_, y = _setup("cross_entropy", gamma=0.3)
    v_in = dyn.velocity(y)
    np.testing.assert_array_equal(dyn.fun(0.0, y), v_in)
    np.testing.assert_array_equal(dyn.projected_velocity(y), v_in)  # interior: unprojected
    for j in range(dyn.K):
        i = dyn.theta_slice.start + j
        for face in (0.0, 1.0):
            z = y.copy()
            z[i] = face
            v = dyn.velocity(z)
            # J is multilinear in Θ: ∂J/∂θ_j does not depend on θ_j
            assert v[i] == pytest.approx(v_in[i], rel=1e-10, abs=1e-13)
            pv = dyn.projected_velocity(z)
            outward = (face == 0.0 and v[i] < 0) or (face == 1.0 and v[i] > 0)
            assert pv[i] == (0.0 if outward else v[i])
            mask = np.ones(dyn.D, bool)
            mask[i] = False
            np.testing.assert_array_equal(pv[mask], v[mask])
    # a θ whose gradient is positive at θ = 0 stays at 0 (the unprojected velocity would leave H)
    g = -v_in[dyn.theta_slice]
    j = int(np.argmax(g))
    assert g[j] > 0
    z = y.copy()
    z[dyn.theta_slice.start + j] = 0.0
    assert dyn.velocity(z)[dyn.theta_slice.start + j] < 0
    assert dyn.projected_velocity(z)[dyn.theta_slice.start + j] == 0.0
    # a state an integrator left a rounding error outside H is evaluated on the face
    z[dyn.theta_slice.start + j] = -1e-12
    assert np.isfinite(dyn.projected_velocity(z)).all()
    assert dyn.projected_velocity(z)[dyn.theta_slice.start + j] == 0.0


# --------------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------------


def test_ode_vs_sgd_tiny_run(tmp_path):
    E = _experiment()
    problem = replace(E.Problem(), n_samples=24, batch_size=6)
    res = E.compare(problem, steps=[2e-2, 1.25e-3], horizon=0.2, seeds=3, estimators=["exact-difference"])
    d = res.to_dict()
    assert d["steps"] == [2e-2, 1.25e-3] and d["estimators"] == ["exact-difference"]
    recs = d["records"]
    assert [r["eta"] for r in recs] == [2e-2, 1.25e-3]
    for r in recs:
        for key in ("eta", "estimator", "n_iter", "sup_dev_theta_mean", "sup_dev_theta_sd", "sup_dev_w_mean",
                    "sup_dev_w_sd", "sup_dev_theta", "sup_dev_w"):
            assert key in r
        assert len(r["sup_dev_theta"]) == 3 and r["sup_dev_theta_mean"] > 0
    assert recs[0]["n_iter"] == 10 and recs[1]["n_iter"] == 160
    # stochastic approximation: the deviation shrinks with the step (∝ √η: a factor ≈ 4 here; 0.18–0.58 observed
    # over init seeds 1–5)
    assert recs[1]["sup_dev_theta_mean"] < 0.7 * recs[0]["sup_dev_theta_mean"]
    assert recs[1]["sup_dev_w_mean"] < 0.7 * recs[0]["sup_dev_w_mean"]
    assert d["monotone_shrinking"] == {"exact-difference": True}
    assert set(d["summary"]["exact-difference"]) >= {"monotone_shrinking", "bias_theta", "shrink_factor_theta"}
    js, npz = E.save(res, tmp_path)
    assert json.loads(js.read_text())["records"][0]["eta"] == 2e-2
    with np.load(npz) as z:
        assert z["ode_theta"].shape[1] == 6
        assert z["sgd_theta|exact-difference|0.02|0"].shape == (11, 6)
