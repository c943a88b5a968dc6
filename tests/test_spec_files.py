"""Spec files (theory/spec.py): NetworkSpec <-> primitives <-> TOML/JSON, derived sizes, errors naming the field;
the ImageNet and wide ResNet builders; ``python -m pruning flops`` on them and on a spec file."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pruning.cli import main
from pruning.models import build_model
from theory.architectures import ARCHITECTURES, residual_mlp, resnet1d, resnet_cifar, resnet_imagenet, wide_resnet_cifar
from theory.complexity import ComplexityModel
from theory.spec import NetworkSpec, load_spec, save_spec, spec_to_toml

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SPECS = {name: fn() for name, fn in ARCHITECTURES.items()}
SPECS["residual_mlp"] = residual_mlp(5, [3, 4], 2, out_gated=True)


def _strip_sizes(d: dict) -> dict:
    d = copy.deepcopy(d)
    layers = list(d["stem"]) + list(d["head"])
    for b in d["blocks"]:
        b.pop("out_size")
        layers += b["path"] + ([b["shortcut_layer"]] if "shortcut_layer" in b else [])
    for layer in layers:
        layer.pop("out_size")
    return d


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_dict_toml_json_and_derived_sizes(name, tmp_path):
    spec = SPECS[name]
    d = spec.to_dict()
    assert NetworkSpec.from_dict(d) == spec
    assert NetworkSpec.from_dict(tomllib.loads(spec_to_toml(spec))) == spec
    assert NetworkSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert NetworkSpec.from_dict(_strip_sizes(d)) == spec  # every out_size follows from input_shape and strides
    for suffix in (".toml", ".json"):
        assert load_spec(save_spec(spec, tmp_path / f"net{suffix}")) == spec


@given(
    blocks=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    width=st.integers(1, 5),
    length=st.integers(1, 17),
    image=st.integers(1, 40),
    depth=st.sampled_from([18, 50]),
)
def test_round_trip_property(blocks, width, length, image, depth):
    """Odd sizes, 1-D and 2-D, basic and bottleneck: the derived sizes are always the builders'."""
    widths = [width * 2**i for i in range(len(blocks))]
    for spec in (resnet1d(blocks, widths, length=length), resnet_imagenet(depth, 3, image, width=width),
                 resnet_cifar(8, width=width, image_size=image)):
        assert NetworkSpec.from_dict(_strip_sizes(spec.to_dict())) == spec


def test_the_list_of_pairs_meta_of_older_spec_json_files_loads():
    from dataclasses import asdict

    spec = SPECS["resnet50"]
    assert NetworkSpec.from_dict(json.loads(json.dumps(asdict(spec)))) == spec


def _tiny() -> dict:
    return resnet_cifar(8, width=2, image_size=8).to_dict()


def _edit(path: str, value):
    d = _tiny()
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return d


@pytest.mark.parametrize("path,value,message", [
    ("blocks.1.path.0.kernal", 3, r"spec.blocks\[1\].path\[0\].kernal: unknown key \(known: kind, in_width"),
    ("blocks.1.path.0.kernel", "3", r"spec.blocks\[1\].path\[0\].kernel: expected int, got str '3'"),
    ("blocks.1.path.0.stride", True, r"spec.blocks\[1\].path\[0\].stride: expected int, got bool"),
    ("blocks.1.path.0.out_size", [8, 8], r"spec.blocks\[1\].path\[0\].out_size: \[8, 8\] differs from \[4, 4\]"),
    ("blocks.1.path.1.in_width", 5, r"spec.blocks\[1\]: Block 'stage2.0'.path\[0\].out_width=4 does not match"),
    ("blocks.0.path.0.kind", "conv3d", r"spec.blocks\[0\].path\[0\].kind: must be one of linear, conv1d, conv2d"),
    ("blocks.0.shortcut", "projection", r"spec.blocks\[0\]: Block 'stage1.0'.shortcut_layer must be given"),
    ("blocks.0.in_width", KeyError, r"spec.blocks\[0\].in_width: missing"),
    ("head.0.in_width", 3, r"spec: NetworkSpec 'resnet8': head\[0\].in_width=3 does not match"),
    ("input_shape", [3, 0, 8], r"spec.input_shape: expected positive integers"),
    ("meta", {"stem_pool": "avg2"}, r"spec.meta.stem_pool: must be one of max3x3s2"),
    ("meta", {"x": [1]}, r"spec.meta.x: expected a string, number or boolean"),
    ("num_classes", 0, r"spec.num_classes: must be >= 1"),
    ("colour", "red", r"spec.colour: unknown key"),
])
def test_errors_name_the_field(path, value, message):
    with pytest.raises(ValueError, match=message):
        NetworkSpec.from_dict(_edit(path, value))


