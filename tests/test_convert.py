"""``pruning.gate``: a plain torch ResNet (torchvision layout) becomes a gated network with the same function."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import tvmirror as tv
from torch import nn

from pruning.convert import ConversionError, gate
from pruning.export import export_deterministic
from pruning.models import build_model, from_spec
from theory.architectures import resnet_imagenet
from theory.complexity import ComplexityModel


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _unnamed(spec):
    """The spec without its names (network and blocks)."""
    return dataclasses.replace(spec, name="", blocks=tuple(dataclasses.replace(b, name="") for b in spec.blocks))


def _same_outputs(module: nn.Module, net: nn.Module, x: torch.Tensor) -> float:
    module.eval()
    net.eval()
    with torch.no_grad():
        return float((module(x) - net(x)).abs().max())


# ------------------------------------------------------------------------------------------------
# torchvision-style ResNets: structure, weights, outputs
# ------------------------------------------------------------------------------------------------

MIRRORS = [
    (tv.resnet18, 18, 1),
    (tv.resnet34, 34, 1),
    (tv.resnet50, 50, 1),
    (tv.resnet101, 101, 1),
    (tv.resnet152, 152, 1),
    (tv.wide_resnet50_2, 50, 2),
]


@pytest.mark.parametrize("fn,depth,widen", MIRRORS, ids=[m[0].__name__ for m in MIRRORS])
def test_mirror_converts_to_the_builders_spec_with_the_same_outputs(fn, depth, widen):
    """At 1/8 width: the converted spec is theory.architectures.resnet_imagenet's, outputs agree to float rounding."""
    torch.manual_seed(0)
    module = tv.randomize_bn(fn(num_classes=7, base=8))
    x = torch.randn(2, 3, 32, 32)
    net = gate(module, x)
    expected = resnet_imagenet(depth, 7, 32, width=8, widen=widen)
    assert dataclasses.replace(net.spec(), name=expected.name) == expected
    assert net.spec().name == "resnet"
    assert _same_outputs(module, net, x) <= 1e-5


def test_resnet18_weights_are_copied_not_shared_and_module_left_as_it_was():
    torch.manual_seed(1)
    module = tv.randomize_bn(tv.resnet18(num_classes=10))
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    net = gate(module, torch.randn(2, 3, 32, 32), theta_init=0.7)
    assert module.training and all(m.training for m in module.modules())
    assert net.training
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    # state-dict keys map one to one: stem, path layers, the projection shortcut, the head
    assert torch.equal(net.stem[0].op.weight, module.conv1.weight)
    assert torch.equal(net.blocks[2].path[1].bn.running_var, module.layer2[0].bn2.running_var)
    assert torch.equal(net.blocks[2].shortcut.op.weight, module.layer2[0].downsample[0].weight)
    assert torch.equal(net.blocks[2].shortcut.bn.weight, module.layer2[0].downsample[1].weight)
    assert torch.equal(net.head[0].op.bias, module.fc.bias)
    assert int(net.blocks[7].path[0].bn.num_batches_tracked) == 7
    with torch.no_grad():
        net.stem[0].op.weight.zero_()
    assert not torch.equal(module.conv1.weight, net.stem[0].op.weight)
    assert all(float(t.detach().min()) == float(t.detach().max()) == pytest.approx(0.7)
               for t in net.gate_parameters())
    n_params = sum(p.numel() for p in module.parameters())
    assert ComplexityModel(net.spec(), elementwise=False).params() == n_params  # BN affine pairs included


@pytest.mark.parametrize("mode,block_gates,unit_gates", [("combined", 8, 8), ("layer", 8, 0), ("unit", 0, 8),
                                                         ("none", 0, 0)])
def test_modes(mode, block_gates, unit_gates):
    module = tv.resnet18(num_classes=3, base=4)
    net = gate(module, torch.randn(1, 3, 32, 32), mode=mode)
    assert net.mode == mode
    assert sum(b.block_gate is not None for b in net.block_list()) == block_gates
    assert sum(g is not None for b in net.block_list() for g in b.unit_gates()) == unit_gates


def test_resnet_v1_stride_on_conv1_and_cifar_layout():
    torch.manual_seed(2)
    module = tv.randomize_bn(tv.resnet50(num_classes=5, base=4))
    first = module.layer2[0]
    first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)  # the original ResNet v1 bottleneck
    x = torch.randn(2, 3, 32, 32)
    net = gate(module, x)
    block = net.spec().blocks[3]
    assert [layer.stride for layer in block.path] == [2, 1, 1]
    assert block.path[0].out_size == block.path[1].out_size == (4, 4)  # v1.5: (8, 8), then (4, 4)
    assert _same_outputs(module, net, x) <= 1e-5
    cifar = tv.randomize_bn(tv.CifarResNet(widths=(4, 8, 16), blocks=(2, 1, 1)))
    x = torch.randn(2, 3, 16, 16)
    net = gate(cifar, x)
    assert [b.shortcut for b in net.spec().blocks] == ["identity", "identity", "projection", "projection"]
    assert dict(net.spec().meta) == {}  # no max-pool
    assert _same_outputs(cifar, net, x) <= 1e-5


