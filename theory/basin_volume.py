"""The domain of attraction of "block pruned" in a 3-D region of initial conditions (THEORY §6–§7).

The layer slice of :mod:`theory.basin` (``θ_B`` × ``||W||`` along the fitted
direction ``Ŵ``, every unit gate at 1) is one face of a box; the third axis is
the common initial value ``θ_u`` of the unit gates ``θ_1 = … = θ_n``::

    y(0) = [θ_B, θ_u, …, θ_u, s·Ŵ],      (θ_B, s, θ_u) ∈ [0, 1] × [0, s_max] × [0, 1].

Every start is integrated and labelled exactly as in the slices
(:func:`theory.basin.integrate_until_decided`, :func:`theory.basin.classify`);
the empirical basin of "pruned" is {block pruned, all units pruned}.  The
certified region is Theorem 5.1's (union over ``a`` and ``R`` of ``D_B(a, ρ)``,
[31]): ``V_B`` does not involve the unit gates and ``c_B`` bounds
``γ_B = c_B + c_1|θ|₁`` from below whatever they are, so the certificate is the
layer slice's region times the whole ``θ_u`` axis (a cylinder).  The
``ε``-rule regions are the slab ``{θ_B < ε}`` (the block is removed at once)
and the slab ``{θ_u < ε}`` (every unit is removed, which removes the block).

:func:`map_volume` returns a :class:`BasinVolume`; :meth:`BasinVolume.volumes`
gives volume fractions (cells weighted by their volume in the linear measure
of the box), :meth:`BasinVolume.layer` one ``θ_u`` layer as a
:class:`theory.basin.BasinMap` (to draw stacked slices with
:func:`theory.basin.plot_basin`), :meth:`BasinVolume.boundary_surface` the
empirical boundary ``s*(θ_B, θ_u)`` for a surface plot.  ``python -m theory
basin --slice volume`` maps a box and writes JSON, NPZ and a figure.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .basin import (
    ALL_UNITS_PRUNED,
    BLOCK_PRUNED,
    EPS,
    UNDECIDED,
    BasinMap,
    Tolerances,
    _axis,
    cell_widths,
    critical_scale,
    fit_weights,
    integrate_until_decided,
    lambda_max,
    slice_problem,
)
from .block_model import BlockProblem, unpack
from .block_model import field as block_field
from .certificates import lemma1_coeffs, union_boundary, union_margin_auto
from .ode import backend_for

Array = np.ndarray


@dataclass
class BasinVolume:
    """One mapped box.

    Axes ``x`` (nx,) = ``θ_B(0)``, ``y`` (ny,) = ``||W(0)||`` along ``Ŵ``, ``z`` (nz,)
    = ``θ_u(0)``; ``labels`` (nz, ny, nx) codes of :data:`theory.basin.LABELS`;
    ``pruned`` / ``certified`` (nz, ny, nx) masks; ``boundary`` (nx,) the largest
    certified ``||W||`` at each ``θ_B`` (closed form, the same on every layer);
    ``boundary_fine`` the same on a fine ``θ_B`` grid; ``t_decided`` (nz, ny, nx);
    ``meta`` everything needed to reproduce the map.
    """

    x: Array
    y: Array
    z: Array
    labels: Array
    pruned: Array
    certified: Array
    boundary: Array
    boundary_fine: tuple[Array, Array]
    t_decided: Array
    meta: dict[str, Any]
    eps: float = EPS

    @property
    def weights(self) -> Array:
        """Cell volumes (nz, ny, nx) normalised to sum 1 (linear measure of the box)."""
        w = np.einsum("k,j,i->kji", cell_widths(self.z), cell_widths(self.y), cell_widths(self.x))
        return np.asarray(w / w.sum())

    def _frac(self, mask: Array, within: Array | None = None) -> float:
        w = self.weights
        if within is not None:
            w = np.where(within, w, 0.0)
        tot = float(w.sum())
        return float(np.where(mask, w, 0.0).sum() / tot) if tot > 0 else math.nan

    def certified_volume(self, x_max: float | None = None) -> float:
        """Exact certified volume fraction of ``{θ_B ≤ x_max}`` (the cross-section's area: a cylinder in ``θ_u``)."""
        xs, bnd = self.boundary_fine
        y0, y1 = float(self.y[0]), float(self.y[-1])
        x_lo = float(self.x[0])
        x_hi = float(self.x[-1]) if x_max is None else min(float(x_max), float(self.x[-1]))
        if not x_hi > x_lo:
            return math.nan
        xk = np.union1d(np.linspace(x_lo, x_hi, 4001), xs[(xs >= x_lo) & (xs <= x_hi)])
        height = np.clip(np.interp(xk, xs, bnd), y0, y1) - y0
        return float(np.trapezoid(height, xk) / ((x_hi - x_lo) * (y1 - y0)))

    def volumes(self) -> dict[str, float]:
        """Volume bookkeeping (fractions of the box unless stated).

        ``certified_volume`` (exact), ``certified_grid``, ``pruned`` / ``survived`` /
        ``undecided`` (grid), ``certified_pruned`` — fraction of the certified cells
        that are empirically pruned (Theorem 5.1 says 1), ``certified_over_pruned`` —
        certified volume / basin volume; ``eps_slab`` — volume of ``{θ_B < ε}``,
        ``eps_slab_certified`` / ``eps_slab_pruned`` / ``eps_slab_recovers`` — fractions
        of that slab certified, empirically pruned, and decided but not pruned (the ε
        rule would cut a block that recovers); ``eps_units_slab`` and its ``_pruned`` /
        ``_recovers`` — the same for ``{θ_u < ε}``; ``pruned_beyond_eps`` — share of the
        basin outside both slabs (starts that end pruned but that no ε rule catches
        at ``t = 0``).
        """
        decided = self.labels != UNDECIDED
        pruned = self.pruned
        strip_b = np.broadcast_to(self.x[None, None, :] < self.eps, self.labels.shape)
        strip_u = np.broadcast_to(self.z[:, None, None] < self.eps, self.labels.shape)
        cert = self.certified_volume()
        pv = self._frac(pruned)

        def within(mask: Array, strip: Array) -> float:
            return self._frac(mask, strip) if strip.any() else math.nan

        return {
            "certified_volume": cert,
            "certified_grid": self._frac(self.certified),
            "pruned": pv,
            "survived": self._frac(decided & ~pruned),
            "undecided": self._frac(~decided),
            "certified_pruned": self._frac(pruned, self.certified) if self.certified.any() else math.nan,
            "certified_over_pruned": cert / pv if pv > 0 else math.nan,
            "eps_slab": self._frac(strip_b),
            "eps_slab_certified": self.certified_volume(self.eps) if self.x[0] < self.eps else math.nan,
            "eps_slab_pruned": within(pruned, strip_b),
            "eps_slab_recovers": within(decided & ~pruned, strip_b),
            "eps_units_slab": self._frac(strip_u),
            "eps_units_slab_pruned": within(pruned, strip_u),
            "eps_units_slab_recovers": within(decided & ~pruned, strip_u),
            "pruned_beyond_eps": self._frac(~(strip_b | strip_u), pruned) if pruned.any() else math.nan,
        }

    def layer_fractions(self) -> Array:
        """Basin area fraction of each ``θ_u`` layer (nz,)."""
        w = np.outer(cell_widths(self.y), cell_widths(self.x))
        w = w / w.sum()
        return np.asarray(np.einsum("ji,kji->k", w, self.pruned.astype(float)))

    def layer(self, k: int) -> BasinMap:
        """Layer ``θ_u = z[k]`` as a layer-slice :class:`~theory.basin.BasinMap` (for
        :func:`~theory.basin.plot_basin`)."""
        meta = dict(self.meta)
        meta["theta_units"] = float(self.z[k])
        D = int(self.meta["problem"]["D"])
        return BasinMap(
            "layer", self.x, self.y, self.labels[k], self.pruned[k], self.certified[k], self.boundary,
            np.zeros((*self.labels[k].shape, D)), self.t_decided[k], meta, None, self.eps,
            r"$\theta_B(0)$", r"$\|W(0)\|$ along the fitted direction", self.boundary_fine,
        )

    def boundary_surface(self) -> Array:
        """Empirical basin boundary ``s*(θ_u, θ_B)`` (nz, nx): the midpoint between the largest ``||W||`` of the
        pruned run that starts at ``||W|| = y[0]`` and the next grid value (``y[-1]`` if all pruned, ``nan`` if
        the lowest start is not pruned)."""
        nz, ny, nx = self.pruned.shape
        out = np.full((nz, nx), np.nan)
        for k in range(nz):
            for i in range(nx):
                col = self.pruned[k, :, i]
                if not col[0]:
                    continue
                stop = int(np.argmin(col)) if not col.all() else ny
                out[k, i] = self.y[-1] if stop == ny else 0.5 * (self.y[stop - 1] + self.y[stop])
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record: axes, volume table, per-layer basin fractions, metadata (masks go to the NPZ)."""
        return {
            "x": self.x.tolist(), "y": self.y.tolist(), "z": self.z.tolist(),
            "axes": ["theta_B(0)", "||W(0)|| along the fitted direction", "theta_units(0)"],
            "volumes": {k: (float(v) if math.isfinite(v) else None) for k, v in self.volumes().items()},
            "layer_pruned_fraction": self.layer_fractions().tolist(),
            "eps": self.eps,
            "meta": self.meta,
        }


def map_volume(
    *,
    resolution: int | tuple[int, int, int] = 24,
    horizon: float = 100.0,
    seed: int = 0,
    problem: BlockProblem | None = None,
    x_range: tuple[float, float] = (0.0, 1.0),
    y_range: tuple[float, float] | None = None,
    z_range: tuple[float, float] = (0.0, 1.0),
    dt: float | None = None,
    segment: float = 5.0,
    tol: Tolerances | None = None,
    eps: float = EPS,
    workers: int = 1,
    method: str = "rkc",
) -> BasinVolume:
    """Map the box ``θ_B × ||W|| × θ_u`` on a ``resolution`` grid (``nx = ny = nz`` or a triple ``(nx, ny, nz)``).

    ``problem`` defaults to :func:`theory.basin.slice_problem` ``(seed)``, ``Ŵ`` to its fitted
    weights (normalised); ``y_range`` defaults to ``[0, 2.5 s_c]`` as in the layer slice.  ``dt``,
    ``segment``, ``tol``, ``method`` and ``workers`` as in :func:`theory.basin.map_slice`.
    """
    t_start = time.perf_counter()
    tol = Tolerances() if tol is None else tol
    P = slice_problem(seed) if problem is None else problem
    nx, ny, nz = (resolution,) * 3 if isinstance(resolution, int) else resolution
    if min(nx, ny, nz) < 2:
        raise ValueError(f"resolution must be >= 2 per axis, got {resolution!r}")
    if not horizon > 0:
        raise ValueError(f"horizon must be > 0, got {horizon!r}")
    for name, (lo, hi) in (("x_range", x_range), ("z_range", z_range)):
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"{name} must satisfy 0 <= lo < hi <= 1 (gate values), got {(lo, hi)!r}")
    W1f, W2f = fit_weights(P, seed)
    n = P.n
    fit_state = P.pack(1.0, np.ones(n), W1f, W2f)
    fit_norm = float(np.sqrt(unpack(fit_state, P).weight_norm_sq))
    Wd1, Wd2 = W1f / fit_norm, W2f / fit_norm
    s_c = critical_scale(P, Wd1, Wd2, np.ones(n), s_hi=2 * fit_norm)
    yr = y_range if y_range is not None else (0.0, 2.5 * s_c if math.isfinite(s_c) else 1.5 * fit_norm)
    xs = _axis(x_range[0], x_range[1], nx, "linear")
    ys = _axis(yr[0], yr[1], ny, "linear")
    zs = _axis(z_range[0], z_range[1], nz, "linear")
    TU, S, TB = np.meshgrid(zs, ys, xs, indexing="ij")  # (nz, ny, nx)
    Y0 = P.pack(TB, np.repeat(TU[..., None], n, axis=-1), S[..., None, None] * Wd1,
                S[..., None, None] * Wd2).reshape(-1, P.D)
    k0, k2 = lemma1_coeffs(P)
    certified = union_margin_auto(TB, 0.5 * S**2, P.c_B, k0, k2)[0] > 0
    boundary = union_boundary(xs, P.c_B, k0=k0, k2=k2)
    xf = _axis(x_range[0], x_range[1], 20001, "linear")
    fine = (xf, union_boundary(xf, P.c_B, k0=k0, k2=k2))
    if dt is None:
        top = Y0.reshape(nz, ny, nx, P.D)[-1, -1, :: max(1, nx // 8)]
        dt = min(2.0 / lambda_max(P, np.concatenate([top, fit_state[None]])), 0.05)
    fun = block_field(P)
    t_int = time.perf_counter()
    labels, _, _, t_dec, _ = integrate_until_decided(
        P, Y0, horizon=horizon, dt=dt, segment=segment, tol=tol, workers=workers, method=method
    )
    t_int = time.perf_counter() - t_int
    labels = labels.reshape(nz, ny, nx)
    pruned = (labels == BLOCK_PRUNED) | (labels == ALL_UNITS_PRUNED)
    meta: dict[str, Any] = {
        "region": "volume", "seed": seed, "horizon": horizon, "segment": segment, "resolution": [nx, ny, nz],
        "problem": {"m": P.m, "n": n, "p": P.p, "N": P.N, "D": P.D, "lam": P.lam, "c_B": P.c_B, "c_1": P.c_1},
        "tolerances": {"face": tol.face, "vel": tol.vel, "confirm": "converged labels seen at two consecutive checks"},
        "eps": eps, "integrator": f"theory.ode.odeint_batch({method})", "backend": backend_for(fun),
        "dt": dt, "fit_norm": fit_norm, "critical_scale": s_c, "k0": k0, "k2": k2,
        "x_range": [float(xs[0]), float(xs[-1])], "y_range": [float(ys[0]), float(ys[-1])],
        "z_range": [float(zs[0]), float(zs[-1])], "starts": int(Y0.shape[0]), "workers": workers,
        "certificate": "union over a > 0 and R of D_B(a, rho) (Theorem 5.1); independent of theta_units",
        "integration_seconds": round(t_int, 2),
    }
    meta["seconds"] = round(time.perf_counter() - t_start, 2)
    return BasinVolume(xs, ys, zs, labels, pruned, certified, boundary, fine, t_dec.reshape(nz, ny, nx), meta, eps)


_VOLUME_ROWS = [
    ("certified_volume", "certified region (exact volume)"),
    ("certified_grid", "certified region (grid cells)"),
    ("pruned", "empirical basin of 'pruned'"),
    ("survived", "survived"),
    ("undecided", "undecided at horizon"),
    ("certified_pruned", "certified cells that are pruned (theory: 1)"),
    ("certified_over_pruned", "certified volume / empirical basin"),
    ("eps_slab", "slab {theta_B < eps}"),
    ("eps_slab_certified", "  ... of it certified"),
    ("eps_slab_pruned", "  ... of it empirically pruned"),
    ("eps_slab_recovers", "  ... of it recovering (eps rule cuts it)"),
    ("eps_units_slab", "slab {theta_units < eps}"),
    ("eps_units_slab_pruned", "  ... of it empirically pruned"),
    ("eps_units_slab_recovers", "  ... of it recovering (eps rule cuts it)"),
    ("pruned_beyond_eps", "basin share outside both eps slabs"),
]


def format_volumes(bv: BasinVolume) -> str:
    """The volume table printed by ``python -m theory basin --slice volume``."""
    vols = bv.volumes()
    nx, ny, nz = bv.meta["resolution"]
    lines = [f"volume theta_B x ||W|| x theta_units, seed {bv.meta['seed']}, {nx}x{ny}x{nz} grid "
             f"({bv.meta['starts']} starts), horizon {bv.meta['horizon']:g}, {bv.meta['backend']} backend, "
             f"{bv.meta['seconds']:.1f} s"]
    for key, name in _VOLUME_ROWS:
        v = vols[key]
        lines.append(f"  {name:<46s} {v:10.4g}" if math.isfinite(v) else f"  {name:<46s} {'—':>10s}")
    fr = bv.layer_fractions()
    picks = sorted({0, nz // 4, nz // 2, (3 * nz) // 4, nz - 1})
    lines.append("  basin fraction by layer: " + ", ".join(f"theta_u={bv.z[k]:.2f}: {fr[k]:.3f}" for k in picks))
    return "\n".join(lines)


def plot_volume(bv: BasinVolume, fig: Any = None, *, levels: int = 4) -> Any:
    """Draw a box: left the empirical boundary surface ``s*(θ_B, θ_u)`` with the certified cylinder and the
    plane ``θ_B = ε``; right ``levels`` stacked ``θ_u`` layers (:func:`theory.basin.plot_basin`).

    Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .basin import CATEGORY_STYLE, categories, plot_basin

    if fig is None:
        fig = plt.figure(figsize=(12.5, 6.6))
    nz = bv.z.size
    picks = np.unique(np.linspace(0, nz - 1, levels).round().astype(int))
    cols = (len(picks) + 1) // 2
    gs = fig.add_gridspec(2, 1 + cols, width_ratios=[2.2] + [1] * cols, bottom=0.16)
    ax3 = fig.add_subplot(gs[:, 0], projection="3d")
    surf = bv.boundary_surface()
    XB, ZU = np.meshgrid(bv.x, bv.z)
    ax3.plot_surface(XB, ZU, np.nan_to_num(surf, nan=float(bv.y[0])), cmap="Blues_r", alpha=0.8, linewidth=0.2,
                     edgecolor="0.4", antialiased=True)
    xs, bnd = bv.boundary_fine
    pos = np.flatnonzero(bnd > bv.y[0])
    if pos.size:
        sel = pos[np.linspace(0, pos.size - 1, min(pos.size, 120)).astype(int)]
        cb = np.minimum(bnd[sel], bv.y[-1])
        XC, ZC = np.meshgrid(xs[sel], bv.z)
        ax3.plot_surface(XC, ZC, np.broadcast_to(cb, XC.shape), color="tab:red", alpha=0.7, linewidth=0)
    yy, zz = np.meshgrid([bv.y[0], bv.y[-1]], [bv.z[0], bv.z[-1]])
    ax3.plot_surface(np.full_like(yy, bv.eps), zz, yy, color="tab:green", alpha=0.15, linewidth=0)
    ax3.set_xlabel(r"$\theta_B(0)$")
    ax3.set_ylabel(r"$\theta_u(0)$ (all unit gates)")
    ax3.zaxis.set_rotate_label(False)
    ax3.set_zlabel(r"$\|W(0)\|$", rotation=90, labelpad=4)
    ax3.set_zlim(bv.y[0], bv.y[-1])
    ax3.view_init(elev=24, azim=-125)
    v = bv.volumes()
    ax3.set_title(f"boundary of the basin of pruning $s^*(\\theta_B, \\theta_u)$ (blue; pruned below it),\n"
                  f"certified region (red, Thm 5.1), plane $\\theta_B=\\varepsilon$ (green):\n"
                  f"basin {v['pruned']:.1%} of the box, certified {v['certified_volume']:.2%}", fontsize=9)
    style = CATEGORY_STYLE["layer"]
    present: set[int] = set()
    for j, k in enumerate(picks):
        ax = fig.add_subplot(gs[j // cols, 1 + j % cols])
        lay = bv.layer(int(k))
        present |= {int(c) for c in np.unique(categories(lay))}
        plot_basin(lay, ax, title=f"$\\theta_u(0) = {bv.z[k]:.2f}$: basin {bv.layer_fractions()[k]:.1%}", legend=False)
        ax.title.set_fontsize(9)
        if j // cols == 0:
            ax.set_xlabel("")
        ax.set_ylabel(r"$\|W(0)\|$" if j % cols == 0 else "")
    handles: list[Any] = [Patch(facecolor=style[c][1], edgecolor="0.5", label=style[c][0]) for c in sorted(present)]
    handles += [plt.Line2D([], [], color="k", lw=1.2, label="empirical basin boundary"),
                Patch(facecolor="none", edgecolor="tab:red", hatch="////",
                      label="certified (Thm 5.1, union over a, R)"),
                plt.Line2D([], [], color="tab:green", ls="--", lw=1.3,
                           label=f"pruning rule $\\theta < \\varepsilon = {bv.eps:g}$")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    return fig


def write_volume_outputs(bv: BasinVolume, out: str | Path, *, pdf: bool = True) -> list[Path]:
    """Write ``basin_volume.json`` (axes, volumes, layer fractions, meta), ``.npz`` (labels, masks, decision
    times) and ``.png``/``.pdf`` (:func:`plot_volume`) into ``out`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path, atomic_write_text
    from .basin import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "basin_volume"
    atomic_write_text(out / f"{stem}.json", json.dumps(bv.to_json(), indent=1) + "\n")
    with atomic_path(out / f"{stem}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, x=bv.x, y=bv.y, z=bv.z, labels=bv.labels, pruned=bv.pruned,
                                certified=bv.certified, t_decided=bv.t_decided)
    fig = plot_volume(bv)
    paths = [out / f"{stem}.json", out / f"{stem}.npz", *save_figure(fig, out, stem, pdf=pdf)]
    plt.close(fig)
    return paths


__all__ = ["BasinVolume", "format_volumes", "map_volume", "plot_volume", "write_volume_outputs"]
