"""The canonical block model of THEORY §7: one gated residual block on fixed data, exact.

One residual block, everything else frozen::

    ŷ = S x̂ + ξ_B Σ_i ξ_i v_i f(w_i · x̂),     ℓ = ½ ||y − ŷ||²,     f = tanh,

with independent Bernoulli gates ``ξ_B ~ B(θ_B)``, ``ξ_i ~ B(θ_i)``.  With
``r_n = y_n − S x̂_n`` and ``φ_ni = f(w_i · x̂_n)`` the expected loss is the
multilinear polynomial of §7

    E = Σ_n [ ½||r_n||² − θ_B Σ_i θ_i φ_ni (r_n·v_i)
              + ½ θ_B ( Σ_i θ_i φ_ni² ||v_i||² + Σ_{i≠j} θ_i θ_j φ_ni φ_nj (v_i·v_j) ) ]

(``E = Σ_n``, i.e. ``N · E_D`` of [2.2]), the complexity of the block is
``C = θ_B (c_B + c_1 Σ_i θ_i)`` (so ``γ_B = c_B + c_1 |θ|₁``, ``γ_1 = c_1``,
[12]) and the objective is ``L = E + (λ/2)||W||² + C``.

Closed forms used throughout (``a_n = Σ_i θ_i φ_ni v_i`` is the mean-field
branch output, ``e_n = r_n − a_n``, ``s_i = Σ_n φ_ni²``, ``f' = 1 − φ²``)::

    g_B = Σ_n [ −r_n·a_n + ½ ||a_n||² ] + ½ Σ_i θ_i (1 − θ_i) s_i ||v_i||²
    g_i = Σ_n [ −φ_ni v_i·e_n + (½ − θ_i) φ_ni² ||v_i||² ]
    h_i = −Σ_n f'_ni v_i·( e_n − (1 − θ_i) φ_ni v_i ) x̂_n
    k_i = −Σ_n φ_ni ( e_n − (1 − θ_i) φ_ni v_i )

These are exactly the conditional quantities of [23]: ``g_B = E[ℓ|ξ_B=1] −
E[ℓ|ξ_B=0]``, ``g_i = E[ℓ|ξ_B=1,ξ_i=1] − E[ℓ|ξ_B=1,ξ_i=0]``, ``h_i``/``k_i``
the gradients of ``E[ℓ|ξ_B=1,ξ_i=1]`` with respect to ``w_i``/``v_i``; so
``∂E/∂θ_B = g_B``, ``∂E/∂θ_i = θ_B g_i``, ``∂E/∂w_i = θ_B θ_i h_i``,
``∂E/∂v_i = θ_B θ_i k_i``.  The subsystem [24] is the projected ODE [22] of
:func:`velocity`; it is autonomous here.

State layout (everything accepts leading batch axes): a flat vector of length
``D = 1 + n + n(m+1) + p n``::

    y = [θ_B, θ_1 .. θ_n, W_1 (n×(m+1), row-major: row i = w_i), W_2 (p×n, row-major: column i = v_i)]

Two implementations of the same closed forms live here: :func:`gradients`
(readable einsum, leading batch axes; the reference) and the kernel behind
:func:`velocity`/:func:`field` (batch axis last and contiguous, small
contractions unrolled, computed chunk by chunk so the work stays in cache —
the speed of the basin maps depends on it).  The tests check both against
finite differences of :func:`objective` and against brute-force enumeration
of the ``2^(n+1)`` gate masks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .architectures import residual_mlp
from .complexity import BlockGates, Coefficients, ComplexityModel
from .spec import Block, Layer, NetworkSpec

Array = np.ndarray

#: Trajectories per chunk in the batched kernel: the (N, n, chunk) work arrays stay in L2 for N·n ≈ 128.
DEFAULT_CHUNK = 512


# --------------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------------


def _as_matrix(value: Any, name: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)  # a private copy
    if arr.ndim != 2:
        raise ValueError(f"BlockProblem.{name} must be a 2-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"BlockProblem.{name} must be finite")
    arr.setflags(write=False)
    return arr


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"BlockProblem.{name} must be a positive integer, got {value!r}")
    return int(value)


def _real(value: Any, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"BlockProblem.{name} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
    if not ok:
        raise ValueError(f"BlockProblem.{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


@dataclass(frozen=True, eq=False)
class BlockProblem:
    """The canonical block of §7 on fixed data.

    ``X`` (N×m) inputs, ``Y`` (N×p) targets, ``S`` (p×(m+1)) the fixed skip
    path (last column: its bias), ``n`` hidden units, ``lam`` the weight decay
    ``λ ≥ 0`` of [2.2], ``c_B > 0`` and ``c_1 > 0`` the complexity
    coefficients of ``C = θ_B (c_B + c_1 Σθ_i)`` (the lower bounds of [26]).
    Arrays are copied to read-only float64.  Validation errors name the bad
    field and shape.
    """

    X: np.ndarray
    Y: np.ndarray
    S: np.ndarray
    n: int
    lam: float = 0.0
    c_B: float = 1.0
    c_1: float = 1.0

    def __post_init__(self) -> None:
        X = _as_matrix(self.X, "X")
        Y = _as_matrix(self.Y, "Y")
        S = _as_matrix(self.S, "S")
        if X.shape[0] < 1:
            raise ValueError(f"BlockProblem.X must hold at least one sample, got shape {X.shape}")
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"BlockProblem.Y must have N={X.shape[0]} rows like X, got shape {Y.shape}")
        if S.shape != (Y.shape[1], X.shape[1] + 1):
            raise ValueError(
                f"BlockProblem.S must have shape (p, m+1) = ({Y.shape[1]}, {X.shape[1] + 1}), got {S.shape}"
            )
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "Y", Y)
        object.__setattr__(self, "S", S)
        object.__setattr__(self, "n", _positive_int(self.n, "n"))
        object.__setattr__(self, "lam", _real(self.lam, "lam", positive=False))
        object.__setattr__(self, "c_B", _real(self.c_B, "c_B", positive=True))
        object.__setattr__(self, "c_1", _real(self.c_1, "c_1", positive=True))

    # -- sizes and derived data ----------------------------------------------------------------
    @property
    def N(self) -> int:
        return int(self.X.shape[0])

    @property
    def m(self) -> int:
        return int(self.X.shape[1])

    @property
    def p(self) -> int:
        return int(self.Y.shape[1])

    @property
    def D(self) -> int:
        """State dimension ``1 + n + n(m+1) + p n``."""
        return state_dim(self.m, self.n, self.p)

    @property
    def theta_slice(self) -> slice:
        """The gate coordinates ``[θ_B, θ_1..θ_n]`` of the state: ``slice(0, 1 + n)``."""
        return theta_slice(self.n)

    @cached_property
    def Xh(self) -> np.ndarray:
        """``x̂_n = [x_n; 1]`` stacked: (N, m+1)."""
        out = np.concatenate([self.X, np.ones((self.N, 1))], axis=1)
        out.setflags(write=False)
        return out

    @cached_property
    def R(self) -> np.ndarray:
        """Residuals of the skip path ``r_n = y_n − S x̂_n``: (N, p)."""
        out = self.Y - self.Xh @ self.S.T
        out.setflags(write=False)
        return out

    @cached_property
    def base_loss(self) -> float:
        """``½ Σ_n ||r_n||²``: the loss with the branch off (``θ_B = 0``)."""
        return 0.5 * float(np.sum(self.R**2))

    # -- state helpers ---------------------------------------------------------------------------
    def pack(self, theta_B: Any, theta: Any, W1: Any, W2: Any) -> np.ndarray:
        """The flat state (see module doc) from its parts; checks the shapes against this problem."""
        y = pack(theta_B, theta, W1, W2)
        if y.shape[-1] != self.D:
            raise ValueError(f"pack: parts give a state of length {y.shape[-1]}, the problem needs D={self.D}")
        return y

    def unpack(self, y: Any) -> BlockState:
        return unpack(y, self)

    def zero_state(self, batch: tuple[int, ...] = ()) -> np.ndarray:
        return np.zeros((*batch, self.D))

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_complexity(
        cls,
        X: Any,
        Y: Any,
        S: Any,
        n: int,
        lam: float,
        alpha_f: float,
        alpha_p: float,
        beta: float,
        *,
        elementwise: bool = False,
    ) -> BlockProblem:
        """``c_B``, ``c_1`` from the one complexity model [9]–[12] of a one-block residual MLP.

        The block ``m -> n -> p`` (see :func:`block_spec`) gives ``C(Θ) =
        const + θ_B (c_B + c_1 |θ_1|₁)`` with ``γ_1 = c_1`` and ``c_B = γ_B``
        at ``θ_1 = 0`` (``β``, plus ``α_f c_b p`` for the gated addition when
        ``elementwise``).  With ``β = 0`` and ``elementwise=False`` the model
        has ``c_B = 0``, which [26] excludes: a ``ValueError`` says so.
        """
        Xa = np.asarray(X, dtype=np.float64)
        Ya = np.asarray(Y, dtype=np.float64)
        if Xa.ndim != 2 or Ya.ndim != 2:
            raise ValueError(f"BlockProblem.X and .Y must be 2-D arrays, got shapes {Xa.shape}, {Ya.shape}")
        c_B, c_1 = block_gammas(
            int(Xa.shape[1]), _positive_int(n, "n"), int(Ya.shape[1]),
            Coefficients(alpha_f, alpha_p, beta), elementwise=elementwise,
        )
        if not c_B > 0:
            raise ValueError(
                f"BlockProblem.c_B must be > 0 ([26]); the complexity model gives c_B = {c_B:g} "
                "(use beta > 0 or elementwise=True)"
            )
        return cls(X, Y, S, n, lam, c_B, c_1)

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        m: int = 2,
        n: int = 4,
        p: int = 2,
        N: int = 32,
        *,
        lam: float = 0.05,
        c_B: float = 0.5,
        c_1: float = 0.1,
        teacher_units: int = 2,
        teacher_scale: float = 1.5,
        noise: float = 0.1,
    ) -> BlockProblem:
        """A random instance for tests and benchmarks.

        ``x_n ~ N(0, I_m)``; the skip ``S = [I_{p×m} | 0]`` (identity /
        zero-padding shortcut, zero bias); targets ``y_n = S x̂_n + Σ_j v*_j
        tanh(w*_j · x̂_n) + noise`` from a teacher block of ``teacher_units``
        units (``w*_j ~ N(0, I)``, ``v*_j ~ teacher_scale · N(0, I/p)``), so the
        branch has something to learn whose value competes with ``C``.
        """
        X = rng.standard_normal((N, m))
        S = np.zeros((p, m + 1))
        S[: min(p, m), : min(p, m)] = np.eye(min(p, m))
        Xh = np.concatenate([X, np.ones((N, 1))], axis=1)
        Wt = rng.standard_normal((teacher_units, m + 1))
        Vt = teacher_scale * rng.standard_normal((p, teacher_units)) / math.sqrt(p)
        Y = Xh @ S.T + np.tanh(Xh @ Wt.T) @ Vt.T + noise * rng.standard_normal((N, p))
        return cls(X, Y, S, n, lam, c_B, c_1)


def state_dim(m: int, n: int, p: int) -> int:
    """``D = 1 + n + n(m+1) + p n``."""
    return 1 + n + n * (m + 1) + p * n


def theta_slice(n: int) -> slice:
    """The gate coordinates of the state: ``slice(0, 1 + n)``."""
    return slice(0, 1 + n)


def block_spec(m: int, n: int, p: int) -> NetworkSpec:
    """The one-block network whose complexity §7's ``C`` is: ``residual_mlp(m, [n], p)`` when ``m == p``.

    For ``m != p`` the same block with a (never pruned) projection shortcut.
    """
    if m == p:
        return residual_mlp(m, [n], p)
    block = Block(
        m,
        p,
        (Layer("linear", m, n, bias=True, act=True), Layer("linear", n, p, bias=False)),
        shortcut="projection",
        shortcut_layer=Layer("linear", m, p, bias=True),
        name="block0",
    )
    return NetworkSpec(f"block-{m}-{n}-{p}", (m,), (), (block,), (), p)


def block_gammas(
    m: int, n: int, p: int, coeffs: Coefficients, *, elementwise: bool = False
) -> tuple[float, float]:
    """``(c_B, c_1)`` with ``γ_B = c_B + c_1 |θ_1|₁`` and ``γ_1 = c_1``, from :class:`ComplexityModel` ([12])."""
    model = ComplexityModel(block_spec(m, n, p), elementwise=elementwise)
    gates = [BlockGates(theta_B=np.array(1.0), theta_1=(np.zeros(n),))]
    g = model.grad(gates, coeffs)[0]
    return float(g.theta_B), float(g.gamma_1[0])


# --------------------------------------------------------------------------------------------------
# State packing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockState:
    """The parts of a state (views where possible), batch axes leading.

    ``theta_B`` (...,), ``theta`` (..., n), ``W1`` (..., n, m+1) with rows
    ``w_i``, ``W2`` (..., p, n) with columns ``v_i``.
    """

    theta_B: np.ndarray
    theta: np.ndarray
    W1: np.ndarray
    W2: np.ndarray

    @property
    def weight_norm_sq(self) -> np.ndarray:
        """``||W_1||² + ||W_2||²`` (the ``||W||²`` of §6)."""
        return np.sum(self.W1**2, axis=(-2, -1)) + np.sum(self.W2**2, axis=(-2, -1))

    @property
    def w_norms(self) -> np.ndarray:
        """``||w_i||``: (..., n)."""
        return np.sqrt(np.sum(self.W1**2, axis=-1))

    @property
    def v_norms(self) -> np.ndarray:
        """``||v_i||``: (..., n)."""
        return np.sqrt(np.sum(self.W2**2, axis=-2))


def pack(theta_B: Any, theta: Any, W1: Any, W2: Any) -> np.ndarray:
    """``[θ_B, θ, vec(W1), vec(W2)]`` (row-major), broadcasting common leading batch axes."""
    tB = np.asarray(theta_B, dtype=np.float64)
    t = np.asarray(theta, dtype=np.float64)
    W1a = np.asarray(W1, dtype=np.float64)
    W2a = np.asarray(W2, dtype=np.float64)
    if t.ndim < 1 or W1a.ndim < 2 or W2a.ndim < 2:
        raise ValueError(
            f"pack: theta must be (..., n), W1 (..., n, m+1), W2 (..., p, n); got shapes {t.shape}, "
            f"{W1a.shape}, {W2a.shape}"
        )
    n = t.shape[-1]
    if W1a.shape[-2] != n:
        raise ValueError(f"pack: W1 must have n={n} rows (one per unit), got shape {W1a.shape}")
    if W2a.shape[-1] != n:
        raise ValueError(f"pack: W2 must have n={n} columns (one per unit), got shape {W2a.shape}")
    batch = np.broadcast_shapes(tB.shape, t.shape[:-1], W1a.shape[:-2], W2a.shape[:-2])
    parts = [
        np.broadcast_to(tB, batch)[..., None],
        np.broadcast_to(t, (*batch, n)),
        np.broadcast_to(W1a, (*batch, *W1a.shape[-2:])).reshape(*batch, -1),
        np.broadcast_to(W2a, (*batch, *W2a.shape[-2:])).reshape(*batch, -1),
    ]
    return np.concatenate(parts, axis=-1)


def _dims(dims: Any) -> tuple[int, int, int]:
    if isinstance(dims, BlockProblem):
        return dims.m, dims.n, dims.p
    m, n, p = (int(d) for d in dims)
    return m, n, p


def unpack(y: Any, dims: BlockProblem | tuple[int, int, int]) -> BlockState:
    """Split a state (..., D) into a :class:`BlockState` of views; ``dims`` a problem or ``(m, n, p)``."""
    m, n, p = _dims(dims)
    ya = np.asarray(y, dtype=np.float64)
    D = state_dim(m, n, p)
    if ya.ndim < 1 or ya.shape[-1] != D:
        raise ValueError(f"state y must have last axis D = 1+n+n(m+1)+pn = {D}, got shape {ya.shape}")
    o1 = 1 + n
    o2 = o1 + n * (m + 1)
    batch = ya.shape[:-1]
    return BlockState(
        theta_B=ya[..., 0],
        theta=ya[..., 1:o1],
        W1=ya[..., o1:o2].reshape(*batch, n, m + 1),
        W2=ya[..., o2:].reshape(*batch, p, n),
    )


# --------------------------------------------------------------------------------------------------
# Reference closed forms (leading batch axes)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockGradients:
    """The conditional quantities of [23], batch axes leading.

    ``g_B`` (...,), ``g`` (..., n), ``h`` (..., n, m+1) (row ``i`` = ``h_i``,
    laid out like ``W1``), ``k`` (..., p, n) (column ``i`` = ``k_i``, like
    ``W2``).  ``∂E/∂θ_B = g_B``, ``∂E/∂θ_i = θ_B g_i``, ``∂E/∂w_i = θ_B θ_i h_i``,
    ``∂E/∂v_i = θ_B θ_i k_i``.
    """

    g_B: np.ndarray
    g: np.ndarray
    h: np.ndarray
    k: np.ndarray


def _features(problem: BlockProblem, st: BlockState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``φ`` (..., N, n), mean-field output ``a`` (..., N, p), ``e = r − a``."""
    phi = np.tanh(np.einsum("nk,...ik->...ni", problem.Xh, st.W1))
    a = np.einsum("...ni,...i,...ci->...nc", phi, st.theta, st.W2)
    return phi, a, problem.R - a


