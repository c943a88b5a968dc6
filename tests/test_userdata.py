"""Your data: image folders, .npz arrays, torch Datasets from Python, and the export's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from pruning.build import data_record, load_data
from pruning.cli import main as cli
from pruning.config import ConfigError, load_config
from pruning.data import DatasetError, DataSplits, ImageFolderDataset, load_dataset, make_loader
from pruning.export import ExportMetadata, load_export, load_metadata
from pruning.train import Trainer, load_run
from pruning.userdata import CACHE_DIR, array_stats, from_datasets, holdout_split

CLASSES = ("eel", "cat", "dog")  # folders; the classes are their sorted names

FAST = ["model.theta_init=0.6", "objective.gamma=0.05", "optim.weights.lr=0.05", "optim.theta.lr=0.05",
        "train.epochs=1", "train.batch_size=4", "train.eval_batch_size=16", "train.prune_every=2",
        "train.device=cpu", "train.progress=false", "train.threads=1", "train.tensorboard=false"]


def write_folder(root: Path, *, n_train: int = 4, n_test: int | None = 2, test_dir: str = "test",
                 seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` (+ ``root/<test_dir>/``): noisy images of a per-class colour, 12x10 or 10x14."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = [("train", n_train)] + ([(test_dir, n_test)] if n_test else [])
    for split, n in splits:
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (12, 10) if i % 2 else (10, 14)
                base = np.array([60 + 80 * c, 200 - 70 * c, 90], dtype=np.int64)
                img = np.clip(base + rng.integers(-40, 41, size=(h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{name}_{i}.png")
    return root


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def images(n: int, shape: tuple[int, ...], k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent inputs: class c has mean 2c in channel 0, so a network can learn something."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[:, 0] += 2.0 * y.reshape((-1,) + (1,) * (len(shape) - 1))
    return x, y.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# the image folder
# ------------------------------------------------------------------------------------------------


def test_folder_classes_shape_and_normalisation_from_the_training_split(tmp_path):
    root = write_folder(tmp_path / "imgs")
    splits = load_dataset("folder", root, size=8, crop=6)
    assert splits.classes == ("cat", "dog", "eel") and splits.num_classes == 3
    assert splits.input_shape == (3, 6, 6) and (len(splits.train), len(splits.test)) == (12, 6)
    assert isinstance(splits.train, ImageFolderDataset) and splits.train.title == "folder"
    # the statistics are those of the training images after the eval transform, independently recomputed
    raw = splits.test
    plain = ImageFolderDataset(root / "train", train=False, image_size=6, resize_size=8, mean=None, std=None)
    pixels = np.stack([plain.pixels(i).numpy() for i in range(len(plain))]).astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))
    assert splits.preprocess is not None and splits.preprocess.mean is not None
    np.testing.assert_allclose(splits.preprocess.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(splits.preprocess.std, std, rtol=1e-10)
    assert splits.preprocess.scale == pytest.approx(1 / 255)
    # a test sample is its pixels normalised with the training statistics; Preprocess.apply agrees
    x, y = raw[(4, 0)]
    p = raw.pixels(4)
    np.testing.assert_allclose(x.numpy(), ((p.numpy() / 255.0 - mean[:, None, None]) / std[:, None, None]), atol=1e-5)
    assert torch.allclose(splits.preprocess.apply(p.unsqueeze(0))[0], x, atol=1e-5)
    assert y == raw.targets[4]
    assert "centre crop 6x6" in splits.preprocess.input
    gray = load_dataset("folder", root, size=8, channels=1, normalize=False, augment="flip")
    assert gray.input_shape == (1, 8, 8) and gray.train[(0, 1)][0].shape == (1, 8, 8)
    assert gray.preprocess.mean is None and "greyscale" in gray.preprocess.input


def test_folder_statistics_are_cached_and_follow_the_files(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs", n_train=2, n_test=1)
    first = load_dataset("folder", root, size=8).preprocess
    cached = list((root / CACHE_DIR).glob("folder-stats-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["images"] == 6

    def no_decoding(self, *a, **k):
        raise AssertionError("decoded although the statistics are cached")

    with monkeypatch.context() as m:
        m.setattr(ImageFolderDataset, "pixels", no_decoding)
        assert load_dataset("folder", root, size=8).preprocess == first
    # another transform or changed files: another digest, computed again
    load_dataset("folder", root, size=9)
    write_folder(tmp_path / "imgs", n_train=2, n_test=1, seed=1)  # rewrites the images
    changed = load_dataset("folder", root, size=8).preprocess
    assert len(list((root / CACHE_DIR).glob("*.json"))) == 3 and changed.mean != first.mean
    # given mean/std: no statistics; normalize=false: none at all
    given = load_dataset("folder", root, size=8, mean=[0.5] * 3, std=[0.25] * 3, cache=False)
    assert given.preprocess.mean == (0.5,) * 3 and given.preprocess.std == (0.25,) * 3
    assert load_dataset("folder", root, size=8, normalize=False).preprocess.mean is None


def test_folder_without_test_split_holds_out_a_stratified_deterministic_part(tmp_path):
    root = write_folder(tmp_path / "imgs", n_train=5, n_test=None)
    a = load_dataset("folder", root, size=8, test_fraction=0.4, split_seed=3, normalize=False)
    b = load_dataset("folder", root, size=8, test_fraction=0.4, split_seed=3, normalize=False)
    c = load_dataset("folder", root, size=8, test_fraction=0.4, split_seed=4, normalize=False)
    assert list(a.test._paths) == list(b.test._paths) != list(c.test._paths)
    assert len(a.test) == 6 and len(a.train) == 9  # 2 of the 5 images of each class
    assert np.bincount(a.test.targets).tolist() == [2, 2, 2]
    assert not set(a.test._paths) & set(a.train._paths)
    assert not a.test.train and a.train.train
    # the validation folder is the test split when there is no test folder
    val = write_folder(tmp_path / "v", n_train=2, n_test=1, test_dir="val")
    assert len(load_dataset("folder", val, size=8, normalize=False).test) == 3


def test_holdout_split_properties():
    y = np.array([0] * 7 + [1] * 3 + [2])
    train, test = holdout_split(y, 0.3, 0)
    assert np.bincount(y[test], minlength=3).tolist() == [2, 1, 0]  # round(2.1), max(round(0.9), 1), none of one
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))
    assert np.array_equal(holdout_split(y, 0.3, 0)[1], test)
    with pytest.raises(ValueError, match="test_fraction"):
        holdout_split(y, 1.0, 0)


def test_folder_and_option_errors_name_the_field(tmp_path):
    root = write_folder(tmp_path / "imgs", n_train=1, n_test=1)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.name=folder", f"data.root={json.dumps(str(tmp_path / 'nope'))}"])
    assert "data.root" in str(info.value) and "train" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.name=folder"])
    assert "data.root: must name the folder" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.name=folder", f"data.root={json.dumps(str(root))}", "data.options.sise=8",
                           "data.options.augment=\"spin\"", "data.options.size=0", "data.options.channels=2",
                           "data.options.test_fraction=1.5", "data.options.mean=[\"a\"]"])
    text = str(info.value)
    for field in ("data.options.sise: unknown option for dataset 'folder' (did you mean 'size'?)",
                  "data.options.augment: must be one of", "data.options.size: must be >= 1",
                  "data.options.channels: must be 1 (greyscale) or 3 (RGB)", "data.options.test_fraction: must lie",
                  "data.options.mean: expected list of number"):
        assert field in text
    with pytest.raises(ConfigError, match="data.options.crop: must not exceed size"):
        load_config(None, ["data.name=folder", f"data.root={json.dumps(str(root))}", "data.options.size=8",
                           "data.options.crop=9"])
    cfg = load_config(None, ["data.name=folder", f"data.root={json.dumps(str(root))}", "data.options.mean=[0.5]",
                             "data.options.std=[0.5]"])
    with pytest.raises(ConfigError, match="mean and std need 3 value"):
        load_data(cfg)
    (root / "test" / "cow").mkdir()
    with pytest.raises(ConfigError, match="different class folders") as info:
        load_data(load_config(None, ["data.name=folder", f"data.root={json.dumps(str(root))}"]))
    assert "'cow'" in str(info.value)
    with pytest.raises(ConfigError, match="data.options.test_fraction: must lie in"):
        load_config(None, ["data.name=digits", "data.options.test_fraction=0"])


# ------------------------------------------------------------------------------------------------
# the array file
# ------------------------------------------------------------------------------------------------


def test_array_images_with_test_split_and_class_names(tmp_path):
    x, y = images(30, (2, 5, 5))
    xt, yt = images(9, (2, 5, 5), seed=1)
    path = write_npz(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt, classes=np.array(["a", "b", "c"]))
    s = load_dataset("array", path)
    assert (s.input_shape, s.num_classes, s.classes, len(s.train), len(s.test)) == ((2, 5, 5), 3, ("a", "b", "c"),
                                                                                     30, 9)
    mean, std = x.astype(np.float64).mean(axis=(0, 2, 3)), x.astype(np.float64).std(axis=(0, 2, 3))
    np.testing.assert_allclose(s.preprocess.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(s.preprocess.std, std, rtol=1e-9)
    expect = (xt - mean[None, :, None, None]) / std[None, :, None, None]
    got = torch.stack([s.test[i][0] for i in range(9)])
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-5)
    assert torch.allclose(s.preprocess.apply(torch.from_numpy(xt)), got, atol=1e-5)
    # augmentation of image arrays acts on the training split's batches only
    aug = load_dataset("array", path, augment="crop-flip")
    xb, _ = next(iter(make_loader(aug.train, 8, train=True, seed=0)))
    assert xb.shape == (8, 2, 5, 5) and aug.test.augment is None and aug.train.augment.padding == 1
    # uint8 storage is kept; a flat (N, F) array is features, normalised per feature
    xu = (np.arange(40 * 6) % 256).reshape(40, 6).astype(np.uint8)
    flat = load_dataset("array", write_npz(tmp_path / "f.npz", x=xu, y=np.arange(40) % 2))
    assert flat.train.inputs.dtype == torch.uint8 and flat.input_shape == (6,) and len(flat.preprocess.mean) == 6


def test_array_without_test_split_holds_out_and_normalises_from_the_training_part(tmp_path):
    x, y = images(40, (1, 12))
    x[:, 0, 0] = 5.0  # one constant position does not make a constant channel
    path = write_npz(tmp_path / "s.npz", x=x, y=y)
    s = load_dataset("array", path, test_fraction=0.25, split_seed=2)
    train_idx, test_idx = holdout_split(y, 0.25, 2)
    assert (len(s.train), len(s.test), s.input_shape, s.classes) == (30, 10, (1, 12), ("0", "1", "2"))
    assert torch.equal(s.test.inputs, torch.from_numpy(x[test_idx]))
    assert s.preprocess.mean == pytest.approx(array_stats(x[train_idx])[0])
    assert "split_seed 2" in s.preprocess.input
    const = load_dataset("array", write_npz(tmp_path / "c.npz", x=np.ones((6, 2, 3), np.float32), y=np.arange(6) % 2))
    assert const.preprocess.std == (1.0, 1.0)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 1, 3))}, "missing the array 'y' (the file holds: x)"),
        ({"x": np.zeros((4, 1, 3, 3, 3)), "y": np.zeros(4, int)}, "'x' has shape (4, 1, 3, 3, 3); expected"),
        ({"x": np.zeros((4, 1, 3)), "y": np.zeros(3, int)}, "'y' has shape (3,); expected (4,)"),
        ({"x": np.zeros((4, 1, 3)), "y": np.zeros(4)}, "'y' has dtype float64; expected integer"),
        ({"x": np.zeros((4, 1, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 1, 3))}, "holds 'x_test' but not"),
        ({"x": np.zeros((4, 1, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 1, 4)), "y_test": np.zeros(2, int)},
         "'x_test' has shape (2, 1, 4) but 'x' has (4, 1, 3)"),
        ({"x": np.array([["a"]] * 4), "y": np.zeros(4, int)}, "'x' has dtype <U1; expected numbers"),
        ({"x": np.zeros((4, 1, 3)), "y": np.zeros(4, int), "classes": np.array([1, 2])}, "'classes' has shape (2,)"),
    ],
)
def test_array_file_problems_are_config_errors_naming_file_and_key(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.name=array", f"data.root={json.dumps(str(path))}"])
    assert f"data.root: {path}: " in str(info.value) and message in str(info.value)


def test_array_value_problems_and_the_command_line_exit_code(tmp_path, capsys):
    for arrays, message in (
        ({"x": np.zeros((4, 1, 3), np.float32), "y": np.array([0, 1, 2, 3]), "classes": np.array(["a", "b"])},
         "'y' has labels in [0, 3], expected 0..1"),
        ({"x": np.full((4, 1, 3), np.nan, np.float32), "y": np.zeros(4, int)}, "'x' holds a non-finite value"),
    ):
        path = write_npz(tmp_path / "v.npz", **arrays)
        cfg = load_config(None, ["data.name=array", f"data.root={json.dumps(str(path))}"])
        with pytest.raises(ConfigError) as info:
            load_data(cfg)
        assert str(path) in str(info.value) and message in str(info.value)
    (tmp_path / "np.npy").write_bytes(b"junk")
    out = tmp_path / "run"
    code = cli(["train", "--set", "data.name=array", "--set", f"data.root={json.dumps(str(tmp_path / 'np.npy'))}",
                "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "not a readable .npz file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.options.augment: must be one of"):
        load_config(None, ["data.name=array", f"data.root={json.dumps(str(path))}", "data.options.augment=\"x\""])


# ------------------------------------------------------------------------------------------------
# short trainings and the export's metadata
# ------------------------------------------------------------------------------------------------


TINY_NET = """name = "tiny"
input_shape = [3, 8, 8]
num_classes = 3
[[stem]]
kind = "conv2d"
in_width = 3
out_width = 4
kernel = 3
bn = true
act = true
[[blocks]]
in_width = 4
out_width = 4
[[blocks.path]]
kind = "conv2d"
in_width = 4
out_width = 4
kernel = 3
bn = true
act = true
[[blocks.path]]
kind = "conv2d"
in_width = 4
out_width = 4
kernel = 3
bn = true
[[head]]
kind = "linear"
in_width = 4
out_width = 3
bias = true
"""


def write_spec(path: Path) -> Path:
    path.write_text(TINY_NET)
    return path


def test_folder_trains_and_the_export_carries_classes_and_normalisation(tmp_path):
    root = write_folder(tmp_path / "imgs")
    cfg = load_config(None, [*FAST, "data.name=folder", f"data.root={json.dumps(str(root))}", "data.options.size=8",
                             "data.options.augment=\"crop-flip\"", "model.arch=spec",
                             f"model.spec={json.dumps(str(write_spec(tmp_path / 'net.toml')))}",
                             "export.enabled=false"])  # fit() and the command line export alike (export_run)
    report = Trainer(cfg, tmp_path / "run").fit()
    assert report is not None and 0.0 <= report["test_accuracy"] <= 1.0
    # the command line's export, from the run folder alone
    assert cli(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    program, meta = load_export(tmp_path / "export")
    data = load_data(cfg)
    assert isinstance(meta, ExportMetadata)
    assert (meta.classes, meta.input_shape, meta.num_classes, meta.dataset) == (("cat", "dog", "eel"), (3, 8, 8), 3,
                                                                                "folder")
    assert meta.preprocess == data.preprocess
    # a deployed network: raw pixels in, the metadata's preprocessing, the trained network's outputs
    raw = torch.stack([data.test.pixels(i) for i in range(4)])
    x = torch.stack([data.test[i][0] for i in range(4)])
    _, model, ckpt = load_run(tmp_path / "run")
    assert torch.allclose(program(meta.prepare(raw)), model(x), atol=1e-4)
    assert ckpt["data"] == data_record(data) and load_metadata(tmp_path / "export") == meta
    with pytest.raises(ValueError, match="expected a batch of inputs shaped"):
        meta.prepare(torch.zeros(2, 3, 9, 9))


def test_array_trains_on_signals(tmp_path):
    x, y = images(48, (2, 16))
    path = write_npz(tmp_path / "sig.npz", x=x, y=y, classes=np.array(["lo", "mid", "hi"]))
    cfg = load_config(None, [*FAST, "data.name=array", f"data.root={json.dumps(str(path))}",
                             "model.arch=resnet1d", "model.kwargs.stage_blocks=[1, 1]", "model.kwargs.widths=[4, 8]",
                             "train.epochs=2", "export.enabled=false"])
    report = Trainer(cfg, tmp_path / "run").fit()
    assert report is not None and report["config"]["data"]["name"] == "array"
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["data"]["classes"] == ["lo", "mid", "hi"] and ckpt["data"]["input_shape"] == [2, 16]
    assert ckpt["data"]["preprocess"]["mean"] == pytest.approx(list(array_stats(x[holdout_split(y, 0.2, 0)[0]])[0]))


class Noisy(Dataset):
    """A plain torch Dataset (not a TensorDataset) with a random transform that draws from torch's RNG."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(self.x[i].shape), self.y[i]


