"""``python -m pruning calibrate``: measure per-layer step times on a device and fit the latency model.

For every distinct layer kind of a network (:func:`theory.latency.layer_key`: operation, kernel,
stride, output size, BatchNorm/activation/bias) and every block element-wise operation (residual
addition, output activation; :func:`theory.latency.elementwise_key`), this module times one layer
in isolation at a grid of active widths ``(n_in, n_out)`` — a training step (forward, ``sum``,
backward, train-mode BatchNorm) and an inference call (eval mode, ``no_grad``) at the run's batch
size — and fits ``t = a + b n_in n_out + c n_out + d n_in`` (:func:`theory.latency.fit_affine`,
non-negative least squares).  The grid's widths are fractions ``1/8, 1/4, 1/2, 1`` of the
layer's width; the fit error is reported on *held-out* widths ``3/8, 3/4`` never used in the fit.
Timing: the points of one layer kind are interleaved round by round, each point's time is the
minimum over rounds of the mean over a repetition of calls (about :data:`REP_SECONDS` long; the
minimum is robust to a shared machine's load spikes).  The clock is the calling thread's CPU time
(``time.thread_time``) on a CPU with one torch thread — all work runs in that thread, and time the
thread spends descheduled on a loaded machine is not counted — and the wall clock otherwise
(with ``cuda.synchronize``); the file records which.  ``torch.set_num_threads`` is fixed
(recorded).  The result is a versioned JSON file (:class:`theory.latency.LatencyModel`, written
atomically) that ``objective.latency_model`` points at.  Pruning removes units only, never spatial
positions, so one calibration covers a network's whole run.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from theory.latency import Fit, LatencyModel, elementwise_key, fit_affine, layer_key
from theory.spec import Block, Layer, NetworkSpec

from .models import WeightLayer

FIT_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
HELDOUT_FRACTIONS = (0.375, 0.75)
#: Target duration of one timed repetition (the number of calls per repetition adapts to it).
REP_SECONDS = 0.005
QUICK_FIT_FRACTIONS = (0.25, 0.5, 1.0)
QUICK_HELDOUT_FRACTIONS = (0.625,)


@dataclass(frozen=True)
class _Kind:
    """One thing to calibrate: a weight layer (``layer``) or a block's element-wise op (``op``, ``block``)."""

    key: str
    layer: Layer | None = None
    op: str = ""
    block: Block | None = None
    in_fixed: bool = False  # the layer's input width never changes in this network (stem input)


def kinds_of(spec: NetworkSpec) -> list[_Kind]:
    """The distinct layer kinds of ``spec`` (widest instance of each) and its element-wise block ops."""
    found: dict[str, _Kind] = {}

    def widest(k: _Kind) -> None:
        old = found.get(k.key)
        if old is None or (k.layer is not None and old.layer is not None
                           and k.layer.in_width * k.layer.out_width > old.layer.in_width * old.layer.out_width) or (
                k.block is not None and old.block is not None and k.block.out_width > old.block.out_width):
            found[k.key] = k

    for i, layer in enumerate(spec.stem):
        widest(_Kind(layer_key(layer), layer, in_fixed=i == 0))
    for b in spec.blocks:
        for layer in b.path:
            widest(_Kind(layer_key(layer), layer))
        if b.shortcut_layer is not None:
            widest(_Kind(layer_key(b.shortcut_layer), b.shortcut_layer))
        if b.alive:
            widest(_Kind(elementwise_key("add", b), op="add", block=b))
        if b.out_act:
            widest(_Kind(elementwise_key("act", b), op="act", block=b))
    for layer in spec.head:
        widest(_Kind(layer_key(layer), layer))
    return list(found.values())


def _widths(n: int, fractions: tuple[float, ...], exclude: frozenset[int] = frozenset()) -> list[int]:
    """``round(n·f)`` per fraction, moved to the nearest width in ``[1, n]`` not in ``exclude`` (held-out)."""
    out: set[int] = set()
    for f in fractions:
        w = max(1, min(n, round(n * f)))
        for step in range(n):
            for cand in (w - step, w + step):
                if 1 <= cand <= n and cand not in exclude and cand not in out:
                    out.add(cand)
                    break
            else:
                continue
            break
    return sorted(out)


def _points(kind: _Kind, quick: bool) -> list[tuple[int, int, bool]]:
    """``(n_in, n_out, heldout)`` of one kind."""
    ff, hf = (QUICK_FIT_FRACTIONS, QUICK_HELDOUT_FRACTIONS) if quick else (FIT_FRACTIONS, HELDOUT_FRACTIONS)
    if kind.layer is not None:
        n_in_max, n_out_max = kind.layer.in_width, kind.layer.out_width
    else:
        assert kind.block is not None
        n_in_max, n_out_max = 0, kind.block.out_width
    fit_out = _widths(n_out_max, ff)
    held_out = _widths(n_out_max, hf, frozenset(fit_out))
    if kind.layer is None or kind.in_fixed:
        fit_in, held_in = [n_in_max], []
    else:
        fit_in = _widths(n_in_max, ff)
        held_in = _widths(n_in_max, hf, frozenset(fit_in))
    pts = [(i, o, False) for i in fit_in for o in fit_out]
    # held-out: widths never fitted, on at least one axis (both where the input varies)
    if held_in:
        pts += [(i, o, True) for i in held_in for o in held_out or fit_out]
    else:
        pts += [(i, o, True) for i in fit_in for o in held_out]
    return pts


