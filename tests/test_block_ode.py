"""The compiled batch integrator of the canonical block (theory/block_ode.py, block_kernel.py, jit.py).

It is tested against the numpy reference of ``theory.ode.odeint_batch`` (same schemes, same face
handling) on random instances: endpoints, face-hit times, final vertex per trajectory.  The two are
not bit-identical — the compiled field sums in another order and uses ``fast_tanh`` (≤ 5 ulp), and
RKC's spectral-radius start vector differs — so the tolerances are:

* field: relative 1e-12 of the largest component (measured ≤ 7e-14);
* RK4 (fixed steps, same grid): max |Δy| ≤ 1e-11, hit times ≤ 1e-11 (measured ≤ 4e-13 on 30 random
  blocks with m ≤ 3, n ≤ 4, p ≤ 2);
* RKC (adaptive): most trajectories take the same steps and agree to roundoff (90 % quantile of
  max |Δy| ≤ 1e-10), a trajectory whose step sequence differs by one accepted/rejected step near
  the error threshold differs at the tolerance level (max ≤ 1e-5 at rtol 1e-6; measured 9e-7 once
  in 30 blocks, ≤ 1e-13 otherwise); hit times of equal-step trajectories ≤ 1e-9.

Agreement of both backends with the solve_ivp reference is tested in ``tests/test_ode.py``.
Compilation is cached (``cache=True``); these tests use one field signature and both integrators.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import theory.jit as jit
from theory.block_kernel import BlockData, velocity_batch
from theory.block_model import BlockProblem, field, velocity
from theory.ode import backend_for, hits_one, hits_zero, odeint_batch

pytestmark = pytest.mark.skipif(not jit.NUMBA_AVAILABLE, reason="numba not installed")

RK4_TOL = 1e-11
RKC_TOL_MAX = 1e-5
RKC_TOL_Q90 = 1e-10


def random_case(seed: int, B: int) -> tuple[BlockProblem, np.ndarray]:
    rng = np.random.default_rng(seed)
    m, n, p = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 3))
    prob = BlockProblem.random(rng, m=m, n=n, p=p, N=int(rng.integers(4, 33)))
    th = rng.uniform(size=(B, 1 + prob.n))
    th[: B // 4, 0] = 0.0  # some start on a face
    W = rng.standard_normal((B, prob.D - 1 - prob.n))
    W *= 2.0 * rng.uniform(0.2, 1, size=(B, 1)) / np.linalg.norm(W, axis=1, keepdims=True)
    return prob, np.concatenate([th, W], axis=1)


def test_fast_tanh_is_within_five_ulp() -> None:
    rng = np.random.default_rng(0)
    small = np.geomspace(1e-300, 1.0, 5000)
    special = np.array([0.0, 0.625, 19.0, 20.0, 25.0, 1e300, -1e300])
    x = np.concatenate([rng.standard_normal(100_000) * 4, np.linspace(-25, 25, 50_001), small, -small, special])
    out = np.empty_like(x)
    jit.tanh_array(x, out)
    ref = np.tanh(x)
    ulp = np.abs(out - ref) / np.spacing(np.abs(ref))
    assert ulp.max() <= 5.0, (ulp.max(), x[np.argmax(ulp)])
    assert out[-7] == 0.0 and np.all(np.abs(out[-4:]) == 1.0)
    np.testing.assert_array_equal(out[-7 - 5000 : -7], -out[-7 - 10000 : -7 - 5000])  # odd


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 2), st.integers(1, 40), st.integers(0, 2**31))
def test_compiled_field_matches_the_reference(m: int, n: int, p: int, N: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    prob = BlockProblem.random(rng, m=m, n=n, p=p, N=N, lam=float(rng.uniform(0, 0.3)))
    Y = rng.standard_normal((64, prob.D)) * rng.uniform(0.01, 3.0, size=(64, 1))
    Y[:, : 1 + n] = rng.uniform(size=(64, 1 + n))
    Y[::3, 0] = 0.0  # θ_B = 0: the kernel's shortcut for units whose θ_B θ_i vanishes
    Y[::5, 1] = 0.0
    ref = velocity(prob, Y)
    got = velocity_batch(BlockData.of(prob), Y)
    scale = np.abs(ref).max(axis=1, keepdims=True) + 1e-300
    assert np.max(np.abs(got - ref) / scale) <= 1e-12


def test_compiled_field_reads_gates_through_the_projection() -> None:
    prob, Y0 = random_case(3, 6)
    Y = Y0.copy()
    Y[:, : 1 + prob.n] = np.array([-0.5, 1.7, 0.3, -2.0, 1.0][: 1 + prob.n])
    clipped = Y.copy()
    clipped[:, : 1 + prob.n] = clipped[:, : 1 + prob.n].clip(0, 1)
    np.testing.assert_allclose(velocity_batch(prob, Y), velocity(prob, clipped), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rk4_compiled_equals_numpy_reference(seed: int) -> None:
    prob, Y0 = random_case(seed, 12)
    t = np.linspace(0, 5, 11)
    evs = [hits_zero(0), hits_one(1), hits_zero(1)]
    a = odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, dt=0.01, events=evs, backend="numba")
    b = odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, dt=0.01, events=evs, backend="numpy")
    assert (a.backend, b.backend) == ("numba", "numpy")
    assert np.abs(a.y - b.y).max() <= RK4_TOL
    np.testing.assert_array_equal(np.isnan(a.t_events), np.isnan(b.t_events))
    np.testing.assert_allclose(a.t_events, b.t_events, rtol=0, atol=RK4_TOL)
    assert a.switches == b.switches and a.nfev == b.nfev and a.steps == b.steps
    assert a.switches > 0  # faces were hit or left: the switch logic ran


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_rkc_compiled_agrees_with_numpy_reference(seed: int) -> None:
    prob, Y0 = random_case(seed, 16)
    t = np.linspace(0, 5, 11)
    evs = [hits_zero(0), hits_zero(1)]
    kw = {"method": "rkc", "rtol": 1e-6, "atol": 1e-8, "events": evs, "theta_slice": prob.theta_slice}
    a = odeint_batch(field(prob), Y0, t, backend="numba", **kw)
    b = odeint_batch(field(prob), Y0, t, backend="numpy", **kw)
    dev = np.abs(a.y - b.y).max(axis=(0, 2))  # per trajectory
    assert dev.max() <= RKC_TOL_MAX
    assert np.quantile(dev, 0.9) <= RKC_TOL_Q90
    same = dev <= RKC_TOL_Q90
    np.testing.assert_array_equal(np.isnan(a.t_events), np.isnan(b.t_events))
    np.testing.assert_allclose(a.t_events[:, same], b.t_events[:, same], rtol=0, atol=1e-9)
    vertex = lambda r: np.round(r.y[-1, :, : 1 + prob.n])  # noqa: E731
    np.testing.assert_array_equal(vertex(a), vertex(b))
    assert a.failed == b.failed == 0 and a.switches > 0


def test_threads_and_chunks_do_not_change_results() -> None:
    prob, Y0 = random_case(5, 21)
    t = np.linspace(0, 2, 5)
    for method in ("rkc", "rk4"):
        one = odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, method=method, dt=0.02, workers=1)
        two = odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, method=method, dt=0.02, workers=2,
                           chunk_size=3)
        part = odeint_batch(field(prob), Y0[5:9], t, theta_slice=prob.theta_slice, method=method, dt=0.02)
        np.testing.assert_array_equal(one.y, two.y)  # each trajectory is integrated on its own
        np.testing.assert_array_equal(one.y[:, 5:9], part.y)
        assert one.nfev == two.nfev and one.backend == "numba"


def test_fallback_to_numpy_without_numba(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    prob, Y0 = random_case(2, 3)
    t = np.linspace(0, 1, 3)
    monkeypatch.setattr(jit, "NUMBA_AVAILABLE", False)
    monkeypatch.setitem(jit._noticed, "done", False)
    a = odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, method="rkc")
    b = odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, method="rkc")
    assert a.backend == b.backend == "numpy"
    err = capsys.readouterr().err
    assert err.count(jit.NOTICE) == 1 and err.strip() == jit.NOTICE  # one line, once per process
    with pytest.raises(ValueError, match="numba is not installed"):
        odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, backend="numba")
    assert backend_for(field(prob)) == "numpy"


def test_numpy_path_is_chosen_quietly_when_it_must_be(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    t = np.linspace(0, 0.5, 3)
    monkeypatch.setitem(jit._noticed, "done", False)
    big = BlockProblem.random(np.random.default_rng(0), m=4, n=2, p=3, N=6)  # m + 1 > 4: not the kernel's
    Yb = np.full((2, big.D), 0.3)
    assert odeint_batch(field(big), Yb, t, theta_slice=big.theta_slice).backend == "numpy"
    with pytest.raises(ValueError, match=r"m \+ 1 <= 4"):
        odeint_batch(field(big), Yb, t, theta_slice=big.theta_slice, backend="numba")
    plain = lambda t, y: -y  # noqa: E731  (not a block field)
    assert odeint_batch(plain, np.full((2, 2), 0.5), t, theta_slice=slice(0, 1)).backend == "numpy"
    prob, Y0 = random_case(1, 2)
    monkeypatch.setenv("THEORY_NO_NUMBA", "1")
    assert odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice).backend == "numpy"
    assert capsys.readouterr().err == ""  # numba is installed: no notice
    with pytest.raises(ValueError, match="backend must be"):
        odeint_batch(field(prob), Y0, t, theta_slice=prob.theta_slice, backend="fortran")


def test_stale_kernel_caches_are_removed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    cache = tmp_path / "cache"
    src.mkdir()
    cache.mkdir()
    for mod in jit.KERNEL_MODULES:
        (src / f"{mod}.py").write_text(f"# {mod}\n")
    files = [cache / "block_ode._rkc_range-230.py311.nbi", cache / "block_ode._rkc_range-230.py311.1.nbc"]
    other = cache / "basin.something-1.py311.nbi"
    for f in [*files, other]:
        f.write_text("x")
    assert sorted(jit.refresh_cache([cache], src)) == sorted(files)  # no stamp yet: cleared
    assert not any(f.exists() for f in files) and other.exists()
    files[0].write_text("x")
    assert jit.refresh_cache([cache], src) == [] and files[0].exists()  # stamp matches: kept
    (src / "block_kernel.py").write_text("# changed\n")
    assert jit.refresh_cache([cache], src) == [files[0]]  # a callee's source changed: cleared


def test_basin_map_is_the_same_with_both_backends() -> None:
    from theory import basin as B

    P = B.slice_problem(0)
    kw = {"resolution": 5, "horizon": 30.0, "problem": P}
    a = B.map_slice("layer", **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THEORY_NO_NUMBA", "1")
        b = B.map_slice("layer", **kw)
    assert (a.meta["backend"], b.meta["backend"]) == ("numba", "numpy")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert math.isclose(a.areas()["pruned"], b.areas()["pruned"])


def test_toolkit_runs_without_numba() -> None:
    """numba made unimportable in a fresh interpreter: theory imports, integrates on numpy, says so once."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "import theory.jit as jit; assert not jit.NUMBA_AVAILABLE\n"
        "from theory.block_model import BlockProblem, field\n"
        "from theory.ode import odeint_batch\n"
        "from theory.basin import map_slice\n"
        "P = BlockProblem.random(np.random.default_rng(0), m=2, n=2, p=2, N=8)\n"
        "r = odeint_batch(field(P), np.full((3, P.D), 0.4), [0, 0.5, 1], theta_slice=P.theta_slice, method='rkc')\n"
        "assert r.backend == 'numpy' and np.isfinite(r.y).all()\n"
        "bm = map_slice('layer', resolution=3, horizon=10.0)\n"
        "assert bm.meta['backend'] == 'numpy'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert res.stderr.count(jit.NOTICE) == 1, res.stderr
