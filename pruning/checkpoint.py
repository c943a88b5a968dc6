"""Checkpoints: the complete state of a run in one file, written atomically, read back safely.

A checkpoint holds the model state *and* its structure (:func:`structure_of`: per block the alive
flag and the original ids of its surviving units), the optimiser states, the RNG states, the
progress counters and the log.  It also carries the network itself (:func:`network_record`: the
baseline :class:`theory.NetworkSpec` the model was built from, as primitives, and its activation),
so that any network — built-in, from a spec file or converted from the user's own module — is
rebuilt from the checkpoint alone (:func:`network_from_checkpoint`) and brought to the recorded
structure by the pruning rule itself (:func:`apply_structure`): ``resume``, ``evaluate`` and
``export`` need nothing but the checkpoint.

Every reader goes through :func:`load_checkpoint` (``train --resume``, ``evaluate``, ``export``,
:func:`pruning.train.load_run`): ``weights_only`` (a checkpoint never runs code), and a missing,
damaged or foreign file raises :class:`CheckpointError` naming the file and what is wrong with it.
:func:`save_checkpoint` refuses a state with NaN/Inf tensors (:mod:`pruning.guard`).
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from theory.atomic import atomic_write
from theory.spec import NetworkSpec

from .config import ConfigError, RunConfig, from_dict
from .guard import first_nonfinite, require_finite
from .models import GatedNetwork, from_spec

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
#: Keys every checkpoint of this toolkit holds (later versions may add keys, never remove these).
REQUIRED_KEYS = ("version", "config", "model", "structure", "optim_w", "param_names", "progress", "rng", "data")
#: Parts of a checkpoint that must hold finite tensors only.
FINITE_KEYS = ("model", "optim_w", "optim_theta")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or not a checkpoint of this toolkit (names the file)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint file where one was expected."""


def structure_of(model: GatedNetwork) -> dict[str, Any]:
    """The surviving structure as primitives: per block alive flag and the original ids of kept units."""
    blocks = []
    for block in model.blocks:
        units = []
        for g in block.unit_gates():
            units.append(None if g is None else [int(i) for i in g.unit_ids.tolist()])
        blocks.append({"name": block.name, "alive": bool(block.alive), "unit_ids": units})
    return {"blocks": blocks, "depth": model.spec().depth}


def apply_structure(model: GatedNetwork, structure: dict[str, Any], eps: float) -> None:
    """Bring a freshly built ``model`` to a recorded structure with the pruning rule itself.

    Gates of removed units and blocks are set to 0, all others to 1, and
    :func:`pruning.compaction.prune` removes exactly those structures (parameters
    are overwritten by the checkpoint's state afterwards).
    """
    from .compaction import prune

    if len(structure["blocks"]) != len(model.blocks):
        raise ValueError(
            f"checkpoint structure has {len(structure['blocks'])} blocks, the model {len(model.blocks)}"
        )
    with torch.no_grad():
        for block, rec in zip(model.blocks, structure["blocks"]):
            if not block.alive:
                continue
            units = block.unit_gates()
            if not rec["alive"]:
                if block.block_gate is not None:
                    block.block_gate.theta.fill_(0.0)
                for g in units:
                    if g is not None:
                        g.theta.fill_(0.0)
                continue
            for g, kept in zip(units, rec["unit_ids"]):
                if g is None or kept is None:
                    continue
                keep = torch.zeros_like(g.theta)
                keep[torch.as_tensor(kept, dtype=torch.long)] = 1.0
                g.theta.copy_(keep)
    prune(model, eps, [])


def network_record(baseline_spec: NetworkSpec, model: GatedNetwork) -> dict[str, Any]:
    """The checkpoint's ``network`` entry: the unpruned spec (``NetworkSpec.to_dict``) and the activation."""
    return {"spec": baseline_spec.to_dict(), "activation": str(getattr(model, "activation", "relu"))}


def network_from_checkpoint(ckpt: dict[str, Any], cfg: RunConfig, *, device: str | None = None) -> GatedNetwork:
    """The unpruned network of a checkpoint: from its ``network`` record, else (older files) from ``cfg``.

    Gates follow ``cfg.model`` (mode, estimator, θ_init); :func:`apply_structure` and the saved state
    then bring it to the trained network.
    """
    rec = ckpt.get("network")
    if rec is None:
        from .build import build_network

        return build_network(cfg, int(ckpt["data"]["num_classes"]), tuple(ckpt["data"]["input_shape"]), device=device)
    spec = NetworkSpec.from_dict(rec["spec"], source="checkpoint network.spec")
    m = cfg.model
    with torch.device(device) if device is not None else nullcontext():
        return from_spec(spec, mode=m.mode, estimator=m.estimator, theta_init=m.theta_init,
                         activation=str(rec.get("activation", "relu")))


