"""Where a run executes: devices, seeds, the complete RNG state, mixed precision and batch placement.

Everything here is a pure function of its arguments or of the process's global RNG state, so that a
checkpoint can hold the RNG state (:func:`capture_rng`, ``weights_only``-loadable) and a resumed run
continues bit-for-bit on CPU (:func:`restore_rng`).
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when present, else CPU; ``"cuda"`` without a GPU falls back to CPU with a warning."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        import warnings

        warnings.warn("train.device = 'cuda' but no CUDA device is available; using the CPU", stacklevel=2)
    return torch.device("cpu")


def resolve_channels_last(setting: bool | str, device: torch.device, spec: Any) -> bool:
    """``train.channels_last``: ``True``/``False`` as given; ``"auto"`` by this rule.

    On the CPU, ``True`` when the network (``spec``, a :class:`theory.NetworkSpec`) has 2-D
    convolutions and no strided 1×1 convolution: there the channels-last layout measured faster for
    dense and compacted networks alike (``benchmarks/bench_channels_last.py``: ResNet-20 at 32×32,
    training steps, one thread).  ``False`` otherwise: 1-D convolutions and linear layers have no
    channels-last layout; on CUDA it has not been measured here (set ``true`` to use it there); and
    with torch 2.13 on the CPU the backward pass of a channels-last 1×1 convolution with stride 2
    corrupts the heap for some input widths (5 and 6 channels crash, 8, 12 and 16 do not), which
    compaction can produce in any projection shortcut (ResNet-18/50 layouts, spec files).
    """
    if setting == "auto":
        layers = _layers(spec)
        return (torch.device(device).type == "cpu" and any(layer.kind == "conv2d" for layer in layers)
                and not any(layer.kind == "conv2d" and layer.kernel == 1 and layer.stride > 1 for layer in layers))
    return bool(setting)


def _layers(spec: Any) -> list[Any]:
    """Every weight layer of a :class:`theory.NetworkSpec` (stem, paths, shortcuts, head)."""
    layers = list(spec.stem) + list(spec.head)
    for b in spec.blocks:
        layers += list(b.path) + ([b.shortcut_layer] if b.shortcut_layer is not None else [])
    return layers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global RNG is what third-party code uses
    torch.manual_seed(seed)


_STREAM_GATES = 3  # the data streams of pruning.data use 0, 1, 2


def gate_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the gate samples of iteration ``step`` on process ``rank``: a pure function of the three.

    Every process draws its own samples (the straight-through estimate of a data-parallel run
    averages ``world_size`` of them); a resumed run draws exactly what the interrupted one would
    have, without any saved RNG state.
    """
    from .data import derive_seed

    return derive_seed(seed, rank, step, _STREAM_GATES)


def capture_rng() -> dict[str, Any]:
    """Torch (CPU + CUDA), numpy and python RNG states as tensors/primitives (``weights_only`` loadable)."""
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_state[0]),
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))



def autocast_ctx(device: torch.device, enabled: bool) -> Any:
    """bf16 autocast on ``device`` when ``enabled`` (``train.amp_bf16``), else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool) -> Any:
    """A batch on ``device`` (non-blocking); 4-D inputs in ``channels_last`` memory format when asked."""
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


__all__ = ["autocast_ctx", "capture_rng", "gate_seed", "resolve_device", "restore_rng", "seed_everything", "to_device"]
