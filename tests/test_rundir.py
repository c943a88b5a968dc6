"""Run folders: a folder that is not a run is never written to, one training per folder (lock), orphaned
temporary files are removed, ``--overwrite`` starts a run over, and every run records its provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pruning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "data.name=digits", "--set", "data.options.flatten=true", "--set", "data.train_subset=64",
        "--set", "data.test_subset=32", "--set", "model.arch=residual_mlp", "--set", "model.kwargs.hidden=[4, 4]",
        "--set", "train.epochs=1", "--set", "train.batch_size=32", "--set", "train.device=cpu",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "export.enabled=false"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    (out / "export").mkdir(parents=True)
    (out / "report.md").write_text("my own notes")
    (out / "config.toml").write_text("[mine]\n")
    (out / "export" / "state_dict.pt").write_bytes(b"my weights")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--out", str(out), *TINY, *extra]) == 2
        err = capsys.readouterr().err
        assert "is not empty and is not a run of this toolkit" in err
        assert "report.md" in err and "config.toml" in err and "export" in err
        assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["config.toml", "export",
                                                                                     "report.md"]


def test_a_folder_in_use_refuses_a_second_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # another process holding the lock the way RunLock does (flock + owner record), without importing torch
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, json, os, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB); f.write(json.dumps({'pid': os.getpid(), "
         "'host': os.uname().nodename, 'command': ['python', '-m', 'pruning', 'train']})); f.flush(); "
         "print('locked', flush=True); time.sleep(60)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["train", "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert "is in use by process" in err and str(holder.pid) in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written by the refused run
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and the next training proceeds
    assert (out / ".lock").exists()
    assert main(["train", "--out", str(out), *TINY]) == 0
    assert not (out / ".lock").exists()


@pytest.mark.slow  # two subprocesses that import torch: ~40 s on the shared 2-core machine
def test_two_trainings_at_once_on_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pruning", "train", "--out", str(out), *TINY, "--set", "train.epochs=3"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    assert "in use by process" in loser or "already holds a run" in loser
    assert json.loads((out / "report.json").read_text())["config"]["train"]["epochs"] == 3


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    assert main(["train", "--out", str(out), *TINY]) == 0


def test_orphaned_temporary_files_are_removed_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    orphans = [out / ".checkpoint.k3j_x9a2.tmp.pt", out / ".log.abcdefgh.tmp.csv", out / ".report.zz0000zz.tmp.md"]
    for p in orphans:
        p.write_bytes(b"half written")
    keep = out / ".my-hidden-notes.txt"
    keep.write_text("not an orphan")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert not any(p.exists() for p in orphans) and keep.exists()


def test_overwrite_starts_a_finished_run_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--set", "train.seed=1"]) == 0
    (out / "my-notes.txt").write_text("keep me")
    (out / ".report.abcd1234.tmp.md").write_text("orphan")
    capsys.readouterr()
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "already holds a run (finished: checkpoint after 1 of 1 epochs)" in capsys.readouterr().err
    assert main(["train", "--out", str(out), *TINY, "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["config"]["train"]["seed"] == 0
    assert (out / "my-notes.txt").read_text() == "keep me" and not (out / ".report.abcd1234.tmp.md").exists()
    runs = json.loads((out / "provenance.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["overwrite"] is True
    assert main(["train", "--out", str(out), "--resume", "--overwrite"]) == 2


def test_provenance_and_train_log(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--set", "train.progress=true"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    rec = prov["runs"][-1]
    assert rec["command"][:4] == ["python", "-m", "pruning", "train"] and "--out" in rec["command"]
    assert rec["status"] == "completed" and rec["device"]["device"] == "cpu" and rec["host"]
    assert "torch" in rec["packages"] and "numpy" in rec["packages"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert rec["git"]["commit"] == head.stdout.strip()
    log = (out / "train.log").read_text()
    assert "train --out" in log and "epoch   1" in log and "done: test accuracy" in log
    assert "\r" not in log  # progress bars stay on the console
    time.sleep(0.01)
    assert main(["train", "--out", str(out), "--resume"]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert [r["resume"] for r in prov["runs"]] == [False, True]
    assert (out / "train.log").read_text().count("done: test accuracy") == 2


def test_a_diverged_run_records_its_outcome(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--set", "optim.weights.lr=1e30",
                 "--set", "optim.weights.momentum=0.0"]) == 1
    assert json.loads((out / "provenance.json").read_text())["runs"][-1]["status"] == "diverged"
    assert "training diverged" in (out / "train.log").read_text()
    capsys.readouterr()
    # a run that stopped before its first checkpoint is started over explicitly
    assert main(["train", "--out", str(out), *TINY]) == 2
    assert "no checkpoint, its first epoch did not finish" in capsys.readouterr().err
    assert main(["train", "--out", str(out), *TINY, "--overwrite"]) == 0
