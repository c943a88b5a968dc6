"""From a configuration to the objects a run is made of: the data splits and the gated network.

``config -> data`` (:func:`load_data`: the dataset of ``[data]`` with its deterministic subsets) and
``config + data -> model`` (:func:`build_network`: ``[model]`` with the shape arguments the data
determine, :func:`model_kwargs`; ``arch = "spec"``: the network of a spec file).  A configuration these
cannot serve raises :class:`pruning.config.ConfigError` naming the field (``data.options``,
``model.kwargs``, ``model.arch``): option values a dataset rejects, architecture arguments that do not
build, and an architecture whose input dimensions do not fit the data (:func:`check_fits`, checked on
the ``meta`` device, no memory).  A network given in Python is checked against the data by
:func:`check_network_fits`.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from typing import Any

import torch

from theory.complexity import ComplexityModel
from theory.latency import LatencyCosts, LatencyError
from theory.latency import load as load_latency
from theory.spec import NetworkSpec, load_spec

from .config import ConfigError, RunConfig
from .data import DatasetError, DataSplits, InMemoryDataset, load_dataset
from .models import IMAGENET_ARCHS, GatedNetwork, build_model, from_spec

#: Dimensions of one input (without the batch) each architecture takes; the others take any shape.
ARCH_INPUT_DIMS = {"resnet1d": 2, "resnet20": 3, "resnet56": 3, "resnet110": 3, "wrn": 3,
                   **{arch: 3 for arch in IMAGENET_ARCHS}}
_DIMS_WORDS = {1: "1-D inputs (features)", 2: "2-D inputs (channels, length)",
               3: "3-D inputs (channels, height, width)"}


def load_data(cfg: RunConfig, data: DataSplits | None = None) -> DataSplits:
    """``load_dataset`` (or ``data``, given in Python) plus the deterministic subsets (first ``k`` examples) of
    ``[data]``.  The files of an image folder or array dataset that do not serve raise ``ConfigError`` naming
    ``data.root``."""
    d = cfg.data
    if data is not None:
        splits = data
    else:
        try:
            splits = load_dataset(d.name, d.root, **d.options)
        except DatasetError as exc:
            if d.name in ("folder", "array"):
                raise ConfigError([f"data.root: {exc}"]) from None
            raise
        except (ValueError, TypeError) as exc:  # an option value the loader rejects
            raise ConfigError([f"data.options: {exc} (dataset {d.name!r})"]) from None
    train, test = splits.train, splits.test
    if d.train_subset and d.train_subset < len(train):
        train = _first(train, d.train_subset)
    if d.test_subset and d.test_subset < len(test):
        test = _first(test, d.test_subset)
    return dataclasses.replace(splits, train=train, test=test)


def _first(ds: Any, k: int) -> Any:
    if isinstance(ds, InMemoryDataset):
        return ds.subset(range(k))
    return torch.utils.data.Subset(ds, range(k))


def data_record(data: DataSplits) -> dict[str, Any]:
    """What a checkpoint records of the data (primitives): size of the training split, shape, classes and the
    :class:`~pruning.data.Preprocess` of the inputs — all an export needs to describe its inputs and outputs."""
    return {
        "num_classes": int(data.num_classes), "input_shape": [int(n) for n in data.input_shape],
        "N": len(data.train), "name": data.name, "classes": [str(c) for c in data.classes],
        "preprocess": None if data.preprocess is None else data.preprocess.to_dict(),
    }


def config_for_data(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data.name = "custom"`` (no root, no options) for data given in Python: the run records
    that its data are not in a file (``load_data`` of the recorded configuration says so)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name="custom", root=None, options={}))


def model_kwargs(cfg: RunConfig, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``[model.kwargs]`` with the shape arguments the data determine filled in when not given."""
    kw = dict(cfg.model.kwargs)
    arch = cfg.model.arch
    if arch == "resnet1d" and len(input_shape) == 2:
        kw.setdefault("in_channels", int(input_shape[0]))
        kw.setdefault("length", int(input_shape[1]))
    elif arch == "residual_mlp":
        kw.setdefault("in_features", int(math.prod(input_shape)))
        kw.setdefault("hidden", [64, 64, 64])
    elif arch in ("resnet20", "resnet56", "resnet110") and len(input_shape) == 3:
        kw.setdefault("in_channels", int(input_shape[0]))
        kw.setdefault("image_size", int(input_shape[-1]))
    elif (arch in IMAGENET_ARCHS or arch == "wrn") and len(input_shape) == 3:
        kw.setdefault("in_channels", int(input_shape[0]))
        kw.setdefault("image_size", int(input_shape[-1]))
    for key in ("hidden", "stage_blocks", "widths"):
        if key in kw:
            kw[key] = list(kw[key])  # element types were validated (pruning.config): never truncated here
    return kw


