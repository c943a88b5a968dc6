"""Data-parallel training (torchrun, DDP, gloo on CPU) and long-run safety: sharded data, per-rank gate streams,
lock-step pruning, cross-rank identity, 2-vs-1 process equivalence, mid-epoch checkpoints, clean stops on
SIGINT/SIGTERM, crash + automatic restart (torchrun --max-restarts) resuming bit for bit.

The multi-process runs are two ``torchrun --nproc_per_node=2`` launches (``tests/dist_driver.py``):
one runs several scenarios in one process group (module fixture), the other a crash and restart.
Every subprocess has a time limit and is killed with its process group on failure.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_driver import COMBINED, NONE, TINY, bn_run

from pruning import cli
from pruning.checkpoint import CHECKPOINT, load_checkpoint
from pruning.config import load_config
from pruning.data import InMemoryDataset, RandomCropFlip, WorkerLoader, make_loader, shard_bounds
from pruning.distributed import DistContext, prune_decision, state_digest
from pruning.gates import UnitGate, sampling_generator, shared_sample
from pruning.guard import first_nonfinite
from pruning.report import REPORT_JSON
from pruning.runlog import LOG_CSV, SYNC_CSV, TIME_FIELDS
from pruning.runtime import gate_seed
from pruning.train import Trainer

REPO = Path(__file__).resolve().parents[1]
DRIVER = str(REPO / "tests" / "dist_driver.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_bounded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` from the repository root; on timeout kill its whole process group and fail."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def ckpt(run: Path) -> dict[str, Any]:
    return torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)


def comparable(c: dict[str, Any]) -> dict[str, Any]:
    """What must be identical between two runs of the same configuration (no times, no config echo)."""
    prog = {k: v for k, v in c["progress"].items() if k not in ("train_time_s", "epoch_time_s")}
    prog["log"] = [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in prog["log"]]
    return {"model": c["model"], "structure": c["structure"], "optim_w": c["optim_w"], "optim_theta": c["optim_theta"],
            "progress": prog, "audit": c["audit"]}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            scale = float(v.abs().max()) or 1.0
            worst = max(worst, float((v - b[k]).abs().max()) / scale)
    return worst


# --------------------------------------------------------------------------------------------------
# fixtures: the 2-process scenarios (one torchrun launch) and the 1-process references (in process)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    res = run_bounded([*TORCHRUN, DRIVER, "scenarios", str(root)], timeout=480)
    assert res.returncode == 0, res.stdout[-6000:]
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The combined run of the scenarios on one process, uninterrupted."""
    out = tmp_path_factory.mktemp("ref") / "combined"
    Trainer(load_config(None, COMBINED), out).fit()
    return out


def rank_records(root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads((root / name / f"rank{r}.json").read_text()) for r in range(2)]


# --------------------------------------------------------------------------------------------------
# sharding and gate streams (one process)
# --------------------------------------------------------------------------------------------------


def _images(n: int) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return InMemoryDataset(x, torch.arange(n) % 10, mean=(0.5,) * 3, std=(0.25,) * 3, pixel_scale=1 / 255,
                           augment=RandomCropFlip(padding=2))


