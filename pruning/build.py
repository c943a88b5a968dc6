"""From a configuration to the objects a run is made of: the data splits and the gated network.

``config -> data`` (:func:`load_data`: the dataset of ``[data]`` with its deterministic subsets) and
``config + data -> model`` (:func:`build_network`: ``[model]`` with the shape arguments the data
determine, :func:`model_kwargs`; ``arch = "spec"``: the network of a spec file).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from theory.spec import NetworkSpec, load_spec

from .config import RunConfig
from .data import DataSplits, InMemoryDataset, load_dataset
from .models import IMAGENET_ARCHS, GatedNetwork, build_model, from_spec


def load_data(cfg: RunConfig) -> DataSplits:
    """``load_dataset`` plus the optional deterministic subsets (first ``k`` examples) of ``[data]``."""
    d = cfg.data
    splits = load_dataset(d.name, d.root, **d.options)
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
    elif (arch in IMAGENET_ARCHS or arch == "wrn") and len(input_shape) == 3:
        kw.setdefault("in_channels", int(input_shape[0]))
        kw.setdefault("image_size", int(input_shape[-1]))
    for key in ("hidden", "stage_blocks", "widths"):
        if key in kw:
            kw[key] = [int(v) for v in kw[key]]
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
        check_fits(spec, num_classes, input_shape, f"model.spec ({m.spec})")
        with torch.device(device) if device is not None else nullcontext():
            return from_spec(spec, mode=m.mode, estimator=m.estimator, theta_init=m.theta_init,
                             activation=str(m.kwargs.get("activation", "relu")))
    return build_model(
        m.arch,
        mode=m.mode,
        num_classes=num_classes,
        estimator=m.estimator,
        theta_init=m.theta_init,
        device=device,
        **model_kwargs(cfg, input_shape),
    )


def check_fits(spec: NetworkSpec, num_classes: int, input_shape: tuple[int, ...], what: str) -> None:
    """``ValueError`` naming ``what`` unless the network's classes and input shape are the data's."""
    if spec.num_classes != num_classes:
        raise ValueError(f"{what}: the network has {spec.num_classes} classes, the data {num_classes}")
    if tuple(spec.input_shape) != tuple(input_shape):
        raise ValueError(f"{what}: the network takes inputs of shape {tuple(spec.input_shape)}, the data has "
                         f"{tuple(input_shape)}")


__all__ = ["build_network", "check_fits", "load_data", "model_kwargs"]