def build_network(
    cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...], *, device: str | None = None
) -> GatedNetwork:
    """``build_model`` from ``[model]`` (``device="meta"``: structure only, no memory).

    ``arch = "spec"``: the network of the spec file ``model.spec``, which must fit the data
    (``num_classes``, ``input_shape``); ``ValueError`` naming ``model.spec`` otherwise.
    """
    m = cfg.model
    if m.arch == "custom":
        raise ValueError("model.arch = 'custom' names a network given in Python (Trainer(cfg, out, model=net)); it "
                         "is rebuilt only from its checkpoint — from a configuration use model.arch = 'spec'")
    if m.arch == "spec":
        try:
            spec = load_spec(m.spec)
        except ValueError as exc:
            raise ValueError(f"model.spec: {exc}") from None
        check_network_fits(spec, num_classes, input_shape, f"model.spec ({m.spec})")
        with torch.device(device) if device is not None else nullcontext():
            return from_spec(spec, mode=m.mode, estimator=m.estimator, theta_init=m.theta_init,
                             activation=str(m.kwargs.get("activation", "relu")))
    try:
        return build_model(
            m.arch,
            mode=m.mode,
            num_classes=num_classes,
            estimator=m.estimator,
            theta_init=m.theta_init,
            device=device,
            **model_kwargs(cfg, input_shape),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"model.kwargs: {exc} (arch {m.arch!r})"]) from None


def check_network_fits(spec: NetworkSpec, num_classes: int, input_shape: tuple[int, ...], what: str) -> None:
    """``ValueError`` naming ``what`` unless the network's classes and input shape are the data's."""
    if spec.num_classes != num_classes:
        raise ValueError(f"{what}: the network has {spec.num_classes} classes, the data {num_classes}")
    if tuple(spec.input_shape) != tuple(input_shape):
        raise ValueError(f"{what}: the network takes inputs of shape {tuple(spec.input_shape)}, the data has "
                         f"{tuple(input_shape)}")


def check_fits(cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`ConfigError` unless the configured network takes inputs of ``input_shape``.

    First the number of input dimensions (:data:`ARCH_INPUT_DIMS`), then one forward pass of a batch of
    two on the ``meta`` device (shapes only, no memory, no computation) for every other mismatch.
    """
    arch, shape = cfg.model.arch, tuple(int(s) for s in input_shape)
    where = f"data.name = {cfg.data.name!r} gives inputs of shape {shape}"
    want = ARCH_INPUT_DIMS.get(arch)
    if want is not None and len(shape) != want:
        fits = sorted(a for a, n in ARCH_INPUT_DIMS.items() if n == len(shape)) + ["residual_mlp"]
        raise ConfigError([f"model.arch: {arch!r} takes {_DIMS_WORDS[want]}, but {where}; choose an architecture "
                           f"for {len(shape)}-D inputs ({', '.join(fits)}) or another dataset"])
    given = cfg.model.kwargs
    derived = model_kwargs(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs={})), shape)
    wrong = [f"model.kwargs.{k} = {given[k]!r}, but {where} ({k} {derived[k]}); leave it out to take it from the data"
             for k in ("in_channels", "length", "image_size", "in_features")
             if k in given and k in derived and given[k] != derived[k]]
    if wrong:
        raise ConfigError(wrong)
    try:
        model = build_network(cfg, num_classes, shape, device="meta")
    except ValueError as exc:  # a spec file that does not fit the data (ConfigError is a ValueError: kept)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError([str(exc)]) from None
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.empty(2, *shape, device="meta"))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError([f"model.arch/model.kwargs: the network ({arch}, {dict(cfg.model.kwargs)}) does not take "
                           f"the data's inputs: {where} ({first[:200]})"]) from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError([f"model.arch: the network's output has shape {tuple(out.shape)[1:]}, expected "
                           f"({num_classes},) for the {num_classes} classes of {cfg.data.name!r}"])


__all__ = ["ARCH_INPUT_DIMS", "build_network", "check_fits", "check_network_fits", "config_for_data", "data_record",
           "load_data", "model_kwargs"]


def latency_costs(cfg: RunConfig, spec: NetworkSpec) -> LatencyCosts | None:
    """``objective.cost = "latency"``: the calibrated costs of ``objective.latency_model`` for ``spec``.

    ``None`` for the FLOPs/parameters cost.  :class:`ConfigError` naming ``objective.latency_model``
    if the file is missing or damaged, or lacks an entry for a layer kind of ``spec`` (calibrated
    for another network).
    """
    o = cfg.objective
    if o.cost != "latency":
        return None
    try:
        costs = load_latency(o.latency_model).costs(o.latency_target)
        ComplexityModel(spec, latency=costs)  # every layer kind of the network must be covered
    except LatencyError as exc:
        raise ConfigError([f"objective.latency_model: {exc}"]) from None
    return costs
