"""``python -m theory verify``: run the registered numerical checks and write a report.

Each check (see :mod:`theory.checks`) returns a :class:`~theory.checks.CheckResult`
record ``{name, instances, failures, inconclusive, worst_violation, ...}``.
The report directory receives ``results.json`` (all records), ``summary.md``
(a table) and ``checks.png`` (worst violation relative to tolerance per
check), each written atomically.  The exit status is 1 if any check failed.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, atomic_write_text
from .checks import CheckResult, RegisteredCheck, select


@dataclass
class VerifyReport:
    """All results of one ``verify`` run (what :func:`run_verify` returns)."""

    results: list[CheckResult]
    seed: int
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def records(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.results]


def run_verify(
    only: str | None = None,
    *,
    seed: int = 0,
    instances: int | None = None,
    progress: bool = True,
) -> VerifyReport:
    """Run the checks selected by ``only`` (a name, a group, or a comma list; all if None)."""
    checks: list[RegisteredCheck] = select(only)
    counts = [instances if instances is not None else c.default_instances for c in checks]
    if any(n < 1 for n in counts):
        raise ValueError(f"--instances must be >= 1, got {instances}")
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(counts), desc="verify", unit="inst", leave=False)
    results: list[CheckResult] = []
    t0 = time.perf_counter()
    try:
        for i, (check, n) in enumerate(zip(checks, counts)):
            if bar is not None:
                bar.set_postfix_str(check.name)
            rng = np.random.default_rng([seed, i])
            result = check.fn(rng, n, (lambda: bar.update(1)) if bar is not None else (lambda: None))
            if not result.description:
                result.description = check.description
            results.append(result)
    finally:
        if bar is not None:
            bar.close()
    return VerifyReport(results, seed, time.perf_counter() - t0)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def summary_table(report: VerifyReport) -> str:
    """A markdown table with one row per check."""
    lines = [
        "| check | instances | failures | inconclusive | worst violation | tolerance | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report.results:
        status = "pass" if r.passed else "FAIL"
        lines.append(
            f"| {r.name} | {r.instances} | {r.failures} | {r.inconclusive} | {_fmt(r.worst_violation)} "
            f"| {_fmt(r.tolerance)} | {status} |"
        )
    return "\n".join(lines)


def write_report(report: VerifyReport, out: str | Path) -> Path:
    """Write ``results.json``, ``summary.md`` and ``checks.png`` into ``out`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "seed": report.seed,
        "seconds": round(report.seconds, 3),
        "passed": report.passed,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "checks": report.records()}, indent=2) + "\n")
    md = [
        "# Theory verification report",
        "",
        f"Seed {report.seed}, {report.seconds:.1f} s, overall: {'PASS' if report.passed else 'FAIL'}.",
        "",
        summary_table(report),
        "",
        "Inconclusive instances are those where a hypothesis of the property (e.g. Lemma 1's weight ball) "
        "did not hold along the trajectory; they are not counted as passes.",
        "",
    ]
    for r in report.results:
        md += [f"## {r.name}", "", r.description or "", ""]
        if r.metric:
            md += [f"Violation metric: {r.metric}.", ""]
        if r.details:
            md += ["```json", json.dumps(r.details, indent=2, default=str), "```", ""]
    atomic_write_text(out / "summary.md", "\n".join(md))
    _plot(report, out / "checks.png")
    return out


def _plot(report: VerifyReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in report.results]
    ratios = []
    for r in report.results:
        if r.tolerance and r.worst_violation is not None and np.isfinite(r.worst_violation):
            ratios.append(max(r.worst_violation / r.tolerance, 1e-16))
        else:
            ratios.append(np.nan)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5))
    colors = ["tab:green" if r.passed else "tab:red" for r in report.results]
    ax.barh(names, ratios, color=colors)
    ax.axvline(1.0, color="k", ls="--", lw=1, label="tolerance")
    ax.set_xscale("log")
    ax.set_xlabel("worst violation / tolerance (log scale; < 1 passes)")
    ax.set_title("Theory checks")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
