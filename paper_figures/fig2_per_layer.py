"""Figure 2 of the paper: parameters and FLOPs of every layer, baseline vs pruned network, log scale.

For one run per dataset (``--run DIR``, or picked automatically: among the combined-mode settings on
the accuracy-vs-fPR Pareto front, the one that removed the most layers, ties broken by accuracy; its
lowest seed), the final compacted network is rebuilt from the run's checkpoint
(:func:`pruning.train.load_run`) and the baseline from its configuration; both go through the one
complexity model, :meth:`theory.complexity.ComplexityModel.per_layer` (conv + linear MACs, parameters
incl. BN pairs).  Bars: baseline (violet) and pruned (green) per weight layer; a layer removed
entirely (its residual block pruned) has no green bar and its baseline bar is hatched on a grey band.

Reads the run directories written by ``experiments/compare.py``; writes ``fig2_per_layer_<dataset>.png``
and ``.pdf`` into ``--out`` (atomically).

    python paper_figures/fig2_per_layer.py --runs runs/compare --out reports/figures/compare [--run DIR]
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


def per_layer(run_dir: Path | str) -> dict[str, Any]:
    """Per-layer (FLOPs, params) of the baseline and of the run's final network, plus its headline numbers."""
    from pruning.build import build_network
    from pruning.train import load_run
    from theory.complexity import ComplexityModel

    cfg, model, ckpt = load_run(run_dir)
    data = ckpt["data"]
    baseline = build_network(cfg, int(data["num_classes"]), tuple(data["input_shape"]), device="meta").spec()
    base = ComplexityModel(baseline, elementwise=False).per_layer()
    final = ComplexityModel(model.spec(), elementwise=False).per_layer()
    return {"labels": list(base), "baseline": base, "pruned": {k: final.get(k, (0.0, 0.0)) for k in base},
            "config": cfg}


def short_label(label: str) -> str:
    """``stem.0`` -> ``stem``, ``blocks.3.path.1`` -> ``B4.2`` (blocks and layers from 1), ``head.0`` -> ``fc``."""
    parts = label.split(".")
    if parts[0] == "stem":
        return "stem" if parts[1] == "0" else f"stem{parts[1]}"
    if parts[0] == "head":
        return "fc" if parts[1] == "0" else f"fc{parts[1]}"
    if parts[0] == "blocks":
        b = int(parts[1]) + 1
        if parts[2] == "path":
            return f"B{b}.{int(parts[3]) + 1}"
        return f"B{b}.sc" if parts[2] == "shortcut" else f"B{b}.{parts[2]}"
    return label


def pick_run(C: Any, recs: Sequence[dict[str, Any]], ds: str) -> dict[str, Any] | None:
    rows = C.aggregate(recs)
    front = C.mode_fronts(rows, ds).get("combined") or [r for r in rows if r["mode"] != "none"]
    if not front:
        return None
    best = min(front, key=lambda r: (r["layers"], -r["acc"]))
    runs = sorted((r for r in recs if r["setting"] == best["setting"]), key=lambda r: r["seed"])
    return runs[0] if runs else None


def plot(info: dict[str, Any], title: str, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    C = compare_module()
    labels = [k for k in info["labels"] if not k.endswith(".add") and not k.endswith(".out")]
    x = np.arange(len(labels))
    base_c, pruned_c = C.MODE_STYLE["none"][0], C.MODE_STYLE["combined"][0]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.42 * len(labels) + 2), 7.2), sharex=True)
    for ax, k, name in ((axes[0], 1, "parameters"), (axes[1], 0, "FLOPs (MACs)")):
        b = np.array([info["baseline"][lab][k] for lab in labels])
        p = np.array([info["pruned"][lab][k] for lab in labels])
        removed = (p == 0) & (b > 0)
        for i in np.flatnonzero(removed):
            ax.axvspan(i - 0.5, i + 0.5, color="0.85", zorder=0)
        w = 0.4
        bars = ax.bar(x - w / 2, np.where(b > 0, b, np.nan), w, color=base_c, label="baseline", zorder=2)
        for i in np.flatnonzero(removed):
            bars[i].set_hatch("///")
            bars[i].set_alpha(0.45)
        ax.bar(x + w / 2, np.where(p > 0, p, np.nan), w, color=pruned_c, label="pruned", zorder=2)
        ax.set_yscale("log")
        ax.set_ylim(top=np.nanmax(b) * 8)  # headroom for the legend above the bars
        ax.set_ylabel(f"{name} per layer (log)")
        tot_b, tot_p = b.sum(), p.sum()
        ax.set_title(f"{name}: {tot_p:,.0f} of {tot_b:,.0f} kept ({100 * (1 - tot_p / tot_b):.1f} % pruned)",
                     fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
        if removed.any():
            from matplotlib.patches import Patch

            handles, names = ax.get_legend_handles_labels()
            handles.append(Patch(facecolor="0.85", edgecolor=base_c, hatch="///", label="layer removed"))
            ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=3)
        else:
            ax.legend(loc="upper left", fontsize=8, ncol=2)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([short_label(lab) for lab in labels], rotation=90, fontsize=8)
    axes[1].set_xlabel("weight layer (B<block>.<layer in block>)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return C.save_figure(fig, out, stem)


def draw(runs: Path | str, out: Path | str, *, datasets: Sequence[str] | None = None,
         records: Sequence[dict[str, Any]] | None = None, epochs: int | None = None,
         run: Path | str | None = None) -> list[Path]:
    C = compare_module()
    written: list[Path] = []
    if run is not None:
        rec = C.record_from_dir(Path(run))
        if rec is None:
            raise FileNotFoundError(f"{run} has no report.json")
        chosen = {rec["dataset"]: rec}
    else:
        chosen = {}
        for ds, recs in C.figure_records(runs, datasets, records, epochs).items():
            r = pick_run(C, recs, ds)
            if r is not None:
                chosen[ds] = r
    for ds, r in chosen.items():
        info = per_layer(r["dir"])
        title = (f"{C.DATASET_TITLES.get(ds, ds)}: {r['setting'].label()}, seed {r['seed']}, {r['epochs']} epochs\n"
                 f"test acc {100 * r['acc']:.2f} %, fPR {100 * r['fPR']:.1f} %, pPR {100 * r['pPR']:.1f} %, "
                 f"layers {r['layers']}/{r['baseline_layers']}")
        written += plot(info, title, Path(out), f"fig2_per_layer_{ds}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    C = compare_module()
    ap = C.figure_parser(__doc__)
    ap.add_argument("--run", default=None, help="one run directory to draw (default: picked per dataset)")
    args = ap.parse_args(argv)
    ds = [d for d in args.datasets.split(",") if d] or None
    for p in draw(args.runs, args.out, datasets=ds, epochs=args.epochs, run=args.run):
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
