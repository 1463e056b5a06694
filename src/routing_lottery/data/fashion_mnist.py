"""Fashion-MNIST from its four standard IDX files, offline: a harder 10-class set than the digits.

Zalando's Fashion-MNIST (60,000 training and 10,000 test images of 28x28 grey clothing, 10
classes) is a drop-in for MNIST's files and names, and harder: a small convolutional network
reaches about 0.99 on MNIST but about 0.90 here, so a detector per class has room to fail.
Debian's ``dataset-fashion-mnist`` package installs the four gzip files under
``/usr/share/datasets/fashion-mnist/``, the default folder; any other folder that holds them,
compressed or not, is named with ``data.root`` (``rtl run ... --data DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import DataError
from .idx import read_idx
from .images import DatasetNotFoundError, ImageDataset, normalize_splits
from .labelled import Splits

FASHION_MNIST_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
"""The official class names, in label order 0..9."""

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
SOURCE_URL = "https://github.com/zalandoresearch/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
"""Split -> (images, labels) file names; each may also be present gzip-compressed as ``NAME.gz``."""

SIDE = 28


def _remedy() -> str:
    return (f"install them with `apt-get install dataset-fashion-mnist` (it puts them in {DEBIAN_ROOT}), or download "
            f"the four *-ubyte.gz files from {SOURCE_URL} into a folder DIR and pass --data DIR (data.root)")


def _locate(root: Path, name: str) -> Path | None:
    """``root/name`` or, failing that, ``root/name.gz``; None when neither is a file."""
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)


def find_files(root: str | Path) -> dict[str, tuple[Path, Path]]:
    """Split -> (images, labels) paths under ``root``; ``DatasetNotFoundError`` names every file missing."""
    root = Path(root).expanduser()
    found = {name: _locate(root, name) for split in FILES.values() for name in split}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        folder = f"{root}" if root.is_dir() else f"{root} (no such folder)"
        raise DatasetNotFoundError(f"Fashion-MNIST: {folder} lacks {', '.join(missing)} (plain or .gz); {_remedy()}")
    return {split: (found[images], found[labels]) for split, (images, labels) in FILES.items()}  # type: ignore[misc]


def _split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's images ``(N, 1, 28, 28)`` in [0, 1] and labels ``(N,)``, checked against each other."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or not len(images):
        raise DataError(f"{images_path}: holds {images.dtype} values of shape {images.shape}, not the (N, {SIDE}, "
                        f"{SIDE}) unsigned bytes of Fashion-MNIST images with N >= 1")
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DataError(f"{labels_path}: holds {labels.dtype} values of shape {labels.shape}, not the "
                        f"{len(images)} unsigned-byte labels its images file {images_path.name} needs")
    outside = np.flatnonzero(labels >= len(FASHION_MNIST_NAMES))
    if outside.size:
        first = int(outside[0])
        raise DataError(f"{labels_path}: label {labels[first]} at position {first} is outside 0..9")
    pixels = torch.from_numpy(images).unsqueeze(1).float() / 255.0
    return pixels, torch.from_numpy(labels.astype(np.int64))


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    # antialias: shrinking 28 -> 16 with plain bilinear would drop pixels instead of averaging them
    if size == SIDE:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def load_fashion_mnist(root: str | Path | None = None, image_size: int = SIDE) -> Splits:
    """The official 60,000/10,000 split, resized to ``image_size`` and standardized with training statistics.

    Parameters
    ----------
    root:
        The folder holding the four IDX files (plain or ``.gz``); None: Debian's ``/usr/share/datasets/fashion-mnist``.
    image_size:
        Side of the square images served (28 keeps the originals; at least 8, as the GhostNet's four
        stride-2 stages need room).

    Raises ``DatasetNotFoundError`` naming the missing files and how to get them, and ``DataError``
    naming the file when one is corrupt, truncated or not a Fashion-MNIST file.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8; got {image_size!r}")
    paths = find_files(DEBIAN_ROOT if root is None else root)

    def split(name: str) -> ImageDataset:
        images, labels = _split(*paths[name])
        return ImageDataset(_resize(images, image_size), labels, FASHION_MNIST_NAMES)

    return normalize_splits(Splits(split("train"), split("test")))


def fashion_mnist_dataset(data: Any, seed: int) -> Splits:
    """The ``fashion_mnist`` entry of ``DATASETS``: ``data.root`` (default Debian's folder) at ``data.image_size``.

    ``seed`` is unused here: the split is the official one, and the per-class subsets the config asks
    for (``train_per_class``, ``test_per_class``) are drawn from the run's seed by the task builder.
    """
    del seed
    return load_fashion_mnist(data.root, image_size=data.image_size)
