"""Configuration holes: list element types, dataset options, --config not a file, architecture vs data shape —
each exits 2 naming the field, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruning.cli import main
from pruning.config import ConfigError, load_config

TINY = ["--set", "data.name=digits", "--set", "data.train_subset=64", "--set", "data.test_subset=32",
        "--set", "train.epochs=1", "--set", "train.batch_size=32", "--set", "train.device=cpu",
        "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "export.enabled=false"]


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    out = tmp_path / "runs" / "run"
    code = main(["train", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert not out.exists() and not out.parent.exists(), "a refused configuration wrote something"
    return err


@pytest.mark.parametrize(("value", "field", "bad"), [
    ("[4.5, 8, 8]", "model.kwargs.widths[0]", "float 4.5"),
    ('["a", 8, 8]', "model.kwargs.widths[0]", "str 'a'"),
    ("[8, true, 8]", "model.kwargs.widths[1]", "bool True"),
])
def test_list_elements_are_type_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, field: str,
                                        bad: str) -> None:
    err = _refused(tmp_path, capsys, "--set", f"model.kwargs.widths={value}")
    assert f"{field}: expected integer, got {bad}" in err


def test_sizes_must_be_positive_and_fit_together() -> None:
    with pytest.raises(ConfigError, match=r"model.kwargs.hidden: must be a non-empty list of positive integers"):
        load_config(None, ["model.arch=residual_mlp", "model.kwargs.hidden=[4, 0]"])
    with pytest.raises(ConfigError, match=r"model.kwargs.widths: needs one width per stage"):
        load_config(None, ["model.kwargs.widths=[4, 8]", "model.kwargs.stage_blocks=[1, 1, 1]"])
    with pytest.raises(ConfigError, match=r"model.kwargs.length: must be positive"):
        load_config(None, ["model.kwargs.length=0"])


def test_a_misspelt_dataset_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(tmp_path, capsys, "--set", "data.options.sead=1")
    assert "data.options.sead: unknown option for dataset 'mnist1d' (did you mean 'seed'?)" in err
    err = _refused(tmp_path, capsys, *TINY, "--set", "data.options.test_fraction=\"x\"")
    assert "data.options.test_fraction: expected number" in err
    err = _refused(tmp_path, capsys, *TINY, "--set", "data.options.test_fraction=1.5")
    assert "data.options.test_fraction: must lie in (0, 1), got 1.5" in err


def test_unknown_keys_suggest_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"train.epoch: unknown key \(did you mean 'epochs'\?\)"):
        load_config(None, ["train.epoch=3"])


def test_config_must_be_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(tmp_path, capsys, "--config", str(tmp_path))
    assert f"--config {tmp_path}: is a folder, not a TOML file" in err
    binary = tmp_path / "weights.toml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 10)
    err = _refused(tmp_path, capsys, "--config", str(binary))
    assert str(binary) in err


@pytest.mark.parametrize(("args", "field"), [
    (["--set", "model.arch=resnet20", "--set", "data.options.flatten=true"], "model.arch: 'resnet20' takes 3-D"),
    (["--set", "model.arch=resnet1d"], "model.arch: 'resnet1d' takes 2-D"),
    (["--set", "model.arch=resnet20", "--set", "model.kwargs.in_channels=3"], "model.kwargs.in_channels = 3"),
    (["--set", "model.arch=resnet20", "--set", "model.kwargs.image_size=32"], "model.kwargs.image_size = 32"),
])
def test_architecture_and_data_dimensions_must_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  args: list[str], field: str) -> None:
    err = _refused(tmp_path, capsys, *TINY, *args)
    assert field in err and ("(1, 8, 8)" in err or "(64,)" in err)
