"""Your data: a folder of images, a numpy array file, or any torch ``Dataset`` given in Python.

========== ==================================================== ====================================
name       source (``data.root``)                               input shape
========== ==================================================== ====================================
folder     ``root/train/<class>/*.png|jpg|jpeg`` (+ ``test/``     (channels, crop, crop), lazily
           or ``val/``), class names = sorted folder names      decoded with PIL (no torchvision)
array      one ``.npz`` file: ``x``, ``y`` [, ``x_test``,         x.shape[1:]: (F,), (C, L) or
           ``y_test``] [, ``classes``]                           (C, H, W), in memory
custom     torch Datasets given in Python (:func:`from_datasets`, whatever they return
           ``Trainer(cfg, out, data=...)``)
========== ==================================================== ====================================

Both file-based datasets normalise per channel with the mean and std of their *training split*
(the images after the evaluation transform; the training array), computed deterministically — an
image folder's once, then cached in ``root/.pruning-cache/`` under a digest of the file list, sizes,
modification times and transform — unless ``mean``/``std`` are given.  Without a test split, a
stratified held-out part of the training data is the test split: ``round(test_fraction * n_c)`` of
the ``n_c`` samples of each class (at least one of a class with two or more), drawn with
``split_seed``; the rest is the training split.  Every split records its :class:`Preprocess`, which
checkpoints and exports carry (:func:`pruning.export.load_metadata`).

Batches come from the loaders of :mod:`pruning.data`: an image folder through worker processes per
rank (``data.num_workers``) like ImageNet, arrays from memory; the order and the augmentation of an
epoch are functions of ``(seed, epoch)``, and a data-parallel run shards every global batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from theory.atomic import atomic_write_text

from .data import (
    FOLDER_AUGMENTS,
    DatasetError,
    DatasetNotFoundError,
    DataSplits,
    ImageFolderDataset,
    InMemoryDataset,
    Preprocess,
    RandomCropFlip,
    _channel_histograms,
    _listing,
    _same_class_folders,
    _stats_from_histograms,
)

#: Folders of an image-folder dataset's test split, in order of preference.
FOLDER_TEST_DIRS = ("test", "val")
#: Train-time augmentations of the array dataset (image arrays (N, C, H, W) only, except "none").
ARRAY_AUGMENTS = ("none", "flip", "crop-flip")
CACHE_DIR = ".pruning-cache"


# ------------------------------------------------------------------------------------------------
# the held-out split
# ------------------------------------------------------------------------------------------------


def holdout_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, test indices)``, each sorted: a stratified held-out part of each class.

    Of the ``n_c`` samples of class ``c`` (classes in increasing order), ``round(fraction * n_c)`` —
    at least one and at most ``n_c - 1`` when ``n_c >= 2``, none when ``n_c == 1`` — go to the test
    split, chosen by permutations drawn from ``numpy.random.default_rng(seed)``: a function of
    ``(targets, fraction, seed)`` only.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {fraction!r}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(int(seed))
    test: list[np.ndarray] = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        k = 0 if len(idx) < 2 else min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(targets), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def _required_root(root: str | os.PathLike[str] | None, what: str) -> Path:
    if root is None or str(root) == "":
        raise DatasetError(f"data.root must name {what}")
    return Path(root).expanduser()


def _pair(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, where: str
          ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Given ``mean``/``std`` (both or neither; ``channels`` values each, std > 0) as tuples, or ``None``."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError(f"{where}: give both mean and std, or neither (to compute them from the training split)")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"{where}: mean and std need {channels} value(s) each (one per channel), got "
                         f"{len(mean)} and {len(std)}")
    if not all(np.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
        raise ValueError(f"{where}: mean must be finite and std finite and > 0, got mean {list(mean)}, std {list(std)}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ------------------------------------------------------------------------------------------------
# an image folder
# ------------------------------------------------------------------------------------------------


def load_folder(
    root: str | os.PathLike[str] | None = None,
    *,
    size: int = 32,
    crop: int = 0,
    channels: int = 3,
    augment: str = "none",
    normalize: bool = True,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    cache: bool = True,
) -> DataSplits:
    """An image-folder dataset: ``root/train/<class>/*.{png,jpg,jpeg}``, test split ``root/test`` or ``root/val``.

    Class names are the sorted folder names of ``train/``; a test folder must hold the same ones.
    Images are decoded with PIL as RGB (``channels = 3``) or greyscale (``1``); the evaluation
    transform resizes the shorter side to ``size`` and centre-crops ``crop`` x ``crop`` (``crop = 0``:
    ``size``).  ``augment`` (training split only) is one of ``"none"``, ``"flip"``, ``"crop-flip"``
    (random crop after zero-padding by crop // 8, then a flip) or ``"random-resized-crop"``
    (ImageNet's).  With ``normalize`` the inputs are ``(pixel / 255 - mean) / std`` per channel, with
    ``mean``/``std`` given or computed from the training split (exact, via value counts of the
    transformed pixels; cached in ``root/.pruning-cache/`` when ``cache``).  Without a ``test/`` or
    ``val/`` folder, :func:`holdout_split` (``test_fraction``, ``split_seed``) makes one.
    """
    base = _required_root(root, "the folder holding train/<class>/ image folders (data.name = 'folder')")
    crop = crop or size
    if crop > size:
        raise ValueError(f"crop ({crop}) must not exceed size ({size}), the shorter side after resizing")
    given = _pair(mean, std, channels, "folder")
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(
            f"folder: expected {train_dir} holding one folder per class (train/<class>/*.png|jpg|jpeg), and "
            f"optionally {base / 'test'} with the same class folders; {_listing(base)}"
        )
    kw: dict[str, Any] = {"image_size": crop, "resize_size": size, "channels": channels, "title": "folder",
                          "mean": None, "std": None}
    train = ImageFolderDataset(train_dir, train=True, augment=augment, **kw)
    test_dir = next((base / n for n in FOLDER_TEST_DIRS if (base / n).is_dir()), None)
    if test_dir is not None:
        _same_class_folders(train_dir, test_dir, train.classes, "folder")
        test = ImageFolderDataset(test_dir, train=False, classes=train.classes, **kw)
    else:
        train_idx, test_idx = holdout_split(train.targets, test_fraction, split_seed)
        if not len(test_idx):
            raise DatasetError(f"folder: {base} has no test/ or val/ folder and no class of {train_dir} has two "
                               f"images to hold one out for testing; add a test/ folder")
        test = copy.copy(train)
        test.train = False
        test, train = test.subset(test_idx.tolist()), train.subset(train_idx.tolist())
    stats = given
    if normalize and stats is None:
        stats = folder_stats(train, base / CACHE_DIR if cache else None)
    if stats is not None:
        train, test = (_normalised(ds, *stats) for ds in (train, test))
    return DataSplits(train, test, len(train.classes), (channels, crop, crop), "folder", train.classes,
                      test.preprocess())


def _normalised(ds: ImageFolderDataset, mean: Sequence[float], std: Sequence[float]) -> ImageFolderDataset:
    out = copy.copy(ds)
    out.set_normalization(tuple(mean), tuple(std))
    return out


def folder_stats(train: ImageFolderDataset, cache_dir: Path | None = None
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (``[0, 1]`` units) of the training images after the evaluation transform.

    Exact and independent of the order of the images (value counts of the uint8 pixels).  With
    ``cache_dir`` the result is kept in ``<cache_dir>/folder-stats-<digest>.json``, the digest being
    that of the files (relative paths, sizes, modification times) and the transform, so a later load
    of the same images reads it back instead of decoding them again; a folder that cannot be written
    only costs the recomputation (a warning says so).
    """
    view = copy.copy(train)
    view.train = False
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(json.dumps({"v": 1, "size": view.resize_size, "crop": view.image_size,
                                       "channels": view.channels}).encode())
        for i in range(len(view)):
            st = view.path(i).stat()
            h.update(f"{os.fsdecode(view._paths[i])}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        path = cache_dir / f"folder-stats-{h.hexdigest()[:24]}.json"
        try:
            record = json.loads(path.read_text())
            if len(record["mean"]) == len(record["std"]) == view.channels:
                return tuple(map(float, record["mean"])), tuple(map(float, record["std"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no (usable) cache: compute
    hists = torch.zeros(view.channels, 256, dtype=torch.float64)
    for i in range(len(view)):
        hists += _channel_histograms(view.pixels(i).unsqueeze(0))
    mean, std = _stats_from_histograms(hists)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"mean": mean, "std": std, "images": len(view),
                                                "size": view.resize_size, "crop": view.image_size}, indent=1))
        except OSError as exc:
            warnings.warn(f"folder: cannot cache the normalisation statistics in {path.parent} "
                          f"({exc.strerror or exc}); "
                          "they are recomputed at every load (data.options.cache = false silences this)", stacklevel=2)
    return mean, std


# ------------------------------------------------------------------------------------------------
# an .npz array file
# ------------------------------------------------------------------------------------------------


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of the arrays in an ``.npz`` file, read from the headers only (no data)."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
            out[info.filename[: -len(".npy")]] = (tuple(int(n) for n in shape), np.dtype(dtype))
    return out


def array_file_errors(root: str | os.PathLike[str] | None) -> list[str]:
    """What is wrong with an array dataset's file (existence, keys, shapes, dtypes), one line each.

    Reads only the array headers, so it is cheap enough to run when a configuration is loaded.
    """
    if root is None or str(root) == "":
        return ["data.root: must name the .npz file of the array dataset (data.name = 'array')"]
    path = Path(root).expanduser()
    where = f"data.root: {path}"
    if not path.is_file():
        return [f"{where}: no such file" + ("" if path.parent.is_dir() else f" ({path.parent} does not exist)")]
    try:
        headers = npz_headers(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return [f"{where}: not a readable .npz file (np.savez / np.savez_compressed write one): {exc}"]
    errors: list[str] = []
    found = f"(the file holds: {', '.join(sorted(headers)) or 'no arrays'})"
    for key in ("x", "y"):
        if key not in headers:
            errors.append(f"{where}: missing the array {key!r} {found}")
    if ("x_test" in headers) != ("y_test" in headers):
        have, miss = ("x_test", "y_test") if "x_test" in headers else ("y_test", "x_test")
        errors.append(f"{where}: holds {have!r} but not {miss!r}; give both or neither {found}")
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        if x_key not in headers:
            continue
        shape, dtype = headers[x_key]
        if len(shape) not in (2, 3, 4):
            errors.append(f"{where}: {x_key!r} has shape {shape}; expected (N, F) features, (N, C, L) 1-D signals "
                          f"or (N, C, H, W) images")
        elif shape[0] < 1 or 0 in shape:
            errors.append(f"{where}: {x_key!r} has shape {shape}; it holds no samples")
        if dtype.kind not in "iuf":
            errors.append(f"{where}: {x_key!r} has dtype {dtype}; expected numbers (float or integer)")
        if x_key == "x_test" and "x" in headers and shape[1:] != headers["x"][0][1:]:
            errors.append(f"{where}: 'x_test' has shape {shape} but 'x' has {headers['x'][0]}; one sample must "
                          f"have the same shape {headers['x'][0][1:]} in both")
        if y_key in headers:
            y_shape, y_dtype = headers[y_key]
            if y_shape != shape[:1]:
                errors.append(f"{where}: {y_key!r} has shape {y_shape}; expected ({shape[0]},), one label per "
                              f"sample of {x_key!r} {shape}")
            if y_dtype.kind not in "iu":
                errors.append(f"{where}: {y_key!r} has dtype {y_dtype}; expected integer class labels 0..K-1")
    if "classes" in headers:
        shape, dtype = headers["classes"]
        if len(shape) != 1 or dtype.kind not in "US":
            errors.append(f"{where}: 'classes' has shape {shape} and dtype {dtype}; expected a 1-D array of strings, "
                          f"e.g. np.array(['cat', 'dog'])")
    return errors


def load_array(
    root: str | os.PathLike[str] | None = None,
    *,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    normalize: bool = True,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    augment: str = "none",
) -> DataSplits:
    """An array dataset: the ``.npz`` file ``root`` with ``x``, ``y``, optionally ``x_test``, ``y_test``, ``classes``.

    ``x`` (N, F), (N, C, L) or (N, C, H, W) — the shape decides features, 1-D signals or images —
    of any float or integer dtype (kept as stored; batches are float32); ``y`` (N,) integer labels
    ``0..K-1`` (``K = len(classes)``, else the largest label + 1); ``classes`` a string array of
    class names.  Without ``x_test``/``y_test`` the test split is :func:`holdout_split`
    (``test_fraction``, ``split_seed``).  With ``normalize`` the inputs are ``(x - mean) / std`` per
    channel (axis 1; per feature for (N, F)), with ``mean``/``std`` given or computed from the
    training split (a constant channel gets std 1).  ``augment`` (image arrays, training split):
    ``"flip"`` or ``"crop-flip"`` (random crop after zero-padding by H // 8, then a flip).
    """
    errors = array_file_errors(root)
    if errors:
        raise DatasetError("; ".join(e.removeprefix("data.root: ") for e in errors))
    path = Path(str(root)).expanduser()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test", "classes") if k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: cannot read the arrays ({exc})") from exc
    x, y = arrays["x"], arrays["y"].astype(np.int64)
    names = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays else None
    labels = [("y", y)] + ([("y_test", arrays["y_test"].astype(np.int64))] if "y_test" in arrays else [])
    k = len(names) if names is not None else 1 + max(int(v.max()) for _, v in labels)
    for key, v in labels:
        if v.min() < 0 or v.max() >= k:
            bound = f"the {k} names of 'classes'" if names is not None else "0..K-1"
            raise DatasetError(f"{path}: {key!r} has labels in [{v.min()}, {v.max()}], expected 0..{k - 1} ({bound})")
    for key in ("x", "x_test"):
        if key in arrays and arrays[key].dtype.kind == "f" and not np.isfinite(arrays[key]).all():
            bad = np.argwhere(~np.isfinite(arrays[key]))[0]
            where = tuple(int(i) for i in bad)
            raise DatasetError(f"{path}: {key!r} holds a non-finite value (first at index {where})")
    if "x_test" in arrays:
        x_train, y_train, x_test, y_test = x, y, arrays["x_test"], labels[1][1]
        split = "x_test/y_test"
    else:
        train_idx, test_idx = holdout_split(y, test_fraction, split_seed)
        if not len(test_idx):
            raise DatasetError(f"{path}: no 'x_test'/'y_test' and no class with two samples to hold one out; add a "
                               f"test split")
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        split = f"held out: test_fraction {test_fraction}, split_seed {split_seed}"
    channels = x.shape[1]
    if augment not in ARRAY_AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(ARRAY_AUGMENTS)}, got {augment!r}")
    if augment != "none" and x.ndim != 4:
        raise ValueError(f"augment = {augment!r} needs image arrays (N, C, H, W); {path} holds x of shape {x.shape}")
    stats = _pair(mean, std, channels, f"array {path}")
    if normalize and stats is None:
        stats = array_stats(x_train)
    aug = None if augment == "none" else RandomCropFlip(padding=max(1, x.shape[2] // 8) if augment == "crop-flip"
                                                        else 0)
    classes = names if names is not None else tuple(map(str, range(k)))

    def tensor(a: np.ndarray) -> Tensor:
        a = a.astype(np.float32) if a.dtype == np.float64 else a
        return torch.from_numpy(np.ascontiguousarray(a))

    mean_t, std_t = (None, None) if stats is None else stats
    train = InMemoryDataset(tensor(x_train), torch.from_numpy(y_train), mean=mean_t, std=std_t, augment=aug,
                            classes=classes)
    test = InMemoryDataset(tensor(x_test), torch.from_numpy(y_test), mean=mean_t, std=std_t, classes=classes)
    how = Preprocess(1.0, mean_t, std_t, f"arrays shaped {tuple(x.shape[1:])} as stored in 'x' of {path.name} "
                                         f"(dtype {x.dtype}); test split: {split}")
    return DataSplits(train, test, k, tuple(int(n) for n in x.shape[1:]), "array", classes, how)


def array_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (axis 1) mean and population std of ``x`` (N, C, ...) in float64, in chunks of rows.

    A constant channel gets std 1 (it is only shifted).
    """
    c = x.shape[1]
    n = x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))
    total = np.zeros(c)
    for lo in range(0, x.shape[0], chunk):
        part = x[lo : lo + chunk].astype(np.float64)
        total += part.sum(axis=tuple(i for i in range(part.ndim) if i != 1))
    mean = total / n
    sq = np.zeros(c)
    shape = (1, c) + (1,) * (x.ndim - 2)
    for lo in range(0, x.shape[0], chunk):
        part = x[lo : lo + chunk].astype(np.float64) - mean.reshape(shape)
        sq += (part**2).sum(axis=tuple(i for i in range(part.ndim) if i != 1))
    std = np.sqrt(sq / n)
    return tuple(float(v) for v in mean), tuple(float(s) if s > 0 else 1.0 for s in std)


# ------------------------------------------------------------------------------------------------
# torch Datasets given in Python
# ------------------------------------------------------------------------------------------------


def load_custom(root: str | os.PathLike[str] | None = None) -> DataSplits:
    """``data.name = "custom"`` marks data given in Python; there is nothing to load from a configuration."""
    raise DatasetError(
        "data.name = 'custom': this run's data were given in Python (Trainer(cfg, out, data=...) or "
        "pruning.train.train(cfg, out, data=...)) and are in no file; pass them again the same way "
        "(pruning.from_datasets(train, test)), or train with data.name = 'folder' / 'array' to name them in the "
        "configuration"
    )


class TorchDataset(Dataset):
    """A torch ``Dataset`` of ``(input, label)`` pairs made fit for the loaders of :mod:`pruning.data`.

    Inputs become float32 tensors, labels Python ints.  Indexed by ``(index, seed)`` (how a training
    loader asks, one seed per sample drawn from ``(seed, epoch)``), the wrapped dataset runs with
    torch's global RNG seeded by ``seed`` (and restored afterwards), so random transforms that draw from
    torch's RNG give the same batches whatever the number of loader workers or processes.
    """

    accepts_sample_seed = True

    def __init__(self, dataset: Dataset, name: str = "dataset") -> None:
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        if isinstance(item, tuple):
            index, seed = item
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                return self._sample(int(index))
        return self._sample(int(item))

    def _sample(self, index: int) -> tuple[Tensor, int]:
        sample = self.dataset[index]
        if not isinstance(sample, tuple | list) or len(sample) != 2:
            length = f" of length {len(sample)}" if isinstance(sample, tuple | list) else ""
            raise DatasetError(f"{self.name}[{index}]: expected an (input, label) pair, got "
                               f"{type(sample).__name__}{length}")
        x, y = sample
        x = torch.as_tensor(x)
        x = x.to(torch.float32) if x.dtype != torch.float32 else x
        try:
            label = int(y)
        except (TypeError, ValueError):
            raise DatasetError(f"{self.name}[{index}]: the label must be an integer class index, got "
                               f"{type(y).__name__} {y!r:.80}") from None
        if torch.is_tensor(y) and y.is_floating_point() or isinstance(y, float):
            raise DatasetError(f"{self.name}[{index}]: the label must be an integer class index, got {y!r:.80}")
        return x, label

    def subset(self, indices: Sequence[int]) -> TorchDataset:
        """The samples at ``indices`` (a ``torch.utils.data.Subset`` of the wrapped dataset)."""
        return TorchDataset(Subset(self.dataset, list(indices)), self.name)


def _as_split(ds: Any, name: str) -> Any:
    """A split fit for :func:`pruning.data.make_loader`: our datasets as they are, a TensorDataset in memory."""
    if isinstance(ds, InMemoryDataset | ImageFolderDataset | TorchDataset):
        return ds
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        x, y = ds.tensors
        if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise DatasetError(f"{name}: the second tensor of the TensorDataset must hold integer class labels (N,), "
                               f"got {y.dtype} {tuple(y.shape)}")
        return InMemoryDataset(x if x.dtype != torch.float64 else x.float(), y)
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise TypeError(f"{name} must be a torch Dataset with __len__ and __getitem__, got {type(ds).__name__}")
    return TorchDataset(ds, name)


def _labels(ds: Any) -> np.ndarray:
    """All labels of a split: its ``targets`` when it has them, else read sample by sample."""
    if isinstance(ds, InMemoryDataset):
        return ds.targets.cpu().numpy()
    inner = ds.dataset if isinstance(ds, TorchDataset) else ds
    targets = getattr(inner, "targets", None)
    if targets is not None and len(targets) == len(ds):
        return np.asarray(torch.as_tensor(targets).cpu(), dtype=np.int64)
    return np.array([ds[i][1] for i in range(len(ds))], dtype=np.int64)


def from_datasets(
    train: Dataset,
    test: Dataset,
    *,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
    preprocess: Preprocess | None = None,
    name: str = "custom",
) -> DataSplits:
    """Your torch Datasets as the :class:`DataSplits` a run trains on: ``Trainer(cfg, out, data=...)``.

    ``train`` and ``test`` return ``(input, label)`` pairs: a tensor (or array) of one fixed shape and an
    integer class index.  A ``TensorDataset(x, y)`` is kept in memory (the fast loader); any other
    Dataset is read sample by sample through ``data.num_workers`` loader workers per process, and
    indexed with a per-sample seed so that torch-RNG transforms inside it are reproducible (see
    :class:`TorchDataset`).  Either way the order of an epoch is a function of ``(train.seed, epoch)``
    and a data-parallel run gives every process its part of each global batch.

    ``classes`` (names) or ``num_classes`` give the number of classes; without them it is the largest
    label + 1, read from the datasets' ``targets`` attribute if they have one, else from every sample.
    ``preprocess``: what your datasets do to a raw input (recorded in checkpoints and exports, not
    applied). The input shape is that of ``train[0]``.

    >>> x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    >>> data = from_datasets(TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:]), num_classes=3)
    >>> data.input_shape, data.num_classes, len(data.train), len(data.test)
    ((1, 8, 8), 3, 48, 16)
    """
    splits = {"train": _as_split(train, "train dataset"), "test": _as_split(test, "test dataset")}
    shapes = {}
    for key, ds in splits.items():
        if len(ds) == 0:
            raise DatasetError(f"the {key} dataset is empty")
        x, _ = ds[0]
        shapes[key] = tuple(int(n) for n in x.shape)
    if shapes["train"] != shapes["test"]:
        raise DatasetError(f"the train dataset's inputs have shape {shapes['train']}, the test dataset's "
                           f"{shapes['test']}; they must be the same")
    if classes is not None:
        classes = tuple(str(c) for c in classes)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes = {num_classes} but {len(classes)} class names were given")
        num_classes = len(classes)
    if num_classes is None:
        num_classes = 1 + max(int(_labels(ds).max()) for ds in splits.values())
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return DataSplits(splits["train"], splits["test"], int(num_classes), shapes["train"], name,
                      classes or tuple(map(str, range(num_classes))), preprocess)


# ------------------------------------------------------------------------------------------------
# registry entries (merged into pruning.data.DATASETS / OPTION_RULES) and file checks of a configuration
# ------------------------------------------------------------------------------------------------

_positive: tuple[Callable[[Any], bool], str] = (lambda v: v >= 1, "must be >= 1")
_fraction: tuple[Callable[[Any], bool], str] = (lambda v: 0.0 < v < 1.0, "must lie in (0, 1)")
_seed: tuple[Callable[[Any], bool], str] = (lambda v: v >= 0, "must be >= 0")
_stats: tuple[Callable[[Any], bool], str] = (lambda v: len(v) >= 1, "must be a non-empty list (one value per channel)")

USER_DATASETS: dict[str, Callable[..., DataSplits]] = {"folder": load_folder, "array": load_array,
                                                       "custom": load_custom}
USER_OPTION_RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "folder": {
        "size": _positive,
        "crop": (lambda v: v >= 0, "must be >= 0 (0 = size)"),
        "channels": (lambda v: v in (1, 3), "must be 1 (greyscale) or 3 (RGB)"),
        "augment": (lambda v: v in FOLDER_AUGMENTS, f"must be one of {', '.join(map(repr, FOLDER_AUGMENTS))}"),
        "mean": _stats,
        "std": (lambda v: len(v) >= 1 and min(v) > 0, "must be a non-empty list of positive numbers"),
        "test_fraction": _fraction,
        "split_seed": _seed,
    },
    "array": {
        "augment": (lambda v: v in ARRAY_AUGMENTS, f"must be one of {', '.join(map(repr, ARRAY_AUGMENTS))}"),
        "mean": _stats,
        "std": (lambda v: len(v) >= 1 and min(v) > 0, "must be a non-empty list of positive numbers"),
        "test_fraction": _fraction,
        "split_seed": _seed,
    },
}


def source_errors(name: str, root: str | None, options: dict[str, Any]) -> list[str]:
    """Problems with the files a ``[data]`` section names, found without loading them (configuration time)."""
    if name == "custom":
        return ["data.name: 'custom' marks torch Datasets given in Python (pruning.from_datasets, "
                "Trainer(cfg, out, data=...)); a configuration names 'folder' or 'array' data instead"]
    if name == "array":
        return array_file_errors(root)
    if name == "folder":
        if not root:
            return ["data.root: must name the folder holding train/<class>/ image folders (data.name = 'folder')"]
        base = Path(root).expanduser()
        if not (base / "train").is_dir():
            return [f"data.root: {base / 'train'} is not a folder; expected train/<class>/*.png|jpg|jpeg "
                    f"(and optionally test/<class>/...) in {base}; {_listing(base)}"]
        crop, size = options.get("crop", 0), options.get("size", 32)
        if isinstance(crop, int) and isinstance(size, int) and crop > size:
            return [f"data.options.crop: must not exceed size ({size}), got {crop}"]
    return []


__all__ = [
    "ARRAY_AUGMENTS",
    "FOLDER_TEST_DIRS",
    "TorchDataset",
    "array_file_errors",
    "array_stats",
    "folder_stats",
    "from_datasets",
    "holdout_split",
    "load_array",
    "load_custom",
    "load_folder",
    "npz_headers",
    "source_errors",
]