def _mean_field_gain(problem: BlockProblem, a: np.ndarray) -> np.ndarray:
    """``Σ_n [−r_n·a_n + ½||a_n||²]`` (= ``½Σ||r−a||² − ½Σ||r||²`` without the cancellation when ``a`` is small)."""
    return -np.einsum("...nc,nc->...", a, problem.R) + 0.5 * np.sum(a**2, axis=(-2, -1))


def expected_loss(problem: BlockProblem, y: Any) -> np.ndarray:
    """The exact ``E(W, Θ)`` of §7 (batched over leading axes of ``y``)."""
    st = unpack(y, problem)
    phi, a, _ = _features(problem, st)
    vv = np.sum(st.W2**2, axis=-2)  # ||v_i||²
    var = np.sum(st.theta * (1.0 - st.theta) * np.sum(phi**2, axis=-2) * vv, axis=-1)
    branch = _mean_field_gain(problem, a) + 0.5 * var
    return problem.base_loss + st.theta_B * branch


def complexity(problem: BlockProblem, y: Any) -> np.ndarray:
    """``C = θ_B (c_B + c_1 Σ_i θ_i)`` of §7 (the block's part of [11], constants dropped)."""
    st = unpack(y, problem)
    return st.theta_B * (problem.c_B + problem.c_1 * np.sum(st.theta, axis=-1))


