"""The leaner training step: per-structure caches, the foreach projection, the vectorised audit observation,
in-place activations and ``train.channels_last = "auto"``."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.audit import PruningAudit
from pruning.compaction import prune
from pruning.config import ConfigError, load_config
from pruning.models import GatedNetwork, build_model
from pruning.objective import Objective
from pruning.runtime import resolve_channels_last
from theory.projection import project, project_


def tiny_cifar(mode: str = "combined", seed: int = 0) -> GatedNetwork:
    torch.manual_seed(seed)
    return build_model("resnet20", mode=mode, num_classes=3, width=4, image_size=8)


def fresh_lists(model: GatedNetwork) -> tuple[list[int], list[int], list[int]]:
    """ids of gates, θ and weight parameters computed from scratch (no cache)."""
    gates = [m for m in model.modules() if m.__class__.__name__ in ("UnitGate", "BlockGate")]
    thetas = {id(g.theta) for g in gates}
    weights = [id(p) for p in model.parameters() if id(p) not in thetas]
    return sorted(id(g) for g in gates), sorted(thetas), weights


def cached_lists(model: GatedNetwork) -> tuple[list[int], list[int], list[int]]:
    return (sorted(id(g) for g in model.gates()), sorted(id(p) for p in model.gate_parameters()),
            [id(p) for p in model.weight_parameters()])


# --------------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------------


def test_cached_lists_follow_compaction_and_edits() -> None:
    model = tiny_cifar()
    assert cached_lists(model) == fresh_lists(model)
    before = cached_lists(model)
    with torch.no_grad():  # half the units of every gated layer and one block below ε
        for block in model.block_list()[:2]:
            block.unit_gates()[0].theta[:2] = 0.0
        model.block_list()[3].block_gate.theta.fill_(0.0)
    prune(model, 0.1)
    after = cached_lists(model)
    assert after != before and after == fresh_lists(model)
    assert len(model.block_gates()) == len(model.spec().blocks)
    assert model.block_gates()[3].theta_B is None  # the pruned block
    # a direct module edit (what export does): the registration hook invalidates the cache
    model.block_list()[0].path[0].gate = None
    assert cached_lists(model) == fresh_lists(model)
    # a raw dictionary edit is invisible to torch's hooks: structure_changed() says so
    model.block_list()[1].path[0]._modules["gate"] = None
    model.structure_changed()
    assert cached_lists(model) == fresh_lists(model)


def test_cached_lists_are_per_copy_and_fresh_lists() -> None:
    model = tiny_cifar()
    model.gates()  # fill the cache
    twin = copy.deepcopy(model)
    assert cached_lists(twin) == fresh_lists(twin)
    assert not set(cached_lists(twin)[1]) & set(cached_lists(model)[1])
    out = model.weight_parameters()
    out.clear()  # a caller's list is its own
    assert len(model.weight_parameters()) == len(fresh_lists(model)[2])


# --------------------------------------------------------------------------------------------------
# projection
# --------------------------------------------------------------------------------------------------

values = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(values, min_size=1, max_size=6), min_size=1, max_size=4))
def test_foreach_projection_equals_clip(data: list[list[float]]) -> None:
    tensors = [torch.tensor(v, dtype=torch.float32) for v in data]
    expected = [project(t.clone()) for t in tensors]
    project_(tensors)
    for t, e in zip(tensors, expected):
        assert torch.equal(t.isnan(), e.isnan())
        assert torch.equal(t.nan_to_num(7.0), e.nan_to_num(7.0))
    arrays = [np.array(v, dtype=np.float64) for v in data]
    expected_np = [project(a.copy()) for a in arrays]
    project_(arrays)
    for a, e in zip(arrays, expected_np):
        np.testing.assert_array_equal(a, e)


def test_step_projects_every_theta() -> None:
    from pruning.config import RunConfig
    from pruning.optim import make_optimizers
    from pruning.step import algorithm1_step

    model = tiny_cifar()
    obj = Objective(model.spec(), N=10, gamma=50.0, rho=0.5, delta=0.5, lam=1.0)
    opt_w, opt_t = make_optimizers(RunConfig(), model.weight_parameters(), model.gate_parameters())
    for g in opt_t.param_groups:
        g["lr"] = 0.8  # large steps push θ past both faces
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    with torch.no_grad():
        for q in model.gate_parameters():
            q.uniform_(0.0, 1.0)
    algorithm1_step(model, obj, x, y, opt_w, opt_t, spec=model.spec())
    thetas = torch.cat([q.detach().reshape(-1) for q in model.gate_parameters()])
    assert float(thetas.min()) >= 0.0 and float(thetas.max()) <= 1.0
    assert bool(((thetas == 0.0) | (thetas == 1.0)).any())  # some hit a face and stayed exactly on it


# --------------------------------------------------------------------------------------------------
# audit: the vectorised observation against a per-unit loop
# --------------------------------------------------------------------------------------------------


def reference_ratios(audit: PruningAudit, model: GatedNetwork) -> dict[int, list[float]]:
    """The four Lemma-1 ratios of every block, unit by unit in plain Python loops (the definition)."""
    spec = model.spec()
    gB, g1 = audit.gammas(model, spec)
    wd = audit.objective.weight_decay
    out = {}
    for bg, params, units in audit._plan(model, spec):
        theta_B = float(bg.gate.theta.detach()) if bg.gate is not None else 1.0
        xi_B = float(bg.gate.last_sample) if bg.gate is not None else 1.0
        r = [-math.inf] * 4
        W_sq = sum(float((p.detach().double() ** 2).sum()) for p in params)
        if bg.gate is not None and bg.gate.theta.grad is not None and W_sq > 1e-12:
            r[3] = abs(float(bg.gate.theta.grad) - gB[bg.block]) / (0.5 * W_sq)
        for ug, fan_in, Q in units:
            n = ug.gate.theta.shape[0]
            for i in range(n):
                w = math.sqrt(sum(float((p.detach().double().reshape(n, -1)[i] ** 2).sum()) for p in fan_in))
                h = math.sqrt(sum(float(((p.grad.double() - wd * p.detach().double()).reshape(n, -1)[i] ** 2).sum())
                                  for p in fan_in))
                v = float(Q.detach().double().transpose(0, 1).reshape(n, -1)[i].norm())
                k = float((Q.grad.double() - wd * Q.detach().double()).transpose(0, 1).reshape(n, -1)[i].norm())
                gi = float(ug.gate.theta.grad[i]) - theta_B * g1[bg.block][ug.layer]
                on = float(ug.gate.last_sample[i]) * xi_B > 0.5
                if xi_B > 0.5 and w * v > 1e-12:
                    r[0] = max(r[0], abs(gi) / (w * v))
                if on and v > 1e-12:
                    r[1] = max(r[1], h / v)
                if on and w > 1e-12:
                    r[2] = max(r[2], k / w)
        out[bg.block] = [x if x > -math.inf else math.nan for x in r]
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_vectorised_observe_matches_the_unit_loop(channels_last: bool) -> None:
    model = tiny_cifar(seed=3)
    with torch.no_grad():
        for q in model.gate_parameters():
            q.uniform_(0.3, 1.0)
    model.block_list()[2].remove_path()  # a pruned block: no row for it
    if channels_last:
        model.to(memory_format=torch.channels_last)
    obj = Objective(model.spec(), N=20, gamma=0.5, rho=0.5, delta=0.5, lam=2.0)
    audit = PruningAudit(obj, eps=0.1, estimator="straight-through", window=10, every=1)
    model.train()
    x = torch.randn(6, 3, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    terms = obj(model, model(x), torch.randint(0, 3, (6,)))
    terms.total.backward()
    audit.observe(model, model.spec())
    ref = reference_ratios(audit, model)
    assert set(audit._ratios) == set(ref) and 2 not in ref
    for block, row in ref.items():
        got = audit._ratios[block][-1]
        for a, b in zip(got, row):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4), (block, got, row)
    assert any(not math.isnan(v) for row in ref.values() for v in row)


# --------------------------------------------------------------------------------------------------
# in-place activations
# --------------------------------------------------------------------------------------------------


def test_inplace_relu_same_values_and_gradients_also_with_pruned_blocks() -> None:
    model = tiny_cifar(seed=1)
    model.block_list()[1].remove_path()  # identity shortcut + ReLU: the block must not write into its input
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.modules())
    x = torch.randn(5, 3, 8, 8)
    results = []
    for net in (model, ref):
        net.train()
        torch.manual_seed(4)
        out = net(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# --------------------------------------------------------------------------------------------------
# channels_last
# --------------------------------------------------------------------------------------------------


def test_channels_last_auto_rule_and_validation() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    conv2d = tiny_cifar().spec()
    conv1d = build_model("resnet1d", num_classes=3, length=16, in_channels=1, widths=[4, 4, 4],
                         stage_blocks=[1, 1, 1]).spec()
    assert resolve_channels_last("auto", cpu, conv2d) is True
    assert resolve_channels_last("auto", cpu, conv1d) is False
    assert resolve_channels_last("auto", cuda, conv2d) is False
    projection = build_model("resnet18", num_classes=3, image_size=16, width=4).spec()  # 1×1 stride-2 shortcuts
    assert resolve_channels_last("auto", cpu, projection) is False
    assert resolve_channels_last(True, cpu, conv1d) is True and resolve_channels_last(False, cpu, conv2d) is False
    assert load_config(None).train.channels_last == "auto"
    assert load_config(None, ["train.channels_last=true"]).train.channels_last is True
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, ["train.channels_last=yes"])
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, ["train.channels_last=1"])


def test_deferred_weight_gradient_equals_autograd() -> None:
    model = tiny_cifar(seed=2)
    obj = Objective(model.spec(), N=8, gamma=0.5, rho=0.5, delta=0.5, lam=3.0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    grads = []
    for deferred in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        terms = obj(model, model(x), y, weight_grad=not deferred)
        terms.total.backward()
        if deferred:
            obj.add_weight_grad(model.weight_parameters())
        grads.append((float(terms.total), [p.grad.clone() for p in model.parameters()]))
    (j1, g1), (j2, g2) = grads
    assert j1 == j2
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)  # the same sum, rounded once differently
    assert obj.weight_decay > 0