def _in_size(layer: Layer) -> tuple[int, ...]:
    return tuple(s * layer.stride for s in layer.out_size)


def _bench_fn(kind: _Kind, n_in: int, n_out: int, target: str, batch: int, device: torch.device,
              ) -> Callable[[], Any]:
    """One call of the layer at widths ``(n_in, n_out)`` for ``target``: a closure that runs it once."""
    train = target == "train"
    if kind.layer is not None:
        L = kind.layer
        mod: nn.Module = WeightLayer(L.kind, n_in, n_out, kernel=L.kernel, stride=L.stride, out_size=L.out_size,
                                     bias=L.bias, bn=L.bn, act=nn.ReLU() if L.act else None)
        x = torch.randn((batch, n_in, *_in_size(L)), device=device)
        mod.to(device).train(train)
        xs = [x.requires_grad_(train and not kind.in_fixed)]
        fn: Callable[..., torch.Tensor] = mod
    else:
        assert kind.block is not None
        shape = (batch, n_out, *kind.block.out_size)
        xs = [torch.randn(shape, device=device).requires_grad_(train)]
        if kind.op == "add":
            xs.append(torch.randn(shape, device=device).requires_grad_(train))
            fn = torch.add
        else:
            fn = torch.relu
        mod = nn.Module()
    params = list(mod.parameters())

    if train:
        def step() -> Any:
            for p in params:
                p.grad = None
            for t in xs:
                t.grad = None
            fn(*xs).sum().backward()
    else:
        def step() -> Any:
            with torch.no_grad():
                return fn(*xs)
    return step


def _clock(device: torch.device) -> tuple[str, Callable[[], float]]:
    """The thread's CPU time on a CPU with one torch thread (module doc), else the wall clock."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return "thread_time", time.thread_time
    return "perf_counter", time.perf_counter


def _time_points(fns: list[Callable[[], Any]], rounds: int, iters: int | None, device: torch.device) -> list[float]:
    """Seconds per call of each closure: min over ``rounds`` (points interleaved) of the mean of a repetition.

    A repetition is ``iters`` calls, or (``None``) as many as take about :data:`REP_SECONDS` (at most 50).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = _clock(device)[1]
    best = [float("inf")] * len(fns)
    reps = []
    for fn in fns:  # warm-up (allocator, kernels, autograd graph), then size the repetition
        fn()
        sync()
        t0 = clock()
        fn()
        sync()
        one = clock() - t0
        reps.append(iters if iters is not None else max(1, min(50, round(REP_SECONDS / max(one, 1e-7)))))
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            sync()
            t0 = clock()
            for _ in range(reps[i]):
                fn()
            sync()
            best[i] = min(best[i], (clock() - t0) / reps[i])
    return best


def calibrate(
    spec: NetworkSpec,
    *,
    device: str = "cpu",
    batch: int = 128,
    threads: int = 1,
    quick: bool = False,
    rounds: int | None = None,
    iters: int | None = None,
    log: Callable[[str], None] = lambda s: None,
    model_label: str = "",
) -> LatencyModel:
    """Measure and fit every layer kind of ``spec`` (module doc); returns the :class:`LatencyModel`."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    old_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    rounds = rounds if rounds is not None else (2 if quick else 5)
    started = time.perf_counter()
    entries: dict[str, dict[str, Fit]] = {}
    clock_name = _clock(dev)[0]
    try:
        for kind in kinds_of(spec):
            pts = _points(kind, quick)
            entries[kind.key] = {}
            for target in ("train", "inference"):
                torch.manual_seed(0)
                fns = [_bench_fn(kind, i, o, target, batch, dev) for i, o, _ in pts]
                ts = _time_points(fns, rounds, iters, dev)
                f = fit_affine([p[0] for p in pts], [p[1] for p in pts], ts, [p[2] for p in pts],
                               elementwise=kind.layer is None)
                entries[kind.key][target] = f
                log(f"{kind.key:<44} {target:<9} a={f.coef[0] * 1e6:8.1f}us b={f.coef[1] * 1e9:8.2f}ns "
                    f"c={f.coef[2] * 1e9:8.1f}ns d={f.coef[3] * 1e9:8.1f}ns  held-out rel RMSE "
                    f"{f.heldout_rel_rmse:.3f} (max {f.heldout_max_rel:.3f}, {f.n_heldout} pts)")
    finally:
        torch.set_num_threads(old_threads)
    meta = {
        "model": model_label or spec.name,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor()
                                                                                     or platform.machine()),
        "torch": torch.__version__,
        "threads": threads if threads > 0 else old_threads,
        "clock": clock_name,
        "batch": batch,
        "quick": quick,
        "rounds": rounds,
        "iters": iters if iters is not None else f"adaptive (~{REP_SECONDS * 1e3:g} ms per repetition)",
        "unit": "seconds per call (one layer, one batch)",
        "features": "t = a + b*n_in*n_out + c*n_out + d*n_in",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "calibration_seconds": round(time.perf_counter() - started, 1),
    }
    return LatencyModel(entries, meta)


__all__ = ["FIT_FRACTIONS", "HELDOUT_FRACTIONS", "calibrate", "kinds_of"]