def objective(problem: BlockProblem, y: Any) -> np.ndarray:
    """``L = E + (λ/2)||W||² + C`` of [2.2] for this block."""
    st = unpack(y, problem)
    return expected_loss(problem, y) + 0.5 * problem.lam * st.weight_norm_sq + complexity(problem, y)


def gradients(problem: BlockProblem, y: Any) -> BlockGradients:
    """``g_B``, ``g_i``, ``h_i``, ``k_i`` of [23] in closed form (see module doc), batched."""
    st = unpack(y, problem)
    phi, a, e = _features(problem, st)
    th = st.theta
    vv = np.sum(st.W2**2, axis=-2)  # (..., n)
    phi2 = phi**2
    s = np.sum(phi2, axis=-2)  # (..., n)
    q = np.einsum("...nc,...ci->...ni", e, st.W2)  # v_i · e_n
    g_B = _mean_field_gain(problem, a) + 0.5 * np.sum(th * (1 - th) * s * vv, axis=-1)
    g = -np.sum(phi * q, axis=-2) + (0.5 - th) * s * vv
    G = (1.0 - phi2) * (q - (1.0 - th)[..., None, :] * phi * vv[..., None, :])
    h = -np.einsum("...ni,nk->...ik", G, problem.Xh)
    k = -np.einsum("...ni,...nc->...ci", phi, e) + ((1.0 - th) * s)[..., None, :] * st.W2
    return BlockGradients(g_B=g_B, g=g, h=h, k=k)


