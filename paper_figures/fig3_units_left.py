"""Figure 3 of the paper: units (filters) left on every unit-gated layer, for a few hyper-parameter choices.

One panel per setting (rows: datasets).  Grey outline: the baseline width of the layer; bar: units left,
mean over seeds (a layer whose block was removed counts 0 units in that seed), whiskers: sd, dots: the
individual seeds; a ``×`` under a layer counts the seeds in which its whole block was pruned.

Settings (``--settings tag1,tag2`` to choose, tags as the run directories name them, e.g.
``combined_g0.1_r0.2_d0.5``); by default up to four per dataset that show what ρ and δ do: the
combined settings at the largest γ with the smallest and largest ρ (largest δ), the one with the
smallest δ, and unit-only pruning at that γ.

Reads the run directories written by ``experiments/compare.py`` (``units_left`` of each report.json);
writes ``fig3_units_left.png`` and ``.pdf`` into ``--out`` (atomically).

    python paper_figures/fig3_units_left.py --runs runs/compare --out reports/figures/compare
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paper_figures.pareto import compare_module  # noqa: E402


def default_settings(settings: Sequence[Any], limit: int = 4) -> list[Any]:
    """Up to ``limit`` settings that contrast ρ and δ (see the module doc), in a stable order."""
    comb = [s for s in settings if s.mode == "combined"]
    out: list[Any] = []
    if comb:
        g = max(s.gamma for s in comb)
        at_g = [s for s in comb if s.gamma == g]
        d_hi, d_lo = max(s.delta for s in at_g), min(s.delta for s in at_g)
        r_lo, r_hi = min(s.rho for s in at_g), max(s.rho for s in at_g)
        wanted = [(r_lo, d_hi), (r_hi, d_hi), (r_lo, d_lo), (r_hi, d_lo)]
        for rho, delta in wanted:
            for s in at_g:
                if s.rho == rho and s.delta == delta and s not in out:
                    out.append(s)
                    break
        out = out[: limit - 1] if len(out) >= limit else out
        unit = [s for s in settings if s.mode == "unit" and s.gamma == g]
        out += unit[:1]
    else:
        out = [s for s in settings if s.mode == "unit"]
    return out[:limit]


def _tick_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``blocks.3.path.0`` -> ``B4`` (one gated layer per block) or ``B4.1`` (several)."""
    parts = [u["layer"].split(".") for u in rows]
    single = all(p[-1] == "0" for p in parts)
    return [f"B{int(p[1]) + 1}" + ("" if single else f".{int(p[-1]) + 1}") for p in parts]


def units_table(recs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any, Any]:
    """Rows of the gated layers and a (seeds × layers) array of units left; block-pruned mask."""
    import numpy as np

    rows = recs[0]["units_left"]
    left = np.array([[u["left"] if u["block_alive"] else 0 for u in r["units_left"]] for r in recs], dtype=float)
    dead = np.array([[not u["block_alive"] for u in r["units_left"]] for r in recs])
    return rows, left, dead


def draw(runs: Path | str, out: Path | str, *, datasets: Sequence[str] | None = None,
         records: Sequence[dict[str, Any]] | None = None, epochs: int | None = None,
         settings: Sequence[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    C = compare_module()
    by_ds = C.figure_records(runs, datasets, records, epochs)
    chosen: dict[str, list[Any]] = {}
    for ds, recs in by_ds.items():
        present = list(dict.fromkeys(r["setting"] for r in recs if r["units_left"] and r["mode"] != "none"))
        if settings:
            sel = [s for tag in settings for s in present if s.tag == tag]
        else:
            sel = default_settings(present)
        if sel:
            chosen[ds] = sel
    if not chosen:
        raise FileNotFoundError(f"no finished pruning runs under {runs}")
    ncol = max(len(v) for v in chosen.values())
    fig, axes = plt.subplots(len(chosen), ncol, figsize=(4.4 * ncol, 3.6 * len(chosen)), squeeze=False)
    for row, (ds, sel) in enumerate(chosen.items()):
        for col in range(ncol):
            ax = axes[row][col]
            if col >= len(sel):
                ax.axis("off")
                continue
            s = sel[col]
            recs = sorted((r for r in by_ds[ds] if r["setting"] == s), key=lambda r: r["seed"])
            rows, left, dead = units_table(recs)
            base = np.array([u["baseline"] for u in rows], dtype=float)
            x = np.arange(len(rows))
            color = C.MODE_STYLE[s.mode][0]
            ax.bar(x, base, 0.8, facecolor="none", edgecolor="0.55", lw=0.8, label="baseline width")
            mean = left.mean(axis=0)
            sd = left.std(axis=0, ddof=1) if len(recs) > 1 else np.zeros_like(mean)
            ax.bar(x, mean, 0.8, color=color, alpha=0.85, yerr=sd, ecolor="black", error_kw={"lw": 0.8},
                   capsize=1.5, label="units left (mean ± sd)")
            for i in range(len(recs)):
                ax.plot(x, left[i], ".", color="black", ms=2.5, alpha=0.6)
            n_dead = dead.sum(axis=0)
            for i in np.flatnonzero(n_dead):
                ax.text(x[i], -0.06 * base.max(), f"×{n_dead[i]}", ha="center", va="top", fontsize=7, color="red")
            ax.set_ylim(-0.14 * base.max(), 1.08 * base.max())
            ax.set_xticks(x)
            ax.set_xticklabels(_tick_labels(rows), fontsize=7, rotation=90)
            kept = 100 * left.sum(axis=1).mean() / base.sum()
            seeds = f"{len(recs)} seed{'s' if len(recs) > 1 else ''}"
            ax.set_title(f"{s.label()}\n{kept:.0f} % of gated units kept; acc "
                         f"{100 * np.mean([r['acc'] for r in recs]):.1f} % ({seeds})", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{ds}: units per gated layer")
            ax.grid(axis="y", alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Units left on the unit-gated layers (B<block>); ×k: the block was pruned in k seeds",
                 fontsize=11)
    fig.tight_layout()
    return C.save_figure(fig, Path(out), "fig3_units_left")


def main(argv: Sequence[str] | None = None) -> int:
    return int(compare_module().figure_main(
        draw, __doc__, argv, settings_help="comma-separated setting tags (default: chosen automatically)"
    ))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
