"""Data-parallel runs under ``torchrun``: the process group, rank-0 decisions, lock-step pruning.

``torchrun --standalone --nproc_per_node=N -m pruning train ...`` starts ``N`` processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; :func:`init_distributed` reads
them and joins the process group (NCCL on CUDA, gloo on CPU); without them (``python -m pruning``)
the run is one process and nothing here does anything.  What a data-parallel run of Algorithm 1
needs beyond torch's ``DistributedDataParallel``:

* **the wrapper** — :func:`wrap_ddp` puts DDP around the unwrapped network (the trainer keeps the
  network itself for everything else: spec, gates, compaction, checkpoints).  Every parameter
  receives a gradient in every step (``∇W`` through the sampled network and the weight prior,
  ``∇Θ`` through the straight-through node and ``C(Θ)``; a gate sampled 0 multiplies, it does not
  cut the graph), so ``find_unused_parameters`` stays off.  After every compaction the parameters
  are new tensors and the wrapper is rebuilt around them (the old one's hooks removed first).
* **lock-step pruning** — the ε-rule is a function of ``θ`` alone, and ``θ`` is the same on
  every process (averaged gradients, the same Adam state).  :func:`agree` makes sure of it before
  each prune: rank 0's decision (``θ`` and the ``θ < ε`` mask) is broadcast, every process compares
  its own bit for bit, and any difference raises :class:`RankDisagreement` on *every* process (a
  hard error, never a silent divergence).  :func:`check_in_sync` compares digests of all
  parameters (``train.sync_check_every``).
* **reductions** — :meth:`DistContext.all_reduce_sum` for metrics, :meth:`DistContext.average`
  for gradient estimates computed outside autograd, :func:`sync_buffers` (rank 0's BatchNorm
  running statistics, before an evaluation).
* **failures** — a process that dies breaks the others' next collective: gloo reports it at once,
  NCCL after the process-group timeout (``train.dist_timeout_s``), ``torchrun`` stops the
  survivors as soon as it sees the failure.  :func:`is_comm_failure` recognises the error so that
  the trainer reports it as :class:`PeerLost` (one clear line; no checkpoint is written from a
  half-done step, so the last checkpoint stays intact).

Only rank 0 writes files (:attr:`DistContext.is_writer`); control messages (stop flags, agreement
flags, digests) travel through a CPU (gloo) group so that they never wait for a GPU stream.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .runtime import resolve_device


class DistributedError(RuntimeError):
    """A data-parallel run cannot go on; the message says which process, where, and what to do."""


class RankDisagreement(DistributedError):
    """The processes hold different values where they must agree bit for bit (raised on every process)."""


class PeerLost(DistributedError):
    """Another process of the run died or stopped answering."""


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment ``torchrun`` sets (``(0, 1, 0)`` without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
    return rank, max(world, 1), local


def restart_count() -> int:
    """How often ``torchrun`` restarted this job (``--max-restarts``); 0 on the first attempt or without torchrun."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


@dataclass
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size`` (one process: ``0`` of ``1``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    control: Any = None  # the gloo group for control messages (None: the default group)
    owns_group: bool = False

    @property
    def active(self) -> bool:
        """More than one process: collectives are real."""
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints, report and export."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of ``train.device`` for this process: ``cuda:LOCAL_RANK`` in a data-parallel CUDA run."""
        dev = resolve_device(name)
        if dev.type == "cuda" and self.active:
            dev = torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(dev)
        return dev

    # -- collectives (no-ops for one process) ----------------------------------------------------
    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the processes, in place (returned for convenience)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def average(self, tensors: list[Tensor]) -> None:
        """Each tensor replaced by its mean over the processes (one flat all-reduce)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def any_flag(self, value: int) -> int:
        """The largest ``value`` over the processes (a stop request, an error flag), through the CPU group."""
        if not self.active:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def all_true(self, flags: Tensor) -> Tensor:
        """Element-wise AND of a bool vector over the processes, through the CPU group (e.g. the guard's flags)."""
        if not self.active:
            return flags
        t = flags.detach().to("cpu", torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return t.bool()

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank (pickled through the CPU group)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def gather_rows(self, t: Tensor) -> Tensor:
        """``t`` (1-D, float64) of every process stacked by rank: shape ``(world_size, len(t))`` on the CPU."""
        t = t.detach().to("cpu", torch.float64).reshape(-1)
        if not self.active:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.control)
        return torch.stack(out)

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.control)

    def close(self) -> None:
        """Leave the process group if this context joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group ``torchrun`` set up (NCCL for CUDA, gloo for CPU); one process: a no-op context.

    ``timeout_s`` bounds every collective: a process that stops answering makes the others fail
    after at most that long (gloo notices a dead process at once).  An already initialised
    process group (a caller's own) is used as it is and left open.
    """
    rank, world, local = env_world()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
        timeout = timedelta(seconds=float(timeout_s))
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        owns = True
    backend = str(dist.get_backend())
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise DistributedError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
            f"RANK={rank}, WORLD_SIZE={world}"
        )
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, backend, control, owns)