def test_python_datasets_keep_the_seeded_order_and_the_shards(tmp_path):
    x, y = (torch.from_numpy(a) for a in images(24, (1, 6, 6)))
    data = from_datasets(Noisy(x, y), Noisy(x[:8], y[:8]), classes=["a", "b", "c"])
    assert (data.input_shape, data.num_classes) == ((1, 6, 6), 3)

    def epoch(e, **kw):
        return [(a.clone(), b.clone()) for a, b in make_loader(data.train, 6, train=True, seed=5, **kw).iter_epoch(e)]

    one = epoch(1)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(one, epoch(1)))
    assert not torch.equal(one[0][0], epoch(2)[0][0])
    halves = [epoch(1, rank=r, world_size=2) for r in (0, 1)]
    for k, (xb, yb) in enumerate(one):  # two processes together see the batches of one, noise included
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), xb)
        assert torch.equal(torch.cat([halves[0][k][1], halves[1][k][1]]), yb)
    # number of classes from the labels; a TensorDataset stays in memory; mismatched shapes are refused
    tensors = from_datasets(TensorDataset(x, y), TensorDataset(x[:4], y[:4]))
    assert tensors.num_classes == 3 and type(tensors.train).__name__ == "InMemoryDataset"
    with pytest.raises(DatasetError, match="shape"):
        from_datasets(TensorDataset(x, y), TensorDataset(x[:4, :, :5], y[:4]))


