"""Measured time (pruning.timing): the in-run dense reference, the per-structure step-time record, the
inference speed-up, and that none of it changes the run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dist_driver import TINY  # the tiny run of tests/test_train.py (prunes in both epochs)

from pruning.config import ConfigError, load_config
from pruning.report import REPORT_JSON, REPORT_MD
from pruning.timing import WARMUP_STEPS, summarize
from pruning.train import Trainer


def test_timing_record_is_present_and_sane(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.timing_steps=3"])
    trainer = Trainer(cfg, tmp_path)
    report = trainer.fit()
    assert report is not None
    timing, inference = report["timing"], report["inference"]
    steps = trainer.progress.global_step
    assert steps == 32 and timing["steps"] == steps
    # one reference record of 3 timed pairs, positive times, a finite overhead
    (ref,) = timing["references"]
    assert ref["steps"] == 3 and ref["session"] == 0
    assert timing["dense_reference_step_s"] > 0 and timing["gated_step_s"] > 0
    # the paired real steps are steps 3..5 (0-based; after the warm-up and the untimed reference step), so a
    # compaction after step k <= 5 (event step k) came before one of them
    compacted_early = any(e["step"] <= WARMUP_STEPS + 3 for e in trainer.progress.events)
    assert (timing["gated_flops_ratio"] < 1.0) == compacted_early
    if compacted_early:
        assert timing["gate_overhead_at_start"] is None
    else:
        assert math.isfinite(timing["gate_overhead_at_start"]) and timing["gate_overhead_at_start"] > 0
    # one structure per compaction that steps followed (plus the first); every step counted exactly once
    rows = timing["structures"]
    events = trainer.progress.events
    assert len(events) >= 2
    assert [r["start_step"] for r in rows] == sorted({0, *(e["step"] for e in events if e["step"] < steps)})
    assert sum(r["steps"] for r in rows) == steps == timing["steps_counted"]
    assert rows[0]["flops_ratio"] == 1.0
    assert all(0 < b["flops_ratio"] < a["flops_ratio"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["flops_ratio"] >= 1 - report["fPR"] - 1e-12
    for r in rows:
        if r["steps"] > WARMUP_STEPS:
            assert r["steady_median_s"] > 0 and r["step_time_ratio"] > 0
    for key in ("measured_train_time_ratio", "steady_train_time_ratio", "cpu_train_time_ratio",
                "loop_wall_clock_per_step_ratio"):
        assert 0 < timing[key] < 100, key
    # the whole loop (data, ε-rule, compaction) costs at least its timed steps
    assert timing["loop_wall_clock_per_step_ratio"] >= timing["measured_train_time_ratio"]
    assert report["measured_train_time_ratio"] == timing["measured_train_time_ratio"]
    assert inference["batch"] == 128 and inference["rounds"] == 3
    assert inference["dense_s"] > 0 and inference["pruned_s"] > 0 and inference["speedup"] > 0
    assert report["inference_speedup_measured"] == inference["speedup"]
    assert report["expected_flops_cost_ratio"] == report["training_cost_ratio"]
    assert report["executed_flops_ratio"] == report["training_cost_ratio_dense"]
    assert json.loads((tmp_path / REPORT_JSON).read_text())["timing"]["steps"] == steps
    md = (tmp_path / REPORT_MD).read_text()
    for name in ("measured training-time ratio (wall clock)", "expected-FLOPs cost ratio", "executed-FLOPs ratio",
                 "inference speed-up (measured)", "## Time (measured in this run)"):
        assert name in md, name


def test_reference_steps_do_not_change_the_trajectory(tmp_path: Path) -> None:
    runs = {}
    for n in (0, 4):
        trainer = Trainer(load_config(None, [*TINY, f"train.timing_steps={n}"]), tmp_path / str(n))
        report = trainer.fit()
        assert report is not None
        runs[n] = (trainer, report, torch.get_rng_state())
    (a, ra, rng_a), (b, rb, rng_b) = runs[0], runs[4]
    assert a.progress.events and a.progress.events == b.progress.events
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for opt in ("opt_w", "opt_t"):
        for x, y in zip(getattr(a, opt).state.values(), getattr(b, opt).state.values()):
            for k in x:
                assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), (opt, k)
    assert torch.equal(rng_a, rng_b)
    assert ra["test_accuracy"] == rb["test_accuracy"] and ra["fPR"] == rb["fPR"]
    # timing off: nothing measured, nothing reported as measured
    assert ra["timing"] is None and ra["inference"] is None and ra["measured_train_time_ratio"] is None
    assert rb["timing"]["references"][0]["steps"] == 4


def test_timing_survives_a_resume(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.timing_steps=2"])
    first = Trainer(cfg, tmp_path)
    assert first.fit(stop_after=1) is None
    resumed = Trainer(cfg, tmp_path, resume=True)
    report = resumed.fit()
    assert report is not None
    timing = report["timing"]
    assert [r["session"] for r in timing["references"]] == [0, 1]  # measured again after the resume
    assert sum(r["steps"] for r in timing["structures"]) == resumed.progress.global_step == 32
    assert {r["session"] for r in timing["structures"]} == {0, 1}


def test_summarize_arithmetic() -> None:
    state = {
        "sessions": 1,
        "references": [{"session": 0, "step": 5, "steps": 3, "reference_step_s": 0.010, "reference_cpu_s": 0.005,
                        "gated_step_s": 0.012,
                        "gate_overhead": 1.2}],
        "segments": [
            {"start_step": 0, "session": 0, "flops_ratio": 1.0, "steps": 10, "warmup_steps": 2, "warmup_s": 0.05,
             "steady_steps": 8, "steady_s": 0.096, "steady_median_s": 0.012, "cpu_s": 0.07},
            {"start_step": 10, "session": 0, "flops_ratio": 0.5, "steps": 10, "warmup_steps": 2, "warmup_s": 0.03,
             "steady_steps": 8, "steady_s": 0.064, "steady_median_s": 0.008, "cpu_s": 0.05},
        ],
    }
    s = summarize(state, train_time_s=0.5, steps=20, device="cpu", timing_steps=3)
    assert s["measured_train_time_ratio"] == pytest.approx((0.05 + 0.096 + 0.03 + 0.064) / (20 * 0.010))
    assert s["steady_train_time_ratio"] == pytest.approx((10 * 0.012 + 10 * 0.008) / (20 * 0.010))
    assert s["loop_wall_clock_per_step_ratio"] == pytest.approx(0.5 / 20 / 0.010)
    assert s["cpu_train_time_ratio"] == pytest.approx((0.07 + 0.05) / (20 * 0.005))
    assert [r["step_time_ratio"] for r in s["structures"]] == pytest.approx([1.2, 0.8])
    # no reference measured (a run shorter than the warm-up): no ratio, never a made-up one
    empty = summarize({**state, "references": []}, train_time_s=0.5, steps=20, device="cpu", timing_steps=3)
    assert empty["measured_train_time_ratio"] is None and empty["loop_wall_clock_per_step_ratio"] is None


def test_config_validation() -> None:
    assert load_config(None, []).train.timing_steps == 5
    with pytest.raises(ConfigError, match="train.timing_steps"):
        load_config(None, ["train.timing_steps=-1"])
    with pytest.raises(ConfigError, match="train.timing_steps"):
        load_config(None, ["train.timing_steps=\"many\""])
    with pytest.raises(ConfigError, match="timing_steps"):  # did you mean
        load_config(None, ["train.timing_step=3"])
