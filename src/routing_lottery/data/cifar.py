"""CIFAR-10 and CIFAR-100 from the official python-pickle files in a directory the user names.

The pickles are read with a restricted unpickler that accepts only the NumPy types the official
files contain, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .labelled import Splits
from .images import DatasetNotFoundError, ImageDataset, normalize_splits

SOURCE_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FOLDER, CIFAR100_FOLDER = "cifar-10-batches-py", "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a readable CIFAR pickle ({error}); download it again from {SOURCE_URL}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a dictionary; is it a CIFAR file?")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _find_folder(root: str | Path, folder: str, required: tuple[str, ...], archive: str) -> Path:
    """``root`` itself or ``root/folder``, whichever holds every required file."""
    root = Path(root).expanduser()
    for candidate in (root, root / folder):
        if all((candidate / name).is_file() for name in required):
            return candidate
    missing = [n for n in required if not (root / folder / n).is_file() and not (root / n).is_file()]
    raise DatasetNotFoundError(
        f"{root} does not hold the official {folder} files (missing: {', '.join(missing)}). "
        f"Download {archive} from {SOURCE_URL} and extract it there, so that {root / folder} exists."
    )


def _images(entry: dict[str, Any], path: Path) -> torch.Tensor:
    data = np.asarray(entry.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be (N, 3072) uint8; got shape {data.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def _labels(entry: dict[str, Any], key: str, count: int, path: Path) -> torch.Tensor:
    if key not in entry:
        raise ValueError(f"{path} has no {key!r}; is it the right CIFAR file?")
    labels = torch.as_tensor(np.asarray(entry[key]), dtype=torch.long)
    if labels.shape != (count,):
        raise ValueError(f"{path}: {count} images but {len(labels)} {key}")
    return labels


def _names(meta: dict[str, Any], key: str) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[key])


def load_cifar10(root: str | Path) -> Splits:
    """The 50,000/10,000 CIFAR-10 split, channels standardized with training statistics."""
    folder = _find_folder(root, CIFAR10_FOLDER, (*CIFAR10_TRAIN, "test_batch", "batches.meta"), "cifar-10-python.tar.gz")
    names = _names(_read_pickle(folder / "batches.meta"), "label_names")

    def split(files: tuple[str, ...]) -> ImageDataset:
        images, labels = [], []
        for name in files:
            entry = _read_pickle(folder / name)
            images.append(_images(entry, folder / name))
            labels.append(_labels(entry, "labels", len(images[-1]), folder / name))
        return ImageDataset(torch.cat(images), torch.cat(labels), names)

    return normalize_splits(Splits(split(CIFAR10_TRAIN), split(("test_batch",))))


def load_cifar100(root: str | Path, label: Literal["fine", "coarse"] = "fine") -> Splits:
    """CIFAR-100 with its 100 fine labels or its 20 official superclasses (``label="coarse"``)."""
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse'; got {label!r}")
    folder = _find_folder(root, CIFAR100_FOLDER, ("train", "test", "meta"), "cifar-100-python.tar.gz")
    names = _names(_read_pickle(folder / "meta"), f"{label}_label_names")

    def split(name: str) -> ImageDataset:
        entry = _read_pickle(folder / name)
        images = _images(entry, folder / name)
        return ImageDataset(images, _labels(entry, f"{label}_labels", len(images), folder / name), names)

    return normalize_splits(Splits(split("train"), split("test")))
