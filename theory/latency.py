"""A measured device-latency model, affine in every gate (the latency cost option of [11]).

THEORY §3 prices a network by expected FLOPs [9] and parameters [10]; the layer term ``β`` of
[11] is "an expected layer cost other than FLOPs and parameters, possibly intrinsic to the
computational hardware".  This module holds such a cost, *measured*: for every layer kind
(operation, kernel, stride, output size, BatchNorm/activation/bias — :func:`layer_key`) the time
of one step of that layer on a target device is fitted as

    t(n_in, n_out) = a + b · n_in · n_out + c · n_out + d · n_in                              (T)

in the active input and output unit counts (seconds; ``a, b, c, d ≥ 0``, non-negative least
squares).  The element-wise operations of a block — the residual addition inside ``ξ_B`` and the
output activation ``g`` after it — get ``t(n) = a + c · n`` on the block width.  A network's
latency is the sum over its layers, each multiplied by its block gate; because (T) is affine in
each width and distinct factors of a term are distinct gate groups, its expectation under
independent Bernoulli gates is the same polynomial evaluated at ``E[n] = |θ|₁`` — multilinear in
``Θ``, so Theorem 3.1 holds for it (:mod:`theory.complexity` builds the terms; the determinism
checks run on it).  A non-affine feature, e.g. a width floor ``max(n, n₀)`` or a step at
vector-register multiples, would make ``E[t]`` depend on the whole distribution of ``n`` (not
only on ``|θ|₁``), break multilinearity, and with it the guarantee that optima are vertices: it
is deliberately not offered.

The measurements themselves (torch) live in :mod:`pruning.calibrate`; this module is the file
format (versioned JSON, atomic writes), the fit and the lookup, numpy/scipy only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text
from .spec import Block, Layer

FORMAT = "latency-model"
VERSION = 1
#: What a latency model times: a training step (forward + backward) or inference (forward, no grad).
TARGETS = ("train", "inference")
#: The features of (T), in coefficient order.
FEATURES = ("const", "n_in*n_out", "n_out", "n_in")


class LatencyError(ValueError):
    """A latency-model file that cannot be used; the message names the file and the field."""


def layer_key(layer: Layer) -> str:
    """The calibration key of a weight layer: everything but its widths that changes its time."""
    size = "x".join(str(s) for s in layer.out_size) or "-"
    return (f"{layer.kind}:k{layer.kernel}:s{layer.stride}:out{size}:"
            f"bn{int(layer.bn)}:act{int(layer.act)}:bias{int(layer.bias)}")


def elementwise_key(op: str, block: Block) -> str:
    """The key of a block's element-wise ``op`` (``"add"``: residual addition; ``"act"``: output activation)."""
    if op not in ("add", "act"):
        raise ValueError(f"op must be 'add' or 'act', got {op!r}")
    size = "x".join(str(s) for s in block.out_size) or "-"
    return f"{op}:out{size}"


def design(n_in: Any, n_out: Any) -> np.ndarray:
    """The design matrix of (T): columns ``1, n_in·n_out, n_out, n_in``."""
    n_in = np.asarray(n_in, dtype=float)
    n_out = np.asarray(n_out, dtype=float)
    return np.stack([np.ones_like(n_in), n_in * n_out, n_out, n_in], axis=-1)


@dataclass(frozen=True)
class Fit:
    """One fitted entry: coefficients ``(a, b, c, d)`` of (T) and its errors (relative to the measured times)."""

    coef: tuple[float, float, float, float]
    fit_rel_rmse: float
    heldout_rel_rmse: float
    heldout_max_rel: float
    n_fit: int
    n_heldout: int

    def predict(self, n_in: Any, n_out: Any) -> Any:
        return design(n_in, n_out) @ np.asarray(self.coef)

    def to_dict(self) -> dict[str, Any]:
        return {"coef": list(self.coef), "fit_rel_rmse": self.fit_rel_rmse, "heldout_rel_rmse": self.heldout_rel_rmse,
                "heldout_max_rel": self.heldout_max_rel, "n_fit": self.n_fit, "n_heldout": self.n_heldout}


