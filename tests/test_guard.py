"""The non-finite guard: divergence stops the run with its epoch and iteration; nothing non-finite is written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import pruning.train as train_mod
from pruning.checkpoint import CHECKPOINT, save_checkpoint
from pruning.cli import main
from pruning.gates import UnitGate, shared_sample
from pruning.models import build_model
from pruning.report import REPORT_JSON
from pruning.step import NonFiniteObjective
from pruning.train import Trainer, TrainingDiverged, export_run

# A tiny BatchNorm network (ResNet-20 at width 4 on 8×8 digits): large learning rates make weights, θ and BN
# statistics overflow while J stays finite, the failure the J check alone let through.
BN_TOML = """
[data]
name = "digits"
train_subset = {n}
test_subset = 64

[model]
arch = "resnet20"
kwargs = {{ width = 4 }}
theta_init = 0.5

[objective]
gamma = 0.01

[train]
epochs = {epochs}
batch_size = 32
prune_every = 2
device = "cpu"
progress = false
threads = 1
tensorboard = false

[export]
enabled = false
"""


def _all_finite(x: Any) -> bool:
    """Every floating tensor in a nested state is finite (independent of pruning.guard)."""
    if torch.is_tensor(x):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v) for v in x)
    return True


def _bn_config(tmp_path: Path, n: int, epochs: int) -> Path:
    path = tmp_path / "bn.toml"
    path.write_text(BN_TOML.format(n=n, epochs=epochs))
    return path


@pytest.mark.parametrize(("lr", "n", "epochs"), [
    ("1e3", 128, 2),  # before: torch.bernoulli "Expected p_in >= 0 && p_in <= 1" traceback in epoch 2
    ("1e6", 96, 1),  # before: "done", exit 0, BatchNorm running_var = inf in checkpoint and report
    ("1e8", 96, 1),  # before: "done", exit 0, NaN weights in checkpoint and report
])
def test_divergence_exits_1_naming_epoch_and_iteration_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lr: str, n: int, epochs: int
) -> None:
    run = tmp_path / "run"
    code = main(["train", "--config", str(_bn_config(tmp_path, n, epochs)), "--out", str(run),
                 "--set", f"optim.weights.lr={lr}"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "training diverged" in err and "at epoch 1, iteration" in err and "Traceback" not in err
    assert not (run / CHECKPOINT).exists() and not (run / REPORT_JSON).exists()


def test_divergence_in_epoch_2_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pruning.config import load_config

    cfg = load_config(_bn_config(tmp_path, 128, 2))
    real_lr_at = train_mod.lr_at
    monkeypatch.setattr(train_mod, "lr_at", lambda c, step, spe: 1e8 if step >= spe + 1 else real_lr_at(c, step, spe))
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"at epoch 2, iteration \d/4") as info:
        trainer.fit()
    assert "last good checkpoint" in str(info.value) and "after epoch 1" in str(info.value)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ckpt["progress"]["epoch"] == 1
    assert _all_finite(ckpt["model"]) and _all_finite(ckpt["optim_w"]) and _all_finite(ckpt["optim_theta"])
    assert not (tmp_path / "run" / REPORT_JSON).exists()


def test_a_non_finite_test_loss_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_train import tiny

    real = train_mod.evaluate
    calls = {"n": 0}

    def evaluate(*args: Any, **kwargs: Any) -> tuple[float, float]:
        calls["n"] += 1
        loss, acc = real(*args, **kwargs)
        return (math.nan if calls["n"] == 2 else loss), acc

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    trainer = Trainer(tiny(), tmp_path)
    with pytest.raises(TrainingDiverged, match=r"non-finite test loss \(nan.*at epoch 2, iteration 16/16"):
        trainer.fit()
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["progress"]["epoch"] == 1 and len(ckpt["progress"]["log"]) == 1
    assert not (tmp_path / REPORT_JSON).exists()


def test_evaluate_reports_a_non_finite_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import pruning.evaluation

    run = tmp_path / "run"
    assert main(["train", "--config", str(_bn_config(tmp_path, 32, 1)), "--out", str(run)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(pruning.evaluation, "evaluate", lambda *a, **k: (math.inf, 0.1))
    assert main(["evaluate", "--run", str(run)]) == 1
    assert "loss of the checkpoint's network is not finite (inf)" in capsys.readouterr().err


# -- the parts ------------------------------------------------------------------------------------------


def test_finite_flag_and_first_nonfinite() -> None:
    from pruning.guard import finite_flag, first_nonfinite

    good = [torch.randn(3), torch.full((2, 2), 1e38), torch.zeros(0)]
    assert bool(finite_flag(good)) and first_nonfinite({"a": good}) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(4, dtype=torch.bfloat16)
        t[2] = bad
        assert not bool(finite_flag([*good, t]))
        assert first_nonfinite({"a": good, "b": [torch.ones(1), t]}) == "b.1"
    assert first_nonfinite({"rng": torch.zeros(3, dtype=torch.uint8), "n": 1.0}) is None


def test_a_nan_theta_draws_zero_instead_of_failing() -> None:
    gate = UnitGate(4)
    gate.train()
    with torch.no_grad():
        gate.theta.copy_(torch.tensor([float("nan"), 1.0, 0.0, float("nan")]))
    assert gate.draw().tolist() == [0.0, 1.0, 0.0, 0.0]
    with shared_sample([gate]):
        gate.multiplier()


def _mlp() -> torch.nn.Module:
    return build_model("residual_mlp", num_classes=3, in_features=4, hidden=[3])


def test_guard_reports_the_update_that_spoilt_the_state() -> None:
    from pruning.guard import FiniteGuard, NonFiniteUpdate

    model = _mlp()
    guard = FiniteGuard()
    guard.arm(model, where=(1, 5, 9, 5))
    guard.settle()  # all finite
    with torch.no_grad():
        model.blocks[0].path[0].op.weight[0, 0] = float("inf")
    guard.arm(model, where=(1, 6, 9, 6))
    with pytest.raises(NonFiniteUpdate) as info:
        guard.settle()
    assert info.value.where == (1, 6, 9, 6) and info.value.name == "blocks.0.path.0.op.weight"


def test_guard_a_non_finite_objective_after_an_update_names_the_update() -> None:
    from pruning.guard import FiniteGuard, NonFiniteUpdate

    model = _mlp()
    guard = FiniteGuard()

    class Terms:
        total = torch.tensor(float("nan"))

    with pytest.raises(NonFiniteObjective):  # nothing armed: the objective itself
        guard.check(Terms())
    guard.arm(model, where="k")
    with torch.no_grad():
        model.blocks[0].block_gate.theta.fill_(float("nan"))
    with pytest.raises(NonFiniteUpdate, match="blocks.0.block_gate.theta"):
        guard.check(Terms())


def test_guard_every_step_flag_is_read_with_the_next_objective() -> None:
    from pruning.guard import FiniteGuard, NonFiniteUpdate

    model = _mlp()
    guard = FiniteGuard(every=1)
    with torch.no_grad():
        model.blocks[0].path[0].op.bias.fill_(float("nan"))
    guard.arm(model, where="k")

    class Terms:
        total = torch.tensor(1.0)

    with pytest.raises(NonFiniteUpdate):
        guard.check(Terms())


def test_a_checkpoint_or_export_with_nan_is_refused(tmp_path: Path) -> None:
    from pruning.guard import NonFiniteState

    model = _mlp()
    with torch.no_grad():
        model.head[0].op.weight[0, 0] = float("nan")
    state = {"model": model.state_dict(), "optim_w": {}, "optim_theta": None}
    with pytest.raises(NonFiniteState, match="head.0.op.weight"):
        save_checkpoint(tmp_path / CHECKPOINT, state)
    assert not (tmp_path / CHECKPOINT).exists()
    with pytest.raises(NonFiniteState, match="head.0.op.weight"):
        export_run(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()