def objective_gradient(problem: BlockProblem, y: Any) -> np.ndarray:
    """``∇L`` from :func:`gradients` ([23] plus ``λW`` and ``∇C``), laid out like ``y``."""
    st = unpack(y, problem)
    gr = gradients(problem, y)
    tB = st.theta_B[..., None]
    tt = tB * st.theta  # θ_B θ_i
    dB = gr.g_B + problem.c_B + problem.c_1 * np.sum(st.theta, axis=-1)
    dth = tB * (gr.g + problem.c_1)
    dW1 = tt[..., :, None] * gr.h + problem.lam * st.W1
    dW2 = tt[..., None, :] * gr.k + problem.lam * st.W2
    return pack(dB, dth, dW1, dW2)


def expected_loss_enumerated(problem: BlockProblem, y: Any) -> float:
    """``E`` by brute force over the ``2^(n+1)`` gate masks (one unbatched state; tests only)."""
    st = unpack(y, problem)
    phi = np.tanh(problem.Xh @ st.W1.T)  # (N, n)
    total = 0.0
    n = problem.n
    for mask in itertools.product((0, 1), repeat=n + 1):
        xi_B, xi = mask[0], np.array(mask[1:], dtype=float)
        prob = (st.theta_B if xi_B else 1.0 - st.theta_B) * np.prod(np.where(xi == 1, st.theta, 1.0 - st.theta))
        if prob == 0.0:
            continue
        yhat = problem.Xh @ problem.S.T + xi_B * (phi * xi) @ st.W2.T
        total += float(prob) * 0.5 * float(np.sum((problem.Y - yhat) ** 2))
    return total


