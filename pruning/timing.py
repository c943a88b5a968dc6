"""Measured time: what a run's training and its exported network cost in seconds on the run's own device.

The FLOPs-based ratios of the report count operations — ``Σ_k E[F](θ_k)|B_k|`` (the paper's Figure 4,
[9]) and the FLOPs of the network that actually executed — and say nothing about the clock: fixed
per-step costs (eager per-op overhead, gates and bookkeeping, BatchNorm, additions and padding on
the unpruned residual stream) and kernels that stop getting cheaper at small widths make a step cost
more than its FLOPs ratio.  This module measures, inside the run itself:

* **a dense reference step** — :class:`RunTimer` builds a plain copy of the baseline network
  (:func:`pruning.models.from_spec` with ``mode = "none"``: no gates, no complexity term, the
  objective of a baseline run) and times ``train.timing_steps`` of its training steps
  (:func:`pruning.step.algorithm1_step`, forward + backward + SGD step, learning rate 0) on the
  run's own mini-batches, interleaved with the first real steps after :data:`WARMUP_STEPS` warm-up
  steps (the order alternates: reference after the real step, then before the next one).  The
  reference is a separate network with its own optimiser; its construction and its steps run
  under :func:`torch.random.fork_rng`, so the trained network, its optimiser state and every RNG
  stream are untouched (a run with ``timing_steps = 0`` ends with the same parameters, bit for bit).
  It is measured again at every start and resume (the device may differ); in a data-parallel run
  every process builds and steps it at the same iteration, inside a DDP wrapper of its own.  While
  it is timed the device holds a second dense network with its optimiser state (freed afterwards);
  a run that fills the device's memory needs ``timing_steps = 0``;
* **a per-structure step-time record** — every real step is timed (``perf_counter`` on CPU; CUDA
  events on a GPU, read without stalling the stream except when a record is written); the steps of
  each structure (from one compaction, start or resume to the next) are summed, the first
  :data:`WARMUP_STEPS` of them separately (allocator, cuDNN autotuning and caches after a change of
  shapes), with the median of the steady ones;
* **the inference speed-up** — :func:`inference_speedup` times the exported network
  (:func:`pruning.export.export_deterministic`) against the dense baseline network exported the
  same way, interleaved, eval mode, one batch of ``train.eval_batch_size`` inputs.

What the report calls what (:func:`summary`, :func:`markdown_lines`):

* *measured training-time ratio (wall clock)* — the time of all real steps (warm-up included) over
  (number of steps × the median dense reference step of the same start/resume);
* *steady-state training-time ratio* — the same with each structure's median steady step time;
* *CPU-time training-time ratio* (CPU runs) — the same ratio in CPU time (``time.thread_time`` with
  one torch thread): on a shared machine it leaves out the time the process waited for a core,
  which wall-clock ratios against a reference measured once at the start cannot;
* *whole-loop wall clock per step / dense reference step* — the training wall clock (data loading,
  ε-rule, compaction, audit and mid-epoch checkpoints included) per step over the reference step;
* *gate overhead at start* — median of the paired ratios (gated dense step / plain dense step)
  over the reference steps; empty when a compaction came before the last paired step.

The ε-rule, logging and checkpoints are outside the timed step; the end-of-epoch evaluation is
outside the training wall clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from theory.complexity import ComplexityModel

#: Steps after every start, resume and compaction that the steady-state record leaves out.
WARMUP_STEPS = 2
#: Steady step times kept per structure for its median (the sums count every step).
SAMPLE_CAP = 4096


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


@contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Every torch RNG (CPU and ``device``) as it was before the block."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class _Clock:
    """Spans of device time: ``perf_counter`` on CPU, CUDA events on a GPU (read later, without a sync).

    On CPU a mark also reads the CPU time (``time.thread_time`` with one torch thread, else
    ``time.process_time``), which does not count the time the process waits for a core.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return (time.perf_counter(), self.cpu_clock())

    def cpu_seconds(self, start: Any, end: Any) -> float | None:
        """The CPU time of the span (``None`` on a GPU, where it would not measure the device)."""
        return None if self.cuda else float(end[1] - start[1])

    def seconds(self, start: Any, end: Any, *, wait: bool = True) -> float | None:
        """The span ``start → end`` in seconds; ``None`` when ``wait`` is false and the GPU is not there yet."""
        if not self.cuda:
            return float(end[0] - start[0])
        if not end.query():
            if not wait:
                return None
            end.synchronize()
        return float(start.elapsed_time(end)) / 1e3


