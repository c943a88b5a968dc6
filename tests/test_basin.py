"""Basin maps of theory/basin.py (THEORY §6-§7).

* classification: a block that cannot pay for itself is pruned from every start, a cheap useful block
  started at its fitted weights survives;
* the certified region lies inside the empirical basin (Theorem 5.1) on the default layer slice;
* area bookkeeping on hand-made maps (linear and log grids, the ε strip, the closed-form area);
* the ``basin`` command writes JSON, NPZ and the figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory import basin as B
from theory.block_model import BlockProblem


def _problem(**kw: float) -> BlockProblem:
    params = {"lam": 0.1, "c_B": 4.0, "c_1": 0.5, "teacher_units": 2, "teacher_scale": 1.5, "noise": 0.1}
    params.update(kw)
    return BlockProblem.random(np.random.default_rng(0), m=2, n=2, p=2, N=32, **params)  # type: ignore[arg-type]


def test_trivially_pruned_block() -> None:
    """c_B larger than anything the block can gain: every start ends with θ_B pinned at 0."""
    P = _problem(c_B=200.0)
    bm = B.map_slice("layer", resolution=5, horizon=30.0, problem=P)
    assert np.all(bm.labels == B.BLOCK_PRUNED)
    assert bm.pruned.all()
    assert np.all(bm.final[..., 0] == 0.0)
    a = bm.areas()
    assert a["pruned"] == pytest.approx(1.0) and a["survived"] == 0.0 and a["undecided"] == 0.0


def test_trivially_surviving_block() -> None:
    """Cheap structure started near its fitted weights with open gates: nothing is pruned."""
    P = _problem(c_B=0.05, c_1=0.01)
    fit_norm = float(np.sqrt(sum(float(np.sum(w**2)) for w in B.fit_weights(P))))
    bm = B.map_slice("layer", resolution=4, horizon=60.0, problem=P, x_range=(0.6, 1.0),
                     y_range=(0.8 * fit_norm, 1.1 * fit_norm))
    assert np.all(bm.labels == B.SURVIVED), bm.labels
    assert not bm.pruned.any()
    assert np.all(bm.final[..., 0] == 1.0)  # θ_B on the face 1
    unit = B.map_slice("unit", resolution=3, horizon=60.0, problem=P, x_range=(0.6, 1.0), y_range=(0.5, 1.0))
    assert not unit.pruned.any()


def test_classify_rules() -> None:
    P = _problem()
    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((P.n, P.m + 1))
    W2 = rng.standard_normal((P.p, P.n))
    pruned_block = P.pack(0.0, np.ones(P.n), 0.01 * W1, 0.01 * W2)  # tiny weights: v_B = -(g_B + γ_B) < 0
    all_units = P.pack(0.5, np.zeros(P.n), W1, W2)  # every θ_i at 0 with v_i = 0 ... pinned (v <= 0)
    moving = P.pack(0.5, np.full(P.n, 0.5), W1, W2)
    labels, pinned = B.classify(P, np.stack([pruned_block, all_units, moving]))
    assert labels.tolist() == [B.BLOCK_PRUNED, B.ALL_UNITS_PRUNED, B.UNDECIDED]
    assert pinned[0, 0] and pinned[1, 1:].all()


def test_certified_region_inside_the_empirical_basin() -> None:
    """Theorem 5.1 on the default layer slice: every certified start ends pruned; a zoom makes cells certified."""
    bm = B.map_slice("layer", resolution=8, horizon=60.0, x_range=(0.0, 0.05), y_range=(0.0, 0.4))
    a = bm.areas()
    assert bm.certified.any()
    assert a["certified_pruned"] == 1.0
    assert 0 < a["certified_area"] <= a["pruned"] + 0.1  # grid vs exact area: same order, certificate smaller
    assert a["undecided"] == 0.0
    assert bm.meta["dt"] > 0 and bm.meta["seed"] == 0


@given(nx=st.integers(2, 12), ny=st.integers(2, 12), eps=st.floats(0.05, 0.95))
def test_area_bookkeeping(nx: int, ny: int, eps: float) -> None:
    x = np.linspace(0.0, 1.0, nx)
    y = np.linspace(0.0, 2.0, ny)
    X, Y = np.meshgrid(x, y)
    labels = np.full((ny, nx), B.SURVIVED, dtype=np.int8)
    labels[X < 0.5] = B.BLOCK_PRUNED
    labels[(X >= 0.5) & (Y > 1.5)] = B.UNDECIDED
    pruned = labels == B.BLOCK_PRUNED
    boundary = np.full(nx, 0.5)  # certified: y < 0.5 everywhere -> exact area 1/4
    bm = B.BasinMap("layer", x, y, labels, pruned, Y < 0.5, boundary, np.zeros((ny, nx, 3)),
                    np.zeros((ny, nx)), {}, eps=eps)
    a = bm.areas()
    w = bm.weights
    assert w.sum() == pytest.approx(1.0)
    assert a["certified_area"] == pytest.approx(0.25)
    assert a["pruned"] + a["survived"] + a["undecided"] == pytest.approx(1.0)
    assert a["pruned"] == pytest.approx(float(w[pruned].sum()))
    strip = X < eps
    assert a["eps_strip"] == pytest.approx(float(w[strip].sum()))
    if strip.any():
        assert a["eps_strip_pruned"] + a["eps_strip_recovers"] <= 1.0 + 1e-12
        assert a["eps_strip_certified"] == pytest.approx(0.25)
    if pruned.any():
        assert a["certified_over_pruned"] == pytest.approx(0.25 / a["pruned"])
    rec = bm.to_json()
    json.dumps(rec)  # JSON-ready (no NaN objects that json cannot write? NaN is allowed; check round trip)
    assert rec["areas"]["certified_area"] == pytest.approx(0.25)


def test_log_grid_areas_are_in_linear_measure() -> None:
    x = np.geomspace(1e-3, 1.0, 200)
    y = np.geomspace(1e-3, 1.0, 200)
    X, Y = np.meshgrid(x, y)
    pruned = X < 0.5
    bm = B.BasinMap("unit", x, y, np.where(pruned, B.BLOCK_PRUNED, B.SURVIVED).astype(np.int8), pruned,
                    np.zeros_like(pruned), np.zeros(200), np.zeros((200, 200, 1)), np.zeros((200, 200)),
                    {"x_scale": "log", "y_scale": "log"})
    assert bm.areas()["pruned"] == pytest.approx((0.5 - 1e-3) / (1 - 1e-3), rel=3e-2)  # within a log cell
    assert B.cell_widths(x).sum() == pytest.approx(1 - 1e-3)


def test_basin_cli_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = B.basin_cli(["--slice", "unit", "--resolution", "5", "--horizon", "20", "--out", str(tmp_path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slice"] == "unit" and "certified_area" in out["areas"]
    for ext in ("json", "npz", "png", "pdf"):
        assert (tmp_path / f"basin_unit.{ext}").stat().st_size > 0
    rec = json.loads((tmp_path / "basin_unit.json").read_text())
    assert len(rec["labels"]) == 5 and len(rec["labels"][0]) == 5
    assert rec["meta"]["horizon"] == 20.0 and rec["meta"]["R"] > 0
    assert math.isfinite(rec["areas"]["pruned"])


def test_theory_cli_has_basin() -> None:
    from theory.cli import build_parser

    args = build_parser().parse_args(["basin", "--slice", "layer", "--resolution", "4"])
    assert args.func is B.cmd_basin and args.resolution == 4


# --------------------------------------------------------------------------------------------------
# the 3-D box θ_B × ||W|| × θ_u (theory/basin_volume.py)
# --------------------------------------------------------------------------------------------------


def test_volume_top_layer_is_the_layer_slice() -> None:
    """θ_u = 1 is the layer slice: same starts, same labels (each trajectory is integrated on its own)."""
    from theory.basin_volume import map_volume

    P = _problem()
    bv = map_volume(resolution=(5, 5, 3), horizon=40.0, problem=P)
    bm = B.map_slice("layer", resolution=5, horizon=40.0, problem=P)
    np.testing.assert_array_equal(bv.labels[-1], bm.labels)
    np.testing.assert_array_equal(bv.certified[-1], bm.certified)
    assert bv.volumes()["certified_volume"] == pytest.approx(bm.areas()["certified_area"])
    assert bv.layer(2).areas()["pruned"] == pytest.approx(bm.areas()["pruned"])
    assert bv.labels.shape == (3, 5, 5) and bv.meta["starts"] == 75
    # fewer open units make the block less useful: the basin does not shrink from θ_u = 1 to θ_u = 0.5
    assert np.all(bv.pruned[1] >= bv.pruned[2])


def test_volume_of_a_block_that_cannot_pay_is_all_pruned() -> None:
    from theory.basin_volume import map_volume

    bv = map_volume(resolution=(3, 3, 2), horizon=30.0, problem=_problem(c_B=200.0))
    v = bv.volumes()
    assert v["pruned"] == pytest.approx(1.0) and v["undecided"] == 0.0 and v["certified_pruned"] == 1.0


@given(nx=st.integers(2, 8), ny=st.integers(2, 8), nz=st.integers(2, 6), eps=st.floats(0.05, 0.95))
def test_volume_bookkeeping(nx: int, ny: int, nz: int, eps: float) -> None:
    from theory.basin_volume import BasinVolume

    x, y, z = np.linspace(0, 1, nx), np.linspace(0, 2, ny), np.linspace(0, 1, nz)
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    labels = np.full((nz, ny, nx), B.SURVIVED, dtype=np.int8)
    labels[(X < 0.5) | (Z < 0.3)] = B.BLOCK_PRUNED
    labels[(X >= 0.5) & (Z >= 0.3) & (Y > 1.5)] = B.UNDECIDED
    pruned = labels == B.BLOCK_PRUNED
    xf = np.linspace(0, 1, 101)
    bv = BasinVolume(x, y, z, labels, pruned, Y < 0.5, np.full(nx, 0.5), (xf, np.full(101, 0.5)),
                     np.zeros((nz, ny, nx)), {"problem": {"D": 3}}, eps)
    v = bv.volumes()
    w = bv.weights
    assert w.sum() == pytest.approx(1.0)
    assert v["certified_volume"] == pytest.approx(0.25)  # y < 0.5 of [0, 2], every θ_B and θ_u
    assert v["pruned"] + v["survived"] + v["undecided"] == pytest.approx(1.0)
    assert v["pruned"] == pytest.approx(float(w[pruned].sum()))
    slab = X < eps
    assert v["eps_slab"] == pytest.approx(float(w[slab].sum()))
    if slab.any():
        assert v["eps_slab_pruned"] + v["eps_slab_recovers"] <= 1.0 + 1e-12
    assert v["eps_units_slab"] == pytest.approx(float(w[Z < eps].sum()))
    fr = bv.layer_fractions()
    assert fr.shape == (nz,) and np.all((fr >= 0) & (fr <= 1 + 1e-12))
    assert fr[0] == pytest.approx(1.0)  # z = 0 < 0.3: the whole layer is pruned
    surf = bv.boundary_surface()
    assert np.all(surf[0] == y[-1])  # all pruned up to the top
    json.dumps(bv.to_json())


def test_basin_cli_maps_a_volume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = B.basin_cli(["--slice", "volume", "--resolution", "4", "--depth", "3", "--horizon", "20",
                      "--out", str(tmp_path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slice"] == "volume" and 0 <= out["volumes"]["pruned"] <= 1
    assert len(out["layer_pruned_fraction"]) == 3
    for ext in ("json", "npz", "png", "pdf"):
        assert (tmp_path / f"basin_volume.{ext}").stat().st_size > 0
    with np.load(tmp_path / "basin_volume.npz") as z:
        assert z["labels"].shape == (3, 4, 4)
    assert B.basin_cli(["--slice", "volume", "--depth", "1"]) == 2


def test_volume_figure_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "paper_figures"))
    spec = importlib.util.spec_from_file_location("basin_volume_fig_test", root / "paper_figures" / "basin_volume.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--resolution", "3", "--depth", "2", "--horizon", "5"]) == 0
    assert (tmp_path / "basin_volume.png").stat().st_size > 0 and (tmp_path / "basin_volume.pdf").stat().st_size > 0