# --------------------------------------------------------------------------------------------------
# Lemma 1 constant [28]
# --------------------------------------------------------------------------------------------------


def lemma1_constants(problem: BlockProblem, R: float) -> dict[str, float]:
    """The separate constants of the four bounds of [28] on the ball ``||W_1||² + ||W_2||² ≤ R²``.

    With ``|tanh s| ≤ |s|``, ``|tanh'| ≤ 1``, ``|θ| ≤ 1`` and ``Σ_j ||w_j|| ||v_j||
    ≤ R²/2`` (so ``||a_n|| ≤ ||x̂_n|| R²/2`` and ``||w_i|| ||v_i|| ≤ R²/2``)::

        |g_i|  ≤ ||w_i|| ||v_i|| Σ_n ||x̂_n|| (||r_n|| + ¾ ||x̂_n|| R²)      (k_g: ½ from a_n, ¼ from (½−θ_i)φ²||v_i||²)
        ||h_i|| ≤ ||v_i||        Σ_n ||x̂_n|| (||r_n|| + ½ ||x̂_n|| R²)      (k_h)
        ||k_i|| ≤ ||w_i||        Σ_n ||x̂_n|| (||r_n|| + ½ ||x̂_n|| R²)      (k_k)
        |g_B|  ≤ Σ_i ||w_i|| ||v_i|| Σ_n ||x̂_n|| (||r_n|| + ¼ ||x̂_n|| R²)  (k_B)

    The §7 constant ``k`` is their maximum, ``k_g``.
    """
    R = float(R)
    if not (math.isfinite(R) and R >= 0):
        raise ValueError(f"R must be finite and >= 0, got {R!r}")
    xn = np.linalg.norm(problem.Xh, axis=1)
    rn = np.linalg.norm(problem.R, axis=1)
    const = lambda c: float(np.sum(xn * (rn + c * xn * R**2)))
    return {"k_g": const(0.75), "k_h": const(0.5), "k_k": const(0.5), "k_B": const(0.25)}


