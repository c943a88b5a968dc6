"""Registry of the numerical checks run by ``python -m theory verify``.

A check is a function ``check(rng, instances, progress) -> CheckResult``
registered under a name with :func:`register`.  ``rng`` is a
``numpy.random.Generator`` (seeded by the caller), ``instances`` the number of
random instances to try, ``progress`` a callable to advance a progress bar by
one instance.  The modules that define checks are listed in
:data:`CHECK_MODULES` and imported by :func:`registry`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Modules whose import registers checks (in report order).
CHECK_MODULES = ("theory.determinism", "theory.dynamics_checks", "theory.certificates", "theory.theorem_batch")


@dataclass
class CheckResult:
    """What a check found: on how many instances, how many failed, how badly.

    ``failures`` counts instances that violate the property beyond
    ``tolerance``; ``inconclusive`` counts instances where a hypothesis of the
    property did not hold (they are never counted as passes);
    ``worst_violation`` is the largest violation measured (0 when none; a
    non-negative number in the units described by ``metric``).
    """

    name: str
    instances: int
    failures: int
    worst_violation: float
    inconclusive: int = 0
    tolerance: float = 0.0
    metric: str = ""
    description: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.failures == 0 and self.instances > self.inconclusive

    def record(self) -> dict[str, Any]:
        """One JSON-ready record: ``{name, instances, failures, inconclusive, worst_violation, ...}``."""
        out = asdict(self)
        wv = out["worst_violation"]
        out["worst_violation"] = None if (wv is None or not math.isfinite(wv)) else float(wv)
        out["passed"] = self.passed
        return out


CheckFn = Callable[[np.random.Generator, int, Callable[[], None]], CheckResult]


@dataclass(frozen=True)
class RegisteredCheck:
    name: str
    fn: CheckFn
    default_instances: int
    group: str
    description: str


_REGISTRY: dict[str, RegisteredCheck] = {}


def register(name: str, *, instances: int, group: str, description: str) -> Callable[[CheckFn], CheckFn]:
    """Decorator: register ``fn`` as check ``name`` (``group`` is what ``--only`` may also select)."""

    def deco(fn: CheckFn) -> CheckFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"check {name!r} registered twice")
        _REGISTRY[name] = RegisteredCheck(name, fn, instances, group, description)
        return fn

    return deco


def registry() -> dict[str, RegisteredCheck]:
    """All registered checks, importing :data:`CHECK_MODULES` first."""
    for mod in CHECK_MODULES:
        importlib.import_module(mod)
    order = {mod: i for i, mod in enumerate(CHECK_MODULES)}
    ranked = sorted(_REGISTRY.values(), key=lambda c: order.get(c.fn.__module__, len(order)))  # stable
    return {c.name: c for c in ranked}


def select(only: str | None) -> list[RegisteredCheck]:
    """Checks whose name or group equals ``only`` (all if ``None``); ``ValueError`` if none match."""
    checks = list(registry().values())
    if only is None:
        return checks
    wanted = {s.strip() for s in only.split(",") if s.strip()}
    chosen = [c for c in checks if c.name in wanted or c.group in wanted]
    unknown = wanted - {c.name for c in checks} - {c.group for c in checks}
    if unknown or not chosen:
        names = sorted({c.name for c in checks} | {c.group for c in checks})
        raise ValueError(f"--only: unknown check(s) {sorted(unknown)}; choose from {', '.join(names)}")
    return chosen
