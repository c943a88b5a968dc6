"""The projection onto the hypercube H = [0,1]^K: Π_H of [15] and the ODE correction z of [22]/[27].

One implementation, used by the torch trainer (clip after a step), by every
integrator and by the Theorem 3.1 checks.  Works on numpy arrays and torch
tensors alike (only ``where``-free arithmetic via ``clip``/comparisons).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Array = Any


#: The faces of ``H``: every coordinate of ``θ`` lies in ``[LOWER, UPPER]``.
LOWER, UPPER = 0.0, 1.0


def project(theta: Array) -> Array:
    """``Π_H(θ)``: clip every coordinate to ``[0, 1]``, eq. [15]."""
    return theta.clip(LOWER, UPPER)


def project_(thetas: Sequence[Array]) -> None:
    """``θ ← Π_H(θ)`` in place for every array of ``thetas`` (eq. [15]; the same clip as :func:`project`).

    Torch tensors (the trainer's θ parameters, one per gate) are clipped by two ``foreach`` kernels
    over the whole list (``clamp_min_`` then ``clamp_max_``: the same values as ``clip(0, 1)``, NaN
    included) instead of a clip and a copy per tensor; numpy arrays by ``clip(out=)``.  Call it
    under ``torch.no_grad()`` for parameters.
    """
    items = list(thetas)
    if not items:
        return
    if type(items[0]).__module__.startswith("torch"):
        import torch  # only reached with torch tensors: theory itself never imports torch

        torch._foreach_clamp_min_(items, LOWER)
        torch._foreach_clamp_max_(items, UPPER)
        return
    for t in items:
        t.clip(LOWER, UPPER, out=t)


def projected_field(theta: Array, v: Array, *, atol: float = 0.0) -> Array:
    """The projected vector field of [22]/[27], coordinate-wise.

    ``v = −∂L/∂θ`` is the unconstrained velocity.  Inside ``H`` the field is
    ``v``; on the face ``θ = 0`` it is ``max(v, 0)``; on ``θ = 1`` it is
    ``min(v, 0)``.  A coordinate within ``atol`` of a face (or beyond it, as
    an integrator may step slightly outside) counts as on the face.  The
    returned field equals ``v + z`` with the correction ``z`` of [27]
    (``z ≥ 0`` at ``θ = 0``, ``z ≤ 0`` at ``θ = 1``, so ``θ z ≤ 0``).
    """
    at_lower = theta <= atol
    at_upper = theta >= 1.0 - atol
    out = v.clip(min=0.0) * at_lower + v.clip(max=0.0) * at_upper + v * ~(at_lower | at_upper)
    return out


def correction(theta: Array, v: Array, *, atol: float = 0.0) -> Array:
    """The minimal correction ``z = projected_field(θ, v) − v`` of [27]."""
    return projected_field(theta, v, atol=atol) - v


__all__ = ["LOWER", "UPPER", "correction", "project", "project_", "projected_field"]