def lemma1_k(problem: BlockProblem, R: float) -> float:
    """§7's explicit Lemma-1 constant ``k = Σ_n ||x̂_n|| (||r_n|| + ¾ ||x̂_n|| R²)`` for [28] on ``||W|| ≤ R``."""
    return lemma1_constants(problem, R)["k_g"]


# --------------------------------------------------------------------------------------------------
# The vector field [22]/[24] (fast kernel, batch axis last)
# --------------------------------------------------------------------------------------------------


def _velocity_T(problem: BlockProblem, YT: np.ndarray, out: np.ndarray) -> None:
    """``out = −∇L`` for states stored as columns: ``YT`` (D, B), ``out`` (D, B) (may not alias ``YT``).

    Same closed forms as :func:`gradients`; every work array is (·, B) with
    the batch contiguous so each numpy call is one long vector operation,
    and the tiny contractions over ``p`` and ``n`` are unrolled.
    """
    m, n, p, N = problem.m, problem.n, problem.p, problem.N
    B = YT.shape[1]
    m1 = m + 1
    o1, o2 = 1 + n, 1 + n + n * m1
    Xh, Rr = problem.Xh, problem.R
    tB = YT[0]
    th = YT[1:o1]  # (n, B)
    W1 = YT[o1:o2].reshape(n, m1, B)
    W2 = YT[o2:].reshape(p, n, B)

    # pre-activations A[n, i, b] = Σ_k x̂_nk W1[i, k, b]  (one GEMM: (N, m+1) @ (m+1, n·B))
    W1T = np.ascontiguousarray(W1.transpose(1, 0, 2)).reshape(m1, n * B)
    phi = (Xh @ W1T).reshape(N, n, B)
    np.tanh(phi, out=phi)
    phi_th = phi * th  # θ_i φ_ni
    # e[n, c, b] = r_nc − Σ_i θ_i φ_ni v_ci ;  q[n, i, b] = v_i · e_n
    a = np.einsum("nib,cib->ncb", phi_th, W2)
    e = Rr[:, :, None] - a
    q = np.einsum("ncb,cib->nib", e, W2)
    vv = np.einsum("cib,cib->ib", W2, W2)  # ||v_i||²  (n, B)
    phi2 = phi * phi
    s = phi2.sum(axis=0)  # (n, B)
    one_m_th = 1.0 - th
    # g_B = Σ_n [−r_n·a_n + ½||a_n||²] + ½ Σ_i θ_i(1−θ_i) s_i ||v_i||²  and ∂L/∂θ_B = g_B + γ_B
    gain = 0.5 * np.einsum("ncb,ncb->b", a, a)
    gain -= np.einsum("ncb,nc->b", a, Rr)
    var = np.einsum("ib,ib->b", th * one_m_th * s, vv)
    sum_th = th.sum(axis=0)
    out[0] = -(gain + 0.5 * var + problem.c_B + problem.c_1 * sum_th)
    # g_i and ∂L/∂θ_i = θ_B (g_i + c_1)
    svv = s * vv
    g = np.einsum("nib,nib->ib", phi, q)
    np.negative(g, out=g)
    g += (0.5 - th) * svv
    g += problem.c_1
    np.multiply(g, -tB, out=out[1:o1])
    # G = f'·(q − (1−θ_i) φ ||v_i||²);  h_i = −Σ_n G_ni x̂_n
    coef = one_m_th * vv  # (n, B)
    G = phi * coef
    np.subtract(q, G, out=G)
    np.subtract(1.0, phi2, out=phi2)  # f' = 1 − φ²
    G *= phi2
    hT = (Xh.T @ G.reshape(N, n * B)).reshape(m1, n, B)  # Σ_n x̂_nk G_ni  (= −h)
    tt = tB * th  # θ_B θ_i  (n, B)
    outW1 = out[o1:o2].reshape(n, m1, B)
    # ẇ_i = −θ_B θ_i h_i − λ w_i = θ_B θ_i hT − λ w_i
    np.multiply(hT.transpose(1, 0, 2), tt[:, None, :], out=outW1)
    if problem.lam:
        outW1 -= problem.lam * W1
    # k_ci = −Σ_n φ_ni e_nc + (1−θ_i) s_i v_ci;  v̇_i = −θ_B θ_i k_i − λ v_i
    outW2 = out[o2:].reshape(p, n, B)
    np.einsum("nib,ncb->cib", phi, e, out=outW2)  # Σ_n φ_ni e_nc  (= −k + (1−θ)s v)
    outW2 -= (one_m_th * s) * W2
    outW2 *= tt
    if problem.lam:
        outW2 -= problem.lam * W2


