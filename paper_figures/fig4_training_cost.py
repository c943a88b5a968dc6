"""Figure 4 of the paper: cumulative training load vs epoch, normalised by the baseline's total load.

The trainer logs, per epoch, ``cum_train_flops = Σ_k E[F](θ_k)|B_k|`` — the expected conv + linear MACs
of the network that survived up to iteration ``k`` ([9], Algorithm 1) — and ``cum_baseline_flops``,
the baseline network's cost for the same samples.  Each curve is ``cum_train_flops(epoch)`` divided by
the baseline's load at the end of training (mean over seeds, band: min–max over seeds), so the
baseline is the diagonal from 0 to 1 and a curve ends at the run's training-cost ratio.  One panel
per dataset, one line per setting (colour: mode; line style: γ; shade: ρ/δ).

Reads ``log.csv`` of the run directories written by ``experiments/compare.py``; writes
``fig4_training_cost.png`` and ``.pdf`` into ``--out`` (atomically).

    python paper_figures/fig4_training_cost.py --runs runs/compare --out reports/figures/compare
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paper_figures.pareto import compare_module  # noqa: E402

LINESTYLES = ("-", "--", ":", "-.")


def load_curve(run_dir: Path | str) -> tuple[list[int], list[float]]:
    """(epochs 0..E, cumulative load / baseline's total load) of one run, from its log.csv."""
    with open(Path(run_dir) / "log.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return [0], [0.0]
    total = float(rows[-1]["cum_baseline_flops"])
    ep = [0] + [int(r["epoch"]) for r in rows]
    load = [0.0] + [float(r["cum_train_flops"]) / total for r in rows]
    return ep, load


def _shade(color: str, k: int, n: int) -> Any:
    """``k``-th of ``n`` shades of ``color`` (dark to light)."""
    from matplotlib.colors import to_rgb

    rgb = to_rgb(color)
    f = 0.0 if n <= 1 else 0.55 * k / (n - 1)
    return tuple(c + (1 - c) * f for c in rgb)


def draw(runs: Path | str, out: Path | str, *, datasets: Sequence[str] | None = None,
         records: Sequence[dict[str, Any]] | None = None, epochs: int | None = None,
         settings: Sequence[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    C = compare_module()
    by_ds = C.figure_records(runs, datasets, records, epochs)
    if not by_ds:
        raise FileNotFoundError(f"no finished runs under {runs}")
    fig, axes = plt.subplots(1, len(by_ds), figsize=(7.6 * len(by_ds), 5.4), squeeze=False)
    for ax, (ds, recs) in zip(axes[0], by_ds.items()):
        present = list(dict.fromkeys(r["setting"] for r in C.aggregate(recs)))  # table order
        if settings:
            present = [s for s in present if s.tag in settings or s.mode == "none"]
        gammas = sorted({s.gamma for s in present if s.gamma is not None})
        for mode in C.MODES:
            group = [s for s in present if s.mode == mode]
            for k, s in enumerate(group):
                curves = [load_curve(r["dir"]) for r in recs if r["setting"] == s]
                n = min(len(c[0]) for c in curves)
                ep = np.array(curves[0][0][:n])
                ys = np.array([c[1][:n] for c in curves])
                color = C.MODE_STYLE[mode][0] if mode == "none" else _shade(C.MODE_STYLE[mode][0], k, len(group))
                ls = "-" if s.gamma is None else LINESTYLES[gammas.index(s.gamma) % len(LINESTYLES)]
                lw = 2.2 if mode == "none" else 1.4
                ax.plot(ep, ys.mean(axis=0), ls=ls, color=color, lw=lw,
                        label=f"{s.label()}: {ys[:, -1].mean():.2f}")
                if len(curves) > 1:
                    ax.fill_between(ep, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.12, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cumulative training load / baseline's total")
        ax.set_title(C.DATASET_TITLES.get(ds, ds), fontsize=10)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", title="setting: final ratio", title_fontsize=7)
    fig.suptitle("Cumulative training load (Σ E[F]·batch of the surviving network) normalised by the baseline "
                 "(mean over seeds; band: min–max)", fontsize=11)
    fig.tight_layout()
    return C.save_figure(fig, Path(out), "fig4_training_cost")


def main(argv: Sequence[str] | None = None) -> int:
    return int(compare_module().figure_main(
        draw, __doc__, argv, settings_help="comma-separated setting tags to draw (default: all)"
    ))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
