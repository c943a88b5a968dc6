"""Run configuration: TOML -> frozen dataclasses, --set overrides, validation that names every bad field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pruning.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_value,
    to_toml,
    tomllib,
)

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_default_is_valid_and_frozen() -> None:
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.data.name == "mnist1d" and cfg.model.arch == "resnet1d" and cfg.model.mode == "combined"
    assert cfg.train.eps == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_toml_round_trip() -> None:
    cfg = load_config(None, ["objective.gamma=0.25", "model.kwargs.widths=[4, 8]", "model.kwargs.stage_blocks=[1, 1]",
                             "data.options.seed=3", "optim.weights.schedule=\"cosine-restarts\"",
                             "optim.weights.restarts=[5]"])
    text = to_toml(cfg)
    again = from_dict(tomllib.loads(text))
    assert again == cfg
    assert again.to_dict()["objective"]["lambda"] == cfg.objective.lambda_


def test_overrides_are_typed() -> None:
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("cifar10") == "cifar10" and parse_value('"x"') == "x"
    cfg = load_config(None, ["objective.gamma=1", "train.device=cpu", "objective.lambda=30"])
    assert isinstance(cfg.objective.gamma, float) and cfg.objective.gamma == 1.0
    assert cfg.objective.lambda_ == 30.0 and cfg.train.device == "cpu"
    errors: list[str] = []
    out = apply_overrides({"a": 1}, ["a.b=2", "novalue", "=3"], errors)
    assert out == {"a": 1} and len(errors) == 3


def test_every_bad_field_is_named_at_once() -> None:
    bad = [
        "objective.gamma=0",
        "objective.rho=1.5",
        "objective.delta=-0.1",
        "train.eps=1.0",
        "train.epochs=0",
        "model.arch=resnet9000",
        "model.mode=half",
        "data.name=mnist2d",
        "train.batch_size=many",
        "train.bogus=1",
        "nosection.key=1",
        "model.estimator=guess",
        "objective.elementwise=3",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(None, bad)
    err = info.value
    named = "\n".join(err.errors)
    for field in ("objective.gamma", "objective.rho", "objective.delta", "train.eps", "train.epochs", "model.arch",
                  "model.mode", "data.name", "train.batch_size", "train.bogus", "nosection", "model.estimator",
                  "objective.elementwise"):
        assert field in named, field
    assert len(err.errors) == len(bad)
    assert all(line in str(err) for line in err.errors)


def test_arch_kwargs_checked() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.kwargs.depth=3", "model.kwargs.widths=4"])
    text = str(info.value)
    assert "model.kwargs.depth" in text and "model.kwargs.widths" in text
    load_config(None, ["model.arch=residual_mlp", "model.kwargs.hidden=[8, 8]"])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    p = tmp_path / "broken.toml"
    p.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="TOML syntax"):
        load_config(p)
    p.write_text("[train]\nepochs = -1\neps = 2\n[objective]\nlambda = -3\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert {e.split(":")[0] for e in info.value.errors} == {"train.epochs", "train.eps", "objective.lambda"}


@pytest.mark.parametrize("name", ["default", "cifar10_resnet56", "cifar10_resnet110", "cifar100_resnet110",
                                  "imagenet_resnet50"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg.train.eps == 0.1
    if name == "default":
        assert cfg == RunConfig(), "default.toml must be the embedded default"
    else:
        assert cfg.optim.kind == "sgd-adam" and cfg.optim.weights.momentum == 0.9
        expected_lambda = {"cifar10": 30.0, "cifar100": 37.5, "imagenet": 128.0}[cfg.data.name]
        assert cfg.objective.lambda_ == expected_lambda