def _velocity_single(problem: BlockProblem, y: np.ndarray) -> np.ndarray:
    """``−∇L`` for one state (D,): the same closed forms with plain 2-D matrix products (few numpy calls)."""
    m, n, p = problem.m, problem.n, problem.p
    o1, o2 = 1 + n, 1 + n + n * (m + 1)
    tB = y[0]
    th = y[1:o1]
    W1 = y[o1:o2].reshape(n, m + 1)
    W2 = y[o2:].reshape(p, n)
    phi = np.tanh(problem.Xh @ W1.T)  # (N, n)
    a = (phi * th) @ W2.T  # (N, p)
    e = problem.R - a
    q = e @ W2  # (N, n): v_i · e_n
    vv = np.einsum("ci,ci->i", W2, W2)
    phi2 = phi * phi
    s = phi2.sum(axis=0)
    one_m_th = 1.0 - th
    out = np.empty(y.shape[0])
    out[0] = -(
        0.5 * np.vdot(a, a) - np.vdot(a, problem.R) + 0.5 * np.dot(th * one_m_th * s, vv)
        + problem.c_B + problem.c_1 * th.sum()
    )
    g = -np.einsum("ni,ni->i", phi, q) + (0.5 - th) * s * vv
    out[1:o1] = -tB * (g + problem.c_1)
    G = (1.0 - phi2) * (q - phi * (one_m_th * vv))
    tt = tB * th
    out[o1:o2] = ((G.T @ problem.Xh) * tt[:, None] - problem.lam * W1).ravel()
    k_neg = e.T @ phi - (one_m_th * s) * W2  # = −k
    out[o2:] = (k_neg * tt - problem.lam * W2).ravel()
    return out


