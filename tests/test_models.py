"""pruning.models: structure equals theory.architectures, gate layout, parameter/FLOPs cross-checks."""

from __future__ import annotations

import pytest
import torch

from pruning.gates import MODES
from pruning.models import build_model
from theory import architectures as A
from theory.complexity import Coefficients, ComplexityModel, validate_gates

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