def test_option_a_cifar_resnet_is_the_papers_resnet20():
    """The popular CIFAR ResNet-20 with lambda-layer option-A shortcuts converts to theory's resnet_cifar(20)."""
    from theory.architectures import resnet_cifar

    torch.manual_seed(4)
    module = tv.randomize_bn(tv.OptionAResNet(n=3, width=4))
    x = torch.randn(2, 3, 32, 32)
    net = gate(module, x)
    assert [b.name for b in net.spec().blocks][:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert _unnamed(net.spec()) == _unnamed(resnet_cifar(20, width=4))
    assert _same_outputs(module, net, x) <= 1e-5


def test_non_default_batchnorm_eps_travels_in_the_spec():
    module = tv.randomize_bn(tv.resnet18(num_classes=3, base=4))
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.01
    x = torch.randn(2, 3, 32, 32)
    net = gate(module, x)
    assert dict(net.spec().meta)["bn_eps"] == 1e-3 and dict(net.spec().meta)["bn_momentum"] == 0.01
    rebuilt = from_spec(net.spec(), mode="combined", estimator="straight-through", theta_init=1.0)
    rebuilt.load_state_dict(net.state_dict())
    assert all(m.eps == 1e-3 for m in rebuilt.modules() if isinstance(m, nn.BatchNorm2d))
    assert _same_outputs(module, rebuilt, x) <= 1e-5
    module.layer3[0].bn1.eps = 1e-4
    with pytest.raises(ConversionError, match=r"layer3\.0\.bn1: BatchNorm eps"):
        gate(module, x)


# ------------------------------------------------------------------------------------------------
# Clear refusals, naming the module
# ------------------------------------------------------------------------------------------------


def _edited(edit):
    module = tv.resnet18(num_classes=3, base=4)
    edit(module)
    return module


class _Squeeze(nn.Module):
    def forward(self, x):
        return x


class _NoFinalRelu(tv.ResNet):
    def forward(self, x):  # skips the stem ReLU: same modules, different function
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


REFUSALS = [
    (lambda: tv.resnext50_32x4d(num_classes=3), r"layer1\.0\.conv2: grouped convolution \(groups=32\)"),
    (lambda: _edited(lambda m: setattr(m.layer1[0], "conv2", nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False))),
     r"layer1\.0\.conv2: depthwise convolution"),
    (lambda: _edited(lambda m: setattr(m.layer3[1], "conv1", nn.Conv2d(16, 16, 3, padding=2, dilation=2,
                                                                        bias=False))),
     r"layer3\.1\.conv1: dilated convolution"),
    (lambda: _edited(lambda m: setattr(m.layer2[1], "conv2", nn.Conv2d(8, 8, (1, 3), padding=(0, 1),
                                                                        bias=False))),
     r"layer2\.1\.conv2: non-square kernel \(1, 3\)"),
    (lambda: _edited(lambda m: setattr(m, "conv1", nn.Conv2d(3, 4, 7, stride=2, padding=2, bias=False))),
     r"conv1: padding \(2, 2\) is not supported; the gated layers pad kernel // 2 = 3"),
    (lambda: _edited(lambda m: setattr(m.layer1[1], "bn2", nn.BatchNorm2d(4, affine=False))),
     r"layer1\.1\.bn2: BatchNorm without affine pair"),
    (lambda: _edited(lambda m: setattr(m.layer1[1], "bn2", nn.BatchNorm2d(4, track_running_stats=False))),
     r"layer1\.1\.bn2: BatchNorm without running statistics"),
    (lambda: _edited(lambda m: setattr(m, "dropout", nn.Dropout(0.2))), r"dropout \(Dropout\): not part of"),
    (lambda: _edited(lambda m: setattr(m.layer4[0], "se", _Squeeze())), r"layer4\.0 \(BasicBlock\).*layer4\.0\.se"),
    (lambda: _edited(lambda m: setattr(m.layer2[0], "downsample", nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 8, 1),
                                                                                nn.BatchNorm2d(8)))),
     r"layer2\.0\.downsample \(Sequential\): only Sequential\(Conv2d, BatchNorm2d\)"),
    (lambda: _edited(lambda m: setattr(m.layer2[0], "downsample", None)), r"ResNet failed on example_input"),
    (lambda: _edited(lambda m: setattr(m, "maxpool", nn.MaxPool2d(2))), r"maxpool \(MaxPool2d"),
    (lambda: _edited(lambda m: setattr(m, "relu", nn.GELU())), r"relu \(GELU\): only ReLU"),
    (lambda: _NoFinalRelu(tv.BasicBlock, [1, 1, 1, 1], num_classes=3, base=4),
     r"differs from _NoFinalRelu on example_input"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), r"cannot convert Sequential: expected a torchvision-style"),
]


