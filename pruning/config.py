"""Run configuration: TOML files -> frozen dataclasses, with ``--set`` overrides and full validation.

A configuration has the sections ``[data]``, ``[model]`` (arch kwargs in
``[model.kwargs]``), ``[objective]``, ``[optim]`` (``[optim.weights]``,
``[optim.theta]``), ``[train]`` and ``[export]``; every key has a default
(:class:`RunConfig` with no file is the embedded default, MNIST-1D +
ResNet-1D in combined mode, identical to ``experiments/configs/default.toml``).
:func:`load_config` reads a file, applies
``--set dotted.key=value`` overrides (values parsed as TOML literals, bare
words as strings) and validates *everything* before returning: unknown
sections or keys, wrong types and out-of-range values are all collected into
one :class:`ConfigError` that names each bad field, so a command line can
refuse to start (exit code 2) before it writes anything.

Ranges (THEORY §2, §3, §5): ``gamma > 0``, ``rho ∈ [0, 1]``, ``delta >= 0``
([13]); ``target_fpr``, ``target_ppr`` fractions in (0, 1), at most one of
them (:mod:`pruning.budget`); ``lambda >= 0`` is the precision of the Gaussian
weight prior of [2.2] (weight decay ``λ/N``); ``eps ∈ (0, 1)`` is the pruning
threshold of Algorithm 1 step 4; ``epochs >= 1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: ``data.name`` values: the named datasets, your own image folder or ``.npz`` file (``data.root``), and
#: ``custom`` (torch Datasets given in Python, recorded by the run; :func:`pruning.userdata.from_datasets`).
DATASETS = ("mnist1d", "digits", "cifar10", "cifar100", "imagenet", "folder", "array", "custom")
MODES = ("combined", "layer", "unit", "none")
#: ``objective.cost``: the complexity ``C`` of [11] — expected FLOPs/parameters [9]/[10], or measured latency.
COSTS = ("flops-params", "latency")
LATENCY_TARGETS = ("inference", "train")
ESTIMATORS = ("straight-through", "exact-difference")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "cosine-restarts", "step", "constant")
OPTIMIZERS = ("sgd-adam", "plain-sgd")

#: Architectures of ``pruning.models.build_model`` and the keyword arguments each accepts in ``[model.kwargs]``
#: (with the TOML types allowed; ``list[int]`` checks every element).  Integers and list elements must be
#: positive.  Missing shape arguments are filled in from the data set by the trainer.
ARCH_KWARGS: dict[str, dict[str, tuple[Any, ...]]] = {
    "residual_mlp": {"in_features": (int,), "hidden": (list[int],), "out_gated": (bool,), "activation": (str,)},
    "resnet1d": {"stage_blocks": (list[int],), "widths": (list[int],), "length": (int,), "in_channels": (int,)},
    "resnet20": {"width": (int,), "image_size": (int,), "in_channels": (int,)},
    "resnet56": {"width": (int,), "image_size": (int,), "in_channels": (int,)},
    "resnet110": {"width": (int,), "image_size": (int,), "in_channels": (int,)},
    "resnet50": {"image_size": (int,), "in_channels": (int,), "width": (int,), "widen": (int,)},
    "resnet18": {"image_size": (int,), "in_channels": (int,), "width": (int,)},
    "resnet34": {"image_size": (int,), "in_channels": (int,), "width": (int,)},
    "resnet101": {"image_size": (int,), "in_channels": (int,), "width": (int,), "widen": (int,)},
    "resnet152": {"image_size": (int,), "in_channels": (int,), "width": (int,), "widen": (int,)},
    "wide_resnet50_2": {"image_size": (int,), "in_channels": (int,), "width": (int,)},
    "wide_resnet101_2": {"image_size": (int,), "in_channels": (int,), "width": (int,)},
    "wrn": {"depth": (int,), "widen": (int,), "image_size": (int,), "in_channels": (int,)},
    # a network from a spec file (model.spec = "path.toml|json", theory.spec.load_spec)
    "spec": {"activation": (str,)},
    # a network given in Python (Trainer(cfg, out, model=net)); rebuilt from the spec its checkpoint carries
    "custom": {},
}
#: Suffixes of a spec file (``model.spec``).
SPEC_SUFFIXES = (".toml", ".json")


class ConfigError(ValueError):
    """Every problem found in a configuration; ``errors`` holds one ``"field: problem"`` line each."""

    def __init__(self, errors: Sequence[str], source: str = "") -> None:
        self.errors = list(errors)
        head = f"invalid configuration{f' {source}' if source else ''} ({len(self.errors)} problem(s)):"
        super().__init__("\n".join([head, *(f"  - {e}" for e in self.errors)]))


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: ``pruning.data.load_dataset(name, root, **options)``; optional deterministic subsets.

    ``name = "folder"``: ``root`` is a folder with ``train/<class>/`` images (and ``test/`` or ``val/``);
    ``name = "array"``: ``root`` is an ``.npz`` file (``x``, ``y``, optional ``x_test``, ``y_test``,
    ``classes``); both relative to the working directory (:mod:`pruning.userdata`).
    """

    name: str = "mnist1d"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train_subset: int = 0  # 0 = all; otherwise the first k examples (tests, smoke runs)
    test_subset: int = 0
    num_workers: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: ``pruning.models.build_model(arch, mode=, estimator=, theta_init=, **kwargs)``.

    ``arch = "spec"`` builds the network a spec file describes (``spec = "path/net.toml"`` or ``.json``,
    relative to the working directory; format: :mod:`theory.spec`); ``arch = "custom"`` marks a
    network given in Python (``Trainer(cfg, out, model=net)``), rebuilt from its checkpoint.
    """

    arch: str = "resnet1d"
    mode: str = "combined"
    estimator: str = "straight-through"
    theta_init: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    spec: str = ""  # the spec file of arch = "spec"


@dataclass(frozen=True)
class ObjectiveConfig:
    """``[objective]``: user parameters of [13] and the prior precision λ of [2.2] (TOML key ``lambda``).

    ``target_fpr`` / ``target_ppr`` (at most one; a fraction in (0, 1), 0.5 = 50 %): the FLOPs / parameter
    reduction wanted; γ is then adapted during training (:mod:`pruning.budget`, starting from 0) and
    ``gamma`` is the controller's scale.
    """

    gamma: float = 0.05
    rho: float = 0.5
    delta: float = 0.5
    lambda_: float = 2.0
    elementwise: bool = True
    target_fpr: float | None = None
    target_ppr: float | None = None
    # "latency": C = α_t E[T] + β Σθ_B with E[T] from the calibrated model in latency_model
    # (python -m pruning calibrate; theory.latency); rho and elementwise then play no role
    cost: str = "flops-params"
    latency_model: str = ""
    latency_target: str = "inference"  # which fit of the file: "inference" or "train" (forward+backward)


@dataclass(frozen=True)
class WeightOptimConfig:
    """``[optim.weights]``: SGD with momentum on ``W`` ([14], [17]) and its learning-rate schedule."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    lr_min: float = 0.0
    restarts: list[int] = field(default_factory=list)  # epochs at which cosine-restarts restarts
    milestones: list[int] = field(default_factory=list)  # epochs at which "step" multiplies by decay
    decay: float = 0.1
    warmup_epochs: int = 0


