"""Figure: projected SGD on a real gated network against the projected ODE [22] (THEORY §5, §6).

Top rows, one per estimator: the gate trajectories ``θ_j(t)``, one panel per gate — the ODE solution
(black) and the SGD clouds (one colour per step ``η``, one thin line per seed) from the same
initial state, time ``t = kη``.  With the unbiased exact-difference estimator the clouds close in
on the ODE as ``η`` shrinks; the straight-through estimator follows a different (biased) path.
A second figure shows the sup-deviation on ``[0, T]`` against ``η`` (log–log, mean ± sd over
seeds) with a ``√η`` guide.

Reads the ``ode_vs_sgd.npz`` written by ``python experiments/ode_vs_sgd.py --out DIR`` (default
``reports/ode_vs_sgd/ode_vs_sgd.npz``); without it (or with ``--quick``) it runs a quick version of
the experiment itself (two steps, two seeds, short horizon).  Writes ``ode_vs_sgd.png/.pdf`` and
``ode_vs_sgd_deviation.png/.pdf`` into ``--out`` (default ``reports/figures``), atomically.

    python paper_figures/ode_vs_sgd.py [--npz PATH] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paper_figures._style import load_script  # noqa: E402

DEFAULT_NPZ = ROOT / "reports" / "ode_vs_sgd" / "ode_vs_sgd.npz"
DEFAULT_OUT = ROOT / "reports" / "figures"
LABELS = {"exact-difference": "exact-difference (unbiased)", "straight-through": "straight-through (biased)"}


def _experiment() -> Any:
    return load_script("ode_vs_sgd_experiment", "experiments/ode_vs_sgd.py")


def quick_npz(out: Path) -> Path:
    """Run a quick version of the experiment (η ∈ {8e-3, 1e-3}, 2 seeds, T = 1) and save its npz in ``out``."""
    E = _experiment()
    res = E.compare(steps=[8e-3, 1e-3], horizon=1.0, seeds=2)
    return E.save(res, out)[1]


def load(path: Path) -> dict[str, Any]:
    """The arrays of an ``ode_vs_sgd.npz`` as a dict (SGD runs under ``runs[(estimator, eta)] = [(t, θ), …]``)."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    runs: dict[tuple[str, float], list[tuple[np.ndarray, np.ndarray]]] = {}
    for key in sorted(k for k in data if k.startswith("sgd_t|")):
        _, est, eta, seed = key.split("|")
        runs.setdefault((est, float(eta)), []).append((data[key], data[f"sgd_theta|{est}|{eta}|{seed}"]))
    data["runs"] = runs
    return data


def _pretty(name: str) -> str:
    """``theta_B[1]`` -> ``θ_B^(2)`` style labels (blocks and units counted from 1)."""
    if name.startswith("theta_B["):
        return rf"$\theta_B$ block {int(name[8:-1]) + 1}"
    kind, rest = name[6], name[8:]
    block, unit = rest.split("][")
    return rf"$\theta_{kind}$ block {int(block) + 1}, unit {int(unit.rstrip(']')) + 1}"


