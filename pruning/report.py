"""End-of-run report: ``report.json`` and ``report.md`` in the run directory (written atomically).

The numbers the paper reports for every experiment (Tables 2–5): final test accuracy, layers left,
``fPR = 1 − F/F_tot`` and ``pPR = 1 − P/P_tot`` of the deterministic final network (conv + linear
MACs, parameters incl. BN pairs: THEORY §3 "two uses of one model"), plus the units left per gated
layer (Figure 3) and the training cost relative to the baseline network (Figure 4).  Everything is
computed by :mod:`theory.complexity` from the structures handed in; this module only formats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from theory.atomic import atomic_write_text
from theory.complexity import ComplexityModel
from theory.spec import NetworkSpec

from .timing import markdown_lines

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def units_per_layer(spec: NetworkSpec, baseline: NetworkSpec) -> list[dict[str, Any]]:
    """One row per unit-gated inner layer of the baseline: block name, layer index, units at start and left."""
    rows = []
    for l, (b0, b) in enumerate(zip(baseline.blocks, spec.blocks)):
        for j, n0 in enumerate(b0.unit_widths):
            left = b.unit_widths[j] if b.alive and j < len(b.unit_widths) else 0
            rows.append({"block": b0.name or f"blocks.{l}", "layer": f"blocks.{l}.path.{j}", "baseline": n0,
                         "left": left, "block_alive": b.alive})
    return rows


def build_report(
    *,
    config: dict[str, Any],
    log: list[dict[str, Any]],
    spec: NetworkSpec,
    baseline_spec: NetworkSpec,
    events: list[dict[str, Any]],
    wall_clock_s: float,
    exports: dict[str, str],
    out_dir: str,
    device: str = "",
    audit: dict[str, Any] | None = None,
    processes: int = 1,
    samples: int | None = None,
    timing: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of a run as a JSON-serialisable dict (``audit``: :meth:`pruning.audit.PruningAudit.summary`;
    ``timing``, ``inference``: :meth:`pruning.timing.RunTimer.summary`, :func:`pruning.timing.inference_speedup`)."""
    base = ComplexityModel(baseline_spec, elementwise=False)
    final = ComplexityModel(spec, elementwise=False)
    F_tot, P_tot = float(base.flops()), float(base.params())
    F, P = float(final.flops()), float(final.params())
    last = log[-1] if log else {}
    executed = last["cum_train_flops_dense"] / last["cum_baseline_flops"] if last.get("cum_baseline_flops") else None
    return {
        "run": out_dir,
        "device": device,
        "processes": processes,
        "samples": samples,
        "epochs_completed": int(last.get("epoch", 0)),
        "test_accuracy": last.get("test_acc"),
        "test_loss": last.get("test_loss"),
        "train_loss": last.get("train_loss"),
        "fPR": 1.0 - F / F_tot,
        "pPR": 1.0 - P / P_tot,
        "flops": F,
        "params": P,
        "baseline_flops": F_tot,
        "baseline_params": P_tot,
        "layers_left": spec.depth,
        "baseline_layers": baseline_spec.depth,
        "blocks_alive": spec.blocks_alive,
        "baseline_blocks": len(baseline_spec.blocks),
        "units_left": units_per_layer(spec, baseline_spec),
        "training_cost_ratio": last.get("train_cost_ratio"),
        "training_cost_ratio_dense": executed,
        # which number is which (pruning.timing): FLOPs counted vs seconds measured on this device
        "expected_flops_cost_ratio": last.get("train_cost_ratio"),
        "executed_flops_ratio": executed,
        "measured_train_time_ratio": timing.get("measured_train_time_ratio") if timing else None,
        "inference_speedup_measured": inference.get("speedup") if inference else None,
        "timing": timing,
        "inference": inference,
        "cum_train_flops": last.get("cum_train_flops"),
        "cum_baseline_flops": last.get("cum_baseline_flops"),
        "prune_events": len(events),
        "wall_clock_s": wall_clock_s,
        "exports": exports,
        "audit": audit,
        "budget": budget_summary(config, log, 1.0 - F / F_tot, 1.0 - P / P_tot),
        "config": config,
    }


