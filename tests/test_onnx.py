"""ONNX export next to torch.export: checked against the torch module with onnxruntime; a notice without onnx."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pruning.export as export_mod
from pruning.cli import main
from pruning.config import load_config
from pruning.export import export_deterministic, save_onnx
from pruning.models import build_model
from pruning.train import Trainer, load_run

RUN = ["data.name=digits", "data.train_subset=96", "data.test_subset=32", "model.arch=resnet20",
       "model.kwargs.width=2", "model.theta_init=0.5", "optim.theta.lr=0.1", "train.epochs=1", "train.batch_size=16",
       "train.prune_every=2", "train.progress=false", "train.tensorboard=false", "train.threads=1",
       "train.device=cpu", "export.enabled=false"]


def test_onnx_export_of_a_run_matches_the_mean_field_network(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "run"
    Trainer(load_config(None, RUN), out).fit()
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "export"), "--onnx"]) == 0
    assert "onnx:" in capsys.readouterr().out
    _, model, _ = load_run(out)
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)  # another batch size than the export's example: the batch axis is dynamic
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_without_onnx_a_notice_and_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxscript") else object())
    assert not export_mod.onnx_available()
    det = export_deterministic(build_model("resnet20", num_classes=3, width=2, image_size=8))
    assert save_onnx(det, tmp_path / "model.onnx", torch.zeros(2, 3, 8, 8)) is None
    assert not (tmp_path / "model.onnx").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["notice: ONNX export skipped: onnx, onnxscript not installed (pip install '.[onnx]')"]