def velocity(problem: BlockProblem, y: Any, *, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """The unprojected velocity ``−∇(E + (λ/2)||W||² + C)`` of [22]/[24], same shape as ``y`` (..., D)."""
    ya = np.asarray(y, dtype=np.float64)
    if ya.ndim < 1 or ya.shape[-1] != problem.D:
        raise ValueError(f"state y must have last axis D={problem.D}, got shape {ya.shape}")
    batch = ya.shape[:-1]
    flat = ya.reshape(-1, problem.D)
    outT = _velocity_columns(problem, flat.T, chunk)
    return outT.T.reshape(*batch, problem.D)


def _velocity_columns(problem: BlockProblem, YT: np.ndarray, chunk: int) -> np.ndarray:
    """Kernel driver: ``YT`` (D, B) any strides -> ``out`` (D, B) C-contiguous, chunked along B."""
    D, B = YT.shape
    out = np.empty((D, B))
    for a in range(0, B, chunk):
        b = min(a + chunk, B)
        block = YT[:, a:b]
        if not block.flags.c_contiguous:
            block = np.ascontiguousarray(block)
        if b - a == B:
            _velocity_T(problem, block, out)
        else:
            tmp = np.empty((D, b - a))
            _velocity_T(problem, block, tmp)
            out[:, a:b] = tmp
    return out


def field(problem: BlockProblem, *, chunk: int = DEFAULT_CHUNK) -> Callable[[float, np.ndarray], np.ndarray]:
    """``fun(t, Y)`` for :mod:`theory.ode`: the velocity of [24] for ``Y`` of shape (D,) or (B, D).

    The subsystem [24] is the projected ODE of this field (the integrators
    apply :func:`theory.projection.projected_field` on ``theta_slice``).  A
    ``(B, D)`` input whose transpose is C-contiguous (what
    :func:`theory.ode.odeint_batch` passes) is read without a copy, and the
    result is returned as the transpose of a C-contiguous (D, B) array.
    """

    def fun(t: float, Y: np.ndarray) -> np.ndarray:
        if Y.ndim == 1:
            return _velocity_single(problem, np.asarray(Y, dtype=np.float64))
        return _velocity_columns(problem, Y.T, chunk).T

    fun.problem = problem  # type: ignore[attr-defined]
    return fun


__all__ = [
    "DEFAULT_CHUNK",
    "BlockGradients",
    "BlockProblem",
    "BlockState",
    "block_gammas",
    "block_spec",
    "complexity",
    "expected_loss",
    "expected_loss_enumerated",
    "field",
    "gradients",
    "lemma1_constants",
    "lemma1_k",
    "objective",
    "objective_gradient",
    "pack",
    "state_dim",
    "theta_slice",
    "unpack",
    "velocity",
]
