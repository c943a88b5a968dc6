"""pruning.gates and the exact-difference estimator of GatedNetwork (THEORY §5)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pruning.gates import BlockGate, Gate, UnitGate, check_choice, fixed_gates
from pruning.models import build_model


def test_eval_mode_is_mean_field():
    g = UnitGate(3, theta_init=0.5)
    with torch.no_grad():
        g.theta.copy_(torch.tensor([0.2, 0.5, 0.9]))
    g.eval()
    h = torch.randn(4, 3, 5)
    assert torch.allclose(g(h), h * torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1))
    b = BlockGate(theta_init=0.3).eval()
    assert torch.allclose(b(h), 0.3 * h)


def test_train_mode_one_sample_per_forward_shared_by_batch():
    torch.manual_seed(0)
    g = UnitGate(16, theta_init=0.5).train()
    h = torch.ones(8, 16, 3)
    masks = []
    for _ in range(4):
        out = g(h)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(out, out[:1].expand_as(out))  # every example and position shares the sample
        assert torch.equal(out[0, :, 0], g.last_sample)
        masks.append(out[0, :, 0])
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # a fresh sample per forward pass


def test_straight_through_gradient_is_dloss_dxi_at_sample():
    torch.manual_seed(1)
    g = UnitGate(5, theta_init=0.6).train()
    h = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(5)
    loss = (g(h) * w).sum() ** 2
    loss.backward()
    xi = g.last_sample.clone().requires_grad_(True)
    ref = ((h * xi) * w).sum() ** 2
    (dxi,) = torch.autograd.grad(ref, xi)
    assert torch.allclose(g.theta.grad, dxi)


def test_exact_difference_forward_gives_theta_no_autograd_gradient():
    g = BlockGate(estimator="exact-difference", theta_init=0.5).train()
    x = torch.randn(3, requires_grad=True)
    g(x).sum().backward()
    assert g.theta.grad is None


def test_fix_overrides_sampling_and_mean_field():
    g = UnitGate(3, theta_init=0.5)
    h = torch.ones(2, 3)
    with fixed_gates([g], [torch.tensor([1.0, 0.0, 1.0])]):
        for mode in (True, False):
            g.train(mode)
            assert torch.equal(g(h)[0], torch.tensor([1.0, 0.0, 1.0]))
    assert g.fixed is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="estimator"):
        UnitGate(2, estimator="reinforce")
    with pytest.raises(ValueError, match="theta_init"):
        BlockGate(theta_init=1.2)
    with pytest.raises(ValueError, match="mode must be one of 'a', 'b'"):
        check_choice("mode", "c", ("a", "b"))


# ------------------------------------------------------------------------------------------------
# Exact-difference estimator: unbiased, checked by enumerating every gate sample exactly
# ------------------------------------------------------------------------------------------------


def _tiny_mlp(mode: str, out_gated: bool, m: int, hidden: list[int]) -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_model(
        "residual_mlp", mode=mode, in_features=m, hidden=hidden, num_classes=3, out_gated=out_gated,
        activation="tanh", estimator="exact-difference",
    ).double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.8 + 0.1)
    return model


@pytest.mark.parametrize(
    "mode,out_gated,m,hidden",
    [
        ("combined", True, 1, [1, 1]),
        ("combined", False, 2, [2, 1]),
        ("layer", False, 2, [2, 1]),
        ("unit", True, 1, [2, 1]),
    ],
)
def test_exact_difference_is_unbiased_by_enumeration(monkeypatch, mode, out_gated, m, hidden):
    model = _tiny_mlp(mode, out_gated, m, hidden).train()
    x = torch.randn(5, m, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 1, 0])
    loss_fn = torch.nn.functional.cross_entropy
    gates = model.gates()
    sizes = [g.theta.numel() for g in gates]
    K = sum(sizes)
    assert K <= 6

    # E(θ) = Σ_ξ P_θ(ξ) ℓ(ξ), differentiated by autograd through P_θ: the true ∂E/∂θ.
    thetas = [g.theta.detach().clone().requires_grad_(True) for g in gates]
    E = torch.zeros((), dtype=torch.float64)
    expected_estimate = {g: torch.zeros_like(g.theta) for g in gates}
    table: dict[Gate, torch.Tensor] = {}
    monkeypatch.setattr(Gate, "draw", lambda self: table[self].clone())
    for bits in itertools.product((0.0, 1.0), repeat=K):
        v = torch.tensor(bits, dtype=torch.float64)
        parts = list(torch.split(v, sizes))
        prob = torch.ones((), dtype=torch.float64)
        for t, part in zip(thetas, parts):
            prob = prob * torch.prod(t.reshape(-1) * part + (1 - t.reshape(-1)) * (1 - part))
        for g, part in zip(gates, parts):
            table[g] = part.reshape(g.theta.shape)
        with torch.no_grad(), fixed_gates(gates, [table[g] for g in gates]):
            loss = loss_fn(model(x), y)
        E = E + prob * loss
        est = model.exact_gate_grads(loss_fn, x, y)  # the estimator at this sample of Ξ
        for g in gates:
            expected_estimate[g] += prob.detach() * est[g.theta]
    true = torch.autograd.grad(E, thetas)
    for g, t in zip(gates, true):
        assert torch.allclose(expected_estimate[g], t, atol=1e-12, rtol=1e-9), (g, expected_estimate[g], t)


def test_exact_difference_restores_batchnorm_and_pins():
    torch.manual_seed(0)
    model = build_model(
        "resnet1d", stage_blocks=(1, 1), widths=(3, 4), length=8, num_classes=3, estimator="exact-difference",
        theta_init=0.5,
    ).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 1, 8), torch.randint(0, 3, (6,))
    grads = model.exact_gate_grads(torch.nn.functional.cross_entropy, x, y)
    assert {id(p) for p in grads} == {id(p) for p in model.gate_parameters()}
    for p in model.gate_parameters():
        assert grads[p].shape == p.shape and torch.isfinite(grads[p]).all()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(g.fixed is None for g in model.gates())


def test_exact_difference_deterministic_vertex():
    """With every other gate at 0/1 the estimate is the exact derivative, sample or not."""
    model = build_model("residual_mlp", in_features=3, hidden=[2], num_classes=2, estimator="exact-difference")
    model = model.double().train()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    bg, ug = model.gates()
    loss_fn = torch.nn.functional.cross_entropy
    est = model.exact_gate_grads(loss_fn, x, y)  # θ all 1: samples are all 1
    with torch.no_grad():
        full = loss_fn(model(x), y)
        with fixed_gates([bg], [0.0]):
            no_block = loss_fn(model(x), y)
        with fixed_gates([ug], [torch.tensor([0.0, 1.0])]):
            no_unit0 = loss_fn(model(x), y)
    assert torch.allclose(est[bg.theta], full - no_block)
    assert torch.allclose(est[ug.theta][0], full - no_unit0)


# ------------------------------------------------------------------------------------------------
# The sampling hot path: one straight-through node, one shared draw per forward pass
# ------------------------------------------------------------------------------------------------


def test_straight_through_node_equals_detach_formulation():
    from pruning.gates import StraightThrough

    theta = torch.tensor([0.2, 0.7, 0.5], requires_grad=True)
    xi = torch.tensor([0.0, 1.0, 1.0])
    w = torch.tensor([1.5, -2.0, 0.3])
    st = StraightThrough.apply(theta, xi)
    assert torch.equal(st, xi)  # exactly the sample, not θ + (ξ − θ) rounded
    (g1,) = torch.autograd.grad((st * w).sum() ** 2, theta)
    ref = theta + (xi - theta).detach()
    (g2,) = torch.autograd.grad((ref * w).sum() ** 2, theta)
    assert torch.allclose(g1, g2)


def test_shared_sample_equals_one_draw_per_gate_in_order():
    from pruning.gates import shared_sample

    gates = [UnitGate(5, theta_init=0.3), BlockGate(theta_init=0.6), UnitGate(3, theta_init=0.5),
             BlockGate(theta_init=0.9, estimator="exact-difference")]
    for g in gates:
        g.train()
    torch.manual_seed(11)
    separate = [g.draw() for g in gates]
    torch.manual_seed(11)
    with shared_sample(gates):
        used = [g.multiplier() for g in gates]
        assert all(g._presampled is None for g in gates)  # each share is used once
    for g, xi, m in zip(gates, separate, used):
        assert m.shape == g.theta.shape and torch.equal(m, xi) and torch.equal(g.last_sample, xi)
    assert used[1].requires_grad and not used[3].requires_grad  # straight-through vs exact-difference
    used[1].backward()
    assert float(gates[1].theta.grad) == 1.0
    assert all(g._presampled is None for g in gates)


def test_shared_sample_skips_fixed_and_eval_gates_and_clears_on_exit():
    from pruning.gates import shared_sample

    a, b, c = UnitGate(4, theta_init=0.5).train(), UnitGate(4, theta_init=0.5).eval(), BlockGate(theta_init=0.5)
    c.train()
    c.fix(1.0)
    with shared_sample([a, b, c]):
        assert a._presampled is not None and b._presampled is None and c._presampled is None
        assert torch.equal(b.multiplier(), b.theta) and float(c.multiplier()) == 1.0
    assert a._presampled is None  # unused share dropped: the next call draws afresh
    assert a.multiplier().shape == (4,)


def test_network_straight_through_gradient_is_dloss_dxi_at_the_shared_sample():
    """θ.grad of every gate of a network = ∂L/∂ξ at the sample the forward pass drew."""
    torch.manual_seed(2)
    model = build_model("resnet1d", stage_blocks=(1, 1), widths=(3, 4), length=8, num_classes=3,
                        theta_init=0.6).double().train()
    x, y = torch.randn(5, 1, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(model(x), y).backward()
    gates = model.gates()
    leaves = [g.last_sample.clone().requires_grad_(True) for g in gates]
    for g, leaf in zip(gates, leaves):
        g._fixed = leaf  # a pinned value that autograd can differentiate
    try:
        dxi = torch.autograd.grad(loss_fn(model(x), y), leaves)
    finally:
        for g in gates:
            g.fix(None)
    for g, d in zip(gates, dxi):
        assert torch.allclose(g.theta.grad, d, rtol=1e-10, atol=1e-12)
