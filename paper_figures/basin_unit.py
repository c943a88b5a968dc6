"""Basin map of the unit slice θ_i × ||(w_i, v_i)|| with the certified region and the ε line (Theorem 5.2).

Left: the whole slice, linear axes (unit ``i`` along its fitted direction, the
other unit at its fitted weights, ``θ_B = 1``).  Right: the same on log–log
axes, where the certified region (union over ``a`` of ``D_i(a, ρ)`` with
Lemma 1's ball ``||W|| ≤ R``) becomes visible.  Usage::

    python paper_figures/basin_unit.py --out DIR [--resolution 96] [--horizon 100] [--seed 0]
"""

from __future__ import annotations

import _style


def main(argv: list[str] | None = None) -> int:
    args = _style.parser(__doc__.splitlines()[0], resolution=28, horizon=100.0).parse_args(argv)
    plt = _style.setup()
    from theory.basin import format_areas, map_slice, plot_basin

    full = map_slice("unit", resolution=args.resolution, horizon=args.horizon, seed=args.seed)
    top = full.meta["y_range"][1]
    logm = map_slice("unit", resolution=max(12, (3 * args.resolution) // 4), horizon=args.horizon, seed=args.seed,
                     x_range=(1e-5, 1.0), y_range=(1e-3, top), x_scale="log", y_scale="log")
    print(format_areas(full))
    print(format_areas(logm))
    a = full.areas()
    i = full.meta["unit"] + 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    plot_basin(full, axes[0], title=f"(a) unit {i}: basin of $\\theta_B\\theta_{i}\\to0$ {a['pruned']:.1%} of the "
                                    f"slice, certified {a['certified_area']:.1e}")
    plot_basin(logm, axes[1], title="(b) log–log axes: the certified corner", legend=False)
    p, m = full.meta["problem"], full.meta
    fig.suptitle(f"Unit pruning (n={p['n']}, $\\lambda$={p['lam']:g}, $c_1$={p['c_1']:g}; Lemma-1 ball R={m['R']:.2f}, "
                 f"k={m['k']:.0f}); $\\varepsilon$-strip: {a['eps_strip_pruned']:.0%} pruned, "
                 f"{a['eps_strip_recovers']:.0%} recovers", fontsize=10)
    fig.tight_layout()
    _style.save(fig, args.out, "basin_unit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