def budget_summary(config: dict[str, Any], log: list[dict[str, Any]], fpr: float, ppr: float) -> dict[str, Any] | None:
    """The budget of ``objective.target_fpr``/``target_ppr`` (:mod:`pruning.budget`): target vs achieved, γ per epoch.

    ``None`` for a run without a target.  ``trajectory``: one row per epoch (γ at the epoch's last
    iteration, the controller's reference, the expected ratio it measured, the deterministic fPR/pPR).
    """
    o = config.get("objective", {})
    kind = "fPR" if o.get("target_fpr") is not None else "pPR" if o.get("target_ppr") is not None else None
    if kind is None:
        return None
    target = float(o["target_fpr"] if kind == "fPR" else o["target_ppr"])
    achieved = fpr if kind == "fPR" else ppr
    trajectory = [{"epoch": r["epoch"], "gamma": r["gamma"], "reference": r["budget_reference"],
                   f"measured_{kind}": r[f"budget_measured_{kind}"], "fPR": r["fPR"], "pPR": r["pPR"]}
                  for r in log if "gamma" in r]
    return {"kind": kind, "target": target, "achieved": achieved, "error": achieved - target,
            "final_gamma": trajectory[-1]["gamma"] if trajectory else None,
            "max_gamma": max((r["gamma"] for r in trajectory), default=None), "trajectory": trajectory}