class _Plain(torch.utils.data.Dataset):
    """A lazily indexed dataset (goes through the WorkerLoader)."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(i)), i


@pytest.mark.parametrize("world", [2, 4])
def test_every_global_batch_is_split_into_disjoint_parts_with_the_same_augmentation(world: int) -> None:
    data = _images(40)
    whole = list(make_loader(data, 8, train=True, seed=3).iter_epoch(1, start_batch=1))
    parts = [list(make_loader(data, 8, train=True, seed=3, rank=r, world_size=world).iter_epoch(1, start_batch=1))
             for r in range(world)]
    assert all(len(p) == len(whole) == 4 for p in parts)
    for k, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[k][0] for p in parts]), x), f"batch {k}: inputs/augmentation differ"
        assert torch.equal(torch.cat([p[k][1] for p in parts]), y)
    lazy = [[b[1].tolist() for b in WorkerLoader(_Plain(), 6, train=True, seed=1, drop_last=True, epoch=0,
                                                  rank=r, world_size=2).iter_epoch(2)] for r in range(2)]
    full = [b[1].tolist() for b in WorkerLoader(_Plain(), 6, train=True, seed=1, drop_last=True, epoch=0)
            .iter_epoch(2)]
    assert [a + b for a, b in zip(*lazy)] == full


def test_eval_parts_cover_the_split_once() -> None:
    data = _images(21)  # batches of 8, 8, 5: the last one splits 1/1/1/2 over 4 processes
    seen = []
    for r in range(4):
        for _, y in make_loader(data, 8, train=False, seed=0, rank=r, world_size=4):
            assert len(y) > 0
            seen += y.tolist()
    assert sorted(seen) == sorted((torch.arange(21) % 10).tolist())
    assert [shard_bounds(5, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 5)]


def test_global_batch_must_divide_by_the_world_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train.batch_size = 16 .* world size 3"):
        Trainer(load_config(None, TINY), tmp_path, dist=DistContext(rank=0, world_size=3))
    with pytest.raises(ValueError, match="global batch size 16 does not divide by the world size 3"):
        make_loader(_images(40), 16, train=True, seed=0, rank=1, world_size=3)


def test_gate_samples_come_from_a_stream_per_seed_rank_and_step() -> None:
    assert len({gate_seed(0, r, k) for r in range(4) for k in range(50)}) == 200
    gates = [UnitGate(64, theta_init=0.5) for _ in range(2)]

    def draw(seed: int) -> list[torch.Tensor]:
        with sampling_generator(torch.Generator().manual_seed(seed)), shared_sample(gates):
            return [g.multiplier().detach().clone() for g in gates]

    a, b, c = draw(gate_seed(0, 0, 7)), draw(gate_seed(0, 0, 7)), draw(gate_seed(0, 1, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_prune_decision_and_digest_see_single_bits() -> None:
    t = [torch.tensor(0.5), torch.tensor([0.05, 0.9])]
    d = prune_decision(t, 0.1)
    assert d.tolist() == [0.5, pytest.approx(0.05), pytest.approx(0.9), 0.0, 1.0, 0.0]
    u = [t[0], torch.tensor([0.05, torch.nextafter(torch.tensor(0.9), torch.tensor(1.0)).item()])]
    assert state_digest([("a", x) for x in t]) != state_digest([("a", x) for x in u])


# --------------------------------------------------------------------------------------------------
# two processes
# --------------------------------------------------------------------------------------------------


def test_two_processes_stay_bit_identical_and_prune_in_lock_step(scenarios: Path) -> None:
    run = scenarios / "combined"
    rows = [line.split(",") for line in (run / SYNC_CSV).read_text().splitlines()[1:]]
    steps = [int(r[0]) for r in rows if r[1] == "step"]
    prunes = [int(r[0]) for r in rows if r[1] == "prune"]
    assert steps == list(range(1, 33)), "a parameter digest comparison after every step"
    report = json.loads((run / REPORT_JSON).read_text())
    assert len(prunes) == report["prune_events"] > 0, "a comparison after every prune event"
    assert all(r[2] == "2" and r[3] == "1" and r[4] == r[5] and len(r[4]) == 64 for r in rows)
    a, b = rank_records(scenarios, "combined")
    assert a["digest"] == b["digest"] and a["events"] == b["events"] == report["prune_events"]
    assert report["processes"] == 2 and report["samples"] == 512 and report["fPR"] > 0
    # 32 steps, checkpoints every 4 inside the epochs (3 per epoch) and at the 2 epoch ends: all by rank 0
    assert a["writes"] == {"checkpoint": 8, "report": 1} and b["writes"] == {"checkpoint": 0, "report": 0}
    assert (run / LOG_CSV).read_text().count("\n") == 3


def test_exact_difference_estimates_and_audit_mode_stay_in_lock_step(scenarios: Path) -> None:
    run = scenarios / "exact"
    rows = [line.split(",") for line in (run / SYNC_CSV).read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4] and all(r[3] == "1" and r[4] == r[5] for r in rows)
    a, b = rank_records(scenarios, "exact")
    assert a["digest"] == b["digest"] and a["theta_moved"]
    assert a["end_of_run_prune"] is not None and a["end_of_run_prune"] == b["end_of_run_prune"]


def test_two_processes_without_gates_match_one_process(scenarios: Path, tmp_path: Path) -> None:
    one = Trainer(load_config(None, NONE), tmp_path / "one")
    one.fit()
    two = ckpt(scenarios / "none")
    state = {k: v.cpu() for k, v in one.model.state_dict().items()}
    diff = max_rel_diff(state, two["model"])
    assert diff < 1e-5, f"2 processes vs 1 after 32 steps: max relative parameter difference {diff:.2e}"
    for r1, r2 in zip(one.progress.log, two["progress"]["log"]):
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-5)
        assert r1["test_acc"] == pytest.approx(r2["test_acc"], abs=1 / 128 + 1e-9)
    assert two["progress"]["samples"] == one.progress.samples == 512


def test_sync_bn_matches_one_process_and_plain_bn_does_not(scenarios: Path, tmp_path: Path) -> None:
    one = Trainer(load_config(None, bn_run(str(scenarios / "data"), False)), tmp_path / "one")
    one.fit()
    state = {k: v.cpu() for k, v in one.model.state_dict().items()}
    synced = max_rel_diff(state, ckpt(scenarios / "syncbn")["model"])
    plain = max_rel_diff(state, ckpt(scenarios / "nosync")["model"])
    assert synced < 1e-5, f"sync_bn: max relative difference {synced:.2e} (running statistics included)"
    assert plain > 100 * synced, f"per-process batch statistics should differ visibly ({plain:.2e})"


def test_a_disagreement_between_processes_is_a_hard_error_on_every_process(scenarios: Path) -> None:
    for rec in rank_records(scenarios, "mismatch"):
        assert "pruning decision at step 0: rank(s) 1 of 2 differ from rank 0" in rec["theta"]
        assert "the parameters of rank(s) 1 differ from rank 0's" in rec["weights"]


def test_a_non_finite_objective_in_one_process_stops_both_at_the_same_step(scenarios: Path) -> None:
    a, b = rank_records(scenarios, "nan")
    assert a["diverged"] and b["diverged"], (a, b)
    assert a["step"] == b["step"] == 5, "five good steps, the sixth stopped on both processes"
    assert "epoch 1, iteration 6" in a["message"] and "epoch 1, iteration 6" in b["message"]
    assert "in another process" in a["message"] and "J=nan" in b["message"]
    state = load_checkpoint(scenarios / "nan" / CHECKPOINT)
    assert state["progress"]["global_step"] == 4, "the last good checkpoint (every 4 steps) is kept"
    assert first_nonfinite(state) is None


def test_sharded_evaluate_equals_one_process(scenarios: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two = json.loads(rank_records(scenarios, "evaluate")[0]["stdout"])
    assert rank_records(scenarios, "evaluate")[1]["stdout"] == ""
    assert cli.main(["evaluate", "--run", str(scenarios / "combined"), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert two["accuracy"] == one["accuracy"] and two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_a_signal_to_one_process_stops_both_after_the_same_step_and_resumes_on_one(
    scenarios: Path, reference: Path
) -> None:
    a, b = rank_records(scenarios, "stop")
    assert a == b and a["stopped"] and (a["epoch"], a["iteration"], a["step"], a["exit_code"]) == (1, 11, 11, 143)
    assert a["message"].startswith("interrupted at epoch 1, iteration 11; resume with: torchrun")
    c = ckpt(scenarios / "stop")
    assert (c["progress"]["epoch"], c["progress"]["batch"], c["loader"]["world_size"]) == (0, 11, 2)
    assert len(c["progress"]["epoch_sums"]) == 2 and not (scenarios / "stop" / REPORT_JSON).exists()
    # another world size: one process continues the 2-process checkpoint at the exact batch
    resumed = Trainer(load_config(None, COMBINED), scenarios / "stop", resume=True)
    assert resumed.progress.global_step == 11
    report = resumed.fit()
    assert report is not None and report["samples"] == 512 and resumed.progress.global_step == 32
    assert [r["step"] for r in resumed.progress.log] == [16, 32]


# --------------------------------------------------------------------------------------------------
# one process: clean stop on Ctrl-C and crash (SIGKILL) at a random iteration, resumed bit for bit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("at", ["random", "end of epoch 1"])
def test_ctrl_c_mid_epoch_checkpoints_and_resumes_bit_for_bit(
    at: str, tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pruning.train as tr

    # the last step of an epoch is its own case: the resumed epoch then runs no step at all
    k = random.Random().randrange(2, 32) if at == "random" else 16
    original, calls = tr.algorithm1_step, [0]

    def step(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the step, which finishes first
        return original(*args, **kwargs)

    monkeypatch.setattr(tr, "algorithm1_step", step)
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *sets(COMBINED)]) == 130, f"k={k}"
    err = capsys.readouterr().err.strip().splitlines()
    epoch, it = (k - 1) // 16 + 1, (k - 1) % 16 + 1
    assert err == [f"interrupted at epoch {epoch}, iteration {it}; "
                   f"resume with: python -m pruning train --out {out} --resume"], f"k={k}"
    assert ckpt(out)["progress"]["global_step"] == k
    monkeypatch.setattr(tr, "algorithm1_step", original)
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0
    assert_same(comparable(ckpt(reference)), comparable(ckpt(out)), f"k={k}")


def test_sigkill_at_a_random_iteration_then_resume_is_bit_identical(tmp_path: Path, reference: Path) -> None:
    k = random.Random().randrange(5, 30)  # checkpoints every 3 steps: the last one is before step k
    out = tmp_path / "run"
    res = run_bounded([sys.executable, DRIVER, "cli", "--kill-at", str(k), "--fault", "KILL", "--",
                       "train", "--out", str(out), *sets([*TINY, "train.checkpoint_every=3"])], timeout=240)
    assert res.returncode == -signal.SIGKILL, f"k={k}\n{res.stdout[-3000:]}"
    last = max(3 * ((k - 1) // 3), 16 if k > 16 else 0)  # mid-epoch every 3 steps, and the end of epoch 1
    assert ckpt(out)["progress"]["global_step"] == last, f"k={k}"
    resumed = Trainer(load_config(None, [*TINY, "train.checkpoint_every=3"]), out, resume=True)
    resumed.fit()
    assert_same(comparable(ckpt(reference)), comparable(ckpt(out)), f"killed before step {k}")


# --------------------------------------------------------------------------------------------------
# two processes: a crash, torchrun --max-restarts, automatic resume, bit-identical result
# --------------------------------------------------------------------------------------------------


def test_a_crashed_process_restarts_the_job_which_resumes_bit_for_bit(scenarios: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [*TORCHRUN[:3], "--standalone", "--nproc_per_node=2", "--max-restarts=1", DRIVER, "cli",
           "--kill-at", "7", "--kill-rank", "1", "--fault", "KILL", "--", "train", "--out", str(out), *sets(COMBINED)]
    res = run_bounded(cmd, timeout=480)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "rank 0 of 2: lost contact with another process at epoch 1, iteration 7" in res.stdout, res.stdout[-4000:]
    assert f"The last good checkpoint ({out / CHECKPOINT}, epoch 1, iteration 4) is kept." in res.stdout
    assert f"torchrun restart 1: resuming {out} from its last checkpoint" in res.stdout
    assert sum(1 for line in res.stdout.splitlines() if line.startswith("done: ")) == 1
    assert (out / REPORT_JSON).is_file()
    assert_same(comparable(ckpt(scenarios / "combined")), comparable(ckpt(out)), "crash + restart vs uninterrupted")
