"""Your network, end to end: a converted torchvision-style ResNet-18 and a spec-file network train, prune,
export, evaluate and resume — every one rebuilt from the spec its checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import tvmirror as tv
from fakedata import write_cifar10

import pruning
from pruning.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from pruning.cli import main
from pruning.config import ConfigError, load_config
from pruning.train import Trainer, load_run
from theory.spec import NetworkSpec, load_spec

QUIET = ["train.progress=false", "train.tensorboard=false", "train.threads=1", "train.device=cpu"]
DIGITS = [*QUIET, "data.name=digits", "data.train_subset=128", "data.test_subset=64"]


def _program(path: Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()


# ------------------------------------------------------------------------------------------------
# The headline: torchvision-style ResNet-18 -> gate -> train with pruning -> export == mean-field network
# ------------------------------------------------------------------------------------------------


def test_torchvision_resnet18_converted_trained_pruned_exported(tmp_path, capsys):
    torch.set_num_threads(1)
    root = tmp_path / "data"
    write_cifar10(root, n_per_batch=8, n_test=10)  # 40 training images 3×32×32
    torch.manual_seed(0)
    module = tv.resnet18(num_classes=10)  # torchvision's module names and state-dict keys, full width
    net = pruning.gate(module, torch.randn(2, 3, 32, 32), theta_init=0.3)
    baseline = net.spec()
    cfg = load_config(None, [
        *QUIET, "data.name=cifar10", f"data.root={root}", "train.epochs=1", "train.batch_size=8",
        "train.eval_batch_size=10", "train.prune_every=2", "optim.theta.lr=0.2", "objective.gamma=0.5",
        "optim.weights.lr=0.01",
    ])
    out = tmp_path / "run"
    report = pruning.Trainer(cfg, out, model=net).fit()
    # it pruned something, and the Python object is the trained, compacted network
    assert report["fPR"] > 0 and report["prune_events"] >= 1
    assert net.spec() != baseline and net.spec().depth == report["layers_left"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["config"]["model"]["arch"] == "custom"
    ckpt = load_checkpoint(out)
    assert NetworkSpec.from_dict(ckpt["network"]["spec"]) == baseline

    # the exported program equals the gated mean-field network: in memory and rebuilt from the checkpoint
    x = torch.randn(4, 3, 32, 32)
    program = _program(out / "export" / "model.pt2")
    net.eval()
    _, rebuilt, _ = load_run(out)
    assert rebuilt.spec() == net.spec()
    with torch.no_grad():
        mean_field = net(x)
        assert torch.allclose(rebuilt(x), mean_field, atol=1e-5, rtol=1e-5)
        assert torch.allclose(program(x), mean_field, atol=1e-4, rtol=1e-4)

    # evaluate and export from the command line need nothing but the run directory
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["fPR"] == pytest.approx(report["fPR"])
    assert record["accuracy"] == pytest.approx(report["test_accuracy"])
    assert record["baseline_flops"] == report["baseline_flops"]
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "again")]) == 0
    with torch.no_grad():
        assert torch.allclose(_program(tmp_path / "again" / "model.pt2")(x), mean_field, atol=1e-4, rtol=1e-4)
    assert NetworkSpec.from_dict(json.loads((tmp_path / "again" / "spec.json").read_text())) == net.spec()


# ------------------------------------------------------------------------------------------------
# A spec file run from the command line: train (interrupted), resume, evaluate, export
# ------------------------------------------------------------------------------------------------

TINY_CNN = """
name = "tiny-cnn"
input_shape = [1, 8, 8]   # scikit-learn digits, one channel
num_classes = 10

[[stem]]
kind = "conv2d"
in_width = 1
out_width = 6
kernel = 3
bn = true
act = true

[[blocks]]
name = "b0"
in_width = 6
out_width = 6
[[blocks.path]]
kind = "conv2d"
in_width = 6
out_width = 6
kernel = 3
bn = true
act = true
[[blocks.path]]
kind = "conv2d"
in_width = 6
out_width = 6
kernel = 3
bn = true

[[blocks]]
name = "b1"
in_width = 6
out_width = 12
shortcut = "projection"
[[blocks.path]]
kind = "conv2d"
in_width = 6
out_width = 12
kernel = 3
stride = 2
bn = true
act = true
[[blocks.path]]
kind = "conv2d"
in_width = 12
out_width = 12
kernel = 3
bn = true
[blocks.shortcut_layer]
kind = "conv2d"
in_width = 6
out_width = 12
stride = 2
bn = true

