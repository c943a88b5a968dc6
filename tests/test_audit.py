"""Pruning audit (pruning.audit): records of every removed structure, audit mode, premature pruning, certificates."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import TINY  # the tiny run of tests/test_train.py: the ε-rule acts within 2 epochs

from pruning.audit import AUDIT_CSV, AUDIT_JSON, PruningAudit, certify
from pruning.cli import main
from pruning.config import RunConfig, load_config
from pruning.models import build_model
from pruning.objective import Objective
from pruning.report import REPORT_JSON, REPORT_MD
from pruning.train import Trainer
from theory.certificates import admissible

FIELDS = ("kind", "block", "step", "theta", "theta_B", "fan_in_norm", "fan_out_norm", "q", "c", "k", "k_g_i", "k_h_i",
          "k_k_i", "k_g_B", "k_global", "margin", "a_star", "certified", "certified_global_k")


def tiny(*extra: str) -> RunConfig:
    return load_config(None, [*TINY, *extra])


def removed_keys(events: list[dict[str, Any]]) -> list[str]:
    keys = []
    for ev in events:
        keys += [f"block:{b['block']}" for b in ev["blocks"]]
        keys += [f"unit:{u['block']}.{u['layer']}.{uid}" for u in ev["units"] for uid in u["unit_ids"]]
    return keys


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("audit")
    trainer = Trainer(tiny("train.audit=true"), out)
    report = trainer.fit()
    assert report is not None
    return trainer, report, out


# --------------------------------------------------------------------------------------------------
# certificates on hand-computed numbers
# --------------------------------------------------------------------------------------------------


def test_certify_union_over_a_hand_computed() -> None:
    # c = k = 1: certified iff ||u||/√2 + √(2θ) < 1, i.e. q < (1 − √(2θ))²; maximiser a* = √(2c/(kθ)) − 2
    r = certify(0.02, 0.1, 1.0, 1.0)
    assert r["certified"] is True
    assert r["margin"] == pytest.approx((1 - 0.2) ** 2 - 0.1)
    assert r["a_star"] == pytest.approx(8.0)
    assert r["q_max"] == pytest.approx(0.64) and r["theta_max"] == pytest.approx(0.5)
    # at a = 8: ρ_max = 8/10 = 0.8 > V = 0.1 + 8·0.02 = 0.26; the witness is admissible and contains the state
    a, rho = r["witness_a"], r["witness_rho"]
    assert admissible(a, rho, 1.0, 1.0) and 0.1 + a * 0.02 < rho < 0.8 + 1e-12
    assert certify(0.02, 0.64 - 1e-6, 1.0, 1.0)["certified"] is True
    assert certify(0.02, 0.64 + 1e-6, 1.0, 1.0)["certified"] is False
    # θ ≥ c/(2k): no a > 0 works, whatever the weights
    assert certify(0.5, 0.0, 1.0, 1.0)["certified"] is False
    assert certify(0.6, 1e-9, 1.0, 1.0)["margin"] == pytest.approx(-1e-9)
    # θ = 0: sup over a of ρ_max(a) = c/k
    assert certify(0.0, 0.09, 0.1, 1.0)["certified"] is True and certify(0.0, 0.11, 0.1, 1.0)["certified"] is False
    w = certify(0.0, 0.09, 0.1, 1.0)
    assert admissible(w["witness_a"], w["witness_rho"], 0.1, 1.0) and 0.09 < w["witness_rho"]
    # only c/k matters for membership; no estimate of k -> unknown; no regularisation -> not certified
    assert certify(0.02, 0.3, 7.0, 7.0)["certified"] is True and certify(0.02, 0.7, 7.0, 7.0)["certified"] is False
    assert certify(0.02, 0.1, 1.0, math.nan)["certified"] is None
    assert certify(0.02, 0.1, 0.0, 1.0)["certified"] is False


# --------------------------------------------------------------------------------------------------
# the online Lemma-1 ratios
# --------------------------------------------------------------------------------------------------


def test_observed_ratios_are_the_lemma1_ratios() -> None:
    """At θ ≡ 1 (every gate sampled 1) the four ratios equal the hand-computed ones from .grad."""
    torch.manual_seed(0)
    model = build_model("residual_mlp", num_classes=3, in_features=5, hidden=[4, 6])
    spec = model.spec()
    obj = Objective(spec, N=50, gamma=0.3, rho=0.5, delta=0.5, lam=2.0)
    audit = PruningAudit(obj, eps=0.1, estimator="straight-through", window=3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model.train()
    terms = obj(model, model(x), y)
    terms.total.backward()
    audit.observe(model, spec)
    with torch.no_grad():
        grads = obj.complexity_model(spec).grad(model.block_gates(), obj.coeffs)
    wd = obj.weight_decay
    for l, block in enumerate(model.block_list()):
        P1, B1, P2 = block.path[0].op.weight, block.path[0].op.bias, block.path[1].op.weight
        W1, b1, W2 = P1.detach(), B1.detach(), P2.detach()
        gB = float(block.block_gate.theta.grad) - float(grads[l].theta_B) / obj.N
        WW = float((W1**2).sum() + (b1**2).sum() + (W2**2).sum())
        gi = block.path[0].gate.theta.grad - float(grads[l].gamma_1[0]) / obj.N  # θ_B = 1
        w = torch.sqrt((W1**2).sum(1) + b1**2)
        v = torch.sqrt((W2**2).sum(0))
        h = torch.sqrt(((P1.grad - wd * W1) ** 2).sum(1) + (B1.grad - wd * b1) ** 2)
        k = torch.sqrt(((P2.grad - wd * W2) ** 2).sum(0))
        expect = [float((gi.abs() / (w * v)).max()), float((h / v).max()), float((k / w).max()), abs(gB) / (0.5 * WW)]
        got = list(audit._ratios[l])[-1]
        assert got == pytest.approx(expect, rel=1e-4, abs=1e-9)
        est = audit.k_estimate(l)
        assert est["k"] == pytest.approx(max(expect), rel=1e-4) and est["window_observations"] == 1
    for _ in range(4):  # the window keeps the last 3 observations
        audit.observe(model, spec)
    assert audit.k_estimate(0)["window_observations"] == 3


# --------------------------------------------------------------------------------------------------
# normal mode: a record for every removed structure
# --------------------------------------------------------------------------------------------------


def test_records_for_every_removed_structure(tmp_path: Path) -> None:
    trainer = Trainer(tiny(), tmp_path)
    report = trainer.fit()
    assert report is not None
    removed = removed_keys(trainer.progress.events)
    assert removed, "the tiny run removed nothing"
    recs = trainer.audit.records
    assert sorted(r["key"] for r in recs) == sorted(removed)
    for r in recs:
        for f in FIELDS:
            assert f in r, f
        assert r["theta"] < 0.1 or (r["kind"] == "block" and r["reason"] == "units")
        assert r["q"] > 0 and r["c"] > 0 and r["k"] > 0
        assert r["certified"] in (True, False)
        assert r["mode"] == "normal" and "recovered" not in r
    ev_units = {f"unit:{u['block']}.{u['layer']}.{uid}": th for ev in trainer.progress.events for u in ev["units"]
                for uid, th in zip(u["unit_ids"], u["thetas"])}
    for r in recs:
        if r["kind"] == "unit":
            assert r["theta"] == pytest.approx(ev_units[r["key"]])
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    a = data["audit"]
    assert a["mode"] == "normal"
    assert a["units"]["flagged"] == sum(r["kind"] == "unit" for r in recs)
    assert a["blocks"]["flagged"] == sum(r["kind"] == "block" for r in recs)
    assert a["units"]["certified"] == sum(r["kind"] == "unit" and r["certified"] is True for r in recs)
    saved = json.loads((tmp_path / AUDIT_JSON).read_text())
    assert len(saved["records"]) == len(recs)
    with open(tmp_path / AUDIT_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == [r["key"] for r in recs]
    assert "## Pruning audit" in (tmp_path / REPORT_MD).read_text()


# --------------------------------------------------------------------------------------------------
# audit mode: flagged, kept, followed
# --------------------------------------------------------------------------------------------------


def test_audit_mode_keeps_flagged_structures_and_counts_consistently(audit_run: Any) -> None:
    trainer, report, out = audit_run
    assert trainer.model.spec() == trainer.baseline_spec, "audit mode removed something"
    assert not trainer.progress.events
    recs = trainer.audit.records
    assert recs, "nothing was flagged"
    assert len({r["key"] for r in recs}) == len(recs), "a structure was flagged twice"
    blocks = trainer.model.block_list()
    flagged_blocks = {r["block"]: r["step"] for r in recs if r["kind"] == "block"}
    for r in recs:
        assert r["recovered"] == (r["score_end"] >= 0.1)
        assert r["recovered_ever"] >= r["recovered"]
        assert r["score_max_after"] >= r["score_end"] - 1e-7
        if r["kind"] == "unit":
            assert r["score_max_after"] >= r["theta"] - 1e-7
            live = float(blocks[r["block"]].unit_gates()[r["layer"]].theta.detach()[r["unit_id"]])
            assert r["theta_end"] == pytest.approx(live)
            # a unit is never flagged inside an already flagged block (as compaction removes them together)
            assert r["block"] not in flagged_blocks or flagged_blocks[r["block"]] > r["step"]
    a = report["audit"]
    assert a["mode"] == "audit"
    for kind in ("unit", "block"):
        rs = [r for r in recs if r["kind"] == kind]
        c = a[f"{kind}s"]
        assert c["flagged"] == len(rs)
        assert c["recovered"] == sum(r["recovered"] for r in rs) <= c["recovered_ever"] <= c["flagged"]
        tab = c["by_certified"]
        assert sum(t["flagged"] for t in tab.values()) == c["flagged"]
        assert sum(t["recovered"] for t in tab.values()) == c["recovered"]
        assert c["certified_recovered"] == tab["certified"]["recovered"]
        if c["flagged"]:
            assert c["premature_rate"] == pytest.approx(c["recovered"] / c["flagged"])
    end = a["end_of_run_prune"]
    assert 0 <= end["test_accuracy"] <= 1 and end["fPR"] >= report["fPR"]
    assert json.loads((out / REPORT_JSON).read_text())["audit"]["mode"] == "audit"


def test_audit_state_survives_resume(audit_run: Any, tmp_path: Path) -> None:
    """Checkpoint (weights_only) and resume reproduce the uninterrupted audit run's records."""
    trainer, _, _ = audit_run
    first = Trainer(tiny("train.audit=true"), tmp_path)
    assert first.fit(stop_after=1) is None
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = Trainer(tiny("train.audit=true"), tmp_path, resume=True)
    assert resumed.fit() is not None
    assert json.dumps(resumed.audit.records, sort_keys=True) == json.dumps(trainer.audit.records, sort_keys=True)