@pytest.mark.parametrize("make,message", REFUSALS, ids=[f"refusal{i}" for i in range(len(REFUSALS))])
def test_refusals_name_the_module(make, message):
    with pytest.raises(ConversionError, match=message):
        gate(make(), torch.randn(1, 3, 32, 32))


def test_bad_arguments():
    module = tv.resnet18(num_classes=3, base=4)
    with pytest.raises(ValueError, match="mode"):
        gate(module, torch.randn(1, 3, 32, 32), mode="all")
    with pytest.raises(ValueError, match="theta_init"):
        gate(module, torch.randn(1, 3, 32, 32), theta_init=1.5)
    with pytest.raises(ConversionError, match="example_input"):
        gate(module, [1, 2, 3])
    with pytest.raises(ConversionError, match=r"failed on example_input of shape \(1, 1, 32, 32\)"):
        gate(module, torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------------------------------------
# Networks of this project: change the gating of a GatedNetwork, bring an export back to training
# ------------------------------------------------------------------------------------------------


def test_gated_network_to_another_mode_and_export_back():
    torch.manual_seed(3)
    src = build_model("resnet20", num_classes=4, width=4, image_size=8, theta_init=0.6)
    x = torch.randn(3, 3, 8, 8)
    net = gate(src, x, mode="unit")
    assert net.spec() == src.spec() and net.mode == "unit"
    for g in src.gates():
        g.fix(1.0)
    assert _same_outputs(src, net, x) <= 1e-5
    for g in src.gates():
        g.fix(None)
    # an exported (θ folded) residual MLP with output gates: θ_2 becomes the new output gates' θ
    mlp = build_model("residual_mlp", in_features=5, hidden=[3, 4], out_gated=True, activation="tanh",
                      num_classes=3, theta_init=0.8)
    det = export_deterministic(mlp)
    x = torch.randn(4, 5)
    back = gate(det, x, mode="combined")
    assert back.activation == "tanh"
    assert [float(b.out_gate.theta.detach().min()) for b in back.block_list()] == pytest.approx([0.8, 0.8])
    assert _same_outputs(det, back, x) <= 1e-5  # θ_1, θ_B folded in det's weights, at 1 in back
    with pytest.raises(ConversionError, match="output gates"):
        gate(det, x, mode="layer")


def test_pruned_project_network_is_refused():
    from pruning.compaction import prune

    net = build_model("resnet20", num_classes=4, width=4, image_size=8)
    with torch.no_grad():
        net.blocks[1].block_gate.theta.fill_(0.0)
    prune(net, 0.1)
    with pytest.raises(ConversionError, match="stage1.1: pruned"):
        gate(net, torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# FLOPs of the converted network = fvcore's count of the ORIGINAL module
# ------------------------------------------------------------------------------------------------


def _fvcore_macs(module: nn.Module, x: torch.Tensor) -> int:
    fvcore_nn = pytest.importorskip("fvcore.nn")
    fca = fvcore_nn.FlopCountAnalysis(module.eval(), x)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    ops = fca.by_operator()
    return int(ops.get("conv", 0) + ops.get("linear", 0) + ops.get("addmm", 0) + ops.get("matmul", 0))


FLOPS_CASES = [
    pytest.param(tv.resnet18, 18, 1, 1_814_073_344, 11_689_512, id="resnet18"),
    pytest.param(tv.resnet50, 50, 1, 4_089_184_256, 25_557_032, id="resnet50"),
    pytest.param(tv.resnet34, 34, 1, 3_663_761_408, 21_797_672, id="resnet34", marks=pytest.mark.slow),
    pytest.param(tv.resnet101, 101, 1, 7_801_405_440, 44_549_160, id="resnet101", marks=pytest.mark.slow),
    pytest.param(tv.resnet152, 152, 1, 11_513_626_624, 60_192_808, id="resnet152", marks=pytest.mark.slow),
    pytest.param(tv.wide_resnet50_2, 50, 2, 11_398_021_120, 68_883_240, id="wide_resnet50_2",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fn,depth,widen,fv_macs,n_params", FLOPS_CASES)
def test_converted_flops_equal_fvcore_of_the_original(fn, depth, widen, fv_macs, n_params):
    """ImageNet size (224): the complexity model of the converted spec vs fvcore on the plain torch module.

    The theory counts a bias as a column of W (§1: ẑ = [z; 1]): one MAC per output of a biased layer
    more than fvcore, here the 1000 outputs of fc.
    """
    module = fn()
    x = torch.randn(1, 3, 224, 224)
    macs = _fvcore_macs(module, x)
    assert macs == fv_macs  # measured once, kept to catch a changed mirror or counter
    net = gate(module, x, check=False)
    model = ComplexityModel(net.spec(), elementwise=False)
    assert model.flops() == macs + 1000
    assert model.params() == n_params == sum(p.numel() for p in module.parameters())
    assert dataclasses.replace(net.spec(), name="x") == dataclasses.replace(resnet_imagenet(depth, widen=widen),
                                                                             name="x")
