"""Writers of tiny fake datasets in the exact on-disk formats that ``pruning.data`` reads.

* CIFAR-10 "python version": ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
  ``batches.meta`` - pickled dicts with bytes keys (what the original Python 2 ``cPickle`` files
  give under ``pickle.load(f, encoding="bytes")``); ``b"data"`` is a uint8 (N, 3072) array whose
  rows hold the 1024 red, then green, then blue values of a 32x32 image in row-major order;
  ``b"labels"`` is a list of ints.
* CIFAR-100 "python version": ``cifar-100-python/train``, ``test``, ``meta`` with
  ``b"fine_labels"``/``b"coarse_labels"`` and ``b"fine_label_names"``/``b"coarse_label_names"``.
* ImageNet: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` written with PIL.

Each writer returns what it wrote so a test can compare the loaded arrays with it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the originals are protocol-2 cPickle files


def _batch(rng: np.random.Generator, n: int, labels: dict[bytes, list[int]], batch_label: bytes) -> dict:
    entry: dict[bytes, object] = {
        b"batch_label": batch_label,
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
    }
    entry.update(labels)
    return entry


def write_cifar10(root: Path, n_per_batch: int = 8, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a fake CIFAR-10 tree under ``root``; returns the train/test ``data`` and ``labels`` arrays."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        entry = _batch(rng, n_per_batch, {b"labels": labels}, f"training batch {i} of 5".encode())
        _dump(folder / f"data_batch_{i}", entry)
        train_x.append(entry[b"data"])
        train_y.extend(labels)
    test_labels = [int(v) for v in rng.integers(0, 10, n_test)]
    test = _batch(rng, n_test, {b"labels": test_labels}, b"testing batch 1 of 1")
    _dump(folder / "test_batch", test)
    _dump(
        folder / "batches.meta",
        {b"num_cases_per_batch": n_per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072},
    )
    return {
        "train_data": np.concatenate(train_x),
        "train_labels": np.array(train_y),
        "test_data": test[b"data"],
        "test_labels": np.array(test_labels),
    }


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a fake CIFAR-100 tree under ``root``; returns data, fine and coarse labels of both splits."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        entry = _batch(rng, n, {b"fine_labels": fine, b"coarse_labels": coarse}, split.encode())
        _dump(folder / split, entry)
        out[f"{split}_data"] = entry[b"data"]
        out[f"{split}_fine"] = np.array(fine)
        out[f"{split}_coarse"] = np.array(coarse)
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        },
    )
    return out


IMAGENET_CLASSES = ("n01440764", "n01443537", "n01484850")
CLASS_COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def write_imagenet(
    root: Path,
    classes: tuple[str, ...] = IMAGENET_CLASSES,
    n_train: int = 3,
    n_val: int = 2,
    sizes: tuple[tuple[int, int], ...] = ((40, 30), (24, 36), (33, 33)),
) -> Path:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: solid images of a per-class colour.

    Image ``i`` of a class has size ``sizes[i % len(sizes)]`` (landscape, portrait, square).
    """
    from PIL import Image

    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = CLASS_COLOURS[c % len(CLASS_COLOURS)]
                img = Image.new("RGB", sizes[i % len(sizes)], colour)
                img.save(folder / f"{wnid}_{split}_{i}.JPEG", format="JPEG", quality=95)
    return root