def _new_segment(step: int, session: int, flops_ratio: float) -> dict[str, Any]:
    return {"start_step": step, "session": session, "flops_ratio": flops_ratio, "steps": 0,
            "warmup_steps": 0, "warmup_s": 0.0, "steady_steps": 0, "steady_s": 0.0, "samples": []}


class RunTimer:
    """Times a run's steps and a dense reference (see the module doc); ``state`` goes into checkpoints.

    ``enabled`` is ``train.timing_steps > 0``.  Hooks, in :meth:`pruning.train.Trainer.train_epoch`:
    :meth:`before_step` and :meth:`after_step` around every iteration (same batch), and
    :meth:`structure_changed` after every compaction.
    """

    def __init__(self, trainer: Any, state: dict[str, Any] | None = None) -> None:
        self.tr = trainer
        t = trainer.cfg.train
        self.steps = int(t.timing_steps)
        self.enabled = self.steps > 0
        self.clock = _Clock(trainer.device)
        base = ComplexityModel(trainer.baseline_spec, elementwise=False)
        self._F_tot = float(base.flops())
        st = dict(state or {})
        self.segments: list[dict[str, Any]] = [dict(s) for s in st.get("segments", [])]
        self.references: list[dict[str, Any]] = [dict(r) for r in st.get("references", [])]
        self.session = int(st.get("sessions", 0))  # this start's index: 0, then one more per resume
        self.local_steps = 0  # steps of this session
        self._pending: list[tuple[Any, Any, bool]] = []  # (start, end, warm-up?) not yet read (CUDA)
        self._t0: Any = None
        self._ref: dict[str, Any] | None = None  # the reference network while it is being timed
        self._pairs: dict[int, dict[str, Any]] = {}  # timed pair j: spans of the real and the reference step
        if self.enabled:
            self._open(trainer.progress.global_step)

    # -- the per-structure record --------------------------------------------------------------
    def _flops_ratio(self) -> float:
        return float(ComplexityModel(self.tr.spec, elementwise=False).flops()) / self._F_tot

    def _open(self, step: int) -> None:
        self._cur = _new_segment(step, self.session, self._flops_ratio())
        self._since_open = 0

    def _settle(self, wait: bool) -> None:
        """Read the finished spans into the current segment (all of them with ``wait``)."""
        keep = []
        for i, (a, b, warm) in enumerate(self._pending):
            s = self.clock.seconds(a, b, wait=wait)
            if s is None:
                keep = self._pending[i:]
                break
            self._add(s, warm, self.clock.cpu_seconds(a, b))
        self._pending = keep

    def _add(self, s: float, warm: bool, cpu: float | None) -> None:
        c = self._cur
        if cpu is not None:
            c["cpu_s"] = c.get("cpu_s", 0.0) + cpu
        if warm:
            c["warmup_steps"] += 1
            c["warmup_s"] += s
        else:
            c["steady_steps"] += 1
            c["steady_s"] += s
            if len(c["samples"]) < SAMPLE_CAP:
                c["samples"].append(s)

    def _close(self) -> None:
        self._settle(wait=True)
        c = self._cur
        if c["steps"]:
            self.segments.append(_closed(c))

    def structure_changed(self, step: int) -> None:
        """After a compaction: a new structure starts (its first steps are warm-up again)."""
        if not self.enabled:
            return
        self._close()
        self._open(step)

    # -- hooks around every step -----------------------------------------------------------------
    def _pair_index(self) -> int | None:
        """Which reference step belongs to this session step (``0`` = untimed warm-up), else ``None``."""
        j = self.local_steps - WARMUP_STEPS
        return j if 0 <= j <= self.steps else None

    def before_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.enabled:
            return
        j = self._pair_index()
        if j is not None and j % 2 == 1:
            self._reference_step(x, y, j)
        self._t0 = self.clock.mark()

    def after_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.enabled:
            return
        end = self.clock.mark()
        warm = self._since_open < WARMUP_STEPS
        self._pending.append((self._t0, end, warm))
        j = self._pair_index()
        if j is not None and j > 0:
            self._pairs.setdefault(j, {}).update(real=(self._t0, end), flops_ratio=self._cur["flops_ratio"])
        self._cur["steps"] += 1
        self._since_open += 1
        self.local_steps += 1
        if j is not None and j % 2 == 0:
            self._reference_step(x, y, j)
        if j == self.steps:
            self._finish_reference()
        if len(self._pending) >= 64:
            self._settle(wait=False)

    # -- the dense reference ----------------------------------------------------------------------
    def _build_reference(self) -> dict[str, Any]:
        from .distributed import wrap_ddp
        from .models import from_spec
        from .objective import Objective
        from .optim import make_optimizers

        tr = self.tr
        cfg, spec = tr.cfg, tr.baseline_spec
        net = from_spec(spec, mode="none", estimator=cfg.model.estimator, theta_init=1.0,
                        activation=tr.model.activation).to(tr.device)
        if tr.channels_last:  # the run's resolved memory format (pruning.runtime.resolve_channels_last)
            net.to(memory_format=torch.channels_last)
        net.train()
        o = cfg.objective
        objective = Objective(spec, N=tr.N, gamma=o.gamma, rho=o.rho, delta=o.delta, lam=o.lambda_, mode="none",
                              elementwise=o.elementwise, loss=tr.objective.loss)
        opt_w, _ = make_optimizers(cfg, net.weight_parameters(), [])
        for g in opt_w.param_groups:
            g["lr"] = 0.0  # the same kernels, no drift: the reference never diverges
        return {"net": net, "objective": objective, "opt": opt_w, "spec": spec,
                "forward": wrap_ddp(net, tr.dist, tr.device)}

    def _reference_step(self, x: torch.Tensor, y: torch.Tensor, j: int) -> None:
        """One step of the dense reference on this batch; pair ``j`` (``0``: warm-up, not timed)."""
        from .step import algorithm1_step

        with _own_rng(self.tr.device):
            if self._ref is None:
                self._ref = self._build_reference()
            r = self._ref
            a = self.clock.mark()
            algorithm1_step(r["net"], r["objective"], x, y, r["opt"], None, spec=r["spec"],
                            amp=self.tr.cfg.train.amp_bf16, forward=r["forward"])
            b = self.clock.mark()
        if j > 0:
            self._pairs.setdefault(j, {})["ref"] = (a, b)

    def _finish_reference(self) -> None:
        pairs = []
        cpu_ref = []
        ratios = []  # FLOPs ratio of the structure each paired real step ran (< 1: compacted in the window)
        for p in self._pairs.values():
            if "real" in p and "ref" in p:
                real, ref = self.clock.seconds(*p["real"]), self.clock.seconds(*p["ref"])
                if real is not None and ref is not None:
                    pairs.append((real, ref))
                    ratios.append(p["flops_ratio"])
                    cpu = self.clock.cpu_seconds(*p["ref"])
                    if cpu is not None:
                        cpu_ref.append(cpu)
        self._pairs = {}
        self._ref = None  # free the reference network and its optimiser state
        if not pairs:
            return
        real_s = [p[0] for p in pairs]
        ref_s = [p[1] for p in pairs]
        self.references.append({
            "session": self.session,
            "step": int(self.tr.progress.global_step),
            "steps": len(pairs),
            "reference_step_s": _median(ref_s),
            "reference_cpu_s": _median(cpu_ref),
            "gated_step_s": _median(real_s),
            "gated_flops_ratio": min(ratios),
            # gated / plain step of the same dense network: only when nothing was compacted yet
            "gate_overhead": _median([a / b for a, b in pairs if b > 0]) if min(ratios) == 1.0 else None,
        })

    # -- records -----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (primitives only): closed structures, references, the open structure."""
        if not self.enabled:
            return {}
        self._settle(wait=True)
        segs = list(self.segments)
        if self._cur["steps"]:
            segs.append(_closed(self._cur))
        return {"segments": segs, "references": list(self.references), "sessions": self.session + 1}

    def summary(self, train_time_s: float | None = None) -> dict[str, Any] | None:
        """The timing record of the report (``None`` with ``timing_steps = 0``); see :func:`summarize`."""
        if not self.enabled:
            return None
        if self._pairs:  # the run ended inside the reference window: keep what was measured
            self._finish_reference()
        return summarize(self.state(), train_time_s=train_time_s, steps=int(self.tr.progress.global_step),
                         device=str(self.tr.device), timing_steps=self.steps)


