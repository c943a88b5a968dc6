"""``python -m pruning {train,evaluate,export,flops}``: exit codes, nothing written on a bad config, round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY_TOML = """
[data]
name = "digits"
options = { flatten = true }
train_subset = 128
test_subset = 64

[model]
arch = "residual_mlp"
kwargs = { hidden = [8, 8] }
theta_init = 0.5

[objective]
gamma = 0.01
delta = 0.5
lambda = 1.0

[optim.theta]
lr = 0.05

[train]
epochs = 1
batch_size = 16
prune_every = 2
device = "cpu"
progress = false
threads = 1
"""

BAD_TOML = """
[objective]
gamma = -1.0
rho = 3
[train]
eps = 0.0
epochs = 0
colour = "blue"
[model]
arch = "vgg16"
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pruning", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for cmd in ("train", "evaluate", "export", "flops"):
        assert cmd in proc.stdout


def test_bad_config_exits_2_naming_every_field_and_writes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(BAD_TOML)
    out = tmp_path / "run"
    proc = _run("train", "--config", str(cfg), "--out", str(out), "--set", "data.name=nope", "--set", "train.seed=x")
    assert proc.returncode == 2, proc.stderr
    for field in ("objective.gamma", "objective.rho", "train.eps", "train.epochs", "train.colour", "model.arch",
                  "data.name", "train.seed"):
        assert field in proc.stderr, field
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_train_evaluate_export_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--set", "export.enabled=false"]) == 0
    assert "done: test accuracy" in capsys.readouterr().out
    for name in ("checkpoint.pt", "log.csv", "report.json", "report.md", "config.toml"):
        assert (run / name).is_file(), name
    torch.load(run / "checkpoint.pt", weights_only=True)

    assert main(["evaluate", "--run", str(run), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    report = json.loads((run / "report.json").read_text())
    assert record["accuracy"] == pytest.approx(report["test_accuracy"])
    assert record["fPR"] == pytest.approx(report["fPR"]) and record["layers"] == report["layers_left"]

    exp = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(exp)]) == 0
    assert (exp / "state_dict.pt").is_file() and (exp / "model.pt2").is_file()
    capsys.readouterr()

    # a finished run is not overwritten; --resume continues it (here: nothing left, report rewritten)
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert not (tmp_path / "none").exists()
    capsys.readouterr()

    assert main(["flops", "--model", "resnet56", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 56


def test_divergence_exits_1_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    run = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--out", str(run), "--set", "optim.weights.lr=1e30",
                 "--set", "optim.weights.momentum=0.0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "training diverged" in err and "epoch 1, iteration" in err
    assert not (run / "checkpoint.pt").exists() and not (run / "report.json").exists()