def plot_trajectories(data: dict[str, Any], out: Path) -> list[Path]:
    """One row of gate panels per estimator; after the exact-difference row, its deviations ``θ_SGD − θ_ODE``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(n) for n in data["theta_names"]]
    steps = sorted((float(s) for s in data["steps"]), reverse=True)
    colors = dict(zip(steps, plt.get_cmap("viridis")(np.linspace(0.0, 0.8, len(steps)))))
    rows: list[tuple[str, bool]] = []
    for est in (str(e) for e in data["estimators"]):
        rows.append((est, False))
        if est == "exact-difference":
            rows.append((est, True))
    K = len(names)
    fig, axes = plt.subplots(len(rows), K, figsize=(2.6 * K, 2.4 * len(rows) + 0.9), sharex=True, squeeze=False)
    for r, (est, deviation) in enumerate(rows):
        lim = 0.0
        for j in range(K):
            ax = axes[r, j]
            ode_j = data["ode_theta"][:, j]
            for eta in steps:
                for t, th in data["runs"].get((est, eta), []):
                    if deviation:
                        d = th[:, j] - np.interp(t, data["ode_t"], ode_j)
                        lim = max(lim, float(np.abs(d).max()))
                        ax.plot(t, d, color=colors[eta], lw=0.7, alpha=0.6)
                    else:
                        ax.plot(t, th[:, j], color=colors[eta], lw=0.7, alpha=0.6)
            if deviation:
                ax.axhline(0.0, color="k", lw=1.2)
            else:
                ax.plot(data["ode_t"], ode_j, color="k", lw=1.3)
                ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(_pretty(names[j]), fontsize=10)
            if r == len(rows) - 1:
                ax.set_xlabel("time $t = k\\eta$")
            if j:
                ax.tick_params(labelleft=False)
        if deviation:
            for j in range(K):
                axes[r, j].set_ylim(-1.05 * lim, 1.05 * lim)
            axes[r, 0].set_ylabel(f"{LABELS.get(est, est)}\n$\\theta_{{SGD}} - \\theta_{{ODE}}$", fontsize=9)
        else:
            axes[r, 0].set_ylabel(f"{LABELS.get(est, est)}\ngate $\\theta$", fontsize=9)
    handles = [plt.Line2D([], [], color="k", lw=1.3, label="ODE [22] (exact $J$)")]
    handles += [plt.Line2D([], [], color=colors[eta], lw=1.2, label=f"SGD $\\eta$ = {eta:g}") for eta in steps]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return _save(fig, out / "ode_vs_sgd")


def plot_deviation(data: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    markers = {"exact-difference": "o", "straight-through": "s"}
    for est in (str(e) for e in data["estimators"]):
        dev = data.get(f"dev|{est}")
        if dev is None or dev.size == 0:
            continue
        for ax, (m, s) in zip(axes, ((1, 2), (3, 4))):
            ax.errorbar(dev[:, 0], dev[:, m], yerr=dev[:, s], marker=markers.get(est, "^"), capsize=3,
                        label=LABELS.get(est, est))
    eta = np.sort(np.asarray(data["steps"], dtype=float))
    ed = data.get("dev|exact-difference")
    for ax, m, what in zip(axes, (1, 3), (r"$\sup_t \|\theta_{SGD} - \theta_{ODE}\|_\infty$",
                                          r"$\sup_t \|W_{SGD} - W_{ODE}\|_2$")):
        if ed is not None and ed.size:
            ref = ed[np.argmax(ed[:, 0]), m] * np.sqrt(eta / ed[:, 0].max())
            ax.plot(eta, ref, "k--", lw=1, label=r"$\propto\sqrt{\eta}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(eta, [f"{e:g}" for e in eta])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(r"step $\eta$")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=9)
    fig.suptitle(f"sup-deviation on [0, T], T = {float(data['horizon']):g} (mean ± sd over {int(data['seeds'])} seeds)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "ode_vs_sgd_deviation")


def _save(fig: Any, stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from theory.atomic import atomic_path

    written = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        written.append(path)
    plt.close(fig)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", type=Path, default=None, help=f"experiment output (default {DEFAULT_NPZ})")
    ap.add_argument("--quick", action="store_true", help="run a quick version of the experiment instead of reading")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder for the PNG and PDF files")
    args = ap.parse_args(argv)
    npz = args.npz if args.npz is not None else DEFAULT_NPZ
    if args.quick or not npz.is_file():
        if args.npz is not None and not args.quick:
            ap.error(f"--npz {npz} does not exist")
        print(f"running a quick version of experiments/ode_vs_sgd.py (no {npz})" if not args.quick else
              "running a quick version of experiments/ode_vs_sgd.py")
        npz = quick_npz(args.out)
    data = load(npz)
    written = plot_trajectories(data, args.out) + plot_deviation(data, args.out)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