@dataclass(frozen=True)
class ThetaOptimConfig:
    """``[optim.theta]``: Adam with a constant learning rate on ``Θ``, then the projection Π_H of [15]."""

    lr: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass(frozen=True)
class OptimConfig:
    """``[optim]``: ``kind = "sgd-adam"`` (paper, Table 1) or ``"plain-sgd"`` (constant step, both groups; §5)."""

    kind: str = "sgd-adam"
    weights: WeightOptimConfig = field(default_factory=WeightOptimConfig)
    theta: ThetaOptimConfig = field(default_factory=ThetaOptimConfig)


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: Algorithm 1 loop settings."""

    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 512
    eps: float = 0.1
    prune_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int = 1  # CPU threads for torch (0 = torch's default)
    amp_bf16: bool = False
    channels_last: bool | str = "auto"  # true | false | "auto" (pruning.runtime.resolve_channels_last)
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    out_dir: str = ""  # "" = runs/<config file stem>
    audit: bool = False  # pruning audit mode: ε-rule flags structures but keeps them (pruning.audit)
    audit_window: int = 100  # iterations of the running max that estimates the Lemma-1 constant k
    audit_every: int = 4  # iterations between two observations of the Lemma-1 ratios (0 = no k estimate)
    checkpoint_every: int = 0  # iterations between mid-epoch checkpoints (0 = only at epoch ends)
    sync_bn: bool = False  # torchrun runs: BatchNorm statistics over the global batch (pruning.syncbn)
    dist_timeout_s: float = 600.0  # torchrun runs: a collective waiting longer than this fails the run
    sync_check_every: int = 0  # torchrun runs: compare parameter digests across processes every k steps (0 = off)
    timing_steps: int = 5  # dense-reference steps timed at every start/resume + per-structure step times (0 = off)


@dataclass(frozen=True)
class ExportConfig:
    """``[export]``: write the deterministic network (θ folded into the weights) at the end of a run.

    ``onnx = true`` also writes ``model.onnx`` (needs the ``onnx`` extra; without it a notice and no file).
    """

    enabled: bool = True
    dir: str = "export"
    onnx: bool = False


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with the TOML key names (``lambda``); round-trips through :func:`from_dict`."""
        return _to_dict(self)