def test_python_datasets_train_and_the_run_records_custom_data(tmp_path, capsys):
    x, y = (torch.from_numpy(a) for a in images(32, (1, 6, 6)))
    data = from_datasets(Noisy(x, y), Noisy(x[:12], y[:12]), classes=["a", "b", "c"])
    cfg = load_config(None, [*FAST, "model.arch=resnet20", "model.kwargs.width=4", "export.enabled=false",
                             "data.train_subset=20"])
    trainer = Trainer(cfg, tmp_path / "run", data=data)
    assert len(trainer.data.train) == 20
    report = trainer.fit()
    assert report is not None and report["config"]["data"]["name"] == "custom"
    code = cli(["evaluate", "--run", str(tmp_path / "run")])
    assert code == 2 and "given in Python" in capsys.readouterr().err
    # a resume passes the data again (here in the pair form)
    resumed = Trainer(cfg, tmp_path / "run", resume=True, data=(Noisy(x, y), Noisy(x[:12], y[:12])))
    assert resumed.progress.epoch == 1 and resumed.cfg.data.name == "custom"


def test_old_exports_and_broken_metadata_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"input_shape": [1, 2], "num_classes": 3, "classes": ["a"]}))
    with pytest.raises(ValueError, match="1 class names for num_classes = 3"):
        load_metadata(tmp_path)


def test_splits_record_their_preprocessing():
    digits = load_dataset("digits")
    assert isinstance(digits, DataSplits) and digits.preprocess.scale == pytest.approx(1 / 16)
    assert len(digits.preprocess.mean) == 1
    assert digits.preprocess.apply(torch.full((2, 1, 8, 8), 16.0)).shape == (2, 1, 8, 8)
