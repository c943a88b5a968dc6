"""Tests of pruning.data on tiny fake datasets written in the exact on-disk formats (see fakedata.py)."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import CIFAR10_NAMES, CLASS_COLOURS, IMAGENET_CLASSES, write_cifar10, write_cifar100, write_imagenet

from pruning.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    DatasetNotFoundError,
    DataSplits,
    ImageFolderDataset,
    InMemoryDataset,
    InMemoryLoader,
    RandomCropFlip,
    WorkerLoader,
    load_dataset,
    make_loader,
    random_crop,
    random_hflip,
    random_resized_crop_params,
)


def batches(loader, epoch=None, start_batch=0):
    it = loader if epoch is None else loader.iter_epoch(epoch, start_batch)
    return [(x.clone(), y.clone()) for x, y in it]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    return root, write_cifar10(root)


def test_cifar10_loads_exact_format(cifar10_root):
    root, written = cifar10_root
    splits = load_dataset("cifar10", root)
    assert isinstance(splits, DataSplits)
    assert (splits.name, splits.num_classes, splits.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert splits.classes == tuple(CIFAR10_NAMES)
    train, test = splits.train, splits.test
    assert isinstance(train, InMemoryDataset) and len(train) == 40 and len(test) == 10
    assert train.inputs.dtype == torch.uint8 and train.inputs.shape == (40, 3, 32, 32)
    assert train.targets.dtype == torch.int64
    # rows are 1024 R, 1024 G, 1024 B values of a row-major 32x32 image
    assert np.array_equal(train.inputs.reshape(40, 3072).numpy(), written["train_data"])
    assert np.array_equal(test.inputs.reshape(10, 3072).numpy(), written["test_data"])
    raw = written["train_data"][7]
    assert train.inputs[7, 1, 2, 5] == raw[1024 + 2 * 32 + 5]
    assert train.inputs[7, 2, 31, 0] == raw[2048 + 31 * 32]
    assert np.array_equal(train.targets.numpy(), written["train_labels"])
    assert np.array_equal(test.targets.numpy(), written["test_labels"])
    x, y = train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y) == written["train_labels"][3]
    # the folder itself is also accepted as root
    assert len(load_dataset("CIFAR-10", root / "cifar-10-batches-py").train) == 40


def test_cifar10_normalisation_uses_train_statistics(cifar10_root):
    root, written = cifar10_root
    splits = load_dataset("cifar10", root)
    train, test = splits.train, splits.test
    x = train.prepare(train.inputs)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    pixels = written["train_data"].reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1) / 255.0
    np.testing.assert_allclose(train.mean.numpy(), pixels.mean(1), atol=1e-6)
    np.testing.assert_allclose(train.std.numpy(), pixels.std(1), atol=1e-6)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    expected = (test.inputs[0].float() / 255 - train.mean.view(3, 1, 1)) / train.std.view(3, 1, 1)
    torch.testing.assert_close(test[0][0], expected)
    plain = load_dataset("cifar10", root, normalize=False, augment=False)
    torch.testing.assert_close(plain.train[0][0], train.inputs[0].float() / 255)
    assert plain.train.augment is None


def test_cifar100_fine_and_coarse(tmp_path):
    written = write_cifar100(tmp_path)
    fine = load_dataset("cifar100", tmp_path)
    assert (fine.num_classes, fine.input_shape, len(fine.classes)) == (100, (3, 32, 32), 100)
    assert fine.classes[3] == "fine_3"
    assert np.array_equal(fine.train.targets.numpy(), written["train_fine"])
    assert np.array_equal(fine.test.inputs.reshape(-1, 3072).numpy(), written["test_data"])
    coarse = load_dataset("cifar-100", tmp_path, label_mode="coarse")
    assert coarse.num_classes == 20 and coarse.classes[0] == "coarse_0"
    assert np.array_equal(coarse.test.targets.numpy(), written["test_coarse"])


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = random_crop(x, 4, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifted = 0
    for i in range(16):
        windows = [
            (t, l) for t in range(9) for l in range(9) if torch.equal(padded[i, :, t : t + 32, l : l + 32], out[i])
        ]
        assert windows, f"sample {i} is not a crop of its padded image"
        shifted += windows[0] != (4, 4)
    assert shifted > 8  # offsets are random per sample
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)
    small = random_crop(x.float(), 2, torch.Generator().manual_seed(1), size=28)
    assert small.shape == (16, 3, 28, 28)


def test_random_hflip_flips_and_augmentation_is_seeded():
    x = torch.randn(32, 3, 8, 8)
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=0.0), x)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(32)]
    assert all(f or torch.equal(out[i], x[i]) for i, f in enumerate(flipped))
    assert 4 < sum(flipped) < 28
    aug = RandomCropFlip()
    a = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(6)))


def test_random_resized_crop_params_stay_inside_the_image():
    rng = random.Random(0)
    for width, height in ((40, 30), (24, 36), (500, 375), (3, 200)):
        for _ in range(50):
            left, top, w, h = random_resized_crop_params(width, height, rng)
            assert 0 < w and 0 < h and 0 <= left and left + w <= width and 0 <= top and top + h <= height


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


def index_dataset(n: int = 50) -> InMemoryDataset:
    """inputs[i] is a 1x4x4 image filled with i, so a batch reveals which samples it holds."""
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return InMemoryDataset(inputs, torch.arange(n))


def test_loader_order_is_a_function_of_seed_and_epoch():
    ds = index_dataset()
    loader = make_loader(ds, 8, train=True, seed=3, drop_last=False)
    assert isinstance(loader, InMemoryLoader) and len(loader) == 7
    epochs = [batches(loader) for _ in range(3)]  # plain iteration advances the epoch
    assert loader.epoch == 3
    for e, got in enumerate(epochs):
        ys = torch.cat([y for _, y in got])
        assert sorted(ys.tolist()) == list(range(50))  # a permutation of the whole split
        fresh = make_loader(ds, 8, train=True, seed=3, drop_last=False)
        fresh.set_epoch(e)
        assert same(batches(fresh), got)
        assert same(batches(make_loader(ds, 8, train=True, seed=3, drop_last=False, epoch=e)), got)
    assert not same(epochs[0], epochs[1])
    assert not same(batches(make_loader(ds, 8, train=True, seed=4, drop_last=False)), epochs[0])
    # resuming in the middle of an epoch
    assert same(batches(loader, epoch=1, start_batch=4), epochs[1][4:])
    assert loader.epoch == 3  # iter_epoch leaves the epoch counter alone


def test_loader_drop_last_and_eval_order():
    ds = index_dataset()
    train = make_loader(ds, 8, train=True, seed=0)
    assert len(train) == 6 and all(len(y) == 8 for _, y in train)
    test = make_loader(ds, 8, train=False, seed=0)
    assert len(test) == 7
    ys = torch.cat([y for _, y in test])
    assert torch.equal(ys, torch.arange(50))
    with pytest.raises(ValueError, match="non-negative"):
        make_loader(ds, 8, train=True, seed=-1)


def test_train_loader_augments_deterministically_and_test_loader_does_not(cifar10_root):
    root, _ = cifar10_root
    splits = load_dataset("cifar10", root)
    train = make_loader(splits.train, 16, train=True, seed=1, device="cpu")
    first = batches(train, epoch=0)
    assert len(first) == 2
    x, y = first[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert same(first, batches(make_loader(splits.train, 16, train=True, seed=1), epoch=0))
    assert not same(first, batches(train, epoch=1))
    # the same samples, visited in the same order, are augmented differently in another epoch
    order = train.order(0)
    plain = splits.train.prepare(splits.train.inputs[order[:16]])
    assert not torch.equal(x, plain)
    # augmentation acts on uint8 pixels before normalisation: padding is black, i.e. -mean/std
    black = (-splits.train.mean / splits.train.std).view(1, 3, 1, 1)
    assert torch.isclose(x, black.expand_as(x)).any()
    # the test split is never augmented (not even with train=True) and keeps its order
    test = batches(make_loader(splits.test, 4, train=False, seed=1))
    assert torch.equal(torch.cat([b for b, _ in test]), splits.test.prepare(splits.test.inputs))
    shuffled_loader = make_loader(splits.test, 10, train=True, seed=1)
    [(xs, _)] = batches(shuffled_loader)
    torch.testing.assert_close(xs, splits.test.prepare(splits.test.inputs[shuffled_loader.order(0)]))


def test_in_memory_subset_keeps_normalisation(cifar10_root):
    root, _ = cifar10_root
    train = load_dataset("cifar10", root).train
    sub = train.subset([3, 1])
    assert len(sub) == 2 and torch.equal(sub.targets, train.targets[[3, 1]])
    torch.testing.assert_close(sub[0][0], train[3][0])
    assert sub.augment is train.augment
    wrapped = make_loader(torch.utils.data.Subset(train, [3, 1, 4]), 2, train=True, seed=0)
    assert isinstance(wrapped, InMemoryLoader) and len(wrapped.dataset) == 3


# ---------------------------------------------------------------------------------------------
# mnist1d and digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d():
    return load_dataset("mnist1d")


def test_mnist1d_shapes_and_classes(mnist1d):
    assert (mnist1d.name, mnist1d.num_classes, mnist1d.input_shape) == ("mnist1d", 10, (1, 40))
    assert mnist1d.train.inputs.shape == (4000, 1, 40) and mnist1d.test.inputs.shape == (1000, 1, 40)
    assert mnist1d.train.inputs.dtype == torch.float32 and mnist1d.train.targets.dtype == torch.int64
    assert set(mnist1d.train.targets.tolist()) == set(range(10))
    x, y = next(iter(make_loader(mnist1d.train, 64, train=True, seed=0)))
    assert x.shape == (64, 1, 40)


def test_mnist1d_seed_cache_and_global_rng(mnist1d, tmp_path, monkeypatch):
    np.random.seed(123)  # noqa: NPY002
    other = load_dataset("mnist1d", tmp_path, seed=7)  # generated and cached
    after = np.random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    assert after == np.random.random()  # noqa: NPY002  (the generator's reseeding of the global RNG is undone)
    assert not torch.equal(other.train.inputs, mnist1d.train.inputs)
    files = list((tmp_path / "mnist1d").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("mnist1d.data.make_dataset", no_generation)
    again = load_dataset("mnist1d", tmp_path, seed=7, flatten=True)
    assert again.input_shape == (40,) and torch.equal(again.test.inputs, other.test.inputs.reshape(1000, 40))
    assert torch.equal(again.train.targets, other.train.targets)
    files[0].write_bytes(b"garbage")  # an unreadable cache is regenerated, with a warning
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="unreadable cache"):
        regenerated = load_dataset("mnist1d", tmp_path, seed=7)
    assert torch.equal(regenerated.train.inputs, other.train.inputs)


def test_digits_stratified_split():
    splits = load_dataset("digits", seed=0)
    assert (splits.num_classes, splits.input_shape) == (10, (1, 8, 8))
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.train.inputs.shape[1:] == (1, 8, 8) and splits.train.inputs.dtype == torch.float32
    assert abs(float(splits.train.inputs.mean())) < 1e-4 and abs(float(splits.train.inputs.std()) - 1) < 1e-2
    counts_train = torch.bincount(splits.train.targets, minlength=10).float()
    counts_test = torch.bincount(splits.test.targets, minlength=10).float()
    frac = counts_test / (counts_train + counts_test)
    assert float(frac.min()) > 0.17 and float(frac.max()) < 0.23
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.test.targets, splits.test.targets)
    assert not torch.equal(load_dataset("digits", seed=1).test.targets, splits.test.targets)
    flat = load_dataset("digits", flatten=True)
    assert flat.input_shape == (64,) and flat.train.inputs.shape[1:] == (64,)


# ---------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("data") / "imagenet")


def test_imagenet_folders(imagenet_root):
    splits = load_dataset("imagenet", imagenet_root)
    assert (splits.num_classes, splits.input_shape, splits.classes) == (3, (3, 224, 224), IMAGENET_CLASSES)
    train, val = splits.train, splits.test
    assert isinstance(train, ImageFolderDataset) and len(train) == 9 and len(val) == 6
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = val[2]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    assert torch.equal(val[2][0], x)  # eval transform is deterministic
    # a solid colour normalises to (colour / 255 - mean) / std
    expected = (torch.tensor(CLASS_COLOURS[1]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=0.05, rtol=0)
    a, _ = train[(4, 11)]
    assert a.shape == (3, 224, 224) and torch.equal(a, train[(4, 11)][0])
    # a parent folder holding imagenet/ works, and a class subset is relabelled in sorted order
    sub = load_dataset("imagenet", imagenet_root.parent, classes=[IMAGENET_CLASSES[2], IMAGENET_CLASSES[0]])
    assert sub.classes == (IMAGENET_CLASSES[0], IMAGENET_CLASSES[2]) and len(sub.test) == 4
    assert sub.test.targets.tolist() == [0, 0, 1, 1]


def test_imagenet_train_crops_vary_with_seed(tmp_path):
    from PIL import Image

    folder = tmp_path / "train" / "n0"
    folder.mkdir(parents=True)
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))
    Image.fromarray(gradient).save(folder / "a.png")
    ds = ImageFolderDataset(tmp_path / "train", train=True, image_size=16, resize_size=18)
    outs = [ds[(0, s)][0] for s in range(6)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert len({o.numpy().tobytes() for o in outs}) > 3


def test_imagenet_loader_is_deterministic_across_workers(imagenet_root):
    splits = load_dataset("imagenet", imagenet_root, image_size=32, resize_size=36)
    loader = make_loader(splits.train, 4, train=True, seed=0)
    assert isinstance(loader, WorkerLoader) and len(loader) == 2
    e0 = batches(loader)
    assert loader.epoch == 1 and e0[0][0].shape == (4, 3, 32, 32) and e0[0][1].dtype == torch.int64
    e1 = batches(loader)
    assert not same(e0, e1)
    workers = make_loader(splits.train, 4, train=True, seed=0, num_workers=2)
    assert same(batches(workers, epoch=1), e1) and same(batches(workers, epoch=0, start_batch=1), e0[1:])
    # a torch Subset (or .subset) keeps the seeded per-sample augmentation
    first6 = batches(make_loader(torch.utils.data.Subset(splits.train, range(6)), 3, train=True, seed=0))
    assert same(first6, batches(make_loader(splits.train.subset(range(6)), 3, train=True, seed=0)))
    assert sorted(torch.cat([y for _, y in first6]).tolist()) == [0, 0, 0, 1, 1, 1]
    val = batches(make_loader(splits.test, 4, train=False, seed=0))
    assert [len(y) for _, y in val] == [4, 2]
    assert torch.cat([y for _, y in val]).tolist() == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message and "CIFAR-10 python version" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(TypeError):
        load_dataset("digits", colour=True)


def test_missing_batch_file(tmp_path):
    write_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    assert str(missing) in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)


def test_corrupted_pickles_name_the_file(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    path = folder / "data_batch_2"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(DatasetError, match="cannot unpickle") as info:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(info.value)

    def rewrite(entry):
        path.write_bytes(pickle.dumps(entry, protocol=2))
        with pytest.raises(DatasetError) as info:
            load_dataset("cifar10", tmp_path)
        assert str(path) in str(info.value)
        return str(info.value)

    entry = pickle.loads(good, encoding="bytes")
    assert "missing key b'labels'" in rewrite({k: v for k, v in entry.items() if k != b"labels"})
    assert "(N, 3072)" in rewrite({**entry, b"data": entry[b"data"].reshape(-1, 3, 32, 32)})
    assert "uint8" in rewrite({**entry, b"data": entry[b"data"].astype(np.float32)})
    assert "labels for" in rewrite({**entry, b"labels": entry[b"labels"][:-1]})
    assert "expected [0, 9]" in rewrite({**entry, b"labels": [12] * len(entry[b"labels"])})
    assert "pickled dict" in rewrite([1, 2, 3])
    path.write_bytes(good)

    meta = folder / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    with pytest.raises(DatasetError, match="10 class names") as info:
        load_dataset("cifar10", tmp_path)
    assert str(meta) in str(info.value)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickles_cannot_run_code(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Payload()}, protocol=2))
    with pytest.raises(DatasetError, match="not allowed") as info:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(info.value)


def test_imagenet_layout_errors(tmp_path):
    root = write_imagenet(tmp_path / "a", n_val=1)
    # the official flat validation folder
    for image in (root / "val").rglob("*.JPEG"):
        image.rename(root / "val" / image.name)
    for folder in (root / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(DatasetError, match="one folder per class") as info:
        load_dataset("imagenet", root)
    assert str(root / "val") in str(info.value)

    root = write_imagenet(tmp_path / "b", n_val=1)
    empty = root / "train" / "n09999999"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no images") as info:
        load_dataset("imagenet", root)
    assert str(empty) in str(info.value)
    empty.rmdir()
    (root / "val" / "n09999999").mkdir()
    with pytest.raises(DatasetError, match="different class folders"):
        load_dataset("imagenet", root)

    bad = write_imagenet(tmp_path / "c", n_train=1, n_val=1)
    broken = next((bad / "val").rglob("*.JPEG"))
    broken.write_bytes(b"not a jpeg")
    val = load_dataset("imagenet", bad).test
    with pytest.raises(DatasetError, match="cannot read image") as info:
        val[0]
    assert str(broken) in str(info.value)


def test_default_root_from_environment(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))
    assert len(load_dataset("cifar10").test) == 10
    assert Path(os.environ["PRUNING_DATA"]) == tmp_path
