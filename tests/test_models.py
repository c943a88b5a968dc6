"""pruning.models: structure equals theory.architectures, gate layout, parameter/FLOPs cross-checks."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning.compaction import prune
from pruning.gates import MODES, fixed_gates
from pruning.models import build_model
from pruning.objective import CostMeter, Objective
from theory import architectures as A
from theory.complexity import BlockGates, Coefficients, ComplexityModel, validate_gates

# (arch, build kwargs, theory builder spec, example input shape)
CASES = [
    ("resnet20", {}, lambda: A.resnet_cifar(20), (3, 32, 32)),
    ("resnet56", {}, lambda: A.resnet_cifar(56), (3, 32, 32)),
    ("resnet110", {}, lambda: A.resnet_cifar(110), (3, 32, 32)),
    ("resnet1d", {}, lambda: A.resnet1d(), (1, 40)),
    (
        "resnet1d",
        dict(stage_blocks=(1, 2), widths=(4, 6), length=17, in_channels=2),
        lambda: A.resnet1d((1, 2), (4, 6), 17, 2),
        (2, 17),
    ),
    ("residual_mlp", dict(in_features=8, hidden=[4, 5, 3]), lambda: A.residual_mlp(8, [4, 5, 3], 10), (8,)),
    (
        "residual_mlp",
        dict(in_features=6, hidden=[2], out_gated=True),
        lambda: A.residual_mlp(6, [2], 10, out_gated=True),
        (6,),
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch,kw,ref,_shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_spec_equals_theory_builder(arch, kw, ref, _shape, mode):
    model = build_model(arch, mode=mode, num_classes=10, device="meta", **kw)
    assert model.spec() == ref()


@pytest.mark.parametrize("mode", MODES)
def test_resnet50_spec_and_params_on_meta(mode):
    model = build_model("resnet50", mode=mode, num_classes=1000, device="meta")
    spec = model.spec()
    assert spec == A.resnet50()
    cm = ComplexityModel(spec)
    assert cm.params() == sum(p.numel() for p in model.weight_parameters())  # 25,557,032 incl. BN pairs
    assert abs(cm.flops() / 4.09e9 - 1) < 0.01
    gates = model.block_gates()
    assert len(gates) == 16
    if mode in ("combined", "unit"):
        assert all(len(g.theta_1) == 2 for g in gates)  # M = 2 unit-gate vectors per bottleneck


def test_reference_totals_from_models():
    """THEORY §3 reference numbers, read off the live models (not the builders)."""
    for depth, flops, params in ((56, 125.49e6, 0.85e6), (110, 252.89e6, 1.73e6)):
        cm = ComplexityModel(build_model(f"resnet{depth}", num_classes=10, device="meta").spec())
        assert round(float(cm.flops()) / 1e6, 2) == round(flops / 1e6, 2)
        assert round(float(cm.params()) / 1e6, 2) == round(params / 1e6, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch,kw,_ref,_shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_params_match_and_partition(arch, kw, _ref, _shape, mode):
    model = build_model(arch, mode=mode, num_classes=10, device="meta", **kw)
    weights, gates = model.weight_parameters(), model.gate_parameters()
    assert ComplexityModel(model.spec()).params() == sum(p.numel() for p in weights)
    ids_w, ids_g = {id(p) for p in weights}, {id(p) for p in gates}
    assert not ids_w & ids_g and ids_w | ids_g == {id(p) for p in model.parameters()}
    blocks = model.spec().blocks
    bg = model.block_gates()
    assert len(bg) == len(blocks)
    if mode == "none":
        assert gates == [] and all(g.theta_B is None and g.theta_1 is None and g.theta_2 is None for g in bg)
    if mode == "layer":
        assert all(p.dim() == 0 for p in gates) and len(gates) == len(blocks)
        assert all(g.theta_1 is None for g in bg)
    if mode == "unit":
        assert all(p.dim() == 1 for p in gates) and all(g.theta_B is None for g in bg)
    if mode == "combined":
        assert all(g.theta_B is not None and g.theta_1 is not None for g in bg)


@pytest.mark.parametrize("mode", MODES)
def test_block_gates_feed_complexity_model_with_autograd(mode):
    model = build_model("resnet20", mode=mode, num_classes=10, width=4, theta_init=0.7)
    gates = model.block_gates()
    validate_gates(model.spec(), gates)
    cm = ComplexityModel(model.spec())
    c = cm.complexity(gates, Coefficients(1e-6, 1e-4, 0.5))
    if mode == "none":
        assert not torch.is_tensor(c) or not c.requires_grad
        return
    c.backward()
    grads = cm.grad(gates, Coefficients(1e-6, 1e-4, 0.5))
    for g, gg in zip(gates, grads):
        if g.theta_B is not None:
            assert torch.allclose(g.theta_B.grad, torch.as_tensor(gg.theta_B, dtype=torch.float32), rtol=1e-5)
        if g.theta_1 is not None:
            for t, v in zip(g.theta_1, gg.theta_1):
                assert torch.allclose(t.grad, v.detach().float(), rtol=1e-5)


@pytest.mark.parametrize("arch,kw,_ref,shape", CASES[:1] + CASES[3:], ids=lambda c: str(c)[:20])
def test_forward_shapes_train_and_eval(arch, kw, _ref, shape):
    if arch == "resnet20":
        kw = dict(width=4)
    model = build_model(arch, num_classes=5, **kw)
    x = torch.randn(3, *shape)
    assert model(x).shape == (3, 5)
    model.eval()
    assert model(x).shape == (3, 5)


def test_resnet50_small_forward():
    model = build_model("resnet50", num_classes=7, image_size=32)
    assert model.spec() == A.resnet50(7, 32)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_zero_pad_shortcut_option_a():
    model = build_model("resnet20", mode="none", num_classes=10, width=4)
    sc = model.blocks[3].shortcut  # first block of stage 2: 4 -> 8 channels, stride 2
    x = torch.randn(2, 4, 6, 6)
    y = sc(x)
    assert y.shape == (2, 8, 3, 3)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2]) and not y[:, :2].any() and not y[:, 6:].any()


def test_estimator_setter_propagates():
    model = build_model("residual_mlp", in_features=4, hidden=[3], num_classes=2)
    model.estimator = "exact-difference"
    assert all(g.estimator == "exact-difference" for g in model.gates())
    with pytest.raises(ValueError, match="estimator"):
        model.estimator = "reinforce"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(arch="vgg16"), "arch"),
        (dict(arch="resnet20", mode="all"), "mode"),
        (dict(arch="resnet20", estimator="gumbel"), "estimator"),
        (dict(arch="resnet20", depth=3), "depth"),
        (dict(arch="resnet20", theta_init=1.5), "theta_init"),
        (dict(arch="residual_mlp", in_features=3, hidden=[2], activation="gelu"), "activation"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, field):
    kwargs.setdefault("num_classes", 10)
    with pytest.raises(ValueError, match=field):
        build_model(**kwargs)


# ------------------------------------------------------------------------------------------------
# fvcore cross-check (test-only dependency)
# ------------------------------------------------------------------------------------------------

FVCORE_CASES = [
    ("resnet56", {}, (3, 32, 32)),
    ("resnet1d", {}, (1, 40)),
    ("residual_mlp", dict(in_features=8, hidden=[4, 5]), (8,)),
    ("resnet50", {}, (3, 224, 224)),
]


@pytest.mark.parametrize("arch,kw,shape", FVCORE_CASES, ids=[c[0] for c in FVCORE_CASES])
def test_flops_match_fvcore(arch, kw, shape):
    fvcore_nn = pytest.importorskip("fvcore.nn")
    model = build_model(arch, mode="none", num_classes=10, **kw).eval()
    fca = fvcore_nn.FlopCountAnalysis(model, torch.randn(1, *shape))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    ops = fca.by_operator()
    fv = ops.get("conv", 0) + ops.get("linear", 0) + ops.get("addmm", 0) + ops.get("matmul", 0)
    spec = model.spec()
    theory = ComplexityModel(spec).flops()
    # Convention difference, stated exactly: the theory counts a bias as a column of W (§1: ẑ = [z; 1]),
    # i.e. (m + 1) MACs per output; fvcore counts m. The gap is one MAC per output of every biased layer.
    layers = list(spec.stem) + [l for b in spec.blocks for l in b.path] + list(spec.head)
    bias_macs = sum(l.out_width * l.positions for l in layers if l.bias)
    assert theory == fv + bias_macs


# ------------------------------------------------------------------------------------------------
# Gates folded into the parameters: the same function and gradients as multiplying the activations
# ------------------------------------------------------------------------------------------------

FOLD_CASES = [
    ("resnet20", dict(width=3, image_size=8), (3, 8, 8)),
    ("resnet1d", dict(stage_blocks=(1, 2), widths=(3, 5), length=9, in_channels=2), (2, 9)),
    ("residual_mlp", dict(in_features=5, hidden=[3, 4], out_gated=True, activation="tanh"), (5,)),
    ("residual_mlp", dict(in_features=4, hidden=[3]), (4,)),
    ("resnet50", dict(image_size=32), (3, 32, 32)),
]


def _compacted(arch, kw, mode, estimator, seed=0):
    """A double model with random θ; in combined mode a few units and a block are removed first."""
    torch.manual_seed(seed)
    model = build_model(arch, mode=mode, num_classes=4, estimator=estimator, theta_init=0.6, **kw).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.8 + 0.2)
        if mode == "combined":
            for g in model.block_list()[0].unit_gates():
                if g is not None:
                    g.theta[0] = 0.01
            if len(model.block_list()) > 1 and model.block_list()[1].block_gate is not None:
                model.block_list()[1].block_gate.theta.fill_(0.01)
    if mode == "combined":
        prune(model, 0.05)
    return model


def _step(model, x, y, seed):
    torch.manual_seed(seed)
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return out.detach(), grads, [b.clone() for b in model.buffers()], [g.last_sample for g in model.gates()]


@pytest.mark.parametrize("estimator", ["straight-through", "exact-difference"])
@pytest.mark.parametrize("mode", ["combined", "layer", "unit"])
@pytest.mark.parametrize("arch,kw,shape", FOLD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FOLD_CASES)])
def test_folded_gates_equal_unfolded(arch, kw, shape, mode, estimator):
    """Train mode (shared sample), eval mode (mean field) and fixed gates: outputs, every gradient
    (W and θ) and the BatchNorm running statistics agree with gates multiplying the activations."""
    if arch == "resnet50" and (mode, estimator) != ("combined", "straight-through"):
        pytest.skip("one configuration is enough for the big model")
    folded = _compacted(arch, kw, mode, estimator)
    plain = copy.deepcopy(folded)
    plain.fold_gates = False
    assert folded.fold_gates and not plain.fold_gates
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    folded.train()
    plain.train()
    (o1, g1, b1, s1), (o2, g2, b2, s2) = _step(folded, x, y, 9), _step(plain, x, y, 9)
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))  # the same gate sample
    assert torch.allclose(o1, o2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert all(torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-12) for a, b in zip(b1, b2))
    if estimator == "straight-through":
        assert all(p.grad is not None for p in folded.gate_parameters())
    folded.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(folded(x), plain(x), rtol=1e-10, atol=1e-12)
        values = [torch.bernoulli(torch.full_like(g.theta, 0.5), generator=gen) for g in folded.gates()]
        with fixed_gates(folded.gates(), values), fixed_gates(plain.gates(), values):
            assert torch.allclose(folded(x), plain(x), rtol=1e-10, atol=1e-12)


def test_folded_forward_rejects_an_activation_after_the_block_gate():
    layer = build_model("resnet1d", stage_blocks=(1,), widths=(3,), length=5, num_classes=2).block_list()[0].path[0]
    assert layer.act is not None
    with pytest.raises(ValueError, match="without activation"):
        layer.forward_folded(torch.randn(2, 3, 5), None, torch.tensor(1.0))


def test_gate_traversals_match_module_attributes():
    """The fast traversal behind gates()/block_gates()/sampling_order() reads the same modules, also after pruning."""
    for arch, kw, _shape in FOLD_CASES:
        model = _compacted(arch, kw, "combined", "straight-through")
        slow = []
        for block in model.block_list():
            units = [g for g in block.unit_gates() if g is not None]
            slow.append((block.block_gate if block.alive else None, units, block.out_gate))
        assert model.gates() == [g for b, u, o in slow for g in ([b] if b is not None else []) + u
                                 + ([o] if o is not None else [])]
        assert model.sampling_order() == [g for b, u, o in slow for g in u + ([b] if b is not None else [])
                                          + ([o] if o is not None else [])]
        assert [id(p) for p in model.gate_parameters()] == [id(g.theta) for g in model.gates()]
        for bg, block in zip(model.block_gates(), model.block_list()):
            assert bg.theta_B is (block.block_gate.theta if block.alive and block.block_gate is not None else None)
            assert bg.theta_2 is (block.out_gate.theta if block.out_gate is not None else None)


# ------------------------------------------------------------------------------------------------
# The objective's compiled C(Θ) / E[F] and its weight term
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,kw,_shape", FOLD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FOLD_CASES)])
def test_objective_compiled_complexity_equals_model_after_compaction(arch, kw, _shape):
    baseline = build_model(arch, mode="combined", num_classes=4, **kw).spec()
    model = _compacted(arch, kw, "combined", "straight-through")
    spec = model.spec()
    assert spec != baseline  # something was removed
    obj = Objective(baseline, N=100, gamma=0.3, rho=0.4, delta=0.5, lam=1.0, elementwise=True)
    meter = CostMeter(baseline)
    cm, cm_f = ComplexityModel(spec, elementwise=True), ComplexityModel(spec)
    c = obj.complexity(model, spec)
    ref = cm.complexity(model.block_gates(), obj.coeffs)
    assert float(c.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    params = model.gate_parameters()
    for a, b in zip(torch.autograd.grad(c, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(a, b, rtol=1e-10, atol=0)
    with torch.no_grad():
        flops, params_ = float(cm_f.flops(model.block_gates())), float(cm_f.params(model.block_gates()))
    assert float(meter.expected_flops(model, spec)) == pytest.approx(flops, rel=1e-12)
    ef, ep = meter.expected(model)
    assert ef.dtype == ep.dtype == torch.float64
    assert (float(ef), float(ep)) == pytest.approx((flops, params_), rel=1e-12)
    none = Objective(baseline, N=100, gamma=0.3, rho=0.4, delta=0.5, lam=1.0, mode="none")
    assert float(none.complexity(model)) == 0.0


def test_objective_compiled_complexity_float32_and_structure_change():
    """float32 θ (the trainer's) agree with the float64 loop; a new structure gets a new compiled plan."""
    model = build_model("resnet20", num_classes=10, width=4, theta_init=0.7)
    spec = model.spec()
    obj = Objective(spec, N=500, gamma=0.2, rho=0.5, delta=0.3, lam=0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.rand(p.shape, generator=gen))
    as64 = [BlockGates(None if g.theta_B is None else g.theta_B.detach().double(),
                       None if g.theta_1 is None else tuple(t.detach().double() for t in g.theta_1), None)
            for g in model.block_gates()]
    ref = ComplexityModel(spec, elementwise=True).complexity(as64, obj.coeffs)
    assert float(obj.complexity(model, spec).detach()) == pytest.approx(float(ref), rel=1e-6)
    with torch.no_grad():
        model.block_list()[2].block_gate.theta.fill_(0.0)
    prune(model, 0.01)
    spec2 = model.spec()
    ref2 = ComplexityModel(spec2, elementwise=True).complexity(model.block_gates(), obj.coeffs)
    assert float(obj.complexity(model, spec2).detach()) == pytest.approx(float(ref2.detach()), rel=1e-6)


def test_weight_term_value_and_gradient():
    model = build_model("resnet1d", stage_blocks=(1, 1), widths=(3, 4), length=8, num_classes=3).double()
    obj = Objective(model.spec(), N=50, gamma=0.1, rho=0.5, delta=0.0, lam=3.0)
    weights = model.weight_parameters()
    term = obj.weight_term(weights)
    expected = 0.5 * (3.0 / 50) * sum(float((p.detach() ** 2).sum()) for p in weights)
    # a float64 model keeps float64 (only half precision is promoted to float32)
    assert term.dtype == torch.float64 and float(term.detach()) == pytest.approx(expected, rel=1e-12)
    for g, p in zip(torch.autograd.grad(term, weights), weights):
        assert torch.allclose(g, (3.0 / 50) * p.detach(), rtol=1e-12)
    assert float(Objective(model.spec(), N=50, gamma=0.1, rho=0.5, delta=0.0, lam=0.0).weight_term(weights)) == 0.0


def test_objective_promotes_only_half_precision():
    from pruning.objective import _at_least_float32

    assert _at_least_float32(torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert _at_least_float32(torch.zeros(2, dtype=torch.float16)).dtype == torch.float32
    assert _at_least_float32(torch.zeros(2, dtype=torch.float32)).dtype == torch.float32
    assert _at_least_float32(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64