def test_load_spec_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"net.yaml: a spec file must end in .toml or .json"):
        load_spec(tmp_path / "net.yaml")
    with pytest.raises(ValueError, match=r"missing.toml: cannot read the spec file"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(ValueError, match=r"broken.toml: not valid TOML"):
        load_spec(tmp_path / "broken.toml")
    (tmp_path / "bad.json").write_text(json.dumps(_edit("blocks.0.path.0.bn", "yes")))
    with pytest.raises(ValueError, match=r"bad.json.blocks\[0\].path\[0\].bn: expected bool"):
        load_spec(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------
# Builders: ImageNet ResNets (torchvision layout) and wide ResNets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,flops,params", [
    # conv + linear MACs incl. the fc bias column, parameters incl. BN pairs; fvcore on the torchvision-layout
    # mirror gives the same MACs minus the 1000 bias MACs (tests/test_convert.py) and torchvision's parameter counts
    ("resnet18", 1_814_074_344, 11_689_512),
    ("resnet34", 3_663_762_408, 21_797_672),
    ("resnet101", 7_801_406_440, 44_549_160),
    ("resnet152", 11_513_627_624, 60_192_808),
    ("wide_resnet50_2", 11_398_022_120, 68_883_240),
])
def test_imagenet_reference_totals(model, flops, params, capsys):
    assert main(["flops", "--model", model, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["flops"], record["params"]) == (flops, params)
    assert record["layers"] == int(model.split("resnet")[1].split("_")[0])


def test_wide_resnet_cifar_counts():
    """WRN-28-10 (n = 4 blocks per stage, widths 160/320/640): 5.25 G conv + linear MACs; weights by hand."""
    spec = wide_resnet_cifar(28, 10)
    model = ComplexityModel(spec, elementwise=False)
    assert float(model.flops()) == pytest.approx(5.248e9, rel=1e-3)
    convs = [(3, 16, 9)]  # (in, out, k·k)
    cin = 16
    for w in (160, 320, 640):
        convs += [(cin, w, 9), (w, w, 9), (cin, w, 1)]  # first block with its 1×1 projection
        convs += [(w, w, 9)] * 6  # three more blocks
        cin = w
    layers = list(spec.stem) + [l for b in spec.blocks for l in b.path] + list(spec.head)
    layers += [b.shortcut_layer for b in spec.blocks if b.shortcut_layer is not None]
    assert sum(l.in_width * l.out_width * l.d for l in layers) == sum(a * b * k for a, b, k in convs) + 640 * 10
    assert spec.depth == 6 * 4 + 2  # stem + 24 block convs + fc (the name's 6n + 4 counts differently)
    with pytest.raises(ValueError, match="depth must be 6n\\+4"):
        wide_resnet_cifar(27, 2)


@pytest.mark.parametrize("arch,kw,spec", [
    ("resnet18", dict(image_size=32, width=4), resnet_imagenet(18, 5, 32, width=4)),
    ("resnet152", dict(image_size=32, width=2), resnet_imagenet(152, 5, 32, width=2)),
    ("wide_resnet101_2", dict(image_size=32, width=2), resnet_imagenet(101, 5, 32, width=2, widen=2,
                                                                       name="wide_resnet101_2")),
    ("wrn", dict(depth=10, widen=2, image_size=8), wide_resnet_cifar(10, 2, 5, 8)),
])
def test_build_model_reads_back_the_builders_spec(arch, kw, spec):
    assert build_model(arch, num_classes=5, **kw).spec() == spec


def test_flops_of_a_spec_file(tmp_path, capsys):
    path = save_spec(resnet_imagenet(18, 10, 64, width=16), tmp_path / "small18.toml")
    assert main(["flops", "--spec", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["model"] == "resnet18" and record["flops"] == ComplexityModel(load_spec(path)).flops()
    assert main(["flops", "--spec", str(tmp_path / "none.toml")]) == 2
    assert "cannot read the spec file" in capsys.readouterr().err


@pytest.mark.parametrize("arch,data_shape,expected", [
    ("resnet18", (3, 32, 32), resnet_imagenet(18, 10, 32)),
    ("wide_resnet50_2", (1, 64, 64), resnet_imagenet(50, 10, 64, widen=2, in_channels=1, name="wide_resnet50_2")),
    ("wrn", (3, 32, 32), wide_resnet_cifar(28, 10, 10, 32)),
])
def test_new_archs_from_a_configuration_take_their_shape_from_the_data(arch, data_shape, expected):
    from pruning.build import build_network
    from pruning.config import load_config

    cfg = load_config(None, [f"model.arch={arch}"])
    assert build_network(cfg, 10, data_shape, device="meta").spec() == expected


def test_new_arch_kwargs_are_validated():
    from pruning.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.kwargs.widen: unknown argument for arch 'resnet18'"):
        load_config(None, ["model.arch=resnet18", "model.kwargs.widen=2"])
    with pytest.raises(ConfigError, match="model.kwargs.depth: expected integer"):
        load_config(None, ["model.arch=wrn", "model.kwargs.depth=2.5"])
    with pytest.raises(ValueError, match="unknown keyword\\(s\\) widen for arch 'resnet34'"):
        build_model("resnet34", num_classes=3, widen=2)
    with pytest.raises(ValueError, match="widen applies to bottleneck blocks"):
        resnet_imagenet(34, widen=2)
