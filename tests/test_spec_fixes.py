"""Spec loose ends: an ungated block round-trips, c_g is charged only for an applied g, and the constant a
dead path drops is the one its BatchNorms really output (first inner layer of a bottleneck included)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pruning.compaction import prune
from pruning.models import build_model, from_spec
from pruning.objective import Objective
from theory.architectures import residual_mlp, resnet_cifar
from theory.complexity import ComplexityModel, coefficients_for, ones_gates
from theory.objective import ExactObjective


def _with_ungated(spec, which=(1,)):
    blocks = tuple(dataclasses.replace(b, gated=False) if i in which else b for i, b in enumerate(spec.blocks))
    return dataclasses.replace(spec, blocks=blocks)


@pytest.mark.parametrize("mode", ["combined", "layer", "unit", "none"])
def test_an_ungated_block_round_trips_through_from_spec(mode: str) -> None:
    spec = _with_ungated(resnet_cifar(20, width=4, image_size=8), which=(0, 4))
    model = from_spec(spec, mode=mode, estimator="straight-through", theta_init=1.0)
    assert model.spec() == spec
    assert model.spec().prunable_blocks == spec.prunable_blocks == 7
    assert model.blocks[0].block_gate is None and model.blocks[0].spec().gated is False


def test_the_baseline_taken_from_the_model_charges_beta_only_for_gated_blocks() -> None:
    spec = _with_ungated(residual_mlp(3, [2, 2, 2], 2), which=(1,))
    model = from_spec(spec, mode="combined", estimator="straight-through", theta_init=1.0)
    obj = Objective(model.spec(), N=10, gamma=0.5, rho=0.5, delta=1.0, lam=0.0)  # what the trainer does
    ref = coefficients_for(spec, 0.5, 0.5, 1.0, N=10, elementwise=True)
    assert obj.coeffs == ref  # L_b = 2 in [13], not 3
    c = float(obj.complexity(model).detach())
    want = float(ComplexityModel(spec, elementwise=True).complexity(ones_gates(spec), ref))
    assert c == pytest.approx(want, rel=1e-6)
    assert c != pytest.approx(want + ref.beta, rel=1e-6)  # β not charged for the ungated block


def test_identity_output_activation_is_not_charged_c_g() -> None:
    spec = residual_mlp(3, [2, 3], 2)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    coeffs = coefficients_for(spec, 0.3, 1.0, 0.2, N=4, elementwise=True)
    theta = rng.uniform(0.2, 1.0, ExactObjective(spec, X, Y, coeffs=coeffs).K)
    ident = ExactObjective(spec, X, Y, g="identity", coeffs=coeffs, elementwise=True)
    tanh = ExactObjective(spec, X, Y, g="tanh", coeffs=coeffs, elementwise=True)
    no_g = dataclasses.replace(spec, blocks=tuple(dataclasses.replace(b, out_act=False) for b in spec.blocks))
    gates = ident.layout.unflatten(theta)
    want = float(ComplexityModel(no_g, elementwise=True).complexity(gates, coeffs))
    assert float(ident.complexity(theta)) == pytest.approx(want, rel=1e-12)
    # the c_g terms: α_f · positions · |θ_2|₁ per block (no output gates: the fixed width m = 3)
    c_g = coeffs.alpha_f * sum(b.positions * b.out_width for b in spec.blocks)
    assert float(tanh.complexity(theta)) - float(ident.complexity(theta)) == pytest.approx(c_g, rel=1e-9)
    # without the element-wise terms g costs nothing either way
    a = ExactObjective(spec, X, Y, g="identity", coeffs=coeffs).complexity(theta)
    b = ExactObjective(spec, X, Y, g="tanh", coeffs=coeffs).complexity(theta)
    assert float(a) == float(b)


def _bottleneck_model(seed: int):
    torch.manual_seed(seed)
    model = build_model("resnet50", num_classes=4, image_size=32)
    with torch.no_grad():  # non-trivial BN statistics and affine pairs
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _measured_constant(block, dead: int) -> torch.Tensor:
    """The block's path output in eval mode with inner layer ``dead`` switched off, for a random input.

    Mean-field gates elsewhere, ξ_B excluded; returns the per-channel value after checking that it is the
    same at every position and for every input (a constant).
    """
    block.eval()
    gates = block.unit_gates()
    gates[dead].fix(0.0)
    try:
        with torch.no_grad():
            x = torch.randn(2, block.in_width, 8, 8)
            h = x
            for layer in block.layers():
                h = layer(h)
    finally:
        gates[dead].fix(None)
    flat = h.permute(1, 0, 2, 3).reshape(h.shape[1], -1)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat), atol=1e-4), "the dead path's output is not constant"
    return flat[:, 0].double()


@pytest.mark.parametrize("dead", [0, 1])
def test_bn_shift_norm_is_the_constant_a_dead_bottleneck_layer_leaves(dead: int) -> None:
    model = _bottleneck_model(seed=3 + dead)
    l = 1
    block = model.blocks[l]
    const = _measured_constant(block, dead)
    bn = block.layers()[-1].bn
    last_shift = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        block.unit_gates()[dead].theta.fill_(0.05)  # all units of inner layer `dead` below ε
    event = prune(model, 0.1, [])
    (rec,) = [b for b in event.blocks if b.block == l]
    assert rec.reason == "units"
    assert rec.bn_shift_norm == pytest.approx(float(const.norm()), rel=1e-6)
    assert model.blocks[l].path is None  # the block was removed
    # the last inner layer dead: the constant is the last BN's shift; the first: the shift alone misses γ W̄ h / σ
    same = float(last_shift.detach().double().norm()) == pytest.approx(rec.bn_shift_norm, rel=1e-6)
    assert same == (dead == 1)
