"""pruning.compaction: physical removal equals zeroing the removed θ; optimiser state carried over."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pruning.compaction import dependency_groups, prune
from pruning.models import build_model
from theory.complexity import Coefficients, ComplexityModel

EPS = 0.1

ARCHES = {
    "mlp": (dict(arch="residual_mlp", in_features=3, hidden=[4, 2, 3], activation="tanh"), (3,)),
    "mlp_out": (dict(arch="residual_mlp", in_features=3, hidden=[3, 2], out_gated=True), (3,)),
    "r1d": (dict(arch="resnet1d", stage_blocks=(2, 1), widths=(3, 4), length=6, in_channels=2), (2, 6)),
    "r20": (dict(arch="resnet20", width=2, image_size=6), (3, 6, 6)),
}


def _make(name: str, mode: str, seed: int):
    kw, shape = ARCHES[name]
    torch.manual_seed(seed)
    model = build_model(mode=mode, num_classes=3, **kw)
    with torch.no_grad():  # non-trivial BN statistics and affine pairs
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model, shape


@st.composite
def scenario(draw):
    name = draw(st.sampled_from(sorted(ARCHES)))
    mode = draw(st.sampled_from(["combined", "layer", "unit"]))
    seed = draw(st.integers(0, 2**16))
    model, shape = _make(name, mode, seed)
    values = []
    for p in model.gate_parameters():
        n = p.numel()
        below = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        vals = [draw(st.floats(0.0, EPS * 0.999)) if b else draw(st.floats(EPS, 1.0)) for b in below]
        values.append(torch.tensor(vals, dtype=torch.float32).reshape(p.shape))
    with torch.no_grad():
        for p, v in zip(model.gate_parameters(), values):
            p.copy_(v)
    return name, mode, model, shape


def _reference(model):
    """The uncompacted model with the structures the ε rule removes switched off by their θ."""
    ref = copy.deepcopy(model)
    expected_widths = []
    with torch.no_grad():
        for group in dependency_groups(ref):
            block = group.module
            thetas = [None if u.gate is None else u.gate.theta for u in group.units]
            dead = (group.gate is not None and float(group.gate.theta) < EPS) or any(
                t is not None and bool((t < EPS).all()) for t in thetas
            )
            if dead:
                if group.gate is not None:
                    group.gate.theta.zero_()
                else:  # unit mode: no θ_B; switch the branch off at its last layer instead
                    last = list(block.path)[-1]
                    if last.bn is not None:
                        last.bn.weight.zero_()
                        last.bn.bias.zero_()
                    else:
                        last.op.weight.zero_()
                expected_widths.append(())
                continue
            widths = []
            for u, t in zip(group.units, thetas):
                if t is not None:
                    t[t < EPS] = 0.0
                    widths.append(int((t >= EPS).sum()))
                else:
                    widths.append(u.width)
            expected_widths.append(tuple(widths))
    return ref, expected_widths


def _optimizers(model):
    sgd = torch.optim.SGD(model.weight_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    adam = torch.optim.Adam(model.gate_parameters(), lr=1e-3) if model.gate_parameters() else None
    return [o for o in (sgd, adam) if o is not None]


def _train_step(model, optimizers, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, *shape, generator=g), torch.randint(0, 3, (4,), generator=g)
    model.train()
    for o in optimizers:
        o.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for o in optimizers:
        o.step()
    return loss


@given(scenario())
def test_prune_equals_zeroed_thetas(sc):
    name, mode, model, shape = sc
    ref, expected_widths = _reference(model)
    before = model.spec()
    event = prune(model, EPS)
    after = model.spec()
    assert event.spec_before == before and event.spec_after == after
    # spec widths shrink exactly as the ε rule says; removed blocks keep their shortcut
    alive_before = [l for l, b in enumerate(before.blocks) if b.alive]
    for l, widths in zip(alive_before, expected_widths):
        block = after.blocks[l]
        assert block.unit_widths == widths if widths else not block.alive
        assert block.shortcut == before.blocks[l].shortcut
    assert {b.block for b in event.blocks} == {l for l, w in zip(alive_before, expected_widths) if not w}
    # a surviving gated layer never has zero units; the complexity model accepts the new gates
    assert all(n >= 1 for b in after.blocks for n in b.unit_widths)
    ComplexityModel(after).complexity(model.block_gates(), Coefficients(1e-3, 1e-3, 0.1))
    assert ComplexityModel(after).params() == sum(p.numel() for p in model.weight_parameters())
    # eval-mode (mean-field) outputs equal the reference with removed structures' θ set to 0
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5, rtol=1e-5)
    # every remaining gate is >= ε (pruning is idempotent)
    assert prune(model, EPS).empty


@given(scenario())
def test_optimizer_state_carried_over_and_training_continues(sc):
    name, mode, model, shape = sc
    optimizers = _optimizers(model)
    with torch.no_grad():
        thetas = [p.clone() for p in model.gate_parameters()]
    _train_step(model, optimizers, shape)
    with torch.no_grad():  # restore the drawn θ after the step so that the ε rule acts as drawn
        for p, t in zip(model.gate_parameters(), thetas):
            p.copy_(t)
    names = {id(p): n for n, p in model.named_parameters()}
    old_state = {
        names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for o in optimizers
        for p, s in o.state.items()
    }
    keeps: dict[str, dict[int, torch.Tensor]] = {}  # parameter name -> {dim: surviving indices}
    for bg in dependency_groups(model):
        for u in bg.units:
            if u.gate is not None:
                keep = (u.gate.theta >= EPS).nonzero().flatten()
                for dep in u.deps:
                    keeps.setdefault(dep.label, {})[dep.dim] = keep
    event = prune(model, EPS, optimizers)
    dropped = {n for n in old_state if any(n.startswith(f"blocks.{b.block}.") for b in event.blocks)}
    dropped = {n for n in dropped if ".path." in n or ".block_gate." in n}
    # param_groups hold exactly the model's parameters, in order
    assert [id(p) for p in optimizers[0].param_groups[0]["params"]] == [id(p) for p in model.weight_parameters()]
    if len(optimizers) > 1:
        assert [id(p) for p in optimizers[1].param_groups[0]["params"]] == [id(p) for p in model.gate_parameters()]
    new_names = {id(p): n for n, p in model.named_parameters()}
    new_state = {new_names[id(p)]: s for o in optimizers for p, s in o.state.items()}
    assert set(new_state) == set(old_state) - dropped  # survivors keep their state, the dropped leave none
    for n, s in new_state.items():
        for k, v in s.items():
            expected = old_state[n][k]
            if torch.is_tensor(v) and k != "step":
                for dim, idx in sorted(keeps.get(n, {}).items()):
                    expected = expected.index_select(dim, idx)
            assert torch.equal(v, expected) if torch.is_tensor(v) else v == expected, (n, k)
    # a train step runs on the compacted network, with the carried state
    loss = _train_step(model, optimizers, shape, seed=1)
    assert torch.isfinite(loss)


def test_bottleneck_coupled_dims_and_event_record():
    """ResNet-50 style M = 2: the middle conv is sliced on both dims by two unit groups."""
    torch.manual_seed(0)
    model = build_model("resnet50", num_classes=4, image_size=32)
    block = model.blocks[1]
    g0, g1 = block.unit_gates()
    with torch.no_grad():
        g0.theta[[1, 5, 7]] = 0.05
        g1.theta[[0, 2]] = 0.0
        model.blocks[2].block_gate.theta.fill_(0.01)
        model.blocks[3].unit_gates()[1].theta.fill_(0.02)  # a dead inner layer takes the block with it
    mid = list(block.path)[1].op.weight.clone()
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=0.9)
    event = prune(model, EPS, [opt])
    assert list(block.path)[1].op.weight.shape == (62, 61, 3, 3)
    keep0 = [i for i in range(64) if i not in (1, 5, 7)]
    keep1 = [i for i in range(64) if i not in (0, 2)]
    assert torch.equal(list(block.path)[1].op.weight, mid[keep1][:, keep0])
    assert list(block.path)[1].op.in_channels == 61 and list(block.path)[1].bn.num_features == 62
    assert g0.unit_ids.tolist() == keep0
    assert [(u.block, u.layer, u.indices) for u in event.units] == [(1, 0, (1, 5, 7)), (1, 1, (0, 2))]
    assert [(b.block, b.reason) for b in event.blocks] == [(2, "theta_B"), (3, "units")]
    rec = event.units[0]
    assert len(rec.fan_in_norms) == len(rec.fan_out_norms) == 3 and all(v > 0 for v in rec.fan_in_norms)
    assert event.blocks[0].weight_norm > 0 and event.blocks[0].bn_shift_norm is not None
    assert event.to_dict()["unit_widths_after"][1] == [61, 62]
    assert model.spec().blocks[2].path == () and model.spec().blocks[3].path == ()
    assert model.spec().blocks[2].shortcut == "identity"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_prune_rejects_bad_eps():
    model = build_model("residual_mlp", in_features=2, hidden=[2], num_classes=2)
    with pytest.raises(ValueError, match="eps"):
        prune(model, 1.5)


def test_compacted_network_flops_match_fvcore():
    """After compaction the physical module and spec() agree: fvcore on the export vs the complexity model."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    from pruning.export import export_deterministic

    torch.manual_seed(0)
    model = build_model("resnet1d", stage_blocks=(2, 2), widths=(6, 8), length=12, num_classes=3)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.rand(p.shape, generator=gen))
        model.blocks[1].block_gate.theta.fill_(0.0)
    event = prune(model, 0.3)
    assert event.num_units > 0 and event.num_blocks >= 1
    exported = export_deterministic(model)
    fca = fvcore_nn.FlopCountAnalysis(exported, torch.randn(1, 1, 12))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    ops = fca.by_operator()
    spec = model.spec()
    # theory counts the head's bias column as (m + 1) MACs per output, fvcore counts m: + num_classes
    assert ComplexityModel(spec).flops() == ops["conv"] + ops["linear"] + spec.num_classes
    assert ComplexityModel(spec).flops() < ComplexityModel(event.spec_before).flops()
