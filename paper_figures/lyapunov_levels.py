"""Level sets of V_B = ½||W||² + a θ_B on the layer slice, shaded by the sign of V̇_B (THEORY §6, [31]–[32]).

``V̇_B`` is evaluated exactly from the projected field [22]/[24] at every
point of the slice ``(θ_B, W = s·Ŵ, θ_i = 1)``.  ``a`` and the Lemma-1 radius
``R`` are those that maximise the area of the certified sublevel set
``{V_B < ρ}`` (``ρ = ρ_max(a) = R²/2``, see
:func:`theory.certificates.union_margin_auto`).  Left: around the certified
set, which lies where ``V̇_B < 0``.  Right: the whole slice — ``V_B`` is a
Lyapunov function only locally: at useful weights ``V̇_B > 0``.  Usage::

    python paper_figures/lyapunov_levels.py --out DIR [--resolution 400] [--seed 0]
"""

from __future__ import annotations

import _style


def main(argv: list[str] | None = None) -> int:
    args = _style.parser(__doc__.splitlines()[0], resolution=160).parse_args(argv)
    plt = _style.setup()
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from theory.basin import EPS, fit_weights, slice_problem
    from theory.block_model import lemma1_k, unpack
    from theory.certificates import _auto_P, kappa, lemma1_coeffs, lyapunov_block_rate, union_boundary

    P = slice_problem(args.seed)
    W1, W2 = fit_weights(P, args.seed)
    norm = float(np.sqrt(unpack(P.pack(1.0, np.ones(P.n), W1, W2), P).weight_norm_sq))
    W1, W2 = W1 / norm, W2 / norm
    k0, k2 = lemma1_coeffs(P)
    a_grid = np.geomspace(1e-3, 1e3, 4001)
    Pa = _auto_P(a_grid, P.c_B, k0, k2)
    area = Pa**1.5 / a_grid  # area of {½s² + aθ < ρ} ∝ ρ^{3/2}/a
    a = float(a_grid[np.argmax(area)])
    rho = float(_auto_P(np.array(a), P.c_B, k0, k2))
    R = float(np.sqrt(2 * rho))
    k = lemma1_k(P, R)
    rho_cert = 0.999 * rho  # strictly inside: rho < a c_B/((2+a)k) = R²/2
    print(f"a = {a:.4g}, R = {R:.4g}, k = {k:.4g}, rho = {rho:.4g}, kappa_B = {kappa(a, rho_cert, P.c_B, k):.4g}")

    def panel(ax, th_max, s_max, title, zoom):
        n = args.resolution
        th = np.linspace(0.0, th_max, n)
        s = np.linspace(0.0, s_max, n)
        TB, S = np.meshgrid(th, s)
        Y = P.pack(TB, np.ones((n, n, P.n)), S[..., None, None] * W1, S[..., None, None] * W2)
        Vdot = lyapunov_block_rate(P, Y, a)
        V = 0.5 * S**2 + a * TB
        ax.pcolormesh(th, s, (Vdot > 0).astype(float), cmap=ListedColormap(["#cfe0f3", "#f6c9c4"]), vmin=0, vmax=1,
                      shading="nearest")
        levels = np.linspace(0, V.max(), 13)[1:] if not zoom else rho * np.array([0.25, 0.5, 0.75, 1.25, 1.5, 2, 3])
        cs = ax.contour(th, s, V, levels=levels, colors="0.35", linewidths=0.7)
        ax.clabel(cs, fontsize=6, fmt="%.2g")
        ax.contour(th, s, V, levels=[rho], colors="tab:red", linewidths=2.0)
        ub = union_boundary(th, P.c_B, k0=k0, k2=k2)
        ax.plot(th[ub > 0], np.minimum(ub[ub > 0], s_max), color="tab:red", ls=":", lw=1.5)
        if th_max > EPS:
            ax.axvline(EPS, color="tab:green", ls="--", lw=1.3)
        ax.set_xlim(0, th_max)
        ax.set_ylim(0, s_max)
        ax.set_xlabel(r"$\theta_B$")
        ax.set_ylabel(r"$\|W\|$ along the fitted direction")
        ax.set_title(title)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panel(axes[0], 3 * rho / a, 2.2 * np.sqrt(2 * rho),
          f"(a) near the certificate: $a$ = {a:.3g}, $\\rho$ = {rho:.3g}, $R$ = {R:.3g}", True)
    panel(axes[1], 1.0, 1.2 * norm, "(b) whole slice: $\\dot V_B > 0$ where the block is useful", False)
    handles = [
        Patch(facecolor="#cfe0f3", label=r"$\dot V_B < 0$"),
        Patch(facecolor="#f6c9c4", label=r"$\dot V_B > 0$"),
        plt.Line2D([], [], color="0.35", lw=0.7, label=r"level sets of $V_B = \frac{1}{2}\|W\|^2 + a\theta_B$"),
        plt.Line2D([], [], color="tab:red", lw=2.0, label=r"certified $\{V_B < \rho\}$ (Thm 5.1, this $a$)"),
        plt.Line2D([], [], color="tab:red", ls=":", lw=1.5, label="union over $a$ and $R$"),
        plt.Line2D([], [], color="tab:green", ls="--", lw=1.3, label=r"$\theta_B = \varepsilon = 0.1$"),
    ]
    axes[0].legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.9)
    p = P
    fig.suptitle(f"Lyapunov function of Theorem 5.1 on the layer slice (N={p.N}, $\\lambda$={p.lam:g}, "
                 f"$c_B$={p.c_B:g}, $c_1$={p.c_1:g}, Lemma-1 k={k:.0f}; seed {args.seed})", fontsize=10)
    fig.tight_layout()
    _style.save(fig, args.out, "lyapunov_levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