def _closed(c: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in c.items() if k != "samples"}
    out["steady_median_s"] = _median(c["samples"])
    return out


def summarize(state: dict[str, Any], *, train_time_s: float | None, steps: int, device: str,
              timing_steps: int) -> dict[str, Any]:
    """The ratios of the report from a :meth:`RunTimer.state` (module doc: what each one means)."""
    refs = {r["session"]: r for r in state.get("references", []) if r.get("reference_step_s")}
    segs = state.get("segments", [])
    total = steady = dense = cpu = cpu_dense = 0.0
    counted = 0
    rows = []
    for s in segs:
        ref = refs.get(s["session"])
        ref_s = ref["reference_step_s"] if ref else None
        med = s.get("steady_median_s")
        per = med if med is not None else (s["warmup_s"] / s["warmup_steps"] if s["warmup_steps"] else None)
        rows.append({
            "start_step": s["start_step"], "steps": s["steps"], "flops_ratio": s["flops_ratio"],
            "steady_median_s": med, "step_time_ratio": (med / ref_s) if (med is not None and ref_s) else None,
            "warmup_s": s["warmup_s"], "session": s["session"],
        })
        if ref_s and per is not None:
            total += s["warmup_s"] + s["steady_s"]
            steady += s["steps"] * per
            dense += s["steps"] * ref_s
            counted += s["steps"]
            if ref.get("reference_cpu_s") and s.get("cpu_s") is not None:
                cpu += s["cpu_s"]
                cpu_dense += s["steps"] * ref["reference_cpu_s"]
    first = min(refs.values(), key=lambda r: r["session"]) if refs else None
    ref0 = first["reference_step_s"] if first else None
    return {
        "device": device,
        "timing_steps": timing_steps,
        "warmup_steps": WARMUP_STEPS,
        "dense_reference_step_s": ref0,
        "gated_step_s": first["gated_step_s"] if first else None,
        "gated_flops_ratio": first.get("gated_flops_ratio") if first else None,
        "gate_overhead_at_start": first["gate_overhead"] if first else None,
        "measured_train_time_ratio": total / dense if dense else None,
        "steady_train_time_ratio": steady / dense if dense else None,
        "cpu_train_time_ratio": cpu / cpu_dense if cpu_dense else None,
        "steps_counted": counted,
        "steps": steps,
        "loop_wall_clock_per_step_ratio": (
            train_time_s / steps / ref0 if (train_time_s and steps and ref0) else None),
        "references": list(state.get("references", [])),
        "structures": rows,
    }