def _rel(pred: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.abs(pred - t) / np.maximum(t, 1e-300)


def fit_affine(
    n_in: Sequence[float], n_out: Sequence[float], t: Sequence[float], heldout: Sequence[bool], *,
    elementwise: bool = False,
) -> Fit:
    """Non-negative least squares of (T) on the points not ``heldout``; errors on both sets.

    Rows are weighted by ``1/t`` (relative error: a small layer's 10 µs matter as much, relatively,
    as a large one's ms).  ``elementwise`` fits ``a + c·n_out`` only (``b = d = 0``).
    """
    from scipy.optimize import nnls  # lazily: importing the cost model needs no scipy

    n_in_a, n_out_a, t_a = (np.asarray(v, dtype=float) for v in (n_in, n_out, t))
    held = np.asarray(heldout, dtype=bool)
    if not (n_in_a.shape == n_out_a.shape == t_a.shape == held.shape) or t_a.ndim != 1:
        raise ValueError("n_in, n_out, t and heldout must be 1-D of one length")
    if not (np.isfinite(t_a).all() and (t_a > 0).all()):
        raise ValueError("measured times must be finite and > 0")
    use = ~held
    cols = [0, 2] if elementwise else [0, 1, 2, 3]
    if use.sum() < len(cols):
        raise ValueError(f"need at least {len(cols)} fitted points, got {int(use.sum())}")
    X = design(n_in_a, n_out_a)[:, cols]
    w = 1.0 / t_a
    sol, _ = nnls(X[use] * w[use, None], t_a[use] * w[use])
    coef = np.zeros(4)
    coef[cols] = sol
    pred = design(n_in_a, n_out_a) @ coef
    rel = _rel(pred, t_a)
    fit_rmse = float(np.sqrt(np.mean(rel[use] ** 2)))
    h_rmse = float(np.sqrt(np.mean(rel[held] ** 2))) if held.any() else float("nan")
    h_max = float(rel[held].max()) if held.any() else float("nan")
    return Fit(tuple(float(c) for c in coef), fit_rmse, h_rmse, h_max, int(use.sum()), int(held.sum()))  # type: ignore[arg-type]


@dataclass(frozen=True)
class LatencyCosts:
    """The coefficients of one target (``train`` or ``inference``): ``key -> (a, b, c, d)`` in seconds.

    What :class:`theory.complexity.ComplexityModel` consumes (``latency=``); ``source`` names the
    file in errors.
    """

    target: str
    coef: Mapping[str, tuple[float, float, float, float]]
    source: str = ""

    def _get(self, key: str) -> tuple[float, float, float, float]:
        try:
            return self.coef[key]
        except KeyError:
            where = f"latency model {self.source}" if self.source else "the latency model"
            raise LatencyError(
                f"{where} has no {self.target!r} entry for {key!r}; calibrate it for this network "
                f"(python -m pruning calibrate --model ...)") from None

    def layer(self, layer: Layer) -> tuple[float, float, float, float]:
        return self._get(layer_key(layer))

    def elementwise(self, op: str, block: Block) -> tuple[float, float, float, float]:
        return self._get(elementwise_key(op, block))

    def __hash__(self) -> int:
        return hash((self.target, self.source, tuple(sorted(self.coef.items()))))


@dataclass(frozen=True)
class LatencyModel:
    """A calibrated latency model: per key and target a :class:`Fit`, plus where it was measured."""

    entries: Mapping[str, Mapping[str, Fit]]  # key -> target -> Fit
    meta: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def costs(self, target: str = "inference") -> LatencyCosts:
        if target not in TARGETS:
            raise LatencyError(f"latency target must be one of {', '.join(TARGETS)}, got {target!r}")
        coef = {k: v[target].coef for k, v in self.entries.items() if target in v}
        return LatencyCosts(target, coef, self.source)

    def summary(self, target: str) -> dict[str, float]:
        """Worst and mean held-out relative RMS error over the entries of ``target``."""
        errs = [v[target].heldout_rel_rmse for v in self.entries.values()
                if target in v and math.isfinite(v[target].heldout_rel_rmse)]
        if not errs:
            return {"heldout_rel_rmse_mean": float("nan"), "heldout_rel_rmse_max": float("nan")}
        return {"heldout_rel_rmse_mean": float(np.mean(errs)), "heldout_rel_rmse_max": float(np.max(errs))}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            **{k: v for k, v in self.meta.items() if k not in ("format", "version", "entries", "summary")},
            "summary": {t: self.summary(t) for t in TARGETS},
            "entries": {k: {t: f.to_dict() for t, f in v.items()} for k, v in self.entries.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model as JSON, atomically (refuses non-finite coefficients)."""
        for k, v in self.entries.items():
            for t, f in v.items():
                if not all(math.isfinite(c) and c >= 0 for c in f.coef):
                    raise LatencyError(f"entries.{k}.{t}.coef: not finite and >= 0: {f.coef}")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=True) + "\n")


def _fail(source: str, field_: str, msg: str) -> LatencyError:
    return LatencyError(f"{source}: {field_}: {msg}")


def load(path: str | os.PathLike[str]) -> LatencyModel:
    """Read and check a latency-model file; :class:`LatencyError` names the file and the field."""
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise LatencyError(f"{src}: latency model file not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatencyError(f"{src}: not a readable JSON file ({exc})") from None
    return from_dict(raw, src)


def from_dict(raw: Any, source: str = "<dict>") -> LatencyModel:
    if not isinstance(raw, dict):
        raise _fail(source, "(top level)", "must be a JSON object")
    if raw.get("format") != FORMAT:
        raise _fail(source, "format", f"must be {FORMAT!r}, got {raw.get('format')!r}")
    if raw.get("version") != VERSION:
        raise _fail(source, "version", f"this toolkit reads version {VERSION}, got {raw.get('version')!r}")
    entries_raw = raw.get("entries")
    if not isinstance(entries_raw, dict) or not entries_raw:
        raise _fail(source, "entries", "must be a non-empty object")
    entries: dict[str, dict[str, Fit]] = {}
    for key, per_target in entries_raw.items():
        if not isinstance(per_target, dict):
            raise _fail(source, f"entries.{key}", "must be an object of targets")
        entries[key] = {}
        for target, f in per_target.items():
            where = f"entries.{key}.{target}"
            if target not in TARGETS:
                raise _fail(source, where, f"unknown target (choose one of {', '.join(TARGETS)})")
            coef = f.get("coef") if isinstance(f, dict) else None
            if (not isinstance(coef, list) or len(coef) != 4
                    or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                               for c in coef)):
                raise _fail(source, f"{where}.coef", f"must be 4 finite numbers >= 0 (a, b, c, d), got {coef!r}")

            def num(name: str, f: dict[str, Any] = f) -> float:
                v = f.get(name, float("nan"))
                return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")

            entries[key][target] = Fit(
                tuple(float(c) for c in coef),  # type: ignore[arg-type]
                num("fit_rel_rmse"), num("heldout_rel_rmse"), num("heldout_max_rel"),
                int(num("n_fit")) if math.isfinite(num("n_fit")) else 0,
                int(num("n_heldout")) if math.isfinite(num("n_heldout")) else 0,
            )
    meta = {k: v for k, v in raw.items() if k not in ("entries", "summary")}
    return LatencyModel(entries, meta, source)


__all__ = [
    "FEATURES",
    "FORMAT",
    "TARGETS",
    "VERSION",
    "Fit",
    "LatencyCosts",
    "LatencyError",
    "LatencyModel",
    "design",
    "elementwise_key",
    "fit_affine",
    "from_dict",
    "layer_key",
    "load",
]
