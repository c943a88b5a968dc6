"""From a configuration to the objects a run is made of: the data splits and the gated network.

``config -> data`` (:func:`load_data`: the dataset of ``[data]`` with its deterministic subsets) and
``config + data -> model`` (:func:`build_network`: ``[model]`` with the shape arguments the data
determine, :func:`model_kwargs`).  A configuration these cannot serve raises
:class:`pruning.config.ConfigError` naming the field (``data.options``, ``model.kwargs``, ``model.arch``):
option values a dataset rejects, architecture arguments that do not build, and an architecture whose
input dimensions do not fit the data (:func:`check_fits`, checked on the ``meta`` device, no memory).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .config import ConfigError, RunConfig
from .data import DatasetError, DataSplits, InMemoryDataset, load_dataset
from .models import GatedNetwork, build_model

#: Dimensions of one input (without the batch) each architecture takes; the others take any shape.
ARCH_INPUT_DIMS = {"resnet1d": 2, "resnet20": 3, "resnet56": 3, "resnet110": 3, "resnet50": 3}
_DIMS_WORDS = {1: "1-D inputs (features)", 2: "2-D inputs (channels, length)",
               3: "3-D inputs (channels, height, width)"}


def load_data(cfg: RunConfig) -> DataSplits:
    """``load_dataset`` plus the optional deterministic subsets (first ``k`` examples) of ``[data]``."""
    d = cfg.data
    try:
        splits = load_dataset(d.name, d.root, **d.options)
    except DatasetError:
        raise
    except (ValueError, TypeError) as exc:  # an option value the loader rejects
        raise ConfigError([f"data.options: {exc} (dataset {d.name!r})"]) from None
    train, test = splits.train, splits.test
    if d.train_subset and d.train_subset < len(train):
        train = _first(train, d.train_subset)
    if d.test_subset and d.test_subset < len(test):
        test = _first(test, d.test_subset)
    return DataSplits(train, test, splits.num_classes, splits.input_shape, splits.name, splits.classes)


def _first(ds: Any, k: int) -> Any:
    if isinstance(ds, InMemoryDataset):
        return ds.subset(range(k))
    return torch.utils.data.Subset(ds, range(k))


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
    elif arch == "resnet50" and len(input_shape) == 3:
        kw.setdefault("image_size", int(input_shape[-1]))
    for key in ("hidden", "stage_blocks", "widths"):
        if key in kw:
            kw[key] = list(kw[key])  # element types were validated (pruning.config): never truncated here
    return kw


def build_network(
    cfg: RunConfig, num_classes: int, input_shape: tuple[int, ...], *, device: str | None = None
) -> GatedNetwork:
    """``build_model`` from ``[model]`` (``device="meta"``: structure only, no memory)."""
    m = cfg.model
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
    model = build_network(cfg, num_classes, shape, device="meta")
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


__all__ = ["ARCH_INPUT_DIMS", "build_network", "check_fits", "load_data", "model_kwargs"]