def test_a_flagged_unit_that_recovers_is_counted_premature(tmp_path: Path) -> None:
    """Unit 0 of block 0 is pushed below ε until the first check (step 3), then made useful (its gate gradient
    gets a constant pull upwards): flagged at step 3, kept, above ε at the end -> premature."""
    trainer = Trainer(tiny("train.audit=true", "model.theta_init=1.0"), tmp_path)
    gate = trainer.model.block_list()[0].unit_gates()[0]
    with torch.no_grad():
        gate.theta[0] = 0.05
    onehot = torch.zeros_like(gate.theta)
    onehot[0] = 1.0

    def hook(g: torch.Tensor) -> torch.Tensor:
        return g + (1.0 if trainer.progress.global_step < 3 else -1.0) * onehot

    gate.theta.register_hook(hook)
    report = trainer.fit()
    assert report is not None
    recs = {r["key"]: r for r in trainer.audit.records}
    r = recs["unit:0.0.0"]
    assert r["step"] == 3 and r["theta"] < 0.1
    assert r["recovered"] and r["recovered_ever"] and r["theta_end"] >= 0.1
    assert float(gate.theta.detach()[0]) == pytest.approx(r["theta_end"])
    u = report["audit"]["units"]
    assert u["recovered"] >= 1 and u["premature_rate"] > 0
    cert = "certified" if r["certified"] else ("not_certified" if r["certified"] is False else "unknown")
    assert u["by_certified"][cert]["recovered"] >= 1


def test_cli_audit_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--out", str(tmp_path / "run"), "--audit"]
    for s in [*TINY, "train.epochs=1", "data.train_subset=96"]:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Pruning audit" in out
    data = json.loads((tmp_path / "run" / REPORT_JSON).read_text())
    assert data["config"]["train"]["audit"] is True and data["audit"]["mode"] == "audit"
    assert (tmp_path / "run" / AUDIT_CSV).is_file()