[[head]]
kind = "linear"
in_width = 12
out_width = 10
bias = true
"""

SPEC_RUN = [
    *DIGITS, "model.arch=spec",
    "model.theta_init=0.5", "optim.theta.lr=0.05", "objective.gamma=0.05", "train.epochs=2", "train.batch_size=16",
    "train.eval_batch_size=64", "train.prune_every=2",
]


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "tiny_cnn.toml"
    path.write_text(TINY_CNN)
    return path


def test_spec_file_run_resume_evaluate_export(tmp_path, spec_file, capsys):
    spec = load_spec(spec_file)
    assert [b.out_size for b in spec.blocks] == [(8, 8), (4, 4)]  # derived from input_shape and strides
    overrides = [*SPEC_RUN, f"model.spec={spec_file}"]
    out = tmp_path / "run"
    Trainer(load_config(None, overrides), out).fit(stop_after=1)  # interrupted after epoch 1
    full = tmp_path / "full"
    Trainer(load_config(None, overrides), full).fit()
    spec_file.unlink()  # the checkpoint carries the network: the file is not needed any more
    assert main(["train", "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["baseline_flops"] == json.loads((full / "report.json").read_text())["baseline_flops"]
    assert resumed["fPR"] == json.loads((full / "report.json").read_text())["fPR"]
    assert resumed["test_accuracy"] == json.loads((full / "report.json").read_text())["test_accuracy"]
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["fPR"] == pytest.approx(resumed["fPR"]) and record["accuracy"] == pytest.approx(
        resumed["test_accuracy"])
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "export")]) == 0
    _, model, _ = load_run(out)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(_program(tmp_path / "export" / "model.pt2")(x), model(x), atol=1e-5)
    # a fresh run needs the file, and says so naming the field
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "new"), *sum((["--set", o] for o in overrides), [])]) == 2
    assert "model.spec:" in capsys.readouterr().err


def test_spec_config_validation(tmp_path, spec_file):
    with pytest.raises(ConfigError, match="model.spec: arch 'spec' needs the path of a spec file"):
        load_config(None, ["model.arch=spec"])
    with pytest.raises(ConfigError, match='model.spec: is used only with model.arch = "spec"'):
        load_config(None, [f"model.spec={spec_file}"])
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_CNN.replace("kernel = 3\nstride = 2", "kernel = 3\nstride = 2\nout_size = [8, 8]", 1))
    with pytest.raises(ConfigError, match=r"model.spec: .*bad.toml.blocks\[1\].path\[0\].out_size: \[8, 8\] differs"):
        load_config(None, ["model.arch=spec", f"model.spec={bad}"])
    with pytest.raises(ConfigError, match="model.kwargs.width: unknown argument for arch 'spec'"):
        load_config(None, ["model.arch=spec", f"model.spec={spec_file}", "model.kwargs.width=3"])
    # a network that does not fit the data: a clear error before anything is written
    cfg = load_config(None, [*SPEC_RUN, f"model.spec={spec_file}", "data.options.flatten=true"])
    with pytest.raises(ValueError, match=r"model.spec \(.*\): the network takes inputs of shape \(1, 8, 8\), the "
                                         r"data has \(64,\)"):
        Trainer(cfg, tmp_path / "x")
    assert not (tmp_path / "x" / CHECKPOINT).exists()


def test_given_network_must_match_the_config_and_the_data(tmp_path):
    cfg = load_config(None, [*DIGITS, "train.epochs=1"])
    net = pruning.build_model("resnet20", num_classes=10, width=2, image_size=8, in_channels=1, mode="unit")
    with pytest.raises(ValueError, match="model.mode = 'combined' but the given network was built with mode 'unit'"):
        Trainer(cfg, tmp_path / "a", model=net)
    net = pruning.build_model("resnet20", num_classes=7, width=2, image_size=8, in_channels=1)
    with pytest.raises(ValueError, match="the given network: the network has 7 classes, the data 10"):
        Trainer(cfg, tmp_path / "b", model=net)
    with pytest.raises(ValueError, match="do not pass model="):
        Trainer(cfg, tmp_path / "c", model=net, resume=True)
    with pytest.raises(TypeError, match="GatedNetwork"):
        Trainer(cfg, tmp_path / "d", model=torch.nn.Linear(2, 2))
    custom = load_config(None, [*DIGITS, "model.arch=custom"])
    with pytest.raises(ValueError, match="model.arch = 'custom' names a network given in Python"):
        Trainer(custom, tmp_path / "e")


def test_checkpoint_without_network_record_still_loads(tmp_path):
    """Checkpoints written before the network record existed are rebuilt from their configuration."""
    overrides = [*DIGITS, "model.arch=resnet20", "model.kwargs.width=2", "train.epochs=1",
                 "export.enabled=false"]
    out = tmp_path / "run"
    Trainer(load_config(None, overrides), out).fit()
    ckpt = load_checkpoint(out)
    _, with_record, _ = load_run(out)
    del ckpt["network"]
    save_checkpoint(out / CHECKPOINT, ckpt)
    _, without, _ = load_run(out)
    assert without.spec() == with_record.spec()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(without(x), with_record(x))


def test_network_given_in_python_resumes_from_the_command_line(tmp_path):
    """A run of a network given to the Trainer (arch "custom") resumes from its checkpoint alone, bit for bit."""
    overrides = [*DIGITS, "model.theta_init=0.5", "optim.theta.lr=0.05", "train.epochs=2", "train.batch_size=32",
                 "export.enabled=false"]

    def network():
        torch.manual_seed(5)
        return pruning.build_model("resnet20", num_classes=10, width=2, image_size=8, in_channels=1, theta_init=0.5)

    Trainer(load_config(None, overrides), tmp_path / "full", model=network()).fit()
    Trainer(load_config(None, overrides), tmp_path / "cut", model=network()).fit(stop_after=1)
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, cut = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "cut"))
    assert cut["config"]["model"]["arch"] == "custom"
    for key in ("fPR", "pPR", "test_accuracy", "test_loss", "layers_left"):
        assert cut[key] == full[key], key
