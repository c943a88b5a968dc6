"""``python -m pruning flops`` prints the reference totals of THEORY §3 through the one complexity model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pruning.cli import main


@pytest.mark.parametrize(
    "model, flops, params, rel",
    [
        ("resnet56", 125.49e6, 0.85e6, (0.00005, 0.006)),
        ("resnet110", 252.89e6, 1.73e6, (0.00005, 0.003)),
        ("resnet50", 4.09e9, 25.6e6, (0.01, 0.002)),
    ],
)
def test_flops_json(model, flops, params, rel, capsys):
    assert main(["flops", "--model", model, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["flops"] == pytest.approx(flops, rel=rel[0])
    assert record["params"] == pytest.approx(params, rel=rel[1])


def test_flops_text_and_per_layer(capsys):
    assert main(["flops", "--model", "resnet20", "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "resnet20:" in out and "blocks.8.path.1" in out and "head.0" in out


def test_flops_unknown_model_is_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "pruning", "flops", "--model", "vgg16"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice: 'vgg16'" in proc.stderr


def test_theory_help_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "theory", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "verify" in proc.stdout and "basin" in proc.stdout


def test_theory_import_does_not_import_torch():
    code = "import sys, theory, theory.verify, theory.checks; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
