"""Shared style and command line of the paper figures (``python paper_figures/NAME.py --out DIR``).

Every figure script uses :mod:`theory` only (no torch), writes ``NAME.png``
and ``NAME.pdf`` into ``--out`` and has a fast default resolution
(< ~60 s on a shared 2-core machine); ``--resolution`` sets the grid for the
full-quality version (e.g. ``--resolution 96``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make `theory` importable
    sys.path.insert(0, str(ROOT))


def load_script(name: str, relpath: str) -> Any:
    """The script ``ROOT/relpath`` imported as module ``name`` (once; later calls return the same module)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def parser(description: str, *, resolution: int | None = None, horizon: float | None = None) -> argparse.ArgumentParser:
    """The common options: ``--out DIR`` (default ``reports/paper_figures``), ``--seed``, and when given
    ``--resolution`` / ``--horizon`` with the script's fast defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(ROOT / "reports" / "paper_figures"),
                   help="output directory for PNG + PDF (default reports/paper_figures, git-ignored)")
    p.add_argument("--seed", type=int, default=0, help="problem seed (default 0)")
    if resolution is not None:
        p.add_argument("--resolution", type=int, default=resolution,
                       help=f"grid points per axis (default {resolution}: fast; 96 for the full-quality figure)")
    if horizon is not None:
        p.add_argument("--horizon", type=float, default=horizon, help=f"integration horizon (default {horizon:g})")
    return p


def setup() -> Any:
    """Headless matplotlib with the figures' rcParams; returns ``pyplot``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 10,
        "axes.titlesize": 10,
        "axes.labelsize": 10,
        "legend.fontsize": 7,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "figure.dpi": 100,
        "savefig.dpi": 200,
        "pdf.fonttype": 42,
    })
    return plt


def save(fig: Any, out: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` (atomically) and print their paths."""
    from theory.basin import save_figure

    paths = save_figure(fig, Path(out), name, pdf=True, dpi=200)
    for path in paths:
        print(f"wrote {path}")
    return paths