def budget_line(budget: dict[str, Any]) -> str:
    """One line: target vs achieved and the γ trajectory (epochs sampled)."""
    traj = budget["trajectory"]
    step = max(1, len(traj) // 6)
    shown = traj[::step] + ([traj[-1]] if traj and (len(traj) - 1) % step else [])
    path = " → ".join(f"{r['gamma']:.4g} (ep {r['epoch']})" for r in shown)
    return (f"Budget: target {budget['kind']} {100 * budget['target']:.1f} %, "
            f"achieved {100 * budget['achieved']:.2f} % "
            f"({100 * budget['error']:+.2f} points); γ adapted from 0: {path}; per epoch in `log.csv` (`gamma`, "
            f"`budget_reference`, `budget_measured_{budget['kind']}`).")


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


def _ratio(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _num(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.0f}"


def to_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    o, m, d = cfg["objective"], cfg["model"], cfg["data"]
    lines = [
        f"# Run report: {m['arch']} on {d['name']} ({m['mode']} mode)",
        "",
        (f"γ adapted (scale {o['gamma']}), " if report.get("budget") else f"γ = {o['gamma']}, ")
        + f"ρ = {o['rho']}, δ = {o['delta']}, λ = {o['lambda']}, ε = {cfg['train']['eps']}, "
        f"{report['epochs_completed']} epochs, device {report['device'] or '?'}"
        + (f" × {report['processes']} processes (data-parallel)" if report.get("processes", 1) > 1 else ""),
        *(["", budget_line(report["budget"])] if report.get("budget") else []),
        "",
        "| metric | value |",
        "|---|---|",
        f"| test accuracy | {_pct(report['test_accuracy'])} |",
        f"| fPR (conv+linear MACs) | {_pct(report['fPR'])} |",
        f"| pPR | {_pct(report['pPR'])} |",
        f"| FLOPs (MACs) | {_num(report['flops'])} of {_num(report['baseline_flops'])} |",
        f"| parameters | {_num(report['params'])} of {_num(report['baseline_params'])} |",
        f"| layers left | {report['layers_left']} of {report['baseline_layers']} |",
        f"| blocks alive | {report['blocks_alive']} of {report['baseline_blocks']} |",
        f"| expected-FLOPs cost ratio (Σ E[F] / baseline) | {_ratio(report['training_cost_ratio'])} |",
        f"| executed-FLOPs ratio (Σ F of the network that ran / baseline) | "
        f"{_ratio(report.get('training_cost_ratio_dense'))} |",
        f"| measured training-time ratio (wall clock) | {_ratio(report.get('measured_train_time_ratio'))} |",
        f"| inference speed-up (measured) | {_ratio(report.get('inference_speedup_measured'), '.2f')} |",
        f"| pruning events | {report['prune_events']} |",
        *([f"| training samples (all processes) | {report['samples']} |"] if report.get("samples") else []),
        f"| wall clock (training) | {report['wall_clock_s']:.1f} s |",
        "",
        "## Units left per gated layer",
        "",
        "| block | layer | baseline | left |",
        "|---|---|---|---|",
    ]
    for r in report["units_left"]:
        left = r["left"] if r["block_alive"] else "pruned"
        lines.append(f"| {r['block']} | {r['layer']} | {r['baseline']} | {left} |")
    time_lines = markdown_lines(report.get("timing"), report.get("inference"))
    if time_lines:
        lines += ["", *time_lines[:-1]]
    if report.get("audit"):
        lines += ["", "## Pruning audit", "", *audit_lines(report["audit"], markdown=True)]
    if report["exports"]:
        lines += ["", "## Exports", ""]
        lines += [f"- {k}: `{v}`" for k, v in report["exports"].items()]
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _frac(n: int, d: int) -> str:
    return f"{n}/{d}" + (f" ({100 * n / d:.1f} %)" if d else "")


def audit_lines(audit: dict[str, Any], *, markdown: bool = False) -> list[str]:
    """The audit summary (:mod:`pruning.audit`) as a paragraph (+ a table with ``markdown``)."""
    u, b = audit["units"], audit["blocks"]
    counter = audit["mode"] == "audit"
    verb = "flagged (kept training: audit mode)" if counter else "removed"
    lines = [
        f"Pruning audit (ε = {audit['eps']}): the ε-rule {verb} {u['flagged']} units and {b['flagged']} blocks; "
        f"certified at that moment (union over a > 0 of Theorem 5.2 resp. 5.1, running-max k over "
        f"{audit['window']} iterations): units {_frac(u['certified'], u['flagged'])}, "
        f"blocks {_frac(b['certified'], b['flagged'])}; with the global k: units {u['certified_global_k']}, "
        f"blocks {b['certified_global_k']}. Certifiable at all (θ < c/(2k), with small enough weights): units "
        f"{u['theta_certifiable']}, blocks {b['theta_certifiable']}; medians at flag time: units "
        f"θ {_g(u['median_theta'])} vs c/(2k) {_g(u['median_theta_max'])}, "
        f"½||u||² {_g(u['median_q'])} vs c/k {_g(u['median_c_over_k'])}; "
        f"blocks θ_B {_g(b['median_theta'])} vs c/(2k) {_g(b['median_theta_max'])}, "
        f"½||W||² {_g(b['median_q'])} vs c/k {_g(b['median_c_over_k'])}."
    ]
    if counter:
        lines.append(
            f"Recovered above ε by the end (premature-pruning rate): units {_frac(u['recovered'], u['flagged'])}, "
            f"blocks {_frac(b['recovered'], b['flagged'])}; above ε at some time after the flag: units "
            f"{_frac(u['recovered_ever'], u['flagged'])}, blocks {_frac(b['recovered_ever'], b['flagged'])}. "
            f"Certified yet recovered (a contradiction of the theorems up to the estimates of k and c): "
            f"units {u['certified_recovered']}, blocks {b['certified_recovered']}."
        )
        end = audit.get("end_of_run_prune")
        if end:
            lines.append(
                f"The ε-rule applied once at the end: test accuracy {100 * end['test_accuracy']:.2f} %, "
                f"fPR {100 * end['fPR']:.1f} %, pPR {100 * end['pPR']:.1f} %, {end['blocks_alive']} blocks alive."
            )
    lines.append("Caveat: k is a lower bound of Lemma 1's sup-based constant, so the certificates are optimistic; "
                 "c = the current γ. Per-structure records: " + ", ".join(
                     f"`{v}`" for v in (audit.get("files") or {}).values()))
    if not markdown:
        return lines
    out = [" ".join(lines), ""]
    if counter:
        out += ["| structures | flagged | certified | recovered (end) | recovered (ever) | premature rate "
                "| certified ∧ recovered |", "|---|---|---|---|---|---|---|"]
        for name, c in (("units", u), ("blocks", b)):
            rate = "–" if c["premature_rate"] is None else f"{100 * c['premature_rate']:.1f} %"
            out.append(f"| {name} | {c['flagged']} | {c['certified']} | {c['recovered']} | {c['recovered_ever']} "
                       f"| {rate} | {c['certified_recovered']} |")
    else:
        out += ["| structures | removed | certified | certified (global k) |", "|---|---|---|---|"]
        for name, c in (("units", u), ("blocks", b)):
            out.append(f"| {name} | {c['flagged']} | {c['certified']} | {c['certified_global_k']} |")
    return out


def write_report(out_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` atomically; returns their paths."""
    out = Path(out_dir)
    jp, mp = out / REPORT_JSON, out / REPORT_MD
    atomic_write_text(jp, json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write_text(mp, to_markdown(report))
    return jp, mp


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


__all__ = ["REPORT_JSON", "REPORT_MD", "audit_lines", "budget_line", "budget_summary", "build_report", "to_markdown",
           "units_per_layer", "write_report"]