# TOML name <-> dataclass attribute (only ``lambda`` differs: a Python keyword)
_TOML_NAME = {"lambda_": "lambda"}
_ATTR_NAME = {v: k for k, v in _TOML_NAME.items()}


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_TOML_NAME.get(f.name, f.name): _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Building and type checking
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the annotation ``tp``; returns (ok, value converted: int -> float where wanted)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, v = _check_type(value, arg)
                if ok:
                    return True, v
        return False, value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(tp) or (Any,)
        out = []
        for v in value:
            ok, cv = _check_type(v, item) if item is not Any else (True, v)
            if not ok:
                return False, value
            out.append(cv)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``" (did you mean 'seed'?)"`` when a choice is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _value_error(name: str, value: Any, tp: Any) -> str:
    """``name: expected <type>, got ...``, naming the first bad element of a list."""
    if typing.get_origin(tp) is list and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            if not _check_type(v, item)[0]:
                return f"{name}[{i}]: expected {_describe(item)}, got {type(v).__name__} {v!r} (in {value!r})"
    return f"{name}: expected {_describe(tp)}, got {type(value).__name__} {value!r}"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_describe(item)}"
    if origin is dict or tp is dict:
        return "table"
    return {float: "number", int: "integer", bool: "boolean", str: "string"}.get(tp, _type_name(tp))


