"""pruning.export: the folded deterministic network equals the mean-field model; artifacts on disk."""

from __future__ import annotations

import json

import pytest
import torch

from pruning.compaction import prune
from pruning.export import export_deterministic, save_export
from pruning.gates import Gate
from pruning.models import build_model
from theory.complexity import ComplexityModel

CASES = [
    (dict(arch="residual_mlp", in_features=4, hidden=[3, 5], activation="tanh"), (4,)),
    (dict(arch="residual_mlp", in_features=4, hidden=[3, 2], out_gated=True), (4,)),
    (dict(arch="resnet1d", stage_blocks=(1, 2), widths=(3, 5), length=9, in_channels=2), (2, 9)),
    (dict(arch="resnet20", width=3, image_size=8), (3, 8, 8)),
    (dict(arch="resnet50", image_size=32), (3, 32, 32)),
]


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.rand(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(generator=gen)
                m.bias.normal_(generator=gen)


@pytest.mark.parametrize("mode", ["combined", "layer", "unit", "none"])
@pytest.mark.parametrize("kw,shape", CASES, ids=[c[0]["arch"] + str(i) for i, c in enumerate(CASES)])
def test_export_equals_mean_field(kw, shape, mode):
    if kw["arch"] == "resnet50" and mode != "combined":
        pytest.skip("one mode is enough for the big model")
    torch.manual_seed(0)
    model = build_model(mode=mode, num_classes=3, **kw)
    _randomize(model, 1)
    x = torch.randn(4, *shape)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    exported = export_deterministic(model)
    assert not any(isinstance(m, Gate) for m in exported.modules())
    assert not exported.training
    with torch.no_grad():
        assert torch.allclose(exported(x), expected, atol=1e-5, rtol=1e-4)
    assert exported.spec() == model.spec()
    assert ComplexityModel(exported.spec()).params() == sum(p.numel() for p in exported.parameters())


def test_export_after_compaction_and_eps_option():
    torch.manual_seed(0)
    model = build_model("resnet1d", stage_blocks=(2, 1), widths=(4, 6), length=8, num_classes=3)
    _randomize(model, 2)
    with torch.no_grad():
        model.blocks[0].block_gate.theta.fill_(0.05)
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=0.9)
    event = prune(model, 0.1, [opt])
    assert not event.empty
    x = torch.randn(3, 1, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(export_deterministic(model)(x), expected, atol=1e-5, rtol=1e-4)
    fresh = build_model("resnet1d", stage_blocks=(2, 1), widths=(4, 6), length=8, num_classes=3)
    _randomize(fresh, 2)
    with torch.no_grad():
        fresh.blocks[0].block_gate.theta.fill_(0.05)
    exported = export_deterministic(fresh, eps=0.1)
    assert exported.spec() == model.spec()
    assert fresh.spec().blocks[0].alive  # the source model is untouched


def test_save_export_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", width=2, image_size=8, num_classes=3)
    _randomize(model, 3)
    exported = export_deterministic(model)
    paths = save_export(exported, tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} == {"state_dict.pt", "model.pt2", "spec.json",
                                                                 "metadata.json"}
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = exported(x)
        loaded = torch.export.load(paths["program"]).module()
        assert torch.allclose(loaded(x), expected, atol=1e-6)
    state = torch.load(paths["state_dict"])
    assert state.keys() == exported.state_dict().keys()
    spec = json.loads(paths["spec"].read_text())
    assert spec["name"] == "resnet20" and len(spec["blocks"]) == 9
    save_export(exported, tmp_path / "final")  # overwriting in place works (os.replace)
    assert not [p for p in (tmp_path / "final").iterdir() if p.name.endswith(".tmp")]
