"""Training, compaction and export on a CUDA device (marker ``cuda``; skipped without a GPU).

``benchmarks/device_check.sh`` runs these on the GPU.  ``PRUNING_TEST_DEVICE=cpu`` runs the same tests
on the CPU (bf16 autocast and ``channels_last`` exist there too): the rehearsal of the device check
on a machine without a GPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from pruning.compaction import prune
from pruning.config import load_config
from pruning.export import export_deterministic, save_export
from pruning.models import build_model
from pruning.optim import make_optimizers
from pruning.report import REPORT_JSON
from pruning.train import Trainer, load_run

pytestmark = pytest.mark.cuda


@pytest.fixture
def device() -> torch.device:
    if os.environ.get("PRUNING_TEST_DEVICE") == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (PRUNING_TEST_DEVICE=cpu rehearses these tests on the CPU)")
    return torch.device("cuda")


# a 2-D ResNet-20 of width 4 on the 8x8 digits (1 channel): convolutions, BatchNorm, option-A shortcuts
RESNET = [
    "data.name=digits", "data.train_subset=256", "data.test_subset=128",
    "model.arch=resnet20", "model.kwargs={width = 4, image_size = 8, in_channels = 1}", "model.theta_init=0.5",
    "objective.gamma=0.02", "optim.weights.lr=0.05", "optim.theta.lr=0.05",
    "train.epochs=2", "train.batch_size=32", "train.eval_batch_size=128", "train.prune_every=2",
    "train.progress=false", "train.tensorboard=false", "train.threads=1", "train.timing_steps=3",
]


def test_training_bf16_channels_last_prunes_exports_and_times(tmp_path: Path, device: torch.device) -> None:
    cfg = load_config(None, [*RESNET, f"train.device={device.type}", "train.amp_bf16=true",
                             "train.channels_last=true"])
    trainer = Trainer(cfg, tmp_path)
    assert trainer.device.type == device.type
    report = trainer.fit()
    assert report is not None
    assert all(p.device.type == device.type for p in trainer.model.parameters())
    assert trainer.progress.events, "no structure was removed"
    assert report["fPR"] > 0 and math.isfinite(report["test_loss"])
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    # the weights of 4-D convolutions stay channels_last after every compaction
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    timing = report["timing"]
    assert timing["device"].startswith(device.type)
    assert timing["dense_reference_step_s"] > 0 and timing["measured_train_time_ratio"] > 0
    assert report["inference"]["speedup"] > 0
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    program = torch.export.load(data["exports"]["program"]).module()
    _, model, _ = load_run(tmp_path, device=device.type)
    x = torch.randn(4, 1, 8, 8, device=device)
    assert torch.allclose(program(x), model(x), atol=1e-4, rtol=1e-4)


def test_compaction_on_device_carries_optimizer_state(device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, width=8, image_size=8, in_channels=3).to(device)
    model = model.to(memory_format=torch.channels_last)
    cfg = load_config(None, [])
    opt_w, opt_t = make_optimizers(cfg, model.weight_parameters(), model.gate_parameters())
    x = torch.randn(8, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=device)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt_w.step()
    assert opt_t is not None
    opt_t.step()
    units = [g for g in model.gate_parameters() if g.dim() == 1]
    blocks = [g for g in model.gate_parameters() if g.dim() == 0]
    with torch.no_grad():
        units[0][: units[0].numel() // 2] = 0.0  # half of the first gated layer's units
        blocks[-1].fill_(0.0)  # and the last block
    flops0 = model.spec()
    event = prune(model, 0.1, [opt_w, opt_t], step=1)
    assert not event.empty and model.spec() != flops0
    for opt in (opt_w, opt_t):
        for group in opt.param_groups:
            for p in group["params"]:
                assert p.device.type == device.type
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.dim():
                        assert v.device.type == device.type and v.shape == p.shape
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt_w.step()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_export_on_device_matches_the_mean_field_network(tmp_path: Path, device: torch.device) -> None:
    torch.manual_seed(1)
    model = build_model("resnet20", num_classes=10, width=8, image_size=8, in_channels=3,
                        theta_init=0.7).to(device).eval()
    with torch.no_grad():
        next(g for g in model.gate_parameters() if g.dim() == 1)[:3] = 0.05
    det = export_deterministic(model, eps=0.1)
    assert next(det.parameters()).device.type == device.type
    x = torch.randn(5, 3, 8, 8, device=device)
    with torch.no_grad():
        ref = export_deterministic(model)(x)  # uncompacted, θ folded
        out = det(x)
    assert out.shape == (5, 10)
    # removing θ = 0.05 units changes the output by their contribution only; the folded network equals
    # the mean-field network exactly
    with torch.no_grad():
        assert torch.allclose(ref, model(x), atol=1e-4, rtol=1e-4)
    paths = save_export(det, tmp_path / "export")
    program = torch.export.load(paths["program"]).module()
    assert torch.allclose(program(x), out, atol=1e-4, rtol=1e-4)