def baseline_spec_of(ckpt: dict[str, Any], cfg: RunConfig) -> NetworkSpec:
    """The spec of the unpruned network of a checkpoint (what fPR/pPR are relative to)."""
    if ckpt.get("network") is not None:
        return NetworkSpec.from_dict(ckpt["network"]["spec"], source="checkpoint network.spec")
    return network_from_checkpoint(ckpt, cfg, device="meta").spec()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically (a reader sees the old file or the new one, never a mix).

    Raises :class:`pruning.guard.NonFiniteState` (and leaves ``path`` untouched) if the model or an
    optimiser state holds a NaN/Inf tensor.
    """
    path = Path(path)
    require_finite({k: state.get(k) for k in FINITE_KEYS}, f"the checkpoint {path}")
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=True)
    return path


def checkpoint_path(where: str | Path) -> Path:
    """The checkpoint file of a run folder (``where`` itself when it is not a folder)."""
    where = Path(where)
    return where / CHECKPOINT if where.is_dir() else where


def load_checkpoint(where: str | Path) -> dict[str, Any]:
    """The validated checkpoint of the run folder (or checkpoint file) ``where``; the one reader of checkpoints.

    ``weights_only``: a checkpoint never runs code.  Raises :class:`CheckpointError` naming the file
    when it is missing (:class:`CheckpointNotFoundError`), empty, truncated or overwritten, not a
    checkpoint of this toolkit (another pickle, missing keys, a newer version), holds an invalid
    configuration or NaN/Inf weights.
    """
    path = checkpoint_path(where)
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (a checkpoint is one file written by `python -m pruning train`)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the checkpoint is damaged (an empty file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols of foreign files
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(_load_failure(path, size, exc)) from None
    _validate(path, ckpt)
    return ckpt


def _load_failure(path: Path, size: int, exc: BaseException) -> str:
    """Why ``torch.load`` failed, in words that fit a damaged or foreign file (never: retry unsafely)."""
    if not zipfile.is_zipfile(path):
        return (f"{path}: damaged or not a checkpoint of this toolkit (not a readable torch archive: "
                f"truncated, overwritten or another kind of file; {size} bytes)")
    if isinstance(exc, pickle.UnpicklingError):
        return (f"{path}: not a checkpoint of this toolkit, or damaged: it holds objects a checkpoint never "
                "contains (it was not loaded, and none of its code ran)")
    return f"{path}: the checkpoint is damaged (the torch archive could not be read: {type(exc).__name__})"


def _validate(path: Path, ckpt: Any) -> None:
    """Structure, version, configuration and finiteness of a loaded checkpoint."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (it holds a {type(ckpt).__name__}, "
                              f"not a dict with the keys {', '.join(REQUIRED_KEYS)})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (missing keys: {', '.join(missing)})")
    version = ckpt["version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not one this toolkit reads "
                              f"(1..{CHECKPOINT_VERSION}); it was written by another version")
    if not isinstance(ckpt["model"], Mapping) or not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (its 'model' is not a state dict)")
    if not isinstance(ckpt["config"], Mapping):
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (its 'config' is not a table)")
    try:
        from_dict(ckpt["config"], source=f"in {path}")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: the checkpoint holds an invalid configuration:\n{exc}") from None
    bad = first_nonfinite({k: ckpt.get(k) for k in FINITE_KEYS})
    if bad is not None:
        raise CheckpointError(f"{path}: the checkpoint holds NaN/Inf values ({bad}); it was written by a run "
                              "that diverged and cannot be resumed, evaluated or exported")


def restore_model(model: GatedNetwork, ckpt: Mapping[str, Any], eps: float, path: str | Path) -> None:
    """:func:`apply_structure` + ``load_state_dict``; a checkpoint that does not fit raises :class:`CheckpointError`."""
    try:
        apply_structure(model, ckpt["structure"], eps)
        model.load_state_dict(ckpt["model"])
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{checkpoint_path(path)}: the checkpoint does not fit the network its "
                              f"configuration builds ({first[:300]})") from None


def epoch_sums_row(rows: list[list[float]], rank: int, world_size: int) -> list[float] | None:
    """This process's running sums of the epoch in progress, from a mid-epoch checkpoint's per-process rows.

    With the number of processes that wrote them each takes its own row (the run continues bit for
    bit); with another number rank 0 takes their sum and the others start from zero (the sums over
    all processes stay right).  ``None``: start from zero.
    """
    if not rows:
        return None
    if len(rows) == world_size:
        return [float(v) for v in rows[rank]]
    return [float(sum(col)) for col in zip(*rows)] if rank == 0 else None


def check_resume_config(saved: RunConfig, given: RunConfig) -> None:
    """A resumed run must use the configuration it started with (display-only train keys may differ)."""
    free = {"progress", "tensorboard", "log_every", "out_dir", "device", "checkpoint_every", "dist_timeout_s",
            "sync_check_every", "timing_steps"}
    a, b = saved.to_dict(), given.to_dict()
    a["train"] = {k: v for k, v in a["train"].items() if k not in free}
    b["train"] = {k: v for k, v in b["train"].items() if k not in free}
    if a != b:
        diffs = [f"{s}.{k}" for s in a for k in set(a[s]) | set(b[s]) if a[s].get(k) != b[s].get(k)]
        raise ValueError(f"--resume: the configuration differs from the checkpoint's in {', '.join(sorted(diffs))}")


__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "apply_structure",
    "baseline_spec_of",
    "check_resume_config",
    "checkpoint_path",
    "epoch_sums_row",
    "load_checkpoint",
    "network_from_checkpoint",
    "network_record",
    "restore_model",
    "save_checkpoint",
    "structure_of",
]
