"""``python -m pruning sweep``: grid parsing and validation, a tiny real sweep (resume, skip on rerun,
aggregate), the comparison tables of ``experiments/compare.py --runs`` on it, and the committed
``experiments/RESULTS.md`` left alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_compare import _load as _compare  # experiments/compare.py, loaded once

from pruning.cli import main
from pruning.config import ConfigError
from pruning.sweep import ALIASES, parse_grid, plan_sweep, split_values

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "experiments" / "RESULTS.md"
TINY = ["data.name=digits", "data.options.flatten=true", "data.train_subset=64", "data.test_subset=32",
        "model.arch=residual_mlp", "model.kwargs.hidden=[4, 4]", "train.epochs=2", "train.batch_size=32",
        "train.device=cpu", "train.progress=false", "train.tensorboard=false", "export.enabled=false"]
SETS = [a for s in TINY for a in ("--set", s)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




# -- the grid ---------------------------------------------------------------------------------------


def test_parse_grid_aliases_lists_and_folder_names(tmp_path: Path) -> None:
    assert split_values("0.1, [1,2], {a = 1, b = 2}, 'x,y'") == ["0.1", "[1,2]", "{a = 1, b = 2}", "'x,y'"]
    axes = parse_grid(["gamma=0.02,0.05", "rho=0.2", "model.kwargs.hidden=[4,4],[8]"])
    assert [a.field for a in axes] == [ALIASES["gamma"], "objective.rho", "model.kwargs.hidden"]
    assert axes[2].values == ([4, 4], [8]) and axes[0].label == "gamma"
    plan = plan_sweep(None, ["gamma=0.02,0.05", "rho=0.2,0.8"], seeds=2, out=tmp_path / "s",
                      overrides=["train.seed=5"])
    assert [p.name for p in plan.points] == ["gamma0.02_rho0.2", "gamma0.02_rho0.8", "gamma0.05_rho0.2",
                                             "gamma0.05_rho0.8"]
    assert plan.seeds == (5, 6)  # train.seed + 0..N-1
    cfg = plan.configs[("gamma0.05_rho0.2", 6)]
    assert (cfg.objective.gamma, cfg.objective.rho, cfg.train.seed) == (0.05, 0.2, 6)
    assert plan.run_dir(plan.points[0], 5) == tmp_path / "s" / "gamma0.02_rho0.2" / "seed5"
    assert [(p.name, s) for p, s in plan.runs()][:2] == [("gamma0.02_rho0.2", 5), ("gamma0.02_rho0.8", 5)]
    assert not (tmp_path / "s").exists()  # planning writes nothing


@pytest.mark.parametrize(("grid", "message"), [
    (["gama=0.1"], "unknown field 'gama' (did you mean 'gamma'?)"),
    (["objective.gama=0.1"], "objective.gama: unknown key (did you mean 'gamma'?)"),
    (["gamma=0.1,-1", "rho=0.2,0.8"], "--grid gamma=-1 rho=0.2: objective.gamma: must be > 0, got -1.0"),
    (["rho=0.5,2"], "objective.rho: must lie in [0, 1], got 2.0"),
    (["train.epochs=1,two"], "train.epochs: expected integer, got str 'two'"),
    (["gamma"], "expected FIELD=V1,V2"),
    (["gamma=0.1,"], "empty value"),
    (["gamma=0.1,0.10"], "given more than once"),
    (["gamma=0.1", "objective.gamma=0.2"], "field objective.gamma is already given"),
    (["train.seed=1,2"], "use --seeds N"),
    (["optim.weights.lr=0.01,0.1", "optim.weights.lr_min=0.05"],
     "--grid optim.weights.lr=0.01 optim.weights.lr_min=0.05: optim.weights.lr_min: must lie in [0, lr]"),
])
def test_grid_errors_name_the_field(tmp_path: Path, grid: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        plan_sweep(None, grid, out=tmp_path / "s")
    assert message in str(err.value)
    assert len(err.value.errors) == 1  # each problem once, however many settings share it


def test_cross_field_constraints_hold_per_setting(tmp_path: Path) -> None:
    # lr_min = 0.2 is valid with lr = 0.5 (not with the default lr = 0.1): only the combinations count
    plan = plan_sweep(None, ["optim.weights.lr=0.5,1.0", "optim.weights.lr_min=0.2"], out=tmp_path / "s")
    assert [p.name for p in plan.points] == ["optim.weights.lr0.5_optim.weights.lr-min0.2",
                                             "optim.weights.lr1.0_optim.weights.lr-min0.2"]


def test_cli_refuses_a_bad_grid_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["sweep", "--grid", "gamma=0.1", "delta=-0.5", "--out", str(out), *SETS]) == 2
    assert "objective.delta: must be >= 0" in capsys.readouterr().err
    assert main(["sweep", "--grid", "gamma=0.1", "--seeds", "0", "--out", str(out), *SETS]) == 2
    assert "--seeds: must be an integer >= 1" in capsys.readouterr().err
    assert main(["sweep", "--grid", "gamma=0.1", "--report-only", "--out", str(out), *SETS]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    assert not out.exists()
    run = tmp_path / "a-run"  # the folder of one training is not a sweep folder
    run.mkdir()
    (run / "provenance.json").write_text(json.dumps({"toolkit": "structure-discovery", "runs": []}))
    assert main(["sweep", "--grid", "gamma=0.1", "--out", str(run), *SETS]) == 2
    assert "is the folder of one run, not a sweep folder" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["provenance.json"]


# -- a tiny real sweep --------------------------------------------------------------------------------


def test_tiny_sweep_resumes_skips_and_aggregates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pruning.rundir import RunSession
    from pruning.train import Trainer

    results_md = _digest(RESULTS_MD)
    out = tmp_path / "sweep1"
    grid = ["--grid", "gamma=0.05,0.5"]
    plan = plan_sweep(None, ["gamma=0.05,0.5"], out=out, overrides=TINY)
    # the first setting was interrupted after one of its two epochs: the sweep resumes it
    (out / plan.points[0].name).mkdir(parents=True)
    first = plan.run_dir(plan.points[0], 0)
    with RunSession(first) as session:
        trainer = Trainer(plan.configs[(plan.points[0].name, 0)], first)
        session.start()
        assert trainer.fit(stop_after=1) is None
    assert main(["sweep", *grid, "--seeds", "1", "--out", str(out), *SETS]) == 0
    log = capsys.readouterr().out
    assert "0 finished already, 2 to train" in log and "(resuming)" in log
    prov = json.loads((first / "provenance.json").read_text())["runs"]
    assert [r["resume"] for r in prov] == [False, True] and prov[-1]["status"] == "completed"

    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["runs_finished"] == res["runs_total"] == 2
    assert [s["params"] for s in res["settings"]] == [{"objective.gamma": 0.05}, {"objective.gamma": 0.5}]
    for s in res["settings"]:
        rep = json.loads((Path(s["runs"][0]["dir"]) / "report.json").read_text())
        assert rep["config"]["objective"]["gamma"] == s["params"]["objective.gamma"]
        assert rep["epochs_completed"] == 2
        for key, name in (("test_accuracy", "accuracy"), ("fPR", "fPR"), ("pPR", "pPR"),
                          ("layers_left", "layers_left"), ("training_cost_ratio", "training_cost")):
            assert s["mean"][name] == pytest.approx(rep[key]) and s["sd"][name] is None  # one seed: no sd
        assert 0.0 <= s["mean"]["accuracy"] <= 1.0 and 0.0 < s["mean"]["training_cost"] <= 1.0
    md = (out / "results.md").read_text()
    assert "| gamma | Test acc (%)" in md and f"| 0.5 | {100 * res['settings'][1]['mean']['accuracy']:.2f} |" in md
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["grid"] == {"objective.gamma": [0.05, 0.5]} and manifest["seeds"] == [0]

    # rerun: every run finished, nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")}
    assert len(stamps) == 2
    assert main(["sweep", *grid, "--out", str(out), *SETS]) == 0
    assert "2 finished already, 0 to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint.pt")} == stamps
    # the same folder with another configuration is refused before anything runs
    assert main(["sweep", *grid, "--out", str(out), *SETS, "--set", "train.batch_size=16"]) == 2
    assert "another configuration (train.batch_size differ)" in capsys.readouterr().err

    # the comparison tables of experiments/compare.py read the sweep's folder
    C = _compare()
    records = C.load_records(out)
    assert sorted(r["gamma"] for r in records) == [0.05, 0.5] and len({r["setting"] for r in records}) == 2
    assert C.main(["--runs", str(out), "--figures", ""]) == 0
    table = (out / "compare.md").read_text()
    assert "| combined | 0.05 | 0.5 | 0.5 |" in table and "| combined | 0.5 | 0.5 | 0.5 |" in table
    assert _digest(RESULTS_MD) == results_md  # the committed results are not touched


def test_extra_grid_fields_make_distinct_settings_in_compare(tmp_path: Path) -> None:
    C = _compare()
    d = tmp_path / "optim.theta.lr0.03" / "seed0"
    d.mkdir(parents=True)
    (d.parent / "sweep_point.json").write_text(json.dumps({"params": {"objective.gamma": 0.1,
                                                                      "optim.theta.lr": 0.03}}))
    assert C.sweep_extra(d) == (("optim.theta.lr", "0.03"),)
    s = C.setting_from_config({"model": {"mode": "combined"}, "data": {"name": "digits"},
                               "objective": {"gamma": 0.1, "rho": 0.5, "delta": 0.5}}, C.sweep_extra(d))
    assert s.tag == "combined_g0.1_r0.5_d0.5_optim.theta.lr0.03" and s.label().endswith("optim.theta.lr=0.03")
    assert s != C.Setting("digits", "combined", 0.1, 0.5, 0.5)


def test_interrupted_sweep_writes_partial_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pruning.train
    from pruning.interrupt import RunInterrupted

    def stop(*_a: object, **_k: object) -> None:
        raise RunInterrupted(2, 1, 3, "the same command")

    monkeypatch.setattr(pruning.train, "train", stop)
    out = tmp_path / "s"
    assert main(["sweep", "--grid", "rho=0.2,0.8", "--out", str(out), *SETS]) == 130
    res = json.loads((out / "results.json").read_text())
    assert res["runs_finished"] == 0 and not res["complete"]
    assert all(s["mean"]["accuracy"] is None for s in res["settings"])
    assert "0 of 2" in (out / "results.md").read_text()


def test_failed_runs_are_reported_and_skipped_until_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import pruning.train

    calls: list[tuple[str, bool, bool]] = []

    def diverge(cfg: object, out: Path, *, resume: bool, overwrite: bool, argv: object) -> None:
        calls.append((Path(out).parent.name, resume, overwrite))
        raise pruning.train.TrainingDiverged("non-finite objective at epoch 1, iteration 2/2")

    monkeypatch.setattr(pruning.train, "train", diverge)
    out = tmp_path / "s"
    # an earlier attempt of the first setting diverged (its provenance says so, no checkpoint)
    first = out / "gamma0.1" / "seed0"
    first.mkdir(parents=True)
    (first / "provenance.json").write_text(json.dumps({"toolkit": "structure-discovery",
                                                       "runs": [{"status": "diverged"}]}))
    assert main(["sweep", "--grid", "gamma=0.1,0.2", "--out", str(out), *SETS]) == 1  # the sweep goes on
    assert calls == [("gamma0.2", False, False)]
    res = json.loads((out / "results.json").read_text())
    assert len(res["failures"]) == 2 and "--retry-failed" in res["failures"][0]
    assert "diverged: non-finite objective" in res["failures"][1]
    assert "Failed runs:" in (out / "results.md").read_text()
    capsys.readouterr()
    calls.clear()
    assert main(["sweep", "--grid", "gamma=0.1,0.2", "--out", str(out), "--retry-failed", *SETS]) == 1
    assert calls == [("gamma0.1", False, True), ("gamma0.2", False, False)]  # started over; the other was new
