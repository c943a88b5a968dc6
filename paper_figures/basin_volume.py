"""3-D basin of pruning θ_B × ||W|| × θ_u with the certified region and the ε planes (THEORY §6–§7, Theorem 5.1).

The box of initial conditions ``(θ_B, s = ||W||, θ_u)``: ``W = s·Ŵ`` along the
fitted direction, every unit gate ``θ_i = θ_u`` (``θ_u = 1`` is the layer
slice of ``basin_layer.py``).  Left: the boundary surface ``s*(θ_B, θ_u)`` of
the empirical basin of "block pruned" (the block is pruned below it), the
certified region of Theorem 5.1 (a cylinder along ``θ_u``) and the plane
``θ_B = ε``; right: four stacked ``θ_u`` layers.  Prints the volume table.
Usage::

    python paper_figures/basin_volume.py --out DIR [--resolution 32] [--depth 16] [--horizon 100] [--seed 0]
"""

from __future__ import annotations

import _style


def main(argv: list[str] | None = None) -> int:
    p = _style.parser(__doc__.splitlines()[0], resolution=24, horizon=100.0)
    p.add_argument("--depth", type=int, default=12, help="grid points on the theta_u axis (default 12)")
    p.add_argument("--workers", type=int, default=2, help="integrator threads (default 2)")
    args = p.parse_args(argv)
    plt = _style.setup()
    from theory.basin_volume import format_volumes, map_volume, plot_volume

    bv = map_volume(resolution=(args.resolution, args.resolution, args.depth), horizon=args.horizon,
                    seed=args.seed, workers=args.workers)
    print(format_volumes(bv))
    fig = plt.figure(figsize=(12.5, 6.6))
    plot_volume(bv, fig)
    q = bv.meta["problem"]
    v = bv.volumes()
    fig.suptitle(f"Layer pruning in 3-D: canonical block (m={q['m']}, n={q['n']}, p={q['p']}, N={q['N']}, "
                 f"$\\lambda$={q['lam']:g}, $c_B$={q['c_B']:g}, $c_1$={q['c_1']:g}; seed {args.seed}); "
                 f"slab $\\theta_B<\\varepsilon$: {v['eps_slab_pruned']:.0%} pruned, {v['eps_slab_recovers']:.0%} "
                 f"recovers", fontsize=10)
    _style.save(fig, args.out, "basin_volume")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