def _attempt_store(timeout: timedelta) -> Any:
    """``torchrun``'s key-value store seen through a prefix of this attempt (``None``: let ``env://`` build one).

    ``torchrun`` keeps one store across ``--max-restarts`` attempts; the process-group keys of an
    attempt whose processes died without leaving the group stay in it, and the next attempt's
    processes would read the dead ones' addresses.  A prefix per attempt gives every attempt its
    own keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"pruning/attempt{restart_count()}", base)


# --------------------------------------------------------------------------------------------------
# The DDP wrapper
# --------------------------------------------------------------------------------------------------

_DDP_PARAMS = set(inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters)


def wrap_ddp(
    model: nn.Module, ctx: DistContext, device: torch.device, *, previous: nn.Module | None = None,
    find_unused: bool = False,
) -> nn.Module:
    """What a training step runs ``forward`` through: ``model`` itself for one process, else DDP around it.

    Called again after every compaction (new parameter tensors); ``previous`` (the old wrapper)
    has its gradient hooks removed first, so that only the new wrapper reduces gradients.
    Building the wrapper checks that every process has the same parameter shapes and broadcasts
    rank 0's parameters and buffers.  Buffers are not re-broadcast before every forward
    (BatchNorm running statistics only matter in evaluation; :func:`sync_buffers` does it then).
    ``find_unused`` (``find_unused_parameters``, an extra graph traversal per step) is not needed
    here and exists for benchmarks/bench_ddp.py to measure.
    """
    if not ctx.active:
        return model
    ddp_cls = nn.parallel.DistributedDataParallel
    if isinstance(previous, ddp_cls):
        previous._remove_autograd_hooks()
    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused}
    if "forward_sync_buffers" in _DDP_PARAMS:
        kwargs["forward_sync_buffers"] = False
    else:  # torch < 2.13
        kwargs["broadcast_buffers"] = False
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index]
    return ddp_cls(model, **kwargs)


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Every buffer (BatchNorm running statistics, unit ids) set to rank 0's."""
    if not ctx.active:
        return
    for b in model.buffers():
        dist.broadcast(b, 0)


# --------------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------------


def _bits(t: Tensor) -> Tensor:
    """``t`` as raw integers of the same width (bitwise comparison: ``-0.0 != 0.0``, NaN == same NaN)."""
    t = t.detach().contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def agree(ctx: DistContext, values: Tensor, what: str) -> None:
    """Rank 0's ``values`` broadcast; every process compares its own bit for bit; any difference raises everywhere.

    Raises :class:`RankDisagreement` (naming ``what`` and the disagreeing ranks) on every process,
    so that none of them goes on alone into the next collective.
    """
    if not ctx.active:
        return
    ref = values.detach().clone()
    dist.broadcast(ref, 0)
    same = bool(torch.equal(_bits(ref), _bits(values)))
    verdicts = ctx.gather_objects(same)
    bad = [r for r, ok in enumerate(verdicts) if not ok]
    if bad:
        raise RankDisagreement(
            f"{what}: rank(s) {', '.join(map(str, bad))} of {ctx.world_size} differ from rank 0; the processes "
            f"no longer train the same network, stopping (this is a bug or a hardware fault; the last checkpoint "
            f"is intact)"
        )


def prune_decision(gates: Iterable[Tensor], eps: float) -> Tensor:
    """What the ε-rule decides on: every ``θ`` (flattened, float32) followed by its ``θ < ε`` mask."""
    thetas = [t.detach().reshape(-1).float() for t in gates]
    if not thetas:
        return torch.zeros(0)
    flat = torch.cat(thetas)
    return torch.cat([flat, (flat < eps).float()])


def state_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of names, shapes, dtypes and raw bytes of ``tensors`` (bit-identical ⇔ same digest)."""
    h = hashlib.sha256()
    for name, t in tensors:
        data = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def check_in_sync(ctx: DistContext, model: nn.Module, where: str) -> list[str]:
    """Digests of all parameters (``W`` and ``θ``) on every process; :class:`RankDisagreement` unless all equal."""
    digest = state_digest(model.named_parameters())
    digests = ctx.gather_objects(digest)
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RankDisagreement(
            f"{where}: the parameters of rank(s) {', '.join(map(str, bad))} differ from rank 0's "
            f"(sha256 {digests[0][:12]} vs {', '.join(digests[r][:12] for r in bad)}); stopping"
        )
    return digests


# --------------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------------

_COMM_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused", "broken pipe",
                 "timed out", "timeout", "process group", "processgroup", "socket", "peer")


def is_comm_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process is gone or hangs."""
    if isinstance(err, DistributedError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _COMM_MARKERS)


def first_line(err: BaseException, limit: int = 160) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


__all__ = [
    "DistContext",
    "DistributedError",
    "PeerLost",
    "RankDisagreement",
    "agree",
    "check_in_sync",
    "env_world",
    "first_line",
    "init_distributed",
    "is_comm_failure",
    "prune_decision",
    "restart_count",
    "state_digest",
    "sync_buffers",
    "under_torchrun",
    "wrap_ddp",
]
