"""Phase portraits in (θ_B, ||W||) of a useful and a useless block (THEORY §6–§7, Theorem 5.1).

Trajectories of the projected ODE [22]/[24] (reference integrator
:func:`theory.ode.odeint`) from a grid of starts ``(θ_B, W = s·Ŵ, θ_i = 1)``
along the fitted direction ``Ŵ`` of the useful block, projected onto
``(θ_B, ||W||)``.  Useful block: the §7 block of :func:`theory.basin.slice_problem`
(teacher signal, ``g_B ≈ −41`` at the fit against ``γ_B = 5``).  Useless
block: the same inputs with targets that hold no teacher signal (noise
only), so ``g_B`` never outweighs ``γ_B``.  Certified region (union over
``a`` and ``R``) hatched, ε line dashed.  Usage::

    python paper_figures/phase_portrait.py --out DIR [--resolution 5] [--horizon 30] [--seed 0]

``--resolution`` is the number of starts per axis.
"""

from __future__ import annotations

import _style


def main(argv: list[str] | None = None) -> int:
    args = _style.parser(__doc__.splitlines()[0], resolution=5, horizon=30.0).parse_args(argv)
    plt = _style.setup()
    import numpy as np

    from theory.basin import EPS, fit_weights, slice_problem
    from theory.block_model import BlockProblem, field, unpack
    from theory.certificates import lemma1_coeffs, union_boundary
    from theory.ode import odeint

    useful = slice_problem(args.seed)
    noise = 0.1 * np.random.default_rng(args.seed + 7).standard_normal(useful.Y.shape)
    useless = BlockProblem(useful.X, useful.Xh @ useful.S.T + noise, useful.S, useful.n, useful.lam, useful.c_B,
                           useful.c_1)
    W1, W2 = fit_weights(useful, args.seed)
    fit_norm = float(np.sqrt(unpack(useful.pack(1.0, np.ones(useful.n), W1, W2), useful).weight_norm_sq))
    W1, W2 = W1 / fit_norm, W2 / fit_norm
    nr = max(2, args.resolution)
    thetas = np.linspace(0.1, 0.95, nr)
    scales = np.geomspace(0.1, 1.3 * fit_norm, nr)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, P, name in ((axes[0], useful, "useful block"), (axes[1], useless, "useless block (noise targets)")):
        f = field(P)
        ends = []
        for tb in thetas:
            for s in scales:
                y0 = P.pack(tb, np.ones(P.n), s * W1, s * W2)
                res = odeint(f, y0, (0.0, args.horizon), theta_slice=P.theta_slice, rtol=1e-8, atol=1e-10,
                             t_eval=np.concatenate([[0.0], np.geomspace(1e-4, args.horizon, 400)]), max_segments=200)
                st = unpack(res.y, P)
                x, yv = st.theta_B, np.sqrt(st.weight_norm_sq)
                color = "tab:blue" if x[-1] < 0.5 else "tab:orange"
                ax.plot(x, yv, color=color, lw=1.0, alpha=0.85)
                seg = np.hypot(np.diff(x), np.diff(np.arcsinh(yv / 0.1)) / 4)  # path length as drawn (symlog)
                cum = np.concatenate([[0.0], np.cumsum(seg)])
                j = int(np.clip(np.searchsorted(cum, 0.35 * cum[-1]), 1, len(x) - 1))
                ax.annotate("", xy=(x[j], yv[j]), xytext=(x[j - 1], yv[j - 1]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 1.0})
                ax.plot(x[0], yv[0], "o", ms=3.5, color=color, mfc="white")
                ends.append((x[-1], yv[-1]))
        e = np.array(ends)
        ax.plot(e[:, 0], e[:, 1], "s", ms=6, color="k", mfc="none")
        k0, k2 = lemma1_coeffs(P)
        th = np.linspace(0, 1, 4001)
        ub = union_boundary(th, P.c_B, k0=k0, k2=k2)
        pos = ub > 0
        ax.fill_between(th[pos], 0, ub[pos], facecolor="none", edgecolor="tab:red", hatch="////", lw=0.0)
        ax.plot(th[pos], ub[pos], color="tab:red", lw=1.5)
        ax.axvline(EPS, color="tab:green", ls="--", lw=1.3)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(r"$\theta_B$")
        pruned = int(np.sum(e[:, 0] < 0.5))
        ax.set_title(f"{name}: {pruned}/{len(e)} trajectories end with $\\theta_B = 0$")
    axes[0].set_ylabel(r"$\|W\|$")
    axes[0].set_yscale("symlog", linthresh=0.1)
    axes[0].set_ylim(0, 1.5 * scales[-1])
    handles = [
        plt.Line2D([], [], color="tab:orange", lw=1.0, label=r"ends with the block kept ($\theta_B \to 1$)"),
        plt.Line2D([], [], color="tab:blue", lw=1.0, label=r"ends with the block pruned ($\theta_B = 0$)"),
        plt.Line2D([], [], ls="", marker="o", ms=3.5, color="0.3", mfc="white", label="start"),
        plt.Line2D([], [], ls="", marker="s", ms=6, color="k", mfc="none", label=f"state at t = {args.horizon:g}"),
        plt.Line2D([], [], color="tab:red", lw=1.5, label="certified region (Thm 5.1)"),
        plt.Line2D([], [], color="tab:green", ls="--", lw=1.3, label=r"$\theta_B = \varepsilon = 0.1$"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle(f"Phase portraits of the projected ODE [22] (N={useful.N}, $\\lambda$={useful.lam:g}, "
                 f"$c_B$={useful.c_B:g}, $c_1$={useful.c_1:g}; seed {args.seed})", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _style.save(fig, args.out, "phase_portrait")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