# --------------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------------


def inference_speedup(trainer: Any, rounds: int) -> dict[str, Any] | None:
    """Exported (pruned) network vs the dense baseline exported the same way: interleaved forward passes.

    One batch of ``train.eval_batch_size`` random inputs of the data's shape (a generator of its
    own), eval mode, ``torch.inference_mode``, bf16 autocast and ``channels_last`` as the run;
    one untimed pass of each, then ``rounds`` rounds alternating the order.  ``speedup`` is the
    median of the per-round ratios dense / pruned.
    """
    if rounds < 1:
        return None
    from .export import export_deterministic
    from .models import from_spec
    from .runtime import autocast_ctx

    tr = trainer
    cfg, dev = tr.cfg, tr.device
    clock = _Clock(dev)
    with _own_rng(dev):
        dense_gated = from_spec(tr.baseline_spec, mode=cfg.model.mode, estimator=cfg.model.estimator,
                                theta_init=1.0, activation=tr.model.activation)
        nets = {"dense": export_deterministic(dense_gated).to(dev), "pruned": export_deterministic(tr.model).to(dev)}
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.eval_batch_size, *tr.data.input_shape)
    x = torch.randn(shape, generator=gen).to(dev)
    if tr.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        for n in nets.values():
            n.to(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.inference_mode(), autocast_ctx(dev, cfg.train.amp_bf16):
        for n in nets.values():
            n(x)
        for r in range(rounds):
            for name in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
                a = clock.mark()
                nets[name](x)
                b = clock.mark()
                s = clock.seconds(a, b)
                assert s is not None
                times[name].append(s)
    ratios = [d / p for d, p in zip(times["dense"], times["pruned"]) if p > 0]
    return {"batch": shape[0], "rounds": rounds, "device": str(dev),
            "dense_s": _median(times["dense"]), "pruned_s": _median(times["pruned"]),
            "speedup": _median(ratios)}


# --------------------------------------------------------------------------------------------------
# report text
# --------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _ms(x: Any) -> str:
    return "–" if x is None else f"{1e3 * x:.2f} ms"


def markdown_lines(timing: dict[str, Any] | None, inference: dict[str, Any] | None) -> list[str]:
    """The report's "Time" section: which number is which, and the per-structure record."""
    if timing is None and inference is None:
        return []
    out = ["## Time (measured in this run)", ""]
    if timing is not None:
        out += [
            f"Dense reference: a plain copy of the baseline network (no gates), "
            f"{timing['timing_steps']} training steps on the run's own batches, interleaved with the first real "
            f"steps after {timing['warmup_steps']} warm-up steps, on {timing['device']}: "
            f"{_ms(timing['dense_reference_step_s'])} per step; the run's own steps then "
            f"{_ms(timing['gated_step_s'])} (FLOPs ratio {_f(timing['gated_flops_ratio'])}; gate overhead at start, "
            f"gated / plain dense step: {_f(timing['gate_overhead_at_start'])}"
            + (", – as the network was already compacted)." if timing["gate_overhead_at_start"] is None else ")."),
            "",
            "| measure | value |",
            "|---|---|",
            f"| measured training-time ratio (wall clock, all steps / steps × dense reference step) | "
            f"{_f(timing['measured_train_time_ratio'])} |",
            f"| steady-state training-time ratio (per-structure median step) | "
            f"{_f(timing['steady_train_time_ratio'])} |",
            f"| CPU-time training-time ratio (CPU runs: not counting waits for a core) | "
            f"{_f(timing['cpu_train_time_ratio'])} |",
            f"| whole-loop wall clock per step / dense reference step (data, ε-rule, checkpoints included) | "
            f"{_f(timing['loop_wall_clock_per_step_ratio'])} |",
            "",
            "| structure from step | steps | FLOPs ratio | median step | step / dense reference |",
            "|---|---|---|---|---|",
        ]
        for r in timing["structures"]:
            out.append(f"| {r['start_step']} | {r['steps']} | {_f(r['flops_ratio'])} | {_ms(r['steady_median_s'])} "
                       f"| {_f(r['step_time_ratio'])} |")
        out.append("")
    if inference is not None:
        out += [f"Inference speed-up (measured): {_f(inference['speedup'], '.2f')}× — exported network "
                f"{_ms(inference['pruned_s'])} vs dense baseline {_ms(inference['dense_s'])} per batch of "
                f"{inference['batch']} on {inference['device']} ({inference['rounds']} interleaved rounds).", ""]
    return out


__all__ = ["SAMPLE_CAP", "WARMUP_STEPS", "RunTimer", "inference_speedup", "markdown_lines", "summarize"]