def _build(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``raw`` (a dict), recording every problem under ``path``."""
    if not isinstance(raw, Mapping):
        errors.append(f"{path or 'config'}: expected a table, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        attr = _ATTR_NAME.get(key, key)
        name = f"{path}.{key}" if path else key
        if attr not in fields or attr in _TOML_NAME and key == attr:
            names = sorted(_TOML_NAME.get(f, f) for f in fields)
            errors.append(f"{name}: unknown {'key' if path else 'section'}{did_you_mean(key, names)} "
                          f"(known: {', '.join(names)})")
            continue
        tp = hints[attr]
        if dataclasses.is_dataclass(tp):
            kwargs[attr] = _build(tp, value, name, errors)
            continue
        ok, converted = _check_type(value, tp)
        if not ok:
            errors.append(_value_error(name, value, tp))
            continue
        kwargs[attr] = converted
    return cls(**kwargs)


def _range_errors(cfg: RunConfig) -> list[str]:
    """Semantic checks, each naming its field."""
    errors: list[str] = []

    def need(cond: bool, name: str, msg: str, value: Any) -> None:
        if not cond:
            errors.append(f"{name}: {msg}, got {value!r}")

    def finite(x: float) -> bool:
        return math.isfinite(x)

    d, m, o, t = cfg.data, cfg.model, cfg.objective, cfg.train
    w, th = cfg.optim.weights, cfg.optim.theta
    need(d.name in DATASETS, "data.name", f"unknown dataset (choose one of {', '.join(DATASETS)})", d.name)
    need(d.train_subset >= 0, "data.train_subset", "must be >= 0 (0 = all)", d.train_subset)
    need(d.test_subset >= 0, "data.test_subset", "must be >= 0 (0 = all)", d.test_subset)
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0", d.num_workers)
    need(m.arch in ARCH_KWARGS, "model.arch", f"unknown architecture (choose one of {', '.join(ARCH_KWARGS)})", m.arch)
    need(m.mode in MODES, "model.mode", f"unknown mode (choose one of {', '.join(MODES)})", m.mode)
    need(m.estimator in ESTIMATORS, "model.estimator", f"unknown estimator (choose one of {', '.join(ESTIMATORS)})",
         m.estimator)
    need(finite(m.theta_init) and 0.0 <= m.theta_init <= 1.0, "model.theta_init", "must lie in [0, 1]", m.theta_init)
    if m.arch in ARCH_KWARGS:
        errors += _kwargs_errors(m.arch, m.kwargs)
    errors += _data_option_errors(d)
    if m.arch == "spec":
        need(Path(m.spec).suffix in SPEC_SUFFIXES, "model.spec",
             f"arch 'spec' needs the path of a spec file ending in {' or '.join(SPEC_SUFFIXES)}", m.spec)
    else:
        need(not m.spec, "model.spec", "is used only with model.arch = \"spec\"", m.spec)
    need(finite(o.gamma) and o.gamma > 0, "objective.gamma", "must be > 0", o.gamma)
    need(finite(o.rho) and 0.0 <= o.rho <= 1.0, "objective.rho", "must lie in [0, 1]", o.rho)
    need(finite(o.delta) and o.delta >= 0, "objective.delta", "must be >= 0", o.delta)
    need(finite(o.lambda_) and o.lambda_ >= 0, "objective.lambda", "must be >= 0", o.lambda_)
    for key in ("target_fpr", "target_ppr"):
        v = getattr(o, key)
        if v is not None:
            hint = f"; for {v:g} % write {v / 100:g}" if 1 <= v < 100 else ""
            need(finite(v) and 0 < v < 1, f"objective.{key}", f"must be a fraction in (0, 1) (0.5 = 50 %{hint})", v)
            need(m.mode != "none", f"objective.{key}", "needs pruning (model.mode = \"none\" has no complexity term)",
                 v)
    need(o.target_fpr is None or o.target_ppr is None, "objective.target_ppr",
         "give either objective.target_fpr or objective.target_ppr, not both", o.target_ppr)
    need(o.cost in COSTS, "objective.cost", f"unknown cost (choose one of {', '.join(COSTS)})", o.cost)
    need(o.latency_target in LATENCY_TARGETS, "objective.latency_target",
         f"unknown target (choose one of {', '.join(LATENCY_TARGETS)})", o.latency_target)
    need(o.cost != "latency" or bool(o.latency_model), "objective.latency_model",
         "cost = \"latency\" needs the path of a latency model (python -m pruning calibrate --out FILE)",
         o.latency_model)
    need(cfg.optim.kind in OPTIMIZERS, "optim.kind", f"unknown optimiser (choose one of {', '.join(OPTIMIZERS)})",
         cfg.optim.kind)
    need(finite(w.lr) and w.lr > 0, "optim.weights.lr", "must be > 0", w.lr)
    need(finite(w.momentum) and 0 <= w.momentum < 1, "optim.weights.momentum", "must lie in [0, 1)", w.momentum)
    need(not (w.nesterov and w.momentum == 0), "optim.weights.nesterov", "needs momentum > 0", w.nesterov)
    need(w.schedule in SCHEDULES, "optim.weights.schedule", f"unknown schedule (choose one of {', '.join(SCHEDULES)})",
         w.schedule)
    need(finite(w.lr_min) and 0 <= w.lr_min <= w.lr, "optim.weights.lr_min", "must lie in [0, lr]", w.lr_min)
    need(all(0 < e < t.epochs for e in w.restarts) and w.restarts == sorted(set(w.restarts)),
         "optim.weights.restarts", "must be increasing epochs inside (0, epochs)", w.restarts)
    need(all(0 < e for e in w.milestones) and w.milestones == sorted(set(w.milestones)),
         "optim.weights.milestones", "must be increasing positive epochs", w.milestones)
    need(finite(w.decay) and 0 < w.decay <= 1, "optim.weights.decay", "must lie in (0, 1]", w.decay)
    need(w.warmup_epochs >= 0, "optim.weights.warmup_epochs", "must be >= 0", w.warmup_epochs)
    need(finite(th.lr) and th.lr > 0, "optim.theta.lr", "must be > 0", th.lr)
    need(len(th.betas) == 2 and all(math.isfinite(b) and 0 <= b < 1 for b in th.betas), "optim.theta.betas",
         "must be two numbers in [0, 1)", th.betas)
    need(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    need(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1", t.eval_batch_size)
    need(finite(t.eps) and 0 < t.eps < 1, "train.eps", "must lie in (0, 1)", t.eps)
    need(t.prune_every >= 1, "train.prune_every", "must be >= 1 (iterations)", t.prune_every)
    need(t.seed >= 0, "train.seed", "must be >= 0", t.seed)
    need(t.device in DEVICES, "train.device", f"unknown device (choose one of {', '.join(DEVICES)})", t.device)
    need(t.channels_last in (True, False, "auto"), "train.channels_last", 'must be true, false or "auto"',
         t.channels_last)
    need(t.threads >= 0, "train.threads", "must be >= 0 (0 = torch default)", t.threads)
    need(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
    need(t.audit_window >= 1, "train.audit_window", "must be >= 1 (iterations)", t.audit_window)
    need(t.audit_every >= 0, "train.audit_every", "must be >= 0 (iterations; 0 = no Lemma-1 estimate)", t.audit_every)
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (iterations; 0 = epoch ends only)",
         t.checkpoint_every)
    need(finite(t.dist_timeout_s) and t.dist_timeout_s > 0, "train.dist_timeout_s", "must be > 0 (seconds)",
         t.dist_timeout_s)
    need(t.sync_check_every >= 0, "train.sync_check_every", "must be >= 0 (iterations; 0 = off)", t.sync_check_every)
    need(0 <= t.timing_steps <= 1000, "train.timing_steps", "must be in [0, 1000] (reference steps; 0 = no timing)",
         t.timing_steps)
    need(bool(cfg.export.dir), "export.dir", "must be a non-empty path", cfg.export.dir)
    return errors


def _kwargs_errors(arch: str, kwargs: Mapping[str, Any]) -> list[str]:
    """``[model.kwargs]`` against :data:`ARCH_KWARGS`: names, types (every list element), positive sizes."""
    errors: list[str] = []
    allowed = ARCH_KWARGS[arch]
    for key, value in kwargs.items():
        name = f"model.kwargs.{key}"
        if key not in allowed:
            errors.append(f"{name}: unknown argument for arch {arch!r}{did_you_mean(key, list(allowed))} "
                          f"(known: {', '.join(allowed) or 'none'})")
            continue
        if not any(_check_type(value, tp)[0] for tp in allowed[key]):
            errors.append(_value_error(name, value, allowed[key][0]) if len(allowed[key]) == 1 else
                          f"{name}: expected {' or '.join(_describe(a) for a in allowed[key])}, "
                          f"got {type(value).__name__} {value!r}")
            continue
        sizes = value if isinstance(value, list) else [value] if type(value) is int else []
        if any(v < 1 for v in sizes) or isinstance(value, list) and not value:
            errors.append(f"{name}: must be {'a non-empty list of ' if isinstance(value, list) else ''}"
                          f"positive integer{'s' if isinstance(value, list) else ''}, got {value!r}")
    if arch == "resnet1d" and isinstance(kwargs.get("widths"), list) and isinstance(kwargs.get("stage_blocks"), list) \
            and len(kwargs["widths"]) != len(kwargs["stage_blocks"]):
        errors.append(f"model.kwargs.widths: needs one width per stage (stage_blocks has {len(kwargs['stage_blocks'])} "
                      f"entries), got {kwargs['widths']!r}")
    return errors


def _data_option_errors(d: DataConfig) -> list[str]:
    """``[data.options]`` against the keyword options of the dataset's loader (names with "did you mean", types)
    and the ranges the dataset declares (``pruning.data.OPTION_RULES``)."""
    if d.name not in DATASETS:
        return []
    from .data import dataset_option_errors, dataset_options  # the loaders' own declarations of what each accepts

    accepted = dataset_options(d.name)
    if accepted is None:  # the loader takes any keyword
        return []
    errors: list[str] = []
    for key, value in d.options.items():
        name = f"data.options.{key}"
        if key not in accepted:
            errors.append(f"{name}: unknown option for dataset {d.name!r}{did_you_mean(key, list(accepted))} "
                          f"(known: {', '.join(accepted) or 'none'})")
        elif not _check_type(value, accepted[key])[0]:
            errors.append(_value_error(name, value, accepted[key]))
    typed = {k: v for k, v in d.options.items() if k in accepted and _check_type(v, accepted[k])[0]}
    return errors + dataset_option_errors(d.name, typed)


def from_dict(raw: Mapping[str, Any], *, source: str = "") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict (TOML key names); raise :class:`ConfigError`."""
    errors: list[str] = []
    cfg = _build(RunConfig, raw, "", errors)
    errors += _range_errors(cfg)
    if errors:
        raise ConfigError(errors, source)
    return cfg


# --------------------------------------------------------------------------------------------------
# Overrides and files
# --------------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``0.1``, ``true``, ``[3, 3]``, ``"x"``) or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], errors: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings to a nested dict (copy); malformed ones are recorded in ``errors``."""
    out = _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"--set {item!r}: expected dotted.key=value")
            continue
        parts = key.split(".")
        node = out
        bad = False
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append(f"{key}: {part!r} is not a table")
                bad = True
                break
            node = child
        if not bad:
            node[parts[-1]] = parse_value(text.strip())
    return out


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
    check_files: bool = True,
) -> RunConfig:
    """Read a TOML file (``None``: ``base`` or the embedded default), apply overrides, validate everything at once.

    ``check_files``: also read the files the configuration names (``model.spec``); off for a resumed
    run, whose checkpoint carries the network.

    >>> cfg = load_config(None, ["model.arch=resnet20", "data.name=cifar10", "objective.gamma=0.1"])
    >>> cfg.model.arch, cfg.objective.gamma
    ('resnet20', 0.1)
    """
    errors: list[str] = []
    raw: dict[str, Any] = _deepcopy(dict(base)) if base is not None else {}
    source = ""
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"--config {path}: no such file"], source) from None
        except IsADirectoryError:
            raise ConfigError([f"--config {path}: is a folder, not a TOML file"], source) from None
        except PermissionError:
            raise ConfigError([f"--config {path}: not readable (permission denied)"], source) from None
        except UnicodeDecodeError:
            raise ConfigError([f"--config {path}: not a TOML file (not UTF-8 text)"], source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"--config {path}: TOML syntax error: {exc}"], source) from None
        except OSError as exc:
            raise ConfigError([f"--config {path}: cannot be read ({exc.strerror or exc})"], source) from None
    raw = apply_overrides(raw, overrides, errors)
    try:
        cfg = from_dict(raw, source=source)
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors, source) from None
    if check_files:
        errors += _file_errors(cfg)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def _file_errors(cfg: RunConfig) -> list[str]:
    """Problems with files a configuration names (checked when it is loaded, not when a checkpoint is read):
    ``model.spec``, and the image folder or ``.npz`` file of ``data.root`` (headers only, no data loaded)."""
    errors: list[str] = []
    if cfg.data.name in ("folder", "array", "custom"):
        from .userdata import source_errors

        errors += source_errors(cfg.data.name, cfg.data.root, cfg.data.options)
    o = cfg.objective
    if o.cost == "latency" and o.latency_model:
        from theory.latency import LatencyError, load

        try:
            if not load(o.latency_model).costs(o.latency_target).coef:
                errors.append(f"objective.latency_model: {o.latency_model} has no {o.latency_target!r} entries")
        except LatencyError as exc:
            errors.append(f"objective.latency_model: {exc}")
    if cfg.model.arch != "spec":
        return errors
    from theory.spec import load_spec

    try:
        load_spec(cfg.model.spec)
    except ValueError as exc:
        errors.append(f"model.spec: {exc}")
    return errors


def to_toml(cfg: RunConfig) -> str:
    """A TOML rendering of ``cfg`` (echoed into every run directory as ``config.toml``)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        if prefix and (scalars or not tables):
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(cfg.to_dict(), "")
    return "\n".join(lines).rstrip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


__all__ = [
    "ARCH_KWARGS",
    "ConfigError",
    "DataConfig",
    "ExportConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RunConfig",
    "ThetaOptimConfig",
    "TrainConfig",
    "WeightOptimConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_value",
    "to_toml",
]
