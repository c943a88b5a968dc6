"""Figure: test accuracy vs fPR of every setting, one marker and colour per mode, each mode's Pareto front drawn.

One panel per dataset.  Large markers are the per-setting means over seeds (error bars: sd of accuracy
and fPR), small faint ones the individual runs; the baseline (mode ``none``) is a star at fPR = 0 with
a dashed line at its accuracy.  The staircase of each mode is the boundary of the region its front
dominates (both axes maximised), computed from the means by ``experiments/compare.py``
(:func:`pareto_front`), the same fronts whose dominance RESULTS.md states.

Reads the run directories written by ``experiments/compare.py``; writes ``pareto.png`` and
``pareto.pdf`` into ``--out`` (atomically).

    python paper_figures/pareto.py --runs runs/compare --out reports/figures/compare
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paper_figures._style import load_script  # noqa: E402


def compare_module() -> Any:
    """``experiments/compare.py`` (aggregation, fronts, figure helpers), loaded once."""
    return load_script("experiments_compare", "experiments/compare.py")


def draw(runs: Path | str, out: Path | str, *, datasets: Sequence[str] | None = None,
         records: Sequence[dict[str, Any]] | None = None, epochs: int | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = compare_module()
    by_ds = C.figure_records(runs, datasets, records, epochs)
    if not by_ds:
        raise FileNotFoundError(f"no finished runs under {runs}")
    fig, axes = plt.subplots(1, len(by_ds), figsize=(6.4 * len(by_ds), 5.0), squeeze=False)
    for ax, (ds, recs) in zip(axes[0], by_ds.items()):
        rows = C.aggregate(recs)
        fronts = C.mode_fronts(rows, ds)
        for mode in C.MODES:
            color, marker = C.MODE_STYLE[mode]
            rs = [r for r in rows if r["mode"] == mode]
            if not rs:
                continue
            runs_m = [r for r in recs if r["mode"] == mode]
            ax.scatter([100 * r["fPR"] for r in runs_m], [100 * r["acc"] for r in runs_m], s=12, color=color,
                       marker=marker, alpha=0.25, linewidths=0)
            ax.errorbar([100 * r["fPR"] for r in rs], [100 * r["acc"] for r in rs],
                        xerr=[100 * _z(r["fPR_sd"]) for r in rs], yerr=[100 * _z(r["acc_sd"]) for r in rs],
                        fmt=marker, color=color, ms=11 if mode == "none" else 7, mec="black", mew=0.5,
                        elinewidth=0.8, capsize=2, label=f"{C.MODE_TITLES[mode]} ({len(rs)} settings)"
                        if mode != "none" else "baseline (no pruning)", zorder=3)
            if mode == "none":
                ax.axhline(100 * rs[0]["acc"], color=color, ls="--", lw=0.8, alpha=0.7)
            else:
                front = fronts.get(mode, [])
                if front:
                    xs = [100 * r["fPR"] for r in front]
                    ys = [100 * r["acc"] for r in front]
                    # staircase boundary of the dominated region: from the y-axis to the last point
                    ax.step([0.0, *xs], [ys[0], *ys], where="pre", color=color, lw=1.6, alpha=0.9, zorder=2)
        dom = C.dominance(rows, ds)
        rel = ", ".join(f"vs {C.MODE_TITLES[m]}: {dom['relations'][m]}" for m in C.SINGLE_MODES)
        ax.set_title(f"{C.DATASET_TITLES.get(ds, ds)}\ncombined front {rel}", fontsize=10)
        ax.set_xlabel("fPR: FLOPs pruned (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xlim(-3, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    n_ep = sorted({r["epochs"] for recs in by_ds.values() for r in recs})
    fig.suptitle(f"Accuracy vs FLOPs pruning ratio; lines: Pareto fronts of the per-setting means "
                 f"({'/'.join(map(str, n_ep))} epochs)", fontsize=11)
    fig.tight_layout()
    return C.save_figure(fig, Path(out), "pareto")


def _z(x: float) -> float:
    return 0.0 if x != x else x  # NaN sd (one seed) -> no error bar


def main(argv: Sequence[str] | None = None) -> int:
    return int(compare_module().figure_main(draw, __doc__, argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
