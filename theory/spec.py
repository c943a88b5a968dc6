"""Structural description of a gated residual network (THEORY §1, §3).

A :class:`NetworkSpec` is the one object the complexity model consumes.  It is
built either from architecture hyper-parameters (:mod:`theory.architectures`)
or read off a live torch model (``pruning`` models expose ``.spec()``); tests
assert both give the same object.

The network is ``stem -> blocks -> head``.  A :class:`Block` is the paper's
Figure 1: an input of width ``m`` (the previous block's output), a *path* of
``M + 1`` weight layers whose first ``M`` outputs carry unit gates ``ξ_1``
(``M = 1`` for a basic block or the residual MLP of §1, ``M = 2`` for a
bottleneck), a skip path (identity, zero-padding or a projection layer) and an
output of width ``p`` that may carry output gates ``ξ_2``.  A block whose path
is empty has been replaced by its shortcut (pruned).

Spec files.  :meth:`NetworkSpec.to_dict` / :meth:`NetworkSpec.from_dict` turn a spec into plain
primitives and back (checked field by field, every error naming the field), :func:`load_spec` /
:func:`save_spec` read and write them as TOML or JSON (by suffix).  The format, one key per
dataclass field::

    name = "tiny"
    input_shape = [3, 32, 32]          # one example, channels first
    num_classes = 10
    [meta]                             # optional; stem_pool = "max3x3s2" adds a 3×3/2 max-pool after the stem
    [[stem]]                           # Layer: kind = linear | conv1d | conv2d, in_width, out_width,
    kind = "conv2d"                    #   kernel = 1, stride = 1, bias = false, bn = false, act = false,
    in_width = 3                       #   out_size (optional: derived from input_shape, kernels and strides
    out_width = 16                     #   with padding kernel // 2; checked when given)
    kernel = 3
    bn = true
    act = true
    [[blocks]]                         # Block: in_width, out_width, shortcut = identity | zero_pad | projection,
    name = "b0"                        #   gated = true, out_gated = false, out_act = true, name = "",
    in_width = 16                      #   out_size (optional, derived), path = [[Layer]], shortcut_layer (projection)
    out_width = 16
    [[blocks.path]]
    ...
    [[head]]                           # the classifier after global average pooling
    kind = "linear"
    ...
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

LayerKind = Literal["linear", "conv1d", "conv2d"]
ShortcutKind = Literal["identity", "zero_pad", "projection"]

_SPATIAL_DIMS = {"linear": 0, "conv1d": 1, "conv2d": 2}

#: Pooling layers a spec may put after its stem (``meta["stem_pool"]``): ``(kernel, stride)``, padding ``kernel // 2``.
STEM_POOLS: dict[str, tuple[int, int]] = {"max3x3s2": (3, 2)}


def conv_out(size: int, kernel: int, stride: int = 1) -> int:
    """Output side of a convolution (or pooling) with padding ``kernel // 2``: ``⌊(s + 2⌊k/2⌋ − k)/stride⌋ + 1``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class Layer:
    """One weight operation: a fully-connected layer or a convolution.

    ``kernel`` is the side ``k`` of a square kernel (1 for ``linear``);
    ``out_size`` the spatial output size (``()`` for linear, ``(L_out,)`` for
    conv1d, ``(H_out, W_out)`` for conv2d).  ``bias`` adds a bias column, so a
    unit's fan-in is ``m + 1`` entries (§1's ``ẑ = [z; 1]``).  ``bn`` means
    the layer is followed by a BatchNorm with one affine pair per output
    channel; ``act`` that it is followed by an element-wise activation.
    """

    kind: LayerKind
    in_width: int
    out_width: int
    kernel: int = 1
    out_size: tuple[int, ...] = ()
    stride: int = 1
    bias: bool = False
    bn: bool = False
    act: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _SPATIAL_DIMS:
            raise ValueError(f"Layer.kind must be one of {sorted(_SPATIAL_DIMS)}, got {self.kind!r}")
        for name in ("in_width", "out_width", "kernel", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Layer.{name} must be a non-negative integer, got {value!r}")
        if self.kernel < 1 or self.stride < 1:
            raise ValueError(f"Layer.kernel and Layer.stride must be >= 1, got {self.kernel}, {self.stride}")
        dims = _SPATIAL_DIMS[self.kind]
        if len(self.out_size) != dims or any((not isinstance(s, int)) or s < 1 for s in self.out_size):
            raise ValueError(
                f"Layer.out_size must hold {dims} positive integers for a {self.kind} layer, got {self.out_size!r}"
            )
        if self.kind == "linear" and self.kernel != 1:
            raise ValueError(f"Layer.kernel must be 1 for a linear layer, got {self.kernel}")

    @property
    def positions(self) -> int:
        """Number of output positions (``H_out·W_out``, ``L_out`` or 1)."""
        return math.prod(self.out_size)

    @property
    def c(self) -> int:
        """MACs per weight entry: 1 (FC), ``k·L_out`` (1-D), ``k·k·H_out·W_out`` (2-D) (THEORY §3)."""
        return self.d * self.positions

    @property
    def d(self) -> int:
        """Parameters per weight entry: 1 (FC), ``k`` (1-D), ``k·k`` (2-D) (THEORY §3)."""
        return self.kernel ** _SPATIAL_DIMS[self.kind]

    def with_widths(self, in_width: int | None = None, out_width: int | None = None) -> Layer:
        return replace(
            self,
            in_width=self.in_width if in_width is None else in_width,
            out_width=self.out_width if out_width is None else out_width,
        )


@dataclass(frozen=True)
class Block:
    """One residual block of eq. [1] (paper, Figure 1).

    ``path`` holds the ``M + 1`` weight layers of the nonlinear path; the
    outputs of ``path[:-1]`` carry unit gates ``ξ_1`` (one gate vector per
    inner layer), the whole path is multiplied by the block gate ``ξ_B``.  An
    empty path means the block was pruned and only the shortcut remains.
    ``gated`` says whether the block carries a gate ``ξ_B`` at all (ResNet
    stage-transition blocks are often kept ungated), ``out_gated`` whether the
    block output carries gates ``ξ_2``.  ``out_act`` is the activation ``g``
    after the addition; ``add`` whether the branch is added into a skip path.
    """

    in_width: int
    out_width: int
    path: tuple[Layer, ...]
    shortcut: ShortcutKind = "identity"
    shortcut_layer: Layer | None = None
    out_size: tuple[int, ...] = ()
    gated: bool = True
    out_gated: bool = False
    out_act: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        where = f"Block {self.name!r}" if self.name else "Block"
        for attr in ("in_width", "out_width"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}.{attr} must be a non-negative integer, got {value!r}")
        if self.shortcut not in ("identity", "zero_pad", "projection"):
            raise ValueError(f"{where}.shortcut must be identity, zero_pad or projection, got {self.shortcut!r}")
        if (self.shortcut == "projection") != (self.shortcut_layer is not None):
            raise ValueError(f"{where}.shortcut_layer must be given exactly when shortcut == 'projection'")
        if self.shortcut == "identity" and self.in_width != self.out_width:
            raise ValueError(
                f"{where}: identity shortcut needs in_width == out_width, got {self.in_width} != {self.out_width}"
            )
        if self.path:
            if self.path[0].in_width != self.in_width:
                raise ValueError(
                    f"{where}.path[0].in_width={self.path[0].in_width} does not match in_width={self.in_width}"
                )
            if self.path[-1].out_width != self.out_width:
                raise ValueError(
                    f"{where}.path[-1].out_width={self.path[-1].out_width} does not match "
                    f"out_width={self.out_width}"
                )
            for j, (a, b) in enumerate(zip(self.path[:-1], self.path[1:])):
                if a.out_width != b.in_width:
                    raise ValueError(
                        f"{where}.path[{j}].out_width={a.out_width} does not match "
                        f"path[{j + 1}].in_width={b.in_width}"
                    )
        if self.shortcut_layer is not None and (
            self.shortcut_layer.in_width != self.in_width or self.shortcut_layer.out_width != self.out_width
        ):
            raise ValueError(f"{where}.shortcut_layer widths do not match the block's in/out widths")

    @property
    def M(self) -> int:
        """Number of inner gated layers (``len(path) - 1``; 0 for a pruned block)."""
        return max(len(self.path) - 1, 0)

    @property
    def alive(self) -> bool:
        """False once the nonlinear path was removed (block replaced by its shortcut)."""
        return bool(self.path)

    @property
    def unit_widths(self) -> tuple[int, ...]:
        """Widths ``n`` of the ``M`` unit-gated inner layers."""
        return tuple(layer.out_width for layer in self.path[:-1])

    @property
    def positions(self) -> int:
        return math.prod(self.out_size)

    @property
    def depth(self) -> int:
        """Weight layers this block contributes to the network depth."""
        return len(self.path)


@dataclass(frozen=True)
class NetworkSpec:
    """A whole network: ``stem`` layers, residual ``blocks``, ``head`` layers.

    ``input_shape`` is the shape of one example (channels first).  The stem's
    last output width must equal the first block's input width; the head's
    first input width the last block's output width.
    """

    name: str
    input_shape: tuple[int, ...]
    stem: tuple[Layer, ...]
    blocks: tuple[Block, ...]
    head: tuple[Layer, ...]
    num_classes: int
    meta: tuple[tuple[str, object], ...] = field(default=())

    def __post_init__(self) -> None:
        widths = [layer for layer in self.stem]
        for a, b in zip(widths[:-1], widths[1:]):
            if a.out_width != b.in_width:
                raise ValueError(f"NetworkSpec {self.name!r}: stem widths do not chain ({a.out_width} -> {b.in_width})")
        prev = self.stem[-1].out_width if self.stem else (self.input_shape[0] if self.input_shape else 0)
        for l, block in enumerate(self.blocks):
            if block.in_width != prev:
                raise ValueError(
                    f"NetworkSpec {self.name!r}: blocks[{l}].in_width={block.in_width} does not match the "
                    f"preceding output width {prev}"
                )
            prev = block.out_width
        if self.head:
            if self.head[0].in_width != prev:
                raise ValueError(
                    f"NetworkSpec {self.name!r}: head[0].in_width={self.head[0].in_width} does not match the "
                    f"last block's output width {prev}"
                )
            for a, b in zip(self.head[:-1], self.head[1:]):
                if a.out_width != b.in_width:
                    raise ValueError(f"NetworkSpec {self.name!r}: head widths do not chain")

    @property
    def prunable_blocks(self) -> int:
        """``L_b`` of [13]: blocks that carry a block gate and still have a path."""
        return sum(1 for b in self.blocks if b.gated and b.alive)

    @property
    def depth(self) -> int:
        """Weight layers of the network (stem + alive block paths + head), the paper's "layers left"."""
        return len(self.stem) + sum(b.depth for b in self.blocks) + len(self.head)

    @property
    def blocks_alive(self) -> int:
        return sum(1 for b in self.blocks if b.alive)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON/TOML primitives (the spec-file format of the module doc); :meth:`from_dict` inverts it.

        >>> from theory.architectures import resnet_cifar
        >>> spec = resnet_cifar(20)
        >>> NetworkSpec.from_dict(spec.to_dict()) == spec
        True
        """
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "meta": {str(k): v for k, v in self.meta},
            "stem": [_layer_dict(layer) for layer in self.stem],
            "blocks": [_block_dict(b) for b in self.blocks],
            "head": [_layer_dict(layer) for layer in self.head],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "spec") -> NetworkSpec:
        """A spec from primitives (a parsed spec file); ``ValueError`` naming the field on any problem.

        ``out_size`` may be left out of layers and blocks: it is derived from ``input_shape``, the
        kernels and strides (padding ``kernel // 2``, as the torch layers use) and ``meta.stem_pool``;
        where it is given it must equal the derived size.  ``source`` prefixes the messages.
        """
        return _spec_from_dict(raw, source)


# --------------------------------------------------------------------------------------------------
# Spec files: primitives <-> NetworkSpec, TOML/JSON on disk
# --------------------------------------------------------------------------------------------------

_LAYER_KEYS = tuple(f.name for f in fields(Layer))
_BLOCK_KEYS = tuple(f.name for f in fields(Block))
_SPEC_KEYS = ("name", "input_shape", "num_classes", "meta", "stem", "blocks", "head")


def _layer_dict(layer: Layer) -> dict[str, Any]:
    return {
        "kind": layer.kind, "in_width": layer.in_width, "out_width": layer.out_width, "kernel": layer.kernel,
        "stride": layer.stride, "out_size": list(layer.out_size), "bias": layer.bias, "bn": layer.bn,
        "act": layer.act,
    }


def _block_dict(block: Block) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": block.name, "in_width": block.in_width, "out_width": block.out_width, "shortcut": block.shortcut,
        "out_size": list(block.out_size), "gated": block.gated, "out_gated": block.out_gated,
        "out_act": block.out_act, "path": [_layer_dict(layer) for layer in block.path],
    }
    if block.shortcut_layer is not None:
        out["shortcut_layer"] = _layer_dict(block.shortcut_layer)
    return out


def _check_keys(raw: Any, known: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a table, got {type(raw).__name__} {raw!r:.80}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(known)})")
    return raw


def _typed(raw: Mapping[str, Any], key: str, tp: type, where: str, default: Any) -> Any:
    if key not in raw:
        if default is _REQUIRED:
            raise ValueError(f"{where}.{key}: missing")
        return default
    value = raw[key]
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{where}.{key}: expected {tp.__name__}, got {type(value).__name__} {value!r:.80}")
    return value


def _int_list(raw: Mapping[str, Any], key: str, where: str) -> tuple[int, ...] | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, (list, tuple)) or any(not isinstance(v, int) or isinstance(v, bool) for v in value):
        raise ValueError(f"{where}.{key}: expected a list of integers, got {value!r:.80}")
    return tuple(value)


_REQUIRED = object()


def _layer_from(raw: Any, where: str, in_size: tuple[int, ...] | None) -> Layer:
    """One layer; ``in_size`` is the spatial size of its input when known (to derive/check ``out_size``)."""
    r = _check_keys(raw, _LAYER_KEYS, where)
    kind = _typed(r, "kind", str, where, _REQUIRED)
    if kind not in _SPATIAL_DIMS:
        raise ValueError(f"{where}.kind: must be one of {', '.join(_SPATIAL_DIMS)}, got {kind!r}")
    kernel = _typed(r, "kernel", int, where, 1)
    stride = _typed(r, "stride", int, where, 1)
    given = _int_list(r, "out_size", where)
    derived: tuple[int, ...] | None = None
    dims = _SPATIAL_DIMS[kind]
    if dims == 0:
        derived = ()
    elif in_size is not None and len(in_size) == dims and kernel >= 1 and stride >= 1:
        derived = tuple(conv_out(x, kernel, stride) for x in in_size)
    if given is not None and derived is not None and given != derived:
        raise ValueError(
            f"{where}.out_size: {list(given)} differs from {list(derived)}, the size this layer produces from its "
            f"input size {list(in_size or ())} (kernel {kernel}, stride {stride}, padding {kernel // 2})"
        )
    out_size = given if given is not None else derived
    if out_size is None:
        raise ValueError(f"{where}.out_size: missing and cannot be derived (input size unknown)")
    try:
        return Layer(
            kind, _typed(r, "in_width", int, where, _REQUIRED), _typed(r, "out_width", int, where, _REQUIRED),
            kernel=kernel, out_size=out_size, stride=stride, bias=_typed(r, "bias", bool, where, False),
            bn=_typed(r, "bn", bool, where, False), act=_typed(r, "act", bool, where, False),
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _layer_list(raw: Any, where: str, size: tuple[int, ...] | None) -> tuple[tuple[Layer, ...], tuple[int, ...] | None]:
    """A list of chained layers and the spatial size after the last (``None`` once unknown)."""
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{where}: expected a list of tables, got {type(raw).__name__}")
    out = []
    for j, item in enumerate(raw):
        layer = _layer_from(item, f"{where}[{j}]", size)
        out.append(layer)
        size = layer.out_size if layer.kind != "linear" else None
    return tuple(out), size


def _spec_from_dict(raw: Mapping[str, Any], source: str) -> NetworkSpec:
    r = _check_keys(raw, _SPEC_KEYS, source)
    name = _typed(r, "name", str, source, "network")
    input_shape = _int_list(r, "input_shape", source)
    if input_shape is None:
        raise ValueError(f"{source}.input_shape: missing")
    if not input_shape or any(v < 1 for v in input_shape):
        raise ValueError(f"{source}.input_shape: expected positive integers (channels first), got {list(input_shape)}")
    num_classes = _typed(r, "num_classes", int, source, _REQUIRED)
    if num_classes < 1:
        raise ValueError(f"{source}.num_classes: must be >= 1, got {num_classes}")
    meta_raw = r.get("meta", {})
    if isinstance(meta_raw, (list, tuple)):  # the list-of-pairs form of dataclasses.asdict
        if any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in meta_raw):
            raise ValueError(f"{source}.meta: expected a table or a list of [key, value] pairs")
        meta_raw = {str(k): v for k, v in meta_raw}
    if not isinstance(meta_raw, Mapping):
        raise ValueError(f"{source}.meta: expected a table, got {type(meta_raw).__name__}")
    for k, v in meta_raw.items():
        if not isinstance(v, (str, int, float, bool)):
            raise ValueError(f"{source}.meta.{k}: expected a string, number or boolean, got {v!r:.80}")
    pool = meta_raw.get("stem_pool")
    if pool is not None and pool not in STEM_POOLS:
        raise ValueError(f"{source}.meta.stem_pool: must be one of {', '.join(STEM_POOLS)}, got {pool!r}")
    size: tuple[int, ...] | None = tuple(input_shape[1:])
    stem, size = _layer_list(r.get("stem", []), f"{source}.stem", size)
    if pool is not None and size is not None:
        k, st = STEM_POOLS[pool]
        size = tuple(conv_out(x, k, st) for x in size)
    blocks_raw = r.get("blocks", [])
    if not isinstance(blocks_raw, (list, tuple)):
        raise ValueError(f"{source}.blocks: expected a list of tables, got {type(blocks_raw).__name__}")
    blocks = []
    for l, braw in enumerate(blocks_raw):
        where = f"{source}.blocks[{l}]"
        b = _check_keys(braw, _BLOCK_KEYS, where)
        path, out = _layer_list(b.get("path", []), f"{where}.path", size)
        shortcut = _typed(b, "shortcut", str, where, "identity")
        sc_layer = None
        if b.get("shortcut_layer") is not None:  # None: the dataclasses.asdict form of "no projection"
            sc_layer = _layer_from(b["shortcut_layer"], f"{where}.shortcut_layer", size)
        if not path and sc_layer is not None:
            out = sc_layer.out_size if sc_layer.kind != "linear" else None
        given = _int_list(b, "out_size", where)
        if given is not None and path and out is not None and given != out:
            raise ValueError(f"{where}.out_size: {list(given)} differs from {list(out)}, the path's output size")
        if given is None:
            given = out if out is not None else ()
        try:
            block = Block(
                _typed(b, "in_width", int, where, _REQUIRED), _typed(b, "out_width", int, where, _REQUIRED),
                path, shortcut=shortcut, shortcut_layer=sc_layer,
                out_size=given, gated=_typed(b, "gated", bool, where, True),
                out_gated=_typed(b, "out_gated", bool, where, False), out_act=_typed(b, "out_act", bool, where, True),
                name=_typed(b, "name", str, where, ""),
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        blocks.append(block)
        if given:
            size = tuple(given)
        elif path:
            size = None  # a linear block: no spatial size
    head, _ = _layer_list(r.get("head", []), f"{source}.head", None)  # after global average pooling
    try:
        return NetworkSpec(name, input_shape, stem, tuple(blocks), head, num_classes, meta=tuple(meta_raw.items()))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def load_spec(path: str | os.PathLike[str]) -> NetworkSpec:
    """Read a spec file (``.toml`` or ``.json``, the format of the module doc); errors name the file and field."""
    p = Path(path)
    if p.suffix not in (".toml", ".json"):
        raise ValueError(f"{p}: a spec file must end in .toml or .json")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{p}: cannot read the spec file ({exc.strerror or exc})") from None
    try:
        if p.suffix == ".json":
            raw = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            raw = tomllib.loads(text)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{p}: not valid {p.suffix[1:].upper()}: {exc}") from None
    return NetworkSpec.from_dict(raw, source=str(p))


def spec_to_toml(spec: NetworkSpec) -> str:
    """The spec file of ``spec`` in TOML (what :func:`load_spec` reads back to an equal spec)."""
    d = spec.to_dict()
    lines = [f"name = {_toml(d['name'])}", f"input_shape = {_toml(d['input_shape'])}",
             f"num_classes = {_toml(d['num_classes'])}", ""]

    def table(header: str, items: Mapping[str, Any]) -> None:
        lines.append(header)
        lines.extend(f"{k} = {_toml(v)}" for k, v in items.items() if not isinstance(v, (dict, list)) or
                     (isinstance(v, list) and all(not isinstance(x, dict) for x in v)))
        lines.append("")

    if d["meta"]:
        table("[meta]", d["meta"])
    for layer in d["stem"]:
        table("[[stem]]", layer)
    for block in d["blocks"]:
        table("[[blocks]]", block)
        for layer in block["path"]:
            table("[[blocks.path]]", layer)
        if "shortcut_layer" in block:
            table("[blocks.shortcut_layer]", block["shortcut_layer"])
    for layer in d["head"]:
        table("[[head]]", layer)
    return "\n".join(lines).rstrip() + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def save_spec(spec: NetworkSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` as a spec file (TOML or JSON by suffix), atomically."""
    from .atomic import atomic_write_text

    p = Path(path)
    if p.suffix == ".json":
        text = json.dumps(spec.to_dict(), indent=1) + "\n"
    elif p.suffix == ".toml":
        text = spec_to_toml(spec)
    else:
        raise ValueError(f"{p}: a spec file must end in .toml or .json")
    atomic_write_text(p, text)
    return p
