"""The final deterministic network (THEORY §5, last paragraph).

:func:`export_deterministic` turns a (compacted) gated network into a plain
torch module without gate modules, with the surviving ``θ`` folded into the
adjacent weights:

* a unit gate ``θ_1`` on the output of layer ``j`` multiplies that layer's
  (post-activation) output channels, which only feed the linear operation of
  layer ``j + 1``: fold it into the *input* channels of that weight
  (``W_{j+1}[:, i] ← θ_i W_{j+1}[:, i]``);
* a block gate ``θ_B`` multiplies the whole branch: fold it into the affine
  pair of the last BatchNorm of the path (eval-mode BN is affine, so scaling
  ``γ`` and ``β`` scales its output), or into ``W_2`` (and its bias) when the
  last layer has no BatchNorm;
* output gates ``θ_2`` (residual MLP only) act on a feature that also flows
  through the identity skip, so no weight can absorb them; they become a
  constant per-feature scale (:class:`ChannelScale`, a buffer, no parameter).

The result equals the mean-field model (eval mode, every ``ξ`` replaced by
``θ``) up to float rounding (tested).  :func:`save_export` writes its state
dict, its spec, a ``torch.export`` program and ``metadata.json`` — input shape,
class names and the preprocessing of the inputs (mean/std), so a deployed
network needs nothing else (:func:`load_export`, :func:`load_metadata`) — and,
on request, an ONNX graph (:func:`save_onnx`, when the ``onnx`` extra is
installed), each atomically.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from theory.atomic import atomic_path, atomic_write_text
from theory.spec import NetworkSpec

from .data import Preprocess
from .models import GatedNetwork, ResidualBlock, WeightLayer

METADATA = "metadata.json"
METADATA_FORMAT = 1


@dataclass(frozen=True)
class ExportMetadata:
    """What a deployed network needs besides its weights: the input it takes and the classes it outputs.

    ``preprocess`` turns raw inputs into the network's inputs (:meth:`prepare`; ``None``: not recorded —
    the network was exported without its data); ``classes[i]`` names output ``i``.

    >>> program, meta = load_export("runs/x/export")                              # doctest: +SKIP
    >>> logits = program(meta.prepare(raw_batch))                                 # doctest: +SKIP
    >>> [meta.classes[i] for i in logits.argmax(1)]                               # doctest: +SKIP
    """

    input_shape: tuple[int, ...]
    num_classes: int
    classes: tuple[str, ...] = ()
    preprocess: Preprocess | None = None
    dataset: str = ""

    def prepare(self, raw: Tensor) -> Tensor:
        """A batch of raw inputs (B, *input_shape) -> the network's float32 inputs."""
        x = torch.as_tensor(raw)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected a batch of inputs shaped (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return x.to(torch.float32) if self.preprocess is None else self.preprocess.apply(x)

    def to_dict(self) -> dict[str, Any]:
        return {"format": METADATA_FORMAT, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "classes": list(self.classes), "dataset": self.dataset,
                "preprocess": None if self.preprocess is None else self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, record: Any, source: str = "metadata") -> ExportMetadata:
        """Parse a ``metadata.json`` record; ``ValueError`` naming ``source`` and the bad field."""
        if not isinstance(record, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
        try:
            shape = tuple(int(n) for n in record["input_shape"])
            k = int(record["num_classes"])
            classes = tuple(str(c) for c in record.get("classes") or ())
            pre = record.get("preprocess")
            preprocess = None if pre is None else Preprocess.from_dict(pre)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: malformed export metadata ({type(exc).__name__}: {exc})") from None
        if classes and len(classes) != k:
            raise ValueError(f"{source}: {len(classes)} class names for num_classes = {k}")
        return cls(shape, k, classes, preprocess, str(record.get("dataset", "")))


def export_metadata(module: nn.Module, data: dict[str, Any] | None = None) -> ExportMetadata:
    """The metadata of an exported ``module`` (its ``input_shape``/``num_classes``) with the data record of a
    checkpoint (:func:`pruning.build.data_record`: class names, preprocessing), when there is one."""
    shape = getattr(module, "input_shape", None)
    k = getattr(module, "num_classes", None)
    if shape is None or k is None:
        raise ValueError("export metadata needs a module with input_shape and num_classes (a gated network's export)")
    data = data or {}
    classes = tuple(str(c) for c in data.get("classes") or ())
    pre = data.get("preprocess")
    return ExportMetadata(tuple(int(n) for n in shape), int(k), classes if len(classes) == int(k) else (),
                          None if pre is None else Preprocess.from_dict(pre), str(data.get("name", "")))


def load_metadata(export_dir: str | os.PathLike[str]) -> ExportMetadata:
    """The :class:`ExportMetadata` of an export folder (its ``metadata.json``); errors name the file."""
    path = Path(export_dir) / METADATA
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no export metadata (exports written before it existed have none; "
                                f"export the run again: python -m pruning export --run RUN)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable export metadata ({exc})") from None
    return ExportMetadata.from_dict(record, str(path))


def load_export(export_dir: str | os.PathLike[str]) -> tuple[nn.Module, ExportMetadata]:
    """The exported network (the ``torch.export`` program ``model.pt2`` as a module) and its metadata.

    >>> net, meta = load_export("runs/x/export")                                  # doctest: +SKIP
    >>> net(meta.prepare(raw)).argmax(1)                                          # doctest: +SKIP
    """
    program = torch.export.load(Path(export_dir) / "model.pt2").module()
    return program, load_metadata(export_dir)


class ChannelScale(nn.Module):
    """``z ↦ s ⊙ z`` along axis 1 with a constant (buffer) ``s``: a folded output gate ``θ_2``."""

    scale: Tensor

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, z: Tensor) -> Tensor:
        return z * self.scale.reshape((1, -1) + (1,) * (z.dim() - 2))


class DeterministicNetwork(nn.Module):
    """``stem -> blocks -> head`` of a gated network with every gate folded away (eval mode)."""

    def __init__(self, model: GatedNetwork) -> None:
        super().__init__()
        self.name, self.input_shape, self.num_classes = model.name, model.input_shape, model.num_classes
        self.meta = model.meta
        self.activation = model.activation
        self.stem, self.stem_pool = model.stem, model.stem_pool
        self.blocks, self.head = model.blocks, model.head

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.stem:
            x = layer(x)
        z = self.stem_pool(x)
        for block in self.blocks:
            z = block(z)
        if z.dim() > 2:
            z = z.flatten(2).mean(-1)
        for layer in self.head:
            z = layer(z)
        return z

    def spec(self) -> NetworkSpec:
        return NetworkSpec(
            self.name,
            self.input_shape,
            tuple(cast(WeightLayer, layer).spec() for layer in self.stem),
            tuple(cast(ResidualBlock, block).spec() for block in self.blocks),
            tuple(cast(WeightLayer, layer).spec() for layer in self.head),
            self.num_classes,
            meta=self.meta,
        )


def _scale_input_channels(layer: WeightLayer, theta: Tensor) -> None:
    w = layer.op.weight
    w.mul_(theta.to(w).reshape((1, -1) + (1,) * (w.dim() - 2)))


def _scale_output(layer: WeightLayer, theta_B: Tensor) -> None:
    tensors = [layer.bn.weight, layer.bn.bias] if layer.bn is not None else [layer.op.weight, layer.op.bias]
    for t in tensors:
        if t is not None:
            t.mul_(theta_B.to(t))


@torch.no_grad()
def export_deterministic(model: GatedNetwork, *, eps: float | None = None) -> DeterministicNetwork:
    """The final deterministic network: surviving ``θ`` folded into the weights, no gate modules.

    ``model`` is not modified.  With ``eps`` the copy is first compacted by
    :func:`pruning.compaction.prune` (structures with ``θ < eps`` removed).
    The returned module is in eval mode; its ``spec()`` is the exported structure.
    """
    net = copy.deepcopy(model)
    if eps is not None:
        from .compaction import prune

        prune(net, eps)
    for block in net.block_list():
        if block.alive:
            path = block.layers()
            for layer, nxt in zip(path[:-1], path[1:]):
                if layer.gate is not None:
                    _scale_input_channels(nxt, layer.gate.theta.detach())
                    layer.gate = None
            if block.block_gate is not None:
                _scale_output(path[-1], block.block_gate.theta.detach())
                block.block_gate = None
        if block.out_gate is not None:
            block.out_gate = ChannelScale(block.out_gate.theta.detach())  # type: ignore[assignment]
    for layer in net.stem_layers() + net.head_layers():
        layer.gate = None
    out = DeterministicNetwork(net).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def save_export(
    module: nn.Module, path_dir: str | os.PathLike[str], example_input: Tensor | None = None, *, onnx: bool = False,
    data: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``state_dict.pt``, ``model.pt2`` (a ``torch.export`` program, dynamic batch size),
    ``spec.json`` (when the module has ``spec()``; :meth:`theory.NetworkSpec.to_dict`, readable with
    :func:`theory.spec.load_spec`) and ``metadata.json`` (when it has ``input_shape`` and ``num_classes``:
    :class:`ExportMetadata`, with class names and preprocessing from ``data``, a checkpoint's data
    record) into ``path_dir``, each atomically (temp file + ``os.replace``);
    with ``onnx`` also ``model.onnx`` (:func:`save_onnx`; skipped with a notice when the ``onnx``
    extra is missing).  ``example_input`` defaults to zeros of shape ``(2, *module.input_shape)``.
    Load the program with ``torch.export.load(path).module()``.  Returns the written paths.

    >>> det = export_deterministic(model, eps=0.1)                              # doctest: +SKIP
    >>> paths = save_export(det, "export", onnx=True)                           # doctest: +SKIP
    >>> torch.export.load(paths["program"]).module()(x)                         # doctest: +SKIP
    """
    out_dir = Path(path_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    if example_input is None:
        shape = getattr(module, "input_shape", None)
        if shape is None:
            raise ValueError("example_input is required for a module without input_shape")
        ref = next(module.parameters(), None)
        example_input = torch.zeros(2, *shape, device=None if ref is None else ref.device)
    paths = {"state_dict": out_dir / "state_dict.pt", "program": out_dir / "model.pt2"}
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with atomic_path(paths["state_dict"]) as tmp:
        torch.save(state, tmp)
    try:
        program = torch.export.export(
            module, (example_input,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        )
    except Exception:  # a model torch.export cannot make batch-dynamic: fall back to the example's shape
        program = torch.export.export(module, (example_input,))
    with atomic_path(paths["program"]) as tmp:
        torch.export.save(program, tmp)
    spec_fn = getattr(module, "spec", None)
    if callable(spec_fn):
        paths["spec"] = out_dir / "spec.json"
        atomic_write_text(paths["spec"], json.dumps(spec_fn().to_dict(), indent=1))
    if hasattr(module, "input_shape") and hasattr(module, "num_classes"):
        paths["metadata"] = out_dir / METADATA
        atomic_write_text(paths["metadata"], json.dumps(export_metadata(module, data).to_dict(), indent=1))
    if onnx:
        written = save_onnx(program, out_dir / "model.onnx", example_input)
        if written is not None:
            paths["onnx"] = written
    return paths


#: Packages the ONNX export needs (the ``onnx`` extra of pyproject.toml).
ONNX_PACKAGES = ("onnx", "onnxscript")


def onnx_available() -> bool:
    """Whether :func:`save_onnx` can run here (``onnx`` and ``onnxscript`` importable)."""
    return all(importlib.util.find_spec(name) is not None for name in ONNX_PACKAGES)


def save_onnx(
    program: torch.export.ExportedProgram | nn.Module, path: str | os.PathLike[str], example_input: Tensor
) -> Path | None:
    """Write ``program`` (a ``torch.export`` program or an eval-mode module) as an ONNX graph, atomically.

    Uses ``torch.onnx.export`` (the ``torch.export``-based exporter; batch size dynamic when the
    program's is).  Without the ``onnx`` extra (``pip install '.[onnx]'``) prints a one-line notice
    to stderr and returns ``None``.  Check it with onnxruntime::

        session = onnxruntime.InferenceSession(str(path))
        logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    """
    if not onnx_available():
        missing = [n for n in ONNX_PACKAGES if importlib.util.find_spec(n) is None]
        print(f"notice: ONNX export skipped: {', '.join(missing)} not installed (pip install '.[onnx]')",
              file=sys.stderr)
        return None
    target = Path(path)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and similar registry notes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            kwargs: dict[str, Any] = {"verbose": False}
            if isinstance(program, nn.Module):
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
            onnx_program = torch.onnx.export(program, (example_input,), **kwargs)
        assert onnx_program is not None
        with atomic_path(target) as tmp:
            onnx_program.save(str(tmp))
    finally:
        quiet.setLevel(level)
    return target


__all__ = [
    "METADATA",
    "ChannelScale",
    "DeterministicNetwork",
    "ExportMetadata",
    "export_deterministic",
    "export_metadata",
    "load_export",
    "load_metadata",
    "onnx_available",
    "save_export",
    "save_onnx",
]
