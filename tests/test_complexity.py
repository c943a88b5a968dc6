"""The complexity model (THEORY §3, [9]–[13]): reference totals, gradients, validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from theory import (
    BlockGates,
    Coefficients,
    ComplexityModel,
    coefficients_for,
    ones_gates,
    reparametrize,
    residual_mlp,
    resnet1d,
    resnet50,
    resnet_cifar,
)
from theory.spec import Block, Layer, NetworkSpec

# ---------------------------------------------------------------------------------------------
# Reference totals of THEORY §3 (conv + linear MACs, parameters incl. BN affine pairs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, flops_m, params_m, flops_tol",
    [
        (resnet_cifar(56), 125.49, 0.85, 0.005),
        (resnet_cifar(110), 252.89, 1.73, 0.005),
    ],
)
def test_cifar_reference_totals(spec, flops_m, params_m, flops_tol):
    model = ComplexityModel(spec)
    assert round(float(model.flops()) / 1e6, 2) == pytest.approx(flops_m, abs=flops_tol)
    assert round(float(model.params()) / 1e6, 2) == pytest.approx(params_m, abs=0.005)


def test_resnet50_reference_totals():
    model = ComplexityModel(resnet50())
    assert float(model.flops()) == pytest.approx(4.09e9, rel=0.01)
    # torchvision's resnet50 has exactly 25,557,032 parameters
    assert float(model.params()) == 25_557_032
    assert model.spec.depth == 50


def test_resnet56_counts_by_hand():
    """ResNet-56 conv MACs written out layer by layer: 3→16 stem, 3 stages of 9 blocks, FC with bias."""
    hw = {16: 32 * 32, 32: 16 * 16, 64: 8 * 8}
    convs = [(3, 16, hw[16])]
    cin = 16
    for w in (16, 32, 64):
        for _ in range(9):
            convs += [(cin, w, hw[w]), (w, w, hw[w])]
            cin = w
    macs = sum(ci * co * 9 * pos for ci, co, pos in convs) + (64 + 1) * 10
    params = sum(ci * co * 9 + 2 * co for ci, co, _ in convs) + (64 + 1) * 10
    model = ComplexityModel(resnet_cifar(56))
    assert float(model.flops()) == macs
    assert float(model.params()) == params


def test_depth_and_blocks():
    for depth in (20, 56, 110):
        spec = resnet_cifar(depth)
        assert spec.depth == depth
        assert spec.prunable_blocks == (depth - 2) // 2
    assert resnet50().prunable_blocks == 16
    assert all(b.M == 2 for b in resnet50().blocks)


# ---------------------------------------------------------------------------------------------
# [9]/[10]: expectation over Bernoulli gates equals enumeration
# ---------------------------------------------------------------------------------------------


def _tiny_spec(out_gated: bool) -> NetworkSpec:
    return residual_mlp(3, [2, 1], 2, out_gated=out_gated)


def _random_gates(rng, spec, *, units=True, block=True, outputs=True):
    gates = []
    for b in spec.blocks:
        tb = rng.uniform() if block else None
        t1 = tuple(rng.uniform(size=n) for n in b.unit_widths) if units else None
        t2 = rng.uniform(size=b.out_width) if (outputs and b.out_gated) else None
        gates.append(BlockGates(None if tb is None else np.asarray(tb), t1, t2))
    return gates


def _flat(gates):
    flat = []
    for g in gates:
        if g.theta_B is not None:
            flat.append(("B", g.theta_B))
        for t in g.theta_1 or ():
            flat += [("U", x) for x in t]
        if g.theta_2 is not None:
            flat += [("O", x) for x in g.theta_2]
    return flat


def _rebuild(gates, values):
    it = iter(values)
    out = []
    for g in gates:
        tb = None if g.theta_B is None else np.asarray(next(it))
        t1 = None if g.theta_1 is None else tuple(np.array([next(it) for _ in t]) for t in g.theta_1)
        t2 = None if g.theta_2 is None else np.array([next(it) for _ in g.theta_2])
        out.append(BlockGates(tb, t1, t2))
    return out


@pytest.mark.parametrize("out_gated", [False, True])
def test_expected_cost_equals_enumeration(out_gated):
    """E[F], E[P] [9]–[10] equal the exact average of the deterministic cost over all gate masks."""
    rng = np.random.default_rng(0)
    spec = _tiny_spec(out_gated)
    model = ComplexityModel(spec, elementwise=True)
    gates = _random_gates(rng, spec)
    thetas = np.array([float(v) for _, v in _flat(gates)])
    ef = ep = 0.0
    for mask in itertools.product([0.0, 1.0], repeat=len(thetas)):
        prob = float(np.prod(np.where(np.array(mask) == 1, thetas, 1 - thetas)))
        g = _rebuild(gates, mask)
        ef += prob * float(model.flops(g))
        ep += prob * float(model.params(g))
    assert float(model.flops(gates)) == pytest.approx(ef, rel=1e-12)
    assert float(model.params(gates)) == pytest.approx(ep, rel=1e-12)


def test_deterministic_counts_of_masked_mlp():
    """A 0/1 gate vector counts exactly the active weights of §1 (bias column in W_1, none in W_2)."""
    spec = residual_mlp(4, [3], 2)
    model = ComplexityModel(spec)
    g = [BlockGates(np.asarray(1.0), (np.array([1.0, 0.0, 1.0]),), None)]
    # W_1: 2 units × (4+1); W_2: 4 × 2; head: 2 × (4+1)
    assert float(model.params(g)) == 2 * 5 + 4 * 2 + 2 * 5
    g_off = [BlockGates(np.asarray(0.0), (np.array([1.0, 1.0, 1.0]),), None)]
    assert float(model.params(g_off)) == 2 * 5


# ---------------------------------------------------------------------------------------------
# [12]/[18]: analytic gradients vs finite differences and torch autograd
# ---------------------------------------------------------------------------------------------

# zero or well-scaled coefficients (subnormal products would test float underflow, not the model)
_coef = st.one_of(st.just(0.0), st.floats(1e-3, 2.0))
_coeffs = st.builds(Coefficients, alpha_f=_coef, alpha_p=_coef, beta=_coef)


@given(seed=st.integers(0, 2**31 - 1), coeffs=_coeffs, out_gated=st.booleans())
def test_grad_matches_finite_differences(seed, coeffs, out_gated):
    rng = np.random.default_rng(seed)
    spec = _tiny_spec(out_gated)
    model = ComplexityModel(spec, elementwise=True)
    gates = _random_gates(rng, spec)
    grads = model.grad(gates, coeffs)
    flat = _flat(gates)
    values = np.array([float(v) for _, v in flat])
    # C is multilinear: a unit step difference is exact
    numeric = []
    for j in range(len(values)):
        hi, lo = values.copy(), values.copy()
        hi[j], lo[j] = 1.0, 0.0
        c_hi = model.complexity(_rebuild(gates, hi), coeffs)
        numeric.append(float(c_hi - model.complexity(_rebuild(gates, lo), coeffs)))
    analytic = []
    for g, gg in zip(gates, grads):
        analytic.append(float(gg.theta_B))
        for t in gg.theta_1:
            analytic += list(np.asarray(t, dtype=float))
        if g.theta_2 is not None:
            analytic += list(np.asarray(gg.theta_2, dtype=float))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-9, atol=1e-9)
    # ∂C/∂θ_1,i = θ_B γ_1 (eq. [12])
    for g, gg in zip(gates, grads):
        np.testing.assert_allclose(gg.theta_1[0], float(g.theta_B) * gg.gamma_1[0], rtol=1e-12)


def test_torch_autograd_matches_analytic_gradient():
    torch = pytest.importorskip("torch")
    spec = resnet1d((2, 1), (4, 6), length=8)
    model = ComplexityModel(spec, elementwise=True)
    rng = np.random.default_rng(3)
    coeffs = Coefficients(1e-3, 2e-2, 0.5)
    np_gates = _random_gates(rng, spec, outputs=False)
    t_gates = [
        BlockGates(
            torch.tensor(float(g.theta_B), dtype=torch.float64, requires_grad=True),
            tuple(torch.tensor(t, dtype=torch.float64, requires_grad=True) for t in g.theta_1),
            None,
        )
        for g in np_gates
    ]
    c = model.complexity(t_gates, coeffs)
    assert float(c.detach()) == pytest.approx(float(model.complexity(np_gates, coeffs)), rel=1e-12)
    c.backward()
    for tg, gg in zip(t_gates, model.grad(np_gates, coeffs)):
        assert float(tg.theta_B.grad) == pytest.approx(float(gg.theta_B), rel=1e-10)
        np.testing.assert_allclose(tg.theta_1[0].grad.numpy(), gg.theta_1[0], rtol=1e-10)


def test_bottleneck_gamma1_depends_on_neighbour_width():
    """M = 2: γ_1a grows with |θ_1b|₁ (the c_mid |θ_1a||θ_1b| term of §3)."""
    spec = resnet50()
    model = ComplexityModel(spec)
    coeffs = Coefficients(1e-9, 0.0, 0.0)
    g_full = ones_gates(spec)
    g_half = [BlockGates(g.theta_B, (g.theta_1[0], 0.5 * g.theta_1[1]), None) for g in g_full]
    ga_full = model.grad(g_full, coeffs)[0].gamma_1[0]
    ga_half = model.grad(g_half, coeffs)[0].gamma_1[0]
    assert ga_half < ga_full
    block = spec.blocks[0]
    conv1, conv2 = block.path[0], block.path[1]
    # γ_1a = α_f (c_1 m + c_mid |θ_1b|₁) for the first bottleneck (no bias, reported FLOPs)
    expected_full = 1e-9 * (conv1.c * conv1.in_width + conv2.c * conv2.out_width)
    assert ga_full == pytest.approx(expected_full, rel=1e-12)


def test_batched_gates():
    """Leading batch axes: one call evaluates many gate settings."""
    spec = residual_mlp(3, [4], 2)
    model = ComplexityModel(spec)
    rng = np.random.default_rng(1)
    tb = rng.uniform(size=5)
    t1 = rng.uniform(size=(5, 4))
    batched = model.flops([BlockGates(tb, (t1,), None)])
    singles = [float(model.flops([BlockGates(tb[i], (t1[i],), None)])) for i in range(5)]
    np.testing.assert_allclose(batched, singles, rtol=1e-12)
    grads = model.grad([BlockGates(tb, (t1,), None)], Coefficients(1.0, 1.0, 0.0))
    assert np.shape(grads[0].theta_1[0]) == (5, 4)


# ---------------------------------------------------------------------------------------------
# [13] and validation
# ---------------------------------------------------------------------------------------------


def test_reparametrize_formulas():
    c = reparametrize(0.5, 0.25, 2.0, N=1000, F_tot=1e6, P_tot=1e4, L_b=10)
    assert c.alpha_f == pytest.approx(0.5 * 0.25 * 1000 * 10 / 1e6)
    assert c.alpha_p == pytest.approx(0.5 * 0.75 * 1000 * 10 / 1e4)
    assert c.beta == pytest.approx(0.5 * 2.0 * 1000)
    # γ is the price of one average block's cost: the baseline complexity without β is γ N L_b
    spec = resnet_cifar(20)
    cf = coefficients_for(spec, 0.3, 0.6, 0.0, N=500)
    assert float(ComplexityModel(spec).complexity(None, cf)) == pytest.approx(0.3 * 500 * spec.prunable_blocks)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=-1.0), "gamma"),
        (dict(rho=1.5), "rho"),
        (dict(rho=-0.1), "rho"),
        (dict(delta=-0.5), "delta"),
        (dict(N=0), "N"),
        (dict(L_b=0), "L_b"),
        (dict(gamma=math.nan), "gamma"),
    ],
)
def test_reparametrize_rejects(kwargs, name):
    args = dict(gamma=1.0, rho=0.5, delta=0.0, N=10, F_tot=1.0, P_tot=1.0, L_b=1) | kwargs
    with pytest.raises(ValueError, match=name):
        reparametrize(**args)


def test_gate_validation_names_the_argument():
    spec = residual_mlp(3, [2, 2], 2)
    model = ComplexityModel(spec)
    good = ones_gates(spec, outputs=False)
    with pytest.raises(ValueError, match="one entry per block"):
        model.flops(good[:1])
    bad_len = list(good)
    bad_len[1] = BlockGates(np.asarray(1.0), (np.ones(3),), None)
    with pytest.raises(ValueError, match=r"gates\[1\]\.theta_1\[0\] must have length 2"):
        model.flops(bad_len)
    bad_range = list(good)
    bad_range[0] = BlockGates(np.asarray(1.2), (np.ones(2),), None)
    with pytest.raises(ValueError, match=r"gates\[0\]\.theta_B must lie in \[0, 1\]"):
        model.flops(bad_range)
    bad_unit = list(good)
    bad_unit[0] = BlockGates(np.asarray(1.0), (np.array([0.5, -0.1]),), None)
    with pytest.raises(ValueError, match=r"gates\[0\]\.theta_1\[0\]"):
        model.flops(bad_unit)
    no_out = list(good)
    no_out[0] = BlockGates(np.asarray(1.0), (np.ones(2),), np.ones(3))
    with pytest.raises(ValueError, match="theta_2 must be None"):
        model.flops(no_out)


def test_spec_validation():
    with pytest.raises(ValueError, match="in_width"):
        Layer("linear", -1, 3)
    with pytest.raises(ValueError, match="out_size"):
        Layer("conv2d", 3, 3, kernel=3, out_size=(4,))
    with pytest.raises(ValueError, match="kind"):
        Layer("conv3d", 3, 3)  # type: ignore[arg-type]
    lin = Layer("linear", 3, 4)
    with pytest.raises(ValueError, match="does not match"):
        Block(3, 3, (lin, Layer("linear", 5, 3)))
    with pytest.raises(ValueError, match="identity shortcut"):
        Block(3, 4, (lin,))
    with pytest.raises(ValueError, match="depth"):
        resnet_cifar(57)
    with pytest.raises(ValueError, match="must be positive"):
        residual_mlp(3, [0], 2)


def test_pruned_block_costs_only_its_shortcut():
    """A block whose path was removed (replaced by its shortcut) contributes no branch cost and no β."""
    spec = resnet50()
    pruned = list(spec.blocks)
    pruned[0] = Block(
        pruned[0].in_width,
        pruned[0].out_width,
        (),
        pruned[0].shortcut,
        pruned[0].shortcut_layer,
        out_size=pruned[0].out_size,
        name=pruned[0].name,
    )
    spec2 = NetworkSpec(spec.name, spec.input_shape, spec.stem, tuple(pruned), spec.head, spec.num_classes)
    m1, m2 = ComplexityModel(spec), ComplexityModel(spec2)
    branch = sum(f for k, (f, _) in m1.per_layer().items() if k.startswith("blocks.0.path"))
    assert float(m1.flops()) - float(m2.flops()) == pytest.approx(branch)
    assert spec2.depth == 47 and spec2.prunable_blocks == 15
    c = Coefficients(0.0, 0.0, 1.0)
    assert float(m1.complexity(None, c)) - float(m2.complexity(None, c)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Compiled evaluation (ComplexityModel.compile): the same terms, a few array operations
# ---------------------------------------------------------------------------------------------


def _pruned(spec: NetworkSpec, dead: tuple[int, ...]) -> NetworkSpec:
    """``spec`` with the paths of blocks ``dead`` removed (replaced by their shortcuts), as compaction does."""
    blocks = list(spec.blocks)
    for l in dead:
        b = blocks[l]
        blocks[l] = Block(b.in_width, b.out_width, (), b.shortcut, b.shortcut_layer, out_size=b.out_size,
                          out_gated=b.out_gated, out_act=b.out_act, name=b.name)
    return NetworkSpec(spec.name, spec.input_shape, spec.stem, tuple(blocks), spec.head, spec.num_classes,
                       meta=spec.meta)


_COMPILED_SPECS = [
    resnet_cifar(20),
    resnet1d((2, 1), (4, 6), length=8),
    residual_mlp(3, [2, 4, 1], 2, out_gated=True),
    residual_mlp(5, [3], 4),
    resnet50(),
    _pruned(resnet_cifar(20), (1, 4)),
    _pruned(resnet50(), (0, 7, 15)),
    _pruned(residual_mlp(3, [2, 4, 1], 2, out_gated=True), (1,)),
]


def _random_layout_gates(rng, spec, layout: str):
    """Random θ for one gate layout: all kinds, block-only, unit-only, or a random mix with None entries."""
    gates = []
    for b in spec.blocks:
        alive = b.alive
        tb = np.asarray(rng.uniform()) if alive and layout in ("all", "layer") else None
        t1 = None
        if alive and layout in ("all", "unit"):
            t1 = tuple(rng.uniform(size=n) for n in b.unit_widths)
        if alive and layout == "mixed":
            tb = np.asarray(rng.uniform()) if rng.uniform() < 0.5 else None
            t1 = tuple(rng.uniform(size=n) if rng.uniform() < 0.6 else None for n in b.unit_widths)
        t2 = rng.uniform(size=b.out_width) if (b.out_gated and layout != "layer" and rng.uniform() < 0.8) else None
        gates.append(BlockGates(tb, t1, t2))
    return gates


@pytest.mark.parametrize("spec", _COMPILED_SPECS, ids=lambda s: f"{s.name}-{s.prunable_blocks}")
@pytest.mark.parametrize("elementwise", [False, True])
def test_compiled_equals_term_loop(spec, elementwise):
    """C(Θ), E[F], E[P] of the compiled evaluation equal the term loop to 1e-12 (float64), every layout."""
    model = ComplexityModel(spec, elementwise=elementwise)
    rng = np.random.default_rng(7)
    coeffs = Coefficients(1e-3, 2e-2, 0.7)
    both = model.compile(coeffs, ("complexity", "flops", "params"))
    c_only = model.compile(coeffs)
    for layout in ("all", "layer", "unit", "mixed", "mixed", "none"):
        gates = None if layout == "none" else _random_layout_gates(rng, spec, layout)
        c, f, p = both(gates)
        assert float(c) == pytest.approx(float(model.complexity(gates, coeffs)), rel=1e-12)
        assert float(f) == pytest.approx(float(model.flops(gates)), rel=1e-12)
        assert float(p) == pytest.approx(float(model.params(gates)), rel=1e-12)
        assert float(c_only(gates)) == pytest.approx(float(c), rel=1e-14)
    assert model.compile().what == ("flops",) and model.compile(coeffs).what == ("complexity",)


def test_compiled_zero_and_one_gates_and_no_gate():
    """Deterministic vertices (θ ∈ {0, 1}) and a network without gates: exact values, floats when nothing is gated."""
    spec = _pruned(resnet_cifar(20), (2,))
    model = ComplexityModel(spec, elementwise=True)
    coeffs = Coefficients(1e-3, 2e-2, 0.7)
    fn = model.compile(coeffs, ("complexity", "flops"))
    ones = ones_gates(spec)
    assert fn(ones) == pytest.approx((float(model.complexity(ones, coeffs)), float(model.flops(ones))), rel=1e-14)
    zeros = [BlockGates(None if g.theta_B is None else 0 * g.theta_B,
                        None if g.theta_1 is None else tuple(0 * t for t in g.theta_1), None) for g in ones]
    assert float(fn(zeros)[1]) == pytest.approx(float(model.flops(zeros)), rel=1e-14)
    c, f = fn(None)
    assert isinstance(c, float) and isinstance(f, float)
    assert (c, f) == pytest.approx((float(model.complexity(None, coeffs)), float(model.flops())), rel=1e-14)


def test_compiled_batched_numpy_and_object_arrays():
    """Leading batch axes as in the loop; object arrays (sympy symbols) go through the same plan."""
    sympy = pytest.importorskip("sympy")
    spec = residual_mlp(3, [4, 2], 2, out_gated=True)
    model = ComplexityModel(spec, elementwise=True)
    coeffs = Coefficients(0.5, 0.25, 2.0)
    rng = np.random.default_rng(2)
    batched = [BlockGates(rng.uniform(size=5), (rng.uniform(size=(5, n)),), rng.uniform(size=(5, 3)))
               for n in (4, 2)]
    got = model.compile(coeffs)(batched)
    np.testing.assert_allclose(got, model.complexity(batched, coeffs), rtol=1e-12)
    assert got.shape == (5,)
    syms = [BlockGates(sympy.Symbol(f"b{l}"), (np.array(sympy.symbols(f"u{l}_0:{n}"), dtype=object),),
                       np.array(sympy.symbols(f"o{l}_0:3"), dtype=object)) for l, n in enumerate((4, 2))]
    compiled, loop = model.compile(coeffs)(syms), model.complexity(syms, coeffs)
    symbols = sorted(sympy.sympify(loop).free_symbols, key=str)
    assert sorted(sympy.sympify(compiled).free_symbols, key=str) == symbols
    for _ in range(3):
        point = {x: float(v) for x, v in zip(symbols, rng.uniform(size=len(symbols)))}
        assert float(compiled.subs(point)) == pytest.approx(float(loop.subs(point)), rel=1e-12)


def test_compiled_torch_value_and_autograd_match_analytic_gradient():
    torch = pytest.importorskip("torch")
    for spec in (resnet1d((2, 1), (4, 6), length=8), _pruned(resnet50(), (3,)),
                 residual_mlp(3, [2, 4], 2, out_gated=True)):
        model = ComplexityModel(spec, elementwise=True)
        rng = np.random.default_rng(3)
        coeffs = Coefficients(1e-3, 2e-2, 0.5)
        np_gates = _random_layout_gates(rng, spec, "all")
        t_gates = [
            BlockGates(
                None if g.theta_B is None else torch.tensor(float(g.theta_B), dtype=torch.float64, requires_grad=True),
                None if g.theta_1 is None else tuple(torch.tensor(t, requires_grad=True) for t in g.theta_1),
                None if g.theta_2 is None else torch.tensor(g.theta_2, requires_grad=True),
            )
            for g in np_gates
        ]
        c, f = model.compile(coeffs, ("complexity", "flops"))(t_gates)
        assert float(c.detach()) == pytest.approx(float(model.complexity(np_gates, coeffs)), rel=1e-12)
        assert float(f.detach()) == pytest.approx(float(model.flops(np_gates)), rel=1e-12)
        c.backward()
        for tg, gg in zip(t_gates, model.grad(np_gates, coeffs)):
            if tg.theta_B is not None:
                assert float(tg.theta_B.grad) == pytest.approx(float(gg.theta_B), rel=1e-10)
            for t, g in zip(tg.theta_1 or (), gg.theta_1):
                np.testing.assert_allclose(t.grad.numpy(), g, rtol=1e-10)
            if tg.theta_2 is not None:
                np.testing.assert_allclose(tg.theta_2.grad.numpy(), gg.theta_2, rtol=1e-10)
        # float32 gates, float64 evaluation on request
        f32 = [BlockGates(None if g.theta_B is None else g.theta_B.detach().float(),
                          None if g.theta_1 is None else tuple(t.detach().float() for t in g.theta_1),
                          None if g.theta_2 is None else g.theta_2.detach().float()) for g in t_gates]
        f64 = model.compile(None, "flops")(f32, dtype=torch.float64)
        assert f64.dtype == torch.float64
        assert float(f64) == pytest.approx(float(model.flops(f32)), rel=1e-6)


def test_compiled_validation_and_arguments():
    spec = residual_mlp(3, [2, 2], 2)
    model = ComplexityModel(spec)
    good = ones_gates(spec, outputs=False)
    bad = list(good)
    bad[0] = BlockGates(np.asarray(1.2), (np.ones(2),), None)
    fn = model.compile(Coefficients(1.0, 1.0, 1.0))
    fn(bad)  # no check by default (the hot path)
    with pytest.raises(ValueError, match=r"gates\[0\]\.theta_B must lie in \[0, 1\]"):
        fn(bad, check=True)
    with pytest.raises(ValueError, match="what must name"):
        model.compile(None, "energy")
    with pytest.raises(ValueError, match="needs its Coefficients"):
        model.compile(None, "complexity")


def test_compile_keeps_theory_free_of_torch():
    """Compiling and evaluating on numpy gates never imports torch (only torch gates do)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from theory import resnet_cifar, ComplexityModel, ones_gates, Coefficients; "
        "m = ComplexityModel(resnet_cifar(20)); m.compile(Coefficients(1, 1, 1))(ones_gates(m.spec)); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
