"""Damaged and foreign checkpoints: every reader (train --resume, evaluate, export, load_run) names the file,
says what is wrong, never suggests ``weights_only=False``, exits 2 and modifies nothing; no code in them runs."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pruning.cli import main

TINY = ["--set", "data.name=digits", "--set", "data.options.flatten=true", "--set", "data.train_subset=64",
        "--set", "data.test_subset=32", "--set", "model.arch=residual_mlp", "--set", "model.kwargs.hidden=[4, 4]",
        "--set", "train.epochs=1", "--set", "train.batch_size=32", "--set", "train.device=cpu",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "export.enabled=false"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


class _Marker:
    """Pickles to a call that creates a file: proof that code ran if the file exists."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (os.rename, (str(self.path) + ".src", str(self.path)))


def _damage(kind: str, data: bytes, marker: Path) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "overwritten":
        return data[:1000] + b"\0" * 4000 + data[5000:]
    if kind == "text":
        return b"this is not a checkpoint\n" * 20
    if kind == "random":
        return os.urandom(4096)
    buf = io.BytesIO()
    if kind == "foreign-list":
        torch.save([1, 2, 3], buf)
    elif kind == "foreign-dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, buf)
    elif kind == "malicious":
        torch.save({"model": _Marker(marker)}, buf)
    elif kind == "malicious-pickle":
        return pickle.dumps({"model": _Marker(marker)})
    elif kind == "nan-weights":
        ckpt = torch.load(io.BytesIO(data), weights_only=True)
        first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
        ckpt["model"][first] = torch.full_like(ckpt["model"][first], float("nan"))
        torch.save(ckpt, buf)
    return buf.getvalue()


KINDS = ["empty", "truncated", "overwritten", "text", "random", "foreign-list", "foreign-dict", "malicious",
         "malicious-pickle", "nan-weights"]
COMMANDS = {
    "resume": lambda run: ["train", "--out", str(run), "--resume"],
    "resume-with-config": lambda run: ["train", "--out", str(run), "--resume", *TINY],
    "evaluate": lambda run: ["evaluate", "--run", str(run)],
    "export": lambda run: ["export", "--run", str(run)],
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_damaged_or_foreign_checkpoint_exits_2_naming_the_file(
    tmp_path: Path, good_run: Path, capsys: pytest.CaptureFixture[str], kind: str, command: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "code-ran"
    (tmp_path / "code-ran.src").write_text("x")
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(_damage(kind, ckpt.read_bytes(), marker))
    before = _snapshot(run)
    capsys.readouterr()
    code = main(COMMANDS[command](run))
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(ckpt) in err
    assert "damaged" in err or "not a checkpoint of this toolkit" in err or "NaN" in err
    assert "weights_only" not in err and "Traceback" not in err
    assert _snapshot(run) == before, "a refused checkpoint must leave the run folder as it was"
    assert not marker.exists(), "loading a checkpoint ran code"


def test_load_run_and_load_checkpoint_raise_checkpoint_error(tmp_path: Path, good_run: Path) -> None:
    from pruning.checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint
    from pruning.train import load_run

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / "checkpoint.pt").write_bytes(b"")
    for fn in (load_checkpoint, load_run):
        with pytest.raises(CheckpointError, match=r"checkpoint.pt: the checkpoint is damaged \(an empty file\)"):
            fn(run)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)


@pytest.mark.parametrize("record", ["network", "config (a checkpoint without a network record)"])
def test_a_checkpoint_that_does_not_fit_its_configuration(record: str, tmp_path: Path, good_run: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    if record == "network":  # the network the checkpoint rebuilds from: one block more than its state holds
        blocks = ckpt["network"]["spec"]["blocks"]
        blocks.append(dict(blocks[-1], name="extra"))
    else:
        del ckpt["network"]
        ckpt["config"]["model"]["kwargs"]["hidden"] = [4, 4, 4]  # three blocks: the state no longer fits
    torch.save(ckpt, run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / "checkpoint.pt") in err and "does not fit" in err and "Traceback" not in err
