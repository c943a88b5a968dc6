"""Basin map of the layer slice θ_B × ||W|| with the certified region and the ε line (THEORY §6, Theorem 5.1).

Left: the whole slice (outcome of the projected ODE [22] from every start,
``W = s·Ŵ`` along the fitted direction, all ``θ_i = 1``).  Right: zoom on the
corner that holds the certified region (union over ``a`` and ``R`` of
``D_B(a, ρ)``) and the ε = 0.1 rule.  Usage::

    python paper_figures/basin_layer.py --out DIR [--resolution 96] [--horizon 100] [--seed 0]
"""

from __future__ import annotations

import _style


def main(argv: list[str] | None = None) -> int:
    args = _style.parser(__doc__.splitlines()[0], resolution=28, horizon=100.0).parse_args(argv)
    plt = _style.setup()
    from theory.basin import format_areas, map_slice, plot_basin

    full = map_slice("layer", resolution=args.resolution, horizon=args.horizon, seed=args.seed)
    s_c = full.meta["critical_scale"]
    zoom = map_slice("layer", resolution=max(12, (3 * args.resolution) // 4), horizon=args.horizon, seed=args.seed,
                     x_range=(0.0, 0.15), y_range=(0.0, 1.2 * s_c))
    print(format_areas(full))
    print(format_areas(zoom))
    a, z = full.areas(), zoom.areas()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    plot_basin(full, axes[0], title=f"(a) layer slice: basin of $\\theta_B\\to0$ {a['pruned']:.1%} of the slice, "
                                    f"certified {a['certified_area']:.2%}")
    plot_basin(zoom, axes[1], title=f"(b) zoom: certified {z['certified_area']:.1%} of this window, "
                                    f"basin {z['pruned']:.0%}", legend=False)
    p = full.meta["problem"]
    fig.suptitle(f"Layer pruning, canonical block (m={p['m']}, n={p['n']}, p={p['p']}, N={p['N']}, "
                 f"$\\lambda$={p['lam']:g}, $c_B$={p['c_B']:g}, $c_1$={p['c_1']:g}; seed {args.seed}); "
                 f"$\\varepsilon$-strip: {a['eps_strip_pruned']:.0%} pruned, {a['eps_strip_recovers']:.0%} recovers",
                 fontsize=10)
    fig.tight_layout()
    _style.save(fig, args.out, "basin_layer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
