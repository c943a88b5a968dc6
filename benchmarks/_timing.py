"""Shared helpers of the benchmarks: device/threads set-up, interleaved timing, ratio verdicts, JSON output.

Every benchmark compares variants *within one process*, interleaving them: in each round every
variant runs ``inner`` times back to back, the order of the variants alternates between rounds
(forward, then reversed), and the per-round times are kept.  Ratios are then computed both from
the medians of the per-variant times and as the median of the per-round (paired) ratios; the
paired ratio is the headline because consecutive measurements see the same machine load.  No
absolute time is ever a target: the machines these run on are shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, *, threads: int, repeats: int, warmup: int) -> None:
    """``--device``, ``--threads``, ``--repeats``, ``--warmup``, ``--seed``, ``--json``."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when available, else CPU (default: auto)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch CPU threads (torch.set_num_threads; default {threads}; 0 = leave torch's default)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"interleaved measurement rounds per variant (median taken; default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"untimed calls per variant first (default {warmup})")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON record (instead of the text report)")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device("cpu")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and ``--seed``; return the device of ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return resolve_device(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Facts that qualify every number: torch version, threads, CPU count, load average, GPU name."""
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            load = [float(v) for v in fh.read().split()[:3]]
    except OSError:
        load = []
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": load,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def env_line(env: Mapping[str, Any]) -> str:
    load = env.get("loadavg") or []
    gpu = f", {env['gpu']}" if "gpu" in env else ""
    return (f"torch {env['torch']}, device {env['device']}{gpu}, {env['threads']} thread(s), "
            f"{env['cpu_count']} CPUs, load average {' '.join(f'{v:.2f}' for v in load) or 'n/a'}")


# --------------------------------------------------------------------------------------------------
# Interleaved timing
# --------------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Per-round seconds per call of each variant: ``wall`` (perf_counter) and ``cpu`` (CPU time).

    ``cpu`` is the CPU time of the calling thread with one torch thread (``time.thread_time``),
    of the whole process otherwise (``time.process_time``, which then includes the intra-op
    threads' spinning); it is far less sensitive than wall time to being descheduled on a shared
    machine.  On CUDA only ``wall`` is meaningful (kernels run asynchronously).
    """

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    cpu_clock: str = ""


def interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    inner: int = 1,
    device: torch.device | None = None,
) -> Timings:
    """Seconds per call of each variant, one entry per round; the variants alternate within each round.

    Round ``r`` runs the variants in dictionary order when ``r`` is even and in reverse order when
    it is odd; each variant runs ``inner`` times back to back (their mean is the round's entry).
    ``warmup`` untimed calls of every variant come first.  On CUDA the device is synchronised
    around each timed batch of calls.
    """
    if repeats < 1 or inner < 1:
        raise ValueError(f"repeats and inner must be >= 1, got {repeats}, {inner}")
    dev = device if device is not None else torch.device("cpu")
    one_thread = torch.get_num_threads() == 1
    cpu_clock = time.thread_time if one_thread else time.process_time
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync(dev)
    out = Timings({n: [] for n in names}, {n: [] for n in names},
                  "thread_time" if one_thread else "process_time")
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = variants[name]
            sync(dev)
            c0, t0 = cpu_clock(), time.perf_counter()
            for _ in range(inner):
                fn()
            sync(dev)
            out.wall[name].append((time.perf_counter() - t0) / inner)
            out.cpu[name].append((cpu_clock() - c0) / inner)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """Lower and upper quartile (``nan`` for fewer than two values)."""
    if len(xs) < 2:
        return math.nan, math.nan
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """``num/den``: paired (median of per-round ratios, with quartiles) and ratio of medians."""
    paired = [a / b for a, b in zip(num, den) if b > 0]
    lo, hi = quartiles(paired)
    return {
        "paired_median": median(paired),
        "paired_q1": lo,
        "paired_q3": hi,
        "ratio_of_medians": median(num) / median(den) if median(den) > 0 else math.nan,
    }


def verdict(value: float, target: float, kind: str) -> str:
    """``"met"`` when ``value <= target`` (kind ``"<="``) or ``value >= target`` (kind ``">="``), else ``"MISSED"``."""
    if math.isnan(value):
        return "n/a"
    ok = value <= target if kind == "<=" else value >= target
    return "met" if ok else "MISSED"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def dump_json(record: Mapping[str, Any]) -> None:
    print(json.dumps(record, indent=1, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if torch.is_tensor(x):
        return x.tolist()
    if isinstance(x, torch.device):
        return str(x)
    return repr(x)


__all__ = [
    "add_common_args",
    "dump_json",
    "env_line",
    "environment",
    "fmt_ms",
    "interleaved",
    "median",
    "quartiles",
    "Timings",
    "ratio_stats",
    "resolve_device",
    "setup",
    "sync",
    "verdict",
]
