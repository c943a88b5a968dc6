"""experiments/compare.py: grid, aggregation, Pareto fronts and their dominance, RESULTS.md, a tiny real grid."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    name = "experiments_compare"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "compare.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


C = _load()
S = C.Setting


def rec(setting, seed, acc, fpr, ppr=None, layers=20, cost=1.0, wall=10.0):
    return {**C.setting_dict(setting), "setting": setting, "seed": seed, "epochs": 3, "acc": acc, "fPR": fpr,
            "pPR": fpr if ppr is None else ppr, "layers": layers, "baseline_layers": 20, "blocks": 9,
            "baseline_blocks": 9, "cost": cost, "train_s": wall - 2.0, "wall_s": wall, "units_left": [],
            "dir": ""}


def synthetic(comb_points, layer_points, unit_points, base_acc=0.95, ds="mnist1d"):
    """Records for 2 seeds per setting whose means are the given (fPR, acc) points (seeds at ±0.01 acc)."""
    recs = [rec(S(ds, "none"), s, base_acc + d, 0.0) for s, d in ((0, -0.01), (1, 0.01))]
    for mode, pts in (("combined", comb_points), ("layer", layer_points), ("unit", unit_points)):
        for i, (f, a) in enumerate(pts):
            st = S(ds, mode, 0.01 * (i + 1), 0.5, None if mode == "unit" else 0.5)
            recs += [rec(st, 0, a - 0.01, f), rec(st, 1, a + 0.01, f)]
    return recs


# -- grid -----------------------------------------------------------------------------------------


def test_quick_grid_shape_and_overrides_validate():
    from pruning.config import load_config

    mn = C.grid_settings("quick", "mnist1d")
    modes = [s.mode for s in mn]
    assert modes.count("none") == 1 and modes.count("layer") == 2 and modes.count("unit") == 2
    assert modes.count("combined") == 8  # 2 γ × 2 ρ × 2 δ
    runs = C.plan("quick", ["mnist1d", "digits"], 3, 15)
    dirs = [r.run_dir(Path("/x")) for r in runs]
    assert len(set(dirs)) == len(runs) == 3 * (len(mn) + len(C.grid_settings("quick", "digits")))
    assert [r.seed for r in runs[: len(mn)]] == [0] * len(mn)  # seed-major: every setting's seed 0 first
    for r in runs[:: 7]:
        cfg = load_config(C.CONFIGS[r.setting.dataset], r.overrides())
        assert cfg.model.mode == r.setting.mode and cfg.train.epochs == 15 and cfg.train.seed == r.seed
        assert cfg.data.name == r.setting.dataset
        assert C.setting_from_config(cfg.to_dict()) == r.setting
    with pytest.raises(ValueError, match="unknown grid"):
        C.grid_settings("nope", "mnist1d")


def test_config_diffs_ignores_free_and_unknown_keys():
    want = {"train": {"epochs": 3, "progress": False, "new_key": 1}, "objective": {"gamma": 0.1}}
    have = {"train": {"epochs": 3, "progress": True}, "objective": {"gamma": 0.1}}
    assert C.config_diffs(want, have) == []
    have["objective"]["gamma"] = 0.2
    assert C.config_diffs(want, have) == ["objective.gamma"]


# -- aggregation ----------------------------------------------------------------------------------


def test_aggregate_mean_sd_baseline_and_order():
    a, b = S("mnist1d", "combined", 0.1, 0.2, 0.5), S("mnist1d", "layer", 0.1, 0.5, 0.5)
    recs = [rec(S("mnist1d", "none"), 0, 0.90, 0.0), rec(S("mnist1d", "none"), 1, 0.92, 0.0),
            rec(a, 0, 0.80, 0.5, layers=10, cost=0.4), rec(a, 1, 0.84, 0.7, layers=12, cost=0.6), rec(a, 2, 0.82, 0.6,
                                                                                                  layers=14, cost=0.5),
            rec(b, 0, 0.88, 0.3)]
    rows = C.aggregate(recs)
    assert [r["mode"] for r in rows] == ["none", "layer", "combined"]
    ra = rows[2]
    assert ra["n"] == 3 and ra["seeds"] == [0, 1, 2]
    assert ra["acc"] == pytest.approx(0.82) and ra["acc_sd"] == pytest.approx(0.02)
    assert ra["fPR"] == pytest.approx(0.6) and ra["fPR_sd"] == pytest.approx(0.1)
    assert ra["layers"] == pytest.approx(12) and ra["layers_sd"] == pytest.approx(2)
    assert ra["cost"] == pytest.approx(0.5)
    assert all(r["baseline_acc"] == pytest.approx(0.91) for r in rows)
    assert math.isnan(rows[1]["acc_sd"])  # one seed: no sd
    table = "\n".join(C.results_table(rows, "mnist1d"))
    assert "| combined | 0.1 | 0.2 | 0.5 | 82.00 ± 2.00 | 91.00 ± 1.41 | 12.0 ± 2.0 / 20 | 60.0 ± 10.0 |" in table
    assert "| layer-only | 0.1 | 0.5 | 0.5 | 88.00 | 91.00 ± 1.41 |" in table


# -- Pareto fronts and dominance -------------------------------------------------------------------


def test_pareto_front_maximises_both():
    pts = [(0.1, 0.9), (0.5, 0.8), (0.3, 0.7), (0.5, 0.75), (0.8, 0.6), (0.1, 0.9), (float("nan"), 1.0)]
    assert C.pareto_front(pts) == [0, 1, 4]
    assert C.pareto_front([]) == []


def test_front_relation_cases():
    a = [(0.2, 0.9), (0.6, 0.85)]
    assert C.front_relation(a, [(0.2, 0.88), (0.5, 0.8)]) == "dominates"
    assert C.front_relation([(0.2, 0.88)], a) == "dominated"
    assert C.front_relation(a, list(a)) == "equal"
    assert C.front_relation(a, [(0.8, 0.7)]) == "incomparable"  # reaches further in fPR
    assert C.covers(a, [(0.8, 0.7), (0.1, 0.8)]) == [0]
    assert C.hypervolume([(0.5, 0.6), (1.0, 0.3)], (0.0, 0.1)) == pytest.approx(0.5 * 0.5 + 0.5 * 0.2)


def test_dominance_when_combined_dominates():
    recs = synthetic(comb_points=[(0.3, 0.94), (0.7, 0.90)], layer_points=[(0.2, 0.93), (0.6, 0.85)],
                     unit_points=[(0.5, 0.88)])
    rows = C.aggregate(recs)
    d = C.dominance(rows, "mnist1d")
    assert d["relations"] == {"layer": "dominates", "unit": "dominates"} and d["dominates_all"]
    text = "\n".join(C.dominance_text(rows, "mnist1d"))
    assert text.startswith("**Yes**")


def test_dominance_when_combined_does_not_dominate():
    # unit-only reaches a higher fPR than any combined setting at decent accuracy: the fronts cross
    recs = synthetic(comb_points=[(0.3, 0.94), (0.6, 0.90)], layer_points=[(0.2, 0.93)],
                     unit_points=[(0.4, 0.80), (0.85, 0.70)])
    rows = C.aggregate(recs)
    d = C.dominance(rows, "mnist1d")
    assert d["relations"]["layer"] == "dominates"
    assert d["relations"]["unit"] == "incomparable"
    assert [r["setting"].mode for r in d["uncovered"]["unit"]] == ["unit"]
    assert d["uncovered"]["unit"][0]["fPR"] == pytest.approx(0.85)
    assert not d["dominates_all"] and not d["covers_all"]
    text = "\n".join(C.dominance_text(rows, "mnist1d"))
    assert text.startswith("**No**") and "unit-only front" in text and "fPR 85.0 %" in text
    assert "no combined setting reaches fPR 85.0 %" in text
    # and a case where a single mode's front dominates the combined one
    recs = synthetic(comb_points=[(0.3, 0.80)], layer_points=[(0.4, 0.90)], unit_points=[(0.1, 0.7)])
    d = C.dominance(C.aggregate(recs), "mnist1d")
    assert d["relations"] == {"layer": "dominated", "unit": "dominates"}


def test_write_results_from_synthetic_records(tmp_path):
    recs = synthetic(comb_points=[(0.3, 0.94)], layer_points=[(0.2, 0.93)], unit_points=[(0.25, 0.80)])
    args = argparse.Namespace(grid="quick", datasets=["mnist1d"], seeds=2, epochs=3, jobs=2, out=str(tmp_path / "r"),
                              set=["data.train_subset=64"])
    runs = C.plan("quick", ["mnist1d"], 2, 3)
    path = tmp_path / "RESULTS.md"
    text = C.write_results(args, runs, recs, [tmp_path / "fig.png"], path)
    assert path.read_text() == text
    assert "python experiments/compare.py --grid quick --datasets mnist1d --seeds 2 --epochs 3 --jobs 2" in text
    assert "--set data.train_subset=64" in text
    assert f"Runs finished: **{len(recs)} of 26**" in text
    assert "| Mode | γ | ρ | δ | Test Acc (%) | Baseline Acc (%) | Layers Left | fPR (%) | pPR (%)" in text
    assert "**Yes**" in text and "## The full grid" in text and "CPU hours" in text


def test_pareto_figure_from_records(tmp_path):
    pytest.importorskip("matplotlib")
    recs = synthetic(comb_points=[(0.3, 0.94), (0.6, 0.9)], layer_points=[(0.2, 0.93)], unit_points=[(0.4, 0.8)])
    spec = importlib.util.spec_from_file_location("pareto_fig_test", ROOT / "paper_figures" / "pareto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = mod.draw(tmp_path, tmp_path / "fig", records=recs)
    assert sorted(p.suffix for p in written) == [".pdf", ".png"] and all(p.stat().st_size > 0 for p in written)


# -- a tiny real grid: subprocess training, caching, resuming, report ----------------------------------


def test_tiny_grid_trains_caches_and_reports(tmp_path):
    out = tmp_path / "runs"
    extra = ("data.train_subset=64", "data.test_subset=64", "train.batch_size=32")
    runs = [r for r in C.plan("smoke", ["digits"], 1, 1, extra) if r.setting.mode in ("none", "combined")]
    logs: list[str] = []
    counts = C.run_grid(runs, out, jobs=2, log=logs.append)
    assert counts["done"] == 2 and counts["failed"] == 0, logs
    for r in runs:
        d = r.run_dir(out)
        meta = json.loads((d / C.RUN_META).read_text())
        assert meta["status"] == "done" and meta["wall_s"] > 0 and "--set model.mode=" in meta["command"]
        assert C.run_state(r, out) == "done"
    again = C.run_grid(runs, out, jobs=2, log=logs.append)  # finished runs are skipped
    assert again["cached"] == 2 and again["done"] == 0
    records = C.load_records(out, runs)
    assert {r["mode"] for r in records} == {"none", "combined"} and all(r["epochs"] == 1 for r in records)
    rows = C.aggregate(records)
    assert rows[0]["mode"] == "none" and rows[0]["cost"] == pytest.approx(1.0)
    # a cached run asked for with another configuration is refused, not overwritten
    other = [C.RunSpec(runs[0].setting, 0, 1, ("data.train_subset=32",))]
    with pytest.raises(ValueError, match="another configuration"):
        C.run_grid(other, out, jobs=1, log=logs.append)
